//! openraft's own storage test suite, run against a fresh store in a temporary directory.

use consensus::{ConfigStateMachine, LogStore, NodeId, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{StorageError, StorageIOError};
use tempfile::TempDir;

struct TempStore;

impl StoreBuilder<TypeConfig, LogStore, ConfigStateMachine, TempDir> for TempStore {
    async fn build(&self) -> Result<(TempDir, LogStore, ConfigStateMachine), StorageError<NodeId>> {
        let dir = TempDir::new().map_err(|e| StorageIOError::read_logs(&e))?;
        let log = LogStore::open(dir.path()).map_err(|e| StorageIOError::read_logs(&e))?;
        let state_machine = ConfigStateMachine::open(dir.path())
            .map_err(|e| StorageIOError::read_state_machine(&e))?;
        Ok((dir, log, state_machine))
    }
}

#[test]
fn test_openraft_storage_suite() {
    Suite::test_all(TempStore).expect("the storage suite passes");
}

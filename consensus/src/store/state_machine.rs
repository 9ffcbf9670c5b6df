//! The state machine: the cluster configuration in memory, with its last snapshot on disk.

use std::io::{self, Cursor};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{
    EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{StoreError, create_dir, read_single, write_atomic};
use crate::{Applied, ClusterConfig, Member, NodeId, TypeConfig};

type Entry = openraft::Entry<TypeConfig>;

const SNAPSHOT_FILE: &str = "snapshot";

/// The snapshot file's contents.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Member>,
    /// The configuration, MessagePack-encoded: what travels to a follower.
    data: Vec<u8>,
}

#[derive(Debug)]
struct State {
    last_applied: Option<LogId<NodeId>>,
    last_membership: StoredMembership<NodeId, Member>,
    config: Arc<ClusterConfig>,
    snapshot: Option<StoredSnapshot>,
    /// Tells snapshots built from the same log id apart, as openraft asks.
    snapshots_built: u64,
}

/// The Raft state machine: applies [`Command`](crate::Command)s to the cluster configuration.
#[derive(Debug, Clone)]
pub struct ConfigStateMachine {
    dir: PathBuf,
    state: Arc<Mutex<State>>,
    published: Arc<watch::Sender<Arc<ClusterConfig>>>,
}

/// Builds a snapshot of the configuration as applied at the time of building.
#[derive(Debug)]
pub struct SnapshotBuilder {
    state_machine: ConfigStateMachine,
}

impl ConfigStateMachine {
    /// Opens the state machine in `dir`, restored from the snapshot there if there is one.
    pub fn open(dir: &Path) -> Result<ConfigStateMachine, StoreError> {
        create_dir(dir)?;
        let path = dir.join(SNAPSHOT_FILE);
        let snapshot: Option<StoredSnapshot> = read_single(&path)?;
        let (last_applied, last_membership, config) = match &snapshot {
            Some(s) => {
                let config =
                    rmp_serde::from_slice(&s.data).map_err(|source| StoreError::Decode {
                        path: path.clone(),
                        offset: 0,
                        source,
                    })?;
                (s.meta.last_log_id, s.meta.last_membership.clone(), config)
            }
            None => (None, StoredMembership::default(), ClusterConfig::default()),
        };
        let config = Arc::new(config);
        let (published, _) = watch::channel(config.clone());
        Ok(ConfigStateMachine {
            dir: dir.to_owned(),
            state: Arc::new(Mutex::new(State {
                last_applied,
                last_membership,
                config,
                snapshot,
                snapshots_built: 0,
            })),
            published: Arc::new(published),
        })
    }

    /// The configuration as applied so far.
    pub fn config(&self) -> Arc<ClusterConfig> {
        self.state.lock().config.clone()
    }

    /// A receiver that sees every configuration this state machine applies or installs.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterConfig>> {
        self.published.subscribe()
    }

    fn publish(&self, config: Arc<ClusterConfig>) {
        // `send_replace` keeps the value even when nobody is subscribed yet.
        self.published.send_replace(config);
    }

    /// Writes `snapshot` to disk, then makes it current.
    fn save_snapshot(&self, state: &mut State, snapshot: StoredSnapshot) -> io::Result<()> {
        let mut bytes = Vec::new();
        super::record::encode(&snapshot, &mut bytes).map_err(io::Error::other)?;
        write_atomic(&self.dir, SNAPSHOT_FILE, &bytes)?;
        state.snapshot = Some(snapshot);
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let mut state = self.state_machine.state.lock();
        let data = rmp_serde::to_vec_named(&*state.config)
            .map_err(|e| StorageIOError::read_state_machine(&e))?;
        state.snapshots_built += 1;
        let snapshot_id = match state.last_applied {
            Some(id) => format!("{}-{}-{}", id.leader_id, id.index, state.snapshots_built),
            None => format!("--{}", state.snapshots_built),
        };
        let meta = SnapshotMeta {
            last_log_id: state.last_applied,
            last_membership: state.last_membership.clone(),
            snapshot_id,
        };
        let snapshot = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        self.state_machine
            .save_snapshot(&mut state, snapshot)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for ConfigStateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Member>), StorageError<NodeId>>
    {
        let state = self.state.lock();
        Ok((state.last_applied, state.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut state = self.state.lock();
        let mut config = None::<ClusterConfig>;
        let mut replies = Vec::new();
        for entry in entries {
            state.last_applied = Some(entry.log_id);
            let result = match entry.payload {
                EntryPayload::Blank => Ok(()),
                EntryPayload::Normal(command) => config
                    .get_or_insert_with(|| (*state.config).clone())
                    .apply(&command),
                EntryPayload::Membership(membership) => {
                    state.last_membership = StoredMembership::new(Some(entry.log_id), membership);
                    Ok(())
                }
            };
            let version = config.as_ref().unwrap_or(&state.config).version;
            replies.push(Applied { version, result });
        }
        if let Some(config) = config {
            let config = Arc::new(config);
            state.config = config.clone();
            drop(state);
            self.publish(config);
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder {
            state_machine: self.clone(),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let config: ClusterConfig = rmp_serde::from_slice(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let config = Arc::new(config);
        let mut state = self.state.lock();
        self.save_snapshot(
            &mut state,
            StoredSnapshot {
                meta: meta.clone(),
                data,
            },
        )
        .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        state.last_applied = meta.last_log_id;
        state.last_membership = meta.last_membership.clone();
        state.config = config.clone();
        drop(state);
        self.publish(config);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let state = self.state.lock();
        Ok(state.snapshot.as_ref().map(|s| Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(Cursor::new(s.data.clone())),
        }))
    }
}

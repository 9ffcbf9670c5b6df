//! Replicated cluster configuration: the openraft type declaration, the configuration model that
//! is the Raft state machine, its durable storage, the Raft transport over QUIC connections the
//! node provides, and [`Cluster`], the handle the node uses for every cluster operation (writes
//! forwarded to the leader, linearizable reads, adding and removing nodes, reports). Depends on
//! no other workspace crate.
//!
//! Guarantees:
//! * [`LogStore::save_vote`](openraft::storage::RaftLogStorage::save_vote) and `append` are on
//!   disk (fsync'd) before they report success; a torn last log record is dropped on reopen,
//!   and a damaged record with intact ones after it (corruption of acknowledged entries) makes
//!   the store refuse to open instead of cutting them off.
//! * A command is validated against the configuration it is applied to; a rejected command is
//!   the applied result ([`Applied::result`]) and changes nothing.
//! * A node answers Raft requests only from members of its own cluster (a node not yet joined:
//!   only from the cluster whose join token it holds), each checked when it is served; a node
//!   removed from the cluster is cut off as soon as each member applies the removal.

mod cluster;
pub mod config;
mod store;
pub mod transport;

use std::fmt;
use std::io::Cursor;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use cluster::{
    BgpPeerReport, BgpReport, Cluster, ClusterError, Deadlines, JoinToken, NodeReport, Probes,
    Refusal, Role, node_id,
};
pub use config::{ClusterConfig, ClusterId, ClusterIdentity, Command, ConfigError, NodeId};
pub use store::{ConfigStateMachine, LogReader, LogStore, SnapshotBuilder, StoreError};
pub use transport::{Credentials, Dialer, QuicNetwork, ServeCounters, serve_connection};

openraft::declare_raft_types!(
    /// The openraft types of the configuration cluster.
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = NodeId,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A Raft instance of the configuration cluster.
pub type Raft = openraft::Raft<TypeConfig>;

/// A Raft member as openraft's membership records it: enough to reach the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    /// The node's QUIC endpoint, where its Raft RPCs are accepted.
    pub quic_addr: SocketAddr,
}

/// openraft requires `Default` for its node type; it is never a real member.
impl Default for Member {
    fn default() -> Self {
        Member {
            name: String::new(),
            quic_addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        }
    }
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.quic_addr)
    }
}

/// The result of applying one log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The configuration version after the entry.
    pub version: u64,
    /// Whether the command was accepted. Blank and membership entries are always `Ok`.
    pub result: Result<(), ConfigError>,
}

/// Opens the storage in `dir` and starts a Raft node on it.
///
/// Returns the node and a receiver of every configuration it applies (starting with the one
/// restored from the last snapshot).
pub async fn start<N>(
    id: NodeId,
    raft_config: Arc<openraft::Config>,
    dir: &Path,
    network: N,
) -> Result<(Raft, watch::Receiver<Arc<ClusterConfig>>), StartError>
where
    N: openraft::RaftNetworkFactory<TypeConfig>,
{
    let log = LogStore::open(dir)?;
    let state_machine = ConfigStateMachine::open(dir)?;
    let applied = state_machine.subscribe();
    let raft = Raft::new(id, raft_config, network, log, state_machine).await?;
    Ok((raft, applied))
}

/// Why a Raft node did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start raft: {0}")]
    Raft(#[from] openraft::error::Fatal<NodeId>),
}

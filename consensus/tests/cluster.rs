//! Three Raft nodes on durable storage, connected in process, agree on the configuration; a fourth
//! joins as a learner from a snapshot.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use consensus::config::{Node, Settings};
use consensus::{Applied, ClusterConfig, Command, ConfigError, Member, NodeId, Raft, TypeConfig};
use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{Config, SnapshotPolicy};
use tempfile::TempDir;
use tokio::sync::watch;

/// Delivers RPCs by calling the target `Raft` directly.
#[derive(Clone, Default)]
struct Router {
    nodes: Arc<Mutex<BTreeMap<NodeId, Raft>>>,
}

struct Peer {
    target: NodeId,
    router: Router,
}

type RpcResult<T, E = RaftError<NodeId>> = Result<T, RPCError<NodeId, Member, E>>;

impl Peer {
    fn raft(&self) -> Option<Raft> {
        self.router.nodes.lock().unwrap().get(&self.target).cloned()
    }
}

fn unreachable<E: std::error::Error>() -> RPCError<NodeId, Member, E> {
    let down = io::Error::new(io::ErrorKind::NotConnected, "node is not running");
    RPCError::Unreachable(Unreachable::new(&down))
}

impl RaftNetworkFactory<TypeConfig> for Router {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, _node: &Member) -> Peer {
        Peer {
            target,
            router: self.clone(),
        }
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let raft = self.raft().ok_or_else(unreachable)?;
        raft.append_entries(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        let raft = self.raft().ok_or_else(unreachable)?;
        raft.install_snapshot(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        let raft = self.raft().ok_or_else(unreachable)?;
        raft.vote(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

fn member(id: NodeId) -> Member {
    Member {
        name: format!("n{id}"),
        quic_addr: format!("10.0.0.{id}:7000").parse().unwrap(),
    }
}

fn add_node(id: NodeId) -> Command {
    Command::AddNode(Node {
        id,
        name: format!("n{id}"),
        quic_addr: member(id).quic_addr,
        lips: vec![format!("198.19.0.{id}").parse().unwrap()],
        drained: false,
    })
}

struct Cluster {
    router: Router,
    config: Arc<Config>,
    _dirs: Vec<TempDir>,
    applied: BTreeMap<NodeId, watch::Receiver<Arc<ClusterConfig>>>,
}

impl Cluster {
    fn new() -> Cluster {
        let config = Config {
            heartbeat_interval: 50,
            election_timeout_min: 150,
            election_timeout_max: 300,
            // Snapshot and purge often, so a late joiner needs the snapshot.
            snapshot_policy: SnapshotPolicy::LogsSinceLast(3),
            max_in_snapshot_log_to_keep: 0,
            purge_batch_size: 1,
            ..Default::default()
        };
        Cluster {
            router: Router::default(),
            config: Arc::new(config.validate().unwrap()),
            _dirs: Vec::new(),
            applied: BTreeMap::new(),
        }
    }

    async fn start(&mut self, id: NodeId) -> Raft {
        let dir = TempDir::new().unwrap();
        let (raft, applied) =
            consensus::start(id, self.config.clone(), dir.path(), self.router.clone())
                .await
                .unwrap();
        self._dirs.push(dir);
        self.applied.insert(id, applied);
        self.router.nodes.lock().unwrap().insert(id, raft.clone());
        raft
    }

    fn raft(&self, id: NodeId) -> Raft {
        self.router.nodes.lock().unwrap()[&id].clone()
    }
}

const TIMEOUT: Option<Duration> = Some(Duration::from_secs(10));

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_three_nodes_agree_on_the_config() {
    let mut cluster = Cluster::new();
    for id in 1..=3 {
        cluster.start(id).await;
    }
    let members: BTreeMap<NodeId, Member> = (1..=3).map(|id| (id, member(id))).collect();
    cluster.raft(1).initialize(members).await.unwrap();
    let metrics = cluster
        .raft(1)
        .wait(TIMEOUT)
        .metrics(|m| m.current_leader.is_some(), "a leader is elected")
        .await
        .unwrap();
    let leader = cluster.raft(metrics.current_leader.unwrap());

    let mut replies = Vec::new();
    for command in [
        add_node(1),
        add_node(2),
        add_node(3),
        add_node(2),
        Command::SetSettings(Settings {
            maglev_seed: 7,
            maglev_table_size: 251,
        }),
    ] {
        replies.push(leader.client_write(command).await.unwrap().data);
    }
    let duplicate = ConfigError::DuplicateNodeId {
        id: 2,
        name: "n2".into(),
    };
    assert_eq!(
        replies,
        [
            Applied {
                version: 1,
                result: Ok(())
            },
            Applied {
                version: 2,
                result: Ok(())
            },
            Applied {
                version: 3,
                result: Ok(())
            },
            Applied {
                version: 3,
                result: Err(duplicate)
            },
            Applied {
                version: 4,
                result: Ok(())
            },
        ]
    );

    // A fourth node joins as a learner once the leader has purged the start of its log, so the
    // learner can only start from a snapshot.
    leader
        .wait(TIMEOUT)
        .metrics(|m| m.purged.is_some(), "the leader purges its log")
        .await
        .unwrap();
    cluster.start(4).await;
    let last = leader.metrics().borrow().last_log_index.unwrap();
    leader.add_learner(4, member(4), true).await.unwrap();
    leader.client_write(add_node(4)).await.unwrap();
    let last = last + 2;

    for (id, applied) in &cluster.applied {
        let raft = cluster.raft(*id);
        raft.wait(TIMEOUT)
            .applied_index_at_least(Some(last), format!("node {id} applies the log"))
            .await
            .unwrap();
        let config = applied.borrow().clone();
        assert_eq!(config.version, 5, "node {id}");
        assert_eq!(config.nodes.len(), 4, "node {id}");
        assert_eq!(config.settings.maglev_table_size, 251, "node {id}");
    }
    let learner = cluster.raft(4).metrics().borrow().clone();
    assert!(
        learner.snapshot.is_some(),
        "the learner installed a snapshot"
    );
    assert!(learner.purged.is_some(), "the early log is purged");

    for id in 1..=4 {
        cluster.raft(id).shutdown().await.unwrap();
    }
}

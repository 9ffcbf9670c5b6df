//! [`Cluster`]: the handle the node uses for every cluster operation (DESIGN §4).
//!
//! * Writes, node additions and removals are carried out by the leader. A node that is not the
//!   leader forwards the request over the Raft QUIC connections ([`RpcKind::Forward`]), through the
//!   same per-peer connection the Raft network uses. A node that turns out not to be the leader
//!   answers with the leader it knows, and the sender retries there until its deadline.
//! * A write returns once this node has applied it, so a following local read sees it.
//! * Reads ([`Cluster::read`]) are linearizable: the leader confirms its leadership with a quorum
//!   (ReadIndex, not a lease) and this node waits until it has applied up to that index.
//! * [`Cluster::reports`] asks every node for its Raft state ([`RpcKind::Report`]).
//! * Whom a node answers — members only, of its own cluster only, and a joining node only the
//!   cluster it joins — is decided in `access`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, ClientWriteError, Fatal, InitializeError, RaftError};
use openraft::{ChangeMembers, RaftMetrics, ServerState};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout_at};
use tracing::{debug, info, warn};

use crate::config::{self, ClusterConfig, Command, ConfigError, NodeId};

mod access;
mod election;

use crate::store::{ConfigStateMachine, LogReader, LogStore};
use crate::transport::{Dialer, QuicNetwork, RpcError, RpcFailure, RpcKind};
use crate::{Member, Raft, StartError};
pub use access::{JoinToken, Refusal};
pub(crate) use election::{PreVoteRequest, TimeoutNow};

/// How long a forwarded request's answer may take beyond the request's own deadline (the leader
/// answers `NoQuorum` at that deadline; this is the time for the answer to travel).
const ANSWER_MARGIN: Duration = Duration::from_secs(1);
/// One attempt to connect to a peer; a leader that does not answer is retried (it may have been
/// replaced) until the request's deadline.
const CONNECT_ATTEMPT: Duration = Duration::from_secs(1);
/// The pause before retrying when no leader is known or the leader could not be reached, unless
/// the leader changes earlier.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// The longest a forwarded request may ask the leader to work on it.
const MAX_FORWARD_TIMEOUT: Duration = Duration::from_secs(600);
/// How often a leader adding a node looks whether the node refused it.
const REFUSAL_CHECK: Duration = Duration::from_millis(100);

/// The stable Raft id of the node named `name` (the name is the node's identity in its
/// certificate): xxh3-64 of the name's bytes with the top bit cleared, never 0.
pub fn node_id(name: &str) -> NodeId {
    (xxhash_rust::xxh3::xxh3_64(name.as_bytes()) & !(1 << 63)).max(1)
}

/// The deadlines of cluster operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// For a write to be committed (and applied here); `NoQuorum` after it.
    pub write: Duration,
    /// For a node being added to catch up with the log as a learner.
    pub catch_up: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            write: Duration::from_secs(5),
            catch_up: Duration::from_secs(30),
        }
    }
}

/// Why a cluster operation failed. Serializable: it travels back from the leader.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ClusterError {
    #[error("{0}")]
    Rejected(ConfigError),
    #[error(
        "this node is not part of an initialized cluster: run `lbcluster cluster init` on the \
         first node, or `lbcluster node add` on a member"
    )]
    NotInitialized,
    #[error("this node is already part of an initialized cluster")]
    AlreadyInitialized,
    #[error(
        "no leader with a quorum confirmed the request within {waited_ms} ms: are a majority of \
         the voters running and reachable? A write may still be applied if a quorum forms"
    )]
    NoQuorum { waited_ms: u64 },
    #[error("cannot reach the leader {leader}: {reason}")]
    Unreachable { leader: String, reason: String },
    #[error(
        "node {name:?} did not catch up with the log within {waited_ms} ms{}; it stays in the \
         configuration and as a learner (not a voter): check that it runs and is reachable{}, \
         then remove it and add it again",
        DisplayRefused(refused.as_deref()),
        if refused.is_some() { " and holds this cluster's join token" } else { "" }
    )]
    CatchUp {
        name: String,
        waited_ms: u64,
        /// Why the node refused the leader, if it did.
        #[serde(default)]
        refused: Option<String>,
    },
    /// Answered by a node that is not the leader to a forwarded request; the sender retries
    /// with `leader`. Not returned to callers of [`Cluster`].
    #[error("this node is not the leader (the leader is {})", DisplayLeader(*.leader))]
    NotLeader { leader: Option<NodeId> },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("the membership cannot be changed: {0}")]
    Membership(String),
    #[error(
        "no other voter took over the leadership within {waited_ms} ms; this node leads on: are \
         the other voters running and reachable?"
    )]
    StepDown { waited_ms: u64 },
    #[error("internal error: {0}")]
    Internal(String),
    /// A peer refused this node (not a member, or of another cluster): retrying changes
    /// nothing.
    #[error("{reason}")]
    Refused { reason: String },
    #[error(
        "the cluster has no identity yet: its leader gives it one (it was initialized by an \
         earlier version); try again in a moment"
    )]
    NoIdentity,
}

struct DisplayRefused<'a>(Option<&'a str>);

impl fmt::Display for DisplayRefused<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(reason) => write!(f, " (refused: {reason})"),
            None => Ok(()),
        }
    }
}

struct DisplayLeader(Option<NodeId>);

impl fmt::Display for DisplayLeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(id) => write!(f, "node {id}"),
            None => f.write_str("not known"),
        }
    }
}

/// A node's Raft role, as its report gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Leader,
    Follower,
    Candidate,
    /// Replicated to but not voting; also a node not (yet) in any membership.
    Learner,
    Shutdown,
}

/// What one node knows about its Raft state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    pub id: NodeId,
    pub name: String,
    pub addr: SocketAddr,
    /// Whether the node answered; if not, every `Option` below is `None`.
    pub reachable: bool,
    pub role: Option<Role>,
    pub term: Option<u64>,
    /// The last log index the node knows to be committed (`None` before it saw a commit).
    pub committed: Option<u64>,
    /// The last log index the node applied.
    pub applied: Option<u64>,
    /// The [`ClusterConfig::version`] the node applied.
    pub config_version: Option<u64>,
    /// The node the reporting node believes leads.
    pub leader: Option<NodeId>,
    /// Whether the node is a voter in the membership as the node asking knows it.
    pub voter: bool,
    /// Whether the node's session tables are complete (warm), as its [warm probe]
    /// (Cluster::set_warm_probe) says; `None` without one.
    #[serde(default)]
    pub warm: Option<bool>,
    /// Whether the configuration (as the node asking knows it) has the node drained.
    #[serde(default)]
    pub drained: bool,
    /// The node's BGP side, as its [probe](Cluster::set_probes) says; `None` without one.
    #[serde(default)]
    pub bgp: Option<BgpReport>,
}

/// A node's BGP sessions and announcements, for the cluster view.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgpReport {
    pub peers: Vec<BgpPeerReport>,
    /// The VIPs announced now, of how many configured.
    pub vips_announced: Vec<IpAddr>,
    pub vips_configured: u32,
    /// Own LIPs announced as preferred routes.
    pub lips_announced: u32,
    /// The VIPs carry the graceful-shutdown community (the node is draining).
    pub graceful_shutdown: bool,
    /// Why the node could not ask its BGP daemon, if it could not.
    pub error: Option<String>,
}

/// One BGP session of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgpPeerReport {
    pub name: String,
    pub addr: Option<IpAddr>,
    pub remote_as: Option<u32>,
    pub established: bool,
    pub state: String,
    pub since: String,
    pub bfd: Option<bool>,
    pub exported: u32,
}

/// A request carried out by the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Request {
    Write(Command),
    /// Commit `AddNode`, add the node as a learner, wait for it to catch up, make it a voter.
    AddNode(config::Node),
    /// Remove the node from the Raft membership (voters and learners); the `RemoveNode` command
    /// is a separate [`Request::Write`], since the leader may have removed itself.
    RemoveMember(NodeId),
    /// Confirm leadership with a quorum and return the index a linearizable read waits for.
    ReadIndex,
}

/// A request forwarded to the leader.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Forward {
    /// How long the leader may work on it.
    timeout_ms: u64,
    request: Request,
}

/// The leader's answer to a [`Request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Response {
    /// The log index to have applied to see the change, and the configuration version after it.
    Applied {
        index: u64,
        version: u64,
    },
    ReadIndex {
        index: Option<u64>,
    },
}

/// The time allowed for one operation.
#[derive(Debug, Clone, Copy)]
struct Budget {
    start: Instant,
    deadline: Instant,
}

impl Budget {
    fn new(timeout: Duration) -> Budget {
        let start = Instant::now();
        Budget {
            start,
            deadline: start + timeout,
        }
    }

    /// This budget, but ending no later than `timeout` from now.
    fn at_most(self, timeout: Duration) -> Budget {
        Budget {
            deadline: self.deadline.min(Instant::now() + timeout),
            ..self
        }
    }

    fn no_quorum(&self) -> ClusterError {
        ClusterError::NoQuorum {
            waited_ms: self.start.elapsed().as_millis() as u64,
        }
    }
}

/// Why a forward attempt got no answer.
enum Failed {
    /// Nothing was carried out; another attempt is safe.
    Retry(ClusterError),
    /// The request may have been carried out; repeating it could repeat its effect.
    Final(ClusterError),
}

/// The handle of this node's part of the configuration cluster. Cheap to clone.
pub struct Cluster<D> {
    inner: Arc<Inner<D>>,
}

struct Inner<D> {
    id: NodeId,
    me: Member,
    raft: Raft,
    /// The Raft timings (openraft's own elections off: see [`election`]).
    raft_config: Arc<openraft::Config>,
    /// When this node started: a node that restarted has heard from no leader since.
    started: Instant,
    /// When this node last heard from a leader (or voted), as the election timer last saw it.
    heard: parking_lot::Mutex<Instant>,
    transfers: election::Transfers,
    network: QuicNetwork<D>,
    /// The identity of the cluster this node is being added to, while it has not joined one.
    join: JoinToken,
    applied: watch::Receiver<Arc<ClusterConfig>>,
    log: LogReader,
    deadlines: Deadlines,
    /// Set once by the node: what its reports say beyond Raft.
    probes: OnceLock<Probes>,
}

/// What a node's reports say beyond Raft, asked when a report is made.
pub struct Probes {
    /// Whether the node is warm (its session sync has its peers' tables).
    pub warm: Box<dyn Fn() -> bool + Send + Sync>,
    /// Its BGP side, if it has one.
    pub bgp: Box<dyn Fn() -> Option<BgpReport> + Send + Sync>,
}

impl fmt::Debug for Probes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Probes").finish_non_exhaustive()
    }
}

impl<D> Clone for Cluster<D> {
    fn clone(&self) -> Self {
        Cluster {
            inner: self.inner.clone(),
        }
    }
}

impl<D> fmt::Debug for Cluster<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("id", &self.inner.id)
            .field("me", &self.inner.me)
            .field("deadlines", &self.inner.deadlines)
            .finish_non_exhaustive()
    }
}

/// The leader as `metrics` show it; a node that stepped down (it removed itself) still has its
/// own committed vote but no longer leads.
fn known_leader(metrics: &RaftMetrics<NodeId, Member>) -> Option<NodeId> {
    match metrics.current_leader {
        Some(leader) if leader == metrics.id && metrics.state != ServerState::Leader => None,
        leader => leader,
    }
}

fn write_error(e: RaftError<NodeId, ClientWriteError<NodeId, Member>>) -> ClusterError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ClusterError::NotLeader {
            leader: f.leader_id,
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            ClusterError::Membership(e.to_string())
        }
        RaftError::Fatal(e) => fatal(e),
    }
}

fn fatal(e: Fatal<NodeId>) -> ClusterError {
    ClusterError::Internal(format!("raft: {e}"))
}

fn stopped() -> ClusterError {
    ClusterError::Internal("this node's raft has stopped".into())
}

impl<D: Dialer> Cluster<D> {
    /// Opens storage in `dir` and starts the Raft node with id [`node_id`]`(&me.name)` on the QUIC
    /// network built from `dialer`, with the default [`Deadlines`]. Until it has joined a
    /// cluster, the node answers only requests carrying the identity `join` gives (see
    /// `access`).
    ///
    /// Returns the handle and a receiver of every configuration this node applies.
    pub async fn start(
        me: Member,
        raft_config: Arc<openraft::Config>,
        dir: &Path,
        dialer: D,
        join: JoinToken,
    ) -> Result<(Cluster<D>, watch::Receiver<Arc<ClusterConfig>>), StartError> {
        Self::start_with(me, raft_config, dir, dialer, join, Deadlines::default()).await
    }

    /// [`Cluster::start`] with other deadlines.
    pub async fn start_with(
        me: Member,
        raft_config: Arc<openraft::Config>,
        dir: &Path,
        dialer: D,
        join: JoinToken,
        deadlines: Deadlines,
    ) -> Result<(Cluster<D>, watch::Receiver<Arc<ClusterConfig>>), StartError> {
        let id = node_id(&me.name);
        let log = LogStore::open(dir)?;
        let reader = log.reader();
        let state_machine = ConfigStateMachine::open(dir)?;
        let applied = state_machine.subscribe();
        let credentials = access::credentials(applied.clone(), join.clone());
        let network = QuicNetwork::new(id, dialer, credentials);
        // This node campaigns only after a pre-vote (see `election`).
        let raft_config = Arc::new(openraft::Config {
            enable_elect: false,
            ..(*raft_config).clone()
        });
        let raft = Raft::new(id, raft_config.clone(), network.clone(), log, state_machine).await?;
        let inner = Arc::new(Inner {
            id,
            me,
            raft,
            raft_config,
            started: Instant::now(),
            heard: parking_lot::Mutex::new(Instant::now()),
            transfers: election::Transfers::default(),
            network,
            join,
            applied: applied.clone(),
            log: reader,
            deadlines,
            probes: OnceLock::new(),
        });
        tokio::spawn(election::run(Arc::downgrade(&inner)));
        tokio::spawn(access::run(Arc::downgrade(&inner)));
        Ok((Cluster { inner }, applied))
    }

    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The local configuration as applied now (not linearizable).
    pub fn local_config(&self) -> Arc<ClusterConfig> {
        self.inner.applied.borrow().clone()
    }

    /// The leader this node follows: [`known_leader`], unless that is another node this node
    /// has not heard from for the leader lease. Such a leader may be gone; and a node that cannot
    /// reach a majority never campaigns (see [`election`]), so openraft would name it forever.
    fn leader(&self, metrics: &RaftMetrics<NodeId, Member>) -> Option<NodeId> {
        let leader = known_leader(metrics)?;
        let lease = Duration::from_millis(self.inner.raft_config.election_timeout_max);
        (leader == self.id() || Instant::now() <= *self.inner.heard.lock() + lease)
            .then_some(leader)
    }

    fn metrics(&self) -> RaftMetrics<NodeId, Member> {
        self.inner.raft.metrics().borrow().clone()
    }

    async fn ensure_initialized(&self) -> Result<(), ClusterError> {
        match self.inner.raft.is_initialized().await {
            Ok(true) => Ok(()),
            Ok(false) => Err(ClusterError::NotInitialized),
            Err(e) => Err(fatal(e)),
        }
    }

    /// Initializes a new cluster with this node as its only voter, then commits a new random
    /// identity (`SetIdentity`), `AddNode(me_node)` and the `bootstrap` commands; returns the
    /// configuration version after them. Every command is validated before the cluster is
    /// initialized, so a bad bootstrap leaves the node uninitialized.
    pub async fn init(
        &self,
        me_node: config::Node,
        bootstrap: Vec<Command>,
    ) -> Result<u64, ClusterError> {
        let me = &self.inner.me;
        if me_node.id != self.id() || me_node.name != me.name || me_node.quic_addr != me.quic_addr {
            return Err(ClusterError::InvalidRequest(format!(
                "the first node must be this node: id {}, name {:?}, address {} (got id {}, name \
                 {:?}, address {})",
                self.id(),
                me.name,
                me.quic_addr,
                me_node.id,
                me_node.name,
                me_node.quic_addr
            )));
        }
        if self.ensure_initialized().await.is_ok() {
            return Err(ClusterError::AlreadyInitialized);
        }
        let commands = [
            Command::SetIdentity(access::new_identity()?),
            Command::AddNode(me_node),
        ]
        .into_iter()
        .chain(bootstrap)
        .collect::<Vec<_>>();
        let mut scratch = ClusterConfig::default();
        for command in &commands {
            scratch.apply(command).map_err(ClusterError::Rejected)?;
        }
        let members = BTreeMap::from([(self.id(), me.clone())]);
        match self.inner.raft.initialize(members).await {
            Ok(()) => {}
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                return Err(ClusterError::AlreadyInitialized);
            }
            Err(RaftError::APIError(e)) => return Err(ClusterError::Internal(e.to_string())),
            Err(RaftError::Fatal(e)) => return Err(fatal(e)),
        }
        info!(node = %me, "initialized a new cluster");
        let budget = Budget::new(self.inner.deadlines.write);
        let mut metrics = self.inner.raft.metrics();
        timeout_at(
            budget.deadline,
            metrics.wait_for(|m| m.state == ServerState::Leader),
        )
        .await
        .map_err(|_| budget.no_quorum())?
        .map_err(|_| stopped())?;
        let mut version = 0;
        for command in commands {
            version = self.write_command(command).await?;
        }
        Ok(version)
    }

    /// Validates `command` against the local configuration, commits it through the leader and
    /// returns the configuration version after it, once this node has applied it.
    ///
    /// Nodes are added and removed with [`Cluster::add_node`] and [`Cluster::remove_node`], which
    /// also change the Raft membership; `AddNode` and `RemoveNode` are refused here, and so is
    /// `SetIdentity` (the identity comes with the cluster and never changes).
    pub async fn write(&self, command: Command) -> Result<u64, ClusterError> {
        match command {
            Command::AddNode(_) | Command::RemoveNode { .. } => Err(ClusterError::InvalidRequest(
                "nodes are added and removed with `node add` / `node remove`, which also \
                     change the raft membership"
                    .into(),
            )),
            Command::SetIdentity(_) => Err(ClusterError::InvalidRequest(
                "a cluster gets its identity when it is initialized; it never changes".into(),
            )),
            command => self.write_command(command).await,
        }
    }

    async fn write_command(&self, command: Command) -> Result<u64, ClusterError> {
        self.ensure_initialized().await?;
        self.local_config()
            .validate(&command)
            .map_err(ClusterError::Rejected)?;
        let budget = Budget::new(self.inner.deadlines.write);
        let response = self.submit(Request::Write(command), budget).await?;
        self.settle(response, budget).await
    }

    /// Adds `node` in one call: commits `AddNode(node)`, adds it as a learner, waits (at most
    /// [`Deadlines::catch_up`]) until it has caught up, then makes it a voter.
    pub async fn add_node(&self, node: config::Node) -> Result<u64, ClusterError> {
        self.ensure_initialized().await?;
        let expected = node_id(&node.name);
        if node.id != expected {
            return Err(ClusterError::InvalidRequest(format!(
                "node {:?} has id {expected}, not {}",
                node.name, node.id
            )));
        }
        self.local_config()
            .validate(&Command::AddNode(node.clone()))
            .map_err(ClusterError::Rejected)?;
        let deadlines = self.inner.deadlines;
        let budget = Budget::new(deadlines.write * 2 + deadlines.catch_up);
        let response = self.submit(Request::AddNode(node), budget).await?;
        self.settle(response, budget).await
    }

    /// Removes node `id`, the leader included: takes it out of the Raft membership (voters and
    /// learners), then commits `RemoveNode`, through the new leader if the old one removed
    /// itself. Returns the configuration version after it. A node removing itself does not wait
    /// to apply that version (it no longer receives the log).
    pub async fn remove_node(&self, id: NodeId) -> Result<u64, ClusterError> {
        self.ensure_initialized().await?;
        let config = self.local_config();
        let in_config = config.nodes.contains_key(&id);
        let in_membership = self
            .metrics()
            .membership_config
            .membership()
            .get_node(&id)
            .is_some();
        if !in_config && !in_membership {
            return Err(ClusterError::Rejected(ConfigError::UnknownNode { id }));
        }
        let mut version = config.version;
        let wait_here = id != self.id();
        if in_membership {
            let budget = Budget::new(self.inner.deadlines.write);
            let response = self.submit(Request::RemoveMember(id), budget).await?;
            if wait_here {
                self.settle(response, budget).await?;
            }
            info!(node = id, "removed from the raft membership");
        }
        if in_config {
            let budget = Budget::new(self.inner.deadlines.write);
            let response = self
                .submit(Request::Write(Command::RemoveNode { id }), budget)
                .await?;
            version = match response {
                Response::Applied { version, .. } if !wait_here => version,
                response => self.settle(response, budget).await?,
            };
        }
        Ok(version)
    }

    /// A linearizable read: the leader confirms with a quorum the log index that covers every
    /// write acknowledged before the call (ReadIndex), and this node waits until it has applied
    /// it. No leader or no quorum within `timeout`: `NoQuorum`.
    pub async fn read(&self, timeout: Duration) -> Result<Arc<ClusterConfig>, ClusterError> {
        self.ensure_initialized().await?;
        let budget = Budget::new(timeout);
        match self.submit(Request::ReadIndex, budget).await? {
            Response::ReadIndex { index } => {
                self.wait_applied(index, budget).await?;
                Ok(self.local_config())
            }
            other => Err(ClusterError::Internal(format!(
                "unexpected answer to a read index request: {other:?}"
            ))),
        }
    }

    /// This node's report, from its own metrics.
    pub fn local_report(&self) -> NodeReport {
        let metrics = self.metrics();
        let voter = metrics
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == self.id());
        let role = match metrics.state {
            ServerState::Leader => Role::Leader,
            ServerState::Candidate => Role::Candidate,
            ServerState::Follower if voter => Role::Follower,
            ServerState::Follower | ServerState::Learner => Role::Learner,
            ServerState::Shutdown => Role::Shutdown,
        };
        NodeReport {
            id: self.id(),
            name: self.inner.me.name.clone(),
            addr: self.inner.me.quic_addr,
            reachable: true,
            role: Some(role),
            term: Some(metrics.current_term),
            committed: self.inner.log.committed().map(|l| l.index),
            applied: metrics.last_applied.map(|l| l.index),
            config_version: Some(self.local_config().version),
            leader: self.leader(&metrics),
            voter,
            warm: self.inner.probes.get().map(|p| (p.warm)()),
            bgp: self.inner.probes.get().and_then(|p| (p.bgp)()),
            drained: self
                .local_config()
                .nodes
                .get(&self.id())
                .is_some_and(|n| n.drained),
        }
    }

    /// Makes this node's reports say whether it is warm and how its BGP side is; set once
    /// (later calls are ignored).
    pub fn set_probes(&self, probes: Probes) {
        let _ = self.inner.probes.set(probes);
    }

    /// One report per node in the applied configuration and the Raft membership (and this
    /// node), in node-id order. The others are asked in parallel, each for at most `timeout`; a
    /// node that does not answer is listed as unreachable.
    pub async fn reports(&self, timeout: Duration) -> Vec<NodeReport> {
        let config = self.local_config();
        let metrics = self.metrics();
        let membership = metrics.membership_config.membership();
        let voters = membership.voter_ids().collect::<BTreeSet<_>>();
        let mut nodes = config
            .nodes
            .values()
            .map(|n| {
                let member = Member {
                    name: n.name.clone(),
                    quic_addr: n.quic_addr,
                };
                (n.id, member)
            })
            .collect::<BTreeMap<_, _>>();
        for (id, member) in membership.nodes() {
            nodes.entry(*id).or_insert_with(|| member.clone());
        }
        let mut reports = BTreeMap::from([(self.id(), self.local_report())]);
        let mut asked = JoinSet::new();
        for (&id, member) in &nodes {
            if id != self.id() {
                let this = self.clone();
                let member = member.clone();
                asked.spawn(async move { this.remote_report(id, member, timeout).await });
            }
        }
        while let Some(report) = asked.join_next().await {
            if let Ok(report) = report {
                reports.insert(report.id, report);
            }
        }
        for (id, member) in nodes {
            reports
                .entry(id)
                .or_insert_with(|| unreachable_report(id, member));
        }
        reports
            .into_values()
            .map(|report| NodeReport {
                voter: voters.contains(&report.id),
                drained: config.nodes.get(&report.id).is_some_and(|n| n.drained),
                ..report
            })
            .collect()
    }

    /// Asks node `id` at `member` one cluster RPC over the shared connection (dialled if there
    /// is none), giving up at `deadline`.
    async fn ask<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        id: NodeId,
        member: &Member,
        kind: RpcKind,
        request: &Req,
        deadline: Instant,
    ) -> Result<Resp, RpcError> {
        let peer = self.inner.network.connect(id, member, deadline).await?;
        peer.call(kind, request, deadline).await
    }

    async fn remote_report(&self, id: NodeId, member: Member, timeout: Duration) -> NodeReport {
        let deadline = Instant::now() + timeout;
        let answer = self.ask::<_, NodeReport>(id, &member, RpcKind::Report, &(), deadline);
        match answer.await {
            Ok(report) => NodeReport {
                id,
                name: member.name,
                addr: member.quic_addr,
                reachable: true,
                ..report
            },
            Err(e) => {
                debug!(peer = %member, error = %e.reason, "no report");
                unreachable_report(id, member)
            }
        }
    }

    /// Stops this node's Raft and closes its connections to peers.
    pub async fn shutdown(&self) {
        if let Err(e) = self.inner.raft.shutdown().await {
            warn!(error = %e, "raft did not stop cleanly");
        }
        self.inner.network.close_all();
    }

    /// Waits until this node has applied `response`'s index; returns the version in it.
    async fn settle(&self, response: Response, budget: Budget) -> Result<u64, ClusterError> {
        match response {
            Response::Applied { index, version } => {
                self.wait_applied(Some(index), budget).await?;
                Ok(version)
            }
            Response::ReadIndex { .. } => Err(ClusterError::Internal(format!(
                "unexpected answer to a write: {response:?}"
            ))),
        }
    }

    async fn wait_applied(&self, index: Option<u64>, budget: Budget) -> Result<(), ClusterError> {
        let Some(index) = index else {
            return Ok(());
        };
        let mut metrics = self.inner.raft.metrics();
        let state = timeout_at(
            budget.deadline,
            metrics.wait_for(|m| {
                m.last_applied.map(|l| l.index) >= Some(index) || m.state == ServerState::Shutdown
            }),
        )
        .await
        .map_err(|_| budget.no_quorum())?
        .map_err(|_| stopped())?
        .state;
        match state {
            ServerState::Shutdown => Err(stopped()),
            _ => Ok(()),
        }
    }

    /// Waits until the known leader is no longer `old`, or until `until`.
    async fn leader_change(&self, old: Option<NodeId>, until: Instant) {
        let mut metrics = self.inner.raft.metrics();
        let _ = timeout_at(
            until,
            metrics.wait_for(|m| self.leader(m) != old || m.state == ServerState::Shutdown),
        )
        .await;
    }

    /// Has the leader carry out `request`: this node if it leads, else the leader it knows (or,
    /// knowing none, the other voters in turn, which name the leader), retrying with the leader
    /// named in "not leader" answers until the budget's deadline. A refusal ends it at once.
    async fn submit(&self, request: Request, budget: Budget) -> Result<Response, ClusterError> {
        let mut hint = None;
        let mut probe = 0;
        let mut unreachable = None;
        loop {
            let now = Instant::now();
            if now >= budget.deadline {
                return Err(unreachable.unwrap_or_else(|| budget.no_quorum()));
            }
            let pause = (now + RETRY_PAUSE).min(budget.deadline);
            let metrics = self.metrics();
            if metrics.state == ServerState::Shutdown {
                return Err(stopped());
            }
            let known = self.leader(&metrics);
            let (target, probing) = match hint.take().or(known) {
                Some(target) => (target, false),
                None => match self.probe_target(&metrics, &mut probe) {
                    // No leader known (any more): unless one is found, there is no quorum.
                    Some(target) => {
                        unreachable = None;
                        (target, true)
                    }
                    None => {
                        // No leader: an election is under way, or there is no quorum.
                        unreachable = None;
                        self.leader_change(None, pause).await;
                        continue;
                    }
                },
            };
            let outcome = if target == self.id() {
                self.execute(request.clone(), budget).await
            } else {
                match self.forward(target, &metrics, &request, budget).await {
                    Ok(outcome) => outcome,
                    Err(Failed::Retry(e)) => {
                        debug!(leader = target, error = %e, "retrying a forwarded request");
                        // A voter asked in turn that cannot be reached says nothing about the
                        // leader.
                        if !probing {
                            unreachable = Some(e);
                        }
                        self.leader_change(known, pause).await;
                        continue;
                    }
                    Err(Failed::Final(e)) => return Err(e),
                }
            };
            match outcome {
                Err(ClusterError::NotLeader { leader }) => {
                    hint = leader.filter(|&l| l != target);
                    if hint.is_none() {
                        self.leader_change(known, pause).await;
                    }
                }
                outcome => return outcome,
            }
        }
    }

    /// For a node that knows no leader — an election is under way, it removed itself, or it
    /// was removed without learning it — the next other voter to ask, in turn: a member names
    /// the leader; a cluster that removed this node refuses it, which ends the request at once.
    fn probe_target(
        &self,
        metrics: &RaftMetrics<NodeId, Member>,
        probe: &mut usize,
    ) -> Option<NodeId> {
        let others = metrics
            .membership_config
            .membership()
            .voter_ids()
            .filter(|&v| v != self.id())
            .collect::<Vec<_>>();
        let target = others.get(*probe % others.len().max(1)).copied();
        *probe += 1;
        target
    }

    /// Sends `request` to `target` over the shared connection.
    async fn forward(
        &self,
        target: NodeId,
        metrics: &RaftMetrics<NodeId, Member>,
        request: &Request,
        budget: Budget,
    ) -> Result<Result<Response, ClusterError>, Failed> {
        let member = metrics
            .membership_config
            .membership()
            .get_node(&target)
            .cloned()
            .or_else(|| {
                let config = self.local_config();
                let node = config.nodes.get(&target)?;
                Some(Member {
                    name: node.name.clone(),
                    quic_addr: node.quic_addr,
                })
            });
        let Some(member) = member else {
            return Err(Failed::Retry(ClusterError::Unreachable {
                leader: format!("node {target}"),
                reason: "its address is not known here".into(),
            }));
        };
        let unreachable = |e: RpcError| ClusterError::Unreachable {
            leader: member.to_string(),
            reason: e.reason,
        };
        let connect_by = budget.at_most(CONNECT_ATTEMPT).deadline;
        let peer = self
            .inner
            .network
            .connect(target, &member, connect_by)
            .await
            .map_err(|e| match e.failure {
                RpcFailure::Refused => Failed::Final(ClusterError::Refused { reason: e.reason }),
                _ => Failed::Retry(unreachable(e)),
            })?;
        let remaining = budget.deadline.saturating_duration_since(Instant::now());
        let forward = Forward {
            timeout_ms: remaining.as_millis() as u64,
            request: request.clone(),
        };
        peer.call(RpcKind::Forward, &forward, budget.deadline + ANSWER_MARGIN)
            .await
            .map_err(|e| match e.failure {
                RpcFailure::Refused => Failed::Final(ClusterError::Refused { reason: e.reason }),
                // The leader went away (or never got it): the next leader gets it. A command
                // that did get committed before is idempotent or rejected when repeated.
                RpcFailure::NotSent | RpcFailure::ConnectionLost => Failed::Retry(unreachable(e)),
                // A read index request has no effect, so it is always safe to repeat.
                RpcFailure::NoAnswer if matches!(request, Request::ReadIndex) => {
                    Failed::Retry(unreachable(e))
                }
                // The leader may still be working on it: repeating could race with it.
                RpcFailure::NoAnswer => {
                    let reason =
                        format!("{}; the request may or may not have been applied", e.reason);
                    Failed::Final(unreachable(RpcError { reason, ..e }))
                }
            })
    }

    /// Answers a request forwarded by another node: carried out only if this node leads.
    pub(crate) async fn serve_forward(&self, forward: Forward) -> Result<Response, ClusterError> {
        let timeout = Duration::from_millis(forward.timeout_ms).min(MAX_FORWARD_TIMEOUT);
        let metrics = self.metrics();
        if metrics.state != ServerState::Leader {
            return Err(ClusterError::NotLeader {
                leader: self.leader(&metrics),
            });
        }
        self.execute(forward.request, Budget::new(timeout)).await
    }

    /// Carries out `request` on this node, which believes it leads.
    async fn execute(&self, request: Request, budget: Budget) -> Result<Response, ClusterError> {
        match request {
            Request::Write(command) => {
                let (index, version) = self.commit(command, budget).await?;
                Ok(Response::Applied { index, version })
            }
            Request::AddNode(node) => self.lead_add_node(node, budget).await,
            Request::RemoveMember(id) => self.lead_remove_member(id, budget).await,
            Request::ReadIndex => {
                let read = timeout_at(budget.deadline, self.inner.raft.get_read_log_id())
                    .await
                    .map_err(|_| budget.no_quorum())?;
                match read {
                    Ok((index, _)) => Ok(Response::ReadIndex {
                        index: index.map(|l| l.index),
                    }),
                    Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                        Err(ClusterError::NotLeader {
                            leader: f.leader_id,
                        })
                    }
                    Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_))) => {
                        Err(budget.no_quorum())
                    }
                    Err(RaftError::Fatal(e)) => Err(fatal(e)),
                }
            }
        }
    }

    /// Commits `command` (this node leads); returns its log index and the version after it. An
    /// apply-time rejection is `Rejected`.
    async fn commit(&self, command: Command, budget: Budget) -> Result<(u64, u64), ClusterError> {
        let reply = timeout_at(budget.deadline, self.inner.raft.client_write(command))
            .await
            .map_err(|_| budget.no_quorum())?
            .map_err(write_error)?;
        reply.data.result.map_err(ClusterError::Rejected)?;
        Ok((reply.log_id.index, reply.data.version))
    }

    /// Changes the membership (this node leads).
    async fn change_membership(
        &self,
        changes: ChangeMembers<NodeId, Member>,
        budget: Budget,
    ) -> Result<u64, ClusterError> {
        let reply = timeout_at(
            budget.deadline,
            self.inner.raft.change_membership(changes, false),
        )
        .await
        .map_err(|_| budget.no_quorum())?
        .map_err(write_error)?;
        Ok(reply.log_id.index)
    }

    async fn lead_add_node(
        &self,
        node: config::Node,
        budget: Budget,
    ) -> Result<Response, ClusterError> {
        let deadlines = self.inner.deadlines;
        let (id, name) = (node.id, node.name.clone());
        let member = Member {
            name: node.name.clone(),
            quic_addr: node.quic_addr,
        };
        let (_, version) = self
            .commit(Command::AddNode(node), budget.at_most(deadlines.write))
            .await?;
        // A refusal from an earlier attempt is no answer to this one.
        self.inner.network.forget_refusal(id);
        let step = budget.at_most(deadlines.write);
        let learner = timeout_at(
            step.deadline,
            self.inner.raft.add_learner(id, member, false),
        )
        .await
        .map_err(|_| step.no_quorum())?
        .map_err(write_error)?;
        info!(node = %name, "added as a learner; waiting for it to catch up");
        let step = Budget::new(
            deadlines
                .catch_up
                .min(budget.deadline.saturating_duration_since(Instant::now())),
        );
        let mut metrics = self.inner.raft.metrics();
        let mut check = tokio::time::interval(REFUSAL_CHECK);
        let waiting = async {
            loop {
                tokio::select! {
                    caught_up = metrics.wait_for(|m| {
                        let matched = m
                            .replication
                            .as_ref()
                            .and_then(|r| r.get(&id).copied().flatten());
                        m.state != ServerState::Leader
                            || matched.map(|l| l.index) >= Some(learner.log_id.index)
                    }) => return caught_up.map(|m| m.state).map_err(|_| None),
                    _ = check.tick() => {
                        // A node that refuses this cluster does not change its mind.
                        if let Some(reason) = self.inner.network.refusal(id) {
                            return Err(Some(reason));
                        }
                    }
                }
            }
        };
        let catch_up = |refused| ClusterError::CatchUp {
            name: name.clone(),
            waited_ms: step.start.elapsed().as_millis() as u64,
            refused,
        };
        let caught_up = match timeout_at(step.deadline, waiting).await {
            Err(_) => return Err(catch_up(self.inner.network.refusal(id))),
            Ok(Err(None)) => return Err(stopped()),
            Ok(Err(refused)) => return Err(catch_up(refused)),
            Ok(Ok(state)) => state,
        };
        if caught_up != ServerState::Leader {
            return Err(ClusterError::Membership(format!(
                "this node stopped leading while {name:?} was catching up; it stays a learner: \
                 remove it and add it again"
            )));
        }
        let index = self
            .change_membership(
                ChangeMembers::AddVoterIds(BTreeSet::from([id])),
                budget.at_most(deadlines.write),
            )
            .await?;
        info!(node = %name, "now a voter");
        Ok(Response::Applied { index, version })
    }

    async fn lead_remove_member(
        &self,
        id: NodeId,
        budget: Budget,
    ) -> Result<Response, ClusterError> {
        let metrics = self.metrics();
        let membership = metrics.membership_config.membership();
        let changes = if membership.voter_ids().any(|v| v == id) {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else if membership.get_node(&id).is_some() {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        } else {
            // Already gone (a retried request): nothing to wait for.
            return Ok(Response::Applied {
                index: metrics.last_applied.map_or(0, |l| l.index),
                version: self.local_config().version,
            });
        };
        let index = self.change_membership(changes, budget).await?;
        Ok(Response::Applied {
            index,
            version: self.local_config().version,
        })
    }
}

fn unreachable_report(id: NodeId, member: Member) -> NodeReport {
    NodeReport {
        id,
        name: member.name,
        addr: member.quic_addr,
        reachable: false,
        role: None,
        term: None,
        committed: None,
        applied: None,
        config_version: None,
        leader: None,
        voter: false,
        warm: None,
        drained: false,
        bgp: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_node_id_is_stable_nonzero_and_below_the_top_bit() {
        for name in ["", "n1", "lb-a.example.net"] {
            let id = node_id(name);
            assert_ne!(id, 0);
            assert_eq!(id >> 63, 0);
            assert_eq!(id, node_id(name));
        }
        assert_ne!(node_id("n1"), node_id("n2"));
    }

    #[test]
    fn test_errors_cross_the_wire_unchanged() {
        let errors = [
            ClusterError::Rejected(ConfigError::UnknownNode { id: 3 }),
            ClusterError::NoQuorum { waited_ms: 5000 },
            ClusterError::NotLeader { leader: Some(7) },
            ClusterError::CatchUp {
                name: "n4".into(),
                waited_ms: 30000,
                refused: Some("n4 refuses".into()),
            },
            ClusterError::Refused {
                reason: "n1 refuses node n4".into(),
            },
        ];
        for e in errors {
            let bytes = rmp_serde::to_vec_named(&Err::<Response, _>(e.clone())).unwrap();
            let back: Result<Response, ClusterError> = rmp_serde::from_slice(&bytes).unwrap();
            assert_eq!(back, Err(e));
        }
        assert_eq!(
            ClusterError::Rejected(ConfigError::UnknownNode { id: 3 }).to_string(),
            "no node with id 3"
        );
    }
}

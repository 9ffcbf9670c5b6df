//! The admin API's types: the daemon serialises them, the CLI deserialises the very same structs
//! and renders them, and `-o json` prints them as they came.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use dataplane::sched::SchedulerKind;
use dataplane::service::Traffic;

pub(crate) use crate::packet_io::WorkerIoStats;
use dataplane::{L4Proto, SessionRecord};
use serde::{Deserialize, Serialize};

/// `GET /v1/status[?local=true]`.
pub(crate) const STATUS_PATH: &str = "/v1/status";
/// `GET /v1/sessions[?vip=ADDR:PORT]`.
pub(crate) const SESSIONS_PATH: &str = "/v1/sessions";
/// `POST`: start a new cluster with this node as its only member and the node file's services.
pub(crate) const CLUSTER_INIT_PATH: &str = "/v1/cluster/init";
/// `GET`: the cluster's join token ([`JoinTokenAnswer`]), read linearizably.
pub(crate) const JOIN_TOKEN_PATH: &str = "/v1/cluster/join-token";
/// `POST`: hand this node's Raft leadership to another voter ([`SteppedDown`]).
pub(crate) const STEP_DOWN_PATH: &str = "/v1/cluster/step-down";
/// `POST` a [`consensus::Command`]: commit a change to the cluster configuration.
pub(crate) const COMMANDS_PATH: &str = "/v1/commands";
/// `POST` a [`NodeSpec`] (add a node); `DELETE /v1/nodes/NAME` (remove one).
pub(crate) const NODES_PATH: &str = "/v1/nodes";
/// `GET`: the cluster configuration, read linearizably.
pub(crate) const CONFIG_PATH: &str = "/v1/config";

/// The answer to a change that was committed: the configuration version it made, which is
/// applied on this node's data plane when the answer comes.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Written {
    pub(crate) version: u64,
}

/// The answer of [`STEP_DOWN_PATH`].
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SteppedDown {
    /// Whether this node led and handed the leadership over.
    pub(crate) moved: bool,
    /// The leader now, by name (`None` if not known).
    pub(crate) leader: Option<String>,
}

/// The answer of [`JOIN_TOKEN_PATH`].
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct JoinTokenAnswer {
    /// What a joining node's `[cluster] join_token_file` must hold: the cluster's id and
    /// secret.
    pub(crate) token: String,
}

/// The body of every error answer.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ApiError {
    pub(crate) error: String,
}

/// A node to add to the cluster.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct NodeSpec {
    pub(crate) name: String,
    /// Its QUIC endpoint.
    pub(crate) addr: SocketAddr,
    /// The local addresses (LIPs) it owns.
    pub(crate) lips: Vec<IpAddr>,
}

/// The cluster as this node sees it.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ClusterStatus {
    /// A linearizable read succeeded: a leader is confirmed by a quorum.
    pub(crate) quorum: bool,
    /// Why the read failed, when it did.
    pub(crate) read_error: Option<String>,
    /// The configuration version the read returned (or, without quorum, this node's).
    pub(crate) config_version: u64,
    /// The cluster's id (its identity's public half), once this node has applied it.
    #[serde(default)]
    pub(crate) cluster_id: Option<String>,
    pub(crate) leader: Option<String>,
    /// One row per node of the configuration and of the Raft membership; none is omitted.
    pub(crate) nodes: Vec<consensus::NodeReport>,
    /// This node's QUIC endpoint: peers accepted and refused.
    pub(crate) quic: crate::quic::CounterValues,
    /// Raft RPCs this node answered, and the malformed, oversized and abandoned ones.
    pub(crate) raft_rpcs: consensus::transport::ServeCounterValues,
}

impl ClusterStatus {
    pub(crate) fn nodes_down(&self) -> usize {
        self.nodes.iter().filter(|n| !n.reachable).count()
    }
}

/// A transport protocol as the API and the config file spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Proto {
    Tcp,
    Udp,
}

impl From<L4Proto> for Proto {
    fn from(p: L4Proto) -> Self {
        match p {
            L4Proto::Tcp => Proto::Tcp,
            L4Proto::Udp => Proto::Udp,
        }
    }
}

impl From<Proto> for L4Proto {
    fn from(p: Proto) -> Self {
        match p {
            Proto::Tcp => L4Proto::Tcp,
            Proto::Udp => L4Proto::Udp,
        }
    }
}

impl fmt::Display for Proto {
    /// Upper case, as `ipvsadm` lists it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        })
    }
}

/// The node as it is now.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct NodeStatus {
    pub(crate) node: String,
    /// Version of the service set the data plane runs.
    pub(crate) config_version: u64,
    pub(crate) uptime_secs: u64,
    pub(crate) services: Vec<ServiceStatus>,
    pub(crate) sessions: SessionCounts,
    /// Every drop reason the engine knows, zero or not.
    pub(crate) drops: Vec<NamedCount>,
    /// Every engine event counter, zero or not.
    pub(crate) events: Vec<NamedCount>,
    /// Local port usage per LIP and protocol.
    pub(crate) local_addrs: Vec<LipPorts>,
    /// Packet I/O per worker (empty before the data plane runs).
    #[serde(default)]
    pub(crate) io: Vec<WorkerIoStats>,
    /// Which path established flows take (`None` before the data plane runs).
    #[serde(default)]
    pub(crate) fastpath: Option<crate::packet_io::FastPathStatus>,
    /// The cluster, for a node that is a member of one.
    #[serde(default)]
    pub(crate) cluster: Option<ClusterStatus>,
    /// Session sync, for a cluster member.
    #[serde(default)]
    pub(crate) sync: Option<SyncStatus>,
    /// BGP, for a node with `[bgp]`.
    #[serde(default)]
    pub(crate) bgp: Option<consensus::BgpReport>,
}

/// Session sync on this node.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SyncStatus {
    /// Every current peer's table has arrived since it connected (a node starts cold).
    pub(crate) warm: bool,
    /// This run's epoch (peers reject what an earlier run sent).
    pub(crate) epoch: u64,
    /// Peers' updates installed in the engine, removed from it, and refused (by the engine,
    /// or for not coming from the flow's owner).
    pub(crate) installed: u64,
    pub(crate) removed: u64,
    pub(crate) refused: u64,
    /// Refusals by reason.
    #[serde(default)]
    pub(crate) refused_by: std::collections::BTreeMap<String, u64>,
    /// Copies dropped because their owner's complete table no longer had them (removals that
    /// were lost on the way).
    #[serde(default)]
    pub(crate) reconciled: u64,
    pub(crate) peers: Vec<SyncPeer>,
}

/// Session sync with one peer.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SyncPeer {
    pub(crate) peer: String,
    pub(crate) connected: bool,
    /// The peer's table has arrived whole since it connected.
    pub(crate) bulk_complete: bool,
    /// Session updates sent to and received from the peer.
    pub(crate) sent: u64,
    pub(crate) received: u64,
    /// Updates and frames dropped, every reason together.
    pub(crate) dropped: u64,
    /// Updates waiting to be sent.
    pub(crate) queue_depth: u64,
    /// Times the peer's queue overflowed and it was sent the whole table again.
    pub(crate) resyncs: u64,
    /// From an event on its owner to its update applied here: the last one, and the largest.
    pub(crate) lag_last_us: u64,
    pub(crate) lag_max_us: u64,
}

/// How `lbcluster status` judges the cluster (its exit code), and how the status page marks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Health {
    Healthy,
    /// A node unreachable, a backend down, or a session table or port pool exhausted.
    Degraded,
    /// The cluster has no quorum.
    Critical,
}

impl NodeStatus {
    /// The one judgement `status` exits with and the status page shows.
    pub(crate) fn health(&self) -> Health {
        match &self.cluster {
            Some(c) if !c.quorum => Health::Critical,
            Some(c) if c.nodes_down() > 0 => Health::Degraded,
            _ if self.backends_down() > 0 || !self.exhausted().is_empty() => Health::Degraded,
            _ => Health::Healthy,
        }
    }

    /// Backends that fail their health checks.
    pub(crate) fn backends_down(&self) -> usize {
        self.services
            .iter()
            .flat_map(|s| &s.backends)
            .filter(|b| !b.healthy)
            .count()
    }

    pub(crate) fn total_drops(&self) -> u64 {
        self.drops.iter().map(|d| d.count).sum()
    }

    /// What has run out, one line each: a session table at its maximum, a LIP's ports of a
    /// protocol all in use. New flows then live only by evicting flows that never completed
    /// their handshake; `status` is degraded while any of this lasts.
    pub(crate) fn exhausted(&self) -> Vec<String> {
        let f = &self.sessions.by_family;
        let mut out: Vec<String> = [("IPv4", f.v4, f.v4_capacity), ("IPv6", f.v6, f.v6_capacity)]
            .into_iter()
            .filter(|&(_, n, cap)| cap > 0 && n >= cap)
            .map(|(family, n, cap)| format!("{family} session table full ({n} of {cap})"))
            .collect();
        out.extend(
            self.local_addrs
                .iter()
                .filter(|l| l.capacity > 0 && l.in_use >= l.capacity)
                .map(|l| {
                    format!(
                        "LIP {} {} ports exhausted ({} of {})",
                        l.ip, l.proto, l.in_use, l.capacity
                    )
                }),
        );
        out
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ServiceStatus {
    pub(crate) vip: SocketAddr,
    pub(crate) proto: Proto,
    pub(crate) scheduler: SchedulerKind,
    /// `none`, `tcp` or `http`.
    pub(crate) health_check: String,
    pub(crate) backends: Vec<BackendStatus>,
    /// Packets and bytes of the whole service (its backends' sum).
    pub(crate) traffic: Traffic,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct BackendStatus {
    pub(crate) addr: SocketAddr,
    /// The configured weight; a backend that is down takes no new flows whatever its weight.
    pub(crate) weight: u32,
    pub(crate) healthy: bool,
    /// Established connections.
    pub(crate) active: u32,
    /// Connections in every other state.
    pub(crate) inactive: u32,
    /// Connections ever scheduled to this backend by this node, or installed from a peer.
    pub(crate) total: u64,
    /// Packets and bytes forwarded for this backend, each way.
    pub(crate) traffic: Traffic,
}

/// Sessions of both families together, and per family.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SessionCounts {
    pub(crate) count: usize,
    pub(crate) capacity: usize,
    pub(crate) by_family: dataplane::SessionCounts,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct NamedCount {
    pub(crate) name: String,
    pub(crate) count: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct LipPorts {
    pub(crate) ip: IpAddr,
    pub(crate) proto: Proto,
    pub(crate) in_use: u32,
    pub(crate) capacity: u32,
}

/// The query of `GET /v1/status`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct StatusQuery {
    /// Only this node's own view of the cluster (no linearizable read, no peer reports).
    #[serde(default)]
    pub(crate) local: bool,
}

/// The query of `GET /v1/sessions`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SessionQuery {
    /// Only the sessions of this VIP and port.
    pub(crate) vip: Option<SocketAddr>,
}

/// `GET /v1/sessions`: the session table, or the part of it for one VIP.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SessionList {
    pub(crate) sessions: Vec<SessionEntry>,
}

/// One session, as `ipvsadm -Lnc` lists it, with the local address (LIP) it uses.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SessionEntry {
    pub(crate) proto: Proto,
    pub(crate) expires_in_secs: u32,
    /// The state's name as `ipvsadm` prints it (`ESTABLISHED`, `UDP`, …).
    pub(crate) state: String,
    pub(crate) client: SocketAddr,
    pub(crate) vip: SocketAddr,
    pub(crate) local: SocketAddr,
    pub(crate) backend: SocketAddr,
    /// Installed from a peer rather than created by this node's traffic.
    pub(crate) synced: bool,
}

impl From<&SessionRecord> for SessionEntry {
    fn from(s: &SessionRecord) -> Self {
        SessionEntry {
            proto: s.proto.into(),
            expires_in_secs: s.expires_in_secs,
            state: s.state.name().to_owned(),
            client: s.client,
            vip: s.vip,
            local: s.local,
            backend: s.backend,
            synced: s.synced,
        }
    }
}

/// The name `ipvsadm` uses for a scheduler (`mh` for Maglev).
pub(crate) fn scheduler_name(kind: SchedulerKind) -> &'static str {
    match kind {
        SchedulerKind::Maglev => "mh",
        SchedulerKind::Wrr => "wrr",
        SchedulerKind::Wlc => "wlc",
        SchedulerKind::Rr => "rr",
        SchedulerKind::Sh => "sh",
    }
}

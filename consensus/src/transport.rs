//! Raft RPCs over QUIC (DESIGN §4): the client side is a [`RaftNetworkFactory`] whose per-peer
//! clients dial through a caller-provided [`Dialer`]; the server side is [`serve_connection`].
//! The same connections carry the [`Cluster`]'s own RPCs: a request forwarded to the leader
//! ([`RpcKind::Forward`]) and a node's status ([`RpcKind::Report`]).
//!
//! The node owns the QUIC endpoint and its mutual TLS (ALPN [`ALPN`], `lbc-raft/2`); this module
//! only sees `quinn::Connection`s that already passed the node's handshake checks.
//!
//! # Wire format
//! Every RPC has its own bidirectional stream:
//! * request: `kind: u8` ([`RpcKind`]), the sender's cluster identity (32 bytes:
//!   [`ClusterIdentity::to_bytes`], or zeros from a node that knows none), `len: u32`
//!   big-endian, then `len` bytes of MessagePack (`rmp_serde`, named fields) of the openraft
//!   request;
//! * response: `len: u32` big-endian, then the MessagePack of
//!   `Result<openraft response, RaftError>` as the remote `Raft` returned it; for `Forward`,
//!   `Result<Response, ClusterError>`; for `Report` (whose request is MessagePack `nil`), a
//!   [`NodeReport`](crate::NodeReport).
//!
//! A length is checked against its cap ([`RpcKind::request_cap`] for requests,
//! [`MAX_RPC_FRAME`] for responses) before any buffer is allocated.
//!
//! Pre-votes ([`RpcKind::PreVote`]) and hand-overs ([`RpcKind::TimeoutNow`]) decide elections
//! beside openraft (see `cluster::election`).
//!
//! # Who is answered
//! [`serve_connection`] is given the peer's node name as its certificate says it. Every request
//! is authorised when it is served (`cluster::access`): its cluster identity must be this
//! node's cluster's (or, on a node not yet joined, its join token's), its sender a current
//! member, and a sender named inside the request (a vote's candidate, a hand-over's leader)
//! the peer itself. A refused request closes the whole connection with one of the
//! [refusal codes](is_refusal) and a reason; a connection whose peer stops being a member is
//! closed the same way once the answers in flight are delivered. A client that sees its
//! connection closed so reports the refusal (`ClusterError::Refused`) instead of retrying.
//!
//! # Dialling
//! One connection per peer, dialled by one task that every RPC in the meantime waits on (each
//! until its own deadline). A dial has its own bound, [`DIAL_ATTEMPT`]: QUIC resends a handshake
//! that found the peer down only after about 1, 3, 7 and 15 s, so a dial started while a peer was
//! dead would otherwise keep every RPC to it waiting long after the peer is back. A dial that
//! failed or was abandoned makes the next one wait [`DIAL_BACKOFF`], doubling per failure up to
//! [`MAX_DIAL_BACKOFF`]; RPCs in that pause fail at once as `Unreachable`.
//!
//! # Errors, as openraft sees them
//! * cannot dial, the dial did not finish before the RPC's deadline, a dial is backing off, or
//!   the stream failed: `Unreachable`, so openraft backs off before it retries;
//! * the connection is up but no answer came before the deadline (`RPCOption::soft_ttl`):
//!   `Timeout`. After three timeouts in a row the cached connection is
//!   dropped, so a peer that restarted (and lost the old connection's state) is dialled afresh
//!   instead of waiting for QUIC's idle timeout;
//! * too many log entries for one frame: `PayloadTooLarge`, so openraft sends fewer;
//! * the remote `Raft` refused: `RemoteError` carrying its error;
//! * the peer refused this node (see above): `Unreachable`, the refusal remembered for the
//!   operator ([`QuicNetwork::refusal`]).

use std::collections::HashMap;
use std::error::Error;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, PayloadTooLarge, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use parking_lot::Mutex;
use quinn::{
    ClosedStream, Connection, ConnectionError, ReadError, ReadExactError, VarInt, WriteError,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{Instrument, debug, debug_span, info, warn};

use crate::cluster::{Cluster, Forward, PreVoteRequest, Refusal, TimeoutNow};
use crate::config::{ClusterIdentity, IDENTITY_BYTES};
use crate::{Member, NodeId, TypeConfig};

/// The ALPN of Raft RPCs on the node's QUIC endpoint (2: requests carry the cluster identity).
pub const ALPN: &[u8] = b"lbc-raft/2";
/// The cap of a request carrying a snapshot chunk (openraft's default chunk is 3 MiB).
pub const MAX_SNAPSHOT_FRAME: u32 = 64 << 20;
/// The cap of every other Raft request and of every response.
pub const MAX_RPC_FRAME: u32 = 16 << 20;
/// The cap of a request forwarded to the leader: one command.
pub const MAX_FORWARD_FRAME: u32 = 1 << 20;
/// The cap of a report request (it carries nothing).
pub const MAX_REPORT_FRAME: u32 = 16;
/// The cap of a pre-vote request and of a hand-over announcement.
pub const MAX_ELECTION_FRAME: u32 = 1 << 10;
/// This many timeouts in a row on one connection make the client dial a new one.
const REDIAL_AFTER_TIMEOUTS: u32 = 3;
/// A dial that has not finished within this is abandoned (see the module doc).
pub const DIAL_ATTEMPT: Duration = Duration::from_secs(1);
/// The pause after a failed dial before the next, doubled per failure in a row ...
pub const DIAL_BACKOFF: Duration = Duration::from_millis(100);
/// ... up to this.
pub const MAX_DIAL_BACKOFF: Duration = Duration::from_millis(500);

/// Stream reset / stop code: the request frame is malformed.
const STREAM_MALFORMED: VarInt = VarInt::from_u32(1);
/// Stream reset / stop code: the frame is over its length cap.
const STREAM_TOO_LARGE: VarInt = VarInt::from_u32(2);
/// Stream reset / stop code: the request ended early, or the stream failed.
const STREAM_INCOMPLETE: VarInt = VarInt::from_u32(3);
/// Connection close code: the peer stopped answering, a new connection replaces this one.
const CLOSE_UNRESPONSIVE: VarInt = VarInt::from_u32(0x200);
/// Connection close code: this node stopped.
const CLOSE_SHUTDOWN: VarInt = VarInt::from_u32(0x201);
/// Connection close code, a refusal: the peer's node name is not a current member (at the
/// handshake, at a request, or since a membership change removed it).
pub const CLOSE_NOT_MEMBER: VarInt = VarInt::from_u32(0x100);
/// Connection close code, a refusal: the request carried another cluster's identity, or none,
/// or came to a node that has not joined a cluster and has no join token.
pub const CLOSE_WRONG_CLUSTER: VarInt = VarInt::from_u32(0x103);
/// Connection close code, a refusal: the request names another node as its sender.
pub const CLOSE_IMPERSONATION: VarInt = VarInt::from_u32(0x104);
/// How long a connection whose peer stopped being a member still delivers the answers in
/// flight (a node that removed itself waits for the answer to its own removal).
const REVOKE_GRACE: Duration = Duration::from_millis(500);

/// Whether `code` closes a connection because its peer was refused.
pub fn is_refusal(code: VarInt) -> bool {
    [CLOSE_NOT_MEMBER, CLOSE_WRONG_CLUSTER, CLOSE_IMPERSONATION].contains(&code)
}

/// The reason `connection` was refused with, once the peer closed it so.
fn refusal(connection: &Connection) -> Option<String> {
    refusal_of(&connection.close_reason()?)
}

fn refusal_of(e: &ConnectionError) -> Option<String> {
    match e {
        ConnectionError::ApplicationClosed(close) if is_refusal(close.error_code) => {
            Some(String::from_utf8_lossy(&close.reason).into_owned())
        }
        _ => None,
    }
}

/// The refusal somewhere in `e`'s chain of causes: a dial whose handshake the peer refused
/// before it completed on this side.
fn refusal_in(mut e: &(dyn Error + 'static)) -> Option<String> {
    loop {
        if let Some(closed) = e.downcast_ref::<ConnectionError>() {
            return refusal_of(closed);
        }
        e = e.source()?;
    }
}

/// The first byte of a request stream: which RPC it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RpcKind {
    AppendEntries = 1,
    Vote = 2,
    InstallSnapshot = 3,
    /// A cluster request for the leader to carry out (see [`Cluster`]).
    Forward = 4,
    /// What the node knows about its Raft state (see [`Cluster::reports`]).
    Report = 5,
    /// Would the peer vote for the sender? Changes nothing (see `cluster::election`).
    PreVote = 6,
    /// The leader hands its leadership over (see [`Cluster::step_down`]).
    TimeoutNow = 7,
}

impl RpcKind {
    fn from_u8(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Self::AppendEntries),
            2 => Some(Self::Vote),
            3 => Some(Self::InstallSnapshot),
            4 => Some(Self::Forward),
            5 => Some(Self::Report),
            6 => Some(Self::PreVote),
            7 => Some(Self::TimeoutNow),
            _ => None,
        }
    }

    /// The length cap of this RPC's request frame.
    pub fn request_cap(self) -> u32 {
        match self {
            Self::InstallSnapshot => MAX_SNAPSHOT_FRAME,
            Self::AppendEntries | Self::Vote => MAX_RPC_FRAME,
            Self::Forward => MAX_FORWARD_FRAME,
            Self::Report => MAX_REPORT_FRAME,
            Self::PreVote | Self::TimeoutNow => MAX_ELECTION_FRAME,
        }
    }
}

impl fmt::Display for RpcKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::AppendEntries => "AppendEntries",
            Self::Vote => "Vote",
            Self::InstallSnapshot => "InstallSnapshot",
            Self::Forward => "Forward",
            Self::Report => "Report",
            Self::PreVote => "PreVote",
            Self::TimeoutNow => "TimeoutNow",
        })
    }
}

/// Idle connections send a keep-alive this often ...
const KEEP_ALIVE: Duration = Duration::from_millis(200);
/// ... and a connection that hears nothing for this many milliseconds is closed: a peer that is
/// cut off or dead shows as disconnected within about a second, wherever a connection is looked
/// at.
const IDLE_TIMEOUT_MS: u32 = 1000;
/// The round-trip time assumed before one is measured. It sets how soon a lost handshake packet
/// is sent again (about three times this): quinn's 333 ms default resends only after a second,
/// longer than a [`DIAL_ATTEMPT`] to a peer that has just come back should take.
const INITIAL_RTT: Duration = Duration::from_millis(100);

/// The QUIC transport settings the cluster's liveness rests on (see the constants above): the
/// node's endpoint uses them for every connection, Raft and session sync alike.
pub fn quic_transport() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    transport.max_idle_timeout(Some(VarInt::from_u32(IDLE_TIMEOUT_MS).into()));
    transport.initial_rtt(INITIAL_RTT);
    transport
}

/// The cluster identity this node's requests carry, asked at each request; `None` (sent as
/// zeros) from a node that knows none.
pub type Credentials = Arc<dyn Fn() -> Option<ClusterIdentity> + Send + Sync>;

/// Opens QUIC connections to Raft peers. The node implements it with its endpoint and
/// [`ALPN`]; the connection it returns must be to the node named `peer_name` (the node's
/// mutual TLS checks that).
pub trait Dialer: Send + Sync + 'static {
    type Error: Into<Box<dyn Error + Send + Sync>>;

    fn connect(
        &self,
        addr: SocketAddr,
        peer_name: &str,
    ) -> impl Future<Output = Result<Connection, Self::Error>> + Send;
}

/// The client side: a [`RaftNetworkFactory`] that keeps one QUIC connection per peer, shared by
/// every client openraft creates for that peer (replication, snapshots, each election).
pub struct QuicNetwork<D> {
    id: NodeId,
    dialer: Arc<D>,
    credentials: Credentials,
    links: Arc<Mutex<HashMap<NodeId, Arc<Link>>>>,
}

impl<D> QuicNetwork<D> {
    /// The network of node `id`, dialling with `dialer`, its requests carrying `credentials`.
    pub fn new(id: NodeId, dialer: D, credentials: Credentials) -> Self {
        Self {
            id,
            dialer: Arc::new(dialer),
            credentials,
            links: Arc::default(),
        }
    }
}

impl<D> Clone for QuicNetwork<D> {
    fn clone(&self) -> Self {
        Self {
            id: self.id,
            dialer: self.dialer.clone(),
            credentials: self.credentials.clone(),
            links: self.links.clone(),
        }
    }
}

impl<D> fmt::Debug for QuicNetwork<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicNetwork")
            .field("id", &self.id)
            .field("peers", &self.links.lock().keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl<D: Dialer> QuicNetwork<D> {
    /// The shared connection to peer `target` at `node`.
    fn link(&self, target: NodeId, node: &Member) -> Arc<Link> {
        let mut links = self.links.lock();
        match links.get(&target) {
            Some(link) if link.member == *node => link.clone(),
            // A new peer, or one whose name or address changed: the old connection goes when
            // its last client does.
            _ => {
                let link = Arc::new(Link::new(node.clone()));
                links.insert(target, link.clone());
                link
            }
        }
    }

    /// The connection to `target`, dialled (once, shared with the Raft clients) if there is
    /// none. Gives up at `deadline`.
    pub(crate) async fn connect(
        &self,
        target: NodeId,
        node: &Member,
        deadline: Instant,
    ) -> Result<PeerConnection, RpcError> {
        let link = self.link(target, node);
        let connection = link
            .connect_by(&self.dialer, deadline)
            .await
            .map_err(|e| match e {
                TransportError::Refused { reason, .. } => RpcError {
                    failure: RpcFailure::Refused,
                    reason,
                },
                e => RpcError {
                    failure: RpcFailure::NotSent,
                    reason: e.to_string(),
                },
            })?;
        Ok(PeerConnection {
            link,
            connection,
            credentials: self.credentials.clone(),
        })
    }

    /// Closes every cached connection, for a node that stops.
    pub(crate) fn close_all(&self) {
        for link in self.links.lock().drain().map(|(_, link)| link) {
            link.close(CLOSE_SHUTDOWN, b"node stopped");
        }
    }

    /// Closes and forgets the connections to peers `keep` says no (those no longer members).
    pub(crate) fn retain(&self, mut keep: impl FnMut(&Member) -> bool) {
        self.links.lock().retain(|_, link| {
            let kept = keep(&link.member);
            if !kept {
                info!(peer = %link.member, "closing the raft connection to a node no longer a member");
                link.close(CLOSE_NOT_MEMBER, b"no longer a member of this cluster");
            }
            kept
        });
    }

    /// Forgets that peer `target` refused this node.
    pub(crate) fn forget_refusal(&self, target: NodeId) {
        if let Some(link) = self.links.lock().get(&target) {
            *link.refused.lock() = None;
        }
    }

    /// Why peer `target` last refused this node, if its latest answer was a refusal.
    pub fn refusal(&self, target: NodeId) -> Option<String> {
        self.links
            .lock()
            .get(&target)
            .and_then(|link| link.refused.lock().clone())
    }
}

/// An open connection to a peer, for one cluster RPC.
pub(crate) struct PeerConnection {
    link: Arc<Link>,
    connection: Connection,
    credentials: Credentials,
}

/// Why a cluster RPC got no answer.
#[derive(Debug)]
pub(crate) struct RpcError {
    pub(crate) failure: RpcFailure,
    pub(crate) reason: String,
}

/// How far a failed cluster RPC got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RpcFailure {
    /// The request never left: no connection, or no stream.
    NotSent,
    /// The connection went away after the request was sent: the peer stopped or restarted.
    ConnectionLost,
    /// The peer is there but did not answer in time, or answered with something unreadable.
    NoAnswer,
    /// The peer refused this node (see the module doc); the request was not carried out.
    Refused,
}

impl PeerConnection {
    /// Sends one request of `kind` and decodes the answer, giving up at `deadline`.
    pub(crate) async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        kind: RpcKind,
        request: &Req,
        deadline: Instant,
    ) -> Result<Resp, RpcError> {
        let frame = encode_request(kind, (self.credentials)(), request).map_err(|e| RpcError {
            failure: RpcFailure::NotSent,
            reason: e.to_string(),
        })?;
        self.link
            .exchange(&self.connection, kind, &frame, deadline)
            .await
            .map_err(|e| {
                let failure = match &e {
                    CallError::Refused { .. } => RpcFailure::Refused,
                    CallError::Unreachable(TransportError::Frame {
                        source: FrameError::Stream(stream),
                        ..
                    }) => match stream {
                        StreamError::Open(_) => RpcFailure::NotSent,
                        StreamError::Write(WriteError::ConnectionLost(_))
                        | StreamError::Finish(_)
                        | StreamError::Read(ReadExactError::ReadError(
                            ReadError::ConnectionLost(_),
                        )) => RpcFailure::ConnectionLost,
                        _ => RpcFailure::NoAnswer,
                    },
                    CallError::TooLarge(_) => RpcFailure::NotSent,
                    _ => RpcFailure::NoAnswer,
                };
                let reason = match e {
                    CallError::Unreachable(e) | CallError::TooLarge(e) => e.to_string(),
                    CallError::Timeout(ttl) => format!("no answer within {ttl:?}"),
                    CallError::Refused { reason, .. } => reason,
                };
                RpcError { failure, reason }
            })
    }
}

impl<D: Dialer> RaftNetworkFactory<TypeConfig> for QuicNetwork<D> {
    type Network = QuicPeer<D>;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> QuicPeer<D> {
        QuicPeer {
            id: self.id,
            target,
            link: self.link(target, node),
            dialer: self.dialer.clone(),
            credentials: self.credentials.clone(),
        }
    }
}

/// The connection to one peer, shared by all its clients.
#[derive(Debug)]
struct Link {
    member: Member,
    state: Mutex<LinkState>,
    /// Timeouts in a row on the current connection.
    timeouts: AtomicU32,
    /// Why the peer refused this node, if its latest answer was a refusal.
    refused: Mutex<Option<String>>,
}

type DialOutcome = Option<Result<Connection, Arc<dyn Error + Send + Sync>>>;

#[derive(Debug)]
enum LinkState {
    /// No connection; after `failures` failed dials in a row the next waits until `retry_at`.
    Idle {
        failures: u32,
        retry_at: Option<Instant>,
    },
    /// A dial runs in its own task, so an RPC that gives up waiting does not cancel it; every
    /// RPC in the meantime waits for the same dial. `failures` as in `Idle`.
    Dialing {
        outcome: watch::Receiver<DialOutcome>,
        failures: u32,
    },
    Up(Connection),
}

impl LinkState {
    const FRESH: LinkState = LinkState::Idle {
        failures: 0,
        retry_at: None,
    };
}

/// The pause after `failures` failed dials in a row.
fn dial_backoff(failures: u32) -> Duration {
    DIAL_BACKOFF
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(MAX_DIAL_BACKOFF)
}

impl Link {
    fn new(member: Member) -> Self {
        Self {
            member,
            state: Mutex::new(LinkState::FRESH),
            timeouts: AtomicU32::new(0),
            refused: Mutex::new(None),
        }
    }

    /// Closes the current connection, if there is one.
    fn close(&self, code: VarInt, reason: &[u8]) {
        if let LinkState::Up(c) = &*self.state.lock() {
            c.close(code, reason);
        }
    }

    /// The cached connection if it is open, else the outcome of a (new or running) dial.
    async fn connection<D: Dialer>(
        self: &Arc<Self>,
        dialer: &Arc<D>,
    ) -> Result<Connection, TransportError> {
        let mut dial = 'dial: {
            let mut state = self.state.lock();
            let failures = match &*state {
                LinkState::Up(c) if c.close_reason().is_none() => return Ok(c.clone()),
                LinkState::Up(_) => 0,
                LinkState::Dialing { outcome, .. } => break 'dial outcome.clone(),
                LinkState::Idle {
                    retry_at: Some(at), ..
                } if Instant::now() < *at => {
                    return Err(TransportError::BackingOff {
                        peer: self.member.clone(),
                        wait: at.saturating_duration_since(Instant::now()),
                    });
                }
                LinkState::Idle { failures, .. } => *failures,
            };
            let (tx, rx) = watch::channel(None);
            *state = LinkState::Dialing {
                outcome: rx.clone(),
                failures,
            };
            let span = debug_span!("raft_dial", peer = %self.member);
            tokio::spawn(self.clone().dial(dialer.clone(), tx).instrument(span));
            rx
        };
        let outcome =
            dial.wait_for(Option::is_some)
                .await
                .map_err(|_| TransportError::DialAbandoned {
                    peer: self.member.clone(),
                })?;
        match outcome.as_ref() {
            Some(Ok(c)) => Ok(c.clone()),
            Some(Err(source)) => Err(match refusal_in(source.as_ref()) {
                Some(reason) => TransportError::Refused {
                    peer: self.member.clone(),
                    reason,
                },
                None => TransportError::Connect {
                    peer: self.member.clone(),
                    source: source.clone(),
                },
            }),
            // `wait_for` returns only a finished dial.
            None => Err(TransportError::DialAbandoned {
                peer: self.member.clone(),
            }),
        }
    }

    /// Dials once, giving up after [`DIAL_ATTEMPT`]; leaves the link up, or idle with the
    /// backoff of one more failure.
    async fn dial<D: Dialer>(self: Arc<Self>, dialer: Arc<D>, done: watch::Sender<DialOutcome>) {
        let Member { name, quic_addr } = &self.member;
        let result =
            match tokio::time::timeout(DIAL_ATTEMPT, dialer.connect(*quic_addr, name)).await {
                Ok(Ok(connection)) => Ok(connection),
                Ok(Err(e)) => Err(Arc::from(e.into())),
                Err(_) => Err(Arc::new(DialTimedOut(DIAL_ATTEMPT)) as Arc<dyn Error + Send + Sync>),
            };
        {
            let mut state = self.state.lock();
            let failures = match &*state {
                LinkState::Dialing { failures, .. } | LinkState::Idle { failures, .. } => *failures,
                LinkState::Up(_) => 0,
            };
            *state = match &result {
                Ok(c) => {
                    debug!(peer = %self.member, "raft connection established");
                    self.timeouts.store(0, Ordering::Relaxed);
                    LinkState::Up(c.clone())
                }
                Err(e) => {
                    if let Some(reason) = refusal_in(e.as_ref()) {
                        *self.refused.lock() = Some(reason);
                    }
                    let failures = failures.saturating_add(1);
                    let wait = dial_backoff(failures);
                    debug!(
                        peer = %self.member, error = %e, failures, ?wait,
                        "cannot connect to raft peer"
                    );
                    LinkState::Idle {
                        failures,
                        retry_at: Some(Instant::now() + wait),
                    }
                }
            };
        }
        // Nobody may be waiting any more; the state above keeps the connection.
        let _ = done.send(Some(result));
    }

    /// [`Link::connection`], given up at `deadline`.
    async fn connect_by<D: Dialer>(
        self: &Arc<Self>,
        dialer: &Arc<D>,
        deadline: Instant,
    ) -> Result<Connection, TransportError> {
        let timeout = deadline.saturating_duration_since(Instant::now());
        tokio::time::timeout_at(deadline, self.connection(dialer))
            .await
            .map_err(|_| TransportError::ConnectTimeout {
                peer: self.member.clone(),
                timeout,
            })?
    }

    /// Sends `frame` on a new stream of `connection` and decodes the answer.
    async fn exchange<T: DeserializeOwned>(
        &self,
        connection: &Connection,
        kind: RpcKind,
        frame: &[u8],
        deadline: Instant,
    ) -> Result<T, CallError> {
        let ttl = deadline.saturating_duration_since(Instant::now());
        let exchange = async {
            let (mut send, mut recv) = connection.open_bi().await.map_err(StreamError::from)?;
            send.write_all(frame).await.map_err(StreamError::from)?;
            send.finish().map_err(StreamError::from)?;
            read_frame(&mut recv, MAX_RPC_FRAME).await
        };
        let answer = match tokio::time::timeout_at(deadline, exchange).await {
            Err(_) => {
                self.timed_out(connection);
                return Err(CallError::Timeout(ttl));
            }
            Ok(answer) => answer.map_err(|source| match refusal(connection) {
                Some(reason) => {
                    warn!(peer = %self.member, %reason, "refused by a raft peer");
                    *self.refused.lock() = Some(reason.clone());
                    CallError::Refused {
                        peer: self.member.clone(),
                        reason,
                    }
                }
                None => CallError::Unreachable(TransportError::Frame {
                    peer: self.member.clone(),
                    source,
                }),
            })?,
        };
        self.answered();
        debug!(peer = %self.member, %kind, bytes = answer.len(), "rpc answered");
        rmp_serde::from_slice(&answer).map_err(|e| {
            CallError::Unreachable(TransportError::Frame {
                peer: self.member.clone(),
                source: FrameError::Decode(e),
            })
        })
    }

    fn answered(&self) {
        self.timeouts.store(0, Ordering::Relaxed);
        *self.refused.lock() = None;
    }

    /// After `REDIAL_AFTER_TIMEOUTS` in a row, forgets `connection` (if it is still the current
    /// one) so the next RPC dials.
    fn timed_out(&self, connection: &Connection) {
        if self.timeouts.fetch_add(1, Ordering::Relaxed) + 1 < REDIAL_AFTER_TIMEOUTS {
            return;
        }
        let mut state = self.state.lock();
        if let LinkState::Up(c) = &*state
            && c.stable_id() == connection.stable_id()
        {
            warn!(peer = %self.member, "raft peer stopped answering; dropping the connection");
            c.close(CLOSE_UNRESPONSIVE, b"no answer; redialling");
            *state = LinkState::FRESH;
            self.timeouts.store(0, Ordering::Relaxed);
        }
    }
}

/// The client of one peer, as openraft uses it.
pub struct QuicPeer<D> {
    id: NodeId,
    target: NodeId,
    link: Arc<Link>,
    dialer: Arc<D>,
    credentials: Credentials,
}

impl<D> fmt::Debug for QuicPeer<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicPeer")
            .field("id", &self.id)
            .field("target", &self.target)
            .field("peer", &self.link.member)
            .finish_non_exhaustive()
    }
}

type RpcResult<T, E = RaftError<NodeId>> = Result<T, RPCError<NodeId, Member, E>>;

/// Why an RPC got no answer from the remote `Raft`.
enum CallError {
    Unreachable(TransportError),
    Timeout(Duration),
    TooLarge(TransportError),
    Refused { peer: Member, reason: String },
}

impl<D: Dialer> QuicPeer<D> {
    /// Sends one request; returns what the remote `Raft` answered.
    async fn call<Req, Resp, E>(
        &self,
        kind: RpcKind,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Result<Resp, RaftError<NodeId, E>>, CallError>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: Error + DeserializeOwned,
    {
        let frame = encode_request(kind, (self.credentials)(), request).map_err(|source| {
            let too_large = matches!(source, FrameError::TooLarge { .. });
            let e = TransportError::Frame {
                peer: self.link.member.clone(),
                source,
            };
            if too_large {
                CallError::TooLarge(e)
            } else {
                CallError::Unreachable(e)
            }
        })?;
        let deadline = Instant::now() + option.soft_ttl();
        let connection = self
            .link
            .connect_by(&self.dialer, deadline)
            .await
            .map_err(CallError::Unreachable)?;
        self.link
            .exchange(&connection, kind, &frame, deadline)
            .await
    }

    /// The error openraft expects for `result`.
    #[expect(
        clippy::result_large_err,
        reason = "the error type is the one openraft's `RaftNetwork` returns"
    )]
    fn finish<Resp, E: Error>(
        &self,
        action: RPCTypes,
        result: Result<Result<Resp, RaftError<NodeId, E>>, CallError>,
    ) -> RpcResult<Resp, RaftError<NodeId, E>> {
        match result {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.link.member.clone(),
                e,
            ))),
            Err(CallError::Unreachable(e) | CallError::TooLarge(e)) => {
                Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
            Err(CallError::Refused { peer, reason }) => Err(RPCError::Unreachable(
                Unreachable::new(&TransportError::Refused { peer, reason }),
            )),
            Err(CallError::Timeout(timeout)) => Err(RPCError::Timeout(Timeout {
                action,
                id: self.id,
                target: self.target,
                timeout,
            })),
        }
    }
}

impl<D: Dialer> RaftNetwork<TypeConfig> for QuicPeer<D> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let kind = RpcKind::AppendEntries;
        let entries = rpc.entries.len() as u64;
        let result = self.call(kind, &rpc, &option).await;
        // Halving the batch helps only while there is more than one entry to split; a single
        // entry over the cap stays `Unreachable`, so openraft backs off instead of spinning.
        if let Err(CallError::TooLarge(e)) = &result
            && entries > 1
        {
            let hint = PayloadTooLarge::new_entries_hint(entries / 2).with_source_error(e);
            return Err(RPCError::PayloadTooLarge(hint));
        }
        self.finish(RPCTypes::AppendEntries, result)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        let result = self.call(RpcKind::InstallSnapshot, &rpc, &option).await;
        self.finish(RPCTypes::InstallSnapshot, result)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        let result = self.call(RpcKind::Vote, &rpc, &option).await;
        self.finish(RPCTypes::Vote, result)
    }
}

/// Counts what [`serve_connection`] did with the request streams it accepted.
#[derive(Debug, Default)]
pub struct ServeCounters {
    answered: AtomicU64,
    malformed: AtomicU64,
    oversized: AtomicU64,
    abandoned: AtomicU64,
    refused: AtomicU64,
    revoked: AtomicU64,
}

/// A copy of [`ServeCounters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServeCounterValues {
    /// Requests answered (the remote `Raft`'s errors included).
    pub answered: u64,
    /// Streams closed because the request had an unknown kind or did not decode.
    pub malformed: u64,
    /// Streams closed because a request announced a length over its cap.
    pub oversized: u64,
    /// Streams the peer gave up on: ended or reset before the request was complete, or the
    /// answer could not be sent.
    pub abandoned: u64,
    /// Requests refused (each closing its connection): from a node not a member, of another
    /// cluster, or in another node's name.
    #[serde(default)]
    pub refused: u64,
    /// Connections closed because their peer stopped being a member.
    #[serde(default)]
    pub revoked: u64,
}

impl ServeCounters {
    pub fn values(&self) -> ServeCounterValues {
        ServeCounterValues {
            answered: self.answered.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
            oversized: self.oversized.load(Ordering::Relaxed),
            abandoned: self.abandoned.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            revoked: self.revoked.load(Ordering::Relaxed),
        }
    }
}

/// The server side: answers every RPC that arrives on `connection` from node `peer` (the
/// name its certificate carries) by calling the local `cluster` (its `Raft` for the Raft RPCs),
/// each stream in its own task, until the connection closes or `peer` stops being a member.
///
/// Each request is authorised when it is served (see the module doc); a refused one closes the
/// connection. Once this node applies a membership without `peer`, no further request is read
/// and the connection closes when the answers in flight are delivered (at most
/// half a second). A malformed or oversized request closes its stream (nothing else); all
/// of these are counted in `counters`. Concurrency per connection is bounded by QUIC's stream
/// limit. The node stops it by closing the connection (or its endpoint).
pub async fn serve_connection<D: Dialer>(
    cluster: Cluster<D>,
    connection: Connection,
    peer: String,
    counters: Arc<ServeCounters>,
) {
    let span = debug_span!("raft_serve", %peer, remote = %connection.remote_address());
    async move {
        let mut answering = JoinSet::new();
        let revoked = cluster.until_not_member(&peer);
        tokio::pin!(revoked);
        loop {
            tokio::select! {
                accepted = connection.accept_bi() => match accepted {
                    Ok((send, recv)) => {
                        let answer = answer(
                            cluster.clone(),
                            connection.clone(),
                            peer.clone(),
                            send,
                            recv,
                            counters.clone(),
                        );
                        answering.spawn(answer.in_current_span());
                    }
                    Err(e) => {
                        debug!(error = %e, "raft connection closed");
                        // The answers in flight finish on their own.
                        answering.detach_all();
                        return;
                    }
                },
                () = &mut revoked => break,
                Some(_) = answering.join_next() => {}
            }
        }
        let delivered = tokio::time::timeout(REVOKE_GRACE, async {
            while answering.join_next().await.is_some() {}
        });
        let _ = delivered.await;
        counters.revoked.fetch_add(1, Ordering::Relaxed);
        info!("closing the raft connection of a node no longer a member");
        let refusal = cluster.not_member(&peer);
        connection.close(refusal.code(), refusal.to_string().as_bytes());
    }
    .instrument(span)
    .await
}

/// Reads one request, asks `cluster`, writes the answer.
async fn answer<D: Dialer>(
    cluster: Cluster<D>,
    connection: Connection,
    peer: String,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    counters: Arc<ServeCounters>,
) {
    let outcome = async {
        let mut kind = [0u8];
        recv.read_exact(&mut kind)
            .await
            .map_err(StreamError::from)?;
        let kind = RpcKind::from_u8(kind[0]).ok_or(FrameError::UnknownKind(kind[0]))?;
        let mut identity = [0u8; IDENTITY_BYTES];
        recv.read_exact(&mut identity)
            .await
            .map_err(StreamError::from)?;
        // Before the payload is read: nothing of a stranger's is buffered.
        cluster.authorize(&peer, ClusterIdentity::from_bytes(identity))?;
        let payload = read_frame(&mut recv, kind.request_cap()).await?;
        let raft = cluster.raft();
        // The sender a request names must be the peer TLS authenticated.
        let from = |claimed: Option<NodeId>| cluster.check_sender(&peer, kind, claimed);
        let response = match kind {
            RpcKind::AppendEntries => {
                let rpc: AppendEntriesRequest<TypeConfig> = decode(&payload)?;
                from(rpc.vote.leader_id().voted_for())?;
                encode_response(&raft.append_entries(rpc).await)
            }
            RpcKind::Vote => {
                let rpc: VoteRequest<NodeId> = decode(&payload)?;
                from(rpc.vote.leader_id().voted_for())?;
                encode_response(&raft.vote(rpc).await)
            }
            RpcKind::InstallSnapshot => {
                let rpc: InstallSnapshotRequest<TypeConfig> = decode(&payload)?;
                from(rpc.vote.leader_id().voted_for())?;
                encode_response(&raft.install_snapshot(rpc).await)
            }
            RpcKind::Forward => {
                let forward: Forward = decode(&payload)?;
                encode_response(&cluster.serve_forward(forward).await)
            }
            RpcKind::Report => {
                let () = decode(&payload)?;
                encode_response(&cluster.local_report())
            }
            RpcKind::PreVote => {
                let request: PreVoteRequest = decode(&payload)?;
                from(Some(request.candidate))?;
                encode_response(&cluster.serve_pre_vote(request).await)
            }
            RpcKind::TimeoutNow => {
                let request: TimeoutNow = decode(&payload)?;
                from(Some(request.from))?;
                encode_response(&cluster.serve_timeout_now(request).await)
            }
        }?;
        send.write_all(&response).await.map_err(StreamError::from)?;
        send.finish().map_err(StreamError::from)?;
        Ok::<_, FrameError>(())
    }
    .await;
    let (counter, code) = match outcome {
        Ok(()) => {
            counters.answered.fetch_add(1, Ordering::Relaxed);
            // Until the peer has it all: a connection closed for a revocation drops what is
            // unsent.
            let _ = send.stopped().await;
            return;
        }
        Err(FrameError::Refused(refusal)) => {
            warn!(%refusal, "refused a raft request; closing the connection");
            counters.refused.fetch_add(1, Ordering::Relaxed);
            connection.close(refusal.code(), refusal.to_string().as_bytes());
            return;
        }
        Err(FrameError::Stream(e)) => {
            debug!(error = %e, "raft request stream abandoned");
            (&counters.abandoned, STREAM_INCOMPLETE)
        }
        Err(e @ FrameError::TooLarge { .. }) => {
            warn!(error = %e, "closing a raft request stream");
            (&counters.oversized, STREAM_TOO_LARGE)
        }
        Err(e @ (FrameError::UnknownKind(_) | FrameError::Decode(_) | FrameError::Encode(_))) => {
            warn!(error = %e, "closing a raft request stream");
            (&counters.malformed, STREAM_MALFORMED)
        }
    };
    counter.fetch_add(1, Ordering::Relaxed);
    // Either side may already be closed; then there is nothing left to close.
    let _ = recv.stop(code);
    let _ = send.reset(code);
}

/// What went wrong with one frame.
#[derive(Debug, thiserror::Error)]
enum FrameError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("a frame of {len} bytes is over the cap of {cap}")]
    TooLarge { len: u64, cap: u32 },
    #[error("unknown RPC kind {0}")]
    UnknownKind(u8),
    #[error("cannot decode the frame: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    #[error("cannot encode the frame: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error(transparent)]
    Refused(#[from] Refusal),
}

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("cannot open a stream: {0}")]
    Open(#[from] ConnectionError),
    #[error("cannot write: {0}")]
    Write(#[from] WriteError),
    #[error("cannot finish the stream: {0}")]
    Finish(#[from] ClosedStream),
    #[error("cannot read: {0}")]
    Read(#[from] ReadExactError),
}

/// Why a peer could not be asked; reported to openraft inside `Unreachable`.
#[derive(Debug, thiserror::Error)]
enum TransportError {
    #[error("cannot connect to raft peer {peer}: {source}")]
    Connect {
        peer: Member,
        source: Arc<dyn Error + Send + Sync>,
    },
    #[error("connecting to raft peer {peer} did not finish within {timeout:?}")]
    ConnectTimeout { peer: Member, timeout: Duration },
    #[error("the dial of raft peer {peer} was dropped")]
    DialAbandoned { peer: Member },
    #[error("not dialling raft peer {peer} for another {wait:?} after failed dials")]
    BackingOff { peer: Member, wait: Duration },
    #[error("raft RPC to {peer}: {source}")]
    Frame { peer: Member, source: FrameError },
    #[error("raft peer {peer} refused this node: {reason}")]
    Refused { peer: Member, reason: String },
}

/// A dial abandoned after [`DIAL_ATTEMPT`].
#[derive(Debug, thiserror::Error)]
#[error("the QUIC handshake did not finish within {0:?}")]
struct DialTimedOut(Duration);

/// `kind`, the sender's cluster `identity`, then the frame of `request` under `kind`'s cap.
fn encode_request<T: Serialize>(
    kind: RpcKind,
    identity: Option<ClusterIdentity>,
    request: &T,
) -> Result<Vec<u8>, FrameError> {
    let mut frame = vec![kind as u8];
    frame.extend_from_slice(&identity.map_or([0; IDENTITY_BYTES], |i| i.to_bytes()));
    encode_into(&mut frame, request, kind.request_cap())?;
    Ok(frame)
}

/// The frame of a response.
fn encode_response<T: Serialize>(response: &T) -> Result<Vec<u8>, FrameError> {
    let mut frame = Vec::new();
    encode_into(&mut frame, response, MAX_RPC_FRAME)?;
    Ok(frame)
}

/// Appends the length and the MessagePack of `value` to `frame`, refused if over `cap`.
fn encode_into<T: Serialize>(frame: &mut Vec<u8>, value: &T, cap: u32) -> Result<(), FrameError> {
    let start = frame.len();
    frame.extend_from_slice(&[0; 4]);
    rmp_serde::encode::write_named(frame, value)?;
    let len = (frame.len() - start - 4) as u64;
    match u32::try_from(len) {
        Ok(len) if len <= cap => {
            frame[start..start + 4].copy_from_slice(&len.to_be_bytes());
            Ok(())
        }
        _ => Err(FrameError::TooLarge { len, cap }),
    }
}

fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    Ok(rmp_serde::from_slice(payload)?)
}

/// Reads a length and that many bytes; the length is checked against `cap` before allocating.
async fn read_frame(recv: &mut quinn::RecvStream, cap: u32) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await.map_err(StreamError::from)?;
    let len = u32::from_be_bytes(len);
    if len > cap {
        return Err(FrameError::TooLarge {
            len: len.into(),
            cap,
        });
    }
    let mut payload = vec![0; len as usize];
    recv.read_exact(&mut payload)
        .await
        .map_err(StreamError::from)?;
    Ok(payload)
}

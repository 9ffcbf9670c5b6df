//! The sync protocol as a state machine, in the style of quinn-proto: inputs carry `now`,
//! outputs are polled, and nothing here reads a clock or touches a socket.
//!
//! One [`Core`] runs per node. Per peer it keeps an outbound side (a coalescing batch, a
//! bounded queue of flushed batches and table-stream starts, a cursor over a table snapshot
//! for bulk sync and refresh, the batch sequence number) and an inbound side (the peer's epoch
//! and last sequence number, the peer's table stream under way and its mark, whether the table
//! asked of it is complete).
//!
//! Decisions, in one place:
//! * **Ownership.** The owner of a flow is the node whose configuration lists the flow's LIP
//!   ([`Core::set_lips`]); its sessions are the truth for its flows. A node originates updates
//!   for the sessions it created (`synced == false`). A record a peer sends is applied with an
//!   [`Authority`] the core decides: from the LIP's owner, [`Authority::Owner`] (it replaces a
//!   stale copy that holds one of its keys); of a flow of a node that is not connected here,
//!   [`Authority::Relay`] (fills gaps, never replaces); of this node's own LIP,
//!   [`Authority::Reclaim`] while the sender's first table since this node started is still
//!   coming (the node restarted and gets its flows back), refused afterwards. A record on a LIP
//!   no node lists, or of a connected owner's flow from another node, is refused and counted
//!   ([`DropReason::UnknownLip`], [`DropReason::NotOwner`]). The engine never lets a peer's
//!   record change a session this node owns.
//! * **Adoption.** A synced session whose state changes here is being forwarded here: its owner
//!   failed, or ECMP moved the flow. While its owner is not connected, this node *adopts* it:
//!   it sends its state changes and its close, and includes it in its refreshes, so that the
//!   other peers keep following the flow (as relayed records). When the owner connects, or an
//!   owner record of the flow arrives, the adoption ends: the owner speaks for its flows again.
//!   The expiry of a synced copy that was never adopted is this node's timer only and is not
//!   sent. The set is bounded.
//! * **Reconciliation.** Every table stream (bulk answer, resync, refresh) has a start and an
//!   end. The start is queued in order with the live updates at the moment the table is asked
//!   of the node ([`Output::TableWanted`]), so every update sent after it is no older than the
//!   table; a live update while the stream runs marks its flow superseded (the older snapshot
//!   entry is skipped). The receiver gives each start from a peer a new mark and stamps every
//!   owner record of that peer with its current mark. An end that says `complete` (see below)
//!   makes the receiver drop the copies on the sender's LIPs not stamped with the stream's mark
//!   ([`Apply::Reconcile`]): flows the owner no longer has, whose removal was lost on the way (a
//!   disconnect, a queue overflow, a full event inbox in the node, a lost batch). A gap in the
//!   stream voids it (the gap asks for a table anyway). So lost removals are repaired by the
//!   next table stream: at once on reconnect (the bulk answer), else within `refresh_interval`.
//! * **Complete tables.** A node that restarted holds none of its flows until its peers hand
//!   them back, so its table speaks for its LIPs only once the peer it streams to has sent its
//!   table since this node started: a stream decided on before that ends incomplete (no
//!   reconciliation); the next refresh is complete. Nothing is lost meanwhile: what the peer
//!   holds of this node's flows came back with its table.
//! * **Epoch and sequence.** Every batch carries sender, receiver, the sender's epoch and a
//!   sequence number per (epoch, receiver). Within a connection, a receiver rejects a lower
//!   epoch (stale), and within an epoch a sequence number not above the last one (replayed or
//!   reordered-late). A higher epoch is the peer restarted: its sequence starts afresh. A gap
//!   (a batch lost) is accepted and answered with a bulk request, so whatever was lost comes
//!   back. A new connection starts afresh: the transport has authenticated the peer again, and
//!   a peer whose epoch went backwards (an epoch taken from a clock that stepped back) is not
//!   shut out.
//! * **Table re-request.** A bulk request can be lost without a trace: the peer drops it as a
//!   foreign frame when it does not have this node in its peer set yet (this node learnt of the
//!   peer first). So a table asked of a connected peer is asked again, under a new id, when
//!   nothing of it has arrived for `bulk_retry` since the request left: the clock starts when
//!   the request is sent and restarts with every batch of a table stream (table entries, which
//!   carry no age, or a table's start or end), so a table still streaming is not asked again.
//!   Live updates do not restart it: a peer that keeps sending them may still have dropped the
//!   request. A re-ask makes the peer start its stream afresh; the answer to an older id is not
//!   taken for the table.
//! * **Bulk sync** answers a peer's request with the sessions this node speaks for (owned and
//!   adopted), the copies of flows on the requester's own LIPs when it asks for them back, and
//!   the copies of flows whose owner is not connected here (the owner may be gone, and the
//!   joining node must be able to carry its flows). Refreshes and resyncs carry only what this
//!   node speaks for, so a copy does not keep echoing over its owner's newer state.
//! * **Refresh.** Every `refresh_interval` each peer gets a table stream of the owned and
//!   adopted sessions through the same cursor as bulk sync: one shared snapshot, read a batch at
//!   a time as the transport drains, never copied into the queues. Owned entries carry
//!   `expires_in_secs` plus `expiry_grace`, so a peer's copy outlives the owner's deadline until
//!   the next refresh; its end reconciles.
//! * **Table copies** are rate-limited: the core asks for the node's table at most once per
//!   `table_interval`, and every stream owed when it asks shares that copy. Requests meanwhile
//!   wait for the next one; a peer that asks again and again replaces its own owed stream and
//!   gets no copy of its own.
//! * **Overflow.** A peer's queue (coalescing batch plus flushed batches) holds at most
//!   `queue_entries`. On overflow the queue is dropped (counted), and the peer is marked for a
//!   resync: it is sent the whole table again, and the resync's end reconciles what the dropped
//!   updates would have removed.
//! * **Lag** is the time from the event entering the owner's core to the update leaving the
//!   receiver's core as an [`Apply`]: the owner's event-to-send time (carried in the entry),
//!   plus half the transport's round-trip time when the driver reports it, plus the receiver's
//!   frame-to-apply time. No two clocks are compared.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dataplane::{Authority, L4Proto, SessionEvent, SessionRecord};
use serde::Serialize;
use xxhash_rust::xxh3::Xxh3Builder;

use crate::codec::{self, Batch, BulkRequest, DecodeError, Entry, MAX_BATCH_ENTRIES, TableEnd};

/// A flow as session sync knows it: its client-side key.
type FlowId = (L4Proto, SocketAddr, SocketAddr);

fn flow_id(r: &SessionRecord) -> FlowId {
    (r.proto, r.client, r.vip)
}

/// Tunables of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// A batch is flushed when it holds this many flows (at most [`MAX_BATCH_ENTRIES`]).
    pub batch_entries: usize,
    /// … or when its oldest update has waited this long.
    pub flush_after: Duration,
    /// Updates waiting for one peer at most; beyond, the peer is resynced.
    pub queue_entries: usize,
    /// How often owned (and adopted) sessions are sent again.
    pub refresh_interval: Duration,
    /// Added to the remaining time of owned sessions sent to peers.
    pub expiry_grace: Duration,
    /// Synced flows this node may adopt at most.
    pub max_adopted: usize,
    /// A table asked of a peer of which nothing has arrived for this long is asked for again
    /// (see the module doc on the table re-request).
    pub bulk_retry: Duration,
    /// The node's table is asked for ([`Output::TableWanted`]) at most once per this long
    /// (see the module doc on table copies).
    pub table_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            batch_entries: 1024,
            flush_after: Duration::from_millis(1),
            queue_entries: 1 << 18,
            refresh_interval: Duration::from_secs(30),
            expiry_grace: Duration::from_secs(60),
            max_adopted: 1 << 20,
            bulk_retry: Duration::from_secs(2),
            table_interval: Duration::from_millis(250),
        }
    }
}

/// A configuration the core cannot run with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("batch_entries must be 1..={MAX_BATCH_ENTRIES}, not {0}")]
    BatchEntries(usize),
    #[error("queue_entries ({0}) must be at least batch_entries")]
    QueueEntries(usize),
    #[error("refresh_interval must not be zero")]
    RefreshInterval,
    #[error("bulk_retry must not be zero")]
    BulkRetry,
}

/// What the node applies to its engine, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Apply {
    /// Install or update (`Engine::install`) with this authority (see the module doc on
    /// ownership).
    Install(SessionRecord, Authority),
    /// The flow ended on the node that sent it: remove the copy (`Engine::remove`).
    Remove(SessionRecord),
    /// A node's complete table stream has arrived: drop the copies on its LIPs that it did not
    /// stamp with `mark` (`Engine::reconcile`).
    Reconcile { lips: Arc<[IpAddr]>, mark: u32 },
}

/// What the core asks of the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Apply(Apply),
    /// Call [`Core::handle_table`] with the sessions the node holds (`Engine::sessions` lists
    /// them; the core picks what each stream carries), after applying every [`Output::Apply`]
    /// polled before: a peer asked for a bulk sync, a peer needs a resync, or a refresh is due.
    TableWanted,
}

/// Why something was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A frame over the length cap.
    Oversized,
    /// A frame of another protocol version.
    Version,
    /// A frame that does not decode, or a batch over the entry cap.
    Malformed,
    /// A batch from an earlier epoch of its sender.
    StaleEpoch,
    /// A batch whose sequence number was seen already in its epoch.
    Replayed,
    /// A batch whose sender or receiver is not the connection's.
    Misdirected,
    /// Updates dropped from a full queue (the peer is resynced).
    QueueOverflow,
    /// Updates not queued, or dropped from the queue, while the peer was disconnected.
    Disconnected,
    /// Updates of a batch that could not be encoded.
    Unencodable,
    /// A record on a LIP that no node of the configuration lists.
    UnknownLip,
    /// A record of a flow whose owner speaks for itself, from another node: the owner is
    /// connected here, or is this node (whose flows were handed back already).
    NotOwner,
}

/// Drop counts by reason: frames for the inbound reasons, updates for the outbound ones and
/// for the records refused by ownership.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Drops {
    pub oversized: u64,
    pub version: u64,
    pub malformed: u64,
    pub stale_epoch: u64,
    pub replayed: u64,
    pub misdirected: u64,
    pub queue_overflow: u64,
    pub disconnected: u64,
    pub unencodable: u64,
    pub unknown_lip: u64,
    pub not_owner: u64,
}

impl Drops {
    fn add(&mut self, reason: DropReason, n: u64) {
        let c = match reason {
            DropReason::Oversized => &mut self.oversized,
            DropReason::Version => &mut self.version,
            DropReason::Malformed => &mut self.malformed,
            DropReason::StaleEpoch => &mut self.stale_epoch,
            DropReason::Replayed => &mut self.replayed,
            DropReason::Misdirected => &mut self.misdirected,
            DropReason::QueueOverflow => &mut self.queue_overflow,
            DropReason::Disconnected => &mut self.disconnected,
            DropReason::Unencodable => &mut self.unencodable,
            DropReason::UnknownLip => &mut self.unknown_lip,
            DropReason::NotOwner => &mut self.not_owner,
        };
        *c += n;
    }

    /// Every count with its reason's name, for reports.
    pub fn by_reason(&self) -> [(&'static str, u64); 11] {
        [
            ("oversized", self.oversized),
            ("version", self.version),
            ("malformed", self.malformed),
            ("stale_epoch", self.stale_epoch),
            ("replayed", self.replayed),
            ("misdirected", self.misdirected),
            ("queue_overflow", self.queue_overflow),
            ("disconnected", self.disconnected),
            ("unencodable", self.unencodable),
            ("unknown_lip", self.unknown_lip),
            ("not_owner", self.not_owner),
        ]
    }

    /// Every drop, whatever the reason.
    pub fn total(&self) -> u64 {
        self.by_reason().iter().map(|(_, n)| n).sum()
    }
}

impl From<DecodeError> for DropReason {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::Oversized(_) => DropReason::Oversized,
            DecodeError::Version(_) => DropReason::Version,
            DecodeError::Empty | DecodeError::Malformed | DecodeError::TooManyEntries(_) => {
                DropReason::Malformed
            }
        }
    }
}

/// Sync state of one peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PeerStats {
    pub peer: String,
    pub connected: bool,
    /// The table asked of this peer since it connected has arrived whole.
    pub bulk_complete: bool,
    pub sent_batches: u64,
    pub sent_entries: u64,
    pub sent_bytes: u64,
    pub received_batches: u64,
    pub received_entries: u64,
    pub received_bytes: u64,
    /// Updates replaced by a newer one of the same flow before they were sent.
    pub coalesced: u64,
    /// Updates waiting to be sent to this peer.
    pub queue_depth: usize,
    /// Times this peer was marked for a resync after its queue overflowed.
    pub resyncs: u64,
    /// Sequence gaps in this peer's batches (each answered with a bulk request).
    pub gaps: u64,
    /// Times this peer's table was asked for again because nothing of it arrived for
    /// `bulk_retry`.
    pub bulk_retries: u64,
    /// Table streams (bulk answers, resyncs, refreshes) started towards this peer.
    pub table_streams: u64,
    /// Complete table streams of this peer received, each reconciling its flows here.
    pub reconciles: u64,
    pub dropped: Drops,
    /// Lag of the last update applied from this peer (see the module doc).
    pub lag_last: Duration,
    pub lag_max: Duration,
    pub lag_mean: Duration,
}

/// A table stream to one peer: its start is queued, its snapshot is read a batch at a time.
#[derive(Debug)]
struct TableStream {
    id: u64,
    /// The node's table; none until [`Core::handle_table`] hands it over.
    table: Option<Arc<[SessionRecord]>>,
    pos: usize,
    /// The stream's start has left (it is queued behind the updates that precede it).
    started: bool,
    /// The bulk request this stream answers; sent with its end.
    request: Option<BulkRequest>,
    /// The stream speaks for every flow on this node's LIPs (see the module doc).
    complete: bool,
    /// Flows updated live since the stream's start: their snapshot entries are older, so
    /// skipped.
    superseded: HashSet<FlowId, Xxh3Builder>,
}

#[derive(Debug, Clone, Copy)]
struct Queued {
    entry: Entry,
    event_at: Instant,
}

/// What waits in a peer's queue, in the order it leaves.
#[derive(Debug)]
enum Outgoing {
    Updates(Vec<Queued>),
    /// The start of the table stream with this id.
    TableStart(u64),
}

#[derive(Debug)]
struct Peer {
    name: String,
    id: u64,
    connected: bool,
    next_seq: u64,
    pending: Vec<Queued>,
    index: HashMap<FlowId, usize, Xxh3Builder>,
    pending_since: Option<Instant>,
    queue: VecDeque<Outgoing>,
    queued: usize,
    stream: Option<TableStream>,
    /// A table stream this peer is owed, answering this request if any; started at the next
    /// table copy.
    owed: Option<Option<BulkRequest>>,
    /// A bulk request to send with the next batch.
    send_request: Option<BulkRequest>,
    /// The peer's epoch and the last sequence number accepted in it, on this connection.
    inbound: Option<(u64, u64)>,
    /// The peer's table stream under way (its id), while no batch of it was lost.
    stream_in: Option<u64>,
    /// The mark given to the peer's latest table stream start (0: none yet).
    mark: u32,
    /// The peer's table has arrived at least once since this node started.
    table_in: bool,
    awaiting_bulk: Option<u64>,
    /// When the awaited table is asked for again unless part of it arrives first; set once the
    /// request has left.
    bulk_retry_at: Option<Instant>,
    rtt: Duration,
    lag_sum: Duration,
    lag_count: u32,
    stats: PeerStats,
}

impl Peer {
    fn new(name: String, id: u64, hasher: Xxh3Builder) -> Self {
        Peer {
            stats: PeerStats {
                peer: name.clone(),
                ..Default::default()
            },
            name,
            id,
            connected: false,
            next_seq: 1,
            pending: Vec::new(),
            index: HashMap::with_hasher(hasher),
            pending_since: None,
            queue: VecDeque::new(),
            queued: 0,
            stream: None,
            owed: None,
            send_request: None,
            inbound: None,
            stream_in: None,
            mark: 0,
            table_in: false,
            awaiting_bulk: None,
            bulk_retry_at: None,
            rtt: Duration::ZERO,
            lag_sum: Duration::ZERO,
            lag_count: 0,
        }
    }

    fn depth(&self) -> usize {
        self.pending.len() + self.queued
    }

    fn flush(&mut self) {
        if !self.pending.is_empty() {
            self.queued += self.pending.len();
            self.queue
                .push_back(Outgoing::Updates(std::mem::take(&mut self.pending)));
            self.index.clear();
        }
        self.pending_since = None;
    }

    /// Drops everything waiting, the table stream too; returns how many updates that was.
    fn clear(&mut self) -> u64 {
        let n = self.depth() as u64;
        self.pending.clear();
        self.index.clear();
        self.pending_since = None;
        self.queue.clear();
        self.queued = 0;
        self.stream = None;
        n
    }

    /// Queues an update; false if the queue overflowed (the peer then needs a resync).
    fn enqueue(&mut self, now: Instant, key: FlowId, entry: Entry, config: &Config) -> bool {
        if let Some(stream) = &mut self.stream {
            stream.superseded.insert(key);
        }
        let queued = Queued {
            entry,
            event_at: now,
        };
        if let Some(&i) = self.index.get(&key) {
            self.pending[i] = queued;
            self.stats.coalesced += 1;
            return true;
        }
        if self.depth() >= config.queue_entries {
            let dropped = self.clear() + 1;
            self.stats.dropped.add(DropReason::QueueOverflow, dropped);
            self.stats.resyncs += 1;
            self.owe_table(None);
            return false;
        }
        self.index.insert(key, self.pending.len());
        self.pending.push(queued);
        self.pending_since.get_or_insert(now);
        if self.pending.len() >= config.batch_entries {
            self.flush();
        }
        true
    }

    /// Asks the peer for its whole table under `id`, sent with the next batch; only the
    /// answer to this id completes it. Until the peer's first table is in, this node's own
    /// flows are asked back with it.
    fn ask_table(&mut self, id: u64) {
        self.send_request = Some(BulkRequest {
            id,
            own_flows: !self.table_in,
        });
        self.awaiting_bulk = Some(id);
        self.bulk_retry_at = None;
    }

    /// The peer is owed a table stream; a bulk request is kept over a push.
    fn owe_table(&mut self, request: Option<BulkRequest>) {
        let request = request.or(self.owed.flatten());
        self.owed = Some(request);
    }

    /// Starts a table stream: its start is queued behind every update before it.
    fn start_stream(&mut self, id: u64, request: Option<BulkRequest>, hasher: Xxh3Builder) {
        self.flush();
        self.queue.push_back(Outgoing::TableStart(id));
        self.stats.table_streams += 1;
        self.stream = Some(TableStream {
            id,
            table: None,
            pos: 0,
            started: false,
            request,
            complete: self.table_in,
            superseded: HashSet::with_hasher(hasher),
        });
    }

    fn record_lag(&mut self, lag: Duration) {
        self.stats.lag_last = lag;
        self.stats.lag_max = self.stats.lag_max.max(lag);
        self.lag_sum += lag;
        self.lag_count = self.lag_count.saturating_add(1);
    }
}

#[derive(Debug)]
struct PendingApply {
    apply: Apply,
    received: Instant,
    /// The sender's event-to-send time plus half the round trip; none for table entries.
    carried: Option<Duration>,
    peer: u64,
}

/// The node that owns a LIP.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Owner {
    Me,
    Peer(String),
}

/// The session-sync protocol of one node.
#[derive(Debug)]
pub struct Core {
    me: String,
    epoch: u64,
    config: Config,
    /// Seed of the flow maps' hash.
    seed: u64,
    peers: Vec<Peer>,
    /// Names of the peers connected now.
    connected: HashSet<String>,
    /// Who owns each LIP, and each node's LIPs (see the module doc on ownership).
    lip_owners: HashMap<IpAddr, Owner, Xxh3Builder>,
    node_lips: HashMap<String, Arc<[IpAddr]>>,
    next_peer_id: u64,
    next_bulk_id: u64,
    next_stream_id: u64,
    /// The mark the next table stream start from any peer gets.
    next_mark: u32,
    /// Adopted flows with their LIP.
    adopted: HashMap<FlowId, IpAddr, Xxh3Builder>,
    applies: VecDeque<PendingApply>,
    refresh_due: bool,
    next_refresh: Instant,
    /// The node's table is not asked for before this (see `table_interval`).
    next_table_at: Instant,
    /// A table copy was due at the last timeout: the next poll asks for it.
    table_due: bool,
    foreign_frames: u64,
}

impl Core {
    /// A core for node `me` in incarnation `epoch` (higher after every restart), with no peers
    /// yet.
    pub fn new(me: &str, epoch: u64, config: Config, now: Instant) -> Result<Core, ConfigError> {
        if config.batch_entries == 0 || config.batch_entries > MAX_BATCH_ENTRIES {
            return Err(ConfigError::BatchEntries(config.batch_entries));
        }
        if config.queue_entries < config.batch_entries {
            return Err(ConfigError::QueueEntries(config.queue_entries));
        }
        if config.refresh_interval.is_zero() {
            return Err(ConfigError::RefreshInterval);
        }
        if config.bulk_retry.is_zero() {
            return Err(ConfigError::BulkRetry);
        }
        // A per-process random seed: flows are chosen by clients, so the maps must not be
        // floodable with crafted collisions.
        let seed = std::collections::hash_map::RandomState::new().hash_one(0);
        Ok(Core {
            me: me.to_owned(),
            epoch,
            next_refresh: now + config.refresh_interval,
            next_table_at: now,
            table_due: false,
            config,
            seed,
            peers: Vec::new(),
            connected: HashSet::new(),
            lip_owners: HashMap::with_hasher(Xxh3Builder::new().with_seed(seed)),
            node_lips: HashMap::new(),
            next_peer_id: 0,
            next_bulk_id: 1,
            next_stream_id: 1,
            next_mark: 1,
            adopted: HashMap::with_hasher(Xxh3Builder::new().with_seed(seed)),
            applies: VecDeque::new(),
            refresh_due: false,
            foreign_frames: 0,
        })
    }

    fn hasher(&self) -> Xxh3Builder {
        Xxh3Builder::new().with_seed(self.seed)
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    fn peer_mut(&mut self, name: &str) -> Option<&mut Peer> {
        self.peers.iter_mut().find(|p| p.name == name)
    }

    /// The current peer set. Peers no longer listed are forgotten with their queues; new ones
    /// start disconnected.
    pub fn set_peers<S: AsRef<str>>(&mut self, names: &[S]) {
        self.peers
            .retain(|p| names.iter().any(|n| n.as_ref() == p.name));
        let peers = &self.peers;
        self.connected
            .retain(|c| peers.iter().any(|p| p.name == *c && p.connected));
        for name in names {
            let name = name.as_ref();
            if name != self.me && !self.peers.iter().any(|p| p.name == name) {
                let id = self.next_peer_id;
                self.next_peer_id += 1;
                self.peers
                    .push(Peer::new(name.to_owned(), id, self.hasher()));
            }
        }
    }

    /// The LIPs of every node of the configuration, this one included: who owns each flow
    /// (see the module doc on ownership).
    pub fn set_lips(&mut self, nodes: &[(String, Vec<IpAddr>)]) {
        self.lip_owners.clear();
        self.node_lips.clear();
        for (name, lips) in nodes {
            let owner = if *name == self.me {
                Owner::Me
            } else {
                Owner::Peer(name.clone())
            };
            for lip in lips {
                self.lip_owners.insert(*lip, owner.clone());
            }
            self.node_lips.insert(name.clone(), lips.as_slice().into());
        }
    }

    /// A transport to `peer` is up: updates flow to it from now on, and its table is asked
    /// for (the node is not warm until it has arrived). The peer speaks for its own flows
    /// again: the ones this node adopted are released.
    pub fn peer_connected(&mut self, peer: &str) {
        let id = self.next_bulk_id;
        let Some(p) = self.peers.iter_mut().find(|p| p.name == peer) else {
            return;
        };
        p.connected = true;
        p.stats.connected = true;
        p.stats.bulk_complete = false;
        p.inbound = None;
        p.stream_in = None;
        p.ask_table(id);
        self.next_bulk_id += 1;
        self.connected.insert(peer.to_owned());
        if let Some(lips) = self.node_lips.get(peer) {
            self.adopted.retain(|_, lip| !lips.contains(lip));
        }
    }

    /// The transport to `peer` is gone: what waited for it is dropped (counted); it is asked
    /// for its table again when it reconnects.
    pub fn peer_disconnected(&mut self, peer: &str) {
        let Some(p) = self.peers.iter_mut().find(|p| p.name == peer) else {
            return;
        };
        let dropped = p.clear();
        p.stats.dropped.add(DropReason::Disconnected, dropped);
        p.connected = false;
        p.stats.connected = false;
        p.stats.bulk_complete = false;
        p.owed = None;
        p.send_request = None;
        p.stream_in = None;
        p.awaiting_bulk = None;
        p.bulk_retry_at = None;
        self.connected.remove(peer);
    }

    /// The transport's current round-trip time to `peer`; half of it counts into lag.
    pub fn set_rtt(&mut self, peer: &str, rtt: Duration) {
        if let Some(p) = self.peer_mut(peer) {
            p.rtt = rtt;
        }
    }

    /// Every current peer's table has arrived since it connected and has been handed out to be
    /// applied ([`Core::poll_output`]). A node with no peers is warm.
    pub fn is_warm(&self) -> bool {
        self.applies.is_empty() && self.peers.iter().all(|p| p.stats.bulk_complete)
    }

    fn owner(&self, lip: IpAddr) -> Option<&Owner> {
        self.lip_owners.get(&lip)
    }

    /// Whether `lip`'s owner is a peer connected now.
    fn owner_connected(&self, lip: IpAddr) -> bool {
        matches!(self.owner(lip), Some(Owner::Peer(o)) if self.connected.contains(o))
    }

    /// A session event of this node's data plane.
    pub fn handle_event(&mut self, now: Instant, event: SessionEvent) {
        let (record, closed, changed) = match event {
            SessionEvent::Created(r) => (r, false, false),
            SessionEvent::StateChanged(r) => (r, false, true),
            SessionEvent::Closed(r) => (r, true, false),
        };
        let key = flow_id(&record);
        let originate = if !record.synced {
            true
        } else if closed {
            self.adopted.remove(&key).is_some()
        } else if changed && !self.owner_connected(record.local.ip()) {
            if self.adopted.len() < self.config.max_adopted || self.adopted.contains_key(&key) {
                self.adopted.insert(key, record.local.ip());
            }
            true
        } else {
            false
        };
        if !originate {
            return;
        }
        let entry = Entry {
            record: if closed {
                record
            } else {
                self.with_grace(record)
            },
            closed,
            age_us: None,
        };
        for p in &mut self.peers {
            if p.connected {
                p.enqueue(now, key, entry, &self.config);
            } else {
                p.stats.dropped.add(DropReason::Disconnected, 1);
            }
        }
    }

    fn with_grace(&self, mut record: SessionRecord) -> SessionRecord {
        let grace = u32::try_from(self.config.expiry_grace.as_secs()).unwrap_or(u32::MAX);
        record.expires_in_secs = record.expires_in_secs.saturating_add(grace);
        record
    }

    /// Flushes batches that waited long enough, asks again for tables of which nothing arrived
    /// for `bulk_retry`, and marks a refresh due when it is time.
    pub fn handle_timeout(&mut self, now: Instant) {
        let flush_after = self.config.flush_after;
        for p in &mut self.peers {
            if p.pending_since.is_some_and(|t| now >= t + flush_after) {
                p.flush();
            }
            if p.bulk_retry_at.is_some_and(|t| now >= t) {
                p.ask_table(self.next_bulk_id);
                self.next_bulk_id += 1;
                p.stats.bulk_retries += 1;
            }
        }
        if now >= self.next_refresh {
            self.next_refresh = now + self.config.refresh_interval;
            if self.peers.iter().any(|p| p.connected) {
                self.refresh_due = true;
            }
        }
        // From now on the copy waits for a poll, not for a timeout: a timeout in the past would
        // only wake the caller again and again until it polls.
        self.table_due |= now >= self.next_table_at && self.table_owed();
    }

    /// Hands every peer's coalescing batch to its queue now, without waiting for
    /// `flush_after`: the node is stopping, and what it sends next is all it will send.
    pub fn flush_all(&mut self) {
        for p in &mut self.peers {
            p.flush();
        }
    }

    /// A table copy is waiting for `table_interval` to pass.
    fn table_owed(&self) -> bool {
        self.refresh_due || self.peers.iter().any(|p| p.connected && p.owed.is_some())
    }

    /// When [`Core::handle_timeout`] or [`Core::poll_output`] has something to do next.
    pub fn poll_timeout(&self) -> Instant {
        let flush_after = self.config.flush_after;
        let table = (self.table_owed() && !self.table_due).then_some(self.next_table_at);
        self.peers
            .iter()
            .flat_map(|p| [p.pending_since.map(|t| t + flush_after), p.bulk_retry_at])
            .flatten()
            .chain(table)
            .fold(self.next_refresh, Instant::min)
    }

    /// Starts the table streams owed now (bulk answers, resyncs, and refreshes to peers with
    /// none running); true if any was.
    fn start_streams(&mut self) -> bool {
        let refresh = std::mem::take(&mut self.refresh_due);
        let hasher = self.hasher();
        let mut started = false;
        for p in &mut self.peers {
            if !p.connected {
                continue;
            }
            let request = if let Some(request) = p.owed.take() {
                request
            } else if refresh && p.stream.is_none() {
                None
            } else {
                continue;
            };
            p.start_stream(self.next_stream_id, request, hasher);
            self.next_stream_id += 1;
            started = true;
        }
        started
    }

    /// The node's table, asked for by [`Output::TableWanted`]: every stream started then reads
    /// it (see the module doc on bulk sync and refresh for what each carries).
    pub fn handle_table(&mut self, table: Vec<SessionRecord>) {
        let table: Arc<[SessionRecord]> = table.into();
        for p in &mut self.peers {
            if let Some(stream) = &mut p.stream
                && stream.table.is_none()
            {
                stream.table = Some(table.clone());
            }
        }
    }

    /// The next frame to send to `peer`, if any. Queued updates and stream starts go first, in
    /// order; a table stream advances a batch at a time whenever they are all out.
    pub fn poll_transmit(&mut self, now: Instant, peer: &str) -> Option<Vec<u8>> {
        let batch_entries = self.config.batch_entries;
        let grace = u32::try_from(self.config.expiry_grace.as_secs()).unwrap_or(u32::MAX);
        let Core {
            me,
            epoch,
            peers,
            connected,
            lip_owners,
            adopted,
            config,
            ..
        } = self;
        let p = peers.iter_mut().find(|p| p.name == peer && p.connected)?;
        let mut table_start = None;
        let mut table_end = None;
        let entries = match p.queue.pop_front() {
            Some(Outgoing::Updates(batch)) => {
                p.queued -= batch.len();
                batch
                    .into_iter()
                    .map(|q| {
                        let age = now.saturating_duration_since(q.event_at);
                        Entry {
                            age_us: Some(u32::try_from(age.as_micros()).unwrap_or(u32::MAX)),
                            ..q.entry
                        }
                    })
                    .collect::<Vec<_>>()
            }
            Some(Outgoing::TableStart(id)) => {
                if let Some(stream) = &mut p.stream
                    && stream.id == id
                {
                    stream.started = true;
                }
                table_start = Some(id);
                Vec::new()
            }
            None => match &mut p.stream {
                Some(stream) if stream.started && stream.table.is_some() => {
                    let table = stream.table.clone().unwrap_or_else(|| Arc::from([]));
                    let mut entries = Vec::with_capacity(batch_entries.min(table.len()));
                    while entries.len() < batch_entries && stream.pos < table.len() {
                        let mut record = table[stream.pos];
                        stream.pos += 1;
                        let key = flow_id(&record);
                        if stream.superseded.contains(&key) {
                            continue;
                        }
                        let owned = !record.synced || adopted.contains_key(&key);
                        let carried = owned
                            || stream.request.is_some_and(|r| {
                                relayed_in_bulk(lip_owners, connected, peer, &r, &record)
                            });
                        if !carried {
                            continue;
                        }
                        if owned {
                            record.expires_in_secs = record.expires_in_secs.saturating_add(grace);
                        }
                        entries.push(Entry {
                            record,
                            closed: false,
                            age_us: None,
                        });
                    }
                    if stream.pos >= table.len() {
                        table_end = Some(TableEnd {
                            stream: stream.id,
                            complete: stream.complete,
                            request: stream.request.map(|r| r.id),
                        });
                        p.stream = None;
                    }
                    entries
                }
                _ if p.send_request.is_some() => Vec::new(),
                _ => return None,
            },
        };
        let n = entries.len() as u64;
        let batch = Batch {
            from: me.clone(),
            to: p.name.clone(),
            epoch: *epoch,
            seq: p.next_seq,
            table_start,
            entries,
            bulk_request: p.send_request.take(),
            table_end,
        };
        p.next_seq += 1;
        match codec::encode(&batch) {
            Ok(frame) => {
                if batch.bulk_request.is_some() {
                    p.bulk_retry_at = Some(now + config.bulk_retry);
                }
                p.stats.sent_batches += 1;
                p.stats.sent_entries += n;
                p.stats.sent_bytes += frame.len() as u64;
                Some(frame)
            }
            Err(_) => {
                // Cannot happen within the entry cap; if it does, the peer is made whole again:
                // its stream starts afresh.
                p.stats.dropped.add(DropReason::Unencodable, n);
                let request = p.stream.take().and_then(|s| s.request);
                p.owe_table(request.or(batch.table_end.and_then(|e| {
                    e.request.map(|id| BulkRequest {
                        id,
                        own_flows: false,
                    })
                })));
                p.send_request = batch.bulk_request;
                None
            }
        }
    }

    /// A frame received from `peer` (the identity its transport authenticated).
    pub fn handle_frame(&mut self, now: Instant, peer: &str, frame: &[u8]) {
        let Core {
            me,
            peers,
            connected,
            lip_owners,
            node_lips,
            adopted,
            applies,
            next_bulk_id,
            next_mark,
            config,
            foreign_frames,
            ..
        } = self;
        let Some(p) = peers.iter_mut().find(|p| p.name == peer) else {
            *foreign_frames += 1;
            return;
        };
        p.stats.received_bytes += frame.len() as u64;
        let batch = match codec::decode(frame) {
            Ok(b) => b,
            Err(e) => {
                p.stats.dropped.add(e.into(), 1);
                return;
            }
        };
        if batch.from != p.name || batch.to != *me {
            p.stats.dropped.add(DropReason::Misdirected, 1);
            return;
        }
        match p.inbound {
            Some((epoch, _)) if batch.epoch < epoch => {
                p.stats.dropped.add(DropReason::StaleEpoch, 1);
                return;
            }
            Some((epoch, last)) if batch.epoch == epoch => {
                if batch.seq <= last {
                    p.stats.dropped.add(DropReason::Replayed, 1);
                    return;
                }
                if batch.seq > last + 1 {
                    // Something of the peer's stream may be lost: it cannot reconcile.
                    p.stream_in = None;
                    if p.connected {
                        p.stats.gaps += 1;
                        p.ask_table(*next_bulk_id);
                        *next_bulk_id += 1;
                    }
                }
            }
            // A restart of the peer: a stream of its earlier run does not go on.
            Some(_) => p.stream_in = None,
            None => {}
        }
        p.inbound = Some((batch.epoch, batch.seq));
        // Part of a table stream (see the module doc on the table re-request): the table asked
        // for may be on its way, so it is given `bulk_retry` more.
        let table_part = batch.table_start.is_some()
            || batch.table_end.is_some()
            || batch.entries.iter().any(|e| e.age_us.is_none());
        if let Some(at) = &mut p.bulk_retry_at
            && table_part
        {
            *at = now + config.bulk_retry;
        }
        if let Some(id) = batch.table_start {
            p.stream_in = Some(id);
            p.mark = *next_mark;
            *next_mark = next_mark.wrapping_add(1).max(1);
        }
        p.stats.received_batches += 1;
        p.stats.received_entries += batch.entries.len() as u64;
        let half_rtt = p.rtt / 2;
        // Entries come in runs on one LIP (a table is streamed in table order): its owner is
        // looked up once per run.
        let mut last: Option<(IpAddr, Result<Authority, DropReason>)> = None;
        for e in batch.entries {
            let mut record = e.record;
            let lip = record.local.ip();
            let authority = match last {
                Some((l, a)) if l == lip => a,
                _ => {
                    let a = match lip_owners.get(&lip) {
                        None => Err(DropReason::UnknownLip),
                        Some(Owner::Peer(o)) if *o == p.name => {
                            Ok(Authority::Owner { mark: p.mark })
                        }
                        Some(Owner::Peer(o)) if connected.contains(o) => Err(DropReason::NotOwner),
                        Some(Owner::Peer(_)) => Ok(Authority::Relay),
                        Some(Owner::Me) if p.table_in => Err(DropReason::NotOwner),
                        Some(Owner::Me) => Ok(Authority::Reclaim),
                    };
                    last = Some((lip, a));
                    a
                }
            };
            let authority = match authority {
                Ok(Authority::Reclaim) if e.closed => Err(DropReason::NotOwner),
                a => a,
            };
            // An owner record or a close ends an adoption of the flow here.
            if !adopted.is_empty() && (e.closed || matches!(authority, Ok(Authority::Owner { .. })))
            {
                adopted.remove(&flow_id(&record));
            }
            let apply = match authority {
                Ok(_) if e.closed => Apply::Remove(record),
                Ok(authority) => {
                    record.synced = authority != Authority::Reclaim;
                    Apply::Install(record, authority)
                }
                Err(reason) => {
                    p.stats.dropped.add(reason, 1);
                    continue;
                }
            };
            applies.push_back(PendingApply {
                apply,
                received: now,
                carried: e
                    .age_us
                    .map(|us| Duration::from_micros(u64::from(us)) + half_rtt),
                peer: p.id,
            });
        }
        if let Some(end) = batch.table_end {
            if end.complete && p.stream_in == Some(end.stream) {
                p.stats.reconciles += 1;
                applies.push_back(PendingApply {
                    apply: Apply::Reconcile {
                        lips: node_lips
                            .get(&p.name)
                            .cloned()
                            .unwrap_or_else(|| Arc::from([])),
                        mark: p.mark,
                    },
                    received: now,
                    carried: None,
                    peer: p.id,
                });
            }
            p.stream_in = None;
            if end.request.is_some() && end.request == p.awaiting_bulk {
                p.awaiting_bulk = None;
                p.bulk_retry_at = None;
                p.stats.bulk_complete = true;
                p.table_in = true;
            }
        }
        if let Some(request) = batch.bulk_request {
            p.owe_table(Some(request));
        }
    }

    /// A frame from `peer` refused by the transport for its announced length alone.
    pub fn handle_oversized(&mut self, peer: &str) {
        match self.peer_mut(peer) {
            Some(p) => p.stats.dropped.add(DropReason::Oversized, 1),
            None => self.foreign_frames += 1,
        }
    }

    /// The next thing the node must do, in order: every update received before a table is
    /// asked for is applied before the table is read.
    pub fn poll_output(&mut self, now: Instant) -> Option<Output> {
        if let Some(a) = self.applies.pop_front() {
            if let Some(carried) = a.carried
                && let Some(p) = self.peers.iter_mut().find(|p| p.id == a.peer)
            {
                p.record_lag(carried + now.saturating_duration_since(a.received));
            }
            return Some(Output::Apply(a.apply));
        }
        // A copy due at the last timeout is taken now, or given up if nothing is owed any more.
        if (std::mem::take(&mut self.table_due) || now >= self.next_table_at)
            && self.table_owed()
            && self.start_streams()
        {
            self.next_table_at = now + self.config.table_interval;
            return Some(Output::TableWanted);
        }
        None
    }

    /// Whether [`Core::poll_output`] has something now: the driver wakes whoever polls only
    /// then.
    pub fn output_ready(&self, now: Instant) -> bool {
        !self.applies.is_empty()
            || ((self.table_due || now >= self.next_table_at) && self.table_owed())
    }

    /// Frames received from nodes that are not current peers.
    pub fn foreign_frames(&self) -> u64 {
        self.foreign_frames
    }

    /// Synced flows this node forwards and so keeps in sync itself.
    pub fn adopted(&self) -> usize {
        self.adopted.len()
    }

    /// Per-peer state and counters.
    pub fn stats(&self) -> Vec<PeerStats> {
        self.peers
            .iter()
            .map(|p| PeerStats {
                queue_depth: p.depth(),
                lag_mean: p.lag_sum.checked_div(p.lag_count).unwrap_or(Duration::ZERO),
                ..p.stats.clone()
            })
            .collect()
    }
}

/// Whether a bulk answer to `requester` carries `record`, a synced copy this node does not
/// speak for: a flow on the requester's own LIPs when it asked for them back, or a flow whose
/// owner is neither and is not connected here.
fn relayed_in_bulk(
    lip_owners: &HashMap<IpAddr, Owner, Xxh3Builder>,
    connected: &HashSet<String>,
    requester: &str,
    request: &BulkRequest,
    record: &SessionRecord,
) -> bool {
    match lip_owners.get(&record.local.ip()) {
        Some(Owner::Peer(o)) if o == requester => request.own_flows,
        Some(Owner::Peer(o)) => !connected.contains(o),
        Some(Owner::Me) | None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table copy that has to wait for `table_interval` is a timeout until it is due, and
    /// then an output: the driver sleeps until it, and is not woken again and again by a
    /// timeout already past while its output thread has yet to poll.
    #[test]
    fn test_a_table_copy_waits_as_a_timeout_and_is_never_one_in_the_past() {
        let t0 = Instant::now();
        let config = Config::default();
        let interval = config.table_interval;
        let mut a = Core::new("a", 1, config.clone(), t0).unwrap();
        let mut b = Core::new("b", 1, config, t0).unwrap();
        a.set_peers(&["b"]);
        b.set_peers(&["a"]);
        a.peer_connected("b");
        b.peer_connected("a");
        let request = b.poll_transmit(t0, "a").unwrap();
        a.handle_frame(t0, "b", &request);
        assert_eq!(a.poll_output(t0), Some(Output::TableWanted));
        a.handle_table(Vec::new());
        // b asks again at once: the copy waits for the interval.
        let mut again = codec::decode(&request).unwrap();
        again.seq += 1;
        a.handle_frame(t0, "b", &codec::encode(&again).unwrap());
        assert_eq!(a.poll_output(t0), None);
        assert_eq!(a.poll_timeout(), t0 + interval);
        let late = t0 + interval * 2;
        a.handle_timeout(late);
        assert!(a.poll_timeout() > late, "no timeout in the past");
        assert_eq!(a.poll_output(late), Some(Output::TableWanted));
    }

    #[test]
    fn test_config_without_bulk_retry_is_refused() {
        let config = Config {
            bulk_retry: Duration::ZERO,
            ..Config::default()
        };
        let err = Core::new("a", 1, config, Instant::now()).unwrap_err();
        assert_eq!(err, ConfigError::BulkRetry);
    }
}

//! The sync protocol as a state machine, in the style of quinn-proto: inputs carry `now`,
//! outputs are polled, and nothing here reads a clock or touches a socket.
//!
//! One [`Core`] runs per node. Per peer it keeps an outbound side (a coalescing batch, a
//! bounded queue of flushed batches, a cursor over a table snapshot for bulk sync and refresh,
//! the batch sequence number) and an inbound side (the peer's epoch and last sequence number,
//! whether the table asked of it is complete).
//!
//! Decisions, in one place:
//! * **Ownership.** A node originates updates for the sessions it created (`synced == false`).
//!   A synced session whose state changes here is being forwarded here (its owner failed or
//!   ECMP moved the flow): this node *adopts* it, sends its state changes and its close, and
//!   includes it in its refreshes, so that the other peers keep following the flow. The expiry
//!   of a synced copy that was never adopted is this node's timer only and is not sent. An
//!   adopted flow is released when it closes here or a peer removes it; the set is bounded.
//! * **Epoch and sequence.** Every batch carries sender, receiver, the sender's epoch and a
//!   sequence number per (epoch, receiver). A receiver rejects a lower epoch (stale), and
//!   within an epoch a sequence number not above the last one (replayed or reordered-late). A
//!   higher epoch is the peer restarted: its sequence starts afresh. A gap (a batch lost) is
//!   accepted and answered with a bulk request, so whatever was lost comes back.
//! * **Table re-request.** A bulk request can be lost without a trace: the peer drops it as a
//!   foreign frame when it does not have this node in its peer set yet (this node learnt of the
//!   peer first). So a table asked of a connected peer is asked again, under a new id, when
//!   nothing of it has arrived for `bulk_retry` since the request left: the clock starts when
//!   the request is sent and restarts with every batch of a table stream (table entries, which
//!   carry no age, or a table's end), so a table still streaming is not asked again. Live
//!   updates do not restart it: a peer that keeps sending them may still have dropped the
//!   request. A re-ask makes the peer start its stream afresh; the answer to an older id is
//!   not taken for the table.
//! * **Bulk sync** answers a peer's request with every session this node holds, its synced
//!   copies too: the peer may be the owner of flows it lost in a restart, or the owner may be
//!   gone, and the joining node must be able to carry all of them. Refreshes and resyncs carry
//!   only what this node speaks for (owned and adopted), so a copy does not keep echoing over its
//!   owner's newer state; a copy in a bulk answer may be older than the owner's, which the
//!   owner's next update corrects.
//! * **Refresh.** Every `refresh_interval` the core asks the node for its table
//!   ([`Output::TableWanted`]) and streams the owned and adopted sessions to each peer through
//!   the same cursor as bulk sync: one shared snapshot, read a batch at a time as the transport
//!   drains, never copied into the queues. Owned entries carry `expires_in_secs` plus
//!   `expiry_grace`, so a peer's copy outlives the owner's deadline until the next refresh.
//! * **Overflow.** A peer's queue (coalescing batch plus flushed batches) holds at most
//!   `queue_entries`. On overflow the queue is dropped (counted), and the peer is marked for a
//!   resync: it is sent the whole table again. A resync adds; a removal lost in the overflow
//!   is left to the peer's timer, which carries the owner's deadline.
//! * **Ordering against snapshots.** A live update for a flow while a table stream to a peer
//!   is running marks that flow superseded: the (older) snapshot entry is skipped.
//! * **Lag** is the time from the event entering the owner's core to the update leaving the
//!   receiver's core as an [`Apply`]: the owner's event-to-send time (carried in the entry),
//!   plus half the transport's round-trip time when the driver reports it, plus the receiver's
//!   frame-to-apply time. No two clocks are compared.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dataplane::{L4Proto, SessionEvent, SessionRecord};
use serde::Serialize;
use xxhash_rust::xxh3::Xxh3Builder;

use crate::codec::{self, Batch, DecodeError, Entry, MAX_BATCH_ENTRIES};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apply {
    /// Install or update (`Engine::install`); the record is marked `synced`.
    Install(SessionRecord),
    /// The flow ended on the node that sent it (`Engine::remove`).
    Remove(SessionRecord),
}

/// What the core asks of the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Apply(Apply),
    /// Call [`Core::handle_table`] with the sessions the node holds (`Engine::sessions` lists
    /// them; the synced ones are filtered here): a peer asked for a bulk sync, a peer needs a
    /// resync, or a refresh is due.
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
}

/// Drop counts by reason: frames for the inbound reasons, updates for the outbound ones.
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
        };
        *c += n;
    }

    /// Every drop, whatever the reason.
    pub fn total(&self) -> u64 {
        self.oversized
            + self.version
            + self.malformed
            + self.stale_epoch
            + self.replayed
            + self.misdirected
            + self.queue_overflow
            + self.disconnected
            + self.unencodable
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
    pub dropped: Drops,
    /// Lag of the last update applied from this peer (see the module doc).
    pub lag_last: Duration,
    pub lag_max: Duration,
    pub lag_mean: Duration,
}

/// A snapshot of the node's table being streamed to one peer.
#[derive(Debug)]
struct TableStream {
    table: Arc<[SessionRecord]>,
    pos: usize,
    /// The bulk request this stream answers; sent with the last batch.
    end_id: Option<u64>,
    /// Flows updated live since the snapshot: their snapshot entries are older, so skipped.
    superseded: HashSet<FlowId, Xxh3Builder>,
}

/// A table stream a peer is owed, waiting for the node's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TableOwed {
    end_id: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Queued {
    entry: Entry,
    event_at: Instant,
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
    queue: VecDeque<Vec<Queued>>,
    queued: usize,
    stream: Option<TableStream>,
    owed: Option<TableOwed>,
    /// A bulk request to send with the next batch.
    send_request: Option<u64>,
    /// The peer's epoch and the last sequence number accepted in it.
    inbound: Option<(u64, u64)>,
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
            self.queue.push_back(std::mem::take(&mut self.pending));
            self.index.clear();
        }
        self.pending_since = None;
    }

    /// Drops everything waiting; returns how many updates that was.
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
    /// answer to this id completes it.
    fn ask_table(&mut self, id: u64) {
        self.send_request = Some(id);
        self.awaiting_bulk = Some(id);
        self.bulk_retry_at = None;
    }

    /// The peer is owed the whole table; a bulk answer's id is kept over a push.
    fn owe_table(&mut self, end_id: Option<u64>) {
        let end_id = end_id.or(self.owed.and_then(|o| o.end_id));
        self.owed = Some(TableOwed { end_id });
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

/// The session-sync protocol of one node.
#[derive(Debug)]
pub struct Core {
    me: String,
    epoch: u64,
    config: Config,
    /// Seed of the flow maps' hash.
    seed: u64,
    peers: Vec<Peer>,
    next_peer_id: u64,
    next_bulk_id: u64,
    adopted: HashSet<FlowId, Xxh3Builder>,
    applies: VecDeque<PendingApply>,
    table_wanted: bool,
    refresh_due: bool,
    next_refresh: Instant,
    foreign_frames: u64,
}

impl Core {
    /// A core for node `me` in incarnation `epoch` (higher after every restart, e.g. the wall
    /// clock in nanoseconds at start), with no peers yet.
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
            config,
            seed,
            peers: Vec::new(),
            next_peer_id: 0,
            next_bulk_id: 1,
            adopted: HashSet::with_hasher(Xxh3Builder::new().with_seed(seed)),
            applies: VecDeque::new(),
            table_wanted: false,
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

    /// A transport to `peer` is up: updates flow to it from now on, and its table is asked
    /// for (the node is not warm until it has arrived).
    pub fn peer_connected(&mut self, peer: &str) {
        let id = self.next_bulk_id;
        let Some(p) = self.peer_mut(peer) else {
            return;
        };
        p.connected = true;
        p.stats.connected = true;
        p.stats.bulk_complete = false;
        p.ask_table(id);
        self.next_bulk_id += 1;
    }

    /// The transport to `peer` is gone: what waited for it is dropped (counted); it is asked
    /// for its table again when it reconnects.
    pub fn peer_disconnected(&mut self, peer: &str) {
        let Some(p) = self.peer_mut(peer) else {
            return;
        };
        let dropped = p.clear();
        p.stats.dropped.add(DropReason::Disconnected, dropped);
        p.connected = false;
        p.stats.connected = false;
        p.stats.bulk_complete = false;
        p.owed = None;
        p.send_request = None;
        p.awaiting_bulk = None;
        p.bulk_retry_at = None;
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
            self.adopted.remove(&key)
        } else if changed {
            if self.adopted.len() < self.config.max_adopted {
                self.adopted.insert(key);
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
        let mut overflowed = false;
        for p in &mut self.peers {
            if p.connected {
                overflowed |= !p.enqueue(now, key, entry, &self.config);
            } else {
                p.stats.dropped.add(DropReason::Disconnected, 1);
            }
        }
        self.table_wanted |= overflowed;
    }

    fn with_grace(&self, mut record: SessionRecord) -> SessionRecord {
        let grace = u32::try_from(self.config.expiry_grace.as_secs()).unwrap_or(u32::MAX);
        record.expires_in_secs = record.expires_in_secs.saturating_add(grace);
        record
    }

    /// Flushes batches that waited long enough, asks again for tables of which nothing arrived
    /// for `bulk_retry`, and starts a refresh when one is due.
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
                self.table_wanted = true;
            }
        }
    }

    /// When [`Core::handle_timeout`] has something to do next.
    pub fn poll_timeout(&self) -> Instant {
        let flush_after = self.config.flush_after;
        self.peers
            .iter()
            .flat_map(|p| [p.pending_since.map(|t| t + flush_after), p.bulk_retry_at])
            .flatten()
            .fold(self.next_refresh, Instant::min)
    }

    /// The node's table, asked for by [`Output::TableWanted`]. Only the sessions it owns or
    /// has adopted are streamed (see the module doc on bulk sync).
    pub fn handle_table(&mut self, table: Vec<SessionRecord>) {
        let table: Arc<[SessionRecord]> = table.into();
        let refresh = std::mem::take(&mut self.refresh_due);
        let hasher = self.hasher();
        for p in &mut self.peers {
            if !p.connected {
                continue;
            }
            let end_id = if let Some(owed) = p.owed.take() {
                owed.end_id
            } else if refresh && p.stream.is_none() {
                None
            } else {
                continue;
            };
            p.stats.table_streams += 1;
            p.stream = Some(TableStream {
                table: table.clone(),
                pos: 0,
                end_id,
                superseded: HashSet::with_hasher(hasher),
            });
        }
    }

    /// The next frame to send to `peer`, if any. Flushed live batches go first; a table
    /// stream advances a batch at a time whenever they are all out.
    pub fn poll_transmit(&mut self, now: Instant, peer: &str) -> Option<Vec<u8>> {
        let batch_entries = self.config.batch_entries;
        let grace = u32::try_from(self.config.expiry_grace.as_secs()).unwrap_or(u32::MAX);
        let adopted = &self.adopted;
        let p = self
            .peers
            .iter_mut()
            .find(|p| p.name == peer && p.connected)?;
        let (entries, bulk_end) = if let Some(batch) = p.queue.pop_front() {
            p.queued -= batch.len();
            let entries = batch
                .into_iter()
                .map(|q| {
                    let age = now.saturating_duration_since(q.event_at);
                    Entry {
                        age_us: Some(u32::try_from(age.as_micros()).unwrap_or(u32::MAX)),
                        ..q.entry
                    }
                })
                .collect::<Vec<_>>();
            (entries, None)
        } else if let Some(stream) = &mut p.stream {
            let mut entries = Vec::with_capacity(batch_entries.min(stream.table.len()));
            while entries.len() < batch_entries && stream.pos < stream.table.len() {
                let mut record = stream.table[stream.pos];
                stream.pos += 1;
                let key = flow_id(&record);
                let owned = !record.synced || adopted.contains(&key);
                // A bulk answer (the peer joined or came back) carries every session held, the
                // synced copies too: the peer may be the owner of flows it lost in a restart,
                // or they may belong to a node that is gone. Refreshes and resyncs carry only
                // what this node speaks for.
                let bulk = stream.end_id.is_some();
                if !(owned || bulk) || stream.superseded.contains(&key) {
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
            let mut end = None;
            if stream.pos >= stream.table.len() {
                end = stream.end_id;
                p.stream = None;
                if entries.is_empty() && end.is_none() && p.send_request.is_none() {
                    return None;
                }
            }
            (entries, end)
        } else if p.send_request.is_some() {
            (Vec::new(), None)
        } else {
            return None;
        };
        let n = entries.len() as u64;
        let batch = Batch {
            from: self.me.clone(),
            to: p.name.clone(),
            epoch: self.epoch,
            seq: p.next_seq,
            entries,
            bulk_request: p.send_request.take(),
            bulk_end,
        };
        p.next_seq += 1;
        match codec::encode(&batch) {
            Ok(frame) => {
                if batch.bulk_request.is_some() {
                    p.bulk_retry_at = Some(now + self.config.bulk_retry);
                }
                p.stats.sent_batches += 1;
                p.stats.sent_entries += n;
                p.stats.sent_bytes += frame.len() as u64;
                Some(frame)
            }
            Err(_) => {
                // Cannot happen within the entry cap; if it does, the peer is made whole again.
                p.stats.dropped.add(DropReason::Unencodable, n);
                p.owe_table(bulk_end);
                p.send_request = batch.bulk_request;
                self.table_wanted = true;
                None
            }
        }
    }

    /// A frame received from `peer` (the identity its transport authenticated).
    pub fn handle_frame(&mut self, now: Instant, peer: &str, frame: &[u8]) {
        let me = &self.me;
        let Some(p) = self.peers.iter_mut().find(|p| p.name == peer) else {
            self.foreign_frames += 1;
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
                if batch.seq > last + 1 && p.connected {
                    p.stats.gaps += 1;
                    p.ask_table(self.next_bulk_id);
                    self.next_bulk_id += 1;
                }
            }
            _ => {}
        }
        p.inbound = Some((batch.epoch, batch.seq));
        // Part of a table stream (see the module doc on the table re-request): the table asked
        // for may be on its way, so it is given `bulk_retry` more.
        let table_part =
            batch.bulk_end.is_some() || batch.entries.iter().any(|e| e.age_us.is_none());
        if let Some(at) = &mut p.bulk_retry_at
            && table_part
        {
            *at = now + self.config.bulk_retry;
        }
        p.stats.received_batches += 1;
        p.stats.received_entries += batch.entries.len() as u64;
        let half_rtt = p.rtt / 2;
        for e in batch.entries {
            let mut record = e.record;
            let apply = if e.closed {
                self.adopted.remove(&flow_id(&record));
                Apply::Remove(record)
            } else {
                record.synced = true;
                Apply::Install(record)
            };
            self.applies.push_back(PendingApply {
                apply,
                received: now,
                carried: e
                    .age_us
                    .map(|us| Duration::from_micros(u64::from(us)) + half_rtt),
                peer: p.id,
            });
        }
        if let Some(id) = batch.bulk_request {
            p.owe_table(Some(id));
            self.table_wanted = true;
        }
        if batch.bulk_end.is_some() && batch.bulk_end == p.awaiting_bulk {
            p.awaiting_bulk = None;
            p.bulk_retry_at = None;
            p.stats.bulk_complete = true;
        }
    }

    /// A frame from `peer` refused by the transport for its announced length alone.
    pub fn handle_oversized(&mut self, peer: &str) {
        match self.peer_mut(peer) {
            Some(p) => p.stats.dropped.add(DropReason::Oversized, 1),
            None => self.foreign_frames += 1,
        }
    }

    /// The next thing the node must do, in order.
    pub fn poll_output(&mut self, now: Instant) -> Option<Output> {
        if std::mem::take(&mut self.table_wanted) {
            return Some(Output::TableWanted);
        }
        let a = self.applies.pop_front()?;
        if let Some(carried) = a.carried
            && let Some(p) = self.peers.iter_mut().find(|p| p.id == a.peer)
        {
            p.record_lag(carried + now.saturating_duration_since(a.received));
        }
        Some(Output::Apply(a.apply))
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

#[cfg(test)]
mod tests {
    use super::*;

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

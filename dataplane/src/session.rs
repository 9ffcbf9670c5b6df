//! The session table: every Full-NAT flow, reachable from its client-side and its server-side key.
//!
//! Layout, chosen for memory and for the established-flow lookup:
//! * a slab of fixed-size slots, allocated once for the configured maximum, each behind its own
//!   one-byte lock (two workers may see the two directions of a flow at the same time);
//! * an open-addressing index (linear probing, backward-shift deletion) in lock-striped shards,
//!   mapping both keys of a session to its slot. Its capacity is fixed from the maximum at a load
//!   of at most 75 %, so it never rehashes on the packet path and has no power-of-two rounding;
//! * a free list of slots. A full table refuses new flows while existing ones carry on.
//!
//! A lookup reads the index, then locks the slot and checks that the slot still holds the key it
//! was found under (the session may have been removed and the slot reused in between). IPv4 and
//! IPv6 sessions live in separate tables so an IPv4 session pays for 4-byte addresses only.
//! Pure code: no clock, no I/O; deadlines are seconds of the caller's clock.
//!
//! Decisions:
//! * **A session is taken out only once it is linked.** An insert stores the session in its
//!   slot, then links both keys into the index, then marks the session linked; expiry, removal
//!   and eviction leave an unlinked session alone. So an insert racing an expiry (a synced
//!   record that arrives already due) either completes and is then expired whole, or fails and
//!   is cleaned up by the insert itself: no index entry outlives its session, and no entry
//!   counts against a shard's limit after its session is gone. Packets may use an unlinked
//!   session: its data is complete before the first key is linked.
//! * **Synced copies carry a mark** (see [`Engine::reconcile`](crate::Engine::reconcile)): the
//!   table stream of the copy's owner that last confirmed it, or 0. It fits the slot's padding.
//! * **Flows that never completed a handshake go first.** The node's own TCP flows in SYN_RECV
//!   and UDP flows without a reply are queued per protocol, oldest first, when they are created;
//!   when the table or a port pool runs out, the engine evicts the oldest of them
//!   ([`FamilyTable::evict_embryonic`]) rather than refuse a new flow, so a flood of SYNs or
//!   spoofed datagrams cannot lock out established or legitimate flows. An entry is checked when
//!   it is used (the flow may have completed or gone since), and the queue holds at most as many
//!   entries as the table has slots: an entry that falls off is a flow that expires normally.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::family::Family;
use crate::laddr::L4Proto;
use crate::offload::{OffloadFlow, OffloadSide, Offloaded};
use crate::service::Dest;
use crate::tcp_state::{Direction, TcpState, TcpWindow};

/// A flow as it appears in one packet: protocol, source and destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FlowKey<A> {
    pub(crate) src: A,
    pub(crate) dst: A,
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    pub(crate) proto: u8,
}

/// Folded multiply: the full 128-bit product of two words, halves xored. The mixing step of
/// foldhash and aHash.
fn folded_mul(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

impl<A: Family> FlowKey<A> {
    /// The flow hash every node computes alike (it picks the real server with Maglev): xxh3
    /// over a fixed byte layout, so it never changes between versions of lbcluster.
    pub(crate) fn flow_hash(&self, seed: u64) -> u64 {
        let mut buf = [0u8; 37];
        let len = if A::IS_V6 { 16 } else { 4 };
        buf[..len].copy_from_slice(self.src.octets_of().as_ref());
        buf[len..2 * len].copy_from_slice(self.dst.octets_of().as_ref());
        let n = 2 * len;
        buf[n..n + 2].copy_from_slice(&self.sport.to_be_bytes());
        buf[n + 2..n + 4].copy_from_slice(&self.dport.to_be_bytes());
        buf[n + 4] = self.proto;
        xxhash_rust::xxh3::xxh3_64_with_seed(&buf[..n + 5], seed)
    }

    /// The session-table hash: node-local with a per-node secret seed, so it only has to be
    /// fast and well mixed. A folded multiply per word pair, as foldhash does it.
    pub(crate) fn table_hash(&self, seed: u64) -> u64 {
        const K: [u64; 4] = [
            0x243f_6a88_85a3_08d3,
            0x1319_8a2e_0370_7344,
            0xa409_3822_299f_31d0,
            0x082e_fa98_ec4e_6c89,
        ];
        let ports =
            u64::from(self.sport) << 24 | u64::from(self.dport) << 8 | u64::from(self.proto);
        let (src, dst) = (self.src.octets_of(), self.dst.octets_of());
        let (src, dst) = (src.as_ref(), dst.as_ref());
        let mut h = seed ^ K[0];
        if A::IS_V6 {
            for (s, d) in src.chunks_exact(8).zip(dst.chunks_exact(8)) {
                let s = u64::from_ne_bytes(s.try_into().unwrap_or_default());
                let d = u64::from_ne_bytes(d.try_into().unwrap_or_default());
                h = folded_mul(h ^ s, d ^ K[1]);
            }
        } else {
            let s = u64::from(u32::from_ne_bytes(src.try_into().unwrap_or_default()));
            let d = u64::from(u32::from_ne_bytes(dst.try_into().unwrap_or_default()));
            h = folded_mul(h ^ (s << 32 | d), K[1]);
        }
        h = folded_mul(h ^ ports, K[2]);
        folded_mul(h, (seed ^ K[3]) | 1)
    }

    /// The same flow seen from the other end.
    pub(crate) fn reversed(&self) -> Self {
        FlowKey {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
        }
    }
}

/// The state of a flow: TCP states, or the single state of a UDP flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FlowState {
    Udp,
    Tcp(TcpState),
}

impl FlowState {
    /// The name `ipvsadm -Lnc` prints.
    pub fn name(self) -> &'static str {
        match self {
            FlowState::Udp => "UDP",
            FlowState::Tcp(s) => s.name(),
        }
    }

    pub(crate) fn is_active(self) -> bool {
        matches!(self, FlowState::Tcp(s) if s.is_active())
    }
}

/// Entries of the embryonic queue one eviction examines at most.
const EVICTION_BUDGET: usize = 256;

/// A session that another node can install to carry on the same flow with the same local
/// address, port and real server. Deadlines travel as a remaining time because clocks differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub proto: L4Proto,
    pub client: SocketAddr,
    pub vip: SocketAddr,
    /// The local address (LIP) and port the real server sees as the source.
    pub local: SocketAddr,
    pub backend: SocketAddr,
    pub state: FlowState,
    pub window: TcpWindow,
    /// Seconds until the session expires unless a packet refreshes it.
    pub expires_in_secs: u32,
    /// Installed from a peer rather than created by this node's traffic.
    pub synced: bool,
    /// A flow the SYN proxy joined: the real server's sequence numbers are the client's view
    /// plus this delta (see [`crate::synproxy`]). Session sync carries it, so a proxied flow
    /// carries on on any node.
    pub syn_proxy: Option<u32>,
}

/// What session sync needs to hear from the data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionEvent {
    Created(SessionRecord),
    StateChanged(SessionRecord),
    Closed(SessionRecord),
}

/// One session as stored in a slot.
#[derive(Debug)]
pub(crate) struct SessionData<A> {
    pub(crate) dest: Arc<Dest>,
    /// Deadline in whole seconds of the caller's clock.
    pub(crate) expires: u32,
    pub(crate) window: TcpWindow,
    pub(crate) client: A,
    pub(crate) vip: A,
    pub(crate) lip: A,
    pub(crate) rs: A,
    pub(crate) cport: u16,
    pub(crate) vport: u16,
    pub(crate) lport: u16,
    pub(crate) rport: u16,
    pub(crate) state: FlowState,
    pub(crate) synced: bool,
    pub(crate) offloaded: Offloaded,
    /// Of a synced copy: the owner's table stream that last confirmed it (0: none did).
    pub(crate) mark: u32,
    /// Both keys are in the index (see the module doc); set by the table only.
    pub(crate) linked: bool,
    /// A UDP flow has seen a datagram from its real server (always true for TCP and for
    /// sessions installed from a peer).
    pub(crate) replied: bool,
    /// Counted among the table's embryonic flows (see [`FamilyTable::embryonic_flows`]).
    pub(crate) tracked: bool,
    pub(crate) proxy: Proxy,
}

/// The SYN proxy's part of a session (see [`crate::synproxy`]).
#[derive(Debug, Default)]
pub(crate) enum Proxy {
    /// Not proxied: the client's handshake went to the real server.
    #[default]
    No,
    /// The client completed its handshake with the proxy; the proxy's SYN to the real server
    /// awaits its SYN-ACK.
    Opening(Box<Opening>),
    /// Joined: the real server's sequence numbers are the client's view plus `delta`.
    Joined { delta: u32 },
}

/// A proxied flow between the client's cookie ACK and the real server's SYN-ACK.
#[derive(Debug)]
pub(crate) struct Opening {
    /// The proxy's initial sequence number towards the client.
    pub(crate) cookie: u32,
    pub(crate) client_isn: u32,
    pub(crate) opts: crate::synproxy::CookieOpts,
    /// The client's last window, as it sent it (scaled by its own window scale).
    pub(crate) window: u16,
    /// When the SYN to the real server was last sent (seconds), and how many were.
    pub(crate) sent_at: u64,
    pub(crate) tries: u8,
    /// The client's first data segment, held until the real server answers.
    pub(crate) held: Option<Held>,
}

/// A data segment the proxy holds.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) seq: u32,
    pub(crate) flags: u8,
    pub(crate) window: u16,
    pub(crate) payload: Box<[u8]>,
}

impl<A: Family> SessionData<A> {
    /// A flow that has not completed a handshake: TCP in SYN_RECV, UDP with no reply yet. A
    /// UDP flow the faster path carries is not: it has sent more than one datagram, and its
    /// replies, if any, pass there unseen.
    pub(crate) fn embryonic(&self) -> bool {
        match self.state {
            FlowState::Udp => !self.replied && self.offloaded != Offloaded::Yes,
            FlowState::Tcp(s) => s == TcpState::SynRecv || matches!(self.proxy, Proxy::Opening(_)),
        }
    }

    /// The delta of a joined proxied flow.
    pub(crate) fn proxy_delta(&self) -> Option<u32> {
        match self.proxy {
            Proxy::Joined { delta } => Some(delta),
            _ => None,
        }
    }

    pub(crate) fn proto(&self) -> L4Proto {
        match self.state {
            FlowState::Udp => L4Proto::Udp,
            FlowState::Tcp(_) => L4Proto::Tcp,
        }
    }

    /// The session as a faster path forwards it (see [`crate::offload`]).
    pub(crate) fn offload_flow(&self) -> OffloadFlow {
        let at = |ip: A, port| SocketAddr::new(ip.to_ip(), port);
        let (client, vip) = (at(self.client, self.cport), at(self.vip, self.vport));
        let (lip, rs) = (at(self.lip, self.lport), at(self.rs, self.rport));
        let side = |dir, arrives, leaves| {
            let (seq_end, max_win, wscale) = self.window.edges(dir);
            OffloadSide {
                arrives,
                leaves,
                wscale,
                seq_end,
                max_win,
            }
        };
        OffloadFlow {
            proto: self.proto(),
            client_side: side(Direction::Inbound, (client, vip), (lip, rs)),
            server_side: side(Direction::Outbound, (rs, lip), (vip, client)),
        }
    }

    /// The key of packets from the client: client → VIP.
    pub(crate) fn client_key(&self) -> FlowKey<A> {
        FlowKey {
            src: self.client,
            dst: self.vip,
            sport: self.cport,
            dport: self.vport,
            proto: self.proto().number(),
        }
    }

    /// The key of packets from the real server: RS → LIP.
    pub(crate) fn server_key(&self) -> FlowKey<A> {
        FlowKey {
            src: self.rs,
            dst: self.lip,
            sport: self.rport,
            dport: self.lport,
            proto: self.proto().number(),
        }
    }

    pub(crate) fn record(&self, now_secs: u64) -> SessionRecord {
        SessionRecord {
            proto: self.proto(),
            client: SocketAddr::new(self.client.to_ip(), self.cport),
            vip: SocketAddr::new(self.vip.to_ip(), self.vport),
            local: SocketAddr::new(self.lip.to_ip(), self.lport),
            backend: SocketAddr::new(self.rs.to_ip(), self.rport),
            state: self.state,
            window: self.window,
            expires_in_secs: u32::try_from(u64::from(self.expires).saturating_sub(now_secs))
                .unwrap_or(u32::MAX),
            synced: self.synced,
            syn_proxy: self.proxy_delta(),
        }
    }
}

/// Index of a slot in the slab.
pub(crate) type SlotId = u32;

/// Why an insert did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InsertError {
    /// No free slot, or the index shard is at its limit.
    Full,
    /// A session with one of the two keys exists already (in that slot).
    Exists(SlotId),
}

/// An index entry is one word: the key's 32-bit hash tag and the slot number. The full key is
/// checked against the slot's session, so the entry needs nothing else (8 bytes, any family).
const EMPTY: u64 = u64::MAX;

fn entry(tag: u32, slot: SlotId) -> u64 {
    (u64::from(tag) << 32) | u64::from(slot)
}

fn entry_tag(e: u64) -> u32 {
    (e >> 32) as u32
}

fn entry_slot(e: u64) -> SlotId {
    e as u32
}

/// Index capacity per entry: at most 75 % full when the table holds its maximum.
const INDEX_LOAD_NUM: usize = 3;
const INDEX_LOAD_DEN: usize = 4;

/// Candidate slots one probe can collect under the writer lock; more keys with the same 32-bit
/// tag in one probe run do not occur outside of a broken hash.
const MAX_CANDIDATES: usize = 4;

#[derive(Debug)]
struct Shard {
    /// Serialises writers and counts the entries in use. Readers take no lock.
    writer: Mutex<usize>,
    entries: Box<[AtomicU64]>,
}

/// Where a key lives in the index: its shard, its tag and the start of its probe run.
#[derive(Debug, Clone, Copy)]
struct Position {
    shard: usize,
    tag: u32,
    home: usize,
}

/// Open addressing with linear probing and backward-shift deletion, in shards that each have a
/// writer lock. Readers probe with plain atomic loads: no lock and no locked instruction on the
/// established-flow path. A reader racing a writer that moves entries may miss a key; callers
/// that miss retry under the writer lock before they call a flow unknown.
#[derive(Debug)]
struct Index {
    shards: Box<[Shard]>,
    shard_mask: u64,
    capacity: usize,
    /// A shard refuses inserts past this, so probes always end at an empty entry.
    limit: usize,
}

impl Index {
    fn new(max_entries: usize) -> Self {
        // Few shards for small tables, 64 for large ones: enough to keep writers apart.
        let shards = (max_entries / 4096).clamp(1, 64).next_power_of_two();
        let per_shard = max_entries.div_ceil(shards);
        let capacity = (per_shard * INDEX_LOAD_DEN).div_ceil(INDEX_LOAD_NUM) + 8;
        // Hash imbalance between shards: allow up to 95 % in one shard before refusing.
        let limit = capacity * 95 / 100;
        let shards = (0..shards)
            .map(|_| Shard {
                writer: Mutex::new(0),
                entries: (0..capacity).map(|_| AtomicU64::new(EMPTY)).collect(),
            })
            .collect();
        Index {
            shards,
            shard_mask: (shards_len(max_entries) - 1) as u64,
            capacity,
            limit,
        }
    }

    /// The shard comes from the low bits of the hash, the tag (and from it the home position)
    /// from the high 32, so the two are independent.
    fn position(&self, hash: u64) -> Position {
        let tag = (hash >> 32) as u32;
        Position {
            shard: (hash & self.shard_mask) as usize,
            tag,
            home: self.home(tag),
        }
    }

    fn home(&self, tag: u32) -> usize {
        ((u64::from(tag) * self.capacity as u64) >> 32) as usize
    }

    fn next(&self, i: usize) -> usize {
        if i + 1 == self.capacity { 0 } else { i + 1 }
    }

    /// Lock-free probe: calls `f` with each slot whose entry carries the key's tag until `f`
    /// returns `Some` or the probe run ends.
    fn probe<R>(&self, pos: Position, mut f: impl FnMut(SlotId) -> Option<R>) -> Option<R> {
        let entries = &self.shards[pos.shard].entries;
        let mut i = pos.home;
        for _ in 0..self.capacity {
            let e = entries[i].load(Ordering::Acquire);
            if e == EMPTY {
                return None;
            }
            if entry_tag(e) == pos.tag
                && let Some(r) = f(entry_slot(e))
            {
                return Some(r);
            }
            i = self.next(i);
        }
        None
    }

    /// The slots carrying the key's tag, read under the writer lock: a stable view.
    fn candidates(&self, pos: Position) -> ([SlotId; MAX_CANDIDATES], usize) {
        let shard = &self.shards[pos.shard];
        let _writer = shard.writer.lock();
        let mut out = [0; MAX_CANDIDATES];
        let mut n = 0;
        self.probe(pos, |slot| {
            out[n] = slot;
            n += 1;
            (n == MAX_CANDIDATES).then_some(())
        });
        (out, n)
    }

    /// Inserts an entry; `same_key(slot)` tells whether the session in `slot` has this key.
    fn insert(
        &self,
        pos: Position,
        slot: SlotId,
        same_key: impl Fn(SlotId) -> bool,
    ) -> Result<(), InsertError> {
        let shard = &self.shards[pos.shard];
        let mut len = shard.writer.lock();
        let mut i = pos.home;
        loop {
            let e = shard.entries[i].load(Ordering::Relaxed);
            if e == EMPTY {
                break;
            }
            if entry_tag(e) == pos.tag && same_key(entry_slot(e)) {
                return Err(InsertError::Exists(entry_slot(e)));
            }
            i = self.next(i);
        }
        if *len >= self.limit {
            return Err(InsertError::Full);
        }
        shard.entries[i].store(entry(pos.tag, slot), Ordering::Release);
        *len += 1;
        Ok(())
    }

    /// Removes the entry of this key that points to `slot`.
    fn remove(&self, pos: Position, slot: SlotId) -> bool {
        let shard = &self.shards[pos.shard];
        let mut len = shard.writer.lock();
        let wanted = entry(pos.tag, slot);
        let mut i = pos.home;
        loop {
            let e = shard.entries[i].load(Ordering::Relaxed);
            if e == EMPTY {
                return false;
            }
            if e == wanted {
                break;
            }
            i = self.next(i);
        }
        // Backward-shift deletion: pull later entries of the probe run into the hole when their
        // home position allows, so lookups never need tombstones. Each move writes the copy
        // before clearing the original, so a concurrent reader sees an entry twice, at worst
        // misses one (and retries under the lock), but never sees a wrong one.
        let mut hole = i;
        let mut j = i;
        loop {
            j = self.next(j);
            let e = shard.entries[j].load(Ordering::Relaxed);
            if e == EMPTY {
                break;
            }
            let home = self.home(entry_tag(e));
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                home > hole || home <= j
            };
            if !stays {
                shard.entries[hole].store(e, Ordering::Release);
                hole = j;
            }
        }
        shard.entries[hole].store(EMPTY, Ordering::Release);
        *len -= 1;
        true
    }

    /// Entries in use, every shard together.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards.iter().map(|s| *s.writer.lock()).sum()
    }

    fn bytes(&self) -> usize {
        self.shards.len() * (self.capacity * size_of::<AtomicU64>() + size_of::<Shard>())
    }
}

fn shards_len(max_entries: usize) -> usize {
    (max_entries / 4096).clamp(1, 64).next_power_of_two()
}

/// The sessions of one address family.
#[derive(Debug)]
pub(crate) struct FamilyTable<A> {
    slots: Box<[Mutex<Option<SessionData<A>>>]>,
    free: Mutex<Vec<SlotId>>,
    index: Index,
    seed: u64,
    /// Where the next expiry sweep continues.
    sweep: AtomicUsize,
    /// This node's embryonic flows, oldest first, TCP then UDP: (slot, client-key tag).
    embryos: [Mutex<VecDeque<(SlotId, u32)>>; 2],
    /// This node's embryonic flows now (the sessions marked `tracked`).
    embryos_live: AtomicUsize,
}

/// A looked-up session, locked, with the side its key matched.
pub(crate) struct Locked<'a, A> {
    pub(crate) guard: parking_lot::MutexGuard<'a, Option<SessionData<A>>>,
    slot: SlotId,
    /// True when the key was the client-side key.
    pub(crate) from_client: bool,
}

impl<A: Family> FamilyTable<A> {
    pub(crate) fn new(max_sessions: u32, seed: u64) -> Self {
        let max = max_sessions as usize;
        FamilyTable {
            slots: (0..max).map(|_| Mutex::new(None)).collect(),
            free: Mutex::new((0..max_sessions).rev().collect()),
            index: Index::new(max * 2),
            seed,
            sweep: AtomicUsize::new(0),
            embryos: std::array::from_fn(|_| Mutex::new(VecDeque::new())),
            embryos_live: AtomicUsize::new(0),
        }
    }

    /// This node's own flows that have not completed a handshake, now: counted when inserted
    /// `tracked`, until they leave that state ([`Self::embryo_left`]) or the table.
    pub(crate) fn embryonic_flows(&self) -> usize {
        self.embryos_live.load(Ordering::Relaxed)
    }

    /// A tracked session completed its handshake: clears its mark and its count.
    pub(crate) fn embryo_left(&self, s: &mut SessionData<A>) {
        if s.tracked && !s.embryonic() {
            s.tracked = false;
            self.embryos_live.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn embryo_tag(&self, client_key: &FlowKey<A>) -> u32 {
        client_key.table_hash(self.seed) as u32
    }

    /// Queues the session with `client_key` just inserted in `slot` as embryonic (the node's own
    /// new flow), behind every older one of its protocol. The queue never holds more entries
    /// than the table has slots: the oldest falls off.
    pub(crate) fn track_embryo(&self, slot: SlotId, proto: L4Proto, client_key: &FlowKey<A>) {
        let tag = self.embryo_tag(client_key);
        let mut queue = self.embryos[proto.index()].lock();
        if queue.len() >= self.slots.len() {
            queue.pop_front();
        }
        queue.push_back((slot, tag));
    }

    /// Takes out the oldest embryonic flow of this node of `proto` that is still embryonic (see
    /// the module doc), examining a bounded number of queue entries; returns it.
    pub(crate) fn evict_embryonic(&self, proto: L4Proto) -> Option<SessionData<A>> {
        let queue = &self.embryos[proto.index()];
        for _ in 0..EVICTION_BUDGET {
            let (slot, tag) = queue.lock().pop_front()?;
            let data = {
                let mut guard = self.slots.get(slot as usize)?.lock();
                let still = guard.as_ref().is_some_and(|s| {
                    s.linked
                        && !s.synced
                        && s.proto() == proto
                        && s.embryonic()
                        && self.embryo_tag(&s.client_key()) == tag
                });
                if !still {
                    continue;
                }
                guard.take()
            };
            if let Some(data) = data {
                self.retire(slot, &data);
                return Some(data);
            }
        }
        None
    }

    pub(crate) fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.len() - self.free.lock().len()
    }

    /// Bytes allocated for this table at its configured maximum.
    pub(crate) fn bytes(&self) -> usize {
        self.slots.len() * (size_of::<Mutex<Option<SessionData<A>>>>() + size_of::<SlotId>())
            + self.index.bytes()
    }

    fn position(&self, key: &FlowKey<A>) -> Position {
        self.index.position(key.table_hash(self.seed))
    }

    /// Locks `slot` if it holds the session of `key`.
    fn verify(&self, slot: SlotId, key: &FlowKey<A>) -> Option<Locked<'_, A>> {
        let guard = self.slots.get(slot as usize)?.lock();
        let session = guard.as_ref()?;
        let from_client = if session.client_key() == *key {
            true
        } else if session.server_key() == *key {
            false
        } else {
            // A tag collision, or the slot was reused since the index was read.
            return None;
        };
        Some(Locked {
            guard,
            slot,
            from_client,
        })
    }

    /// Finds the session a packet with `key` belongs to and locks it.
    pub(crate) fn lookup(&self, key: &FlowKey<A>) -> Option<Locked<'_, A>> {
        let pos = self.position(key);
        if let Some(found) = self.index.probe(pos, |slot| self.verify(slot, key)) {
            return Some(found);
        }
        // The lock-free probe may have raced a writer moving entries: ask again, stably.
        let (candidates, n) = self.index.candidates(pos);
        candidates[..n]
            .iter()
            .find_map(|&slot| self.verify(slot, key))
    }

    /// Like `lookup`, lock-free only: a miss may be false while a writer moves entries. For
    /// callers that confirm a miss by other means (an insert, or `lookup`).
    pub(crate) fn lookup_fast(&self, key: &FlowKey<A>) -> Option<Locked<'_, A>> {
        self.index
            .probe(self.position(key), |slot| self.verify(slot, key))
    }

    /// Stores a new session under both its keys. On failure the session is handed back and
    /// the caller undoes what it did for it.
    pub(crate) fn insert(
        &self,
        mut data: SessionData<A>,
    ) -> Result<SlotId, (InsertError, Option<SessionData<A>>)> {
        let Some(slot) = self.free.lock().pop() else {
            return Err((InsertError::Full, Some(data)));
        };
        let client_key = data.client_key();
        let server_key = data.server_key();
        // The session is in its slot before any index entry points there, and no slot lock is
        // held while an index lock is taken (the index takes slot locks under its own). Until
        // it is linked, nobody else takes it out (see the module doc).
        data.linked = false;
        *self.slots[slot as usize].lock() = Some(data);
        let holds = |key: FlowKey<A>| {
            move |s: SlotId| {
                s != slot
                    && self.slots[s as usize]
                        .lock()
                        .as_ref()
                        .is_some_and(|d| d.client_key() == key || d.server_key() == key)
            }
        };
        let client_pos = self.position(&client_key);
        let result = self
            .index
            .insert(client_pos, slot, holds(client_key))
            .and_then(|()| {
                self.index
                    .insert(self.position(&server_key), slot, holds(server_key))
                    .inspect_err(|_| {
                        self.index.remove(client_pos, slot);
                    })
            });
        let mut guard = self.slots[slot as usize].lock();
        match result {
            Ok(()) => {
                if let Some(s) = guard.as_mut() {
                    // Counted before it is linked: nobody removes it (and uncounts it) before.
                    if s.tracked {
                        self.embryos_live.fetch_add(1, Ordering::Relaxed);
                    }
                    s.linked = true;
                }
                Ok(slot)
            }
            Err(e) => {
                // Nobody else takes an unlinked session: it is still in its slot.
                let data = guard.take();
                drop(guard);
                self.free.lock().push(slot);
                Err((e, data))
            }
        }
    }

    /// Takes a looked-up session out of the table, if it is linked; returns it.
    pub(crate) fn take(&self, mut locked: Locked<'_, A>) -> Option<SessionData<A>> {
        if !locked.guard.as_ref().is_some_and(|s| s.linked) {
            return None;
        }
        let data = locked.guard.take()?;
        let slot = locked.slot;
        // The slot lock goes before the index locks are taken (see `insert`).
        drop(locked);
        self.retire(slot, &data);
        Some(data)
    }

    /// Takes out the synced copy in `slot` (a session that conflicts with its owner's record);
    /// returns it. An owned session, or one not linked yet, stays.
    pub(crate) fn evict_synced(&self, slot: SlotId) -> Option<SessionData<A>> {
        let data = {
            let mut guard = self.slots.get(slot as usize)?.lock();
            if !guard.as_ref().is_some_and(|s| s.synced && s.linked) {
                return None;
            }
            guard.take()?
        };
        self.retire(slot, &data);
        Some(data)
    }

    /// Unlinks a session taken out of `slot` and frees the slot.
    fn retire(&self, slot: SlotId, data: &SessionData<A>) {
        if data.tracked {
            self.embryos_live.fetch_sub(1, Ordering::Relaxed);
        }
        self.index.remove(self.position(&data.client_key()), slot);
        self.index.remove(self.position(&data.server_key()), slot);
        self.free.lock().push(slot);
    }

    /// Examines up to `budget` slots from where the last sweep stopped and removes the sessions
    /// whose deadline has passed, unless `renew` gives a due session a new deadline (it returns
    /// true); bounded work per call whatever the table holds.
    pub(crate) fn expire(
        &self,
        now_secs: u64,
        budget: usize,
        mut renew: impl FnMut(&mut SessionData<A>) -> bool,
        mut on_expired: impl FnMut(SessionData<A>),
    ) -> usize {
        let n = self.slots.len();
        if n == 0 {
            return 0;
        }
        let budget = budget.min(n);
        let start = self.sweep.fetch_add(budget, Ordering::Relaxed) % n;
        let mut expired = 0;
        for k in 0..budget {
            let slot = (start + k) % n;
            let taken = {
                let mut guard = self.slots[slot].lock();
                let due = match guard.as_mut() {
                    Some(s) => s.linked && u64::from(s.expires) <= now_secs && !renew(s),
                    None => false,
                };
                if due { guard.take() } else { None }
            };
            if let Some(data) = taken {
                self.retire(slot as SlotId, &data);
                expired += 1;
                on_expired(data);
            }
        }
        expired
    }

    /// Takes out every linked session for which `pred` holds, handing each to `on_taken`;
    /// visits every slot once (takes each slot lock briefly).
    pub(crate) fn take_where(
        &self,
        pred: impl Fn(&SessionData<A>) -> bool,
        mut on_taken: impl FnMut(SessionData<A>),
    ) -> usize {
        let mut taken = 0;
        for (slot, cell) in self.slots.iter().enumerate() {
            let data = {
                let mut guard = cell.lock();
                if guard.as_ref().is_some_and(|s| s.linked && pred(s)) {
                    guard.take()
                } else {
                    None
                }
            };
            if let Some(data) = data {
                self.retire(slot as SlotId, &data);
                taken += 1;
                on_taken(data);
            }
        }
        taken
    }

    /// Calls `f` for every session (admin listings; takes each slot lock briefly).
    pub(crate) fn for_each(&self, mut f: impl FnMut(&SessionData<A>)) {
        for slot in self.slots.iter() {
            if let Some(s) = slot.lock().as_ref() {
                f(s);
            }
        }
    }
}

/// All sessions of a node, IPv4 and IPv6.
#[derive(Debug)]
pub(crate) struct SessionTable {
    pub(crate) v4: FamilyTable<Ipv4Addr>,
    pub(crate) v6: FamilyTable<Ipv6Addr>,
}

impl SessionTable {
    pub(crate) fn new(max_v4: u32, max_v6: u32, seed: u64) -> Self {
        SessionTable {
            v4: FamilyTable::new(max_v4, seed),
            v6: FamilyTable::new(max_v6, seed ^ 0x9e37_79b9_7f4a_7c15),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::SocketAddr;

    use proptest::prelude::*;

    use super::*;
    use crate::service::{DestStats, ServiceParams};
    use crate::tcp_state::Timeouts;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u16, u32),
        Remove(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u16..48, 0u32..1000).prop_map(|(k, s)| Op::Insert(k, s)),
            (0u16..48).prop_map(Op::Remove),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// The open-addressing index behaves as a map under any sequence of operations, with a
        /// capacity small enough that probe runs wrap around and backward shifts happen all the
        /// time, and with a hash of few bits so that keys share tags.
        #[test]
        fn prop_index_matches_hashmap(ops in proptest::collection::vec(op(), 1..300)) {
            let index = Index::new(16);
            let mut model: HashMap<u16, SlotId> = HashMap::new();
            // Key k's tag is shared by the keys 16 apart (three per tag, under the candidate
            // limit), so the key check matters; homes are spread over the whole capacity.
            let pos = |k: u16| index.position((u64::from(k % 16) * 0x1000_0001) << 32);
            let owner: std::cell::RefCell<HashMap<SlotId, u16>> = Default::default();
            for op in ops {
                match op {
                    Op::Insert(k, s) => {
                        let taken = owner.borrow().contains_key(&s);
                        if taken {
                            continue;
                        }
                        let r = index.insert(pos(k), s, |slot| owner.borrow().get(&slot) == Some(&k));
                        match model.get(&k) {
                            Some(&existing) => prop_assert_eq!(r, Err(InsertError::Exists(existing))),
                            None if model.len() >= index.limit => prop_assert_eq!(r, Err(InsertError::Full)),
                            None => {
                                prop_assert_eq!(r, Ok(()));
                                model.insert(k, s);
                                owner.borrow_mut().insert(s, k);
                            }
                        }
                    }
                    Op::Remove(k) => {
                        let expected = model.get(&k).copied();
                        // Removing under a slot no key holds must not remove anything.
                        prop_assert!(!index.remove(pos(k), 5000));
                        if let Some(s) = expected {
                            prop_assert!(index.remove(pos(k), s));
                        }
                        if let Some(s) = model.remove(&k) {
                            owner.borrow_mut().remove(&s);
                        }
                    }
                }
                for k in 0..48u16 {
                    let found = index.probe(pos(k), |slot| (owner.borrow().get(&slot) == Some(&k)).then_some(slot));
                    prop_assert_eq!(found, model.get(&k).copied());
                    let (c, n) = index.candidates(pos(k));
                    prop_assert_eq!(c[..n].iter().find(|&&slot| owner.borrow().get(&slot) == Some(&k)).copied(), model.get(&k).copied());
                }
            }
        }
    }

    fn dest() -> Arc<Dest> {
        Arc::new(Dest {
            addr: SocketAddr::from(([198, 18, 3, 10], 8080)),
            stats: Arc::new(DestStats::default()),
            params: Arc::new(ServiceParams {
                timeouts: Timeouts::default(),
                conn_reuse: Default::default(),
                syn_proxy: Default::default(),
                toa: false,
            }),
        })
    }

    /// Removes the session with this client-side key, as the engine does; returns it.
    fn remove(
        t: &FamilyTable<Ipv4Addr>,
        client_key: &FlowKey<Ipv4Addr>,
    ) -> Option<SessionData<Ipv4Addr>> {
        let locked = t.lookup(client_key)?;
        if !locked.from_client {
            return None;
        }
        t.take(locked)
    }

    fn session(n: u16, expires: u32) -> SessionData<Ipv4Addr> {
        SessionData {
            dest: dest(),
            expires,
            window: TcpWindow::new(),
            client: Ipv4Addr::new(198, 18, 1, 1),
            vip: Ipv4Addr::new(198, 18, 100, 1),
            lip: Ipv4Addr::new(198, 19, 200, 1),
            rs: Ipv4Addr::new(198, 18, 3, 10),
            cport: n,
            vport: 80,
            lport: 1024 + n,
            rport: 8080,
            state: FlowState::Tcp(TcpState::Established),
            synced: false,
            offloaded: Offloaded::No,
            mark: 0,
            linked: false,
            replied: true,
            tracked: false,
            proxy: Proxy::No,
        }
    }

    #[test]
    fn test_both_keys_reach_one_session() {
        let t = FamilyTable::new(8, 1);
        let s = session(1, 100);
        let (ck, sk) = (s.client_key(), s.server_key());
        t.insert(s).unwrap();
        assert!(t.lookup(&ck).unwrap().from_client);
        assert!(!t.lookup(&sk).unwrap().from_client);
        assert!(t.lookup(&ck.reversed()).is_none());
        assert_eq!(t.len(), 1);
        assert!(remove(&t, &sk).is_none(), "removal goes by the client key");
        assert!(remove(&t, &ck).is_some());
        assert!(t.lookup(&sk).is_none());
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn test_full_and_conflicting_inserts_leave_nothing_behind() {
        let t = FamilyTable::new(2, 1);
        t.insert(session(1, 100)).unwrap();
        let dup = t.insert(session(1, 100)).unwrap_err().0;
        assert!(matches!(dup, InsertError::Exists(_)));
        // Same client key, other server side: refused, and the server key is not left behind.
        let mut other = session(1, 100);
        other.lport = 9999;
        assert!(matches!(
            t.insert(other).unwrap_err().0,
            InsertError::Exists(_)
        ));
        let mut lport_clash = session(2, 100);
        lport_clash.lport = 1025;
        assert!(matches!(
            t.insert(lport_clash).unwrap_err().0,
            InsertError::Exists(_)
        ));
        assert!(t.lookup(&session(2, 100).client_key()).is_none());
        t.insert(session(3, 100)).unwrap();
        assert_eq!(t.insert(session(4, 100)).unwrap_err().0, InsertError::Full);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn test_expire_only_what_is_due_within_budget() {
        let t = FamilyTable::new(64, 1);
        for n in 0..64 {
            t.insert(session(n, if n % 2 == 0 { 10 } else { 20 }))
                .unwrap();
        }
        let mut seen = Vec::new();
        let mut total = 0;
        for _ in 0..8 {
            total += t.expire(15, 8, |_| false, |d| seen.push(d.cport));
        }
        assert_eq!(total, 32);
        assert!(seen.iter().all(|p| p % 2 == 0));
        assert_eq!(t.len(), 32);
        assert_eq!(t.expire(25, 1000, |_| false, |_| {}), 32);
        assert_eq!(t.len(), 0);
    }

    /// Sessions that are due the moment they are stored (a synced record with no time left),
    /// inserted from two threads while a third expires: every insert either stays or is taken
    /// out whole. After each round the index holds exactly the live sessions' keys; at the end
    /// the table fills to its capacity again.
    #[test]
    fn test_inserts_racing_expiry_leave_no_index_entry_behind() {
        const MAX: u32 = 8;
        let t = FamilyTable::new(MAX, 5);
        for round in 0..100 {
            std::thread::scope(|scope| {
                for base in [0u16, 1000] {
                    let t = &t;
                    scope.spawn(move || {
                        for n in 0..100_000u32 {
                            let _ = t.insert(session(base + (n % 200) as u16, 0));
                        }
                    });
                }
                let t = &t;
                scope.spawn(move || {
                    for _ in 0..100_000 {
                        t.expire(1, MAX as usize, |_| false, |_| {});
                    }
                });
            });
            t.expire(1, MAX as usize, |_| false, |_| {});
            assert_eq!(t.len(), 0);
            assert_eq!(
                t.index.len(),
                0,
                "index entries of no session, round {round}"
            );
        }
        for n in 0..MAX as u16 {
            t.insert(session(n, 100)).unwrap();
        }
        assert_eq!(t.index.len(), 2 * MAX as usize);
    }

    /// Two threads churn sessions while a third looks them up: a lookup returns either nothing
    /// or the session of the very key it asked for, never a reused slot's other flow.
    #[test]
    fn test_concurrent_churn_never_returns_a_foreign_session() {
        let t = FamilyTable::new(64, 3);
        std::thread::scope(|scope| {
            for base in [0u16, 1000] {
                let t = &t;
                scope.spawn(move || {
                    for round in 0..2000u16 {
                        let n = base + round % 100;
                        let s = session(n, 100);
                        let ck = s.client_key();
                        let _ = t.insert(s);
                        if round % 3 == 0 {
                            remove(t, &ck);
                        }
                    }
                });
            }
            let t = &t;
            scope.spawn(move || {
                for round in 0..20_000u16 {
                    let n = if round % 2 == 0 {
                        round % 100
                    } else {
                        1000 + round % 100
                    };
                    let s = session(n, 100);
                    for k in [s.client_key(), s.server_key()] {
                        if let Some(l) = t.lookup(&k) {
                            let got = l.guard.as_ref().unwrap();
                            assert!(got.client_key() == k || got.server_key() == k);
                        }
                    }
                }
            });
        });
        let mut live = 0;
        t.for_each(|_| live += 1);
        assert_eq!(live, t.len());
    }
}

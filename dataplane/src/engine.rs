//! The Full-NAT engine: `process(now, packet) -> Verdict`.
//!
//! Inbound (client → VIP): the flow is looked up by its client-side key; on a miss a TCP SYN or
//! a first UDP datagram opens a session (scheduler pick, local port allocation, one session under
//! both keys), and the packet leaves as LIP:lport → RS:rport. Outbound (RS → LIP): looked up by
//! the server-side key, it leaves as VIP:vport → client. Checksums are updated incrementally
//! (RFC 1624), or as a pseudo-header partial sum when the I/O layer hands the packet over with
//! checksum offload pending. ICMP errors about a known flow are translated in the outer and the
//! quoted header. Later fragments of a datagram follow its first fragment's translation
//! (`frag`); echo requests to a VIP are answered by the engine itself (`echo`). Everything else
//! is dropped under a named reason.
//!
//! The engine is sans-IO: it reads no clock and opens no socket. An [`Engine`] holds what all
//! workers share (session table, local addresses, the service snapshot); each packet worker owns
//! a [`Worker`] with its own counters and event buffer. Forwarding a packet of an established
//! flow takes no lock but the session's own and allocates nothing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::counters::{CounterTotals, Counters, DropReason, Event};
use crate::echo::{self, EchoLimiter};
use crate::family::Family;
use crate::frag::{FragKey, FragPos, Fragments};
use crate::laddr::{L4Proto, LocalAddr, LocalAddrError, LocalAddrPool};
use crate::offload::{FlowActivity, Offload, Offloaded};
use crate::service::{ConnReuse, Snapshot, SynProxy, TrafficSlotId};
use crate::session::{
    FamilyTable, FlowKey, FlowState, Held, InsertError, Locked, Opening, Proxy, SessionData,
    SessionEvent, SessionRecord, SessionTable,
};
use crate::synproxy::{self, CookieOpts, Cookies, PROXY_WSCALE};
use crate::tcp_state::{Direction, MAX_WSCALE, Segment, TcpFlags, TcpState, TcpWindow, Timeouts};
use crate::time::Instant;
use crate::wire::{
    self, Icmpv4Message, Icmpv4Packet, Icmpv6Message, Icmpv6Packet, IpProtocol, Ipv4Packet,
    Ipv6Packet, TcpOption, TcpOptions, TcpPacket, UdpPacket, checksum,
};

impl From<wire::Error> for DropReason {
    fn from(e: wire::Error) -> Self {
        match e {
            wire::Error::Truncated => DropReason::Truncated,
            wire::Error::Malformed => DropReason::Malformed,
        }
    }
}

/// What the I/O layer knows about a packet's L4 checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum L4Checksum {
    /// A complete checksum nobody has checked yet.
    #[default]
    Unverified,
    /// A complete checksum the kernel or the NIC has already verified.
    Verified,
    /// Checksum offload pending (virtio-net `NEEDS_CSUM`): the field holds the pseudo-header sum,
    /// not complemented, and whoever sends the packet completes it.
    Partial,
}

/// A packet in a buffer the engine may rewrite in place. The buffer may be longer than the
/// packet: the spare room lets the engine insert a TOA option into a SYN.
#[derive(Debug)]
pub struct Packet<'a> {
    buf: &'a mut [u8],
    len: usize,
    csum: L4Checksum,
}

impl<'a> Packet<'a> {
    /// `len` bytes of `buf` hold the packet (clamped to the buffer).
    pub fn new(buf: &'a mut [u8], len: usize, csum: L4Checksum) -> Self {
        let len = len.min(buf.len());
        Packet { buf, len, csum }
    }

    /// The packet as it is now (after `process`, as it must be sent).
    pub fn data(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn checksum_state(&self) -> L4Checksum {
        self.csum
    }
}

/// What to do with a processed packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send the (rewritten) packet on.
    Forward(Direction),
    /// Send the packet back where it came from: the engine answered it itself (an echo reply
    /// to a VIP). Over TUN this is the same write as a forward: the kernel routes it.
    Reply,
    Drop(DropReason),
}

/// What the IP layer did with a packet it did not drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handled {
    Forward(Direction),
    Reply,
}

/// Engine settings that are fixed for the life of the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Maximum IPv4 sessions; the table is allocated for this many up front.
    pub max_sessions_v4: u32,
    /// Maximum IPv6 sessions.
    pub max_sessions_v6: u32,
    /// Seed of the session-table hash. Pick it at random per node: flows cannot then be crafted
    /// to collide.
    pub table_seed: u64,
    /// This node's local addresses at start; ports are allocated on these only. At least one;
    /// [`Engine::set_local_addrs`] changes them later.
    pub local_addrs: Vec<IpAddr>,
    pub local_ports: RangeInclusive<u16>,
    /// Session events a worker buffers between two drains.
    pub event_capacity: usize,
    /// A peer's record keeps at most its state's timeout plus this much time: the grace session
    /// sync adds to the sessions a node sends (`sessionsync::Config::expiry_grace`).
    pub sync_grace: Duration,
    /// The secret of the SYN cookies: pick it at random per node.
    pub cookie_key: [u64; 2],
    /// Services with `syn_proxy = "auto"` answer SYNs with cookies while the node has at least
    /// this many flows of a family that never completed a handshake.
    pub syn_proxy_threshold: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_sessions_v4: 1 << 20,
            max_sessions_v6: 1 << 18,
            table_seed: 0x6c62_636c_7573_7472,
            local_addrs: Vec::new(),
            local_ports: LocalAddrPool::DEFAULT_PORTS,
            event_capacity: 4096,
            sync_grace: Duration::from_secs(60),
            cookie_key: [0x6c62_6373_796e_636b, 0x636f_6f6b_6965_7321],
            syn_proxy_threshold: 1024,
        }
    }
}

/// Sessions per address family, with each table's capacity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionCounts {
    pub v4: usize,
    pub v6: usize,
    pub v4_capacity: usize,
    pub v6_capacity: usize,
}

impl SessionCounts {
    /// Sessions of both families.
    pub fn total(&self) -> usize {
        self.v4 + self.v6
    }

    /// Capacity of both tables.
    pub fn capacity(&self) -> usize {
        self.v4_capacity + self.v6_capacity
    }
}

/// Why a session record from a peer was not applied (installed, or removed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InstallError {
    #[error("addresses of different families in one session")]
    FamilyMismatch,
    #[error("protocol and state disagree")]
    StateMismatch,
    #[error("TCP window tracking out of range (a window scale above 14)")]
    Window,
    #[error("no service {0} here")]
    UnknownService(SocketAddr),
    #[error("real server {0} is not one of the service's")]
    UnknownBackend(SocketAddr),
    #[error("LIP {0} is this node's own: only this node speaks for its flows")]
    OwnLip(IpAddr),
    #[error("LIP {0} is not this node's: the flow cannot be taken back as its own")]
    ForeignLip(IpAddr),
    #[error("the flow is this node's own: a peer's record does not change it")]
    Owned,
    #[error("local port {0} is held by another session")]
    LocalPortInUse(SocketAddr),
    #[error("another session holds one of the flow's keys")]
    Conflict,
    #[error("session table full")]
    TableFull,
}

impl InstallError {
    /// A stable name, for counters.
    pub fn name(self) -> &'static str {
        match self {
            InstallError::FamilyMismatch => "family_mismatch",
            InstallError::StateMismatch => "state_mismatch",
            InstallError::Window => "window",
            InstallError::UnknownService(_) => "unknown_service",
            InstallError::UnknownBackend(_) => "unknown_backend",
            InstallError::OwnLip(_) => "own_lip",
            InstallError::ForeignLip(_) => "foreign_lip",
            InstallError::Owned => "owned",
            InstallError::LocalPortInUse(_) => "local_port_in_use",
            InstallError::Conflict => "conflict",
            InstallError::TableFull => "table_full",
        }
    }
}

/// What installing a record did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    New,
    Updated,
}

/// Who speaks for a record a peer sent. Session sync decides it from the committed
/// configuration, which says which node owns each LIP; the engine applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authority {
    /// The sender owns the record's LIP: the record is the flow's truth. It replaces a synced
    /// copy that holds one of its keys (a stale copy of an earlier flow on the same LIP:port
    /// towards the same real server, or of the client's earlier connection), and marks the copy
    /// with `mark`, the owner's table stream under way (see [`Engine::reconcile`]).
    Owner { mark: u32 },
    /// The sender relays the flow of a node not connected here (a copy in a bulk answer, a flow
    /// the sender adopted): the record fills a gap or updates the copy of the same flow, and
    /// never replaces another session.
    Relay,
    /// A flow on this node's own LIP, handed back by a peer after this node restarted: it is
    /// installed as this node's own session (not synced), its local port reserved.
    Reclaim,
}

/// What all packet workers of a node share.
#[derive(Debug)]
pub struct Engine {
    table: SessionTable,
    /// Replaced whole when the node's LIPs change; kept LIPs share their port bitmaps.
    laddr: ArcSwap<LocalAddrPool>,
    snapshot: ArcSwap<Snapshot>,
    workers: Mutex<Vec<Arc<Counters>>>,
    event_capacity: usize,
    /// The faster path established flows are handed to, once the node has one.
    offload: OnceLock<Arc<dyn Offload>>,
    sync_grace: Duration,
    cookies: Cookies,
    /// One more than the cookie time slot in which a SYN cookie was last sent (0: never): an ACK
    /// can prove a cookie only while one of the last two slots sent some.
    cookie_slot: AtomicU64,
    syn_proxy_threshold: usize,
    /// `auto` stays engaged until this second (see [`AUTO_HOLD`]).
    auto_until: AtomicU64,
    /// Datagrams whose later fragments follow their first (see `frag`).
    fragments: Fragments,
    /// Echo replies to VIPs (see `echo`).
    echo: EchoLimiter,
}

/// How long `syn_proxy = "auto"` keeps answering with cookies after the half-open flows last
/// passed the threshold: without it, a client whose SYN got a cookie could have its
/// retransmitted SYN go to the real server as the count dips, and two handshakes would cross.
const AUTO_HOLD: Duration = Duration::from_secs(10);

impl Engine {
    pub fn new(config: EngineConfig, snapshot: Snapshot) -> Result<Arc<Engine>, LocalAddrError> {
        let laddr = LocalAddrPool::new(&config.local_addrs, config.local_ports.clone())?;
        Ok(Arc::new(Engine {
            table: SessionTable::new(
                config.max_sessions_v4,
                config.max_sessions_v6,
                config.table_seed,
            ),
            laddr: ArcSwap::from_pointee(laddr),
            snapshot: ArcSwap::from_pointee(snapshot),
            workers: Mutex::new(Vec::new()),
            event_capacity: config.event_capacity,
            offload: OnceLock::new(),
            sync_grace: config.sync_grace,
            cookies: Cookies::new(config.cookie_key),
            cookie_slot: AtomicU64::new(0),
            auto_until: AtomicU64::new(0),
            syn_proxy_threshold: config.syn_proxy_threshold,
            fragments: Fragments::new(config.table_seed),
            echo: EchoLimiter::new(),
        }))
    }

    /// Whether `syn_proxy = "auto"` answers with cookies now: while the node's half-open flows
    /// of the family number at least the threshold, and [`AUTO_HOLD`] after.
    fn auto_engaged<A: Family>(&self, table: &FamilyTable<A>, now_s: u64) -> bool {
        if table.embryonic_flows() >= self.syn_proxy_threshold {
            let until = now_s + AUTO_HOLD.as_secs();
            if self.auto_until.load(Ordering::Relaxed) < until {
                self.auto_until.store(until, Ordering::Relaxed);
            }
            return true;
        }
        now_s < self.auto_until.load(Ordering::Relaxed)
    }

    /// Hands established flows to `offload` from now on (see [`crate::offload`]); set once, a
    /// later call is refused (false).
    pub fn set_offload(&self, offload: Arc<dyn Offload>) -> bool {
        self.offload.set(offload).is_ok()
    }

    /// Swaps in a new service snapshot; packets in flight finish with the old one.
    pub fn set_snapshot(&self, snapshot: Snapshot) {
        self.snapshot.store(Arc::new(snapshot));
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// A new packet worker with its own counters.
    pub fn worker(self: &Arc<Self>) -> Worker {
        let counters = Arc::new(Counters::default());
        let traffic_slot = {
            let mut workers = self.workers.lock();
            workers.push(counters.clone());
            TrafficSlotId::for_worker(workers.len() - 1)
        };
        Worker {
            engine: self.clone(),
            counters,
            traffic_slot,
            events: Vec::with_capacity(self.event_capacity),
        }
    }

    /// The sum of every worker's counters.
    pub fn counters(&self) -> CounterTotals {
        let mut total = CounterTotals::default();
        for c in self.workers.lock().iter() {
            c.add_into(&mut total);
        }
        total
    }

    /// The local addresses as they are now.
    pub fn local_addrs(&self) -> Arc<LocalAddrPool> {
        self.laddr.load_full()
    }

    /// Replaces the node's local addresses (LIPs), same port range. A LIP kept keeps its ports
    /// in use; the sessions of a LIP removed go on until they end and then free their port
    /// harmlessly; a LIP added starts with every port free (see [`LocalAddrPool::with_lips`]).
    /// An empty list is accepted, for a node the cluster has not given LIPs (yet): new flows
    /// then drop as [`DropReason::NoLocalPort`]. On error nothing changes.
    pub fn set_local_addrs(&self, lips: &[IpAddr]) -> Result<(), LocalAddrError> {
        let mut current = self.laddr.load_full();
        loop {
            let next = Arc::new(current.with_lips(lips)?);
            // Built from `current`: a concurrent change in between would have its retired LIPs
            // lost, so build again from whatever won.
            let seen = self.laddr.compare_and_swap(&current, next);
            if Arc::ptr_eq(&seen, &current) {
                return Ok(());
            }
            current = arc_swap::Guard::into_inner(seen);
        }
    }

    /// Sessions held now, IPv4 and IPv6.
    pub fn session_count(&self) -> usize {
        self.session_counts().total()
    }

    /// Sessions held and the table's capacity, per address family.
    pub fn session_counts(&self) -> SessionCounts {
        SessionCounts {
            v4: self.table.v4.len(),
            v6: self.table.v6.len(),
            v4_capacity: self.table.v4.capacity(),
            v6_capacity: self.table.v6.capacity(),
        }
    }

    /// Bytes the session tables take (IPv4, IPv6), allocated up front for their maximum.
    pub fn session_table_bytes(&self) -> (usize, usize) {
        (self.table.v4.bytes(), self.table.v6.bytes())
    }

    /// Every session, for listings. Takes each slot lock briefly; not for the packet path.
    pub fn sessions(&self, now: Instant) -> Vec<SessionRecord> {
        let now_s = now.as_secs();
        let mut out = Vec::with_capacity(self.session_count());
        self.table.v4.for_each(|s| out.push(s.record(now_s)));
        self.table.v6.for_each(|s| out.push(s.record(now_s)));
        out
    }

    /// Installs (or refreshes) a session received from a peer, so that packets of that flow are
    /// forwarded here with the same local address, port and real server. Emits no event.
    ///
    /// The record is checked first: consistent addresses and state, TCP tracking in range
    /// ([`TcpWindow::is_valid`]), a service here with the record's VIP and, for a new session,
    /// the record's real server among the service's (a copy this node already holds keeps its
    /// real server after the configuration dropped it, as a session this node created does);
    /// its remaining time is capped at its state's timeout plus [`EngineConfig::sync_grace`].
    /// Then `authority` decides what it may change; a session this node owns (not synced) is
    /// never changed by a peer's record.
    pub fn install(
        &self,
        now: Instant,
        rec: &SessionRecord,
        authority: Authority,
    ) -> Result<Installed, InstallError> {
        match (
            rec.client.ip(),
            rec.vip.ip(),
            rec.local.ip(),
            rec.backend.ip(),
        ) {
            (IpAddr::V4(_), IpAddr::V4(_), IpAddr::V4(_), IpAddr::V4(_)) => {
                self.install_in::<Ipv4Addr>(now, rec, authority)
            }
            (IpAddr::V6(_), IpAddr::V6(_), IpAddr::V6(_), IpAddr::V6(_)) => {
                self.install_in::<Ipv6Addr>(now, rec, authority)
            }
            _ => Err(InstallError::FamilyMismatch),
        }
    }

    fn install_in<A: Family>(
        &self,
        now: Instant,
        rec: &SessionRecord,
        authority: Authority,
    ) -> Result<Installed, InstallError> {
        let consistent = matches!(
            (rec.proto, rec.state),
            (L4Proto::Udp, FlowState::Udp) | (L4Proto::Tcp, FlowState::Tcp(_))
        ) && rec.state != FlowState::Tcp(TcpState::None);
        if !consistent {
            return Err(InstallError::StateMismatch);
        }
        if !rec.window.is_valid() {
            return Err(InstallError::Window);
        }
        let ip = |a: SocketAddr| A::from_ip(a.ip()).ok_or(InstallError::FamilyMismatch);
        let (client, vip, lip, rs) = (
            ip(rec.client)?,
            ip(rec.vip)?,
            ip(rec.local)?,
            ip(rec.backend)?,
        );
        let laddr = self.laddr.load();
        let ours = laddr.is_local(rec.local.ip());
        match authority {
            Authority::Reclaim if !ours => return Err(InstallError::ForeignLip(rec.local.ip())),
            Authority::Owner { .. } | Authority::Relay if ours => {
                return Err(InstallError::OwnLip(rec.local.ip()));
            }
            _ => {}
        }
        let snap = self.snapshot.load();
        let svc = snap
            .service(rec.proto, rec.vip)
            .ok_or(InstallError::UnknownService(rec.vip))?;
        let now_s = now.as_secs();
        let cap =
            timeout_secs(rec.state, &svc.params.timeouts).saturating_add(self.sync_grace.as_secs());
        let expires = deadline(now_s, u64::from(rec.expires_in_secs).min(cap));
        let table = A::table(&self.table);
        let key = FlowKey {
            src: client,
            dst: vip,
            sport: rec.client.port(),
            dport: rec.vip.port(),
            proto: rec.proto.number(),
        };
        let same_flow = |s: &SessionData<A>| {
            s.rs == rs
                && s.rport == rec.backend.port()
                && s.lip == lip
                && s.lport == rec.local.port()
        };
        let dest = svc.dest_by_addr(rec.backend).cloned();
        let mut evicted = 0;
        if let Some(mut locked) = table.lookup(&key) {
            let from_client = locked.from_client;
            let Some(s) = locked.guard.as_mut() else {
                return Err(InstallError::Conflict);
            };
            if !s.synced {
                return Err(InstallError::Owned);
            }
            if from_client && same_flow(s) {
                s.dest
                    .stats
                    .moved(s.state.is_active(), rec.state.is_active());
                s.state = rec.state;
                s.window = rec.window;
                s.expires = expires;
                if let Some(delta) = rec.syn_proxy {
                    s.proxy = Proxy::Joined { delta };
                }
                if let Authority::Owner { mark } = authority {
                    s.mark = mark;
                }
                if let Some(offload) = self.offload.get() {
                    follow_offload(&**offload, s);
                }
                return Ok(Installed::Updated);
            }
            // Another flow holds the key: the copy of the client's earlier connection, say.
            if !(from_client && matches!(authority, Authority::Owner { .. })) {
                return Err(InstallError::Conflict);
            }
            if dest.is_none() {
                return Err(InstallError::UnknownBackend(rec.backend));
            }
            let mut old = table.take(locked).ok_or(InstallError::Conflict)?;
            self.release(&mut old);
            evicted += 1;
        }
        let dest = dest.ok_or(InstallError::UnknownBackend(rec.backend))?;
        let local = LocalAddr {
            ip: rec.local.ip(),
            port: rec.local.port(),
        };
        if ours && !laddr.reserve(rec.proto, local) {
            return Err(InstallError::LocalPortInUse(rec.local));
        }
        let (synced, mark) = match authority {
            Authority::Owner { mark } => (true, mark),
            Authority::Relay => (true, 0),
            Authority::Reclaim => (false, 0),
        };
        let mut data = SessionData {
            dest: dest.clone(),
            expires,
            window: rec.window,
            client,
            vip,
            lip,
            rs,
            cport: rec.client.port(),
            vport: rec.vip.port(),
            lport: rec.local.port(),
            rport: rec.backend.port(),
            state: rec.state,
            synced,
            mark,
            linked: false,
            offloaded: Offloaded::No,
            replied: true,
            tracked: false,
            proxy: rec
                .syn_proxy
                .map_or(Proxy::No, |delta| Proxy::Joined { delta }),
        };
        // A flow that moved here is offloaded like one of this node's own.
        let offload = self.offload.get();
        if let Some(offload) = offload {
            follow_offload(&**offload, &mut data);
        }
        let flow = (data.offloaded == Offloaded::Yes).then(|| data.offload_flow());
        // Counted before the insert so that a removal racing it balances the count.
        dest.stats.opened(rec.state.is_active());
        let error = loop {
            match table.insert(data) {
                Ok(_) => return Ok(Installed::New),
                // The owner's record wins over a synced copy that holds its server-side key (a
                // stale copy of an earlier flow on this LIP:port): the copy goes. Two keys, so
                // at most two copies can stand in the way.
                Err((InsertError::Exists(slot), Some(back)))
                    if matches!(authority, Authority::Owner { .. }) && evicted < 2 =>
                {
                    match table.evict_synced(slot) {
                        Some(mut old) => {
                            self.release(&mut old);
                            evicted += 1;
                            data = back;
                        }
                        None => break InstallError::Conflict,
                    }
                }
                Err((InsertError::Full, _)) => break InstallError::TableFull,
                Err((InsertError::Exists(_), _)) => break InstallError::Conflict,
            }
        };
        if let (Some(offload), Some(flow)) = (offload, flow) {
            offload.withdraw(&flow);
        }
        dest.stats.closed(rec.state.is_active());
        if ours {
            laddr.release(rec.proto, local);
        }
        Err(error)
    }

    /// Removes the synced copy of a flow that ended on the peer that sent `rec`: true if it was
    /// here. A session this node owns stays (and is refused as [`InstallError::Owned`]); so does
    /// a copy of another flow under the same client-side key. Emits no event.
    pub fn remove(&self, rec: &SessionRecord) -> Result<bool, InstallError> {
        match (
            rec.client.ip(),
            rec.vip.ip(),
            rec.local.ip(),
            rec.backend.ip(),
        ) {
            (IpAddr::V4(_), IpAddr::V4(_), IpAddr::V4(_), IpAddr::V4(_)) => {
                self.remove_in::<Ipv4Addr>(rec)
            }
            (IpAddr::V6(_), IpAddr::V6(_), IpAddr::V6(_), IpAddr::V6(_)) => {
                self.remove_in::<Ipv6Addr>(rec)
            }
            _ => Err(InstallError::FamilyMismatch),
        }
    }

    fn remove_in<A: Family>(&self, rec: &SessionRecord) -> Result<bool, InstallError> {
        let ip = |a: SocketAddr| A::from_ip(a.ip()).ok_or(InstallError::FamilyMismatch);
        let key = FlowKey {
            src: ip(rec.client)?,
            dst: ip(rec.vip)?,
            sport: rec.client.port(),
            dport: rec.vip.port(),
            proto: rec.proto.number(),
        };
        let (lip, rs) = (ip(rec.local)?, ip(rec.backend)?);
        let table = A::table(&self.table);
        let Some(locked) = table.lookup(&key) else {
            return Ok(false);
        };
        let Some(s) = locked.guard.as_ref() else {
            return Ok(false);
        };
        if !s.synced {
            return Err(InstallError::Owned);
        }
        let same_flow = locked.from_client
            && s.lip == lip
            && s.lport == rec.local.port()
            && s.rs == rs
            && s.rport == rec.backend.port();
        if !same_flow {
            return Ok(false);
        }
        match table.take(locked) {
            Some(mut data) => {
                self.release(&mut data);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Drops the synced copies on `lips` (one node's LIPs) that are not marked `mark`: what is
    /// left of that node's flows here once its table stream `mark` has arrived complete, which
    /// marked every flow it holds (see [`Authority::Owner`]). Copies not confirmed by it are
    /// flows its owner no longer has: their removal was lost (a disconnect, an overflowing
    /// queue, a full event inbox). Returns how many went. Visits every slot; not for the packet
    /// path. Emits no event.
    pub fn reconcile(&self, lips: &[IpAddr], mark: u32) -> usize {
        let v4: Vec<Ipv4Addr> = lips
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V4(a) => Some(*a),
                IpAddr::V6(_) => None,
            })
            .collect();
        let v6: Vec<Ipv6Addr> = lips
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V6(a) => Some(*a),
                IpAddr::V4(_) => None,
            })
            .collect();
        self.reconcile_in(&self.table.v4, &v4, mark) + self.reconcile_in(&self.table.v6, &v6, mark)
    }

    fn reconcile_in<A: Family>(
        &self,
        table: &crate::session::FamilyTable<A>,
        lips: &[A],
        mark: u32,
    ) -> usize {
        if lips.is_empty() {
            return 0;
        }
        table.take_where(
            |s| s.synced && s.mark != mark && lips.contains(&s.lip),
            |mut data| self.release(&mut data),
        )
    }

    /// Returns what a removed session held: its entry in the faster path (folding in what that
    /// saw), its local port and its place in the counters.
    fn release<A: Family>(&self, data: &mut SessionData<A>) {
        if let Some(offload) = self.offload.get() {
            withdraw(&**offload, data);
        }
        data.dest.stats.closed(data.state.is_active());
        self.laddr.load().release(
            data.proto(),
            LocalAddr {
                ip: data.lip.to_ip(),
                port: data.lport,
            },
        );
    }
}

/// A deadline in whole seconds, saturating at what a session can store.
impl Engine {
    /// A due session the faster path forwards is alive if it saw a packet within the state's
    /// timeout: it gets its deadline from that packet (true) instead of expiring.
    fn renew_offloaded<A: Family>(&self, s: &mut SessionData<A>, now_s: u64) -> bool {
        let Some(offload) = self.offload.get() else {
            return false;
        };
        if s.offloaded != Offloaded::Yes {
            return false;
        }
        let Some(seen) = offload.activity(&s.offload_flow()) else {
            return false;
        };
        let Some(last) = seen.iter().filter_map(|side| side.last_seen).max() else {
            return false;
        };
        let expires = deadline(
            last.as_secs(),
            timeout_secs(s.state, &s.dest.params.timeouts),
        );
        if u64::from(expires) <= now_s {
            return false;
        }
        s.expires = expires;
        true
    }
}

/// Whether the faster path may forward a session in `state` (see [`crate::offload`]): a UDP
/// flow from its second datagram on, an established TCP flow.
fn offloadable(state: FlowState) -> bool {
    matches!(
        state,
        FlowState::Udp | FlowState::Tcp(TcpState::Established)
    )
}

/// Offloads `s` when it becomes offloadable, withdraws it when it stops being so.
fn follow_offload<A: Family>(offload: &dyn Offload, s: &mut SessionData<A>) {
    match (s.offloaded, offloadable(s.state)) {
        // The faster path does not shift sequence numbers: a proxied flow stays here.
        (Offloaded::No, true) if matches!(s.proxy, Proxy::No) => {
            s.offloaded = if offload.offload(&s.offload_flow()) {
                Offloaded::Yes
            } else {
                Offloaded::Refused
            };
        }
        (Offloaded::Yes, false) => withdraw(offload, s),
        _ => {}
    }
}

/// Takes `s` back from the faster path, folding in what it saw.
fn withdraw<A: Family>(offload: &dyn Offload, s: &mut SessionData<A>) {
    if s.offloaded != Offloaded::Yes {
        return;
    }
    s.offloaded = Offloaded::No;
    if let Some(seen) = offload.withdraw(&s.offload_flow()) {
        for (dir, side) in [
            (Direction::Inbound, &seen[0]),
            (Direction::Outbound, &seen[1]),
        ] {
            s.dest
                .stats
                .count_many(TrafficSlotId::SHARED, dir, side.packets, side.bytes);
        }
        merge_windows(s, &seen);
    }
}

/// Folds the TCP window edges the faster path saw into `s`.
fn merge_windows<A: Family>(s: &mut SessionData<A>, seen: &FlowActivity) {
    if let FlowState::Tcp(_) = s.state {
        for (dir, side) in [
            (Direction::Inbound, &seen[0]),
            (Direction::Outbound, &seen[1]),
        ] {
            if side.packets > 0 {
                s.window.merge(dir, side.seq_end, side.max_win);
            }
        }
    }
}

fn deadline(now_s: u64, secs: u64) -> u32 {
    u32::try_from(now_s.saturating_add(secs)).unwrap_or(u32::MAX)
}

/// How long a session lives without a packet: its state's timeout; for a UDP flow that has not
/// had a reply, at most [`UDP_UNREPLIED`] (as conntrack does), so that spoofed datagrams hold
/// their ports briefly. (A flow the faster path carries lives by the packets it saw there.)
fn session_timeout<A: Family>(s: &SessionData<A>) -> u64 {
    let secs = timeout_secs(s.state, &s.dest.params.timeouts);
    if s.replied {
        secs
    } else {
        secs.min(UDP_UNREPLIED.as_secs())
    }
}

/// The longest a UDP flow lives without a reply from its real server.
pub const UDP_UNREPLIED: Duration = Duration::from_secs(30);

fn timeout_secs(state: FlowState, t: &Timeouts) -> u64 {
    match state {
        FlowState::Udp => t.udp.as_secs(),
        FlowState::Tcp(s) => t.tcp(s).as_secs(),
    }
}

/// Buffers a session event. Never grows the buffer on the packet path; session sync recovers
/// lost events through its periodic refresh.
fn emit(events: &mut Vec<SessionEvent>, counters: &Counters, event: SessionEvent) {
    if events.len() < events.capacity() {
        events.push(event);
    } else {
        counters.count(Event::EventsLost);
    }
}

/// The IP layer of a packet being processed.
#[derive(Debug, Clone, Copy)]
struct L3<A> {
    src: A,
    dst: A,
    /// Start and end of the L4 header and payload in the buffer.
    l4_start: usize,
    l4_end: usize,
    /// A fragment: the L4 header, if here, heads a longer datagram (see `frag`).
    fragment: bool,
}

/// The TCP fields the engine tracks.
#[derive(Debug, Clone, Copy)]
struct TcpInfo {
    flags: TcpFlags,
    segment: Segment,
}

impl TcpInfo {
    // Inlined so the result stays in registers: returned through memory, it was written field
    // by field and read back whole, a store-forwarding stall on every packet.
    #[inline(always)]
    fn parse<T: AsRef<[u8]>>(t: &TcpPacket<T>) -> Result<TcpInfo, DropReason> {
        let flags = TcpFlags {
            syn: t.syn(),
            ack: t.ack(),
            fin: t.fin(),
            rst: t.rst(),
        };
        let mut wscale = None;
        if flags.syn {
            for opt in TcpOptions::new(t.options()) {
                match opt? {
                    // RFC 7323 §2.3: a shift count above 14 is taken as 14.
                    TcpOption::WindowScale(w) => wscale = Some(w.min(MAX_WSCALE)),
                    TcpOption::EndOfList => break,
                    _ => {}
                }
            }
        }
        let segment = Segment {
            flags,
            seq: t.seq_number(),
            ack: t.ack_number(),
            len: u32::try_from(t.segment_len()).unwrap_or(u32::MAX),
            window: t.window_len(),
            wscale,
        };
        Ok(TcpInfo { flags, segment })
    }
}

/// How hard to look for a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lookup {
    /// Lock-free only; may miss while a writer moves index entries.
    Fast,
    /// Confirms a miss under the index lock.
    Stable,
}

/// The new addresses and ports of a translated packet.
#[derive(Debug, Clone, Copy)]
struct Rewrite<A> {
    src: A,
    sport: u16,
    dst: A,
    dport: u16,
    dir: Direction,
    /// Insert a TOA option carrying this client address and port (new SYNs only).
    toa: Option<(A, u16)>,
    /// The sequence-number shift of a flow the SYN proxy joined.
    shift: Option<Shift>,
}

/// What becomes of a packet of a known or a new flow.
#[derive(Debug, Clone, Copy)]
enum Outcome<A> {
    /// Translated with these addresses and ports.
    Rewrite(Rewrite<A>),
    /// The SYN proxy wrote a segment of its own over it: send it that way.
    Built(Direction),
    Drop(DropReason),
}

/// How the packets of a proxied flow are shifted (see [`crate::synproxy`]): the real server's
/// sequence numbers are the client's view plus `delta`, and windows are rescaled where the two
/// sides' window scales differ from what each was told.
#[derive(Debug, Clone, Copy)]
struct Shift {
    delta: u32,
    /// Windows from the real server, from its scale to the proxy's.
    outbound_window: Option<(u8, u8)>,
    /// Windows from the client, from its scale to none (a real server that did not scale).
    inbound_window: Option<(u8, u8)>,
}

impl Shift {
    fn new(delta: u32, window: &TcpWindow) -> Shift {
        let client = window.offered_wscale(Direction::Inbound);
        let server = window.offered_wscale(Direction::Outbound);
        match client {
            // The client offered no scaling: nobody scales.
            None => Shift {
                delta,
                outbound_window: None,
                inbound_window: None,
            },
            Some(client) => Shift {
                delta,
                outbound_window: Some((server.unwrap_or(0), PROXY_WSCALE))
                    .filter(|(from, to)| from != to),
                inbound_window: server
                    .is_none()
                    .then_some((client, 0))
                    .filter(|(f, _)| *f != 0),
            },
        }
    }
}

/// One packet worker: processes packets, buffers session events, sweeps expired sessions.
#[derive(Debug)]
pub struct Worker {
    engine: Arc<Engine>,
    counters: Arc<Counters>,
    /// Where this worker counts per-real-server traffic.
    traffic_slot: TrafficSlotId,
    events: Vec<SessionEvent>,
}

impl Worker {
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Processes one packet in place.
    pub fn process(&mut self, now: Instant, pkt: &mut Packet<'_>) -> Verdict {
        let result = match pkt.data().first().map(|b| b >> 4) {
            Some(4) => self.ipv4(now, pkt),
            Some(6) => self.ipv6(now, pkt),
            Some(_) => Err(DropReason::Malformed),
            None => Err(DropReason::Truncated),
        };
        match result {
            Ok(Handled::Forward(dir)) => {
                self.counters.count(match dir {
                    Direction::Inbound => Event::ForwardedInbound,
                    Direction::Outbound => Event::ForwardedOutbound,
                });
                Verdict::Forward(dir)
            }
            Ok(Handled::Reply) => Verdict::Reply,
            Err(reason) => {
                self.counters.dropped(reason);
                Verdict::Drop(reason)
            }
        }
    }

    /// Processes a batch; `verdicts[i]` is the verdict of `batch[i]`.
    pub fn process_batch(
        &mut self,
        now: Instant,
        batch: &mut [Packet<'_>],
        verdicts: &mut [Verdict],
    ) {
        for (pkt, verdict) in batch.iter_mut().zip(verdicts.iter_mut()) {
            *verdict = self.process(now, pkt);
        }
    }

    /// Session events since the last drain (created, state changed, closed).
    pub fn drain_events(&mut self) -> std::vec::Drain<'_, SessionEvent> {
        self.events.drain(..)
    }

    /// Removes expired sessions, examining at most `budget` slots per address family.
    pub fn expire(&mut self, now: Instant, budget: usize) -> usize {
        let now_s = now.as_secs();
        let engine = self.engine.clone();
        let mut n = engine.table.v4.expire(
            now_s,
            budget,
            |s| engine.renew_offloaded(s, now_s),
            |d| self.expired(&engine, d, now_s),
        );
        n += engine.table.v6.expire(
            now_s,
            budget,
            |s| engine.renew_offloaded(s, now_s),
            |d| self.expired(&engine, d, now_s),
        );
        self.counters.add(Event::SessionsExpired, n as u64);
        n
    }

    fn expired<A: Family>(&mut self, engine: &Engine, mut data: SessionData<A>, now_s: u64) {
        engine.release(&mut data);
        emit(
            &mut self.events,
            &self.counters,
            SessionEvent::Closed(data.record(now_s)),
        );
    }

    fn ipv4(&mut self, now: Instant, pkt: &mut Packet<'_>) -> Result<Handled, DropReason> {
        let ip = Ipv4Packet::new_checked(pkt.data())?;
        if !ip.verify_checksum() {
            return Err(DropReason::BadChecksum);
        }
        if ip.has_options() {
            return Err(DropReason::IpOptions);
        }
        let l3 = L3 {
            src: ip.src_addr(),
            dst: ip.dst_addr(),
            l4_start: usize::from(ip.header_len()),
            l4_end: usize::from(ip.total_len()),
            fragment: ip.is_fragment(),
        };
        let proto = ip.next_header();
        let ident = u32::from(ip.ident());
        let pos = FragPos {
            offset: u32::from(ip.frag_offset()),
            len: u32::from(ip.total_len() - u16::from(ip.header_len())),
            more: ip.more_frags(),
        };
        // Link-layer padding past the IP datagram is not forwarded.
        pkt.len = l3.l4_end;
        if l3.fragment {
            return self.fragment(now, pkt, l3, proto, ident, pos);
        }
        match proto {
            IpProtocol::Tcp | IpProtocol::Udp => {
                self.translate(now, pkt, l3, proto).map(Handled::Forward)
            }
            IpProtocol::Icmp => self.icmpv4(now, pkt, l3),
            _ => Err(DropReason::UnsupportedProtocol),
        }
    }

    fn ipv6(&mut self, now: Instant, pkt: &mut Packet<'_>) -> Result<Handled, DropReason> {
        let ip = Ipv6Packet::new_checked(pkt.data())?;
        let upper = ip.upper_layer()?;
        // An atomic fragment (offset 0, no more) is a whole datagram (RFC 6946).
        let frag = upper.fragment.filter(|f| f.offset != 0 || f.more);
        let l3 = L3 {
            src: ip.src_addr(),
            dst: ip.dst_addr(),
            l4_start: upper.offset,
            l4_end: 40 + usize::from(ip.payload_len()),
            fragment: frag.is_some(),
        };
        pkt.len = l3.l4_end;
        if let Some(f) = frag {
            let pos = FragPos {
                offset: u32::from(f.offset),
                // Bytes after the Fragment header; for a first fragment, after the headers
                // that follow it too (an entry then lives until it expires: harmless).
                len: u32::try_from(l3.l4_end.saturating_sub(l3.l4_start)).unwrap_or(u32::MAX),
                more: f.more,
            };
            return self.fragment(now, pkt, l3, upper.protocol, f.ident, pos);
        }
        match upper.protocol {
            IpProtocol::Tcp | IpProtocol::Udp => self
                .translate(now, pkt, l3, upper.protocol)
                .map(Handled::Forward),
            IpProtocol::Icmpv6 => self.icmpv6(now, pkt, l3),
            _ => Err(DropReason::UnsupportedProtocol),
        }
    }

    /// A fragment (see `frag`): the first is translated like its flow's packets and tracked,
    /// later ones get the addresses their first got.
    fn fragment<A: Family>(
        &mut self,
        now: Instant,
        pkt: &mut Packet<'_>,
        l3: L3<A>,
        proto: IpProtocol,
        ident: u32,
        pos: FragPos,
    ) -> Result<Handled, DropReason> {
        if !matches!(proto, IpProtocol::Tcp | IpProtocol::Udp) {
            return Err(DropReason::Fragment);
        }
        let key = FragKey {
            src: l3.src,
            dst: l3.dst,
            proto: u8::from(proto),
            ident,
        };
        let engine = self.engine.clone();
        let table = A::fragments(&engine.fragments);
        if pos.offset != 0 {
            let follow = table.lock().follow(&key, pos, now)?;
            rewrite_addrs(pkt.buf, &l3, follow.src, follow.dst);
            self.counters.count(Event::FragmentsFollowed);
            return Ok(Handled::Forward(follow.dir));
        }
        if !table.lock().has_room(&key, now) {
            return Err(DropReason::FragmentTableFull);
        }
        let dir = match self.translate(now, pkt, l3, proto) {
            // Too short for the ports: nothing to follow.
            Err(DropReason::Truncated) => return Err(DropReason::Fragment),
            other => other?,
        };
        let follow = crate::frag::Follow {
            src: A::from_slice(&pkt.buf[A::SRC_OFF..]),
            dst: A::from_slice(&pkt.buf[A::DST_OFF..]),
            dir,
        };
        table.lock().track(key, pos, follow, now)?;
        self.counters.count(Event::FragmentsTracked);
        Ok(Handled::Forward(dir))
    }

    fn translate<A: Family>(
        &mut self,
        now: Instant,
        pkt: &mut Packet<'_>,
        l3: L3<A>,
        ip_proto: IpProtocol,
    ) -> Result<Direction, DropReason> {
        let l4 = pkt
            .buf
            .get(l3.l4_start..l3.l4_end)
            .ok_or(DropReason::Truncated)?;
        let (proto, sport, dport, tcp) = if ip_proto == IpProtocol::Tcp {
            let t = TcpPacket::new_checked(l4)?;
            (
                L4Proto::Tcp,
                t.src_port(),
                t.dst_port(),
                Some(TcpInfo::parse(&t)?),
            )
        } else {
            // A first fragment holds the header of a datagram longer than itself.
            let u = if l3.fragment && l4.len() >= wire::udp::HEADER_LEN {
                UdpPacket::new_unchecked(l4)
            } else {
                UdpPacket::new_checked(l4)?
            };
            // RFC 8200: a zero UDP checksum is invalid over IPv6.
            if A::IS_V6 && u.checksum() == 0 {
                return Err(DropReason::BadChecksum);
            }
            (L4Proto::Udp, u.src_port(), u.dst_port(), None)
        };
        let key = FlowKey {
            src: l3.src,
            dst: l3.dst,
            sport,
            dport,
            proto: proto.number(),
        };
        let now_s = now.as_secs();
        let outcome = match self.established(now_s, &key, pkt, &l3, tcp, Lookup::Fast) {
            Some(outcome) => outcome,
            None => match self.new_flow(now_s, pkt, &l3, key, proto, tcp) {
                Ok(outcome) => outcome,
                // The fast lookup may have missed a session a writer was moving: before a
                // packet is refused for having none, look again under the index lock. (A packet
                // that opens a flow needs no second look: its insert finds an existing session.)
                Err(
                    reason
                    @ (DropReason::NoSession | DropReason::NoService | DropReason::BadCookie),
                ) => self
                    .established(now_s, &key, pkt, &l3, tcp, Lookup::Stable)
                    .ok_or(reason)?,
                Err(reason) => return Err(reason),
            },
        };
        let rewrite = match outcome {
            Outcome::Rewrite(rewrite) => rewrite,
            Outcome::Built(dir) => return Ok(dir),
            Outcome::Drop(reason) => return Err(reason),
        };
        rewrite_addrs(pkt.buf, &l3, rewrite.src, rewrite.dst);
        rewrite_l4(pkt, &l3, proto, &rewrite);
        if let Some(shift) = rewrite.shift {
            shift_tcp(pkt, &l3, rewrite.dir, shift);
        }
        // A first fragment keeps its length: its later fragments follow it (see `frag`).
        if let Some((client, cport)) = rewrite.toa.filter(|_| !l3.fragment) {
            let inserted = insert_toa(pkt, &l3, rewrite.src, rewrite.dst, client, cport);
            self.counters.count(if inserted {
                Event::ToaInserted
            } else {
                Event::ToaNoRoom
            });
        }
        Ok(rewrite.dir)
    }

    /// The established path: the session exists, update its state and return the rewrite.
    fn established<A: Family>(
        &mut self,
        now_s: u64,
        key: &FlowKey<A>,
        pkt: &mut Packet<'_>,
        l3: &L3<A>,
        tcp: Option<TcpInfo>,
        how: Lookup,
    ) -> Option<Outcome<A>> {
        let len = pkt.len;
        // Field by field, so the session stays locked while events are written: no Arc clone
        // per packet.
        let Worker {
            engine,
            counters,
            traffic_slot,
            events,
        } = self;
        let table = A::table(&engine.table);
        let mut locked = match how {
            Lookup::Fast => table.lookup_fast(key)?,
            Lookup::Stable => table.lookup(key)?,
        };
        let from_client = locked.from_client;
        let s = locked.guard.as_mut()?;
        if from_client
            && tcp.is_some_and(|t| t.flags.opens())
            && s.dest.params.conn_reuse == ConnReuse::Reschedule
            && matches!(
                s.state,
                FlowState::Tcp(TcpState::TimeWait | TcpState::Close)
            )
        {
            // A client reusing its port for a new connection: the old one is over, the SYN is
            // scheduled afresh by the caller (IPVS `conn_reuse_mode = 1`).
            if let Some(mut old) = table.take(locked) {
                engine.release(&mut old);
                counters.count(Event::SessionsRescheduled);
                emit(events, counters, SessionEvent::Closed(old.record(now_s)));
            }
            return None;
        }
        if let (Proxy::Opening(_), Some(t)) = (&s.proxy, tcp) {
            if l3.fragment {
                return Some(Outcome::Drop(DropReason::SynProxyOpening));
            }
            return Some(opening(
                engine, counters, events, table, locked, pkt, l3, t, now_s,
            ));
        }
        if let (Some(_), Some(t), false) = (s.proxy_delta(), tcp, from_client)
            && t.flags.syn
        {
            // The real server sent its SYN-ACK again: the proxy's ACK was lost. Answered here.
            let (seq, _, _) = s.window.edges(Direction::Inbound);
            let seg = synproxy::Segment {
                src: s.lip,
                dst: s.rs,
                sport: s.lport,
                dport: s.rport,
                seq,
                ack: t.segment.seq.wrapping_add(1),
                flags: synproxy::flags::ACK,
                window: u16::MAX,
                options: &[],
                payload: &[],
            };
            return Some(match write_built(pkt, &seg) {
                Some(()) => Outcome::Built(Direction::Inbound),
                None => Outcome::Drop(DropReason::Truncated),
            });
        }
        let dir = if from_client {
            Direction::Inbound
        } else {
            Direction::Outbound
        };
        let offload = engine.offload.get();
        // The engine sees a segment of an offloaded TCP flow only when the faster path left it
        // here (FIN, RST, …): first the window edges it saw, so the RST check is current.
        if let (Some(offload), Offloaded::Yes, Some(_)) = (offload, s.offloaded, tcp)
            && let Some(seen) = offload.activity(&s.offload_flow())
        {
            merge_windows(s, &seen);
        }
        let mut changed = false;
        if s.state == FlowState::Udp && dir == Direction::Outbound && !s.replied {
            s.replied = true;
        }
        let was_embryonic = s.tracked;
        if let (FlowState::Tcp(state), Some(t)) = (s.state, tcp) {
            if t.flags.rst && !s.window.rst_acceptable(dir, &t.segment) {
                counters.count(Event::RstOutOfWindow);
            } else {
                s.window.update(dir, &t.segment);
                let next = state.next(dir, t.flags);
                if next != state {
                    s.dest.stats.moved(state.is_active(), next.is_active());
                    s.state = FlowState::Tcp(next);
                    changed = true;
                }
            }
        }
        // A flow still in SYN_RECV keeps the deadline its SYN gave it: retransmitted SYNs and
        // SYN-ACKs do not stretch a handshake that never completes.
        if changed || s.state != FlowState::Tcp(TcpState::SynRecv) {
            s.expires = deadline(now_s, session_timeout(s));
        }
        s.dest.stats.count(*traffic_slot, dir, len);
        if let Some(offload) = offload {
            follow_offload(&**offload, s);
        }
        if was_embryonic {
            table.embryo_left(s);
        }
        let shift = s.proxy_delta().map(|delta| Shift::new(delta, &s.window));
        let rewrite = if from_client {
            Rewrite {
                src: s.lip,
                sport: s.lport,
                dst: s.rs,
                dport: s.rport,
                dir,
                toa: None,
                shift,
            }
        } else {
            Rewrite {
                src: s.vip,
                sport: s.vport,
                dst: s.client,
                dport: s.cport,
                dir,
                toa: None,
                shift,
            }
        };
        if changed {
            emit(
                events,
                counters,
                SessionEvent::StateChanged(s.record(now_s)),
            );
        }
        Some(Outcome::Rewrite(rewrite))
    }

    /// The miss path: a TCP SYN or a UDP datagram to a service opens a flow. Under the SYN
    /// proxy a SYN is answered with a cookie instead, and the client's ACK that proves it opens
    /// the flow ([`Self::accept_cookie`]).
    fn new_flow<A: Family>(
        &mut self,
        now_s: u64,
        pkt: &mut Packet<'_>,
        l3: &L3<A>,
        key: FlowKey<A>,
        proto: L4Proto,
        tcp: Option<TcpInfo>,
    ) -> Result<Outcome<A>, DropReason> {
        let engine = self.engine.clone();
        let opens = tcp.is_none_or(|t| t.flags.opens());
        let bare_ack =
            tcp.is_some_and(|t| t.flags.ack && !t.flags.syn && !t.flags.rst && !t.flags.fin);
        if !opens && !bare_ack {
            return Err(DropReason::NoSession);
        }
        let snap = engine.snapshot.load();
        let laddr = engine.laddr.load();
        let vip = SocketAddr::new(l3.dst.to_ip(), key.dport);
        let Some(svc) = snap.service(proto, vip) else {
            return Err(if laddr.is_local(vip.ip()) {
                DropReason::NoSession
            } else {
                DropReason::NoService
            });
        };
        if !opens && svc.params.syn_proxy == SynProxy::Off {
            return Err(DropReason::NoSession);
        }
        // A fragment's checksum covers bytes the engine never sees (see `frag`).
        if pkt.csum == L4Checksum::Unverified && !l3.fragment && !l4_checksum_ok(pkt, l3, proto) {
            return Err(DropReason::BadChecksum);
        }
        let table = A::table(&engine.table);
        // The proxy writes its own segments over plain headers only (no IPv6 extension
        // headers, no fragment; IPv4 options were refused before).
        let plain = l3.l4_start == if A::IS_V6 { 40 } else { 20 } && !l3.fragment;
        if let Some(t) = tcp {
            if !opens {
                if !plain {
                    return Err(DropReason::NoSession);
                }
                return self.accept_cookie(&engine, &snap, svc, &laddr, pkt, l3, key, t, now_s);
            }
            let proxied = plain
                && match svc.params.syn_proxy {
                    SynProxy::Off => false,
                    SynProxy::On => true,
                    SynProxy::Auto => engine.auto_engaged(table, now_s),
                };
            if proxied {
                return answer_syn(&engine, &self.counters, pkt, l3, &key, t, now_s);
            }
        }
        let (dest, rs, local, lip) =
            self.schedule(&engine, &snap, svc, &laddr, l3, &key, proto, now_s)?;
        let mut window = TcpWindow::new();
        let state = match tcp {
            Some(t) => {
                window.update(Direction::Inbound, &t.segment);
                FlowState::Tcp(TcpState::None.next(Direction::Inbound, t.flags))
            }
            None => FlowState::Udp,
        };
        let mut data = own_session(dest.clone(), &key, lip, rs, local.port, state, window);
        data.replied = proto == L4Proto::Tcp;
        data.expires = deadline(now_s, session_timeout(&data));
        data.tracked = data.embryonic();
        let record = data.record(now_s);
        match self.insert_new(&engine, table, data, now_s) {
            Ok(()) => {
                dest.stats
                    .count(self.traffic_slot, Direction::Inbound, pkt.len);
                self.counters.count(Event::SessionsCreated);
                emit(
                    &mut self.events,
                    &self.counters,
                    SessionEvent::Created(record),
                );
                let toa = (proto == L4Proto::Tcp && svc.config.toa).then_some((key.src, key.sport));
                Ok(Outcome::Rewrite(Rewrite {
                    src: lip,
                    sport: local.port,
                    dst: rs,
                    dport: dest.addr.port(),
                    dir: Direction::Inbound,
                    toa,
                    shift: None,
                }))
            }
            Err(InsertError::Full) => Err(DropReason::TableFull),
            // Another worker opened the same flow a moment ago (a retransmitted SYN on another
            // queue): carry on with its session.
            Err(InsertError::Exists(_)) => self
                .established(now_s, &key, pkt, l3, tcp, Lookup::Stable)
                .ok_or(DropReason::NoSession),
        }
    }

    /// Picks the real server of a new flow and allocates its local address and port (a flow
    /// that never completed its handshake gives its port up if none is free).
    #[allow(clippy::too_many_arguments)]
    fn schedule<A: Family>(
        &mut self,
        engine: &Engine,
        snap: &Snapshot,
        svc: &crate::service::Service,
        laddr: &LocalAddrPool,
        l3: &L3<A>,
        key: &FlowKey<A>,
        proto: L4Proto,
        now_s: u64,
    ) -> Result<(Arc<crate::service::Dest>, A, LocalAddr, A), DropReason> {
        let maglev_seed = snap.maglev().seed;
        let flow_hash = key.flow_hash(maglev_seed);
        let source_hash =
            xxhash_rust::xxh3::xxh3_64_with_seed(l3.src.octets_of().as_ref(), maglev_seed);
        let idx = svc
            .scheduler
            .pick(flow_hash, source_hash, |i| {
                svc.dests
                    .get(i)
                    .map(|d| d.stats.conns())
                    .unwrap_or_default()
            })
            .ok_or(DropReason::NoBackend)?;
        let dest = svc.dests.get(idx).ok_or(DropReason::NoBackend)?.clone();
        let Some(rs) = A::from_ip(dest.addr.ip()) else {
            return Err(DropReason::NoBackend);
        };
        let table = A::table(&engine.table);
        let local = match laddr.allocate(proto, A::IS_V6, flow_hash) {
            Some(local) => local,
            // Every port is taken: the oldest flow that never completed its handshake gives
            // its port up (see `session`).
            None => {
                self.evict_embryo(engine, table, proto, now_s)?;
                laddr
                    .allocate(proto, A::IS_V6, flow_hash)
                    .ok_or(DropReason::NoLocalPort)?
            }
        };
        let Some(lip) = A::from_ip(local.ip) else {
            laddr.release(proto, local);
            return Err(DropReason::NoLocalPort);
        };
        Ok((dest, rs, local, lip))
    }

    /// Inserts a session this node creates, counted in its real server's connections; when the
    /// table is full, the oldest flow that never completed its handshake (of the same protocol,
    /// else of the other) makes room. On failure the session's port is released.
    fn insert_new<A: Family>(
        &mut self,
        engine: &Engine,
        table: &FamilyTable<A>,
        data: SessionData<A>,
        now_s: u64,
    ) -> Result<(), InsertError> {
        let (dest, proto, active) = (data.dest.clone(), data.proto(), data.state.is_active());
        let (key, tracked) = (data.client_key(), data.tracked);
        let local = LocalAddr {
            ip: data.lip.to_ip(),
            port: data.lport,
        };
        // Counted before the insert so that a removal racing it balances the count.
        dest.stats.opened(active);
        let mut inserted = table.insert(data);
        if let Err((InsertError::Full, Some(back))) = inserted {
            let room = self
                .evict_embryo(engine, table, proto, now_s)
                .or_else(|_| self.evict_embryo(engine, table, proto.other(), now_s));
            inserted = match room {
                Ok(()) => table.insert(back),
                Err(_) => Err((InsertError::Full, Some(back))),
            };
        }
        match inserted {
            Ok(slot) => {
                if tracked {
                    table.track_embryo(slot, proto, &key);
                }
                Ok(())
            }
            Err((e, _)) => {
                dest.stats.closed(active);
                engine.laddr.load().release(proto, local);
                Err(e)
            }
        }
    }

    /// A bare ACK of no session to a proxied service: if it proves a SYN cookie, the flow opens
    /// (scheduled, a port allocated, a session opening) and the ACK becomes the proxy's SYN to
    /// the real server; its data, if any, is held until the real server answers.
    #[allow(clippy::too_many_arguments)]
    fn accept_cookie<A: Family>(
        &mut self,
        engine: &Engine,
        snap: &Snapshot,
        svc: &crate::service::Service,
        laddr: &LocalAddrPool,
        pkt: &mut Packet<'_>,
        l3: &L3<A>,
        key: FlowKey<A>,
        t: TcpInfo,
        now_s: u64,
    ) -> Result<Outcome<A>, DropReason> {
        let slot = now_s / synproxy::COOKIE_SLOT_SECS;
        if engine.cookie_slot.load(Ordering::Relaxed) < slot {
            // No cookie sent in this slot or the last: no ACK can prove one.
            return Err(DropReason::NoSession);
        }
        let isn = t.segment.seq.wrapping_sub(1);
        let cookie = t.segment.ack.wrapping_sub(1);
        let opts = engine
            .cookies
            .check(&key, isn, cookie, now_s)
            .ok_or(DropReason::BadCookie)?;
        let (dest, rs, local, lip) =
            self.schedule(engine, snap, svc, laddr, l3, &key, L4Proto::Tcp, now_s)?;
        let tcp = TcpPacket::new_unchecked(&pkt.buf[l3.l4_start..l3.l4_end]);
        let held = (!tcp.payload().is_empty()).then(|| Held {
            seq: t.segment.seq,
            flags: tcp_flags_byte(&tcp),
            window: t.segment.window,
            payload: tcp.payload().into(),
        });
        let mut window = TcpWindow::new();
        window.update(
            Direction::Inbound,
            &Segment {
                flags: TcpFlags {
                    syn: true,
                    ..TcpFlags::default()
                },
                seq: isn,
                ack: 0,
                len: 1,
                window: t.segment.window,
                wscale: opts.wscale,
            },
        );
        let mut data = own_session(
            dest,
            &key,
            lip,
            rs,
            local.port,
            FlowState::Tcp(TcpState::SynSent),
            window,
        );
        data.expires = deadline(now_s, PROXY_OPENING.as_secs());
        data.tracked = true;
        data.proxy = Proxy::Opening(Box::new(Opening {
            cookie,
            client_isn: isn,
            opts,
            window: t.segment.window,
            sent_at: now_s,
            tries: 1,
            held,
        }));
        let syn = ProxySyn::of(&data, isn, opts, svc.config.toa);
        let table = A::table(&engine.table);
        match self.insert_new(engine, table, data, now_s) {
            Ok(()) => {}
            Err(InsertError::Full) => return Err(DropReason::TableFull),
            // Another worker took the same ACK a moment ago.
            Err(InsertError::Exists(_)) => return Err(DropReason::SynProxyOpening),
        }
        self.counters.count(Event::SynCookiesAccepted);
        syn.write(pkt)?;
        Ok(Outcome::Built(Direction::Inbound))
    }

    /// Evicts the node's oldest embryonic flow of `proto` (see `session`), as a removal with its
    /// `Closed` event; `NoLocalPort` when there is none.
    fn evict_embryo<A: Family>(
        &mut self,
        engine: &Engine,
        table: &FamilyTable<A>,
        proto: L4Proto,
        now_s: u64,
    ) -> Result<(), DropReason> {
        let mut old = table
            .evict_embryonic(proto)
            .ok_or(DropReason::NoLocalPort)?;
        engine.release(&mut old);
        self.counters.count(Event::EmbryonicEvicted);
        emit(
            &mut self.events,
            &self.counters,
            SessionEvent::Closed(old.record(now_s)),
        );
        Ok(())
    }

    fn icmpv4(
        &mut self,
        now: Instant,
        pkt: &mut Packet<'_>,
        l3: L3<Ipv4Addr>,
    ) -> Result<Handled, DropReason> {
        let msg = Icmpv4Packet::new_checked(&pkt.buf[l3.l4_start..l3.l4_end])?;
        if !msg.verify_checksum() {
            return Err(DropReason::BadChecksum);
        }
        if msg.msg_type() == Icmpv4Message::EchoRequest {
            self.echo_allowed(now, l3.dst.into(), echo::answerable_v4(l3.src))?;
            echo::reply_v4(pkt.buf, l3.l4_start, l3.l4_end);
            return Ok(Handled::Reply);
        }
        if !msg.msg_type().is_error() {
            return Err(DropReason::IcmpUnsupported);
        }
        let dir = self.translate_icmp_error(pkt, &l3)?;
        let mut msg = Icmpv4Packet::new_unchecked(&mut pkt.buf[l3.l4_start..l3.l4_end]);
        msg.fill_checksum();
        Ok(Handled::Forward(dir))
    }

    /// Whether an echo request to `dst` is answered (see `echo`); counted either way.
    fn echo_allowed(
        &mut self,
        now: Instant,
        dst: IpAddr,
        answerable: bool,
    ) -> Result<(), DropReason> {
        if !self.engine.snapshot.load().is_vip(dst) {
            return Err(DropReason::EchoNotVip);
        }
        if !answerable {
            return Err(DropReason::Malformed);
        }
        if !self.engine.echo.allow(now) {
            return Err(DropReason::EchoRateLimited);
        }
        self.counters.count(Event::EchoReplied);
        Ok(())
    }

    fn icmpv6(
        &mut self,
        now: Instant,
        pkt: &mut Packet<'_>,
        l3: L3<Ipv6Addr>,
    ) -> Result<Handled, DropReason> {
        let len = u32::try_from(l3.l4_end - l3.l4_start).map_err(|_| DropReason::Malformed)?;
        let msg = Icmpv6Packet::new_checked(&pkt.buf[l3.l4_start..l3.l4_end])?;
        if !msg.verify_checksum(checksum::pseudo_header_v6(
            &l3.src,
            &l3.dst,
            IpProtocol::Icmpv6,
            len,
        )) {
            return Err(DropReason::BadChecksum);
        }
        if msg.msg_type() == Icmpv6Message::EchoRequest {
            if l3.l4_start != wire::ipv6::HEADER_LEN {
                return Err(DropReason::IcmpUnsupported);
            }
            self.echo_allowed(now, l3.dst.into(), echo::answerable_v6(l3.src))?;
            echo::reply_v6(pkt.buf, l3.l4_start, l3.l4_end);
            return Ok(Handled::Reply);
        }
        if !msg.msg_type().is_error() {
            return Err(DropReason::IcmpUnsupported);
        }
        let dir = self.translate_icmp_error(pkt, &l3)?;
        let (src, dst) = (
            Ipv6Addr::from_slice(&pkt.buf[8..]),
            Ipv6Addr::from_slice(&pkt.buf[24..]),
        );
        let mut msg = Icmpv6Packet::new_unchecked(&mut pkt.buf[l3.l4_start..l3.l4_end]);
        msg.fill_checksum(checksum::pseudo_header_v6(
            &src,
            &dst,
            IpProtocol::Icmpv6,
            len,
        ));
        Ok(Handled::Forward(dir))
    }

    /// Translates an ICMP error's outer header and the packet it quotes. The quoted packet went
    /// the other way, so its reversed key is the session's key for this direction. The caller
    /// recomputes the ICMP checksum.
    fn translate_icmp_error<A: Family>(
        &mut self,
        pkt: &mut Packet<'_>,
        l3: &L3<A>,
    ) -> Result<Direction, DropReason> {
        let quoted_start = l3.l4_start + 8;
        let quote = Quote::<A>::parse(&pkt.buf[quoted_start..l3.l4_end])
            .ok_or(DropReason::IcmpUnsupported)?;
        let key = quote.key.reversed();
        let (outer, inner, dir, delta) = {
            let locked = A::table(&self.engine.table)
                .lookup(&key)
                .ok_or(DropReason::IcmpNoSession)?;
            let s = locked.guard.as_ref().ok_or(DropReason::IcmpNoSession)?;
            let delta = s.proxy_delta();
            let (outer, inner, dir) = if locked.from_client {
                // About our packet VIP → client, from the client side: tell the real server
                // about its packet RS → LIP.
                (
                    (s.lip, s.rs),
                    (s.rs, s.rport, s.lip, s.lport),
                    Direction::Inbound,
                )
            } else {
                // About our packet LIP → RS, from the server side: tell the client about its
                // packet client → VIP.
                (
                    (s.vip, s.client),
                    (s.client, s.cport, s.vip, s.vport),
                    Direction::Outbound,
                )
            };
            (outer, inner, dir, delta)
        };
        let quoted = &mut pkt.buf[quoted_start..l3.l4_end];
        let (q_src, q_sport, q_dst, q_dport) = inner;
        rewrite_header_addrs(quoted, quote.key.src, q_src, quote.key.dst, q_dst);
        // Quoted packets were complete on the wire: their checksum is a full one, and the quote
        // may end before it (ports are always there: 8 bytes at least).
        rewrite_ports_and_checksum(
            &mut quoted[quote.l4_off..],
            quote.key.proto == L4Proto::Udp.number(),
            L4Checksum::Verified,
            (quote.key.src, quote.key.dst),
            (q_src, q_sport, q_dst, q_dport),
        );
        if let (Some(delta), true) = (delta, quote.key.proto == L4Proto::Tcp.number()) {
            // The quoted segment of a proxied flow, back in the sequence space of its receiver:
            // our VIP → client segment had its sequence number shifted down, our LIP → real
            // server segment its acknowledgement up.
            let (at, delta) = match dir {
                Direction::Inbound => (4, delta),
                Direction::Outbound => (8, delta.wrapping_neg()),
            };
            shift_quoted(&mut quoted[quote.l4_off..], at, delta);
        }
        rewrite_addrs(pkt.buf, l3, outer.0, outer.1);
        self.counters.count(Event::IcmpTranslated);
        Ok(dir)
    }
}

/// A session this node opens for the flow of `key` (client → VIP), to `rs` from `lip`:`lport`:
/// not synced, not offloaded, not proxied, no deadline yet; the caller sets what differs.
fn own_session<A: Family>(
    dest: Arc<crate::service::Dest>,
    key: &FlowKey<A>,
    lip: A,
    rs: A,
    lport: u16,
    state: FlowState,
    window: TcpWindow,
) -> SessionData<A> {
    SessionData {
        rport: dest.addr.port(),
        dest,
        expires: 0,
        window,
        client: key.src,
        vip: key.dst,
        lip,
        rs,
        cport: key.sport,
        vport: key.dport,
        lport,
        state,
        synced: false,
        offloaded: Offloaded::No,
        mark: 0,
        linked: false,
        replied: true,
        tracked: false,
        proxy: Proxy::No,
    }
}

/// The kind of the TOA option (client address and port in a SYN).
const TOA_KIND: u8 = 254;

/// How long a proxied flow waits for its real server's SYN-ACK before it is dropped.
const PROXY_OPENING: Duration = Duration::from_secs(5);

/// Seconds before the proxy sends its SYN to the real server again, on the client's next
/// segment.
const SYN_RETRY_SECS: u64 = 1;

/// SYNs the proxy sends a real server at most before it resets the client.
const MAX_SYN_TRIES: u8 = 3;

/// The MSS the proxy offers at most.
fn proxy_max_mss<A: Family>() -> u16 {
    if A::IS_V6 { 1440 } else { 1460 }
}

/// Answers a SYN to a proxied service with a SYN-ACK whose sequence number is a cookie, written
/// over the SYN: no session, no port.
fn answer_syn<A: Family>(
    engine: &Engine,
    counters: &Counters,
    pkt: &mut Packet<'_>,
    l3: &L3<A>,
    key: &FlowKey<A>,
    t: TcpInfo,
    now_s: u64,
) -> Result<Outcome<A>, DropReason> {
    let tcp = TcpPacket::new_unchecked(&pkt.buf[l3.l4_start..l3.l4_end]);
    let opts = CookieOpts::from_syn(tcp.options(), proxy_max_mss::<A>())?;
    let cookie = engine.cookies.make(key, t.segment.seq, now_s, opts);
    let slot = now_s / synproxy::COOKIE_SLOT_SECS + 1;
    if engine.cookie_slot.load(Ordering::Relaxed) < slot {
        engine.cookie_slot.fetch_max(slot, Ordering::Relaxed);
    }
    let mut options = [TcpOption::NoOperation; 6];
    options[0] = TcpOption::MaxSegmentSize(opts.mss);
    let mut n = 1;
    if opts.sack {
        options[n + 2] = TcpOption::SackPermitted;
        n += 3;
    }
    if opts.wscale.is_some() {
        options[n + 1] = TcpOption::WindowScale(PROXY_WSCALE);
        n += 2;
    }
    let seg = synproxy::Segment {
        src: key.dst,
        dst: key.src,
        sport: key.dport,
        dport: key.sport,
        seq: cookie,
        ack: t.segment.seq.wrapping_add(1),
        flags: synproxy::flags::SYN | synproxy::flags::ACK,
        window: u16::MAX,
        options: &options[..n],
        payload: &[],
    };
    write_built(pkt, &seg).ok_or(DropReason::Truncated)?;
    counters.count(Event::SynCookiesSent);
    Ok(Outcome::Built(Direction::Outbound))
}

/// Writes a segment of the proxy over `pkt`; `None` if it does not fit the buffer.
fn write_built<A: Family>(pkt: &mut Packet<'_>, seg: &synproxy::Segment<'_, A>) -> Option<()> {
    let partial = pkt.csum == L4Checksum::Partial;
    pkt.len = synproxy::write_segment(pkt.buf, partial, seg)?;
    if !partial {
        pkt.csum = L4Checksum::Verified;
    }
    Some(())
}

/// The flags byte of a TCP header (FIN to CWR).
fn tcp_flags_byte<T: AsRef<[u8]>>(t: &TcpPacket<T>) -> u8 {
    [
        t.fin(),
        t.syn(),
        t.rst(),
        t.psh(),
        t.ack(),
        t.urg(),
        t.ece(),
        t.cwr(),
    ]
    .iter()
    .enumerate()
    .fold(0, |b, (i, &on)| b | u8::from(on) << i)
}

/// The proxy's SYN to the real server of an opening flow: the client's initial sequence number
/// and options (and a TOA option if the service inserts one).
struct ProxySyn<A> {
    src: A,
    dst: A,
    sport: u16,
    dport: u16,
    isn: u32,
    opts: CookieOpts,
    /// The TOA option's data: client port and address.
    toa: Option<([u8; 18], usize)>,
}

impl<A: Family> ProxySyn<A> {
    fn of(s: &SessionData<A>, isn: u32, opts: CookieOpts, toa: bool) -> ProxySyn<A> {
        ProxySyn {
            src: s.lip,
            dst: s.rs,
            sport: s.lport,
            dport: s.rport,
            isn,
            opts,
            toa: toa.then(|| {
                let mut data = [0u8; 18];
                data[..2].copy_from_slice(&s.cport.to_be_bytes());
                let addr = s.client.octets_of();
                let n = addr.as_ref().len();
                data[2..2 + n].copy_from_slice(addr.as_ref());
                (data, 2 + n)
            }),
        }
    }

    fn write(&self, pkt: &mut Packet<'_>) -> Result<(), DropReason> {
        let mut options = [TcpOption::NoOperation; 7];
        options[0] = TcpOption::MaxSegmentSize(self.opts.mss);
        let mut n = 1;
        if self.opts.sack {
            options[n + 2] = TcpOption::SackPermitted;
            n += 3;
        }
        if let Some(ws) = self.opts.wscale {
            options[n + 1] = TcpOption::WindowScale(ws);
            n += 2;
        }
        if let Some((data, len)) = &self.toa {
            options[n] = TcpOption::Unknown {
                kind: TOA_KIND,
                data: &data[..*len],
            };
            n += 1;
        }
        let seg = synproxy::Segment {
            src: self.src,
            dst: self.dst,
            sport: self.sport,
            dport: self.dport,
            seq: self.isn,
            ack: 0,
            flags: synproxy::flags::SYN,
            window: u16::MAX,
            options: &options[..n],
            payload: &[],
        };
        write_built(pkt, &seg).ok_or(DropReason::Truncated)
    }
}

/// A packet of a proxied flow whose real server has not answered yet. From the real server: its
/// SYN-ACK joins the two halves (the delta is fixed, the session becomes established and is
/// announced to session sync, and the proxy's ACK — or the client's held data — goes to the
/// real server in its place); its RST becomes a RST to the client. From the client: its first
/// data is held; a segment at least [`SYN_RETRY_SECS`] after the last SYN becomes the SYN again,
/// [`MAX_SYN_TRIES`] at most, then a RST to the client.
#[allow(clippy::too_many_arguments)]
fn opening<A: Family>(
    engine: &Engine,
    counters: &Counters,
    events: &mut Vec<SessionEvent>,
    table: &FamilyTable<A>,
    mut locked: Locked<'_, A>,
    pkt: &mut Packet<'_>,
    l3: &L3<A>,
    t: TcpInfo,
    now_s: u64,
) -> Outcome<A> {
    let from_client = locked.from_client;
    let Some(s) = locked.guard.as_mut() else {
        return Outcome::Drop(DropReason::NoSession);
    };
    let Proxy::Opening(op) = &mut s.proxy else {
        return Outcome::Drop(DropReason::NoSession);
    };
    let reset_client = |cookie: u32, s: &SessionData<A>, pkt: &mut Packet<'_>| {
        let seg = synproxy::Segment {
            src: s.vip,
            dst: s.client,
            sport: s.vport,
            dport: s.cport,
            seq: cookie.wrapping_add(1),
            ack: 0,
            flags: synproxy::flags::RST,
            window: 0,
            options: &[],
            payload: &[],
        };
        write_built(pkt, &seg)
    };
    if !from_client {
        if t.flags.rst {
            // The real server refused the connection: so does the proxy, to the client.
            let cookie = op.cookie;
            let built = reset_client(cookie, s, pkt);
            close_opening(engine, table, locked);
            counters.count(Event::SynProxyRefused);
            return built.map_or(Outcome::Drop(DropReason::Truncated), |()| {
                Outcome::Built(Direction::Outbound)
            });
        }
        if !(t.flags.syn && t.flags.ack && t.segment.ack == op.client_isn.wrapping_add(1)) {
            return Outcome::Drop(DropReason::SynProxyOpening);
        }
        let delta = t.segment.seq.wrapping_sub(op.cookie);
        let Proxy::Opening(op) = std::mem::replace(&mut s.proxy, Proxy::Joined { delta }) else {
            return Outcome::Drop(DropReason::NoSession);
        };
        s.window.update(Direction::Outbound, &t.segment);
        s.dest.stats.moved(false, true);
        s.state = FlowState::Tcp(TcpState::Established);
        s.expires = deadline(now_s, session_timeout(s));
        table.embryo_left(s);
        let ack = t.segment.seq.wrapping_add(1);
        if let Some(h) = &op.held
            && h.flags & synproxy::flags::FIN != 0
        {
            let fin = TcpFlags {
                fin: true,
                ack: true,
                ..TcpFlags::default()
            };
            s.state = FlowState::Tcp(TcpState::Established.next(Direction::Inbound, fin));
            s.dest.stats.moved(true, false);
        }
        let (seq, flags, window, payload) = match &op.held {
            Some(h) => (
                h.seq,
                h.flags | synproxy::flags::ACK,
                h.window,
                &h.payload[..],
            ),
            None => (
                op.client_isn.wrapping_add(1),
                synproxy::flags::ACK,
                op.window,
                &[][..],
            ),
        };
        s.window.update(
            Direction::Inbound,
            &Segment {
                flags: TcpFlags {
                    ack: true,
                    ..TcpFlags::default()
                },
                seq,
                ack,
                len: u32::try_from(payload.len()).unwrap_or(u32::MAX),
                window,
                wscale: None,
            },
        );
        let seg = synproxy::Segment {
            src: s.lip,
            dst: s.rs,
            sport: s.lport,
            dport: s.rport,
            seq,
            ack,
            flags,
            window,
            options: &[],
            payload,
        };
        counters.count(Event::SessionsCreated);
        emit(events, counters, SessionEvent::Created(s.record(now_s)));
        return match write_built(pkt, &seg) {
            Some(()) => Outcome::Built(Direction::Inbound),
            None => Outcome::Drop(DropReason::Truncated),
        };
    }
    if t.flags.rst {
        // The client gave up before the real server answered.
        close_opening(engine, table, locked);
        return Outcome::Drop(DropReason::SynProxyOpening);
    }
    op.window = t.segment.window;
    if op.held.is_none() {
        // A client that sends its request and closes at once (data, then a FIN) has the data
        // held, and sends the FIN again.
        let tcp = TcpPacket::new_unchecked(&pkt.buf[l3.l4_start..l3.l4_end]);
        if !tcp.payload().is_empty() {
            op.held = Some(Held {
                seq: t.segment.seq,
                flags: tcp_flags_byte(&tcp),
                window: t.segment.window,
                payload: tcp.payload().into(),
            });
        }
    }
    if now_s < op.sent_at.saturating_add(SYN_RETRY_SECS) {
        return Outcome::Drop(DropReason::SynProxyOpening);
    }
    if op.tries >= MAX_SYN_TRIES {
        // The real server never answered.
        let cookie = op.cookie;
        let built = reset_client(cookie, s, pkt);
        close_opening(engine, table, locked);
        counters.count(Event::SynProxyFailed);
        return built.map_or(Outcome::Drop(DropReason::Truncated), |()| {
            Outcome::Built(Direction::Outbound)
        });
    }
    op.tries += 1;
    op.sent_at = now_s;
    let (isn, opts) = (op.client_isn, op.opts);
    let syn = ProxySyn::of(s, isn, opts, s.dest.params.toa);
    match syn.write(pkt) {
        Ok(()) => Outcome::Built(Direction::Inbound),
        Err(reason) => Outcome::Drop(reason),
    }
}

/// Removes a proxied flow that never opened (it was announced to nobody).
fn close_opening<A: Family>(engine: &Engine, table: &FamilyTable<A>, locked: Locked<'_, A>) {
    if let Some(mut data) = table.take(locked) {
        engine.release(&mut data);
    }
}

/// Shifts the sequence numbers of a packet of a proxied flow (after its addresses and ports were
/// translated): from the real server, its sequence number down by the delta and its window to
/// the proxy's scale; from the client, its acknowledgement and SACK blocks up by the delta (and
/// its window down to no scale, for a real server that does not scale). The L4 checksum follows
/// incrementally, unless it is a pseudo-header sum (offload pending), which covers none of this.
fn shift_tcp<A: Family>(pkt: &mut Packet<'_>, l3: &L3<A>, dir: Direction, shift: Shift) {
    let partial = pkt.csum == L4Checksum::Partial;
    let Some(tcp) = pkt.buf.get_mut(l3.l4_start..l3.l4_end) else {
        return;
    };
    if tcp.len() < 20 {
        return;
    }
    let mut sum = u16::from_be_bytes([tcp[16], tcp[17]]);
    let mut put32 = |tcp: &mut [u8], at: usize, f: &dyn Fn(u32) -> u32| {
        let old = u32::from_be_bytes([tcp[at], tcp[at + 1], tcp[at + 2], tcp[at + 3]]);
        let new = f(old);
        tcp[at..at + 4].copy_from_slice(&new.to_be_bytes());
        sum = checksum::update_bytes(sum, &old.to_be_bytes(), &new.to_be_bytes());
    };
    let window = match dir {
        Direction::Outbound => {
            put32(tcp, 4, &|seq| seq.wrapping_sub(shift.delta));
            shift.outbound_window
        }
        Direction::Inbound => {
            if tcp[13] & synproxy::flags::ACK != 0 {
                put32(tcp, 8, &|ack| ack.wrapping_add(shift.delta));
            }
            let hl = usize::from(tcp[12] >> 4) * 4;
            let mut at = 20;
            while at < hl.min(tcp.len()) {
                match tcp[at] {
                    0 => break,
                    1 => at += 1,
                    kind => {
                        let len = usize::from(*tcp.get(at + 1).unwrap_or(&0));
                        if len < 2 || at + len > hl.min(tcp.len()) {
                            break;
                        }
                        if kind == 5 {
                            let mut b = at + 2;
                            while b + 8 <= at + len {
                                put32(tcp, b, &|edge| edge.wrapping_add(shift.delta));
                                put32(tcp, b + 4, &|edge| edge.wrapping_add(shift.delta));
                                b += 8;
                            }
                        }
                        at += len;
                    }
                }
            }
            shift.inbound_window
        }
    };
    if let Some((from, to)) = window {
        let old = u16::from_be_bytes([tcp[14], tcp[15]]);
        let new = synproxy::rescale_window(old, from, to);
        tcp[14..16].copy_from_slice(&new.to_be_bytes());
        sum = checksum::update_word(sum, old, new);
    }
    if !partial {
        tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    }
}

/// Adds `delta` to the 32-bit field at `at` of a quoted TCP header, and follows it in the quoted
/// checksum; either may lie past the end of the quote (then it is left out).
fn shift_quoted(tcp: &mut [u8], at: usize, delta: u32) {
    let Some(field) = tcp.get_mut(at..at + 4) else {
        return;
    };
    let old = u32::from_be_bytes([field[0], field[1], field[2], field[3]]);
    let new = old.wrapping_add(delta);
    field.copy_from_slice(&new.to_be_bytes());
    if let Some(c) = tcp.get_mut(16..18) {
        let sum = checksum::update_bytes(
            u16::from_be_bytes([c[0], c[1]]),
            &old.to_be_bytes(),
            &new.to_be_bytes(),
        );
        c.copy_from_slice(&sum.to_be_bytes());
    }
}

/// The packet an ICMP error quotes: its IP header and at least the first 8 bytes of TCP or UDP.
/// Read leniently from raw bytes because the quote is usually truncated.
#[derive(Debug)]
struct Quote<A> {
    key: FlowKey<A>,
    l4_off: usize,
}

impl<A: Family> Quote<A> {
    fn parse(b: &[u8]) -> Option<Quote<A>> {
        let (proto, l4_off) = if A::IS_V6 {
            // Quotes with extension headers are not translated: the walk could not be trusted
            // on a truncated packet. The one exception is the Fragment header (fixed size) of
            // a first fragment, which holds the ports: a router that cannot forward the
            // fragments a client sent says so quoting them (see `frag`).
            match *b.get(6)? {
                next if IpProtocol::from(next) == IpProtocol::Ipv6Frag => {
                    let frag_offset = u16::from_be_bytes([*b.get(42)?, *b.get(43)?]) & 0xfff8;
                    if frag_offset != 0 {
                        return None;
                    }
                    (*b.get(40)?, 48)
                }
                next => (next, 40),
            }
        } else {
            let ihl = usize::from(b.first()? & 0x0f) * 4;
            let frag_offset = u16::from_be_bytes([*b.get(6)?, *b.get(7)?]) & 0x1fff;
            if ihl < 20 || frag_offset != 0 {
                return None;
            }
            (*b.get(9)?, ihl)
        };
        let version = if A::IS_V6 { 6 } else { 4 };
        let ports = b.get(l4_off..l4_off + 8)?;
        if b[0] >> 4 != version || !(proto == 6 || proto == 17) {
            return None;
        }
        Some(Quote {
            key: FlowKey {
                src: A::from_slice(&b[A::SRC_OFF..]),
                dst: A::from_slice(&b[A::DST_OFF..]),
                sport: u16::from_be_bytes([ports[0], ports[1]]),
                dport: u16::from_be_bytes([ports[2], ports[3]]),
                proto,
            },
            l4_off,
        })
    }
}

/// Rewrites the outer IP addresses of the packet.
fn rewrite_addrs<A: Family>(buf: &mut [u8], l3: &L3<A>, src: A, dst: A) {
    rewrite_header_addrs(buf, l3.src, src, l3.dst, dst);
}

/// Rewrites the addresses of the IP header at the start of `hdr`, updating an IPv4 header
/// checksum incrementally.
fn rewrite_header_addrs<A: Family>(hdr: &mut [u8], old_src: A, src: A, old_dst: A, dst: A) {
    let (os, ns, od, nd) = (
        old_src.octets_of(),
        src.octets_of(),
        old_dst.octets_of(),
        dst.octets_of(),
    );
    let n = ns.as_ref().len();
    hdr[A::SRC_OFF..A::SRC_OFF + n].copy_from_slice(ns.as_ref());
    hdr[A::DST_OFF..A::DST_OFF + n].copy_from_slice(nd.as_ref());
    if !A::IS_V6 {
        let old = u16::from_be_bytes([hdr[10], hdr[11]]);
        let c = checksum::update_bytes(old, os.as_ref(), ns.as_ref());
        let c = checksum::update_bytes(c, od.as_ref(), nd.as_ref());
        hdr[10..12].copy_from_slice(&c.to_be_bytes());
    }
}

/// Rewrites the ports and fixes the L4 checksum for the new addresses and ports.
fn rewrite_l4<A: Family>(pkt: &mut Packet<'_>, l3: &L3<A>, proto: L4Proto, rw: &Rewrite<A>) {
    let csum = pkt.csum;
    rewrite_ports_and_checksum(
        &mut pkt.buf[l3.l4_start..l3.l4_end],
        proto == L4Proto::Udp,
        csum,
        (l3.src, l3.dst),
        (rw.src, rw.sport, rw.dst, rw.dport),
    );
}

/// Writes new ports into a TCP or UDP header and updates its checksum for the new addresses
/// (already written into the IP header) and ports. A checksum field past the end of `l4` (a
/// truncated quote) is left out; a UDP checksum of 0 (IPv4 "none") stays 0 and a computed 0 is
/// sent as 0xFFFF. A partial sum (offload pending) only follows the addresses: the ports are
/// summed later from `csum_start`.
fn rewrite_ports_and_checksum<A: Family>(
    l4: &mut [u8],
    udp: bool,
    csum: L4Checksum,
    (old_src, old_dst): (A, A),
    (src, sport, dst, dport): (A, u16, A, u16),
) {
    let csum_off = if udp { 6 } else { 16 };
    let old_sport = u16::from_be_bytes([l4[0], l4[1]]);
    let old_dport = u16::from_be_bytes([l4[2], l4[3]]);
    if let Some(field) = l4.get(csum_off..csum_off + 2) {
        let old = u16::from_be_bytes([field[0], field[1]]);
        if !(udp && old == 0) {
            let (os, ns) = (old_src.octets_of(), src.octets_of());
            let (od, nd) = (old_dst.octets_of(), dst.octets_of());
            let c = if csum == L4Checksum::Partial {
                let c = checksum::update_partial(old, os.as_ref(), ns.as_ref());
                checksum::update_partial(c, od.as_ref(), nd.as_ref())
            } else {
                let c = checksum::update_bytes(old, os.as_ref(), ns.as_ref());
                let c = checksum::update_bytes(c, od.as_ref(), nd.as_ref());
                let c = checksum::update_word(c, old_sport, sport);
                match checksum::update_word(c, old_dport, dport) {
                    0 if udp => 0xffff,
                    c => c,
                }
            };
            l4[csum_off..csum_off + 2].copy_from_slice(&c.to_be_bytes());
        }
    }
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&dport.to_be_bytes());
}

fn l4_checksum_ok<A: Family>(pkt: &Packet<'_>, l3: &L3<A>, proto: L4Proto) -> bool {
    let l4 = &pkt.buf[l3.l4_start..l3.l4_end];
    let Ok(len) = u32::try_from(l4.len()) else {
        return false;
    };
    match proto {
        L4Proto::Tcp => {
            let pseudo = A::pseudo_header(l3.src, l3.dst, IpProtocol::Tcp, len);
            TcpPacket::new_unchecked(l4).verify_checksum(pseudo)
        }
        L4Proto::Udp => {
            let u = UdpPacket::new_unchecked(l4);
            (!A::IS_V6 && u.checksum() == 0)
                || u.verify_checksum(A::pseudo_header(l3.src, l3.dst, IpProtocol::Udp, len))
        }
    }
}

/// Inserts a TOA option (kind 254: client port, then client address) at the end of a SYN's
/// options. False when it does not fit in the TCP header or in the buffer.
fn insert_toa<A: Family>(
    pkt: &mut Packet<'_>,
    l3: &L3<A>,
    src: A,
    dst: A,
    client: A,
    cport: u16,
) -> bool {
    let opt_len = A::TOA_LEN;
    let hl = usize::from(TcpPacket::new_unchecked(&pkt.buf[l3.l4_start..l3.l4_end]).header_len());
    let new_end = l3.l4_end + opt_len;
    if hl + opt_len > 60 || new_end > pkt.buf.len() {
        return false;
    }
    let opt_at = l3.l4_start + hl;
    pkt.buf.copy_within(opt_at..l3.l4_end, opt_at + opt_len);
    let opt = &mut pkt.buf[opt_at..opt_at + opt_len];
    opt[0] = TOA_KIND;
    opt[1] = opt_len as u8;
    opt[2..4].copy_from_slice(&cport.to_be_bytes());
    opt[4..].copy_from_slice(client.octets_of().as_ref());
    let l4_len = new_end - l3.l4_start;
    if A::IS_V6 {
        let payload_len = (new_end - 40) as u16;
        pkt.buf[4..6].copy_from_slice(&payload_len.to_be_bytes());
    } else {
        let mut ip = Ipv4Packet::new_unchecked(&mut pkt.buf[..]);
        ip.set_total_len(new_end as u16);
        ip.fill_checksum();
    }
    let pseudo = A::pseudo_header(src, dst, IpProtocol::Tcp, l4_len as u32);
    let mut tcp = TcpPacket::new_unchecked(&mut pkt.buf[l3.l4_start..new_end]);
    tcp.set_header_len((hl + opt_len) as u8);
    if pkt.csum == L4Checksum::Partial {
        tcp.set_checksum(pseudo);
    } else {
        tcp.fill_checksum(pseudo);
    }
    pkt.len = new_end;
    true
}

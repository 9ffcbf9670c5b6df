//! The protocol core between two or three nodes in memory: simulated time, loss, duplication
//! and reordering; no sockets, no clock.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use dataplane::{Authority, FlowState, L4Proto, SessionEvent, SessionRecord, TcpState};
use sessionsync::codec::{self, Batch};
use sessionsync::{Apply, Config, Core, Output};

type Key = (L4Proto, SocketAddr, SocketAddr);

/// The LIP of the `i`-th node of a simulated network.
fn lip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 19, 200, 1 + i as u8))
}

/// A flow of the `owner`-th node (on its LIP).
fn record_of(owner: usize, n: u32, state: TcpState) -> SessionRecord {
    let [a, b] = ((n >> 16) as u16).to_be_bytes();
    SessionRecord {
        proto: L4Proto::Tcp,
        client: SocketAddr::from(([10, a, b, 1], n as u16)),
        vip: "198.18.100.1:80".parse().unwrap(),
        local: SocketAddr::new(lip(owner), n as u16),
        backend: "198.18.3.10:8080".parse().unwrap(),
        state: FlowState::Tcp(state),
        window: Default::default(),
        expires_in_secs: 900,
        synced: false,
        syn_proxy: None,
    }
}

/// A flow of node a, the first node.
fn record(n: u32, state: TcpState) -> SessionRecord {
    record_of(0, n, state)
}

fn key(r: &SessionRecord) -> Key {
    (r.proto, r.client, r.vip)
}

/// A deterministic xorshift generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// A session as the stand-in table holds it.
#[derive(Debug, Clone, Copy)]
struct Held {
    record: SessionRecord,
    mark: u32,
}

/// Stands in for the engine's session table: both keys of a session (client side, and real
/// server plus LIP:port), and the rules `Engine::install`, `remove` and `reconcile` follow for a
/// peer's records (the engine's own tests check the engine against them).
#[derive(Default)]
struct Table {
    sessions: HashMap<Key, Held>,
    by_server: HashMap<(SocketAddr, SocketAddr), Key>,
    /// This node's LIPs.
    lips: Vec<IpAddr>,
}

fn server_key(r: &SessionRecord) -> (SocketAddr, SocketAddr) {
    (r.backend, r.local)
}

impl Table {
    fn new(lips: Vec<IpAddr>) -> Table {
        Table {
            lips,
            ..Table::default()
        }
    }

    fn take(&mut self, k: &Key) -> Option<Held> {
        let held = self.sessions.remove(k)?;
        self.by_server.remove(&server_key(&held.record));
        Some(held)
    }

    fn put(&mut self, record: SessionRecord, mark: u32) {
        self.by_server.insert(server_key(&record), key(&record));
        self.sessions.insert(key(&record), Held { record, mark });
    }

    /// A session this node's own traffic made or changed.
    fn own(&mut self, r: SessionRecord) {
        if let Some(held) = self.sessions.get_mut(&key(&r)) {
            held.record = r;
        } else {
            self.put(r, 0);
        }
    }

    fn install(&mut self, r: SessionRecord, authority: Authority) -> Result<(), &'static str> {
        let ours = self.lips.contains(&r.local.ip());
        match authority {
            Authority::Reclaim if !ours => return Err("foreign lip"),
            Authority::Owner { .. } | Authority::Relay if ours => return Err("own lip"),
            _ => {}
        }
        let owner = matches!(authority, Authority::Owner { .. });
        if let Some(held) = self.sessions.get_mut(&key(&r)) {
            if !held.record.synced {
                return Err("owned");
            }
            if server_key(&held.record) == server_key(&r) {
                held.record = SessionRecord { synced: true, ..r };
                if let Authority::Owner { mark } = authority {
                    held.mark = mark;
                }
                return Ok(());
            }
            if !owner {
                return Err("conflict");
            }
            self.take(&key(&r));
        }
        if let Some(other) = self.by_server.get(&server_key(&r)).copied() {
            if !owner || !self.sessions[&other].record.synced {
                return Err("conflict");
            }
            self.take(&other);
        }
        let (synced, mark) = match authority {
            Authority::Owner { mark } => (true, mark),
            Authority::Relay => (true, 0),
            Authority::Reclaim => (false, 0),
        };
        self.put(SessionRecord { synced, ..r }, mark);
        Ok(())
    }

    fn remove(&mut self, r: &SessionRecord) -> Result<bool, &'static str> {
        let Some(held) = self.sessions.get(&key(r)) else {
            return Ok(false);
        };
        if !held.record.synced {
            return Err("owned");
        }
        if server_key(&held.record) != server_key(r) {
            return Ok(false);
        }
        self.take(&key(r));
        Ok(true)
    }

    fn reconcile(&mut self, lips: &[IpAddr], mark: u32) -> usize {
        let stale: Vec<Key> = self
            .sessions
            .iter()
            .filter(|(_, h)| {
                h.record.synced && h.mark != mark && lips.contains(&h.record.local.ip())
            })
            .map(|(k, _)| *k)
            .collect();
        for k in &stale {
            self.take(k);
        }
        stale.len()
    }

    fn records(&self) -> Vec<SessionRecord> {
        self.sessions.values().map(|h| h.record).collect()
    }

    fn len(&self) -> usize {
        self.sessions.len()
    }

    fn get(&self, k: &Key) -> Option<SessionRecord> {
        self.sessions.get(k).map(|h| h.record)
    }

    fn contains(&self, k: &Key) -> bool {
        self.sessions.contains_key(k)
    }

    fn clear(&mut self) {
        self.sessions.clear();
        self.by_server.clear();
    }
}

/// A node: its core and a session table standing in for the engine.
struct Node {
    name: String,
    core: Core,
    table: Table,
    /// Copies the table refused, and copies reconciliation dropped.
    refused: u64,
    reconciled: u64,
}

impl Node {
    /// A session of this node's own traffic: in its table, and its event to the core.
    fn event(&mut self, now: Instant, ev: SessionEvent) {
        match ev {
            SessionEvent::Created(r) | SessionEvent::StateChanged(r) => self.table.own(r),
            SessionEvent::Closed(r) => {
                self.table.take(&key(&r));
            }
        }
        self.core.handle_event(now, ev);
    }

    /// The sessions this node owns, on its LIPs.
    fn owned(&self) -> HashMap<Key, FlowState> {
        self.table
            .sessions
            .iter()
            .filter(|(_, h)| !h.record.synced)
            .map(|(k, h)| (*k, h.record.state))
            .collect()
    }

    /// The sessions it holds on `lip`, owned or synced, with their LIP port.
    fn on_lip(&self, lip: IpAddr) -> HashMap<Key, (u16, FlowState)> {
        self.table
            .sessions
            .iter()
            .filter(|(_, h)| h.record.local.ip() == lip)
            .map(|(k, h)| (*k, (h.record.local.port(), h.record.state)))
            .collect()
    }

    fn states(&self) -> HashMap<Key, FlowState> {
        self.table
            .sessions
            .iter()
            .map(|(k, h)| (*k, h.record.state))
            .collect()
    }

    /// Carries out what the core asks.
    fn run_outputs(&mut self, now: Instant) {
        while let Some(out) = self.core.poll_output(now) {
            match out {
                Output::TableWanted => {
                    let table = self.table.records();
                    self.core.handle_table(table);
                }
                Output::Apply(Apply::Install(r, authority)) => {
                    if self.table.install(r, authority).is_err() {
                        self.refused += 1;
                    }
                }
                Output::Apply(Apply::Remove(r)) => {
                    if self.table.remove(&r).is_err() {
                        self.refused += 1;
                    }
                }
                Output::Apply(Apply::Reconcile { lips, mark }) => {
                    self.reconciled += self.table.reconcile(&lips, mark) as u64;
                }
            }
        }
    }
}

#[derive(Default)]
struct Faults {
    loss: u64,
    dup: u64,
    reorder: u64,
}

struct Net {
    now: Instant,
    nodes: Vec<Node>,
    /// In flight: (arrival, from, to, frame).
    flight: Vec<(Instant, usize, usize, Vec<u8>)>,
    faults: Faults,
    rng: Rng,
    /// Links that do not carry anything (a stalled peer).
    stalled: Vec<(usize, usize)>,
    /// A slow transport: each link takes at most one frame per this long from its core.
    pace: Option<Duration>,
    /// Per link (from, to): when it takes its next frame, while paced.
    paced_until: HashMap<(usize, usize), Instant>,
}

/// The core of the `i`-th of `names`, knowing every node's LIP.
fn core(names: &[&str], i: usize, epoch: u64, config: Config, now: Instant) -> Core {
    let mut core = Core::new(names[i], epoch, config, now).unwrap();
    let lips: Vec<(String, Vec<IpAddr>)> = names
        .iter()
        .enumerate()
        .map(|(j, n)| (n.to_string(), vec![lip(j)]))
        .collect();
    core.set_lips(&lips);
    core
}

const LATENCY: Duration = Duration::from_micros(200);
const TICK: Duration = Duration::from_micros(100);

impl Net {
    fn new(names: &[&str], config: Config) -> Net {
        let now = Instant::now();
        let nodes = names
            .iter()
            .enumerate()
            .map(|(i, name)| Node {
                name: name.to_string(),
                core: core(names, i, 100 + i as u64, config.clone(), now),
                table: Table::new(vec![lip(i)]),
                refused: 0,
                reconciled: 0,
            })
            .collect();
        Net {
            now,
            nodes,
            flight: Vec::new(),
            faults: Faults::default(),
            rng: Rng(0x9e37_79b9_7f4a_7c15),
            stalled: Vec::new(),
            pace: None,
            paced_until: HashMap::new(),
        }
    }

    /// Every node knows every other and is connected to it.
    fn connect_all(&mut self) {
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        for node in &mut self.nodes {
            node.core.set_peers(&names);
            for name in &names {
                node.core.peer_connected(name);
            }
        }
    }

    fn step(&mut self) {
        self.now += TICK;
        let now = self.now;
        let mut arrived = Vec::new();
        self.flight.retain(|(at, from, to, frame)| {
            if *at <= now {
                arrived.push((*from, *to, frame.clone()));
                false
            } else {
                true
            }
        });
        for (from, to, frame) in arrived {
            let name = self.nodes[from].name.clone();
            self.nodes[to].core.handle_frame(now, &name, &frame);
        }
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        for i in 0..self.nodes.len() {
            let node = &mut self.nodes[i];
            node.core.handle_timeout(now);
            node.run_outputs(now);
            for (j, peer) in names.iter().enumerate() {
                if j == i || self.stalled.contains(&(i, j)) {
                    continue;
                }
                if let Some(pace) = self.pace {
                    if self.paced_until.get(&(i, j)).is_some_and(|t| now < *t) {
                        continue;
                    }
                    if let Some(frame) = self.nodes[i].core.poll_transmit(now, peer) {
                        self.send(i, j, frame);
                        self.paced_until.insert((i, j), now + pace);
                    }
                    continue;
                }
                while let Some(frame) = self.nodes[i].core.poll_transmit(now, peer) {
                    self.send(i, j, frame);
                }
            }
        }
    }

    fn send(&mut self, from: usize, to: usize, frame: Vec<u8>) {
        if self.rng.chance(self.faults.loss) {
            return;
        }
        let mut at = self.now + LATENCY;
        if self.rng.chance(self.faults.reorder) {
            at += TICK * (1 + (self.rng.next() % 5) as u32);
        }
        if self.rng.chance(self.faults.dup) {
            self.flight.push((at + TICK, from, to, frame.clone()));
        }
        self.flight.push((at, from, to, frame));
    }

    fn run(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.step();
        }
    }

    /// The connection between nodes `i` and `j` breaks: both cores hear of it, and what was in
    /// flight on it is lost.
    fn disconnect(&mut self, i: usize, j: usize) {
        let (ni, nj) = (self.nodes[i].name.clone(), self.nodes[j].name.clone());
        self.nodes[i].core.peer_disconnected(&nj);
        self.nodes[j].core.peer_disconnected(&ni);
        self.flight
            .retain(|(_, from, to, _)| !((*from, *to) == (i, j) || (*from, *to) == (j, i)));
    }

    /// A new connection between nodes `i` and `j`.
    fn reconnect(&mut self, i: usize, j: usize) {
        self.disconnect(i, j);
        let (ni, nj) = (self.nodes[i].name.clone(), self.nodes[j].name.clone());
        self.nodes[i].core.peer_connected(&nj);
        self.nodes[j].core.peer_connected(&ni);
    }

    /// Node `i` restarts in `epoch`: an empty table, a new core, new connections to the nodes
    /// in `reachable`.
    fn restart(&mut self, i: usize, epoch: u64, config: Config, reachable: &[usize]) {
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        for j in 0..self.nodes.len() {
            if j != i {
                self.disconnect(i, j);
            }
        }
        let node = &mut self.nodes[i];
        node.core = core(&refs, i, epoch, config, self.now);
        node.core.set_peers(&names);
        node.table.clear();
        for &j in reachable {
            self.reconnect(i, j);
        }
    }
}

/// Small batches and queues; table copies as often as every 10 ms, so that a bulk answer is not
/// held back (the default interval has its own test).
fn small() -> Config {
    Config {
        batch_entries: 64,
        queue_entries: 4096,
        table_interval: Duration::from_millis(10),
        ..Config::default()
    }
}

/// Frames A has for B right now, decoded.
fn batches(net: &mut Net, from: usize, to: &str) -> Vec<Batch> {
    let now = net.now;
    std::iter::from_fn(|| net.nodes[from].core.poll_transmit(now, to))
        .map(|f| codec::decode(&f).unwrap())
        .collect()
}

#[test]
fn test_coalescing_sends_only_the_newest_state_of_a_flow() {
    let mut net = Net::new(&["a", "b"], small());
    net.connect_all();
    let now = net.now;
    net.nodes[0].event(now, SessionEvent::Created(record(1, TcpState::SynRecv)));
    for _ in 0..999 {
        net.nodes[0].event(
            now,
            SessionEvent::StateChanged(record(1, TcpState::Established)),
        );
    }
    net.nodes[0].event(now, SessionEvent::Created(record(2, TcpState::SynRecv)));
    net.nodes[0]
        .core
        .handle_timeout(now + Duration::from_millis(1));
    let sent = batches(&mut net, 0, "b");
    let entries: Vec<_> = sent.iter().flat_map(|b| &b.entries).collect();
    assert_eq!(entries.len(), 2, "one entry per flow");
    assert_eq!(
        entries[0].record.state,
        FlowState::Tcp(TcpState::Established)
    );
    assert_eq!(net.nodes[0].core.stats()[0].coalesced, 999);
}

#[test]
fn test_flush_by_size_and_by_time() {
    let mut net = Net::new(&["a", "b"], small());
    net.connect_all();
    let now = net.now;
    // The bulk request goes out first, alone.
    assert_eq!(batches(&mut net, 0, "b").len(), 1);
    for n in 0..64 + 10 {
        net.nodes[0].event(now, SessionEvent::Created(record(n, TcpState::SynRecv)));
    }
    let full = batches(&mut net, 0, "b");
    assert_eq!(full.len(), 1, "a full batch leaves at once");
    assert_eq!(full[0].entries.len(), 64);
    net.nodes[0]
        .core
        .handle_timeout(now + Duration::from_micros(900));
    assert!(batches(&mut net, 0, "b").is_empty(), "the rest waits");
    assert_eq!(
        net.nodes[0].core.poll_timeout(),
        now + Duration::from_millis(1)
    );
    net.nodes[0]
        .core
        .handle_timeout(now + Duration::from_millis(1));
    let late = batches(&mut net, 0, "b");
    assert_eq!(late.len(), 1);
    assert_eq!(late[0].entries.len(), 10);
    assert_eq!(late[0].seq, full[0].seq + 1);
}

#[test]
fn test_old_epoch_and_replayed_batches_are_rejected_and_counted() {
    let mut net = Net::new(&["a", "b"], small());
    net.connect_all();
    let now = net.now;
    net.nodes[0].event(now, SessionEvent::Created(record(1, TcpState::SynRecv)));
    net.nodes[0]
        .core
        .handle_timeout(now + Duration::from_millis(1));
    let frames: Vec<Vec<u8>> =
        std::iter::from_fn(|| net.nodes[0].core.poll_transmit(now, "b")).collect();
    let b = &mut net.nodes[1].core;
    for f in &frames {
        b.handle_frame(now, "a", f);
    }
    for f in &frames {
        b.handle_frame(now, "a", f);
    }
    assert_eq!(b.stats()[0].dropped.replayed, frames.len() as u64);

    // A restarted with a higher epoch: accepted, its sequence starts afresh.
    let mut restarted = core(&["a", "b"], 0, 101, small(), now);
    restarted.set_peers(&["b"]);
    restarted.peer_connected("b");
    let fresh = restarted.poll_transmit(now, "b").unwrap();
    b.handle_frame(now, "a", &fresh);
    assert_eq!(b.stats()[0].received_batches, frames.len() as u64 + 1);
    // Now anything of the old epoch is stale, even with a new sequence number.
    let mut old = core(&["a", "b"], 0, 100, small(), now);
    old.set_peers(&["b"]);
    old.peer_connected("b");
    for n in 0..5 {
        old.handle_event(now, SessionEvent::Created(record(n, TcpState::SynRecv)));
        old.handle_timeout(now + Duration::from_millis(1));
        let f = old.poll_transmit(now, "b").unwrap();
        b.handle_frame(now, "a", &f);
    }
    let stats = &b.stats()[0];
    assert_eq!(stats.dropped.stale_epoch, 5);
    // A batch meant for another node, or claiming another sender, is refused.
    let mut batch = codec::decode(&fresh).unwrap();
    batch.seq += 10;
    batch.to = "c".into();
    b.handle_frame(now, "a", &codec::encode(&batch).unwrap());
    batch.to = "b".into();
    batch.from = "c".into();
    b.handle_frame(now, "a", &codec::encode(&batch).unwrap());
    assert_eq!(b.stats()[0].dropped.misdirected, 2);
}

#[test]
fn test_malformed_oversized_and_other_version_frames_are_counted() {
    let mut net = Net::new(&["a", "b"], small());
    net.connect_all();
    let now = net.now;
    let b = &mut net.nodes[1].core;
    b.handle_frame(now, "a", &[]);
    b.handle_frame(now, "a", &[codec::VERSION, 0xc1, 0x00]);
    b.handle_frame(now, "a", &[codec::VERSION + 1, 0x90]);
    let mut big = vec![0u8; codec::MAX_FRAME + 1];
    big[0] = codec::VERSION;
    b.handle_frame(now, "a", &big);
    b.handle_oversized("a");
    b.handle_frame(now, "z", &[codec::VERSION]);
    let d = b.stats()[0].dropped;
    assert_eq!((d.malformed, d.version, d.oversized), (2, 1, 2));
    assert_eq!(b.foreign_frames(), 1);
    assert_eq!(b.stats()[0].received_batches, 0);
}

#[test]
fn test_bulk_sync_completes_and_flips_warm() {
    let lonely = Core::new("x", 1, small(), Instant::now()).unwrap();
    assert!(lonely.is_warm(), "a node with no peers is warm");

    let mut net = Net::new(&["a", "b", "c"], small());
    let now = net.now;
    for n in 0..5000 {
        net.nodes[0].table.own(record(n, TcpState::Established));
    }
    for n in 5000..6000 {
        net.nodes[2]
            .table
            .own(record_of(2, n, TcpState::Established));
    }
    let _ = now;
    net.connect_all();
    assert!(!net.nodes[1].core.is_warm());
    net.run(Duration::from_millis(50));
    for node in &net.nodes {
        assert!(node.core.is_warm(), "{} warm", node.name);
        assert_eq!(node.table.len(), 6000, "{}", node.name);
        assert!(node.core.stats().iter().all(|s| s.bulk_complete));
    }
    // B reconnects to A: not warm until A's table is in again.
    net.nodes[1].core.peer_disconnected("a");
    net.nodes[1].core.peer_connected("a");
    assert!(!net.nodes[1].core.is_warm());
    net.run(Duration::from_millis(50));
    assert!(net.nodes[1].core.is_warm());
}

/// The table re-request of the tests below.
const RETRY: Duration = Duration::from_millis(200);

fn retrying() -> Config {
    Config {
        bulk_retry: RETRY,
        ..small()
    }
}

/// The loss the table re-request is for: A learnt of B first (from the Raft config) and asks
/// for B's table, which B drops as a foreign frame. B learns of A later; A asks again
/// `bulk_retry` after its request left and turns warm with B's table.
#[test]
fn test_a_table_request_dropped_as_foreign_is_asked_again() {
    let mut net = Net::new(&["a", "b"], retrying());
    for n in 0..100 {
        net.nodes[1]
            .table
            .own(record_of(1, n, TcpState::Established));
    }
    net.nodes[0].core.set_peers(&["b"]);
    net.nodes[0].core.peer_connected("b");
    net.step();
    let asked = net.now;
    assert_eq!(net.nodes[0].core.poll_timeout(), asked + RETRY);
    net.run(Duration::from_millis(50));
    assert_eq!(
        net.nodes[1].core.foreign_frames(),
        1,
        "b dropped the request"
    );
    // B learns of A and gets A's table; B's own request is no part of B's table, so A's clock
    // runs on.
    net.nodes[1].core.set_peers(&["a"]);
    net.nodes[1].core.peer_connected("a");
    net.run(Duration::from_millis(50));
    assert!(net.nodes[1].core.is_warm());
    assert!(!net.nodes[0].core.is_warm());
    assert_eq!(net.nodes[0].core.stats()[0].bulk_retries, 0);
    assert_eq!(net.nodes[0].core.poll_timeout(), asked + RETRY);
    net.run(asked + RETRY - net.now);
    assert_eq!(net.nodes[0].core.stats()[0].bulk_retries, 1);
    net.run(Duration::from_millis(50));
    assert!(net.nodes[0].core.is_warm());
    assert_eq!(net.nodes[0].table.len(), 100);
    assert!(
        net.nodes[0].core.poll_timeout() > net.now + RETRY,
        "no retry is due once the table is in"
    );
}

/// A table still streaming is not asked again, however long it takes: every batch of it gives
/// it `bulk_retry` more. B's table is 40 batches over a link that takes one frame every half
/// `bulk_retry`, so it streams for twenty times `bulk_retry`.
#[test]
fn test_a_table_still_streaming_is_not_asked_again() {
    let mut net = Net::new(&["a", "b"], retrying());
    net.pace = Some(RETRY / 2);
    for n in 0..40 * 64 {
        net.nodes[1]
            .table
            .own(record_of(1, n, TcpState::Established));
    }
    net.connect_all();
    net.run(RETRY * 10);
    assert!(!net.nodes[0].core.is_warm(), "still streaming");
    net.run(RETRY * 12);
    assert!(net.nodes[0].core.is_warm());
    assert_eq!(net.nodes[0].table.len(), 40 * 64);
    assert_eq!(net.nodes[0].core.stats()[0].bulk_retries, 0);
    assert_eq!(
        net.nodes[1].core.stats()[0].table_streams,
        1,
        "streamed once"
    );
}

/// Live updates are no part of the table: a peer that keeps sending them may still have dropped
/// the request, and is asked again all the same.
#[test]
fn test_live_updates_do_not_hold_back_a_lost_table_request() {
    let mut net = Net::new(&["a", "b"], retrying());
    for n in 0..100 {
        net.nodes[1]
            .table
            .own(record_of(1, n, TcpState::Established));
    }
    net.nodes[0].core.set_peers(&["b"]);
    net.nodes[0].core.peer_connected("b");
    net.run(Duration::from_millis(1));
    assert_eq!(
        net.nodes[1].core.foreign_frames(),
        1,
        "b dropped the request"
    );
    net.nodes[1].core.set_peers(&["a"]);
    net.nodes[1].core.peer_connected("a");
    // B's traffic makes a flow every millisecond: a batch reaches A every millisecond or two.
    for n in 100..400 {
        let now = net.now;
        net.nodes[1].event(
            now,
            SessionEvent::Created(record_of(1, n, TcpState::SynRecv)),
        );
        net.run(Duration::from_millis(1));
    }
    net.run(Duration::from_millis(5));
    let a = &net.nodes[0].core.stats()[0];
    assert!(a.received_batches >= 150, "{a:?}");
    assert_eq!(a.bulk_retries, 1);
    assert!(net.nodes[0].core.is_warm());
    assert_eq!(
        net.nodes[0].table.len(),
        400,
        "b's table and its live flows"
    );
}

/// An owner that restarts (new epoch, empty table) gets its own flows back from its peers' bulk
/// answers, which carry the synced copies too: the return traffic of those flows will reach it
/// again once it announces its LIPs.
#[test]
fn test_a_restarted_owner_gets_its_flows_back_in_bulk_answers() {
    let mut net = Net::new(&["a", "b", "c"], small());
    net.connect_all();
    let now = net.now;
    for n in 0..200 {
        net.nodes[0].event(now, SessionEvent::Created(record(n, TcpState::Established)));
    }
    net.run(Duration::from_millis(50));
    assert_eq!(net.nodes[1].table.len(), 200);
    // a restarts: a new core with a higher epoch and an empty table.
    let names: Vec<String> = net.nodes.iter().map(|n| n.name.clone()).collect();
    let mut fresh = core(&["a", "b", "c"], 0, 999, small(), net.now);
    fresh.set_peers(&names);
    for name in &names {
        fresh.peer_connected(name);
    }
    net.nodes[0].core = fresh;
    net.nodes[0].table.clear();
    for other in 1..3 {
        net.nodes[other].core.peer_disconnected("a");
        net.nodes[other].core.peer_connected("a");
    }
    net.run(Duration::from_millis(50));
    assert!(net.nodes[0].core.is_warm());
    assert_eq!(net.nodes[0].table.len(), 200, "a's flows are back");
    assert_eq!(net.nodes[0].owned().len(), 200, "as a's own");
    // A refresh still carries only what a node speaks for: b does not echo a's flows to c.
    let sent_before: u64 = net.nodes[1]
        .core
        .stats()
        .iter()
        .map(|p| p.sent_entries)
        .sum();
    net.run(small().refresh_interval + Duration::from_millis(50));
    let sent_after: u64 = net.nodes[1]
        .core
        .stats()
        .iter()
        .map(|p| p.sent_entries)
        .sum();
    assert_eq!(sent_after, sent_before, "b speaks for none of a's flows");
}

#[test]
fn test_close_on_the_owner_removes_on_peers() {
    let mut net = Net::new(&["a", "b", "c"], small());
    net.connect_all();
    let now = net.now;
    for n in 0..100 {
        net.nodes[0].event(now, SessionEvent::Created(record(n, TcpState::SynRecv)));
    }
    net.run(Duration::from_millis(5));
    assert_eq!(net.nodes[1].table.len(), 100);
    assert_eq!(net.nodes[2].table.len(), 100);
    let now = net.now;
    for n in 0..50 {
        net.nodes[0].event(now, SessionEvent::Closed(record(n, TcpState::Close)));
    }
    net.run(Duration::from_millis(5));
    for node in &net.nodes {
        assert_eq!(node.states(), net.nodes[0].states(), "{}", node.name);
    }
    assert!(net.nodes[1].table.records().iter().all(|r| r.synced));
}

/// Updates lost in an overflowing queue, removals among them: the resync's end removes on B
/// what A closed meanwhile (a resync that only added would leave those copies behind).
#[test]
fn test_queue_overflow_resyncs_the_peer_with_nothing_missing() {
    let config = Config {
        batch_entries: 16,
        queue_entries: 64,
        ..Config::default()
    };
    let mut net = Net::new(&["a", "b"], config.clone());
    net.connect_all();
    let now = net.now;
    for n in 0..100 {
        net.nodes[0].event(now, SessionEvent::Created(record(n, TcpState::SynRecv)));
    }
    net.run(Duration::from_millis(5));
    assert_eq!(net.nodes[1].table.len(), 100);
    // B stops draining A's frames; A closes half of its flows and keeps creating others.
    net.stalled.push((0, 1));
    let now = net.now;
    for n in 0..50 {
        net.nodes[0].event(now, SessionEvent::Closed(record(n, TcpState::Close)));
    }
    for n in 100..1000 {
        let now = net.now;
        net.nodes[0].event(now, SessionEvent::Created(record(n, TcpState::SynRecv)));
        if n % 100 == 0 {
            net.step();
        }
    }
    let stats = net.nodes[0].core.stats();
    assert!(stats[0].resyncs >= 1);
    assert!(stats[0].dropped.queue_overflow > 0);
    assert!(stats[0].queue_depth <= 64, "the queue stays bounded");
    net.stalled.clear();
    // The resync waits for the next table copy, at most `table_interval` away.
    net.run(config.table_interval + Duration::from_millis(50));
    assert_eq!(net.nodes[1].states(), net.nodes[0].states());
    assert!(net.nodes[1].reconciled >= 50, "the lost removals");
}

#[test]
fn test_lossy_duplicating_reordering_network_converges() {
    let mut net = Net::new(&["a", "b", "c"], small());
    net.faults = Faults {
        loss: 10,
        dup: 10,
        reorder: 20,
    };
    net.connect_all();
    for round in 0..200u32 {
        let now = net.now;
        for n in 0..10 {
            let id = round * 10 + n;
            let owner = (id % 2) as usize * 2;
            net.nodes[owner].event(
                now,
                SessionEvent::Created(record_of(owner, id, TcpState::SynRecv)),
            );
            if id % 3 == 0 {
                net.nodes[owner].event(
                    now,
                    SessionEvent::StateChanged(record_of(owner, id, TcpState::Established)),
                );
            }
        }
        net.step();
    }
    // Lost batches are found by the gaps the next batch reveals (a refresh sends some).
    net.run(Duration::from_secs(31));
    net.faults = Faults::default();
    net.run(Duration::from_secs(31));
    let mut live = net.nodes[0].owned();
    live.extend(net.nodes[2].owned());
    assert_eq!(live.len(), 2000);
    for node in &net.nodes {
        let states = node.states();
        for (k, s) in &live {
            assert_eq!(states.get(k), Some(s), "{} has {k:?}", node.name);
        }
    }
    let b = net.nodes[1].core.stats();
    assert!(b.iter().any(|s| s.gaps > 0));
    assert!(
        b.iter().any(|s| s.dropped.replayed > 0),
        "duplicates are dropped"
    );
}

#[test]
fn test_refresh_resends_owned_sessions_with_grace() {
    let config = small();
    let mut net = Net::new(&["a", "b"], config.clone());
    net.connect_all();
    let now = net.now;
    net.nodes[0].event(now, SessionEvent::Created(record(1, TcpState::Established)));
    net.run(Duration::from_millis(5));
    let before = net.nodes[1].core.stats()[0].received_entries;
    // A's copy of the flow is touched by traffic (no event: the state did not change).
    net.nodes[0].table.own(SessionRecord {
        expires_in_secs: 800,
        ..record(1, TcpState::Established)
    });
    net.run(config.refresh_interval);
    assert!(net.nodes[1].core.stats()[0].received_entries > before);
    let copy = net.nodes[1]
        .table
        .get(&key(&record(1, TcpState::Established)))
        .unwrap();
    assert_eq!(
        u64::from(copy.expires_in_secs),
        800 + config.expiry_grace.as_secs()
    );
    // B holds only synced sessions: its refresh sends nothing.
    assert_eq!(net.nodes[0].core.stats()[0].received_entries, 0);
}

#[test]
fn test_a_forwarded_synced_session_is_adopted_and_its_changes_reach_peers() {
    let mut net = Net::new(&["a", "b", "c"], small());
    net.connect_all();
    let now = net.now;
    net.nodes[0].event(now, SessionEvent::Created(record(1, TcpState::Established)));
    net.nodes[0].event(now, SessionEvent::Created(record(2, TcpState::Established)));
    net.run(Duration::from_millis(5));
    // A fails; B forwards flow 1 and sees it change state.
    net.nodes[0].core.set_peers::<&str>(&[]);
    for i in 1..3 {
        net.nodes[i].core.set_peers(&["b", "c"]);
    }
    let mut r = net.nodes[1]
        .table
        .get(&key(&record(1, TcpState::FinWait)))
        .unwrap();
    r.state = FlowState::Tcp(TcpState::FinWait);
    let now = net.now;
    net.nodes[1].event(now, SessionEvent::StateChanged(r));
    assert_eq!(net.nodes[1].core.adopted(), 1);
    // Flow 2 merely expires on B's timer: that is not news for C.
    let r2 = net.nodes[1]
        .table
        .get(&key(&record(2, TcpState::Established)))
        .unwrap();
    net.nodes[1].event(now, SessionEvent::Closed(r2));
    net.run(Duration::from_millis(5));
    let c = &net.nodes[2].table;
    assert_eq!(
        c.get(&key(&r)).unwrap().state,
        FlowState::Tcp(TcpState::FinWait)
    );
    assert!(c.contains(&key(&r2)));
    // The adopted flow's close is sent.
    let now = net.now;
    net.nodes[1].event(now, SessionEvent::Closed(r));
    net.run(Duration::from_millis(5));
    assert!(!net.nodes[2].table.contains(&key(&r)));
    assert_eq!(net.nodes[1].core.adopted(), 0);
}

#[test]
fn test_lag_is_measured_from_event_to_apply() {
    let mut net = Net::new(&["a", "b"], small());
    net.connect_all();
    net.run(Duration::from_millis(2));
    let now = net.now;
    net.nodes[0].event(now, SessionEvent::Created(record(1, TcpState::SynRecv)));
    net.run(Duration::from_millis(5));
    let s = &net.nodes[1].core.stats()[0];
    // Waited for the flush (1 ms) on A; the simulated link's latency is not visible.
    assert!(s.lag_last >= Duration::from_millis(1), "{:?}", s.lag_last);
    assert!(s.lag_max >= s.lag_last);
}

/// Closes that happen while the link to B is down never reach B; the bulk answer B gets on
/// reconnecting ends complete and removes them.
#[test]
fn test_removals_lost_in_a_disconnect_do_not_outlive_the_reconnect() {
    let mut net = Net::new(&["a", "b"], small());
    net.connect_all();
    let now = net.now;
    for n in 0..100 {
        net.nodes[0].event(now, SessionEvent::Created(record(n, TcpState::Established)));
    }
    net.run(Duration::from_millis(5));
    assert_eq!(net.nodes[1].table.len(), 100);
    net.disconnect(0, 1);
    let now = net.now;
    for n in 0..50 {
        net.nodes[0].event(now, SessionEvent::Closed(record(n, TcpState::Close)));
    }
    net.run(Duration::from_millis(5));
    assert_eq!(net.nodes[1].table.len(), 100, "b missed the closes");
    net.reconnect(0, 1);
    net.run(Duration::from_millis(50));
    assert!(net.nodes[1].core.is_warm());
    assert_eq!(net.nodes[1].states(), net.nodes[0].states());
    assert_eq!(net.nodes[1].reconciled, 50);
    assert_eq!(net.nodes[1].core.stats()[0].reconciles, 1);
}

/// A flow of a's that a closed and whose close b never heard of (the batch was lost) holds
/// a's LIP:port on b. a gives that LIP:port to another client's flow: a's record of it takes
/// the place of the stale copy on b at once, so the real server's answers to that port are
/// rewritten towards the new client should they reach b.
#[test]
fn test_a_stale_copy_gives_way_to_the_owners_new_flow_on_its_port() {
    let mut net = Net::new(&["a", "b"], small());
    net.connect_all();
    net.run(Duration::from_millis(5));
    let first = record(7, TcpState::Established);
    let now = net.now;
    net.nodes[0].event(now, SessionEvent::Created(first));
    net.run(Duration::from_millis(5));
    assert!(net.nodes[1].table.contains(&key(&first)));
    net.faults.loss = 100;
    let now = net.now;
    net.nodes[0].event(now, SessionEvent::Closed(first));
    net.run(Duration::from_millis(2));
    net.faults.loss = 0;
    let second = SessionRecord {
        client: "10.9.9.9:50000".parse().unwrap(),
        ..first
    };
    let now = net.now;
    net.nodes[0].event(now, SessionEvent::Created(second));
    // As soon as a's record arrives, before any bulk answer could.
    net.run(Duration::from_micros(1500));
    let b = &net.nodes[1];
    assert_eq!(
        b.table.by_server.get(&server_key(&second)),
        Some(&key(&second)),
        "a's LIP:port is the new client's on b"
    );
    assert!(!b.table.contains(&key(&first)));
    net.run(Duration::from_millis(50));
    assert_eq!(net.nodes[1].states(), net.nodes[0].states());
}

/// The batch `from` would send `to` next, with `entries` instead of its own.
fn forged(net: &mut Net, from: usize, to: &str, entries: Vec<SessionRecord>) -> Vec<u8> {
    let now = net.now;
    let mut batch = codec::decode(&net.nodes[from].core.poll_transmit(now, to).unwrap()).unwrap();
    batch.entries = entries
        .into_iter()
        .map(|record| codec::Entry {
            record,
            closed: false,
            age_us: Some(1),
        })
        .collect();
    codec::encode(&batch).unwrap()
}

/// Only the owner of a LIP speaks for its flows while it is connected: c's records of a's flows,
/// of b's own flows once b's flows were handed back, and of a LIP no node has are refused and
/// counted, and change nothing on b.
#[test]
fn test_records_of_flows_their_sender_does_not_own_are_refused_and_counted() {
    let mut net = Net::new(&["a", "b", "c"], small());
    net.connect_all();
    let now = net.now;
    net.nodes[0].event(now, SessionEvent::Created(record(1, TcpState::Established)));
    net.nodes[1].event(
        now,
        SessionEvent::Created(record_of(1, 2, TcpState::Established)),
    );
    net.run(Duration::from_millis(50));
    let before = net.nodes[1].states();
    // c forges: a's flow in another state, b's own flow, a flow on a LIP nobody has, and a
    // close of a's flow.
    let mut of_a = record(1, TcpState::Close);
    of_a.synced = false;
    let of_b = record_of(1, 2, TcpState::Close);
    let mut nobodys = record(3, TcpState::Established);
    nobodys.local = "198.19.250.1:3".parse().unwrap();
    net.nodes[2].event(
        net.now,
        SessionEvent::Created(record_of(2, 4, TcpState::Established)),
    );
    net.nodes[2]
        .core
        .handle_timeout(net.now + Duration::from_millis(1));
    let frame = forged(&mut net, 2, "b", vec![of_a, of_b, nobodys]);
    let now = net.now;
    net.nodes[1].core.handle_frame(now, "c", &frame);
    let mut close = codec::decode(&frame).unwrap();
    close.seq += 1;
    close.entries = vec![codec::Entry {
        record: record(1, TcpState::Close),
        closed: true,
        age_us: Some(1),
    }];
    net.nodes[1]
        .core
        .handle_frame(now, "c", &codec::encode(&close).unwrap());
    net.nodes[1].run_outputs(now);
    assert_eq!(net.nodes[1].states(), before);
    let dropped = net.nodes[1].core.stats()[1].dropped;
    assert_eq!((dropped.not_owner, dropped.unknown_lip), (3, 1));
    assert_eq!(net.nodes[1].refused, 0, "nothing reached the table");
}

/// A peer that restarted with a lower epoch (its epoch came from a clock that stepped back) is
/// stale on the connection that knew its higher epoch; a new connection starts afresh, and its
/// table comes in.
#[test]
fn test_a_peer_whose_epoch_went_back_is_heard_on_a_new_connection() {
    let mut net = Net::new(&["a", "b"], small());
    net.connect_all();
    let now = net.now;
    net.nodes[0].event(now, SessionEvent::Created(record(1, TcpState::Established)));
    net.run(Duration::from_millis(20));
    // a comes back in epoch 5, below the 100 b knew; b's connection to it was not yet seen to
    // break.
    let mut back = core(&["a", "b"], 0, 5, small(), net.now);
    back.set_peers(&["b"]);
    back.peer_connected("b");
    net.nodes[0].core = back;
    net.run(Duration::from_millis(20));
    assert!(net.nodes[1].core.stats()[0].dropped.stale_epoch > 0);
    // The transport notices: b sees a new connection from a.
    net.reconnect(0, 1);
    net.nodes[0].event(
        net.now,
        SessionEvent::Created(record(2, TcpState::Established)),
    );
    net.run(Duration::from_millis(50));
    assert!(net.nodes[1].core.is_warm());
    assert!(net.nodes[0].core.is_warm());
    assert!(
        net.nodes[1]
            .table
            .contains(&key(&record(2, TcpState::Established)))
    );
}

/// The node's table is copied at most once per `table_interval`: requests of several peers
/// within it share one copy, and a peer that asks over and over gets no copy of its own per
/// request.
#[test]
fn test_table_copies_are_rate_limited() {
    let interval = Config::default().table_interval;
    let config = Config {
        bulk_retry: Duration::from_secs(100),
        ..small()
    };
    let config = Config {
        table_interval: interval,
        ..config
    };
    let names = ["a", "b", "c", "d"];
    let mut net = Net::new(&names, config);
    net.connect_all();
    let now = net.now;
    // Every peer's request reaches a at once.
    let frames: Vec<(String, Vec<u8>)> = (1..4)
        .map(|i| {
            let f = net.nodes[i].core.poll_transmit(now, "a").unwrap();
            (names[i].to_owned(), f)
        })
        .collect();
    let a = &mut net.nodes[0].core;
    for (from, f) in &frames {
        a.handle_frame(now, from, f);
    }
    let copies = |a: &mut Core, now: Instant| {
        std::iter::from_fn(|| a.poll_output(now))
            .filter(|o| *o == Output::TableWanted)
            .count()
    };
    assert_eq!(copies(a, now), 1, "one copy for three requests");
    a.handle_table(Vec::new());
    let streams: u64 = a.stats().iter().map(|p| p.table_streams).sum();
    assert_eq!(streams, 3);
    // b asks again every millisecond for a second.
    let mut request = codec::decode(&frames[0].1).unwrap();
    let mut total = 0;
    for ms in 1..=1000u64 {
        let t = now + Duration::from_millis(ms);
        request.seq += 1;
        if let Some(r) = &mut request.bulk_request {
            r.id += 1;
        }
        a.handle_frame(t, "b", &codec::encode(&request).unwrap());
        a.handle_timeout(t);
        let n = copies(a, t);
        if n > 0 {
            a.handle_table(Vec::new());
        }
        total += n;
    }
    let most = (Duration::from_secs(1).as_millis() / interval.as_millis()) as usize;
    assert!((1..=most).contains(&total), "{total} copies in a second");
    // The last request is answered, by the copy after it.
    let later = now + Duration::from_secs(2);
    a.handle_timeout(later);
    if copies(a, later) > 0 {
        a.handle_table(Vec::new());
    }
    let answered = std::iter::from_fn(|| a.poll_transmit(later, "b"))
        .filter_map(|f| codec::decode(&f).unwrap().table_end)
        .last();
    let last = request.bulk_request.map(|r| r.id);
    assert_eq!(answered.and_then(|end| end.request), last);
}

mod convergence {
    //! Random runs of the simulated network with loss, overflowing queues, broken and
    //! restored connections and restarts; once it is quiet, every node's copy of every owner's
    //! flows equals the owner's table.

    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;

    const NODES: usize = 3;
    /// LIP ports per owner: few, so they are reused while stale copies may still hold them.
    const PORTS: u16 = 6;

    fn config() -> Config {
        Config {
            batch_entries: 4,
            queue_entries: 8,
            refresh_interval: Duration::from_millis(100),
            bulk_retry: Duration::from_millis(50),
            table_interval: Duration::from_millis(10),
            ..Config::default()
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// The owner opens a flow from one of its few clients, on its lowest free LIP port.
        Open {
            owner: usize,
            client: u8,
        },
        /// The owner closes one of its flows.
        Close {
            owner: usize,
            nth: usize,
        },
        /// One of the owner's flows changes state.
        Change {
            owner: usize,
            nth: usize,
        },
        Disconnect(usize, usize),
        Reconnect(usize, usize),
        /// A link stops carrying frames for a while: the sender's queue overflows.
        Stall(usize, usize),
        Unstall(usize, usize),
        /// Frames are lost at this rate (percent).
        Loss(u8),
        Restart(usize),
        Run(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        let node = 0..NODES;
        prop_oneof![
            6 => (node.clone(), 0u8..12).prop_map(|(owner, client)| Op::Open { owner, client }),
            3 => (node.clone(), any::<usize>()).prop_map(|(owner, nth)| Op::Close { owner, nth }),
            2 => (node.clone(), any::<usize>()).prop_map(|(owner, nth)| Op::Change { owner, nth }),
            1 => (node.clone(), node.clone()).prop_map(|(i, j)| Op::Disconnect(i, j)),
            1 => (node.clone(), node.clone()).prop_map(|(i, j)| Op::Reconnect(i, j)),
            1 => (node.clone(), node.clone()).prop_map(|(i, j)| Op::Stall(i, j)),
            1 => (node.clone(), node.clone()).prop_map(|(i, j)| Op::Unstall(i, j)),
            1 => prop_oneof![Just(0u8), Just(20), Just(100)].prop_map(Op::Loss),
            1 => node.prop_map(Op::Restart),
            4 => (0u8..20).prop_map(Op::Run),
        ]
    }

    /// The owner's flows, in a stable order.
    fn owned(net: &Net, owner: usize) -> Vec<SessionRecord> {
        let mut flows: Vec<SessionRecord> = net.nodes[owner]
            .table
            .records()
            .into_iter()
            .filter(|r| !r.synced)
            .collect();
        flows.sort_by_key(|r| (r.local.port(), r.client));
        flows
    }

    fn apply(net: &mut Net, down: &mut HashSet<(usize, usize)>, epochs: &mut u64, op: Op) {
        let now = net.now;
        match op {
            Op::Open { owner, client } => {
                let node = &net.nodes[owner];
                let client = SocketAddr::from((
                    [10, owner as u8, 0, 1 + client % 3],
                    40_000 + u16::from(client / 3),
                ));
                let vip: SocketAddr = "198.18.100.1:80".parse().unwrap();
                // A packet of a flow the node holds in any form follows that session.
                if node.table.contains(&(L4Proto::Tcp, client, vip)) {
                    return;
                }
                let used: HashSet<u16> = owned(net, owner).iter().map(|r| r.local.port()).collect();
                let Some(port) = (1..=PORTS).find(|p| !used.contains(p)) else {
                    return;
                };
                let r = SessionRecord {
                    client,
                    local: SocketAddr::new(lip(owner), port),
                    ..record_of(owner, 0, TcpState::SynRecv)
                };
                net.nodes[owner].event(now, SessionEvent::Created(r));
            }
            Op::Close { owner, nth } => {
                let flows = owned(net, owner);
                if !flows.is_empty() {
                    let r = flows[nth % flows.len()];
                    net.nodes[owner].event(now, SessionEvent::Closed(r));
                }
            }
            Op::Change { owner, nth } => {
                let flows = owned(net, owner);
                if !flows.is_empty() {
                    let mut r = flows[nth % flows.len()];
                    r.state = match r.state {
                        FlowState::Tcp(TcpState::SynRecv) => FlowState::Tcp(TcpState::Established),
                        _ => FlowState::Tcp(TcpState::FinWait),
                    };
                    net.nodes[owner].event(now, SessionEvent::StateChanged(r));
                }
            }
            Op::Disconnect(i, j) if i != j => {
                down.insert((i.min(j), i.max(j)));
                net.disconnect(i, j);
            }
            Op::Reconnect(i, j) if i != j => {
                down.remove(&(i.min(j), i.max(j)));
                net.reconnect(i, j);
            }
            Op::Stall(i, j) if i != j => net.stalled.push((i, j)),
            Op::Unstall(i, j) => net.stalled.retain(|&l| l != (i, j)),
            Op::Loss(percent) => net.faults.loss = u64::from(percent),
            Op::Restart(i) => {
                *epochs += 1;
                let reachable: Vec<usize> = (0..NODES)
                    .filter(|&j| j != i && !down.contains(&(i.min(j), i.max(j))))
                    .collect();
                net.restart(i, *epochs, config(), &reachable);
            }
            Op::Run(ms) => net.run(Duration::from_millis(u64::from(ms))),
            Op::Disconnect(..) | Op::Reconnect(..) | Op::Stall(..) => {}
        }
        net.step();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn prop_every_copy_equals_its_owners_table_once_quiet(
            ops in proptest::collection::vec(op(), 1..80),
            seed in 1u64..,
        ) {
            let names = ["a", "b", "c"];
            let mut net = Net::new(&names, config());
            net.rng = Rng(seed);
            net.connect_all();
            net.run(Duration::from_millis(5));
            let mut down = HashSet::new();
            let mut epochs = 1000;
            for op in ops {
                apply(&mut net, &mut down, &mut epochs, op);
            }
            // Quiet: every link up and clean, no new flows; a refresh and more.
            net.faults = Faults::default();
            net.stalled.clear();
            for (i, j) in down.drain() {
                net.reconnect(i, j);
            }
            net.run(config().refresh_interval * 3);
            for owner in 0..NODES {
                let truth: HashMap<Key, (u16, FlowState)> = net.nodes[owner].on_lip(lip(owner));
                prop_assert!(net.nodes[owner].table.records().iter()
                    .filter(|r| r.local.ip() == lip(owner)).all(|r| !r.synced));
                for n in 0..NODES {
                    if n != owner {
                        prop_assert_eq!(&net.nodes[n].on_lip(lip(owner)), &truth,
                            "{}'s copy of {}'s flows", names[n], names[owner]);
                    }
                }
            }
            for node in &net.nodes {
                prop_assert!(node.core.is_warm(), "{} warm", node.name);
            }
        }
    }
}

//! The protocol core between two or three nodes in memory: simulated time, loss, duplication
//! and reordering; no sockets, no clock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dataplane::{FlowState, L4Proto, SessionEvent, SessionRecord, TcpState};
use sessionsync::codec::{self, Batch};
use sessionsync::{Apply, Config, Core, Output};

type Key = (L4Proto, SocketAddr, SocketAddr);

fn record(n: u32, state: TcpState) -> SessionRecord {
    let [a, b] = ((n >> 16) as u16).to_be_bytes();
    SessionRecord {
        proto: L4Proto::Tcp,
        client: SocketAddr::from(([10, a, b, 1], n as u16)),
        vip: "198.18.100.1:80".parse().unwrap(),
        local: SocketAddr::from(([198, 19, 200, 1], n as u16)),
        backend: "198.18.3.10:8080".parse().unwrap(),
        state: FlowState::Tcp(state),
        window: Default::default(),
        expires_in_secs: 900,
        synced: false,
    }
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

/// A node: its core and a session table standing in for the engine.
struct Node {
    name: String,
    core: Core,
    table: HashMap<Key, SessionRecord>,
}

impl Node {
    /// A session of this node's own traffic: in its table, and its event to the core.
    fn event(&mut self, now: Instant, ev: SessionEvent) {
        match ev {
            SessionEvent::Created(r) | SessionEvent::StateChanged(r) => {
                self.table.insert(key(&r), r);
            }
            SessionEvent::Closed(r) => {
                self.table.remove(&key(&r));
            }
        }
        self.core.handle_event(now, ev);
    }

    fn owned(&self) -> HashMap<Key, FlowState> {
        self.table
            .iter()
            .filter(|(_, r)| !r.synced)
            .map(|(k, r)| (*k, r.state))
            .collect()
    }

    fn states(&self) -> HashMap<Key, FlowState> {
        self.table.iter().map(|(k, r)| (*k, r.state)).collect()
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
                core: Core::new(name, 100 + i as u64, config.clone(), now).unwrap(),
                table: HashMap::new(),
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
            while let Some(out) = node.core.poll_output(now) {
                match out {
                    Output::TableWanted => {
                        let table = node.table.values().copied().collect();
                        node.core.handle_table(table);
                    }
                    // As `Engine::install`: an existing session keeps its `synced` flag.
                    Output::Apply(Apply::Install(r)) => {
                        let entry = node.table.entry(key(&r)).or_insert(r);
                        *entry = SessionRecord {
                            synced: entry.synced,
                            ..r
                        };
                    }
                    Output::Apply(Apply::Remove(r)) => {
                        node.table.remove(&key(&r));
                    }
                }
            }
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
}

fn small() -> Config {
    Config {
        batch_entries: 64,
        queue_entries: 4096,
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
    let mut restarted = Core::new("a", 101, small(), now).unwrap();
    restarted.set_peers(&["b"]);
    restarted.peer_connected("b");
    let fresh = restarted.poll_transmit(now, "b").unwrap();
    b.handle_frame(now, "a", &fresh);
    assert_eq!(b.stats()[0].received_batches, frames.len() as u64 + 1);
    // Now anything of the old epoch is stale, even with a new sequence number.
    let mut old = Core::new("a", 100, small(), now).unwrap();
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
        net.nodes[0].table.insert(
            key(&record(n, TcpState::Established)),
            record(n, TcpState::Established),
        );
    }
    for n in 5000..6000 {
        net.nodes[2].table.insert(
            key(&record(n, TcpState::Established)),
            record(n, TcpState::Established),
        );
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
        let r = record(n, TcpState::Established);
        net.nodes[1].table.insert(key(&r), r);
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
        let r = record(n, TcpState::Established);
        net.nodes[1].table.insert(key(&r), r);
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
        let r = record(n, TcpState::Established);
        net.nodes[1].table.insert(key(&r), r);
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
        net.nodes[1].event(now, SessionEvent::Created(record(n, TcpState::SynRecv)));
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
    let mut fresh = Core::new("a", 999, small(), net.now).unwrap();
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
    assert!(net.nodes[1].table.values().all(|r| r.synced));
}

#[test]
fn test_queue_overflow_resyncs_the_peer_with_nothing_missing() {
    let config = Config {
        batch_entries: 16,
        queue_entries: 64,
        ..Config::default()
    };
    let mut net = Net::new(&["a", "b"], config);
    net.connect_all();
    net.run(Duration::from_millis(2));
    // B stops draining A's frames; A keeps creating sessions.
    net.stalled.push((0, 1));
    for n in 0..1000 {
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
    net.run(Duration::from_millis(50));
    assert_eq!(net.nodes[1].states(), net.nodes[0].states());
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
            net.nodes[owner].event(now, SessionEvent::Created(record(id, TcpState::SynRecv)));
            if id % 3 == 0 {
                net.nodes[owner].event(
                    now,
                    SessionEvent::StateChanged(record(id, TcpState::Established)),
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
    net.nodes[0]
        .table
        .get_mut(&key(&record(1, TcpState::Established)))
        .unwrap()
        .expires_in_secs = 800;
    net.run(config.refresh_interval);
    assert!(net.nodes[1].core.stats()[0].received_entries > before);
    let copy = net.nodes[1].table[&key(&record(1, TcpState::Established))];
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
    let mut r = net.nodes[1].table[&key(&record(1, TcpState::FinWait))];
    r.state = FlowState::Tcp(TcpState::FinWait);
    let now = net.now;
    net.nodes[1].event(now, SessionEvent::StateChanged(r));
    assert_eq!(net.nodes[1].core.adopted(), 1);
    // Flow 2 merely expires on B's timer: that is not news for C.
    let r2 = net.nodes[1].table[&key(&record(2, TcpState::Established))];
    net.nodes[1].event(now, SessionEvent::Closed(r2));
    net.run(Duration::from_millis(5));
    let c = &net.nodes[2].table;
    assert_eq!(c[&key(&r)].state, FlowState::Tcp(TcpState::FinWait));
    assert!(c.contains_key(&key(&r2)));
    // The adopted flow's close is sent.
    let now = net.now;
    net.nodes[1].event(now, SessionEvent::Closed(r));
    net.run(Duration::from_millis(5));
    assert!(!net.nodes[2].table.contains_key(&key(&r)));
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

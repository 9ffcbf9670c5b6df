//! The driver over real loopback QUIC with mutual TLS: three nodes in one process, real
//! `dataplane::Engine`s receiving what peers send.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dataplane::sched::{MaglevParams, SchedulerKind};
use dataplane::{
    BackendConfig, Engine, EngineConfig, FlowState, Instant, L4Proto, ServiceConfig, SessionEvent,
    SessionRecord, Snapshot, TcpState, Timeouts,
};
use quinn::Endpoint;
use sessionsync::{Apply, Config, SyncHandle};
use tokio::sync::mpsc;

use testpki::Ca;

mod support;

const SESSIONS: u32 = 100_000;
const NOW: Instant = Instant::from_secs(1000);

/// The nodes of the tests, each with two LIPs (`SESSIONS` flows need two LIPs' ports).
const NAMES: [&str; 3] = ["a", "b", "c"];

fn lips(name: &str) -> Vec<IpAddr> {
    let i = NAMES.iter().position(|n| *n == name).unwrap() as u8;
    (0..2)
        .map(|k| IpAddr::V4(Ipv4Addr::new(198, 19, 10 + i, k)))
        .collect()
}

/// The `n`-th flow of node `owner`, on its LIPs.
fn record(owner: &str, n: u32) -> SessionRecord {
    SessionRecord {
        proto: L4Proto::Tcp,
        client: SocketAddr::from(([10, 0, (n >> 16) as u8, 1], n as u16)),
        vip: "198.18.100.1:80".parse().unwrap(),
        local: SocketAddr::new(
            lips(owner)[(n / 50_000) as usize],
            1024 + (n % 50_000) as u16,
        ),
        backend: "198.18.3.10:8080".parse().unwrap(),
        state: FlowState::Tcp(TcpState::Established),
        window: Default::default(),
        expires_in_secs: 900,
        synced: false,
        syn_proxy: None,
    }
}

fn engine(lips: Vec<IpAddr>) -> Arc<Engine> {
    let service = ServiceConfig {
        vip: "198.18.100.1:80".parse().unwrap(),
        proto: L4Proto::Tcp,
        scheduler: SchedulerKind::Rr,
        timeouts: Timeouts::default(),
        toa: false,
        conn_reuse: dataplane::ConnReuse::default(),
        syn_proxy: dataplane::SynProxy::default(),
        backends: vec![BackendConfig {
            addr: "198.18.3.10:8080".parse().unwrap(),
            weight: 1,
            healthy: true,
        }],
    };
    let snap = Snapshot::new(1, &[service], MaglevParams::default(), None).unwrap();
    Engine::new(
        EngineConfig {
            max_sessions_v4: 2 * SESSIONS,
            max_sessions_v6: 16,
            local_addrs: lips,
            ..EngineConfig::default()
        },
        snap,
    )
    .unwrap()
}

type Key = (SocketAddr, SocketAddr, SocketAddr, FlowState);

fn keys(records: impl IntoIterator<Item = SessionRecord>) -> HashSet<Key> {
    records
        .into_iter()
        .map(|r| (r.client, r.local, r.backend, r.state))
        .collect()
}

/// How the tests' table copies ran.
#[derive(Default)]
struct Copies {
    count: AtomicUsize,
    /// A copy ran on a thread of the async runtime.
    on_runtime: AtomicBool,
}

/// A node: its engine (sessions synced from peers), the sessions its own traffic made (an
/// engine creates those only from packets, so the test keeps them beside it), and sync.
struct Node {
    name: &'static str,
    engine: Arc<Engine>,
    owned: Arc<Mutex<HashMap<SocketAddr, SessionRecord>>>,
    events: mpsc::Sender<SessionEvent>,
    sync: SyncHandle,
    endpoint: Endpoint,
    client: quinn::ClientConfig,
    /// What the engine refused of what peers sent.
    refused: Arc<Mutex<Vec<String>>>,
    copies: Arc<Copies>,
}

impl Node {
    fn start(ca: &Ca, name: &'static str, epoch: u64, config: Config) -> Node {
        let engine = engine(lips(name));
        let owned: Arc<Mutex<HashMap<SocketAddr, SessionRecord>>> = Arc::default();
        let (events, rx) = mpsc::channel(2 * SESSIONS as usize);
        let copies = Arc::new(Copies::default());
        let source = {
            let (engine, owned, copies) = (engine.clone(), owned.clone(), copies.clone());
            move || {
                copies.count.fetch_add(1, Ordering::Relaxed);
                if tokio::runtime::Handle::try_current().is_ok() {
                    copies.on_runtime.store(true, Ordering::Relaxed);
                }
                let mut all: Vec<SessionRecord> = owned.lock().unwrap().values().copied().collect();
                all.extend(engine.sessions(NOW));
                all
            }
        };
        let refused: Arc<Mutex<Vec<String>>> = Arc::default();
        let (target, errors) = (engine.clone(), refused.clone());
        let sync = SyncHandle::start(name, epoch, config, rx, source, move |a| {
            let result = match a {
                Apply::Install(r, authority) => target.install(NOW, &r, authority).map(drop),
                Apply::Remove(r) => target.remove(&r).map(drop),
                Apply::Reconcile { lips, mark } => {
                    target.reconcile(&lips, mark);
                    Ok(())
                }
            };
            if let Err(e) = result {
                errors.lock().unwrap().push(e.to_string());
            }
        })
        .unwrap();
        sync.set_peers(&NAMES);
        let all: Vec<(String, Vec<IpAddr>)> =
            NAMES.iter().map(|n| (n.to_string(), lips(n))).collect();
        sync.set_lips(&all);
        let (endpoint, client) = ca.endpoint(name, sessionsync::ALPN);
        Node {
            name,
            engine,
            owned,
            events,
            sync,
            endpoint,
            client,
            refused,
            copies,
        }
    }

    async fn create(&self, n: u32) {
        for i in 0..n {
            let r = record(self.name, i);
            self.owned.lock().unwrap().insert(r.client, r);
            self.events.send(SessionEvent::Created(r)).await.unwrap();
        }
    }

    async fn close(&self, n: u32) {
        for i in 0..n {
            let r = record(self.name, i);
            self.owned.lock().unwrap().remove(&r.client);
            self.events.send(SessionEvent::Closed(r)).await.unwrap();
        }
    }

    fn refused(&self) -> Vec<String> {
        self.refused.lock().unwrap().clone()
    }

    fn owned_keys(&self) -> HashSet<Key> {
        keys(self.owned.lock().unwrap().values().copied())
    }
}

/// `x` dials `y`; both hand the connection to their sync.
async fn link(x: &Node, y: &Node) {
    let (dialled, accepted) = support::connect(&x.endpoint, &x.client, &y.endpoint, y.name).await;
    x.sync.add_connection(y.name, dialled);
    y.sync.add_connection(x.name, accepted);
}

/// Waits for `done`, up to a deadline generous enough for a slow CI machine.
async fn wait(what: &str, done: impl Fn() -> bool) {
    wait_within(what, Duration::from_secs(120), done).await;
}

/// Waits for `done` for at most `limit`.
async fn wait_within(what: &str, limit: Duration, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn cluster(ca: &Ca, config: Config) -> [Node; 3] {
    let nodes = [
        Node::start(ca, "a", 1, config.clone()),
        Node::start(ca, "b", 1, Config::default()),
        Node::start(ca, "c", 1, Config::default()),
    ];
    link(&nodes[0], &nodes[1]).await;
    link(&nodes[0], &nodes[2]).await;
    link(&nodes[1], &nodes[2]).await;
    for n in &nodes {
        let sync = &n.sync;
        wait("warm", || sync.is_warm()).await;
    }
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_sessions_created_and_closed_on_a_follow_on_b_and_c() {
    let ca = Ca::new();
    let [a, b, c] = cluster(&ca, Config::default()).await;
    a.create(SESSIONS).await;
    for peer in [&b, &c] {
        let engine = &peer.engine;
        wait("sessions on peer", || {
            engine.session_count() == SESSIONS as usize
        })
        .await;
        assert_eq!(
            keys(peer.engine.sessions(NOW)),
            a.owned_keys(),
            "{}",
            peer.name
        );
        assert!(peer.engine.sessions(NOW).iter().all(|r| r.synced));
    }
    a.close(SESSIONS).await;
    for peer in [&b, &c] {
        let engine = &peer.engine;
        wait("sessions removed on peer", || engine.session_count() == 0).await;
    }
    let stats = a.sync.stats();
    assert!(stats.iter().all(|s| s.connected && s.dropped.total() == 0));
    assert!(
        stats
            .iter()
            .all(|s| s.sent_entries >= 2 * u64::from(SESSIONS))
    );
    for n in [&a, &b, &c] {
        assert_eq!(n.refused(), Vec::<String>::new(), "{}", n.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_restarted_node_bulk_syncs_to_the_owners_table() {
    let ca = Ca::new();
    let [a, b, c] = cluster(&ca, Config::default()).await;
    a.create(SESSIONS).await;
    let engine = &b.engine;
    wait("sessions on b", || {
        engine.session_count() == SESSIONS as usize
    })
    .await;
    drop(b);
    // B comes back empty, in a later epoch.
    let b = Node::start(&ca, "b", 2, Config::default());
    assert!(!b.sync.is_warm());
    link(&a, &b).await;
    link(&b, &c).await;
    let sync = &b.sync;
    wait("b warm", || sync.is_warm()).await;
    assert_eq!(keys(b.engine.sessions(NOW)), a.owned_keys());
    assert!(a.sync.stats().iter().all(|s| s.bulk_complete));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_queue_overflow_resyncs_with_nothing_missing() {
    let ca = Ca::new();
    // Events arrive in bursts far larger than A's queues: they overflow.
    let tight = Config {
        batch_entries: 256,
        queue_entries: 1024,
        ..Config::default()
    };
    let [a, b, c] = cluster(&ca, tight).await;
    a.create(SESSIONS).await;
    for peer in [&b, &c] {
        let engine = &peer.engine;
        wait("sessions on peer", || {
            engine.session_count() == SESSIONS as usize
        })
        .await;
        assert_eq!(
            keys(peer.engine.sessions(NOW)),
            a.owned_keys(),
            "{}",
            peer.name
        );
    }
    let stats = a.sync.stats();
    assert!(
        stats
            .iter()
            .any(|s| s.resyncs > 0 && s.dropped.queue_overflow > 0),
        "{stats:?}"
    );
    assert!(stats.iter().all(|s| s.queue_depth <= 1024));
}

/// A connection that arrives before its peer is in the set (the peer learnt of this node
/// first) counts once the peer joins the set: the node asks for its table and turns warm.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_connection_before_the_peer_is_known_counts_once_it_is() {
    let ca = Ca::new();
    let a = Node::start(&ca, "a", 1, Config::default());
    let b = Node::start(&ca, "b", 1, Config::default());
    a.sync.set_peers(&["b"]);
    b.sync.set_peers::<&str>(&[]);
    link(&a, &b).await;
    a.create(100).await;
    b.sync.set_peers(&["a"]);
    wait("b warm", || b.sync.is_warm()).await;
    wait("b holds a's sessions", || b.engine.session_count() == 100).await;
    // a's own request may have reached b before b knew it: then a's core asks again.
    wait("a warm", || a.sync.is_warm()).await;
}

/// The loss the core's table re-request is for, over QUIC: A knows B, B does not know A yet and
/// drops A's table request as a foreign frame. Once B knows A, A asks again after `bulk_retry`
/// and turns warm with B's table, with no session event anywhere to wake A's driver: the retry
/// is a timer of A's core, which A's driver must honour although it set it from the connection's
/// tasks. Well within the refresh interval (30 s), whose timer would wake it anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_a_table_request_the_peer_dropped_is_asked_again() {
    let ca = Ca::new();
    let config = Config {
        bulk_retry: Duration::from_millis(200),
        ..Config::default()
    };
    let a = Node::start(&ca, "a", 1, config);
    let b = Node::start(&ca, "b", 1, Config::default());
    a.sync.set_peers(&["b"]);
    b.sync.set_peers::<&str>(&[]);
    // Sessions B held before: in its table, without events.
    for i in 0..100 {
        let r = record("b", i);
        b.owned.lock().unwrap().insert(r.client, r);
    }
    link(&a, &b).await;
    wait_within("b to drop a's request", Duration::from_secs(10), || {
        b.sync.foreign_frames() >= 1
    })
    .await;
    b.sync.set_peers(&["a"]);
    wait_within("a warm", Duration::from_secs(10), || a.sync.is_warm()).await;
    assert_eq!(keys(a.engine.sessions(NOW)), b.owned_keys());
    assert!(a.sync.stats()[0].bulk_retries >= 1);
}

/// Table copies (bulk answers, refreshes) run on the driver's own thread, never on the async
/// runtime's workers; three peers asking at once share copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_table_copies_run_off_the_async_workers() {
    let ca = Ca::new();
    let [a, b, c] = cluster(&ca, Config::default()).await;
    a.create(1000).await;
    for peer in [&b, &c] {
        let engine = &peer.engine;
        wait("sessions on peer", || engine.session_count() == 1000).await;
    }
    for n in [&a, &b, &c] {
        assert!(n.copies.count.load(Ordering::Relaxed) >= 1, "{}", n.name);
        assert!(
            !n.copies.on_runtime.load(Ordering::Relaxed),
            "{} copied its table on an async worker",
            n.name
        );
    }
}

/// B restarts with an epoch below the one its peers knew (an epoch read from a clock that was
/// set back): on its new connections it is heard, turns warm, takes its own flows back from
/// its peers, and its new flows reach them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_a_node_restarted_with_a_lower_epoch_turns_warm() {
    let ca = Ca::new();
    let [a, b, c] = cluster(&ca, Config::default()).await;
    b.create(100).await;
    let engine = &a.engine;
    wait("b's flows on a", || engine.session_count() == 100).await;
    drop(b);
    let b = Node::start(&ca, "b", 0, Config::default());
    link(&a, &b).await;
    link(&b, &c).await;
    wait_within("b warm", Duration::from_secs(10), || b.sync.is_warm()).await;
    // b's flows came back to it as its own.
    assert_eq!(b.engine.session_count(), 100, "{:?}", b.refused());
    assert!(b.engine.sessions(NOW).iter().all(|r| !r.synced));
    // A flow b makes now reaches a.
    let r = record("b", 500);
    b.events.send(SessionEvent::Created(r)).await.unwrap();
    let engine = &a.engine;
    wait_within("b's new flow on a", Duration::from_secs(10), || {
        engine.session_count() == 101
    })
    .await;
    assert!(a.sync.stats().iter().all(|s| s.dropped.stale_epoch == 0));
}

/// Closes while the link is down never reach C; the bulk answer on the new connection removes
/// them there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_removals_lost_while_disconnected_are_gone_after_the_reconnect() {
    let ca = Ca::new();
    let [a, _b, c] = cluster(&ca, Config::default()).await;
    a.create(1000).await;
    let engine = &c.engine;
    wait("sessions on c", || engine.session_count() == 1000).await;
    // The a–c connection breaks; a closes half of its flows meanwhile.
    c.sync.set_peers(&["b"]);
    a.close(500).await;
    wait("a's close queued", || {
        a.sync.stats().iter().any(|s| s.peer == "c" && !s.connected)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(c.engine.session_count(), 1000, "c missed the closes");
    c.sync.set_peers(&NAMES);
    link(&a, &c).await;
    wait_within("c reconciled", Duration::from_secs(10), || {
        engine.session_count() == 500
    })
    .await;
    assert_eq!(keys(c.engine.sessions(NOW)), a.owned_keys());
}

/// A node that stops hands its last sessions to its peers before it goes: the events still in
/// its inbox and the batch still waiting to be flushed (a flush delay of a minute here) reach
/// both peers, and `close` returns because they confirmed, long before its grace is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_a_stopping_node_hands_its_last_sessions_to_its_peers() {
    let ca = Ca::new();
    let config = Config {
        flush_after: Duration::from_secs(60),
        ..Config::default()
    };
    let [a, b, c] = cluster(&ca, config).await;
    a.create(SESSIONS).await;
    let closed = tokio::time::timeout(
        Duration::from_secs(60),
        a.sync.close(Duration::from_secs(3600)),
    )
    .await;
    assert!(closed.is_ok(), "the peers never confirmed the hand-over");
    for peer in [&b, &c] {
        let engine = &peer.engine;
        wait_within(
            "the stopped node's sessions on its peer",
            Duration::from_secs(30),
            || engine.session_count() == SESSIONS as usize,
        )
        .await;
        assert_eq!(
            keys(peer.engine.sessions(NOW)),
            a.owned_keys(),
            "{}",
            peer.name
        );
        assert_eq!(peer.refused(), Vec::<String>::new(), "{}", peer.name);
    }
}

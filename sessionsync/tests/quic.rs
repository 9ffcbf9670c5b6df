//! The driver over real loopback QUIC with mutual TLS: three nodes in one process, real
//! `dataplane::Engine`s receiving what peers send.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
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

fn record(n: u32) -> SessionRecord {
    SessionRecord {
        proto: L4Proto::Tcp,
        client: SocketAddr::from(([10, 0, (n >> 16) as u8, 1], n as u16)),
        vip: "198.18.100.1:80".parse().unwrap(),
        local: SocketAddr::from(([198, 19, 200, (n >> 16) as u8], n as u16)),
        backend: "198.18.3.10:8080".parse().unwrap(),
        state: FlowState::Tcp(TcpState::Established),
        window: Default::default(),
        expires_in_secs: 900,
        synced: false,
    }
}

fn engine(lip: Ipv4Addr) -> Arc<Engine> {
    let service = ServiceConfig {
        vip: "198.18.100.1:80".parse().unwrap(),
        proto: L4Proto::Tcp,
        scheduler: SchedulerKind::Rr,
        timeouts: Timeouts::default(),
        toa: false,
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
            local_addrs: vec![lip.into()],
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
}

impl Node {
    fn start(ca: &Ca, name: &'static str, epoch: u64, config: Config) -> Node {
        let engine = engine(Ipv4Addr::new(198, 19, 201, 1));
        let owned: Arc<Mutex<HashMap<SocketAddr, SessionRecord>>> = Arc::default();
        let (events, rx) = mpsc::channel(2 * SESSIONS as usize);
        let source = {
            let (engine, owned) = (engine.clone(), owned.clone());
            move || {
                let mut all: Vec<SessionRecord> = owned.lock().unwrap().values().copied().collect();
                all.extend(engine.sessions(NOW));
                all
            }
        };
        let target = engine.clone();
        let sync = SyncHandle::start(name, epoch, config, rx, source, move |a| match a {
            Apply::Install(r) => {
                target
                    .install(NOW, &r, dataplane::Authority::Owner { mark: 0 })
                    .unwrap();
            }
            Apply::Remove(r) => {
                target.remove(&r).unwrap();
            }
        })
        .unwrap();
        sync.set_peers(&["a", "b", "c"]);
        let (endpoint, client) = ca.endpoint(name, sessionsync::ALPN);
        Node {
            name,
            engine,
            owned,
            events,
            sync,
            endpoint,
            client,
        }
    }

    async fn create(&self, n: u32) {
        for i in 0..n {
            let r = record(i);
            self.owned.lock().unwrap().insert(r.client, r);
            self.events.send(SessionEvent::Created(r)).await.unwrap();
        }
    }

    async fn close(&self, n: u32) {
        for i in 0..n {
            let r = record(i);
            self.owned.lock().unwrap().remove(&r.client);
            self.events.send(SessionEvent::Closed(r)).await.unwrap();
        }
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
        let r = record(i);
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

//! Session sync between two `SyncHandle`s in one process over real loopback QUIC with mutual
//! TLS: the lag of updates at 100,000 per second, end-to-end throughput with the bytes on the
//! wire, and a bulk sync of a million sessions. Node B applies with a counting callback, not an
//! engine, so the figures are those of the sync path itself. Prints figures; asserts nothing.
//!
//! `cargo bench` passes `--bench`; without it (`cargo test --benches`) nothing is measured.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use dataplane::{FlowState, L4Proto, SessionEvent, SessionRecord, TcpState};
use quinn::{Connection, Endpoint};
use sessionsync::{Apply, Config, PeerStats, SessionSource, SyncHandle};
use tokio::sync::mpsc;

#[path = "../tests/support/mod.rs"]
mod support;

use testpki::Ca;

/// Lag run: the rate, the warm-up and the measured span.
const RATE: u64 = 100_000;
const WARMUP: Duration = Duration::from_millis(500);
const MEASURED: Duration = Duration::from_secs(3);
/// Throughput and bulk runs: updates, sessions.
const BURST: u32 = 1_000_000;
const TABLE: u32 = 1_000_000;

/// Session `n` (below 2^24): its index is the client address, so B finds it without a lock.
fn record(n: u32) -> SessionRecord {
    let [_, x, y, z] = n.to_be_bytes();
    SessionRecord {
        proto: L4Proto::Tcp,
        client: SocketAddr::from(([10, x, y, z], 40000)),
        vip: "198.18.100.1:80".parse().unwrap(),
        local: SocketAddr::from(([198, 19, 200, 1], 1024 + (n % 60000) as u16)),
        backend: "198.18.3.10:8080".parse().unwrap(),
        state: FlowState::Tcp(TcpState::Established),
        window: Default::default(),
        expires_in_secs: 900,
        synced: false,
        syn_proxy: None,
    }
}

fn index(r: &SessionRecord) -> usize {
    match r.client.ip() {
        IpAddr::V4(ip) => (u32::from(ip) & 0x00ff_ffff) as usize,
        IpAddr::V6(_) => unreachable!("the benchmark sends IPv4 sessions only"),
    }
}

/// B's apply side: counts updates and, for the sessions whose send time was recorded, the time
/// from A's event channel to B's apply callback (nanoseconds from `base`, plus one: 0 is unset).
struct Probe {
    base: Instant,
    sent: Vec<AtomicU64>,
    lag: Vec<AtomicU64>,
    applied: AtomicU64,
}

impl Probe {
    fn new(sessions: u32) -> Arc<Probe> {
        let slots = || (0..sessions).map(|_| AtomicU64::new(0)).collect();
        Arc::new(Probe {
            base: Instant::now(),
            sent: slots(),
            lag: slots(),
            applied: AtomicU64::new(0),
        })
    }

    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64 + 1
    }

    fn apply(&self, a: Apply) {
        let (Apply::Install(r, _) | Apply::Remove(r)) = a else {
            return;
        };
        let i = index(&r);
        let sent = self.sent[i].load(Ordering::Relaxed);
        if sent != 0 {
            self.lag[i].store(self.now() - sent + 1, Ordering::Relaxed);
        }
        self.applied.fetch_add(1, Ordering::Relaxed);
    }

    fn applied(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }
}

/// Nodes A (sends) and B (applies), connected.
struct Pair {
    a: SyncHandle,
    b: SyncHandle,
    /// A's dialled connection, for its UDP counters.
    conn: Connection,
    _endpoints: [Endpoint; 2],
}

/// Starts A (events from `events`, table from `source`) and B (applying into `probe`), dials B
/// from A and hands both connections over; returns when the connections are handed over.
async fn pair(
    ca: &Ca,
    config: Config,
    events: mpsc::Receiver<SessionEvent>,
    source: impl SessionSource,
    probe: Arc<Probe>,
) -> Pair {
    let (_, none) = mpsc::channel(1);
    let a = SyncHandle::start("a", 1, config.clone(), events, source, |_| {}).unwrap();
    let b = SyncHandle::start("b", 1, config, none, Vec::new, move |u| probe.apply(u)).unwrap();
    // The records are a's flows.
    let lips: Vec<(String, Vec<std::net::IpAddr>)> = vec![
        ("a".to_owned(), vec!["198.19.200.1".parse().unwrap()]),
        ("b".to_owned(), vec!["198.19.200.2".parse().unwrap()]),
    ];
    for node in [&a, &b] {
        node.set_peers(&["a", "b"]);
        node.set_lips(&lips);
    }
    let (ea, client) = ca.endpoint("a", sessionsync::ALPN);
    let (eb, _) = ca.endpoint("b", sessionsync::ALPN);
    let (dialled, accepted) = support::connect(&ea, &client, &eb, "b").await;
    a.add_connection("b", dialled.clone());
    b.add_connection("a", accepted);
    Pair {
        a,
        b,
        conn: dialled,
        _endpoints: [ea, eb],
    }
}

/// Polls `done` every millisecond for up to `limit`; whether it came true.
async fn wait(limit: Duration, done: impl Fn() -> bool) -> bool {
    let end = Instant::now() + limit;
    while !done() {
        if Instant::now() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    true
}

async fn warm(p: &Pair) {
    assert!(wait(Duration::from_secs(10), || p.a.is_warm() && p.b.is_warm()).await);
}

fn stats(handle: &SyncHandle) -> PeerStats {
    handle.stats().into_iter().next().unwrap()
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// Sends sessions `0..n` into A's channel at `RATE` per second, in bursts on a 1 ms tick
/// (catching up when a tick runs late), recording each one's send time just before it goes in.
fn paced(events: mpsc::Sender<SessionEvent>, probe: Arc<Probe>, n: u32) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let start = Instant::now();
        let mut i = 0;
        while i < n {
            let due = (start.elapsed().as_nanos() as u64 * RATE / 1_000_000_000).min(n.into());
            while u64::from(i) < due {
                probe.sent[i as usize].store(probe.now(), Ordering::Relaxed);
                events
                    .blocking_send(SessionEvent::Created(record(i)))
                    .unwrap();
                i += 1;
            }
            thread::sleep(Duration::from_millis(1));
        }
    })
}

async fn lag(ca: &Ca) {
    let warmup = (RATE * WARMUP.as_millis() as u64 / 1000) as u32;
    let total = warmup + (RATE * MEASURED.as_millis() as u64 / 1000) as u32;
    let probe = Probe::new(total);
    let (tx, rx) = mpsc::channel(1 << 16);
    let p = pair(ca, Config::default(), rx, Vec::new, probe.clone()).await;
    warm(&p).await;
    paced(tx, probe.clone(), total).join().unwrap();
    let all = wait(Duration::from_secs(5), || probe.applied() >= total.into()).await;
    let mut lags: Vec<u64> = probe.lag[warmup as usize..]
        .iter()
        .map(|l| l.load(Ordering::Relaxed))
        .filter(|&l| l != 0)
        .map(|l| l - 1)
        .collect();
    lags.sort_unstable();
    let q = |f: f64| ms(lags[((lags.len() - 1) as f64 * f).round() as usize]);
    let sent = total - warmup;
    println!(
        "lag at {RATE}/s (Created events, {} ms warm-up then {} ms measured; channel send -> B's apply):",
        WARMUP.as_millis(),
        MEASURED.as_millis()
    );
    println!(
        "  p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms  (target p99 <= 5 ms)",
        q(0.5),
        q(0.99),
        q(0.999),
        q(1.0)
    );
    println!(
        "  applied {} of {sent} measured sent{}",
        lags.len(),
        if all {
            ""
        } else {
            " (gave up waiting after 5 s)"
        }
    );
    let s = stats(&p.b);
    println!(
        "  core's own lag estimate on B: mean {:.3} ms, max {:.3} ms",
        s.lag_mean.as_secs_f64() * 1e3,
        s.lag_max.as_secs_f64() * 1e3
    );
    let s = stats(&p.a);
    println!(
        "  A: {} batches, {:.0} updates per batch, drops {}",
        s.sent_batches,
        s.sent_entries as f64 / s.sent_batches.max(1) as f64,
        s.dropped.total()
    );
}

async fn throughput(ca: &Ca) {
    let probe = Probe::new(BURST);
    let (tx, rx) = mpsc::channel(1 << 16);
    // The burst outruns the transport: A's queue must hold it, or it overflows into a resync.
    let config = Config {
        queue_entries: 1 << 21,
        ..Config::default()
    };
    let p = pair(ca, config, rx, Vec::new, probe.clone()).await;
    warm(&p).await;
    let (bytes0, udp0) = (stats(&p.a).sent_bytes, p.conn.stats().udp_tx.bytes);
    let start = Instant::now();
    let producer = thread::spawn(move || {
        for i in 0..BURST {
            tx.blocking_send(SessionEvent::Created(record(i))).unwrap();
        }
        start.elapsed()
    });
    let all = wait(Duration::from_secs(30), || probe.applied() >= BURST.into()).await;
    let elapsed = start.elapsed();
    let fed = producer.join().unwrap();
    let s = stats(&p.a);
    let applied = probe.applied();
    println!("throughput ({BURST} Created events as fast as A's channel takes them):");
    println!(
        "  {:.0} updates/s end to end ({applied} applied on B in {:.3} s{}; channel fed in {:.3} s) (target >= 1,000,000/s)",
        applied as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        if all { "" } else { ", gave up after 30 s" },
        fed.as_secs_f64()
    );
    println!(
        "  wire: {:.1} frame bytes per update (sent_bytes / sent_entries: {} / {}), {:.1} UDP bytes per update (QUIC + TLS overhead included), drops {}",
        (s.sent_bytes - bytes0) as f64 / applied as f64,
        s.sent_bytes,
        s.sent_entries,
        (p.conn.stats().udp_tx.bytes - udp0) as f64 / applied as f64,
        s.dropped.total()
    );
}

async fn bulk(ca: &Ca) {
    let table: Arc<Vec<SessionRecord>> = Arc::new((0..TABLE).map(record).collect());
    let probe = Probe::new(TABLE);
    let (_tx, rx) = mpsc::channel(1);
    let start = Instant::now();
    let p = pair(
        ca,
        Config::default(),
        rx,
        move || table.to_vec(),
        probe.clone(),
    )
    .await;
    let handshake = start.elapsed();
    let all = wait(Duration::from_secs(60), || {
        p.b.is_warm() && probe.applied() >= TABLE.into()
    })
    .await;
    let elapsed = start.elapsed();
    let s = stats(&p.b);
    println!("bulk sync of {TABLE} sessions (A's SessionSource -> B warm, all applied):");
    println!(
        "  {:.3} s from dialling ({:.3} s of it the QUIC handshake), {:.0} sessions/s (target <= 3 s)",
        elapsed.as_secs_f64(),
        handshake.as_secs_f64(),
        f64::from(TABLE) / (elapsed - handshake).as_secs_f64()
    );
    println!(
        "  B: applied {}, bulk complete {}, warm {}{}",
        probe.applied(),
        s.bulk_complete,
        p.b.is_warm(),
        if all { "" } else { " (gave up after 60 s)" }
    );
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("quic: measures only under `cargo bench -p sessionsync --bench quic`");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "session sync, two SyncHandles over loopback QUIC + mutual TLS, one process, 2 tokio workers;"
    );
    println!("B applies with a counting callback (no engine): the sync path itself.");
    runtime.block_on(async {
        let ca = Ca::new();
        lag(&ca).await;
        throughput(&ca).await;
        bulk(&ca).await;
    });
}

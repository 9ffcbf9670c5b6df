//! Session updates through two protocol cores, end to end: event → batch → encode → decode →
//! apply output; and a bulk sync of a million sessions. Prints the bytes on the wire per update.

use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dataplane::{FlowState, L4Proto, SessionEvent, SessionRecord, TcpState};
use sessionsync::{Apply, Config, Core, Output};

fn record(n: u32) -> SessionRecord {
    let [a, b] = ((n >> 16) as u16).to_be_bytes();
    SessionRecord {
        proto: L4Proto::Tcp,
        client: SocketAddr::from(([10, a, b, 1], n as u16)),
        vip: "198.18.100.1:80".parse().unwrap(),
        local: SocketAddr::from(([198, 19, 200, 1], n as u16)),
        backend: "198.18.3.10:8080".parse().unwrap(),
        state: FlowState::Tcp(TcpState::Established),
        window: Default::default(),
        expires_in_secs: 900,
        synced: false,
        syn_proxy: None,
    }
}

fn pair(now: Instant) -> (Core, Core) {
    let config = Config {
        queue_entries: 1 << 21,
        ..Config::default()
    };
    let mut a = Core::new("a", 1, config.clone(), now).unwrap();
    let mut b = Core::new("b", 2, config, now).unwrap();
    // The records are a's flows.
    let lips: Vec<(String, Vec<IpAddr>)> = vec![
        ("a".to_owned(), vec!["198.19.200.1".parse().unwrap()]),
        ("b".to_owned(), vec!["198.19.200.2".parse().unwrap()]),
    ];
    for core in [&mut a, &mut b] {
        core.set_lips(&lips);
    }
    a.set_peers(&["b"]);
    b.set_peers(&["a"]);
    a.peer_connected("b");
    b.peer_connected("a");
    (a, b)
}

/// Moves every frame from `from` to `to` and applies what arrives (`to_table` is `to`'s table,
/// for when it is asked for); returns updates applied and bytes moved.
fn pump(
    now: Instant,
    from: &mut Core,
    to: &mut Core,
    to_table: &[SessionRecord],
) -> (usize, usize) {
    let (mut applied, mut bytes) = (0, 0);
    while let Some(frame) = from.poll_transmit(now, to.me()) {
        bytes += frame.len();
        to.handle_frame(now, from.me(), &frame);
        while let Some(out) = to.poll_output(now) {
            match out {
                Output::Apply(Apply::Install(r, _) | Apply::Remove(r)) => {
                    black_box(r);
                    applied += 1;
                }
                Output::Apply(Apply::Reconcile { .. }) => {}
                Output::TableWanted => to.handle_table(to_table.to_vec()),
            }
        }
    }
    (applied, bytes)
}

fn updates(c: &mut Criterion) {
    const N: u32 = 100_000;
    let events: Vec<SessionEvent> = (0..N).map(|n| SessionEvent::Created(record(n))).collect();
    let mut now = Instant::now();
    let (mut a, mut b) = pair(now);
    pump(now, &mut a, &mut b, &[]);
    pump(now, &mut b, &mut a, &[]);
    for ev in &events {
        a.handle_event(now, *ev);
    }
    a.handle_timeout(now + Duration::from_millis(1));
    let (applied, bytes) = pump(now, &mut a, &mut b, &[]);
    eprintln!(
        "wire: {:.1} bytes per update ({applied} updates, {bytes} bytes, batches of {})",
        bytes as f64 / applied as f64,
        Config::default().batch_entries
    );
    let mut group = c.benchmark_group("replicate");
    group.throughput(Throughput::Elements(u64::from(N)));
    group.sample_size(20);
    group.bench_function("event_to_apply_100k", |bench| {
        bench.iter(|| {
            now += Duration::from_millis(2);
            for ev in &events {
                a.handle_event(now, *ev);
            }
            a.handle_timeout(now + Duration::from_millis(1));
            assert_eq!(pump(now, &mut a, &mut b, &[]).0, N as usize);
        })
    });
    group.finish();
}

fn bulk(c: &mut Criterion) {
    const N: u32 = 1_000_000;
    let table: Vec<SessionRecord> = (0..N).map(record).collect();
    let mut group = c.benchmark_group("bulk");
    group.throughput(Throughput::Elements(u64::from(N)));
    group.sample_size(10);
    group.bench_function("bulk_sync_1m", |bench| {
        bench.iter(|| {
            let now = Instant::now();
            let (mut a, mut b) = pair(now);
            // B's request reaches A; A streams its table; B applies it all and is warm.
            pump(now, &mut b, &mut a, &table);
            assert_eq!(pump(now, &mut a, &mut b, &[]).0, N as usize);
            assert!(b.stats()[0].bulk_complete);
        })
    });
    group.finish();
}

criterion_group!(benches, updates, bulk);
criterion_main!(benches);

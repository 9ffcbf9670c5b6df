//! Engine benchmarks: established-flow translation with 1,000,000 live sessions, new-flow setup,
//! and memory per session. Targets (issue 2): ≤ 50 ns per established packet, ≤ 300 ns per new
//! flow, ≤ 128 bytes per IPv4 session.

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant as WallClock};

use common::{ACK, SYN, backend, ip, service, tcp};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dataplane::sched::{MaglevParams, SchedulerKind};
use dataplane::{
    Engine, EngineConfig, Instant, L4Checksum, L4Proto, Packet, SessionEvent, Snapshot, Verdict,
    Worker,
};

const SESSIONS: u32 = 1_000_000;
const BATCH: usize = 32;
const NOW: Instant = Instant::from_secs(100);

fn vip4() -> IpAddr {
    Ipv4Addr::new(198, 18, 100, 1).into()
}

fn vip6() -> IpAddr {
    "2001:db8:100::1".parse().unwrap()
}

fn lips() -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = (1..=20)
        .map(|i| Ipv4Addr::new(198, 19, 200, i).into())
        .collect();
    v.extend((1..=20u16).map(|i| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 200, 0, 0, 0, 0, i))));
    v
}

fn engine(max_v4: u32, max_v6: u32) -> (std::sync::Arc<Engine>, Worker) {
    let backends4 = (0..10)
        .map(|i| backend(Ipv4Addr::new(198, 18, 3, 10 + i).into(), 8080, 1))
        .collect();
    let backends6 = (0..10u16)
        .map(|i| {
            backend(
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 10 + i)),
                8080,
                1,
            )
        })
        .collect();
    let mut services = vec![
        service(vip4(), 80, L4Proto::Tcp, backends4),
        service(vip6(), 80, L4Proto::Tcp, backends6),
    ];
    for s in &mut services {
        s.scheduler = SchedulerKind::Maglev;
    }
    let snap = Snapshot::new(1, &services, MaglevParams::default(), None).unwrap();
    let config = EngineConfig {
        max_sessions_v4: max_v4,
        max_sessions_v6: max_v6,
        local_addrs: lips(),
        event_capacity: 2 * BATCH,
        ..EngineConfig::default()
    };
    let engine = Engine::new(config, snap).unwrap();
    let worker = engine.worker();
    (engine, worker)
}

/// The client of flow `i`: 1,000 ports on each of 1,000+ addresses in 198.19.0.0/16.
fn client(i: u32, v6: bool) -> (IpAddr, u16) {
    let port = 10_000 + (i % 1000) as u16;
    if v6 {
        (
            IpAddr::V6(Ipv6Addr::from(
                0x2001_0db8_0001_0000_0000_0000_0000_0000u128 + u128::from(i / 1000),
            )),
            port,
        )
    } else {
        (Ipv4Addr::from(0xc613_0000 + i / 1000).into(), port)
    }
}

fn syn(i: u32, v6: bool) -> Vec<u8> {
    let (c, port) = client(i, v6);
    ip(
        c,
        if v6 { vip6() } else { vip4() },
        &tcp(port, 80, SYN, i, 0, b""),
    )
}

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// One flow's two directions, as they arrive: client → VIP and RS → LIP.
struct FlowPackets {
    inbound: Vec<u8>,
    outbound: Vec<u8>,
}

/// Opens `n` flows through the engine; returns their data packets in both directions.
fn populate(worker: &mut Worker, n: u32, v6: bool) -> Vec<FlowPackets> {
    let mut flows = Vec::with_capacity(n as usize);
    let mut buf = vec![0u8; 256];
    for i in 0..n {
        let p = syn(i, v6);
        buf[..p.len()].copy_from_slice(&p);
        let mut pkt = Packet::new(&mut buf, p.len(), L4Checksum::Verified);
        assert!(matches!(worker.process(NOW, &mut pkt), Verdict::Forward(_)));
        let rec = worker
            .drain_events()
            .find_map(|e| match e {
                SessionEvent::Created(r) => Some(r),
                _ => None,
            })
            .expect("created");
        let (c, port) = client(i, v6);
        let vip = if v6 { vip6() } else { vip4() };
        flows.push(FlowPackets {
            inbound: ip(c, vip, &tcp(port, 80, ACK, i + 1, 7, &[0u8; 6])),
            outbound: ip(
                rec.backend.ip(),
                rec.local.ip(),
                &tcp(8080, rec.local.port(), ACK, 7, i + 1, &[0u8; 6]),
            ),
        });
    }
    flows
}

/// A deterministic shuffle so batches hit flows all over the table.
fn shuffled(n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    order
}

/// Times batches of 32 packets (copied into fixed buffers outside the timed part).
fn run_batches<'a>(
    worker: &mut Worker,
    iters: u64,
    mut next: impl FnMut(usize) -> &'a [u8],
) -> Duration {
    let mut bufs = vec![[0u8; 128]; BATCH];
    let mut lens = [0usize; BATCH];
    let mut verdicts = [Verdict::Drop(dataplane::DropReason::Truncated); BATCH];
    let mut total = Duration::ZERO;
    let mut k = 0usize;
    for _ in 0..iters {
        for (j, b) in bufs.iter_mut().enumerate() {
            let p = next(k + j);
            b[..p.len()].copy_from_slice(p);
            lens[j] = p.len();
        }
        k += BATCH;
        let mut batch: Vec<Packet<'_>> = bufs
            .iter_mut()
            .zip(lens)
            .map(|(b, len)| Packet::new(b, len, L4Checksum::Verified))
            .collect();
        let t = WallClock::now();
        worker.process_batch(NOW, &mut batch, &mut verdicts);
        total += t.elapsed();
        black_box(&verdicts);
        worker.drain_events().for_each(drop);
    }
    total
}

fn bench_established(c: &mut Criterion) {
    let before = rss_bytes();
    let (engine, mut worker) = engine(SESSIONS, 1024);
    let flows = populate(&mut worker, SESSIONS, false);
    let after = rss_bytes();
    assert_eq!(engine.session_count(), SESSIONS as usize);
    let (v4_bytes, _) = engine.session_table_bytes();
    println!(
        "memory per IPv4 session at {SESSIONS} sessions: {:.1} B allocated by the session table; \
         {:.1} B RSS growth of the process (table + port bitmaps + the bench's own packet copies)",
        v4_bytes as f64 / f64::from(SESSIONS),
        after.saturating_sub(before) as f64 / f64::from(SESSIONS),
    );
    let order = shuffled(flows.len());
    let mut group = c.benchmark_group("established");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("random_flows_of_1M_batch32_both_directions", |b| {
        b.iter_custom(|iters| {
            run_batches(&mut worker, iters, |k| {
                let f = &flows[order[(k / 2) % order.len()]];
                if k % 2 == 0 { &f.inbound } else { &f.outbound }
            })
        })
    });
    group.bench_function("hot_32_flows_of_1M_batch32_both_directions", |b| {
        b.iter_custom(|iters| {
            run_batches(&mut worker, iters, |k| {
                let f = &flows[order[(k / 2) % 16]];
                if k % 2 == 0 { &f.inbound } else { &f.outbound }
            })
        })
    });
    group.finish();
    let drops = engine.counters().total_drops();
    assert_eq!(drops, 0, "the benchmark must forward every packet");
}

fn bench_new_flows(c: &mut Criterion) {
    let mut group = c.benchmark_group("new_flow");
    group.throughput(Throughput::Elements(BATCH as u64));
    for v6 in [false, true] {
        let name = if v6 {
            "syn_maglev_alloc_insert_v6_batch32"
        } else {
            "syn_maglev_alloc_insert_v4_batch32"
        };
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                // Fresh engines of 1M sessions; at most 500,000 flows each, so none fills up.
                let mut total = Duration::ZERO;
                let mut left = iters * BATCH as u64;
                while left > 0 {
                    let n = left.min(500_000) as u32;
                    left -= u64::from(n);
                    let (_e, mut worker) = engine(
                        if v6 { 1024 } else { SESSIONS },
                        if v6 { SESSIONS } else { 1024 },
                    );
                    let syns: Vec<Vec<u8>> = (0..n).map(|i| syn(i, v6)).collect();
                    let batches = u64::from(n).div_ceil(BATCH as u64);
                    total += run_batches(&mut worker, batches, |k| &syns[k % syns.len()]);
                }
                total
            })
        });
    }
    group.finish();
}

fn bench_memory_v6(_c: &mut Criterion) {
    let before = rss_bytes();
    let (engine, mut worker) = engine(1024, SESSIONS);
    let after_alloc = rss_bytes();
    let mut buf = vec![0u8; 256];
    for i in 0..SESSIONS {
        let p = syn(i, true);
        buf[..p.len()].copy_from_slice(&p);
        let mut pkt = Packet::new(&mut buf, p.len(), L4Checksum::Verified);
        worker.process(NOW, &mut pkt);
        worker.drain_events().for_each(drop);
    }
    let after = rss_bytes();
    assert_eq!(engine.session_count(), SESSIONS as usize);
    let (_, v6_bytes) = engine.session_table_bytes();
    println!(
        "memory per IPv6 session at {SESSIONS} sessions: {:.1} B allocated by the session table; \
         {:.1} B RSS growth of the process ({:.1} B of it before the first session)",
        v6_bytes as f64 / f64::from(SESSIONS),
        after.saturating_sub(before) as f64 / f64::from(SESSIONS),
        after_alloc.saturating_sub(before) as f64 / f64::from(SESSIONS),
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(5));
    targets = bench_established, bench_new_flows, bench_memory_v6
}
criterion_main!(benches);

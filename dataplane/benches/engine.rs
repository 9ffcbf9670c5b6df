//! Engine benchmarks: established-flow translation with 1,000,000 live sessions and new-flow
//! setup. Targets (issue 2): ≤ 50 ns per established packet, ≤ 300 ns per new flow. Memory per
//! session is measured by the `memory` bench.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::hint::black_box;
use std::time::{Duration, Instant as WallClock};

use common::{ACK, ip, tcp};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dataplane::{Instant, L4Checksum, Packet, SessionEvent, Verdict, Worker};
use support::{SESSIONS, client, engine, syn, vip4, vip6};

const BATCH: usize = 32;
const NOW: Instant = Instant::from_secs(100);

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
    let (engine, mut worker) = engine(SESSIONS, 1024);
    let flows = populate(&mut worker, SESSIONS, false);
    assert_eq!(engine.session_count(), SESSIONS as usize);
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
    drop(flows);
    drop(engine);
    bench_dashmap_baseline(c, &order);
}

/// What the session table replaces, measured the same way: a DashMap lookup and the session
/// lock, nothing else (no parsing, no rewrite), for the same access patterns.
fn bench_dashmap_baseline(c: &mut Criterion, order: &[usize]) {
    use support::dashmap_baseline::{client_key, filled, server_key};
    let table = filled(SESSIONS);
    let mut group = c.benchmark_group("baseline_dashmap_lookup_and_lock");
    group.throughput(Throughput::Elements(BATCH as u64));
    for (name, spread) in [
        ("random_flows_of_1M_batch32", order.len()),
        ("hot_32_flows_of_1M_batch32", 16),
    ] {
        group.bench_function(name, |b| {
            let mut k = 0usize;
            b.iter(|| {
                for j in 0..BATCH {
                    let i = order[((k + j) / 2) % spread] as u32;
                    let key = if j % 2 == 0 {
                        client_key(i)
                    } else {
                        server_key(i)
                    };
                    if let Some(s) = table.get(&key) {
                        black_box(s.lock().words[0]);
                    }
                }
                k += BATCH;
            })
        });
    }
    group.finish();
}

fn bench_new_flows(c: &mut Criterion) {
    let mut group = c.benchmark_group("new_flow");
    group.throughput(Throughput::Elements(BATCH as u64));
    // A table of 1M sessions filling up (its index does not fit in any cache), and a table of
    // 64k sessions with 32k flows at a time (it does): DRAM-bound and compute-bound setup.
    for (label, max, per_engine) in [
        ("1M_table", SESSIONS, 500_000u32),
        ("64k_table", 65_536, 32_768),
    ] {
        for v6 in [false, true] {
            let family = if v6 { "v6" } else { "v4" };
            group.bench_function(
                format!("syn_maglev_alloc_insert_{family}_{label}_batch32"),
                |b| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        let mut left = iters * BATCH as u64;
                        while left > 0 {
                            let n = left.min(u64::from(per_engine)) as u32;
                            left -= u64::from(n);
                            let (_e, mut worker) = if v6 {
                                engine(1024, max)
                            } else {
                                engine(max, 1024)
                            };
                            let syns: Vec<Vec<u8>> = (0..n).map(|i| syn(i, v6)).collect();
                            let batches = u64::from(n).div_ceil(BATCH as u64);
                            total += run_batches(&mut worker, batches, |k| &syns[k % syns.len()]);
                        }
                        total
                    })
                },
            );
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(5));
    targets = bench_established, bench_new_flows
}
criterion_main!(benches);

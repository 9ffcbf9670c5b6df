//! Cost of one allocate + release pair on a 4-LIP pool, empty and ~90% full.
//!
//! `same` gives back the port it just got, the best case for the cursor; `fifo` gives back the
//! oldest port held, so the freed ports sit behind the cursor as they do under real churn.

use std::collections::VecDeque;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{Criterion, criterion_group, criterion_main};
use dataplane::laddr::{L4Proto, LocalAddr, LocalAddrPool};

/// SplitMix64, standing in for a flow hash.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A pool of 4 IPv4 LIPs over the default range, with `percent` of its TCP ports held.
fn filled_pool(percent: u64) -> (LocalAddrPool, VecDeque<LocalAddr>) {
    let lips: Vec<IpAddr> = (1..=4)
        .map(|i| IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)))
        .collect();
    let pool = LocalAddrPool::new(&lips, LocalAddrPool::DEFAULT_PORTS).expect("valid pool");
    let total: u64 = pool
        .usage()
        .iter()
        .filter(|r| r.proto == L4Proto::Tcp)
        .map(|r| u64::from(r.capacity))
        .sum();
    let held = (0..total * percent / 100)
        .map(|i| {
            pool.allocate(L4Proto::Tcp, false, mix(i))
                .expect("pool not full yet")
        })
        .collect();
    (pool, held)
}

fn alloc_release(c: &mut Criterion) {
    let mut group = c.benchmark_group("laddr_alloc_release");
    for percent in [0, 90] {
        let (pool, _held) = filled_pool(percent);
        let mut i = 0u64;
        group.bench_function(format!("same/{percent}pct"), |b| {
            b.iter(|| {
                i += 1;
                let addr = pool
                    .allocate(L4Proto::Tcp, false, mix(i))
                    .expect("free port");
                pool.release(L4Proto::Tcp, black_box(addr))
            });
        });
    }
    let (pool, mut held) = filled_pool(90);
    let mut i = 1u64 << 40;
    group.bench_function("fifo/90pct", |b| {
        b.iter(|| {
            i += 1;
            let addr = pool
                .allocate(L4Proto::Tcp, false, mix(i))
                .expect("free port");
            held.push_back(black_box(addr));
            held.pop_front()
                .is_some_and(|old| pool.release(L4Proto::Tcp, old))
        });
    });
    let (full, _held) = filled_pool(100);
    group.bench_function("exhausted/100pct", |b| {
        b.iter(|| full.allocate(L4Proto::Tcp, false, black_box(7)));
    });
    group.finish();
}

criterion_group!(benches, alloc_release);
criterion_main!(benches);

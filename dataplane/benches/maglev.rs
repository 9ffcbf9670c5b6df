//! Maglev table build and lookup costs: the build runs on every backend-set change, the lookup
//! on every new flow.

use criterion::{Criterion, criterion_group, criterion_main};
use dataplane::sched::{BackendSpec, Maglev, MaglevParams};
use std::hint::black_box;

fn backends(n: usize) -> Vec<BackendSpec> {
    (0..n)
        .map(|i| BackendSpec {
            name: format!("198.18.{}.{}:80", i / 256, i % 256),
            weight: 1,
        })
        .collect()
}

fn build(c: &mut Criterion) {
    let set = backends(1000);
    c.bench_function("maglev_build_1000_backends_m65537", |b| {
        b.iter(|| Maglev::new(black_box(&set), MaglevParams::default()))
    });
}

fn build_weighted(c: &mut Criterion) {
    let mut set = backends(1000);
    for (i, b) in set.iter_mut().enumerate() {
        b.weight = 1 + i as u32 % 10;
    }
    c.bench_function("maglev_build_1000_weighted_backends_m65537", |b| {
        b.iter(|| Maglev::new(black_box(&set), MaglevParams::default()))
    });
}

fn lookup(c: &mut Criterion) {
    let maglev = Maglev::new(&backends(1000), MaglevParams::default()).expect("valid table size");
    let mut hash = 0u64;
    c.bench_function("maglev_lookup_1000_backends_m65537", |b| {
        b.iter(|| {
            // A Weyl sequence stands in for flow hashes: cheap and spread over the whole table.
            hash = hash.wrapping_add(0x9E37_79B9_7F4A_7C15);
            maglev.lookup(black_box(hash))
        })
    });
}

criterion_group!(benches, build, build_weighted, lookup);
criterion_main!(benches);

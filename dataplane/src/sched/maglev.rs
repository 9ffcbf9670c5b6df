//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016, §3.4, Pseudocode 1), extended with weights.
//!
//! Each backend derives a permutation of the M table slots from its name alone; backends then
//! take turns claiming their next preferred free slot until the table is full. Because the
//! permutations depend only on names and the seed, and the turn order only on the sorted names,
//! every node builds the same table from the same backend set, whatever order it was given in.
//! A change of the set moves few slots between the remaining backends.

use super::{BackendSpec, MaglevParams, SchedulerError};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Marks a slot not yet claimed during the build; never a backend index, since there are at
/// most [`Maglev::MAX_TABLE_SIZE`] backends.
const EMPTY: u32 = u32::MAX;

/// A built Maglev lookup table.
#[derive(Debug, Clone)]
pub struct Maglev {
    /// Slot → index of the owning backend in the caller's slice; empty when no backend has a
    /// positive weight.
    table: Box<[u32]>,
}

/// One backend's walk through its permutation during the build.
struct Walker {
    backend: u32,
    /// The next slot of the permutation, i.e. `permutation[next]` in the paper's terms, kept as
    /// a slot so that advancing is an addition rather than a multiplication and a division.
    slot: u32,
    skip: u32,
    weight: u64,
    /// Turns taken so far, which place the next turn in the weighted build.
    turns: u64,
}

impl Maglev {
    /// Upper bound on the table size: bounds the memory (4 bytes a slot) and the build time a
    /// configuration can demand, while leaving room for the paper's large size 655373.
    pub const MAX_TABLE_SIZE: u32 = 1 << 24;

    /// Builds the table for `backends`. Indices in the table refer to `backends`; the build
    /// itself depends only on the names, weights and `params`, not on the order of the slice.
    /// Backends of weight 0 own no slot.
    pub fn new(backends: &[BackendSpec], params: MaglevParams) -> Result<Self, SchedulerError> {
        let m = params.table_size;
        check_table_size(m, backends.len())?;
        let (offset_seed, skip_seed) = derive_seeds(params.seed);
        let mut order: Vec<usize> = (0..backends.len()).collect();
        // The caller index only breaks ties between equal names, which have equal permutations.
        order.sort_by(|&a, &b| backends[a].name.cmp(&backends[b].name).then(a.cmp(&b)));
        let walkers = order
            .into_iter()
            .filter(|&i| backends[i].weight > 0)
            .map(|i| {
                let name = backends[i].name.as_bytes();
                let offset = xxh3_64_with_seed(name, offset_seed) % u64::from(m);
                let skip = xxh3_64_with_seed(name, skip_seed) % u64::from(m - 1) + 1;
                walker(i, offset, skip, backends[i].weight)
            })
            .collect();
        Ok(Self {
            table: populate(walkers, m),
        })
    }

    /// Builds the table from explicit `(offset, skip, weight)` permutations, taking turns in the
    /// order given; table entries are positions in `permutations`. Meant for checking the build
    /// against worked examples such as the paper's Table 1.
    pub fn from_permutations(
        permutations: &[(u32, u32, u32)],
        table_size: u32,
    ) -> Result<Self, SchedulerError> {
        check_table_size(table_size, permutations.len())?;
        let m = u64::from(table_size);
        let mut walkers = Vec::with_capacity(permutations.len());
        for (i, &(offset, skip, weight)) in permutations.iter().enumerate() {
            let skip_mod = u64::from(skip) % m;
            if skip_mod == 0 {
                return Err(SchedulerError::InvalidSkip {
                    index: i,
                    skip,
                    table_size,
                });
            }
            if weight > 0 {
                walkers.push(walker(i, u64::from(offset) % m, skip_mod, weight));
            }
        }
        Ok(Self {
            table: populate(walkers, table_size),
        })
    }

    /// The backend owning the slot `hash` falls in, or None when no backend has a positive
    /// weight.
    pub fn lookup(&self, hash: u64) -> Option<usize> {
        // Fast range reduction: the high bits of a 64×64 product spread the hash over [0, M)
        // as evenly as a modulo, without the division.
        let slot = ((u128::from(hash) * self.table.len() as u128) >> 64) as usize;
        self.table.get(slot).map(|&b| b as usize)
    }

    /// The slot → backend index table (empty when no backend has a positive weight).
    pub fn table(&self) -> &[u32] {
        &self.table
    }
}

fn check_table_size(table_size: u32, backends: usize) -> Result<(), SchedulerError> {
    if table_size > Maglev::MAX_TABLE_SIZE {
        return Err(SchedulerError::TableSizeTooLarge {
            table_size,
            max: Maglev::MAX_TABLE_SIZE,
        });
    }
    if !is_prime(table_size) {
        return Err(SchedulerError::TableSizeNotPrime { table_size });
    }
    if (table_size as usize) < backends {
        return Err(SchedulerError::TableSizeTooSmall {
            table_size,
            backends,
        });
    }
    Ok(())
}

fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) {
        return false;
    }
    let n = u64::from(n);
    (3..)
        .step_by(2)
        .take_while(|d| d * d <= n)
        .all(|d| !n.is_multiple_of(d))
}

/// Two distinct seeds for offset and skip, so that the two are independent hashes of the name.
fn derive_seeds(seed: u64) -> (u64, u64) {
    (splitmix64(seed), splitmix64(seed ^ 0x5EED_5EED_5EED_5EED))
}

/// splitmix64 is a bijection, so distinct inputs give distinct seeds.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Callers guarantee `offset < M`, `0 < skip < M`, and `backend < M ≤ MAX_TABLE_SIZE`.
fn walker(backend: usize, offset: u64, skip: u64, weight: u32) -> Walker {
    Walker {
        backend: backend as u32,
        slot: offset as u32,
        skip: skip as u32,
        weight: u64::from(weight),
        turns: 0,
    }
}

/// Pseudocode 1 of the paper, with turns rationed by weight: in round r a backend of weight w
/// takes a turn when ⌊(r+1)·w/w_max⌋ > ⌊r·w/w_max⌋, so its share of turns, and hence of slots,
/// is w/w_max of the heaviest backend's. With equal weights every backend takes every turn,
/// which is exactly the paper's algorithm.
fn populate(walkers: Vec<Walker>, m: u32) -> Box<[u32]> {
    let Some(first) = walkers.first() else {
        return Box::default();
    };
    if walkers.iter().all(|w| w.weight == first.weight) {
        populate_equal(walkers, m)
    } else {
        populate_weighted(walkers, m)
    }
}

/// The paper's loop: backends take turns in order, one slot each, until the table is full.
fn populate_equal(mut walkers: Vec<Walker>, m: u32) -> Box<[u32]> {
    let mut table = vec![EMPTY; m as usize].into_boxed_slice();
    // Callers pass at least one walker; M = rounds·N + the turns of a last, partial round.
    let n = walkers.len() as u32;
    for _ in 0..m / n {
        for w in &mut walkers {
            claim(&mut table, w, m);
        }
    }
    for w in walkers.iter_mut().take((m % n) as usize) {
        claim(&mut table, w, m);
    }
    table
}

/// Turns in (round, position) order, like the paper's loop with skipped turns, but visiting only
/// the turns taken: walking every backend every round would cost rounds·N, and with one weight
/// far above the others the rounds approach M.
fn populate_weighted(mut walkers: Vec<Walker>, m: u32) -> Box<[u32]> {
    let mut table = vec![EMPTY; m as usize].into_boxed_slice();
    let max_weight = walkers.iter().map(|w| w.weight).max().unwrap_or(1);
    let mut turns: BinaryHeap<Reverse<(u64, usize)>> = walkers
        .iter()
        .enumerate()
        .map(|(position, w)| Reverse((next_turn_round(w, max_weight), position)))
        .collect();
    for _ in 0..m {
        // Never empty: each turn puts its backend back.
        let Some(mut top) = turns.peek_mut() else {
            break;
        };
        let Reverse((_, position)) = *top;
        let Some(w) = walkers.get_mut(position) else {
            break;
        };
        claim(&mut table, w, m);
        *top = Reverse((next_turn_round(w, max_weight), position));
    }
    table
}

/// The round of turn k+1, where k = `w.turns`: the least r with ⌊(r+1)·w/w_max⌋ ≥ k+1, i.e.
/// ⌈(k+1)·w_max/w⌉ − 1. No overflow: k < M ≤ 2^24 and w_max < 2^32.
fn next_turn_round(w: &Walker, max_weight: u64) -> u64 {
    ((w.turns + 1) * max_weight - 1) / w.weight
}

/// One turn: the backend claims the next free slot of its permutation. A free slot exists on
/// every turn, as there are M turns, and is found, as M prime and 0 < skip < M make each walk
/// visit every slot.
fn claim(table: &mut [u32], w: &mut Walker, m: u32) {
    let mut slot = w.slot;
    while table[slot as usize] != EMPTY {
        slot = advance(slot, w.skip, m);
    }
    table[slot as usize] = w.backend;
    w.slot = advance(slot, w.skip, m);
    w.turns += 1;
}

/// `(slot + skip) mod m` for `slot, skip < m ≤ MAX_TABLE_SIZE`, where the sum cannot overflow
/// and exceeds m at most once.
fn advance(slot: u32, skip: u32, m: u32) -> u32 {
    let next = slot + skip;
    if next >= m { next - m } else { next }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(names: impl IntoIterator<Item = String>, weight: u32) -> Vec<BackendSpec> {
        names
            .into_iter()
            .map(|name| BackendSpec { name, weight })
            .collect()
    }

    fn equal(n: usize) -> Vec<BackendSpec> {
        named(
            (0..n).map(|i| format!("198.18.{}.{}:80", i / 256, i % 256)),
            1,
        )
    }

    fn params(table_size: u32) -> MaglevParams {
        MaglevParams {
            seed: 0,
            table_size,
        }
    }

    fn slot_counts(m: &Maglev, n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for &b in m.table() {
            counts[b as usize] += 1;
        }
        counts
    }

    /// A deterministic stream of well-mixed 64-bit hashes.
    fn hashes(n: usize) -> impl Iterator<Item = u64> {
        (0..n as u64).map(splitmix64)
    }

    #[test]
    fn paper_table_1() {
        let perms = [(3, 4, 1), (0, 2, 1), (3, 1, 1)];
        let m = Maglev::from_permutations(&perms, 7).unwrap();
        assert_eq!(m.table(), &[1, 0, 1, 0, 2, 2, 0]);
        // B1 removed: with weight 0 it takes no turn, and entries keep referring to positions.
        let without_b1 = [(3, 4, 1), (0, 2, 0), (3, 1, 1)];
        let m = Maglev::from_permutations(&without_b1, 7).unwrap();
        assert_eq!(m.table(), &[0, 0, 0, 0, 2, 2, 2]);
    }

    #[test]
    fn from_permutations_rejects_a_skip_that_does_not_permute() {
        assert_eq!(
            Maglev::from_permutations(&[(0, 1, 1), (1, 14, 1)], 7).unwrap_err(),
            SchedulerError::InvalidSkip {
                index: 1,
                skip: 14,
                table_size: 7
            }
        );
    }

    #[test]
    fn table_size_is_validated() {
        for (size, err) in [
            (0, SchedulerError::TableSizeNotPrime { table_size: 0 }),
            (1, SchedulerError::TableSizeNotPrime { table_size: 1 }),
            (
                65536,
                SchedulerError::TableSizeNotPrime { table_size: 65536 },
            ),
            (
                3,
                SchedulerError::TableSizeTooSmall {
                    table_size: 3,
                    backends: 4,
                },
            ),
            (
                u32::MAX,
                SchedulerError::TableSizeTooLarge {
                    table_size: u32::MAX,
                    max: Maglev::MAX_TABLE_SIZE,
                },
            ),
        ] {
            assert_eq!(Maglev::new(&equal(4), params(size)).unwrap_err(), err);
        }
        assert!(Maglev::new(&equal(4), params(5)).is_ok());
        assert!(Maglev::new(&equal(2), params(2)).is_ok());
    }

    #[test]
    fn is_prime_matches_trial_division() {
        let primes: Vec<u32> = (0..100).filter(|&n| is_prime(n)).collect();
        assert_eq!(
            primes,
            [
                2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79,
                83, 89, 97
            ]
        );
        assert!(is_prime(65537) && is_prime(655_373) && !is_prime(65535));
    }

    #[test]
    fn empty_or_zero_weight_sets_look_up_none() {
        let m = Maglev::new(&[], params(7)).unwrap();
        assert!(m.table().is_empty());
        assert_eq!(m.lookup(u64::MAX), None);
        let m = Maglev::new(&named(["a".into(), "b".into()], 0), params(7)).unwrap();
        assert_eq!(m.lookup(0), None);
    }

    #[test]
    fn equal_weights_balance_within_one_slot() {
        for (n, size) in [
            (1, 7),
            (3, 7),
            (7, 7),
            (10, 251),
            (100, 65537),
            (1000, 65537),
        ] {
            let m = Maglev::new(&equal(n), params(size)).unwrap();
            let counts = slot_counts(&m, n);
            let (lo, hi) = (counts.iter().min(), counts.iter().max());
            assert!(
                hi.unwrap() - lo.unwrap() <= 1,
                "n={n} M={size}: {lo:?}..{hi:?}"
            );
        }
    }

    #[test]
    fn weights_are_honoured() {
        let backends: Vec<BackendSpec> = [1, 2, 3]
            .iter()
            .map(|&weight| BackendSpec {
                name: format!("w{weight}"),
                weight,
            })
            .collect();
        let m = Maglev::new(&backends, params(65537)).unwrap();
        for (count, weight) in slot_counts(&m, 3).into_iter().zip([1.0, 2.0, 3.0]) {
            let share = count as f64 / 65537.0;
            assert!(
                (share - weight / 6.0).abs() < 0.01,
                "weight {weight}: {share}"
            );
        }
    }

    #[test]
    fn weighted_build_reduces_to_the_paper_with_equal_weights() {
        for (n, size) in [(3, 7), (10, 251), (100, 65537)] {
            let walkers = || {
                (0..n)
                    .map(|i| {
                        let h = splitmix64(i);
                        walker(i as usize, h % size, h % (size - 1) + 1, 5)
                    })
                    .collect()
            };
            let m = size as u32;
            assert_eq!(
                populate_weighted(walkers(), m),
                populate_equal(walkers(), m)
            );
        }
        let table_1 = [(3, 4, 1), (0, 2, 1), (3, 1, 1)];
        let walkers = || {
            (table_1.into_iter().enumerate())
                .map(|(i, (offset, skip, weight))| walker(i, offset, skip, weight))
                .collect()
        };
        assert_eq!(&*populate_weighted(walkers(), 7), &[1, 0, 1, 0, 2, 2, 0]);
    }

    #[test]
    fn weighted_turns_follow_the_round_rule() {
        // Weights 1, 2, 3 (positions 0, 1, 2): round 0 only w=3 turns; round 1 w=2 and w=3;
        // round 2 all three.
        let perms = [(0, 1, 1), (1, 1, 2), (2, 1, 3)];
        let m = Maglev::from_permutations(&perms, 7).unwrap();
        // Turns: r0: p2→2; r1: p1→1, p2→3; r2: p0→0, p1→4, p2→5; r3: p2→6.
        assert_eq!(m.table(), &[0, 1, 2, 2, 1, 2, 2]);
    }

    #[test]
    fn huge_weight_ratios_still_fill_the_table() {
        let mut backends = equal(3);
        backends[0].weight = u32::MAX;
        let m = Maglev::new(&backends, params(251)).unwrap();
        assert!(m.table().iter().all(|&b| b < 3));
        backends[1].weight = 0;
        backends[2].weight = u32::MAX;
        let m = Maglev::new(&backends, params(251)).unwrap();
        assert!(m.table().iter().all(|&b| b == 0 || b == 2));
    }

    #[test]
    fn same_set_in_any_order_picks_the_same_backends() {
        let backends = equal(50);
        let mut shuffled = backends.clone();
        // A fixed permutation stands in for a shuffle: reversed, then rotated.
        shuffled.reverse();
        shuffled.rotate_left(17);
        let a = Maglev::new(&backends, params(65537)).unwrap();
        let b = Maglev::new(&shuffled, params(65537)).unwrap();
        let again = Maglev::new(&backends, params(65537)).unwrap();
        assert_eq!(a.table(), again.table());
        for h in hashes(100_000) {
            let name_a = &backends[a.lookup(h).unwrap()].name;
            let name_b = &shuffled[b.lookup(h).unwrap()].name;
            assert_eq!(name_a, name_b);
        }
    }

    #[test]
    fn seed_changes_the_table() {
        let a = Maglev::new(&equal(10), params(251)).unwrap();
        let b = Maglev::new(
            &equal(10),
            MaglevParams {
                seed: 1,
                table_size: 251,
            },
        )
        .unwrap();
        assert_ne!(a.table(), b.table());
    }

    #[test]
    fn removing_one_of_100_backends_disrupts_little() {
        let size = 65537;
        let backends = equal(100);
        let removed = 37;
        let mut remaining = backends.clone();
        remaining.remove(removed);
        let before = Maglev::new(&backends, params(size)).unwrap();
        let after = Maglev::new(&remaining, params(size)).unwrap();
        let (mut moved, mut collateral) = (0usize, 0usize);
        for (&old, &new) in before.table().iter().zip(after.table()) {
            let old_name = &backends[old as usize].name;
            let new_name = &remaining[new as usize].name;
            if old as usize == removed {
                assert_ne!(new_name, old_name);
                moved += 1;
            } else if new_name != old_name {
                collateral += 1;
            }
        }
        let moved_share = moved as f64 / f64::from(size);
        let collateral_share = collateral as f64 / f64::from(size);
        assert!((moved_share - 0.01).abs() < 0.001, "moved {moved_share}");
        assert!(collateral_share < 0.01, "collateral {collateral_share}");
    }

    #[test]
    fn lookup_spreads_hashes_like_the_table() {
        let m = Maglev::new(&equal(4), params(65537)).unwrap();
        let mut counts = [0usize; 4];
        for h in hashes(400_000) {
            counts[m.lookup(h).unwrap()] += 1;
        }
        for c in counts {
            assert!((c as f64 / 100_000.0 - 1.0).abs() < 0.02, "{counts:?}");
        }
        assert!(m.lookup(0).is_some() && m.lookup(u64::MAX).is_some());
    }
}

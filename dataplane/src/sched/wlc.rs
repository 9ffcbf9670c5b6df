//! IPVS weighted least connections (`ip_vs_wlc.c`): the backend with the least connection
//! overhead per unit of weight takes the flow.

use super::ConnCounts;

/// Weight of an active connection relative to an inactive one, as in IPVS: an established
/// connection costs the backend far more than one in a handshake or closing state.
const ACTIVE_COST: u64 = 256;

#[derive(Debug)]
pub(super) struct Wlc {
    weights: Box<[u32]>,
}

impl Wlc {
    pub(super) fn new(weights: impl Iterator<Item = u32>) -> Self {
        Self {
            weights: weights.collect(),
        }
    }

    pub(super) fn pick(&self, conns: impl Fn(usize) -> ConnCounts) -> Option<usize> {
        let mut best: Option<(usize, u64, u32)> = None;
        for (i, &weight) in self.weights.iter().enumerate() {
            if weight == 0 {
                continue;
            }
            let overhead = overhead(conns(i));
            // overhead/weight < best_overhead/best_weight, cross-multiplied to stay exact; at
            // most 2^41 · 2^32, hence u128. Strict, so the first of equals wins.
            let better = best.is_none_or(|(_, best_overhead, best_weight)| {
                u128::from(overhead) * u128::from(best_weight)
                    < u128::from(best_overhead) * u128::from(weight)
            });
            if better {
                best = Some((i, overhead, weight));
            }
        }
        best.map(|(i, _, _)| i)
    }
}

fn overhead(c: ConnCounts) -> u64 {
    u64::from(c.active) * ACTIVE_COST + u64::from(c.inactive)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(table: &[(u32, u32)]) -> impl Fn(usize) -> ConnCounts + '_ {
        |i| ConnCounts {
            active: table[i].0,
            inactive: table[i].1,
        }
    }

    #[test]
    fn picks_least_overhead_per_weight() {
        let wlc = Wlc::new([1, 2, 1].into_iter());
        // Overheads 256, 300 (150 per weight), 200.
        assert_eq!(wlc.pick(counts(&[(1, 0), (1, 44), (0, 200)])), Some(1));
        // An active connection outweighs 255 inactive ones.
        let wlc = Wlc::new([1, 1].into_iter());
        assert_eq!(wlc.pick(counts(&[(1, 0), (0, 255)])), Some(1));
        assert_eq!(wlc.pick(counts(&[(1, 0), (0, 256)])), Some(0));
    }

    #[test]
    fn first_wins_ties_and_zero_weights_are_skipped() {
        let wlc = Wlc::new([0, 3, 3].into_iter());
        assert_eq!(wlc.pick(counts(&[(0, 0), (2, 0), (2, 0)])), Some(1));
        assert_eq!(
            Wlc::new([0, 0].into_iter()).pick(counts(&[(0, 0); 2])),
            None
        );
        assert_eq!(
            Wlc::new([].into_iter()).pick(|_| ConnCounts::default()),
            None
        );
    }

    #[test]
    fn extreme_counts_and_weights_compare_exactly() {
        let wlc = Wlc::new([u32::MAX, 1].into_iter());
        let max = (u32::MAX, u32::MAX);
        assert_eq!(wlc.pick(counts(&[max, (u32::MAX / 2, 0)])), Some(0));
        assert_eq!(wlc.pick(counts(&[max, (0, 0)])), Some(1));
    }
}

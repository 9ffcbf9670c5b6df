//! IPVS weighted round robin (`ip_vs_wrr.c`): passes over the backends with a current weight
//! that starts at the maximum weight and drops by the gcd of the weights at each wrap; a pass
//! picks every backend whose weight reaches the current weight. Heavier backends are thus picked
//! more often, interleaved rather than in bursts.

use parking_lot::Mutex;

#[derive(Debug)]
pub(super) struct Wrr {
    weights: Box<[u32]>,
    max_weight: u32,
    gcd: u32,
    /// The rotation is inherently sequential; the lock is taken only on the new-flow path.
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The last backend visited.
    index: usize,
    /// The current weight; 0 before the first pick.
    current: u32,
}

impl Wrr {
    pub(super) fn new(weights: impl Iterator<Item = u32>) -> Self {
        let weights: Box<[u32]> = weights.collect();
        let max_weight = weights.iter().copied().max().unwrap_or(0);
        // gcd(0, w) = w, so zero weights do not affect the step.
        let gcd = weights.iter().copied().fold(0, gcd);
        Self {
            // The first pick wraps to index 0 and so starts the first pass at the maximum.
            state: Mutex::new(State {
                index: weights.len().saturating_sub(1),
                current: 0,
            }),
            weights,
            max_weight,
            gcd,
        }
    }

    pub(super) fn pick(&self) -> Option<usize> {
        if self.max_weight == 0 {
            return None;
        }
        let mut state = self.state.lock();
        // Terminates within two passes: the current weight stays in 1..=max_weight, which the
        // heaviest backend always reaches. Weight-0 backends never reach it.
        loop {
            state.index += 1;
            if state.index >= self.weights.len() {
                state.index = 0;
                state.current = state.current.saturating_sub(self.gcd);
                if state.current == 0 {
                    state.current = self.max_weight;
                }
            }
            if self.weights.get(state.index).copied().unwrap_or(0) >= state.current {
                return Some(state.index);
            }
        }
    }
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sequence(weights: &[u32], n: usize) -> Vec<usize> {
        let wrr = Wrr::new(weights.iter().copied());
        (0..n).map(|_| wrr.pick().unwrap()).collect()
    }

    #[test]
    fn weights_4_3_2_give_the_ipvs_sequence() {
        // A A B A B C A B C, as in the LVS documentation and ip_vs_wrr.c.
        let cycle = [0, 0, 1, 0, 1, 2, 0, 1, 2];
        let expected: Vec<usize> = cycle.iter().chain(&cycle).copied().collect();
        assert_eq!(sequence(&[4, 3, 2], 18), expected);
    }

    #[test]
    fn common_divisor_steps_the_current_weight() {
        // gcd 2: current weight 4 picks only B, then 2 picks both.
        assert_eq!(sequence(&[2, 4], 6), [1, 0, 1, 1, 0, 1]);
    }

    #[test]
    fn zero_weights_are_skipped() {
        assert_eq!(sequence(&[0, 1, 0, 2, 0], 6), [3, 1, 3, 3, 1, 3]);
        assert_eq!(Wrr::new([0, 0].into_iter()).pick(), None);
        assert_eq!(Wrr::new([].into_iter()).pick(), None);
    }

    #[test]
    fn huge_weights_do_not_overflow() {
        assert_eq!(sequence(&[u32::MAX, 1], 3), [0, 0, 0]);
        assert_eq!(sequence(&[u32::MAX, u32::MAX], 4), [0, 1, 0, 1]);
    }

    #[test]
    fn gcd_of_weights() {
        assert_eq!([12, 0, 18, 30].into_iter().fold(0, gcd), 6);
        assert_eq!(gcd(0, 0), 0);
    }
}

//! IPVS round robin: new flows rotate over the backends of positive weight.

use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug)]
pub(super) struct Rr {
    /// Indices of the backends of positive weight, in the caller's order.
    eligible: Box<[usize]>,
    /// Counts picks. Relaxed suffices: concurrent pickers only need distinct values, not an
    /// order with other memory. Its wrap-around at `usize::MAX` merely restarts the rotation.
    cursor: AtomicUsize,
}

impl Rr {
    pub(super) fn new(weights: impl Iterator<Item = u32>) -> Self {
        Self {
            eligible: weights
                .enumerate()
                .filter(|&(_, w)| w > 0)
                .map(|(i, _)| i)
                .collect(),
            cursor: AtomicUsize::new(0),
        }
    }

    pub(super) fn pick(&self) -> Option<usize> {
        if self.eligible.is_empty() {
            return None;
        }
        let turn = self.cursor.fetch_add(1, Ordering::Relaxed);
        self.eligible.get(turn % self.eligible.len()).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_over_positive_weights_only() {
        let rr = Rr::new([0, 5, 0, 1, 1, 0].into_iter());
        let picks: Vec<_> = (0..7).map(|_| rr.pick().unwrap()).collect();
        assert_eq!(picks, [1, 3, 4, 1, 3, 4, 1]);
    }

    #[test]
    fn concurrent_picks_stay_balanced() {
        let rr = Rr::new([1, 1, 1].into_iter());
        let counts: Vec<[usize; 3]> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        let mut c = [0; 3];
                        for _ in 0..3000 {
                            c[rr.pick().unwrap()] += 1;
                        }
                        c
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (a, b) in counts[0].iter().zip(&counts[1]) {
            assert_eq!(a + b, 2000);
        }
    }
}

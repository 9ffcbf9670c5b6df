//! IPVS source hashing (`ip_vs_sh.c`): a fixed table of 256 buckets, hashed into by the client
//! address, so a client keeps reaching the same backend while the backend set is unchanged.

/// IPVS's `IP_VS_SH_TAB_BITS`.
const BUCKET_BITS: u32 = 8;
const BUCKETS: usize = 1 << BUCKET_BITS;

#[derive(Debug)]
pub(super) struct Sh {
    /// Bucket → backend index; empty when no backend has a positive weight.
    buckets: Box<[usize]>,
}

impl Sh {
    /// Fills the buckets as `ip_vs_sh_reassign` does: cycling over the backends, each taking as
    /// many consecutive buckets as its weight. Unlike IPVS, weight-0 backends get no bucket, so
    /// their clients are spread over the others instead of being refused.
    pub(super) fn new(weights: impl Iterator<Item = u32>) -> Self {
        let eligible: Vec<(usize, u32)> = weights.enumerate().filter(|&(_, w)| w > 0).collect();
        let buckets = eligible
            .iter()
            .cycle()
            .flat_map(|&(i, w)| std::iter::repeat_n(i, (w as usize).min(BUCKETS)))
            .take(BUCKETS)
            .collect();
        Self { buckets }
    }

    pub(super) fn pick(&self, source_hash: u64) -> Option<usize> {
        // The top bits: the best-mixed bits of a multiplicative or xxh3 hash.
        let bucket = (source_hash >> (u64::BITS - BUCKET_BITS)) as usize;
        self.buckets.get(bucket).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_filled_round_robin_by_weight() {
        let sh = Sh::new([1, 0, 2].into_iter());
        assert_eq!(sh.buckets.len(), BUCKETS);
        assert_eq!(&sh.buckets[..7], &[0, 2, 2, 0, 2, 2, 0]);
        // 256 = 85 · 3 + 1: the last bucket starts a new cycle.
        assert_eq!(sh.buckets.iter().filter(|&&b| b == 0).count(), 86);
    }

    #[test]
    fn huge_weight_takes_every_bucket_like_ipvs() {
        let sh = Sh::new([u32::MAX, 1].into_iter());
        assert!(sh.buckets.iter().all(|&b| b == 0));
    }

    #[test]
    fn source_hash_selects_a_stable_bucket() {
        let sh = Sh::new([1, 1, 1, 1].into_iter());
        assert_eq!(sh.pick(0), Some(0));
        assert_eq!(sh.pick(u64::MAX), Some(3));
        assert_eq!(sh.pick(1 << 56), Some(1));
        assert_eq!(
            sh.pick(0x0300_0000_0000_0000),
            sh.pick(0x03FF_FFFF_FFFF_FFFF)
        );
        assert_eq!(Sh::new([0].into_iter()).pick(0), None);
        assert_eq!(Sh::new([].into_iter()).pick(0), None);
    }
}

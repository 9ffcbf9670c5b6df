//! Time as the data plane sees it: a monotonic instant handed in by the caller.
//!
//! The engine never reads a clock; the node passes `Instant`s derived from its monotonic clock,
//! tests and benchmarks pass simulated ones.

use std::time::Duration;

/// A point on the caller's monotonic clock, in nanoseconds since an arbitrary origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Instant(u64);

impl Instant {
    /// The origin of the clock.
    pub const ZERO: Instant = Instant(0);

    pub const fn from_nanos(nanos: u64) -> Self {
        Instant(nanos)
    }

    pub const fn from_secs(secs: u64) -> Self {
        Instant(secs.saturating_mul(1_000_000_000))
    }

    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Whole seconds since the origin, rounded down; sessions store their deadlines in seconds.
    pub const fn as_secs(self) -> u64 {
        self.0 / 1_000_000_000
    }

    /// Saturating addition: an instant never wraps.
    pub fn saturating_add(self, d: Duration) -> Instant {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        Instant(self.0.saturating_add(nanos))
    }

    /// Time from `earlier` to `self`, zero when `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Instant) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_saturating() {
        let t = Instant::from_secs(5);
        assert_eq!(t.as_secs(), 5);
        assert_eq!(
            t.saturating_add(Duration::from_millis(1500)).as_nanos(),
            6_500_000_000
        );
        assert_eq!(
            Instant::from_nanos(u64::MAX)
                .saturating_add(Duration::from_secs(1))
                .as_nanos(),
            u64::MAX
        );
        assert_eq!(Instant::ZERO.saturating_duration_since(t), Duration::ZERO);
        assert_eq!(
            t.saturating_duration_since(Instant::ZERO),
            Duration::from_secs(5)
        );
    }
}

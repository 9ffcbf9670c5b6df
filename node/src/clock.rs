//! The node's one monotonic clock, as the data plane's [`Instant`]s count it. Session deadlines
//! are stored in these seconds, so every caller of the engine (packet workers, the admin API)
//! must read this clock and no other.
//!
//! It is `CLOCK_MONOTONIC`, counted from the first call in this process: the clock the kernel's
//! eBPF programs read (`bpf_ktime_get_ns`), so the fast path's last-seen times convert exactly.

use std::sync::OnceLock;

use dataplane::Instant;

static ORIGIN: OnceLock<u64> = OnceLock::new();

/// `CLOCK_MONOTONIC` in nanoseconds.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to; CLOCK_MONOTONIC always exists on Linux, so
    // the call cannot fail (and if it did, `ts` would stay zero: time would stand still).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

fn origin() -> u64 {
    *ORIGIN.get_or_init(monotonic_ns)
}

/// Now, counted from the first call in this process.
pub(crate) fn now() -> Instant {
    let origin = origin();
    Instant::from_nanos(monotonic_ns().saturating_sub(origin))
}

/// A `CLOCK_MONOTONIC` reading (an eBPF program's `bpf_ktime_get_ns`) on this clock; a time
/// before the origin is the origin.
pub(crate) fn from_monotonic_ns(ns: u64) -> Instant {
    Instant::from_nanos(ns.saturating_sub(origin()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_a_monotonic_reading_lands_on_this_clock() {
        let before = now();
        let reading = from_monotonic_ns(monotonic_ns());
        let after = now();
        assert!(before <= reading && reading <= after);
        assert_eq!(from_monotonic_ns(0), Instant::ZERO);
    }
}

//! The node's one monotonic clock, as the data plane's [`Instant`]s count it. Session deadlines
//! are stored in these seconds, so every caller of the engine (packet workers, the admin API)
//! must read this clock and no other.

use std::sync::OnceLock;

use dataplane::Instant;

static ORIGIN: OnceLock<std::time::Instant> = OnceLock::new();

/// Now, counted from the first call in this process.
pub(crate) fn now() -> Instant {
    let origin = *ORIGIN.get_or_init(std::time::Instant::now);
    Instant::from_nanos(u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX))
}

//! Memory per session, measured: a fresh process per address family builds an engine for
//! 1,000,000 sessions, opens 1,000,000 flows through it, and reports its resident-set growth
//! per session next to what the session table allocates, and the same for the DashMap baseline.
//! Target (issue 2): ≤ 128 bytes per IPv4 session.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::process::Command;

use dataplane::{Instant, L4Checksum, Packet, Verdict};
use support::{SESSIONS, engine, syn};

const CHILD: &str = "LBC_MEMORY_BENCH_FAMILY";

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Runs in the child: one family, one engine, a million flows.
fn measure(v6: bool) {
    let before = rss_bytes();
    let (engine, mut worker) = if v6 {
        engine(1024, SESSIONS)
    } else {
        engine(SESSIONS, 1024)
    };
    let mut buf = vec![0u8; 256];
    for i in 0..SESSIONS {
        let p = syn(i, v6);
        buf[..p.len()].copy_from_slice(&p);
        let mut pkt = Packet::new(&mut buf, p.len(), L4Checksum::Verified);
        assert!(matches!(
            worker.process(Instant::from_secs(1), &mut pkt),
            Verdict::Forward(_)
        ));
        worker.drain_events().for_each(drop);
    }
    let after = rss_bytes();
    assert_eq!(engine.session_count(), SESSIONS as usize);
    let (v4_bytes, v6_bytes) = engine.session_table_bytes();
    let table = if v6 { v6_bytes } else { v4_bytes };
    let n = f64::from(SESSIONS);
    println!(
        "memory per {} session at {SESSIONS} sessions: {:.1} B measured (resident-set growth of a \
         fresh process), {:.1} B allocated by the session table for its maximum",
        if v6 { "IPv6" } else { "IPv4" },
        after.saturating_sub(before) as f64 / n,
        table as f64 / n,
    );
}

/// Runs in the child: the DashMap baseline with the same million flows.
fn measure_dashmap() {
    let before = rss_bytes();
    let table = support::dashmap_baseline::filled(SESSIONS);
    let after = rss_bytes();
    assert_eq!(table.len(), 2 * SESSIONS as usize);
    println!(
        "memory per IPv4 session at {SESSIONS} sessions with the DashMap baseline (both keys to \
         one Arc<Mutex<session>>, presized): {:.1} B measured",
        after.saturating_sub(before) as f64 / f64::from(SESSIONS),
    );
}

fn main() {
    match std::env::var(CHILD).as_deref() {
        Ok("v4") => return measure(false),
        Ok("v6") => return measure(true),
        Ok("dashmap") => return measure_dashmap(),
        _ => {}
    }
    // `cargo bench` passes filter arguments; this bench runs whole or not at all.
    if std::env::args()
        .skip(1)
        .any(|a| !a.starts_with('-') && !"memory".contains(a.as_str()))
    {
        return;
    }
    let me = std::env::current_exe().expect("own path");
    for family in ["v4", "v6", "dashmap"] {
        let status = Command::new(&me)
            .env(CHILD, family)
            .status()
            .expect("run the measuring child");
        assert!(status.success(), "memory measurement for {family} failed");
    }
}

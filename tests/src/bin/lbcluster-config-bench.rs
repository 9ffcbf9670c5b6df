//! `lbcluster-config-bench [--changes N]`: how fast a configuration change reaches the data
//! plane of every node. Builds a three-node cluster in the lab, makes N (default 200, at least
//! 100) backend weight changes with `lbcluster backend edit` on node 1, and for each measures
//! the time from the command returning until all three nodes' data planes run the new
//! version. Prints p50, p99 and max against the target (p99 ≤ 100 ms). Needs root;
//! `lbcluster` and `lab-backend` must be built next to it (`cargo build --release -p node -p
//! tests`).

use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use tests::cluster::ClusterSite;

#[derive(Debug, Parser)]
struct Cli {
    /// Changes to make.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(100..=10_000))]
    changes: u32,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let site = ClusterSite::start(3, 3, 2)?;
    // Warm up: every node runs the bootstrap configuration.
    site.change_latencies(&[1, 2, 3], 5)?;
    let mut latencies = site.change_latencies(&[1, 2, 3], cli.changes as usize)?;
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let p99 = percentile(&latencies, 99.0);
    println!(
        "config change -> running on all 3 data planes, {} changes: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (target p99 <= 100 ms: {})",
        latencies.len(),
        ms(percentile(&latencies, 50.0)),
        ms(p99),
        ms(latencies[latencies.len() - 1]),
        if p99 <= Duration::from_millis(100) {
            "met"
        } else {
            "MISSED"
        }
    );
    Ok(())
}

//! `lbcluster-config-bench [--changes N]`: how fast a configuration change reaches the data
//! plane of every node. Builds a three-node cluster in the lab, makes N (default 200, at least
//! 100) backend weight changes with `lbcluster backend edit` on node 1, and for each measures
//! the time from the command returning until all three nodes' data planes run the new
//! version. Prints p50, p99 and max against the target (p99 ≤ 100 ms). Needs root;
//! `lbcluster` and `lab-backend` must be built next to it (`cargo build --release -p node -p
//! tests`).

use std::time::{Duration, Instant};

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
    let started = Instant::now();
    let site = ClusterSite::start(3, 3, 2)?;
    println!(
        "three-node cluster formed in the lab in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // Warm up: every node runs the bootstrap configuration.
    site.change_latencies(&[1, 2, 3], 5)?;
    let mut run = site.change_latencies(&[1, 2, 3], cli.changes as usize)?;
    let (first, last) = (run.versions[0], run.versions[run.versions.len() - 1]);
    anyhow::ensure!(
        last - first + 1 == u64::from(cli.changes),
        "each change must make one version: {first}..={last}"
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let summary = |v: &mut Vec<Duration>| {
        v.sort();
        (percentile(v, 50.0), percentile(v, 99.0), v[v.len() - 1])
    };
    let (c50, c99, cmax) = summary(&mut run.commands);
    let (p50, p99, max) = summary(&mut run.to_all);
    println!(
        "{} changes (configuration versions {first}..={last}) with `lbcluster backend edit` on n1",
        cli.changes
    );
    println!(
        "  command, start to return (committed, running on n1): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(c50),
        ms(c99),
        ms(cmax)
    );
    println!(
        "  command return -> running on all 3 data planes:      p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (target p99 <= 100 ms: {})",
        ms(p50),
        ms(p99),
        ms(max),
        if p99 <= Duration::from_millis(100) {
            "met"
        } else {
            "MISSED"
        }
    );
    Ok(())
}

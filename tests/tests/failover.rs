//! Zero broken connections: three nodes announcing over BGP with BFD at 100 ms × 3, real load
//! from the client through the router (long-lived streams with every byte checked, and a steady
//! rate of new short HTTP connections), while the pool of nodes changes: a hard failure, a
//! restart after a failure, scale-out, drain and remove, a rolling restart. Needs root and
//! bird2. Figures are printed; the targets asserted are counts, the stall bound is the one the
//! scenario promises.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use tests::bgp::BgpOptions;
use tests::cluster::{ClusterOptions, ClusterSite};
use tests::lab::LabProcess;
use tests::site::VIP;

/// Long-lived streams and new connections per second of every scenario.
const STREAMS: u32 = 500;
const RATE: u32 = 500;
const SETTLE: Duration = Duration::from_secs(30);

/// A cluster of `members` nodes (of `nodes` namespaces) announcing over BGP with BFD, a TCP
/// echo service on VIP:9000 beside the bootstrap HTTP service on VIP:80, routed over all
/// members.
fn site(nodes: usize, members: usize) -> Result<ClusterSite> {
    let site = ClusterSite::start_with(ClusterOptions {
        nodes,
        members,
        backends: 2,
        bgp: Some(BgpOptions { bfd: true }),
    })?;
    let vip = format!("{VIP}:9000");
    site.cli(1, &["service", "add", "-t", &vip, "-s", "mh"])?
        .ok()?;
    for j in 1..=2 {
        let backend = format!("{}:9000", site.lab.backend_addr(j));
        site.cli(1, &["backend", "add", "-t", &vip, "-r", &backend])?
            .ok()?;
    }
    let all: Vec<usize> = (1..=members).collect();
    site.lab.wait_next_hops(IpAddr::V4(VIP), &all, SETTLE)?;
    site.wait_for("the echo service", SETTLE, |s| {
        s.lab.tcp_echo_check("client", echo(), 1000)
    })?;
    Ok(site)
}

fn echo() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(VIP), 9000)
}

fn http() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(VIP), 80)
}

/// Starts the load for `seconds`; returns it and when it started.
fn load(site: &ClusterSite, seconds: u64) -> Result<(LabProcess, Instant)> {
    let started = Instant::now();
    let load = site.start_load(echo(), http(), STREAMS, RATE, seconds)?;
    // Let the streams open and their sessions reach every node.
    std::thread::sleep(Duration::from_secs(3));
    Ok((load, started))
}

/// The load's report, printed in short.
fn report(site: &ClusterSite, load: &LabProcess, what: &str) -> Result<Value> {
    let report = site.streams_report(load, Duration::from_secs(120))?;
    let (st, sh) = (&report["streams"], &report["short"]);
    println!(
        "{what}: streams {}/{} completed, resets {}, content errors {}, stall p50 {} ms p99 {} ms max {} ms, {} MB verified; \
         short {} attempted, {} failed, latency p50 {:.1} ms p99 {:.1} ms max {:.1} ms",
        st["completed"],
        st["connections"],
        st["resets"],
        st["content_errors"],
        st["stall_ms"]["p50"],
        st["stall_ms"]["p99"],
        st["stall_ms"]["max"],
        st["bytes_verified"].as_u64().unwrap_or(0) / 1_000_000,
        sh["attempted"],
        sh["failed"],
        sh["latency_ms"]["p50"].as_f64().unwrap_or(0.0),
        sh["latency_ms"]["p99"].as_f64().unwrap_or(0.0),
        sh["latency_ms"]["max"].as_f64().unwrap_or(0.0),
    );
    Ok(report)
}

/// Every long-lived connection completed with no reset and no content error.
fn streams_intact(report: &Value) {
    let st = &report["streams"];
    assert_eq!(st["connections"], STREAMS, "{st}");
    assert_eq!(st["resets"], 0, "{st}");
    assert_eq!(st["content_errors"], 0, "{st}");
    assert_eq!(st["completed"], STREAMS, "{st}");
}

fn no_failed_connections(report: &Value) {
    assert_eq!(report["short"]["failed"], 0, "{}", report["short"]);
}

/// Node k's sessions created by its own traffic.
fn created(site: &ClusterSite, k: usize) -> Result<u64> {
    let (_, st) = site.status(k)?;
    st["events"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "sessions_created")
        .and_then(|e| e["count"].as_u64())
        .context("sessions_created")
}

fn wait_warm(site: &ClusterSite, k: usize) -> Result<()> {
    site.wait_for(&format!("n{k} warm"), SETTLE, |s| {
        let (_, st) = s.status(k)?;
        ensure!(st["sync"]["warm"] == true, "{}", st["sync"]);
        Ok(())
    })
}

#[test]
fn hard_failure_links_cut() -> Result<()> {
    let site = site(3, 3)?;
    let (load, started) = load(&site, 10)?;
    let cut = started.elapsed();
    site.cut_links(1)?;
    let report = report(&site, &load, "hard failure (n1's links cut)")?;
    streams_intact(&report);
    let stall = report["streams"]["stall_ms"]["max"]
        .as_u64()
        .unwrap_or(u64::MAX);
    assert!(stall <= 1000, "longest stall {stall} ms");
    // New connections fail only inside the failure window.
    let window = cut.as_millis()..cut.as_millis() + 1000;
    for f in report["short"]["failures"].as_array().into_iter().flatten() {
        let at = f["at_ms"].as_u64().map(u128::from).unwrap_or(u128::MAX);
        assert!(
            window.contains(&at),
            "failure at {at} ms outside {window:?}: {f}"
        );
    }
    Ok(())
}

#[test]
fn restart_after_failure() -> Result<()> {
    let mut site = site(3, 3)?;
    let (load, _) = load(&site, 14)?;
    site.kill_node(1);
    site.lab.wait_next_hops(IpAddr::V4(VIP), &[2, 3], SETTLE)?;
    std::thread::sleep(Duration::from_secs(2));
    let before = Instant::now();
    site.start_node(1)?;
    wait_warm(&site, 1)?;
    site.lab
        .wait_next_hops(IpAddr::V4(VIP), &[1, 2, 3], SETTLE)?;
    println!(
        "n1 back in the VIP route {:?} after its restart",
        before.elapsed()
    );
    let report = report(&site, &load, "n1 killed, then restarted")?;
    streams_intact(&report);
    let stall = report["streams"]["stall_ms"]["max"]
        .as_u64()
        .unwrap_or(u64::MAX);
    assert!(stall <= 1000, "longest stall {stall} ms");
    // It takes traffic again: new flows are created on it.
    let n = created(&site, 1)?;
    for _ in 0..30 {
        site.lab.http_get("client", http(), "/")?;
    }
    assert!(created(&site, 1)? > n, "n1 takes new flows");
    Ok(())
}

#[test]
fn scale_out_with_one_command() -> Result<()> {
    let mut site = site(4, 3)?;
    site.start_node(4)?;
    let (load, _) = load(&site, 12)?;
    let added = Instant::now();
    site.add_node(2, 4)?;
    wait_warm(&site, 4)?;
    let warm = added.elapsed();
    let (_, st) = site.status(4)?;
    let pulled = st["sessions"]["count"].as_u64().unwrap_or(0);
    site.lab
        .wait_next_hops(IpAddr::V4(VIP), &[1, 2, 3, 4], SETTLE)?;
    println!(
        "n4 added: warm {warm:?} after `node add` with {pulled} sessions pulled; in the VIP route after {:?}",
        added.elapsed()
    );
    let report = report(&site, &load, "scale-out (n4 added)")?;
    streams_intact(&report);
    no_failed_connections(&report);
    assert!(pulled >= u64::from(STREAMS), "n4 pulled {pulled} sessions");
    assert!(created(&site, 4)? > 0, "n4 takes new flows");
    Ok(())
}

#[test]
fn drain_then_remove() -> Result<()> {
    let site = site(3, 3)?;
    let (load, _) = load(&site, 12)?;
    site.cli(1, &["drain", "n2"])?.ok()?;
    site.lab.wait_next_hops(IpAddr::V4(VIP), &[1, 3], SETTLE)?;
    std::thread::sleep(Duration::from_secs(2));
    site.cli(1, &["node", "remove", "n2"])?.ok()?;
    let report = report(&site, &load, "drain n2, then remove it")?;
    streams_intact(&report);
    no_failed_connections(&report);
    Ok(())
}

#[test]
fn rolling_restart() -> Result<()> {
    let mut site = site(3, 3)?;
    let (load, _) = load(&site, 40)?;
    for k in 1..=3 {
        let others: Vec<usize> = (1..=3).filter(|&j| j != k).collect();
        let began = Instant::now();
        site.cli(k, &["drain", &format!("n{k}")])?.ok()?;
        site.lab.wait_next_hops(IpAddr::V4(VIP), &others, SETTLE)?;
        site.stop_node(k)?;
        site.start_node(k)?;
        wait_warm(&site, k)?;
        site.cli(k, &["undrain", &format!("n{k}")])?.ok()?;
        site.lab
            .wait_next_hops(IpAddr::V4(VIP), &[1, 2, 3], SETTLE)?;
        println!(
            "n{k} drained, restarted, warm and undrained in {:?}",
            began.elapsed()
        );
    }
    ensure!(
        load.is_running(),
        "the load ended before the last node was back"
    );
    let report = report(&site, &load, "rolling restart of n1, n2, n3")?;
    streams_intact(&report);
    no_failed_connections(&report);
    Ok(())
}

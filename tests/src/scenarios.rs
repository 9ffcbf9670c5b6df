//! The failover scenarios (DESIGN §2, §5): three nodes announcing over BGP with BFD at
//! 100 ms × 3, real load from the client through the router (long-lived streams with every byte
//! checked and a steady rate of new short HTTP connections, [`crate::load`]), while the pool of
//! nodes changes. Each scenario returns its load report and what it measured; the end-to-end
//! tests assert the targets, `lbcluster-lab scenario NAME` prints them.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::bgp::BgpOptions;
use crate::cluster::{ClusterOptions, ClusterSite};
use crate::lab::LabProcess;
use crate::site::VIP;

/// Long-lived streams and new connections per second of every scenario.
pub const STREAMS: u32 = 500;
pub const RATE: u32 = 500;
const SETTLE: Duration = Duration::from_secs(30);

/// The scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Node 1's links are cut mid-load.
    HardFailure,
    /// Node 1's daemon is killed mid-load, then started again: it rejoins, bulk-syncs and
    /// takes traffic.
    RestartAfterFailure,
    /// A fourth node is added with one `lbcluster node add` while the load runs.
    ScaleOut,
    /// Node 2 is drained, then removed from the cluster.
    DrainAndRemove,
    /// Every node in turn is drained, restarted, becomes warm and is undrained.
    RollingRestart,
}

/// What a scenario measured.
#[derive(Debug)]
pub struct ScenarioReport {
    /// The load generator's report (`streams`, `short`).
    pub load: Value,
    /// When the failure happened, from the start of the load (hard failure).
    pub failure_at: Option<Duration>,
    /// Sessions the new or restarted node created after it was back (it takes new flows).
    pub created_after: Option<u64>,
    /// Sessions the added node pulled before it turned warm (scale-out).
    pub pulled: Option<u64>,
    /// What happened when, for the operator.
    pub timeline: Vec<String>,
}

impl ScenarioReport {
    /// The load in one paragraph.
    pub fn summary(&self) -> String {
        crate::load::summary(&self.load)
    }

    /// The longest stall of any long-lived connection.
    pub fn longest_stall(&self) -> Duration {
        Duration::from_millis(
            self.load["streams"]["stall_ms"]["max"]
                .as_u64()
                .unwrap_or(u64::MAX),
        )
    }
}

/// Runs `scenario` in a lab of its own (removed at the end).
pub fn run(scenario: Scenario) -> Result<ScenarioReport> {
    match scenario {
        Scenario::HardFailure => hard_failure(),
        Scenario::RestartAfterFailure => restart_after_failure(),
        Scenario::ScaleOut => scale_out(),
        Scenario::DrainAndRemove => drain_and_remove(),
        Scenario::RollingRestart => rolling_restart(),
    }
}

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

/// The load's report, and the scenario's measurements.
fn finish(site: &ClusterSite, load: &LabProcess, report: ScenarioReport) -> Result<ScenarioReport> {
    let load = site.streams_report(load, Duration::from_secs(120))?;
    Ok(ScenarioReport { load, ..report })
}

fn empty() -> ScenarioReport {
    ScenarioReport {
        load: Value::Null,
        failure_at: None,
        created_after: None,
        pulled: None,
        timeline: Vec::new(),
    }
}

fn hard_failure() -> Result<ScenarioReport> {
    let site = site(3, 3)?;
    let (load, started) = load(&site, 10)?;
    let cut = started.elapsed();
    site.cut_links(1)?;
    let mut r = empty();
    r.failure_at = Some(cut);
    r.timeline
        .push(format!("n1's links cut {cut:?} into the load"));
    finish(&site, &load, r)
}

fn restart_after_failure() -> Result<ScenarioReport> {
    let mut site = site(3, 3)?;
    let (load, started) = load(&site, 14)?;
    let mut r = empty();
    r.failure_at = Some(started.elapsed());
    site.kill_node(1);
    site.lab.wait_next_hops(IpAddr::V4(VIP), &[2, 3], SETTLE)?;
    r.timeline.push(format!(
        "n1's daemon killed {:?} into the load; its next hop gone",
        r.failure_at.unwrap_or_default()
    ));
    std::thread::sleep(Duration::from_secs(2));
    let before = Instant::now();
    site.start_node(1)?;
    wait_warm(&site, 1)?;
    site.lab
        .wait_next_hops(IpAddr::V4(VIP), &[1, 2, 3], SETTLE)?;
    r.timeline.push(format!(
        "n1 restarted, warm and back in the VIP route after {:?}",
        before.elapsed()
    ));
    let r = finish(&site, &load, r)?;
    let n = created(&site, 1)?;
    for _ in 0..30 {
        site.lab.http_get("client", http(), "/")?;
    }
    Ok(ScenarioReport {
        created_after: Some(created(&site, 1)? - n),
        ..r
    })
}

fn scale_out() -> Result<ScenarioReport> {
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
    let mut r = empty();
    r.pulled = Some(pulled);
    r.timeline.push(format!(
        "n4 added with one `node add`: warm {warm:?} later with {pulled} sessions pulled, in the VIP route after {:?}",
        added.elapsed()
    ));
    let r = finish(&site, &load, r)?;
    Ok(ScenarioReport {
        created_after: Some(created(&site, 4)?),
        ..r
    })
}

fn drain_and_remove() -> Result<ScenarioReport> {
    let site = site(3, 3)?;
    let (load, _) = load(&site, 12)?;
    let began = Instant::now();
    site.cli(1, &["drain", "n2"])?.ok()?;
    site.lab.wait_next_hops(IpAddr::V4(VIP), &[1, 3], SETTLE)?;
    let mut r = empty();
    r.timeline.push(format!(
        "n2 drained: out of the VIP route after {:?}",
        began.elapsed()
    ));
    std::thread::sleep(Duration::from_secs(2));
    site.cli(1, &["node", "remove", "n2"])?.ok()?;
    r.timeline.push("n2 removed from the cluster".to_owned());
    finish(&site, &load, r)
}

fn rolling_restart() -> Result<ScenarioReport> {
    let mut site = site(3, 3)?;
    let (load, _) = load(&site, 40)?;
    let mut r = empty();
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
        r.timeline.push(format!(
            "n{k} drained, restarted, warm and undrained in {:?}",
            began.elapsed()
        ));
    }
    ensure!(
        load.is_running(),
        "the load ended before the last node was back"
    );
    finish(&site, &load, r)
}

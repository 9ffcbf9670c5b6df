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
use crate::cluster::{ClusterOptions, ClusterSite, Leadership};
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
    /// The same with the echo service behind the SYN proxy (`--syn-proxy on`): every
    /// long-lived stream was opened by a cookie and is carried with a sequence delta, which
    /// session sync hands to the survivors.
    HardFailureProxied,
    /// The Raft leader's daemon is killed mid-load and started again 10 s later: the others
    /// elect meanwhile; it rejoins without an election, bulk-syncs and takes traffic.
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
    /// How the restarted node came back (restart after failure).
    pub rejoin: Option<Rejoin>,
    /// Flows the nodes opened through the SYN proxy (the proxied hard failure).
    pub proxied: Option<u64>,
    /// What happened when, for the operator.
    pub timeline: Vec<String>,
}

/// A node's return after it was killed.
#[derive(Debug)]
pub struct Rejoin {
    /// From the daemon's start to its status saying warm.
    pub warm_after: Duration,
    /// The leadership a survivor saw just before the restart ...
    pub before: Leadership,
    /// ... and seconds after the node was back in the VIP route.
    pub after: Leadership,
    /// The term the restarted node itself reports then.
    pub own_term: Option<u64>,
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
        Scenario::HardFailure => hard_failure(&[]),
        Scenario::HardFailureProxied => hard_failure(&["--syn-proxy", "on"]),
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
    site_with(nodes, members, &[])
}

/// [`site`], with more `service add` options for the echo service.
fn site_with(nodes: usize, members: usize, echo_options: &[&str]) -> Result<ClusterSite> {
    let site = ClusterSite::start_with(ClusterOptions {
        nodes,
        members,
        backends: 2,
        bgp: Some(BgpOptions { bfd: true }),
    })?;
    let vip = format!("{VIP}:9000");
    let mut add = vec!["service", "add", "-t", &vip, "-s", "mh"];
    add.extend_from_slice(echo_options);
    site.cli(1, &add)?.ok()?;
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
    event(site, k, "sessions_created")
}

/// Node k's engine event counter `name`.
fn event(site: &ClusterSite, k: usize, name: &str) -> Result<u64> {
    let (_, st) = site.status(k)?;
    st["events"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == name)
        .and_then(|e| e["count"].as_u64())
        .with_context(|| name.to_owned())
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
        rejoin: None,
        proxied: None,
        timeline: Vec::new(),
    }
}

fn hard_failure(echo_options: &[&str]) -> Result<ScenarioReport> {
    let site = site_with(3, 3, echo_options)?;
    let (load, started) = load(&site, 10)?;
    let cut = started.elapsed();
    site.cut_links(1)?;
    let mut r = empty();
    r.failure_at = Some(cut);
    r.timeline
        .push(format!("n1's links cut {cut:?} into the load"));
    let r = finish(&site, &load, r)?;
    let mut proxied = 0;
    for k in 1..=3 {
        proxied += event(&site, k, "syn_cookies_accepted")?;
    }
    Ok(ScenarioReport {
        proxied: Some(proxied),
        ..r
    })
}

/// How long the killed node stays down (the operator's restart "about 10 s later").
const DOWN: Duration = Duration::from_secs(10);
/// How long to watch for an election after the restarted node is back.
const WATCH: Duration = Duration::from_secs(3);

fn restart_after_failure() -> Result<ScenarioReport> {
    let mut site = site(3, 3)?;
    let (load, started) = load(&site, 24)?;
    let killed = site.leader_index(1, SETTLE)?;
    let others: Vec<usize> = (1..=3).filter(|&k| k != killed).collect();
    let survivor = others[0];
    let mut r = empty();
    r.failure_at = Some(started.elapsed());
    site.kill_node(killed);
    let down = Instant::now();
    site.lab.wait_next_hops(IpAddr::V4(VIP), &others, SETTLE)?;
    r.timeline.push(format!(
        "n{killed} (the leader) killed {:?} into the load; its next hop gone after {:?}",
        r.failure_at.unwrap_or_default(),
        down.elapsed()
    ));
    let elected = site.wait_for("a new leader", SETTLE, |s| {
        let l = s.leadership(survivor)?;
        ensure!(l.leader != format!("n{killed}"), "still {l:?}");
        Ok(l)
    })?;
    r.timeline.push(format!(
        "{} leads in term {} after {:?}",
        elected.leader,
        elected.term,
        down.elapsed()
    ));
    std::thread::sleep(DOWN.saturating_sub(down.elapsed()));
    let before = site.leadership(survivor)?;
    let restarted = Instant::now();
    site.start_node(killed)?;
    let warm_after = crate::lab::wait_for(
        &format!("n{killed} warm"),
        SETTLE,
        Duration::from_millis(20),
        || {
            let st = site.admin_get(killed, "/v1/status?local=true")?;
            ensure!(st["sync"]["warm"] == true, "{}", st["sync"]);
            Ok(restarted.elapsed())
        },
    )?;
    site.lab
        .wait_next_hops(IpAddr::V4(VIP), &[1, 2, 3], SETTLE)?;
    r.timeline.push(format!(
        "n{killed} restarted {:?} after the kill: warm after {warm_after:?}, in the VIP route \
         after {:?}",
        restarted.duration_since(down),
        restarted.elapsed()
    ));
    std::thread::sleep(WATCH);
    let after = site.leadership(survivor)?;
    let (_, st) = site.status(killed)?;
    let own_term = st["cluster"]["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["name"] == format!("n{killed}"))
        .and_then(|n| n["term"].as_u64());
    r.timeline.push(format!(
        "leadership before the restart {before:?}, {WATCH:?} after n{killed} was back {after:?}; \
         n{killed}'s term {own_term:?}"
    ));
    r.rejoin = Some(Rejoin {
        warm_after,
        before,
        after,
        own_term,
    });
    let r = finish(&site, &load, r)?;
    let n = created(&site, killed)?;
    for _ in 0..30 {
        site.lab.http_get("client", http(), "/")?;
    }
    Ok(ScenarioReport {
        created_after: Some(created(&site, killed)? - n),
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
    let (load, started) = load(&site, 40)?;
    let mut r = empty();
    // Each step with its time from the start of the load, the clock of the load's report.
    let at = || format!("{:.3} s", started.elapsed().as_secs_f64());
    for k in 1..=3 {
        let others: Vec<usize> = (1..=3).filter(|&j| j != k).collect();
        let mut steps = vec![format!("drain {}", at())];
        site.cli(k, &["drain", &format!("n{k}")])?.ok()?;
        steps.push(format!("drained {}", at()));
        site.lab.wait_next_hops(IpAddr::V4(VIP), &others, SETTLE)?;
        steps.push(format!("out of the VIP route {}", at()));
        site.stop_node(k)?;
        steps.push(format!("stopped {}", at()));
        site.start_node(k)?;
        steps.push(format!("started {}", at()));
        wait_warm(&site, k)?;
        steps.push(format!("warm {}", at()));
        site.cli(k, &["undrain", &format!("n{k}")])?.ok()?;
        steps.push(format!("undrained {}", at()));
        site.lab
            .wait_next_hops(IpAddr::V4(VIP), &[1, 2, 3], SETTLE)?;
        steps.push(format!("in the VIP route {}", at()));
        r.timeline.push(format!("n{k}: {}", steps.join(", ")));
    }
    ensure!(
        load.is_running(),
        "the load ended before the last node was back"
    );
    finish(&site, &load, r)
}

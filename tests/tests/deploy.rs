//! End-to-end: the Ansible deployment (deploy/ansible) run for real over SSH against the lab's
//! node namespaces (tests::deploy): `site.yml` forms a three-node cluster that announces the
//! VIP over BGP and carries traffic, a second `site.yml` changes nothing, `scale.yml` adds a
//! fourth node under load without a reset and without restarting the others, `upgrade.yml`
//! replaces every node's binary under load, the Raft leader last, without a reset, and a last
//! `site.yml` over all four changes nothing. Needs root, bird2, openssh-server and the venv of
//! `deploy/ansible/check`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use tests::deploy::{DeployLab, ECHO_PORT, NODES, PlaybookRun};
use tests::lab::LabProcess;
use tests::site::{VIP, lbcluster_bin};

const STREAMS: u32 = 200;
const RATE: u32 = 100;
const SETTLE: Duration = Duration::from_secs(60);

fn echo() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(VIP), ECHO_PORT)
}

fn http() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(VIP), 80)
}

/// Every host of the recap reported `changed=0`.
fn nothing_changed(run: &PlaybookRun, hosts: usize) -> Result<()> {
    let changed = run.changed()?;
    ensure!(changed.len() == hosts, "recap {changed:?}");
    ensure!(
        changed.iter().all(|(_, c)| *c == 0),
        "a second run changed something: {changed:?}\n{}",
        run.output
    );
    Ok(())
}

/// The load's streams all completed with no reset and no content error, and no new
/// connection failed.
fn no_broken_connections(what: &str, report: &Value) -> Result<()> {
    let (st, sh) = (&report["streams"], &report["short"]);
    println!("{what}: {}", tests::load::summary(report));
    ensure!(st["connections"] == STREAMS, "{what}: {st}");
    ensure!(st["resets"] == 0, "{what}: resets: {st}");
    ensure!(st["content_errors"] == 0, "{what}: content errors: {st}");
    ensure!(st["completed"] == STREAMS, "{what}: {st}");
    ensure!(sh["attempted"].as_u64() > Some(0), "{what}: {sh}");
    ensure!(sh["failed"] == 0, "{what}: failed connections: {sh}");
    Ok(())
}

fn pids(d: &DeployLab, nodes: &[usize]) -> Result<Vec<u32>> {
    nodes.iter().map(|&k| d.daemon_pid(k)).collect()
}

/// Starts the load, to run until [`finish`] ends it (a playbook's length is not known in
/// advance; ten minutes at most), and lets its streams reach every node.
fn load(d: &DeployLab) -> Result<LabProcess> {
    let load = tests::load::start(&d.lab, echo(), http(), STREAMS, RATE, 600)?;
    std::thread::sleep(Duration::from_secs(3));
    Ok(load)
}

/// Ends the load (SIGUSR1: its connections finish their round trip and close) and checks its
/// report.
fn finish(what: &str, load: &LabProcess) -> Result<()> {
    load.signal("USR1")
        .with_context(|| format!("{what}: the load ended before the playbook did"))?;
    let report = tests::load::report(load, Duration::from_secs(60))?;
    no_broken_connections(what, &report)
}

#[test]
fn ansible_site_scale_upgrade() -> Result<()> {
    let mut d = DeployLab::start()?;
    let first = [1, 2, 3];

    // 1. site.yml for three hosts: a healthy cluster that announces the VIP and carries traffic.
    let run = d.playbook("site.yml", &["--limit", "n1,n2,n3"])?;
    println!("site.yml (n1..n3, first run): {:?}", run.took);
    d.wait_healthy(1, &first, SETTLE)?;
    let (_, st) = d.status(1)?;
    for row in st["cluster"]["nodes"].as_array().into_iter().flatten() {
        let bgp = &row["bgp"];
        let peers = bgp["peers"].as_array().context("no BGP peers")?;
        ensure!(
            !peers.is_empty() && peers.iter().all(|p| p["established"] == true),
            "BGP not established on {row}"
        );
        ensure!(
            bgp["vips_announced"].as_array().map(Vec::len) == Some(1),
            "VIP not announced by {row}"
        );
    }
    let services = d.cli(2, &["service", "list", "-o", "json"])?.ok()?;
    let services: Value = serde_json::from_str(&services)?;
    ensure!(
        services.as_array().map(Vec::len) == Some(2),
        "services: {services}"
    );
    d.wait_for("HTTP through the VIP", SETTLE, |d| {
        d.lab.http_get("client", http(), "/")
    })?;
    d.wait_for("TCP echo through the VIP", SETTLE, |d| {
        d.lab.tcp_echo_check("client", echo(), 10_000)
    })?;

    // 2. The same again changes nothing and restarts nothing.
    let before = pids(&d, &first)?;
    let run = d.playbook("site.yml", &["--limit", "n1,n2,n3"])?;
    println!("site.yml (n1..n3, second run): {:?}", run.took);
    nothing_changed(&run, 3)?;
    ensure!(
        pids(&d, &first)? == before,
        "a second site.yml restarted a node"
    );

    // 3. scale.yml adds n4 under load; the others are not restarted.
    let traffic = load(&d)?;
    let run = d.playbook("scale.yml", &["--limit", "n4"])?;
    println!("scale.yml (n4): {:?}", run.took);
    d.wait_healthy(1, &[1, 2, 3, 4], SETTLE)?;
    finish("scale.yml", &traffic)?;
    ensure!(
        pids(&d, &first)? == before,
        "scale.yml restarted an existing node"
    );
    let (_, n4) = d.status(4)?;
    ensure!(
        n4["sync"]["warm"] == true && n4["cluster"]["nodes"].as_array().map(Vec::len) == Some(4),
        "n4: {n4}"
    );

    // 4. upgrade.yml under load with a different binary (the same program, bytes appended).
    let all: Vec<usize> = (1..=NODES).collect();
    let leader = d.status(1)?.1["cluster"]["leader"]
        .as_str()
        .context("no leader")?
        .to_owned();
    let new_bin = d.lab.dir().join("lbcluster-new");
    let mut bytes = std::fs::read(lbcluster_bin()?)?;
    bytes.extend_from_slice(b"\nlbcluster upgrade test\n");
    std::fs::write(&new_bin, &bytes)?;
    let old_pids = pids(&d, &all)?;
    let traffic = load(&d)?;
    let src = format!("lbcluster_binary_src={}", new_bin.display());
    let run = d.playbook("upgrade.yml", &["-e", &src])?;
    println!("upgrade.yml (4 nodes): {:?}", run.took);
    finish("upgrade.yml", &traffic)?;
    let order = run.changed_hosts("Replace the binary");
    println!("upgrade order: {order:?}, leader before: {leader}");
    ensure!(order.len() == NODES, "replaced on {order:?}");
    ensure!(
        order.last() == Some(&leader),
        "the leader {leader} was not upgraded last: {order:?}"
    );
    // The others' restarts cost no election (a returning node never campaigns against a
    // leader a majority follows), so the leader is still the same node at its turn, and it is
    // the only one that hands leadership over.
    let stepped_down = run.changed_hosts("Move the Raft leadership away");
    println!("leadership handed over by: {stepped_down:?}");
    ensure!(
        stepped_down == [leader.clone()],
        "leadership handed over by {stepped_down:?}, not by the leader {leader} alone"
    );
    for k in 1..=NODES {
        ensure!(
            std::fs::read(d.installed_bin(k))? == bytes,
            "n{k} does not run the new binary"
        );
    }
    let new_pids = pids(&d, &all)?;
    ensure!(
        new_pids.iter().zip(&old_pids).all(|(a, b)| a != b),
        "not every daemon restarted: {old_pids:?} -> {new_pids:?}"
    );
    d.wait_healthy(1, &all, SETTLE)?;

    // 5. site.yml over the four nodes changes nothing.
    let run = d.playbook("site.yml", &[])?;
    println!("site.yml (n1..n4): {:?}", run.took);
    nothing_changed(&run, NODES)?;
    ensure!(pids(&d, &all)? == new_pids, "site.yml restarted a node");
    Ok(())
}

//! End-to-end BGP: three lbcluster nodes, each configuring its own BIRD, peer with the lab
//! router's BIRD (ECMP with layer-4 hashing); the router's routes follow what the nodes announce.
//! Needs root and bird2. Times are printed; only generous bounds are asserted.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use tests::bgp::BgpOptions;
use tests::cluster::{ClusterOptions, ClusterSite, lip};
use tests::site::VIP;

/// Sessions come up and routes settle within this.
const SETTLE: Duration = Duration::from_secs(30);

fn site(bfd: bool) -> Result<ClusterSite> {
    let site = ClusterSite::start_with(ClusterOptions {
        nodes: 3,
        members: 3,
        backends: 2,
        bgp: Some(BgpOptions { bfd }),
    })?;
    let took = site
        .lab
        .wait_next_hops(IpAddr::V4(VIP), &[1, 2, 3], SETTLE)
        .with_context(|| format!("n1's log:\n{}", site.log(1)))?;
    println!("VIP routed over all three nodes {took:?} after the cluster formed");
    Ok(site)
}

/// Node k's sessions count.
fn sessions(site: &ClusterSite, k: usize) -> Result<u64> {
    let (_, st) = site.status(k)?;
    st["sessions"]["count"].as_u64().context("sessions.count")
}

/// ECMP over the three nodes: connections from many source ports are spread over all of
/// them; each LIP is routed to its owner, and to the survivors when the owner is cut off; a
/// VIP whose backends all fail their health check is withdrawn and comes back with them.
#[test]
fn ecmp_lip_owner_and_backup_routes_and_health_gated_vip() -> Result<()> {
    let site = site(false)?;
    // Every node reports its session with the router and the VIP announced.
    site.wait_for("every node's BGP row", SETTLE, |s| {
        let (_, st) = s.status(1)?;
        let rows = st["cluster"]["nodes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        ensure!(rows.len() == 3, "{st}");
        for row in &rows {
            let bgp = &row["bgp"];
            ensure!(
                bgp["peers"][0]["established"] == true
                    && bgp["vips_announced"].as_array().map(Vec::len) == Some(1),
                "{row}"
            );
        }
        Ok(())
    })?;
    let listing = site.cli(2, &["status", "bgp"])?.ok()?;
    for k in 1..=3 {
        assert!(
            listing
                .lines()
                .any(|l| l.starts_with(&format!("n{k} ")) && l.contains("Established")),
            "{listing}"
        );
    }
    // Owners: each LIP has exactly one next hop, its node.
    for k in 1..=3 {
        site.lab.wait_next_hops(IpAddr::V4(lip(k)), &[k], SETTLE)?;
    }
    // Connections from many source ports: every node created some sessions (each node's own
    // flows are the ones it created; synced ones come from the others).
    let before: Vec<u64> = (1..=3)
        .map(|k| site.status(k).map(|(_, st)| created(&st)))
        .collect::<Result<_>>()?;
    let addr = SocketAddr::new(IpAddr::V4(VIP), 80);
    for _ in 0..60 {
        site.lab.http_get("client", addr, "/")?;
    }
    let after: Vec<u64> = (1..=3)
        .map(|k| site.status(k).map(|(_, st)| created(&st)))
        .collect::<Result<_>>()?;
    let spread: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    println!("60 connections created on n1, n2, n3: {spread:?}");
    assert!(spread.iter().all(|&n| n > 0), "{spread:?}");

    // Health gate: every backend of the VIP fails its check → withdrawn; back → announced.
    let vip80 = format!("{VIP}:80");
    site.cli(
        1,
        &[
            "service",
            "edit",
            "-t",
            &vip80,
            "--check",
            "http",
            "--check-path",
            "/missing",
            "--check-interval-ms",
            "200",
            "--check-timeout-ms",
            "100",
            "--check-rise",
            "1",
            "--check-fall",
            "1",
        ],
    )?
    .ok()?;
    let took = site.lab.wait_next_hops(IpAddr::V4(VIP), &[], SETTLE)?;
    println!("VIP withdrawn {took:?} after its backends started failing");
    site.cli(1, &["service", "edit", "-t", &vip80, "--check-path", "/"])?
        .ok()?;
    let took = site
        .lab
        .wait_next_hops(IpAddr::V4(VIP), &[1, 2, 3], SETTLE)?;
    println!("VIP announced again {took:?} after a backend passed");

    // n1 cut off: its LIP goes to the backup routes of n2 and n3 (no BFD: the hold time).
    site.cut_links(1)?;
    let took = site
        .lab
        .wait_next_hops(IpAddr::V4(lip(1)), &[2, 3], SETTLE)?;
    println!(
        "n1's LIP moved to the backup routes via n2 and n3 {took:?} after n1's link went down"
    );
    site.lab.wait_next_hops(IpAddr::V4(VIP), &[2, 3], SETTLE)?;
    Ok(())
}

/// A committed change that leaves a VIP's service serving keeps the VIP announced by every node:
/// the router's route to it does not change while 120 changes are applied (each node applies a
/// change a moment after it commits; a node must not withdraw the VIPs it serves meanwhile).
#[test]
fn configuration_changes_keep_the_vip_announced() -> Result<()> {
    let site = site(false)?;
    let monitor = site
        .lab
        .spawn("router", &["ip", "-4", "monitor", "route"])?;
    // The monitor runs once it prints the route a probe adds and deletes.
    let probe = "198.18.99.1";
    let mark = || -> Result<()> {
        site.lab
            .exec("router", &["ip", "route", "add", probe, "dev", "lo"])?;
        site.lab
            .exec("router", &["ip", "route", "del", probe, "dev", "lo"])?;
        Ok(())
    };
    let marks = site.wait_for("the route monitor", SETTLE, |_| {
        mark()?;
        let seen = monitor.log().matches(probe).count();
        ensure!(seen > 0, "not listening yet");
        Ok(seen)
    })?;
    let vip80 = format!("{VIP}:80");
    let before = site.running_version(1)?;
    for k in 0..120 {
        let udp = format!("udp={}", 300 + k);
        site.cli(
            1 + k % 3,
            &["service", "edit", "-t", &vip80, "--timeout", &udp],
        )?
        .ok()?;
    }
    let last = before + 120;
    site.wait_for("every node running the last change", SETTLE, |s| {
        for k in 1..=3 {
            ensure!(s.running_version(k)? >= last, "n{k} behind");
        }
        Ok(())
    })?;
    // Longer than a node's announcement tick and BIRD's round trip to the router.
    std::thread::sleep(Duration::from_secs(1));
    mark()?;
    let log = site.wait_for("the monitor's last line", SETTLE, |_| {
        let log = monitor.log();
        ensure!(log.matches(probe).count() >= marks + 2, "{log}");
        Ok(log)
    })?;
    monitor.kill();
    // Each change of the route: its first line names the VIP, its next hops follow indented.
    let vip = VIP.to_string();
    let mut changes: Vec<String> = Vec::new();
    for line in log.lines() {
        if line.starts_with(char::is_whitespace) {
            if let Some(last) = changes.last_mut() {
                last.push_str(line);
            }
        } else if line.split_whitespace().any(|w| w == vip) {
            changes.push(line.to_owned());
        }
    }
    println!(
        "120 changes committed and applied: {} changes of the VIP's route",
        changes.len()
    );
    assert!(changes.is_empty(), "{changes:#?}");
    site.lab
        .wait_next_hops(IpAddr::V4(VIP), &[1, 2, 3], Duration::ZERO)?;
    Ok(())
}

fn created(status: &serde_json::Value) -> u64 {
    status["events"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "sessions_created")
        .and_then(|e| e["count"].as_u64())
        .unwrap_or(0)
}

/// Drain moves a node's next hop off the VIP within a second of the withdraw (after the
/// graceful-shutdown moment) with no established connection reset; undrain brings it back; a
/// node whose BIRD dies loses its next hop.
#[test]
fn drain_without_resets_undrain_and_bird_killed() -> Result<()> {
    let mut site = site(false)?;
    let vip9000 = format!("{VIP}:9000");
    site.cli(1, &["service", "add", "-t", &vip9000, "-s", "mh"])?
        .ok()?;
    for j in 1..=2 {
        let backend = format!("{}:9000", site.lab.backend_addr(j));
        site.cli(1, &["backend", "add", "-t", &vip9000, "-r", &backend])?
            .ok()?;
    }
    let target = SocketAddr::new(IpAddr::V4(VIP), 9000);
    site.wait_for("the echo service", SETTLE, |s| {
        s.lab.tcp_echo_check("client", target, 1000)
    })?;
    let streams = site.start_streams(target, 30, 12)?;
    std::thread::sleep(Duration::from_secs(2));
    ensure!(sessions(&site, 2)? >= 30, "n2 holds the flows");

    let drained = Instant::now();
    site.cli(1, &["drain", "n2"])?.ok()?;
    let took = site.lab.wait_next_hops(IpAddr::V4(VIP), &[1, 3], SETTLE)?;
    let wait = Duration::from_millis(tests::cluster::DRAIN_WAIT_MS);
    println!(
        "drain: n2's next hop left the VIP {:?} after the command ({wait:?} of it the graceful-shutdown moment)",
        drained.elapsed()
    );
    assert!(
        took <= wait + Duration::from_secs(1) + Duration::from_millis(500),
        "{took:?}"
    );
    // Its own LIP stays with it (return traffic of its flows).
    site.lab.wait_next_hops(IpAddr::V4(lip(2)), &[2], SETTLE)?;
    site.wait_for("n2 reports the drain", SETTLE, |s| {
        let (_, st) = s.status(2)?;
        let bgp = &st["bgp"];
        ensure!(
            bgp["graceful_shutdown"] == true
                && bgp["vips_announced"].as_array().map(Vec::len) == Some(0),
            "{bgp}"
        );
        Ok(())
    })?;

    ensure!(
        streams.is_running(),
        "the streams ended before the drain:\n{}",
        streams.log()
    );
    let report = site.streams_report(&streams, Duration::from_secs(30))?;
    assert_eq!(report["completed"], 30, "{report}");
    assert_eq!(report["resets"], 0, "{report}");
    assert_eq!(report["content_errors"], 0, "{report}");

    site.cli(3, &["undrain", "n2"])?.ok()?;
    let took = site
        .lab
        .wait_next_hops(IpAddr::V4(VIP), &[1, 2, 3], SETTLE)?;
    println!("undrain: n2's next hop back {took:?} after the command");

    site.kill_node_bird(3)?;
    let took = site.lab.wait_next_hops(IpAddr::V4(VIP), &[1, 2], SETTLE)?;
    println!("n3's BIRD killed: its next hop gone after {took:?}");
    Ok(())
}

/// With BFD at 100 ms × 3, a node that silently stops answering loses its next hop within
/// about 300 ms (asserted: 2 s).
#[test]
fn bfd_detects_a_silent_node() -> Result<()> {
    let site = site(true)?;
    let started = Instant::now();
    site.silence(3)?;
    let silent = Instant::now();
    site.lab.wait_next_hops(IpAddr::V4(VIP), &[1, 2], SETTLE)?;
    let took = started.elapsed();
    println!(
        "BFD 100 ms x 3: silent n3's next hop gone {:?} after its drop rules were in place ({took:?} after the command that installs them started)",
        silent.elapsed()
    );
    assert!(took <= Duration::from_secs(2), "{took:?}");
    Ok(())
}

/// Without BFD a silent node is noticed at the BGP hold time (3 s in the lab); and a node that
/// starts cold announces nothing until it is warm: n2 restarts while n3 is unreachable, so n2
/// waits for its cold grace before it takes traffic again.
#[test]
fn hold_time_without_bfd_and_no_announcement_while_cold() -> Result<()> {
    let mut site = site(false)?;
    let started = Instant::now();
    site.silence(3)?;
    site.lab.wait_next_hops(IpAddr::V4(VIP), &[1, 2], SETTLE)?;
    let took = started.elapsed();
    println!("no BFD, hold time 3 s: silent n3's next hop gone after {took:?}");
    assert!(took <= Duration::from_secs(6), "{took:?}");

    site.stop_node(2)?;
    site.lab.wait_next_hops(IpAddr::V4(VIP), &[1], SETTLE)?;
    site.start_node(2)?;
    let restarted = Instant::now();
    // Cold: n3's table cannot arrive, so n2 is not warm before its grace (5 s) is over.
    while restarted.elapsed() < Duration::from_secs(3) {
        let hops = site.lab.router_next_hops(IpAddr::V4(VIP))?;
        ensure!(
            hops == vec![IpAddr::V4(site.lab.node_uplink(1))],
            "n2 announced while cold: {hops:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The node's own view, which asks no peer: the cluster view would wait up to a second
    // for silent n3's report, and the grace could end meanwhile.
    let st = site.admin_get(2, "/v1/status?local=true")?;
    assert_eq!(st["sync"]["warm"], false, "{}", st["sync"]);
    site.lab.wait_next_hops(IpAddr::V4(VIP), &[1, 2], SETTLE)?;
    println!(
        "n2 announced again {:?} after its restart (warm after the grace)",
        restarted.elapsed()
    );
    let (_, st) = site.status(2)?;
    assert_eq!(st["sync"]["warm"], true, "{}", st["sync"]);
    Ok(())
}

/// The size of the tmpfs node 3 keeps its Raft data on: room for its log, vote and snapshot,
/// small enough to fill at once.
const FULL_DISK_BYTES: u64 = 1 << 20;

/// A node whose Raft storage fails fails loudly: n3 keeps its Raft data on a small tmpfs,
/// which is filled; the next configuration changes make its log append fail (no space), so
/// its Raft stops. The node withdraws its routes (the router's VIP route and n3's LIP lose n3
/// as next hop) and its daemon exits 1, for its supervisor to restart it; restarted with room
/// on the disk, it announces again.
#[test]
fn full_disk_makes_the_node_withdraw_and_exit() -> Result<()> {
    let mut site = ClusterSite::start_with(ClusterOptions {
        nodes: 3,
        members: 2,
        backends: 2,
        bgp: Some(BgpOptions { bfd: false }),
    })?;
    let data_dir = site.data_dir(3);
    site.lab.mount_tmpfs(&data_dir, FULL_DISK_BYTES)?;
    site.start_node(3)?;
    site.add_node(1, 3)
        .with_context(|| format!("adding n3\n--- n3 log:\n{}", site.log(3)))?;
    site.lab
        .wait_next_hops(IpAddr::V4(VIP), &[1, 2, 3], SETTLE)
        .with_context(|| format!("n3's log:\n{}", site.log(3)))?;
    site.lab.wait_next_hops(IpAddr::V4(lip(3)), &[3], SETTLE)?;

    fill(&data_dir.join("filler"))?;
    // Each change is one record appended to n3's log; the tail page of the log file has room
    // for a few, so changes go on until one needs a new page (bounded: a page holds at most
    // 4096 bytes). n1 and n2 are a majority, so every change commits.
    let vip80 = format!("{VIP}:80");
    let backend = format!("{}:8080", site.lab.backend_addr(1));
    let deadline = Instant::now() + SETTLE;
    let mut changes = 0;
    let status = loop {
        let n3 = site.node(3).context("n3 is not running")?;
        if let Some(status) = n3.wait_timeout(Duration::from_millis(50)) {
            break status;
        }
        ensure!(
            Instant::now() < deadline,
            "n3 still runs {SETTLE:?} after its disk filled ({changes} changes since):\n{}",
            n3.log()
        );
        let weight = (changes % 50 + 1).to_string();
        site.cli(
            1,
            &[
                "backend", "edit", "-t", &vip80, "-r", &backend, "-w", &weight,
            ],
        )?
        .ok()?;
        changes += 1;
    };
    let log = site.log(3);
    println!("n3 exited ({status}) after {changes} changes on a full disk");
    if let Some(line) = log.lines().find(|l| l.contains("raft stopped")) {
        println!("n3: {line}");
    }
    assert_eq!(status.code(), Some(1), "n3's log:\n{log}");
    assert!(
        log.contains("raft stopped") && log.contains("No space left on device"),
        "n3's log:\n{log}"
    );
    let took = site.lab.wait_next_hops(IpAddr::V4(VIP), &[1, 2], SETTLE)?;
    println!("n3's next hop left the VIP {took:?} after its daemon exited");
    site.lab
        .wait_next_hops(IpAddr::V4(lip(3)), &[1, 2], SETTLE)?;

    // What the supervisor does once there is room again: the failed append left nothing
    // behind that reads as damage, and the node catches up and announces again.
    std::fs::remove_file(data_dir.join("filler"))?;
    site.start_node(3)?;
    site.lab
        .wait_next_hops(IpAddr::V4(VIP), &[1, 2, 3], SETTLE)
        .with_context(|| format!("n3 restarted; its log:\n{}", site.log(3)))?;
    Ok(())
}

/// Writes `path` until the file system it is on is full.
fn fill(path: &std::path::Path) -> Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    let chunk = vec![0xa5u8; 64 * 1024];
    // The file system is FULL_DISK_BYTES large: the loop ends well before this bound.
    for _ in 0..=FULL_DISK_BYTES / 4096 {
        if let Err(e) = file.write_all(&chunk) {
            ensure!(
                e.kind() == std::io::ErrorKind::StorageFull,
                "filling {}: {e}",
                path.display()
            );
            return Ok(());
        }
    }
    anyhow::bail!("{} did not fill up", path.display())
}

//! End-to-end: a cluster of real `lbcluster` daemons in lab namespaces sharing one configuration
//! through Raft over their mutual-TLS QUIC endpoints, managed only with `lbcluster` commands.
//! Run as root.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use tests::cluster::{ClusterSite, lip};
use tests::site::VIP;

/// Generous bounds for liveness: elections take about a second with the lab's timings.
const CONVERGE: Duration = Duration::from_secs(20);

fn version(status: &Value) -> Option<u64> {
    status["cluster"]["config_version"].as_u64()
}

/// Waits until every node in `nodes` answers `service list` with the same configuration as
/// node `nodes[0]`, and returns it.
fn agreed(site: &ClusterSite, nodes: &[usize]) -> Result<Value> {
    site.wait_for("the nodes agree on the configuration", CONVERGE, |s| {
        let first = s.services(nodes[0])?;
        for &k in &nodes[1..] {
            let other = s.services(k)?;
            ensure!(other == first, "n{k} differs: {other} vs {first}");
        }
        // The data plane of each runs the version the cluster has.
        let (_, st) = s.status(nodes[0])?;
        let v = version(&st).context("no cluster version")?;
        for &k in nodes {
            let (_, stk) = s.status(k)?;
            ensure!(
                stk["config_version"].as_u64() == Some(v),
                "n{k}'s data plane runs {} not {v}",
                stk["config_version"]
            );
        }
        Ok(first)
    })
}

fn node_row<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["cluster"]["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["name"] == name)
}

fn leader_index(site: &ClusterSite, via: usize) -> Result<usize> {
    site.leader_index(via, CONVERGE)
}

/// Three nodes form a cluster and agree; a change through a follower reaches every data plane
/// (traffic through the VIP follows it); the leader is killed: a survivor lists it as
/// unreachable (degraded, exit 1), a new leader takes writes, and the old leader catches up
/// after a restart.
#[test]
fn three_nodes_agree_and_survive_the_leader_being_killed() -> Result<()> {
    let mut site = ClusterSite::start(3, 3, 2)?;
    let cfg = agreed(&site, &[1, 2, 3])?;
    assert_eq!(cfg.as_array().map(Vec::len), Some(1), "{cfg}");
    for k in 1..=3 {
        let (code, st) = site.status(k)?;
        assert_eq!(code, 0, "n{k}: {st}");
        let nodes = st["cluster"]["nodes"].as_array().context("rows")?;
        assert_eq!(nodes.len(), 3);
        assert!(nodes.iter().all(|n| n["reachable"] == true), "{st}");
        assert_eq!(
            nodes.iter().filter(|n| n["role"] == "leader").count(),
            1,
            "{st}"
        );
    }
    // `status --local`: the node's own view only, no round trips.
    let local: Value =
        serde_json::from_str(&site.cli(2, &["status", "--local", "-o", "json"])?.ok()?)?;
    assert_eq!(
        local["cluster"]["nodes"].as_array().map(Vec::len),
        Some(1),
        "{local}"
    );
    assert_eq!(local["cluster"]["nodes"][0]["name"], "n2");
    assert!(local["cluster"]["leader"].as_str().is_some(), "{local}");
    // Traffic through the VIP, on node 1, from the replicated configuration.
    let vip80 = SocketAddr::new(IpAddr::V4(VIP), 80);
    assert!(["b1", "b2"].contains(&site.lab.http_get("client", vip80, "/")?.trim()));

    // A change through a follower; a new service is live on node 1's data plane at once.
    let leader = leader_index(&site, 1)?;
    let follower = (1..=3).find(|&k| k != leader).unwrap_or(1);
    site.cli(
        follower,
        &["service", "add", "-t", &format!("{VIP}:9000"), "-s", "mh"],
    )?
    .ok()?;
    for j in 1..=2 {
        site.cli(
            follower,
            &[
                "backend",
                "add",
                "-t",
                &format!("{VIP}:9000"),
                "-r",
                &format!("{}:9000", site.lab.backend_addr(j)),
                "-w",
                "2",
            ],
        )?
        .ok()?;
    }
    agreed(&site, &[1, 2, 3])?;
    site.wait_for("echo through the new service", CONVERGE, |s| {
        s.lab
            .tcp_echo_check("client", SocketAddr::new(IpAddr::V4(VIP), 9000), 10_000)
    })?;

    // Kill the leader.
    site.kill_node(leader);
    let survivor = (1..=3).find(|&k| k != leader).unwrap_or(1);
    let (code, st) = site.wait_for("a new leader", CONVERGE, |s| {
        let (code, st) = s.status(survivor)?;
        ensure!(
            st["cluster"]["leader"].as_str().is_some() && st["cluster"]["quorum"] == true,
            "{st}"
        );
        Ok((code, st))
    })?;
    assert_eq!(code, 1, "one node down is degraded: {st}");
    let row = node_row(&st, &format!("n{leader}")).context("the killed node is listed")?;
    assert_eq!(row["reachable"], false, "{st}");
    site.cli(
        survivor,
        &[
            "backend",
            "edit",
            "-t",
            &format!("{VIP}:80"),
            "-r",
            &format!("{}:8080", site.lab.backend_addr(1)),
            "-w",
            "5",
        ],
    )?
    .ok()?;
    let others: Vec<usize> = (1..=3).filter(|&k| k != leader).collect();
    agreed(&site, &others)?;
    // Drain state is replicated: set through one node, every node's view has it.
    let drained = others[1];
    let drained_in = |view: usize, want: bool| {
        site.wait_for("the drain state", CONVERGE, |s| {
            let (_, st) = s.status(view)?;
            let row = node_row(&st, &format!("n{drained}"))
                .context("row")?
                .clone();
            ensure!(row["drained"] == want, "{row}");
            Ok(())
        })
    };
    site.cli(others[0], &["drain", &format!("n{drained}")])?
        .ok()?;
    drained_in(drained, true)?;
    site.cli(drained, &["undrain", &format!("n{drained}")])?
        .ok()?;
    drained_in(others[0], false)?;

    // The old leader comes back and catches up.
    site.start_node(leader)?;
    let cfg = agreed(&site, &[1, 2, 3])?;
    assert_eq!(cfg[0]["backends"][0]["weight"], 5, "{cfg}");
    let (code, _) = site.wait_for("healthy again", CONVERGE, |s| {
        let (code, st) = s.status(leader)?;
        ensure!(code == 0, "exit {code}: {st}");
        Ok((code, st))
    })?;
    assert_eq!(code, 0);
    Ok(())
}

/// A node cut off by nftables for 10 s cannot commit (and says the cluster has no quorum, exit 2)
/// while the majority can; healed, it catches up with an identical configuration, and nothing
/// was elected: it never campaigned, so the leader keeps its leadership and term. Then every
/// node is restarted and the configuration is intact.
#[test]
fn partitioned_minority_cannot_commit_and_catches_up_and_restart_keeps_config() -> Result<()> {
    let mut site = ClusterSite::start(3, 3, 2)?;
    agreed(&site, &[1, 2, 3])?;
    let leader = leader_index(&site, 1)?;
    let before = site.leadership(leader)?;
    // Partition a follower (a partitioned leader would step down the same way).
    let cut = (1..=3).rev().find(|&k| k != leader).unwrap_or(3);
    site.partition(cut)?;
    let cut_at = Instant::now();
    let majority: Vec<usize> = (1..=3).filter(|&k| k != cut).collect();

    let refused = site.cli(
        cut,
        &["service", "add", "-u", &format!("{VIP}:53"), "-s", "rr"],
    )?;
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused.stderr.contains("quorum") || refused.stderr.contains("leader"),
        "{refused:?}"
    );
    let (code, st) = site.status(cut)?;
    assert_eq!(code, 2, "the minority has no quorum: {st}");
    assert_eq!(st["cluster"]["quorum"], false, "{st}");

    site.cli(
        majority[0],
        &["service", "add", "-u", &format!("{VIP}:5353"), "-s", "sh"],
    )?
    .ok()?;
    let cfg = agreed(&site, &majority)?;
    assert_eq!(cfg.as_array().map(Vec::len), Some(2), "{cfg}");

    // Cut off for 10 s: a dozen election timeouts, in none of which it may raise its term.
    std::thread::sleep(Duration::from_secs(10).saturating_sub(cut_at.elapsed()));
    site.heal(cut)?;
    let healed = agreed(&site, &[1, 2, 3])?;
    assert_eq!(healed, cfg, "the minority's refused change never appears");
    for k in 1..=3 {
        assert_eq!(site.leadership(k)?, before, "as n{k} sees it");
    }
    let (_, st) = site.status(cut)?;
    let own = node_row(&st, &format!("n{cut}")).context("no row of its own")?;
    assert_eq!(own["term"].as_u64(), Some(before.term), "{own}");

    // All nodes restarted: the configuration is intact.
    let before = site.status(1)?.1;
    for k in 1..=3 {
        site.stop_node(k)?;
    }
    for k in 1..=3 {
        site.start_node(k)?;
    }
    let after = agreed(&site, &[1, 2, 3])?;
    assert_eq!(after, healed);
    let (_, st) = site.status(1)?;
    assert!(version(&st) >= version(&before), "{before} -> {st}");
    Ok(())
}

/// Invalid commands are refused with a clear message on every node, and change nothing.
#[test]
fn invalid_commands_are_rejected_on_every_node() -> Result<()> {
    let site = ClusterSite::start(4, 3, 2)?;
    agreed(&site, &[1, 2, 3])?;
    let v0 = version(&site.status(1)?.1);
    let vip80 = format!("{VIP}:80");
    let b1 = format!("{}:8080", site.lab.backend_addr(1));
    for k in 1..=3 {
        let cases: Vec<(Vec<&str>, &str)> = vec![
            (vec!["service", "add", "-t", &vip80], "already defined"),
            (
                vec!["backend", "add", "-t", "198.18.100.9:80", "-r", &b1],
                "no service",
            ),
            (
                vec!["backend", "add", "-t", &vip80, "-r", &b1],
                "already has backend",
            ),
            (
                vec!["backend", "edit", "-t", &vip80, "-r", &b1, "-w", "70000"],
                "above 65535",
            ),
            (
                vec![
                    "backend",
                    "add",
                    "-t",
                    &vip80,
                    "-r",
                    "[2001:db8:3::10]:8080",
                ],
                "address family",
            ),
            (
                vec![
                    "service",
                    "add",
                    "-t",
                    "198.18.100.9:80",
                    "--timeout",
                    "established=0",
                ],
                "timeout",
            ),
        ];
        for (args, expect) in cases {
            let out = site.cli(k, &args)?;
            assert_eq!(out.code, 1, "n{k} {args:?}: {out:?}");
            assert!(out.stderr.contains(expect), "n{k} {args:?}: {out:?}");
        }
        // A node whose LIP another node owns.
        let lip1 = lip(1).to_string();
        let addr = site.quic_addr(4).to_string();
        let out = site.cli(k, &["node", "add", "n4", "--addr", &addr, "--lip", &lip1])?;
        assert_eq!(out.code, 1, "{out:?}");
        assert!(out.stderr.contains("already belongs to node"), "{out:?}");
    }
    for k in 1..=3 {
        assert_eq!(version(&site.status(k)?.1), v0, "n{k}");
    }
    Ok(())
}

/// A fourth node joins with one command, then the leader is removed; a node whose certificate
/// another CA signed is refused (and the refusal counted) and cannot join.
#[test]
fn fourth_node_joins_with_one_command_leader_removed_foreign_ca_refused() -> Result<()> {
    let mut site = ClusterSite::start(5, 3, 2)?;
    agreed(&site, &[1, 2, 3])?;
    site.start_node(4)?;
    let out = site.add_node(2, 4)?;
    assert!(out.contains("added node n4"), "{out}");
    let cfg = agreed(&site, &[1, 2, 3, 4])?;
    let (code, st) = site.status(4)?;
    assert_eq!(code, 0, "{st}");
    assert_eq!(st["cluster"]["nodes"].as_array().map(Vec::len), Some(4));
    let voters = st["cluster"]["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["voter"] == true)
        .count();
    assert_eq!(voters, 4, "{st}");

    // Remove the leader, through the leader.
    let leader = leader_index(&site, 4)?;
    let out = site.cli(leader, &["node", "remove", &format!("n{leader}")])?;
    assert_eq!(out.code, 0, "{out:?}");
    let rest: Vec<usize> = (1..=4).filter(|&k| k != leader).collect();
    let new_leader = site.wait_for("a new leader among the rest", CONVERGE, |s| {
        let l = leader_index(s, rest[0])?;
        ensure!(l != leader, "still n{leader}");
        Ok(l)
    })?;
    assert!(rest.contains(&new_leader));
    let after = agreed(&site, &rest)?;
    assert_eq!(after, cfg, "removing a node changes no service");
    let (_, st) = site.status(rest[0])?;
    assert_eq!(
        st["cluster"]["nodes"].as_array().map(Vec::len),
        Some(3),
        "{st}"
    );
    assert!(node_row(&st, &format!("n{leader}")).is_none(), "{st}");
    site.stop_node(leader)?;

    // Node 5 with a certificate from another CA.
    let foreign = site.lab.dir().join("foreign-ca");
    site.lbc(&["tls", "ca", "create", "--dir", &foreign.to_string_lossy()])?
        .ok()?;
    site.write_cert(5, &foreign)?;
    site.start_node(5)?;
    let out = site.add_node(rest[0], 5);
    let err = format!(
        "{:#}",
        out.expect_err("a node with a foreign certificate must not join")
    );
    assert!(err.contains("n5"), "{err}");
    let refused: u64 = rest
        .iter()
        .map(|&k| {
            site.status(k).map_or(0, |(_, st)| {
                st["cluster"]["quic"]["refused_untrusted_ca"]
                    .as_u64()
                    .unwrap_or(0)
            })
        })
        .sum();
    assert!(refused > 0, "the refusal is counted");
    Ok(())
}

/// A removed node is cut off at once: a write through it right after `node remove` returns is
/// refused within a second, with an error saying why, and changes nothing; every member closes
/// the Raft connections it served for it and drops it from session sync, and its own sync
/// connections stay down.
#[test]
fn removed_node_is_refused_at_once_and_cut_off() -> Result<()> {
    let site = ClusterSite::start(4, 4, 2)?;
    let before = agreed(&site, &[1, 2, 3, 4])?;
    // n4's status asks every member for its report: it has a connection to each.
    let (_, st) = site.status(4)?;
    let rows = st["cluster"]["nodes"].as_array().context("rows")?;
    assert!(rows.iter().all(|n| n["reachable"] == true), "{st}");

    let removed = site.cli(1, &["node", "remove", "n4"])?;
    assert_eq!(removed.code, 0, "{removed:?}");
    let returned = Instant::now();
    let udp53 = format!("{VIP}:53");
    let write = site.cli(4, &["service", "add", "-u", &udp53, "-s", "rr"])?;
    let took = returned.elapsed();
    assert_eq!(write.code, 1, "{write:?}");
    assert!(
        write.stderr.contains("refuses node n4: it is not a member"),
        "{write:?}"
    );
    assert!(took < Duration::from_secs(1), "refused only after {took:?}");
    println!(
        "n4's write refused {took:?} after `node remove` returned: {}",
        write.stderr.trim()
    );
    let after = agreed(&site, &[1, 2, 3])?;
    assert_eq!(after, before, "the removed node's write changed nothing");

    site.wait_for("n4 cut off", Duration::from_secs(5), |s| {
        for k in 1..=3 {
            let (_, st) = s.status(k)?;
            let rpcs = &st["cluster"]["raft_rpcs"];
            ensure!(rpcs["revoked"].as_u64() >= Some(1), "n{k}: {rpcs}");
            let sync = st["sync"]["peers"].as_array().context("sync rows")?;
            ensure!(
                sync.iter().all(|p| p["peer"] != "n4"),
                "n{k} syncs with n4: {sync:?}"
            );
        }
        let (_, st) = s.status(4)?;
        let sync = st["sync"]["peers"].as_array().context("sync rows")?;
        ensure!(
            sync.iter().all(|p| p["connected"] == false),
            "n4 still syncs: {sync:?}"
        );
        Ok(())
    })?;
    // And it stays refused.
    let again = site.cli(4, &["service", "add", "-u", &udp53, "-s", "rr"])?;
    assert_eq!(again.code, 1, "{again:?}");
    assert!(again.stderr.contains("not a member"), "{again:?}");
    Ok(())
}

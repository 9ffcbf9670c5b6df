//! End-to-end session sync: long-lived TCP connections established through node 1 keep working
//! — no reset, no byte lost or changed — when node 1 is cut off and the router's routes for the
//! VIP and for node 1's LIPs are moved to node 2 by hand (the BGP issue automates the move).
//! Run as root.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Result, ensure};
use tests::cluster::ClusterSite;
use tests::site::VIP;

/// Waits until node k's session sync is warm and it holds at least `flows` sessions.
fn warm_with_flows(site: &ClusterSite, k: usize, flows: u64) -> Result<()> {
    site.wait_for(
        &format!("n{k} warm with the flows"),
        Duration::from_secs(15),
        |s| {
            let (_, st) = s.status(k)?;
            let held = st["sessions"]["count"].as_u64().unwrap_or(0);
            ensure!(
                st["sync"]["warm"] == true && held >= flows,
                "{held} sessions: {}",
                st["sync"]
            );
            Ok(())
        },
    )
}

#[test]
fn long_lived_connections_survive_their_node_being_cut_off() -> Result<()> {
    let mut site = ClusterSite::start(3, 3, 2)?;
    let vip = format!("{VIP}:9000");
    site.cli(1, &["service", "add", "-t", &vip, "-s", "mh"])?
        .ok()?;
    for j in 1..=2 {
        let backend = format!("{}:9000", site.lab.backend_addr(j));
        site.cli(1, &["backend", "add", "-t", &vip, "-r", &backend])?
            .ok()?;
    }
    let target = SocketAddr::new(IpAddr::V4(VIP), 9000);
    site.wait_for("the echo service on n1", Duration::from_secs(10), |s| {
        s.lab.tcp_echo_check("client", target, 1000)
    })?;

    let streams = site.start_streams(target, 20, 12)?;
    // Let the connections establish and their sessions reach the peers.
    std::thread::sleep(Duration::from_secs(2));
    warm_with_flows(&site, 2, 20)?;

    // n3 restarts: it starts cold, pulls the tables of n1 and n2, then is warm with the flows.
    site.stop_node(3)?;
    site.start_node(3)?;
    warm_with_flows(&site, 3, 20)?;
    // Every node's row in the cluster view says warm.
    site.wait_for(
        "every node warm in n1's view",
        Duration::from_secs(10),
        |s| {
            let (_, st) = s.status(1)?;
            let rows = st["cluster"]["nodes"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            ensure!(
                rows.len() == 3 && rows.iter().all(|n| n["warm"] == true),
                "{}",
                st["cluster"]
            );
            Ok(())
        },
    )?;

    ensure!(
        streams.is_running(),
        "the streams ended before the cut:\n{}",
        streams.log()
    );
    site.cut_links(1)?;
    site.move_routes(1, 2)?;
    let report = site.streams_report(&streams, Duration::from_secs(30))?;
    assert_eq!(report["completed"], 20, "{report}");
    assert_eq!(report["resets"], 0, "{report}");
    assert_eq!(report["content_errors"], 0, "{report}");
    Ok(())
}

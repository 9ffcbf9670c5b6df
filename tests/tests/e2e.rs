//! End-to-end: the real `lbcluster` daemon in a lab node namespace, real clients in the client
//! namespace, real servers in the backend namespaces, traffic through the VIP. Run as root.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tests::site::{LIP, LIP6, Site, VIP, VIP6};

#[test]
fn http_round_robin_spreads_over_both_backends_and_they_see_the_lip() -> Result<()> {
    let site = Site::start("rr")?;
    let mut seen = Vec::new();
    for _ in 0..10 {
        seen.push(site.get(VIP.into(), "/")?.trim().to_string());
    }
    let b1 = seen.iter().filter(|s| *s == "b1").count();
    let b2 = seen.iter().filter(|s| *s == "b2").count();
    assert_eq!((b1, b2), (5, 5), "rr alternates: {seen:?}");
    // Full-NAT: the real server sees a local address of the node, not the client.
    let peer: SocketAddr = site.get(VIP.into(), "/whoami")?.trim().parse()?;
    assert_eq!(peer.ip(), IpAddr::V4(LIP));
    // The IPv6 VIP, end to end.
    let mut seen6 = Vec::new();
    for _ in 0..4 {
        seen6.push(site.get(VIP6.into(), "/")?.trim().to_string());
    }
    assert!(
        seen6.contains(&"b1".to_string()) && seen6.contains(&"b2".to_string()),
        "{seen6:?}"
    );
    let peer6: SocketAddr = site.get(VIP6.into(), "/whoami")?.trim().parse()?;
    assert_eq!(peer6.ip(), IpAddr::V6(LIP6));
    let status = site.status(true)?;
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    Ok(())
}

#[test]
fn maglev_spreads_flows_over_both_backends() -> Result<()> {
    let site = Site::start("maglev")?;
    let mut b1 = 0;
    for _ in 0..20 {
        if site.get(VIP.into(), "/")?.trim() == "b1" {
            b1 += 1;
        }
    }
    assert!(
        (1..20).contains(&b1),
        "maglev used one backend only: {b1} of 20 on b1"
    );
    Ok(())
}

#[test]
fn a_100_mb_transfer_arrives_intact() -> Result<()> {
    let site = Site::start("rr")?;
    const SIZE: usize = 100 * 1024 * 1024;
    let path = format!("/bytes/{SIZE}");
    let through_vip = site
        .lab
        .http_get_bytes("client", SocketAddr::new(VIP.into(), 80), &path)?;
    let direct = site.lab.http_get_bytes(
        "n1",
        SocketAddr::new(site.lab.backend_addr(1).into(), 8080),
        &path,
    )?;
    assert_eq!(through_vip.len(), SIZE);
    assert!(
        through_vip == direct,
        "the body through the VIP differs from the backend's own"
    );
    Ok(())
}

#[test]
fn udp_request_and_response_through_the_vip() -> Result<()> {
    let site = Site::start("rr")?;
    for i in 0..4 {
        let msg = format!("ping {i}");
        assert_eq!(
            site.lab
                .udp_echo("client", SocketAddr::new(VIP.into(), 53), &msg)?,
            msg
        );
    }
    Ok(())
}

#[test]
fn a_stopped_backend_gets_no_new_flows_until_it_returns() -> Result<()> {
    let site = Site::start("rr")?;
    let b2 = &site.lab.backend_processes()[1];
    b2.signal("STOP")?;
    // fall = 2 checks of 300 ms: down within about a second.
    let deadline = Instant::now() + Duration::from_secs(5);
    while site.status(false)?.status.code() != Some(1) {
        assert!(Instant::now() < deadline, "b2 never reported down");
        std::thread::sleep(Duration::from_millis(100));
    }
    for _ in 0..6 {
        assert_eq!(site.get(VIP.into(), "/")?.trim(), "b1");
    }
    b2.signal("CONT")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while site.status(false)?.status.code() != Some(0) {
        assert!(Instant::now() < deadline, "b2 never came back");
        std::thread::sleep(Duration::from_millis(100));
    }
    let answers: Vec<String> = (0..4)
        .map(|_| site.get(VIP.into(), "/").map(|s| s.trim().to_string()))
        .collect::<Result<_>>()?;
    assert!(
        answers.iter().any(|a| a == "b2"),
        "b2 receives flows again: {answers:?}"
    );
    Ok(())
}

#[test]
fn sigterm_leaves_no_device_route_or_sysctl_behind() -> Result<()> {
    let site = Site::start("rr")?;
    let forwarding = |site: &Site| -> Result<String> {
        let out = site
            .lab
            .exec("n1", &["sysctl", "-n", "net.ipv4.ip_forward"])?;
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    };
    assert!(
        site.lab.exec("n1", &["ip", "link", "show", "lbc0"]).is_ok(),
        "the TUN device exists while running"
    );
    site.node.signal("TERM")?;
    let status = site
        .node
        .wait_timeout(Duration::from_secs(5))
        .context("lbcluster did not exit on SIGTERM")?;
    assert!(
        status.success(),
        "exit status {status:?}:\n{}",
        site.node.log()
    );
    assert!(
        site.lab
            .exec("n1", &["ip", "link", "show", "lbc0"])
            .is_err(),
        "TUN device left behind"
    );
    let routes = String::from_utf8(site.lab.exec("n1", &["ip", "route", "show"])?.stdout)?;
    assert!(!routes.contains("lbc0"), "routes left behind: {routes}");
    let routes6 = String::from_utf8(site.lab.exec("n1", &["ip", "-6", "route", "show"])?.stdout)?;
    assert!(!routes6.contains("lbc0"), "routes left behind: {routes6}");
    assert_eq!(
        forwarding(&site)?,
        "0",
        "ip_forward restored to the lab's value"
    );
    assert!(!site.socket.exists(), "admin socket removed");
    Ok(())
}

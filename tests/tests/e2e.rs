//! End-to-end: the real `lbcluster` daemon in a lab node namespace, real clients in the client
//! namespace, real servers in the backend namespaces, traffic through the VIP. Run as root.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tests::site::{LIP, LIP6, Site, SiteOptions, VIP, VIP6};

/// `/whoami`'s two lines: the peer the backend sees, and the TOA client address (`None` for
/// `toa none`).
fn whoami(site: &Site, vip: IpAddr) -> Result<(SocketAddr, Option<SocketAddr>)> {
    let answer = site.get(vip, "/whoami")?;
    let mut lines = answer.lines();
    let peer = lines.next().context("empty /whoami")?.parse()?;
    let toa = match lines.next().and_then(|l| l.strip_prefix("toa ")) {
        Some("none") => None,
        Some(addr) => Some(addr.parse().with_context(|| format!("TOA in {answer:?}"))?),
        None => bail!("no TOA line in {answer:?}"),
    };
    Ok((peer, toa))
}

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
    // Full-NAT: the real server sees a local address of the node, not the client, and without
    // TOA nothing in the SYN tells it the client's address.
    let (peer, toa) = whoami(&site, VIP.into())?;
    assert_eq!(peer.ip(), IpAddr::V4(LIP));
    assert_eq!(toa, None);
    // The IPv6 VIP, end to end.
    let mut seen6 = Vec::new();
    for _ in 0..4 {
        seen6.push(site.get(VIP6.into(), "/")?.trim().to_string());
    }
    assert!(
        seen6.contains(&"b1".to_string()) && seen6.contains(&"b2".to_string()),
        "{seen6:?}"
    );
    let (peer6, toa6) = whoami(&site, VIP6.into())?;
    assert_eq!(peer6.ip(), IpAddr::V6(LIP6));
    assert_eq!(toa6, None);
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
fn a_killed_backend_gets_no_new_flows_within_fall_times_interval_and_again_after_restart()
-> Result<()> {
    let site = Site::start("rr")?;
    site.lab.backend_processes()[1].signal("KILL")?;
    let killed = Instant::now();
    // The site checks every 300 ms, fall = 2, timeout 200 ms: down after at most two failed
    // checks; the margin covers a check already under way and a loaded CI machine.
    let bound = Duration::from_millis(2 * 300 + 200) + Duration::from_secs(2);
    while site.status(false)?.status.code() != Some(1) {
        assert!(
            killed.elapsed() < bound,
            "b2 not taken out within {bound:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..6 {
        assert_eq!(site.get(VIP.into(), "/")?.trim(), "b1");
    }
    let bin = tests::lab::find_binary("lab-backend", "LBC_LAB_BACKEND", "cargo build -p tests")?;
    let _b2 = site
        .lab
        .spawn("b2", &[&bin.to_string_lossy(), "serve", "--name", "b2"])?;
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

#[test]
fn toa_tells_the_backend_the_client_address_and_port() -> Result<()> {
    let site = Site::start_with(SiteOptions {
        toa: true,
        ..SiteOptions::default()
    })?;
    let client4 = IpAddr::V4(site.lab.client_addr());
    let client6 = IpAddr::V6(site.lab.client_addr6());
    for (vip, lip, client) in [
        (IpAddr::V4(VIP), IpAddr::V4(LIP), client4),
        (IpAddr::V6(VIP6), IpAddr::V6(LIP6), client6),
    ] {
        let (peer, toa) = whoami(&site, vip)?;
        assert_eq!(peer.ip(), lip, "the backend's peer is still the LIP");
        let toa = toa.with_context(|| format!("no TOA through {vip}"))?;
        assert_eq!(toa.ip(), client);
        assert_ne!(toa.port(), 0);
        // The port is the client's own: the node's session from it uses the peer's LIP port.
        let sessions = site.sessions()?;
        assert!(
            sessions
                .lines()
                .any(|l| l.contains(&toa.to_string()) && l.contains(&peer.to_string())),
            "no session {toa} → {peer}:\n{sessions}"
        );
    }
    assert!(site.event("toa_inserted")? >= 2);
    assert_eq!(site.event("toa_no_room")?, 0);
    Ok(())
}

/// Transfers large enough that both directions send full-size segments for a while.
const PMTU_BYTES: usize = 4 * 1024 * 1024;

/// A few MB up and back through the echo service and down from `/bytes/N`, through `vip`;
/// checks the data.
fn large_transfers(site: &Site, vip: IpAddr) -> Result<()> {
    site.lab
        .tcp_echo_check("client", SocketAddr::new(vip, 9000), PMTU_BYTES)
        .with_context(|| format!("echo of {PMTU_BYTES} bytes through {vip}"))?;
    let body = site
        .lab
        .http_get_bytes(
            "client",
            SocketAddr::new(vip, 80),
            &format!("/bytes/{PMTU_BYTES}"),
        )
        .with_context(|| format!("GET of {PMTU_BYTES} bytes through {vip}"))?;
    ensure!(
        body.len() == PMTU_BYTES,
        "{} bytes through {vip}",
        body.len()
    );
    ensure!(
        body.iter().all(|&b| b == b'x'),
        "the body through {vip} is corrupt"
    );
    Ok(())
}

/// The path MTU `role`'s kernel learned towards `dst` (from an ICMP error), if any.
fn learned_mtu(site: &Site, role: &str, dst: IpAddr) -> Result<Option<u32>> {
    let family = if dst.is_ipv4() { "-4" } else { "-6" };
    let out = site
        .lab
        .exec(role, &["ip", family, "route", "get", &dst.to_string()])?;
    let text = String::from_utf8(out.stdout)?;
    let mut words = text.split_whitespace();
    Ok(words
        .by_ref()
        .find(|&w| w == "mtu")
        .and_then(|_| words.next())
        .and_then(|m| m.parse().ok()))
}

/// The MTUs of the narrow link: IPv4 well below IPv6's minimum, so the two cannot be confused.
const MTU4: u32 = 1000;
const MTU6: u32 = 1280;

#[test]
fn path_mtu_discovery_through_the_vip_with_a_narrow_link_to_the_backends() -> Result<()> {
    let site = Site::start("rr")?;
    site.lab.limit_backend_path_mtu(MTU4, MTU6)?;
    for (vip, mtu) in [(IpAddr::V4(VIP), MTU4), (IpAddr::V6(VIP6), MTU6)] {
        let before = site.event("icmp_translated")?;
        large_transfers(&site, vip)?;
        let translated = site.event("icmp_translated")? - before;
        assert!(translated > 0, "no ICMP error translated for {vip}");
        // The router's error about LIP → backend reached the client as VIP → client.
        assert_eq!(
            learned_mtu(&site, "client", vip)?,
            Some(mtu),
            "client to {vip}"
        );
    }
    Ok(())
}

#[test]
fn path_mtu_discovery_through_the_vip_with_a_narrow_link_to_the_client() -> Result<()> {
    let site = Site::start("rr")?;
    site.lab.limit_client_path_mtu(MTU4, MTU6)?;
    for (vip, lip, mtu) in [
        (IpAddr::V4(VIP), IpAddr::V4(LIP), MTU4),
        (IpAddr::V6(VIP6), IpAddr::V6(LIP6), MTU6),
    ] {
        let before = site.event("icmp_translated")?;
        large_transfers(&site, vip)?;
        let translated = site.event("icmp_translated")? - before;
        assert!(translated > 0, "no ICMP error translated for {vip}");
        // The router's error about VIP → client reached the backend that sent the data as
        // LIP → backend (with rr each service's first flow went to b1; b2 may have had none).
        let learned = [
            learned_mtu(&site, "b1", lip)?,
            learned_mtu(&site, "b2", lip)?,
        ];
        assert!(
            learned.contains(&Some(mtu)) && learned.iter().all(|m| [None, Some(mtu)].contains(m)),
            "MTUs the backends learned towards {lip}: {learned:?}"
        );
    }
    Ok(())
}

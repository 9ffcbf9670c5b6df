//! End-to-end: the kernel fast path (DESIGN §1 "Two tiers") in a real lab, on the node's
//! uplink. Established flows are forwarded by the eBPF program, byte for byte, while the engine
//! keeps deciding: it sees the handshake and the FIN or RST, and closes the session and its
//! entries; an offloaded flow is not expired while it streams; `fastpath = "off"` keeps the TUN
//! path; a full map leaves flows on the slow path, counted. Needs root, clang and bird2.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use tests::site::{Site, SiteOptions, VIP, VIP6};

fn status(site: &Site) -> Result<Value> {
    let out = site.status(true)?;
    ensure!(
        out.status.code().is_some_and(|c| c < 3),
        "lbcluster status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Packets the fast path forwarded, and packets the engine forwarded (both ways).
fn forwarded(site: &Site) -> Result<(u64, u64)> {
    let st = status(site)?;
    let fast = st["fastpath"]["program"]["forwarded"]
        .as_u64()
        .context("no fast path counters")?;
    let engine = site.event("forwarded_inbound")? + site.event("forwarded_outbound")?;
    Ok((fast, engine))
}

fn echo(vip: IpAddr) -> SocketAddr {
    SocketAddr::new(vip, 9000)
}

#[test]
fn established_flows_take_the_fast_path_byte_for_byte_ipv4_and_ipv6() -> Result<()> {
    let site = Site::start("rr")?;
    let st = status(&site)?;
    assert_eq!(st["fastpath"]["running"], true, "{}", st["fastpath"]);
    for vip in [IpAddr::V4(VIP), IpAddr::V6(VIP6)] {
        // 100 MB each way through the echo service, every byte checked.
        let (fast0, engine0) = forwarded(&site)?;
        site.lab
            .tcp_echo_check("client", echo(vip), 100 << 20)
            .with_context(|| format!("100 MB each way through {vip}"))?;
        let (fast1, engine1) = forwarded(&site)?;
        println!(
            "{vip}: 100 MB each way: {} packets by the fast path, {} by the engine (the \
             handshake, and once the client's FIN has ended ESTABLISHED, the echo's tail)",
            fast1 - fast0,
            engine1 - engine0
        );
        ensure!(
            fast1 - fast0 > 1000,
            "the fast path carried {}",
            fast1 - fast0
        );
        ensure!(
            fast1 - fast0 > 10 * (engine1 - engine0),
            "the engine carried {} of {}",
            engine1 - engine0,
            fast1 - fast0
        );
        // 100 MB from a backend: the server closes after its data, so the engine sees the
        // handshake, the request and the close, and none of the data.
        let (fast0, engine0) = forwarded(&site)?;
        let body =
            site.lab
                .http_get_bytes("client", SocketAddr::new(vip, 80), "/bytes/104857600")?;
        ensure!(body.len() == 100 << 20, "{} bytes", body.len());
        let (fast1, engine1) = forwarded(&site)?;
        println!(
            "{vip}: 100 MB download: {} packets by the fast path, {} by the engine",
            fast1 - fast0,
            engine1 - engine0
        );
        ensure!(
            fast1 - fast0 > 500,
            "the fast path carried {}",
            fast1 - fast0
        );
        ensure!(
            engine1 - engine0 < 40,
            "the engine carried {}",
            engine1 - engine0
        );
    }
    // Every connection ended with FINs through the engine: nothing stays offloaded.
    site_wait(&site, |st| st["fastpath"]["sessions"]["offloaded"] == 0)?;
    Ok(())
}

/// Waits (10 s at most) until `check` holds for the node's status.
fn site_wait(site: &Site, check: impl Fn(&Value) -> bool) -> Result<()> {
    tests::lab::wait_for(
        "the node's status",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            let st = status(site)?;
            ensure!(check(&st), "{}", st["fastpath"]);
            Ok(())
        },
    )
}

#[test]
fn fastpath_off_keeps_the_tun_path() -> Result<()> {
    let site = Site::start_with(SiteOptions {
        node: r#"fastpath = "off""#,
        ..SiteOptions::default()
    })?;
    let st = status(&site)?;
    assert_eq!(st["fastpath"]["running"], false, "{}", st["fastpath"]);
    assert!(
        st["fastpath"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("off")),
        "{}",
        st["fastpath"]
    );
    let engine0 = site.event("forwarded_inbound")?;
    site.lab
        .tcp_echo_check("client", echo(IpAddr::V4(VIP)), 1 << 20)?;
    ensure!(site.event("forwarded_inbound")? - engine0 > 100);
    Ok(())
}

/// Sessions the fast path holds now.
fn offloaded(site: &Site) -> Result<u64> {
    status(site)?["fastpath"]["sessions"]["offloaded"]
        .as_u64()
        .context("no fast path sessions")
}

#[test]
fn a_rst_reaches_the_engine_and_closes_the_session_and_its_entries() -> Result<()> {
    let site = Site::start("rr")?;
    site.lab
        .tcp_echo_reset("client", echo(IpAddr::V4(VIP)), 4 << 20)?;
    // The RST went through the engine, which closed the session and withdrew it.
    site_wait(&site, |st| {
        st["fastpath"]["sessions"]["offloaded"] == 0 && st["fastpath"]["sessions"]["offloads"] == 1
    })?;
    let sessions = site.sessions()?;
    ensure!(
        !sessions.contains("ESTABLISHED"),
        "the reset session is still established:\n{sessions}"
    );
    Ok(())
}

/// A flow the fast path carries for four times its established timeout is not expired: the
/// engine reads the last-seen time from the map before it expires anything.
#[test]
fn an_offloaded_flow_outlives_its_established_timeout_while_it_streams() -> Result<()> {
    let site = Site::start_with(SiteOptions {
        echo: "timeouts = { established = 5 }",
        ..SiteOptions::default()
    })?;
    let streams = streams(&site, 4, 20)?;
    tests::lab::wait_for(
        "four streams offloaded",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            let n = offloaded(&site)?;
            ensure!(n == 4, "{n} offloaded");
            Ok(())
        },
    )?;
    let report = tests::load::report(&streams, Duration::from_secs(40))?;
    println!("20 s streams with a 5 s established timeout: {report}");
    assert_eq!(report["completed"], 4, "{report}");
    assert_eq!(report["resets"], 0, "{report}");
    assert_eq!(report["content_errors"], 0, "{report}");
    Ok(())
}

/// A fast path with room for one session: the second and third flows stay on the slow path,
/// counted, and work all the same.
#[test]
fn a_full_map_leaves_flows_on_the_slow_path_counted() -> Result<()> {
    let site = Site::start_with(SiteOptions {
        node: "fastpath_sessions = 1",
        ..SiteOptions::default()
    })?;
    let streams = streams(&site, 3, 5)?;
    let report = tests::load::report(&streams, Duration::from_secs(30))?;
    assert_eq!(report["completed"], 3, "{report}");
    assert_eq!(report["resets"], 0, "{report}");
    let st = status(&site)?;
    let sessions = &st["fastpath"]["sessions"];
    assert_eq!(sessions["offloads"], 1, "{sessions}");
    assert_eq!(sessions["refused"], 2, "{sessions}");
    Ok(())
}

/// Starts `conns` echo streams of `seconds` each through the IPv4 VIP from the client.
fn streams(site: &Site, conns: u32, seconds: u32) -> Result<tests::lab::LabProcess> {
    tests::load::client_tool(
        &site.lab,
        &[
            "streams",
            &echo(IpAddr::V4(VIP)).to_string(),
            "--conns",
            &conns.to_string(),
            "--seconds",
            &seconds.to_string(),
        ],
    )
}

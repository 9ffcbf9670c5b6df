//! End-to-end, a node under pressure (one node, two backends, real kernel TCP stacks): the SYN
//! proxy answers every SYN of a proxied service with a cookie and the client's ACK opens the
//! flow to a real server, which then carries 100 MB each way byte for byte with its sequence
//! numbers shifted (IPv4 and IPv6), short exchanges whose first data the proxy holds included;
//! a port pool that runs out makes `status` degraded, saying which. Needs root, clang and bird2.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tests::site::{Site, SiteOptions, VIP, VIP6};

#[test]
fn proxied_flows_carry_every_byte_ipv4_and_ipv6() -> Result<()> {
    let site = Site::start_with(SiteOptions {
        echo: r#"syn_proxy = "on""#,
        ..SiteOptions::default()
    })?;
    for vip in [IpAddr::V4(VIP), IpAddr::V6(VIP6)] {
        let echo = SocketAddr::new(vip, 9000);
        site.lab
            .tcp_echo_check("client", echo, 100 << 20)
            .with_context(|| format!("100 MB each way through {echo}, proxied"))?;
        // Short exchanges: the request follows the handshake at once, so the proxy holds it
        // until the real server has answered its SYN.
        for _ in 0..20 {
            site.lab.tcp_echo_check("client", echo, 200)?;
        }
    }
    let sent = site.event("syn_cookies_sent")?;
    let accepted = site.event("syn_cookies_accepted")?;
    println!("cookies sent {sent}, accepted {accepted}");
    ensure!(
        sent >= 42 && accepted >= 42,
        "sent {sent}, accepted {accepted}"
    );
    ensure!(site.event("syn_proxy_failed")? == 0);
    ensure!(site.event("syn_proxy_refused")? == 0);
    Ok(())
}

/// Two local ports, both held by long-lived streams: `status` exits 1 and names the pool; once
/// the streams end (and their closing states time out, 1 s here), it is healthy again.
#[test]
fn an_exhausted_port_pool_makes_status_degraded() -> Result<()> {
    let site = Site::start_with(SiteOptions {
        node: "local_ports = [2000, 2001]",
        echo: "timeouts = { time_wait = 1, close = 1, fin_wait = 1, close_wait = 1, last_ack = 1 }",
        ..SiteOptions::default()
    })?;
    let streams = tests::load::client_tool(
        &site.lab,
        &[
            "streams",
            &SocketAddr::new(IpAddr::V4(VIP), 9000).to_string(),
            "--conns",
            "2",
            "--seconds",
            "4",
        ],
    )?;
    let degraded = tests::lab::wait_for(
        "status degraded",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            let out = site.status(false)?;
            let text = String::from_utf8_lossy(&out.stdout);
            ensure!(
                out.status.code() == Some(1),
                "exit {:?}: {text}",
                out.status
            );
            ensure!(
                text.contains("DEGRADED: LIP 198.19.200.1 TCP ports exhausted (2 of 2)"),
                "{text}"
            );
            Ok(())
        },
    );
    let report = tests::load::report(&streams, Duration::from_secs(30))?;
    degraded.with_context(|| format!("streams: {report}"))?;
    ensure!(report["completed"] == 2, "{report}");
    tests::lab::wait_for(
        "status healthy",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            let out = site.status(false)?;
            ensure!(
                out.status.code() == Some(0),
                "{}",
                String::from_utf8_lossy(&out.stdout)
            );
            Ok(())
        },
    )?;
    Ok(())
}

//! End-to-end: the SYN proxy in a real lab (one node, two backends, real kernel TCP stacks).
//! A proxied service answers every SYN with a cookie; the client's ACK opens the flow to a real
//! server, and the flow carries 100 MB each way byte for byte with its sequence numbers shifted
//! (IPv4 and IPv6), short exchanges whose first data the proxy holds included. Needs root,
//! clang and bird2.

use std::net::{IpAddr, SocketAddr};

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

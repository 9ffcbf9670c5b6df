//! At the edges (issue 17, items 4 and 5), through the real daemon in the lab: UDP datagrams
//! larger than the path, fragmented by the client's kernel on the way to the VIP and by the
//! backend's on the way back, IPv4 and IPv6, also behind a smaller MTU on the backend side;
//! ping to a VIP answered by the node, to anything else not, and rate-limited under a flood.
//! Run as root, under the lab lock.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tests::lab::wait_for;
use tests::site::{LIP, LIP6, Site, VIP, VIP6};

/// A message longer than two 1500-byte packets (DNS answers with DNSSEC are of this size).
const LARGE: usize = 3000;

/// `len` printable bytes that show where each one went.
fn message(len: usize, seed: u8) -> String {
    (0..len)
        .map(|i| char::from(b'a' + ((i + usize::from(seed)) % 26) as u8))
        .collect()
}

/// Sends `len`-byte datagrams to the UDP echo service on `vip`:53 from the client; each must
/// come back whole (the round-robin service sends them to both backends in turn).
fn echo_through(site: &Site, vip: IpAddr, len: usize, rounds: u8) -> Result<()> {
    for seed in 0..rounds {
        let msg = message(len, seed);
        let echo = site
            .lab
            .udp_echo("client", SocketAddr::new(vip, 53), &msg)
            .with_context(|| format!("{len}-byte datagram to {vip}, round {seed}"))?;
        ensure!(
            echo == msg,
            "{len}-byte echo through {vip} came back as {} bytes",
            echo.len()
        );
    }
    Ok(())
}

/// The counters that show fragments were followed, and none was lost for want of a first.
fn fragment_counters(site: &Site) -> Result<(u64, u64, u64)> {
    Ok((
        site.event("fragments_tracked")?,
        site.event("fragments_followed")?,
        site.dropped("fragment_untracked")?,
    ))
}

#[test]
fn large_udp_datagrams_cross_the_vip_fragmented_both_ways() -> Result<()> {
    let site = Site::start("rr")?;
    for vip in [IpAddr::V4(VIP), IpAddr::V6(VIP6)] {
        let before = fragment_counters(&site)?;
        echo_through(&site, vip, LARGE, 4)?;
        let after = fragment_counters(&site)?;
        // Each datagram is fragmented twice (to the VIP and back): a first and later
        // fragments each way, whatever the retries of the client helper added.
        ensure!(
            after.0 >= before.0 + 8 && after.1 >= before.1 + 8,
            "{vip}: fragments tracked/followed {before:?} → {after:?}"
        );
        ensure!(
            after.2 == 0,
            "{vip}: fragments dropped as untracked: {after:?}"
        );
    }
    // The datagram that fits still passes as one packet.
    echo_through(&site, VIP.into(), 1000, 1)?;
    Ok(())
}

#[test]
fn large_udp_datagrams_cross_a_smaller_mtu_behind_the_node() -> Result<()> {
    let site = Site::start("rr")?;
    // The backends answer over a 1000-byte (IPv4) or 1280-byte (IPv6, its minimum) path:
    // their kernels cut the replies to that size. The router limits the way to the backends
    // the same: it cuts the client's IPv4 fragments again (they carry no DF), and answers
    // the 1500-byte IPv6 ones with "packet too big" to the LIP, which the node translates
    // for the client (quoting its first fragment): the client's next try is cut to 1280.
    for j in 1..=2 {
        let role = format!("b{j}");
        site.lab.exec(
            &role,
            &[
                "ip",
                "-4",
                "route",
                "replace",
                "default",
                "via",
                "198.18.3.1",
                "mtu",
                "lock",
                "1000",
            ],
        )?;
        site.lab.exec(
            &role,
            &[
                "ip",
                "-6",
                "route",
                "replace",
                "default",
                "via",
                "2001:db8:3::1",
                "mtu",
                "lock",
                "1280",
            ],
        )?;
    }
    site.lab.limit_backend_path_mtu(1000, 1280)?;
    for vip in [IpAddr::V4(VIP), IpAddr::V6(VIP6)] {
        echo_through(&site, vip, LARGE, 2)?;
    }
    let too_big = site.event("icmp_translated")?;
    ensure!(too_big >= 1, "no packet too big translated");
    // A 1400-byte IPv4 datagram leaves the client whole with DF; the router's "fragmentation
    // needed" is translated back to the client, which then fragments it at 1000 bytes.
    echo_through(&site, VIP.into(), 1400, 2)?;
    ensure!(
        site.event("icmp_translated")? > too_big,
        "no fragmentation needed translated"
    );
    ensure!(site.dropped("fragment_untracked")? == 0);
    Ok(())
}

/// Runs `ping ARGS` in the client namespace; its summary line's (transmitted, received),
/// whether or not every echo was answered.
fn ping(site: &Site, args: &str) -> Result<(u64, u64)> {
    let out = site
        .lab
        .exec("client", &["sh", "-c", &format!("ping {args}; true")])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let summary = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .with_context(|| format!("ping {args}: no summary in {text:?}"))?;
    let mut numbers = summary
        .split(',')
        .filter_map(|part| part.split_whitespace().next()?.parse::<u64>().ok());
    let sent = numbers.next().context("transmitted")?;
    let received = numbers.next().context("received")?;
    Ok((sent, received))
}

#[test]
fn ping_to_a_vip_is_answered_and_to_anything_else_not() -> Result<()> {
    tests::tools::require(&["ping"])?;
    let site = Site::start("rr")?;
    // The first echo may wait for neighbour resolution on the way; three must come back.
    for (vip, family) in [(IpAddr::V4(VIP), "-4"), (IpAddr::V6(VIP6), "-6")] {
        let (sent, received) = ping(&site, &format!("{family} -c 3 -i 0.2 -W 2 {vip}"))?;
        ensure!(
            (sent, received) == (3, 3),
            "ping {vip}: {received} of {sent} answered"
        );
    }
    ensure!(site.event("echo_replied")? >= 6);
    // The LIPs are routed to the node too, but are no VIP: the engine does not answer.
    let not_vip = site.dropped("echo_not_vip")?;
    for (lip, family) in [(IpAddr::V4(LIP), "-4"), (IpAddr::V6(LIP6), "-6")] {
        let (sent, received) = ping(&site, &format!("{family} -c 2 -i 0.2 -W 1 {lip}"))?;
        ensure!(
            sent == 2 && received == 0,
            "ping {lip}: {received} of {sent} answered"
        );
    }
    wait_for(
        "echo_not_vip to count the pings to the LIPs",
        Duration::from_secs(5),
        Duration::from_millis(100),
        || {
            let n = site.dropped("echo_not_vip")?;
            ensure!(n >= not_vip + 4, "{not_vip} → {n}");
            Ok(())
        },
    )?;
    Ok(())
}

#[test]
fn a_ping_flood_at_a_vip_is_rate_limited() -> Result<()> {
    tests::tools::require(&["ping"])?;
    let site = Site::start("rr")?;
    let limited = site.dropped("echo_rate_limited")?;
    // 300 requests back to back (more than the burst of 100 replies), then a flood of the
    // rest: the bucket runs dry whatever the machine's speed.
    let (sent, received) = ping(&site, &format!("-f -l 300 -c 2000 -w 60 {VIP}"))?;
    ensure!(sent >= 300, "only {sent} echo requests sent");
    ensure!(received > 0, "no echo answered in the flood");
    ensure!(
        received < sent,
        "all {sent} echo requests answered: no rate limit"
    );
    // Every request the limit refused went unanswered (others may be lost on the way).
    let refused = site.dropped("echo_rate_limited")? - limited;
    ensure!(
        refused >= 1 && refused <= sent - received,
        "{} requests unanswered, {refused} counted as rate-limited",
        sent - received
    );
    // The limit passes: a calm ping is answered again.
    wait_for(
        "a ping after the flood",
        Duration::from_secs(5),
        Duration::from_millis(200),
        || {
            let (sent, received) = ping(&site, &format!("-c 1 -W 1 {VIP}"))?;
            ensure!(received == sent, "{received} of {sent}");
            Ok(())
        },
    )?;
    Ok(())
}

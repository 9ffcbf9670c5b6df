//! Golden packet tests of echo requests to a VIP (see the engine's `echo` module): answered in
//! place with `Verdict::Reply`, byte-exact against replies the test-side builder makes with
//! fully recomputed checksums; rate-limited and counted; echo to anything but a VIP dropped.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::*;
use dataplane::echo::{ECHO_BURST, ECHO_RATE, REPLY_TTL};
use dataplane::{DropReason, Event, Instant, Verdict};

const T0: Instant = Instant::from_secs(1000);

fn echo(typ: u8, data: &[u8]) -> L4 {
    L4::Icmp {
        typ,
        code: 0,
        rest: [0x12, 0x34, 0, 7],
        data: data.to_vec(),
    }
}

/// An IPv4 echo request from `src` to `dst` that has already come some hops (TTL 50).
fn request_v4(src: IpAddr, dst: IpAddr, data: &[u8]) -> Vec<u8> {
    let mut p = ip(src, dst, &echo(8, data));
    p[8] = 50;
    p[10..12].copy_from_slice(&[0, 0]);
    let c = !fold(sum16(&p[..20]));
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p
}

#[test]
fn test_v4_echo_to_a_vip_is_answered_in_place() {
    let (engine, mut w) = engine();
    let data: Vec<u8> = (0..56u8).collect();
    let (v, out) = run(&mut w, T0, &request_v4(CLIENT.into(), VIP.into(), &data));
    assert_eq!(v, Verdict::Reply);
    // The builder's header: identification and DF as in the request, TTL 64.
    assert_eq!(REPLY_TTL, 64);
    assert_eq!(out, ip(VIP.into(), CLIENT.into(), &echo(0, &data)));
    assert_eq!(fold(sum16(&out[..20])), 0xffff, "IPv4 header checksum");
    assert_eq!(fold(sum16(&out[20..])), 0xffff, "ICMP checksum");
    let c = engine.counters();
    assert_eq!(c.events(Event::EchoReplied), 1);
    assert_eq!(c.events(Event::ForwardedOutbound), 0);
    assert_eq!(c.total_drops(), 0);
}

#[test]
fn test_v6_echo_to_a_vip_is_answered_in_place() {
    let (engine, mut w) = engine();
    let data = b"abcdefghijklmnopqrstuvwxyz".repeat(40);
    let mut req = ip(CLIENT6.into(), VIP6.into(), &echo(128, &data));
    req[7] = 3; // hop limit
    let (v, out) = run(&mut w, T0, &req);
    assert_eq!(v, Verdict::Reply);
    assert_eq!(out, ip(VIP6.into(), CLIENT6.into(), &echo(129, &data)));
    assert_checksums_ok(&out);
    assert_eq!(engine.counters().events(Event::EchoReplied), 1);
}

#[test]
fn test_echo_to_anything_but_a_vip_is_dropped() {
    let (engine, mut w) = engine();
    for dst in [
        IpAddr::from(LIP),
        IpAddr::from(RS1),
        IpAddr::from(std::net::Ipv4Addr::new(198, 18, 100, 2)),
    ] {
        assert_eq!(
            run(&mut w, T0, &request_v4(CLIENT.into(), dst, b"x")).0,
            Verdict::Drop(DropReason::EchoNotVip),
            "{dst}"
        );
    }
    let req = ip(CLIENT6.into(), LIP6.into(), &echo(128, b"x"));
    assert_eq!(
        run(&mut w, T0, &req).0,
        Verdict::Drop(DropReason::EchoNotVip)
    );
    let c = engine.counters();
    assert_eq!(c.drops(DropReason::EchoNotVip), 4);
    assert_eq!(c.events(Event::EchoReplied), 0);
}

#[test]
fn test_echo_replies_are_rate_limited_and_counted() {
    let (engine, mut w) = engine();
    let req = request_v4(CLIENT.into(), VIP.into(), b"flood");
    for i in 0..ECHO_BURST {
        assert_eq!(run(&mut w, T0, &req).0, Verdict::Reply, "request {i}");
    }
    assert_eq!(
        run(&mut w, T0, &req).0,
        Verdict::Drop(DropReason::EchoRateLimited)
    );
    // One reply's worth of time later, one more; every worker draws on the same bucket.
    let next = T0.saturating_add(Duration::from_nanos(1_000_000_000 / ECHO_RATE));
    let mut other = engine.worker();
    assert_eq!(run(&mut other, next, &req).0, Verdict::Reply);
    assert_eq!(
        run(&mut w, next, &req).0,
        Verdict::Drop(DropReason::EchoRateLimited)
    );
    // A second later the rate is back (up to a burst).
    let later = T0.saturating_add(Duration::from_secs(1));
    let v6 = ip(CLIENT6.into(), VIP6.into(), &echo(128, b"x"));
    assert_eq!(run(&mut w, later, &v6).0, Verdict::Reply);
    let c = engine.counters();
    assert_eq!(c.events(Event::EchoReplied), ECHO_BURST + 2);
    assert_eq!(c.drops(DropReason::EchoRateLimited), 2);
}

#[test]
fn test_unanswerable_echo_requests_are_dropped() {
    let (engine, mut w) = engine();
    // From a multicast or broadcast source there is nobody to answer.
    for src in [
        IpAddr::from(std::net::Ipv4Addr::new(224, 0, 0, 1)),
        IpAddr::from(std::net::Ipv4Addr::BROADCAST),
    ] {
        assert_eq!(
            run(&mut w, T0, &request_v4(src, VIP.into(), b"x")).0,
            Verdict::Drop(DropReason::Malformed),
            "{src}"
        );
    }
    // A wrong checksum.
    let mut bad = request_v4(CLIENT.into(), VIP.into(), b"x");
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert_eq!(
        run(&mut w, T0, &bad).0,
        Verdict::Drop(DropReason::BadChecksum)
    );
    // ICMPv6 after an extension header (hop-by-hop, PadN).
    let msg = ip(CLIENT6.into(), VIP6.into(), &echo(128, b"x"));
    let mut body = vec![58, 0, 1, 4, 0, 0, 0, 0];
    body.extend_from_slice(&msg[40..]);
    let with_ext = ip_raw(CLIENT6.into(), VIP6.into(), 0, &body);
    assert_eq!(
        run(&mut w, T0, &with_ext).0,
        Verdict::Drop(DropReason::IcmpUnsupported)
    );
    // An echo reply is not answered.
    let reply = ip(CLIENT.into(), VIP.into(), &echo(0, b"x"));
    assert_eq!(
        run(&mut w, T0, &reply).0,
        Verdict::Drop(DropReason::IcmpUnsupported)
    );
    assert_eq!(engine.counters().events(Event::EchoReplied), 0);
}

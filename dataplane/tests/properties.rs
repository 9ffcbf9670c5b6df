//! Property tests of the engine: translation round trips, checksums against a full recompute,
//! and no panic on any input.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use common::*;
use dataplane::{Direction, Instant, L4Checksum, L4Proto, Verdict};
use proptest::prelude::*;

const T0: Instant = Instant::from_secs(50);

fn lab_v4() -> impl Strategy<Value = Ipv4Addr> {
    // Clients anywhere in 198.18.0.0/15 except the VIP/LIP/backend ranges used by the engine.
    (0u32..(1 << 17))
        .prop_map(|n| Ipv4Addr::from(0xc612_0000 | n))
        .prop_filter("not a lab service address", |a| {
            let o = a.octets();
            !(o[1] == 18 && (o[2] == 100 || o[2] == 3)) && !(o[1] == 19 && o[2] == 200)
        })
}

fn lab_v6() -> impl Strategy<Value = Ipv6Addr> {
    any::<u64>().prop_map(|n| Ipv6Addr::from((0x2001_0db8_0001_0000u128 << 64) | u128::from(n)))
}

fn flow_packets(
    client: IpAddr,
    vip: IpAddr,
    sport: u16,
    is_udp: bool,
    seq: u32,
    payload: Vec<u8>,
) -> (Vec<u8>, L4, L4) {
    if is_udp {
        let dport = 53;
        (
            ip(client, vip, &udp(sport, dport, &payload)),
            udp(sport, dport, &payload),
            udp(dport, sport, &payload),
        )
    } else {
        let first = tcp(sport, 80, SYN, seq, 0, b"");
        (
            ip(client, vip, &first),
            first,
            tcp(80, sport, SYN | ACK, 7, seq.wrapping_add(1), &payload),
        )
    }
}

/// Reads (src, dst, sport, dport) of an IPv4/IPv6 packet without extension headers.
fn endpoints(p: &[u8]) -> (IpAddr, IpAddr, u16, u16) {
    let (s, d, l4) = if p[0] >> 4 == 4 {
        let hl = usize::from(p[0] & 0xf) * 4;
        (
            IpAddr::from(<[u8; 4]>::try_from(&p[12..16]).unwrap()),
            IpAddr::from(<[u8; 4]>::try_from(&p[16..20]).unwrap()),
            hl,
        )
    } else {
        (
            IpAddr::from(<[u8; 16]>::try_from(&p[8..24]).unwrap()),
            IpAddr::from(<[u8; 16]>::try_from(&p[24..40]).unwrap()),
            40,
        )
    };
    (
        s,
        d,
        u16::from_be_bytes([p[l4], p[l4 + 1]]),
        u16::from_be_bytes([p[l4 + 2], p[l4 + 3]]),
    )
}

fn round_trip(
    client: IpAddr,
    sport: u16,
    is_udp: bool,
    seq: u32,
    payload: Vec<u8>,
) -> Result<(), TestCaseError> {
    let (_, mut w) = engine();
    let vip: IpAddr = if client.is_ipv4() {
        VIP.into()
    } else {
        VIP6.into()
    };
    let is_udp = is_udp && client.is_ipv4();
    let (first, _, reply_l4) = flow_packets(client, vip, sport, is_udp, seq, payload);
    let (v, out) = run(&mut w, T0, &first);
    prop_assert_eq!(v, Verdict::Forward(Direction::Inbound));
    assert_checksums_ok(&out);
    // The real server answers the translated packet: swap its endpoints.
    let (lip, rs, lport, rport) = endpoints(&out);
    prop_assert!(
        lip != client && rs != vip,
        "Full-NAT rewrote both addresses"
    );
    let reply_l4 = reply_l4.with_ports(rport, lport);
    let reply = ip(rs, lip, &reply_l4);
    let (v, back) = run(&mut w, T0, &reply);
    prop_assert_eq!(v, Verdict::Forward(Direction::Outbound));
    assert_checksums_ok(&back);
    let (s, d, sp, dp) = endpoints(&back);
    prop_assert_eq!((s, d, dp), (vip, client, sport));
    prop_assert_eq!(sp, if is_udp { 53 } else { 80 });
    // Apart from addresses, ports and checksums the reply is untouched.
    let expect = ip(vip, client, &reply_l4.with_ports(sp, sport));
    prop_assert_eq!(back, expect);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn prop_round_trip_v4(client in lab_v4(), sport in 1u16.., is_udp in any::<bool>(), seq in any::<u32>(),
                          payload in proptest::collection::vec(any::<u8>(), 0..300)) {
        round_trip(client.into(), sport, is_udp, seq, payload)?;
    }

    #[test]
    fn prop_round_trip_v6(client in lab_v6(), sport in 1u16.., seq in any::<u32>(),
                          payload in proptest::collection::vec(any::<u8>(), 0..300)) {
        round_trip(client.into(), sport, false, seq, payload)?;
    }
}

fn valid_inputs() -> Vec<Vec<u8>> {
    let c: IpAddr = CLIENT.into();
    let v: IpAddr = VIP.into();
    let inner = ip(
        LIP.into(),
        RS1.into(),
        &tcp(1024, 8080, ACK, 1, 1, &[0; 40]),
    );
    vec![
        ip(c, v, &tcp(40000, 80, SYN, 1, 0, b"")),
        ip(c, v, &tcp(40000, 80, ACK, 2, 1, b"data")),
        ip(
            RS1.into(),
            LIP.into(),
            &tcp(8080, 1024, SYN | ACK, 9, 2, b""),
        ),
        ip(c, v, &udp(5000, 53, b"q")),
        ip(
            ROUTER.into(),
            LIP.into(),
            &L4::Icmp {
                typ: 3,
                code: 4,
                rest: [0, 0, 5, 0],
                data: inner[..48].to_vec(),
            },
        ),
        ip(CLIENT6.into(), VIP6.into(), &tcp(40000, 80, SYN, 1, 0, b"")),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    #[test]
    fn prop_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), mode in 0u8..3) {
        let (_, mut w) = engine();
        let csum = [L4Checksum::Unverified, L4Checksum::Verified, L4Checksum::Partial][usize::from(mode)];
        let _ = run_with(&mut w, T0, &bytes, csum);
    }

    #[test]
    fn prop_mutated_packets_never_panic(which in 0usize..6, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
                                        cut in any::<usize>(), mode in 0u8..3) {
        let (_, mut w) = engine();
        let csum = [L4Checksum::Unverified, L4Checksum::Verified, L4Checksum::Partial][usize::from(mode)];
        // Open a flow first so mutations also reach the established and ICMP paths.
        run(&mut w, T0, &valid_inputs()[0]);
        let mut p = valid_inputs()[which].clone();
        for (at, x) in flips {
            let i = at % p.len();
            p[i] ^= x;
        }
        let len = p.len() - cut % (p.len() / 4 + 1);
        let _ = run_with(&mut w, T0, &p[..len], csum);
    }
}

/// Addresses a peer's record may name: the lab's own (so that services, real servers and LIPs
/// match), a few others, and the other family.
fn record_addr() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        Just(IpAddr::from(CLIENT)),
        Just(IpAddr::from(VIP)),
        Just(IpAddr::from(RS1)),
        Just(IpAddr::from(LIP)),
        Just(IpAddr::from(Ipv4Addr::new(198, 19, 200, 2))),
        Just(IpAddr::from(VIP6)),
        Just(IpAddr::from(RS6)),
        any::<u32>().prop_map(|a| IpAddr::from(Ipv4Addr::from(a))),
    ]
}

fn record_port() -> impl Strategy<Value = u16> {
    prop_oneof![
        Just(80u16),
        Just(53),
        Just(8080),
        Just(5353),
        Just(1024),
        any::<u16>()
    ]
}

fn flow_state() -> impl Strategy<Value = dataplane::FlowState> {
    use dataplane::{FlowState, TcpState};
    prop_oneof![
        Just(FlowState::Udp),
        proptest::sample::select(vec![
            TcpState::None,
            TcpState::SynSent,
            TcpState::SynRecv,
            TcpState::Established,
            TcpState::FinWait,
            TcpState::CloseWait,
            TcpState::LastAck,
            TcpState::TimeWait,
            TcpState::Close,
        ])
        .prop_map(FlowState::Tcp),
    ]
}

/// Any tracking state a peer could put on the wire (every field arbitrary).
fn window() -> impl Strategy<Value = dataplane::tcp_state::TcpWindow> {
    (
        any::<[u32; 2]>(),
        any::<[u32; 2]>(),
        prop_oneof![Just([7u8, 7]), Just([255, 255]), any::<[u8; 2]>()],
        any::<[bool; 2]>(),
    )
        .prop_map(|(end, max_win, wscale, seen)| {
            serde_json::from_value(serde_json::json!({
                "end": end, "max_win": max_win, "wscale": wscale, "seen": seen,
            }))
            .unwrap()
        })
}

fn session_record() -> impl Strategy<Value = dataplane::SessionRecord> {
    (
        any::<bool>(),
        (record_addr(), record_port()),
        (record_addr(), record_port()),
        (record_addr(), record_port()),
        (record_addr(), record_port()),
        flow_state(),
        window(),
        any::<u32>(),
        any::<bool>(),
    )
        .prop_map(
            |(udp, c, v, l, b, state, window, expires_in_secs, synced)| {
                let sa = |(ip, port): (IpAddr, u16)| std::net::SocketAddr::new(ip, port);
                dataplane::SessionRecord {
                    proto: if udp { L4Proto::Udp } else { L4Proto::Tcp },
                    client: sa(c),
                    vip: sa(v),
                    local: sa(l),
                    backend: sa(b),
                    state,
                    window,
                    expires_in_secs,
                    synced,
                    syn_proxy: None,
                }
            },
        )
}

fn authority() -> impl Strategy<Value = dataplane::Authority> {
    prop_oneof![
        (0u32..3).prop_map(|mark| dataplane::Authority::Owner { mark }),
        Just(dataplane::Authority::Relay),
        Just(dataplane::Authority::Reclaim),
    ]
}

/// A TCP segment of the record's flow, either way, with arbitrary flags, numbers, window and
/// window-scale option.
fn segment_of(
    r: &dataplane::SessionRecord,
    inbound: bool,
    flags: u8,
    seq: u32,
    window: u16,
    wscale: u8,
) -> Vec<u8> {
    let (src, dst) = if inbound {
        (r.client, r.vip)
    } else {
        (r.backend, r.local)
    };
    if src.is_ipv4() != dst.is_ipv4() {
        return Vec::new();
    }
    let mut l4 = tcp_opts(
        src.port(),
        dst.port(),
        flags,
        seq,
        seq ^ 0x5a5a,
        &[1, 3, 3, wscale],
    );
    if let L4::Tcp { window: w, .. } = &mut l4 {
        *w = window;
    }
    if r.proto == L4Proto::Udp {
        l4 = udp(src.port(), dst.port(), b"x");
    }
    ip(src.ip(), dst.ip(), &l4)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    /// Whatever a peer sends is installed, updated, removed and reconciled without a panic, and
    /// packets of the flow it names are processed without one afterwards, whatever their flags,
    /// windows and window scales.
    #[test]
    fn prop_arbitrary_peer_records_never_panic(
        records in proptest::collection::vec((session_record(), authority()), 1..4),
        packets in proptest::collection::vec((any::<bool>(), any::<u8>(), any::<u32>(), any::<u16>(), any::<u8>()), 0..6),
        secs in any::<u64>(),
    ) {
        let (engine, mut w) = engine();
        let now = Instant::from_secs(secs);
        for (r, a) in &records {
            let _ = engine.install(now, r, *a);
        }
        for (i, (inbound, flags, seq, window, wscale)) in packets.into_iter().enumerate() {
            let (r, _) = &records[i % records.len()];
            let p = segment_of(r, inbound, flags & 0x3f, seq, window, wscale);
            if !p.is_empty() {
                let _ = run(&mut w, now, &p);
            }
        }
        let _ = engine.sessions(now);
        let _ = engine.remove(&records[0].0);
        engine.reconcile(&[records[0].0.local.ip()], 1);
        w.expire(Instant::from_secs(secs.saturating_add(u64::from(u32::MAX))), 4096);
        prop_assert_eq!(engine.session_count(), 0);
    }
}

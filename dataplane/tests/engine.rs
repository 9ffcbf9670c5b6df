//! Golden packet tests of the Full-NAT engine: input bytes → expected output bytes or drop reason.
//! Expected packets are built by the test-side builder with fully recomputed checksums, so a
//! byte-exact match also proves every incremental checksum update.

mod common;

use std::net::{IpAddr, SocketAddr};

use common::*;
use dataplane::tcp_state::TcpState;
use dataplane::{
    Direction, DropReason, EngineConfig, Event, FlowState, Instant, L4Checksum, L4Proto,
    SessionEvent, Verdict,
};

const T0: Instant = Instant::from_secs(1000);

fn v4(a: std::net::Ipv4Addr) -> IpAddr {
    a.into()
}

fn v6(a: std::net::Ipv6Addr) -> IpAddr {
    a.into()
}

/// Opens a TCP flow from CLIENT:40000 with a SYN; returns the local port chosen.
fn open_tcp(worker: &mut dataplane::Worker) -> u16 {
    let syn = ip(v4(CLIENT), v4(VIP), &tcp(40000, 80, SYN, 1000, 0, b""));
    let (v, _) = run(worker, T0, &syn);
    assert_eq!(v, Verdict::Forward(Direction::Inbound));
    created(worker).local.port()
}

#[test]
fn test_syn_creates_session_and_is_rewritten() {
    let (engine, mut w) = engine();
    let syn = ip(v4(CLIENT), v4(VIP), &tcp(40000, 80, SYN, 1000, 0, b""));
    let (v, out) = run(&mut w, T0, &syn);
    assert_eq!(v, Verdict::Forward(Direction::Inbound));
    let rec = created(&mut w);
    assert_eq!(rec.client, SocketAddr::new(v4(CLIENT), 40000));
    assert_eq!(rec.backend, SocketAddr::new(v4(RS1), 8080));
    assert_eq!(rec.local.ip(), v4(LIP));
    assert_eq!(rec.state, FlowState::Tcp(TcpState::SynRecv));
    let expected = ip(
        v4(LIP),
        v4(RS1),
        &tcp(rec.local.port(), 8080, SYN, 1000, 0, b""),
    );
    assert_eq!(out, expected);
    assert_checksums_ok(&out);
    assert_eq!(engine.session_count(), 1);
    assert_eq!(engine.counters().events(Event::SessionsCreated), 1);
}

#[test]
fn test_synack_data_and_close_both_ways() {
    let (engine, mut w) = engine();
    let lport = open_tcp(&mut w);
    // SYN-ACK from the real server goes back to the client from the VIP.
    let synack = ip(
        v4(RS1),
        v4(LIP),
        &tcp(8080, lport, SYN | ACK, 5000, 1001, b""),
    );
    let (v, out) = run(&mut w, T0, &synack);
    assert_eq!(v, Verdict::Forward(Direction::Outbound));
    assert_eq!(
        out,
        ip(
            v4(VIP),
            v4(CLIENT),
            &tcp(80, 40000, SYN | ACK, 5000, 1001, b"")
        )
    );
    assert_checksums_ok(&out);
    // Handshake completes, data both ways.
    let (_, out) = run(
        &mut w,
        T0,
        &ip(v4(CLIENT), v4(VIP), &tcp(40000, 80, ACK, 1001, 5001, b"")),
    );
    assert_eq!(
        out,
        ip(v4(LIP), v4(RS1), &tcp(lport, 8080, ACK, 1001, 5001, b""))
    );
    let req = b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n";
    let (v, out) = run(
        &mut w,
        T0,
        &ip(
            v4(CLIENT),
            v4(VIP),
            &tcp(40000, 80, ACK | PSH, 1001, 5001, req),
        ),
    );
    assert_eq!(v, Verdict::Forward(Direction::Inbound));
    assert_eq!(
        out,
        ip(
            v4(LIP),
            v4(RS1),
            &tcp(lport, 8080, ACK | PSH, 1001, 5001, req)
        )
    );
    assert_checksums_ok(&out);
    let resp = vec![0x5a; 1400];
    let (v, out) = run(
        &mut w,
        T0,
        &ip(
            v4(RS1),
            v4(LIP),
            &tcp(8080, lport, ACK, 5001, 1001 + 27, &resp),
        ),
    );
    assert_eq!(v, Verdict::Forward(Direction::Outbound));
    assert_eq!(
        out,
        ip(
            v4(VIP),
            v4(CLIENT),
            &tcp(80, 40000, ACK, 5001, 1001 + 27, &resp)
        )
    );
    assert_checksums_ok(&out);
    assert_eq!(state_of(&engine), TcpState::Established);
    // Client closes first: FIN → CLOSE_WAIT, server FIN → TIME_WAIT.
    let (_, out) = run(
        &mut w,
        T0,
        &ip(
            v4(CLIENT),
            v4(VIP),
            &tcp(40000, 80, FIN | ACK, 1028, 6401, b""),
        ),
    );
    assert_eq!(
        out,
        ip(
            v4(LIP),
            v4(RS1),
            &tcp(lport, 8080, FIN | ACK, 1028, 6401, b"")
        )
    );
    assert_eq!(state_of(&engine), TcpState::CloseWait);
    let (_, out) = run(
        &mut w,
        T0,
        &ip(
            v4(RS1),
            v4(LIP),
            &tcp(8080, lport, FIN | ACK, 6401, 1029, b""),
        ),
    );
    assert_eq!(
        out,
        ip(
            v4(VIP),
            v4(CLIENT),
            &tcp(80, 40000, FIN | ACK, 6401, 1029, b"")
        )
    );
    assert_eq!(state_of(&engine), TcpState::TimeWait);
    let changes: Vec<_> = w
        .drain_events()
        .filter_map(|e| match e {
            SessionEvent::StateChanged(r) => Some(r.state),
            _ => None,
        })
        .collect();
    assert_eq!(
        changes,
        [
            FlowState::Tcp(TcpState::Established),
            FlowState::Tcp(TcpState::CloseWait),
            FlowState::Tcp(TcpState::TimeWait)
        ]
    );
}

fn state_of(engine: &dataplane::Engine) -> TcpState {
    match engine.sessions(T0)[0].state {
        FlowState::Tcp(s) => s,
        FlowState::Udp => panic!("not TCP"),
    }
}

fn establish(w: &mut dataplane::Worker) -> u16 {
    let lport = open_tcp(w);
    run(
        w,
        T0,
        &ip(
            v4(RS1),
            v4(LIP),
            &tcp(8080, lport, SYN | ACK, 5000, 1001, b""),
        ),
    );
    run(
        w,
        T0,
        &ip(v4(CLIENT), v4(VIP), &tcp(40000, 80, ACK, 1001, 5001, b"")),
    );
    lport
}

#[test]
fn test_in_window_rst_closes() {
    let (engine, mut w) = engine();
    let lport = establish(&mut w);
    let (v, out) = run(
        &mut w,
        T0,
        &ip(v4(RS1), v4(LIP), &tcp(8080, lport, RST, 5001, 0, b"")),
    );
    assert_eq!(v, Verdict::Forward(Direction::Outbound));
    assert_eq!(
        out,
        ip(v4(VIP), v4(CLIENT), &tcp(80, 40000, RST, 5001, 0, b""))
    );
    assert_eq!(state_of(&engine), TcpState::Close);
}

#[test]
fn test_out_of_window_rst_forwarded_but_does_not_close() {
    let (engine, mut w) = engine();
    establish(&mut w);
    let blind = ip(
        v4(CLIENT),
        v4(VIP),
        &tcp(40000, 80, RST, 1001 + 3_000_000, 0, b""),
    );
    let (v, _) = run(&mut w, T0, &blind);
    assert_eq!(v, Verdict::Forward(Direction::Inbound));
    assert_eq!(state_of(&engine), TcpState::Established);
    assert_eq!(engine.counters().events(Event::RstOutOfWindow), 1);
}

#[test]
fn test_non_syn_without_session_dropped() {
    let (engine, mut w) = engine();
    for flags in [ACK, ACK | PSH, FIN | ACK, RST, SYN | ACK, SYN | FIN] {
        let p = ip(v4(CLIENT), v4(VIP), &tcp(40001, 80, flags, 1, 1, b"x"));
        assert_eq!(
            run(&mut w, T0, &p).0,
            Verdict::Drop(DropReason::NoSession),
            "flags {flags:#x}"
        );
    }
    // Server side, no session.
    let p = ip(v4(RS1), v4(LIP), &tcp(8080, 2000, ACK, 1, 1, b""));
    assert_eq!(run(&mut w, T0, &p).0, Verdict::Drop(DropReason::NoSession));
    assert_eq!(engine.session_count(), 0);
    assert_eq!(engine.counters().drops(DropReason::NoSession), 7);
}

#[test]
fn test_no_service() {
    let (_, mut w) = engine();
    let p = ip(v4(CLIENT), v4(VIP), &tcp(40000, 81, SYN, 1, 0, b""));
    assert_eq!(run(&mut w, T0, &p).0, Verdict::Drop(DropReason::NoService));
    let p = ip(v4(CLIENT), v4(VIP), &udp(40000, 80, b"x"));
    assert_eq!(run(&mut w, T0, &p).0, Verdict::Drop(DropReason::NoService));
}

#[test]
fn test_udp_both_ways() {
    let (engine, mut w) = engine();
    let q = ip(v4(CLIENT), v4(VIP), &udp(5000, 53, b"query"));
    let (v, out) = run(&mut w, T0, &q);
    assert_eq!(v, Verdict::Forward(Direction::Inbound));
    let rec = created(&mut w);
    assert_eq!(rec.state, FlowState::Udp);
    assert_eq!(
        out,
        ip(v4(LIP), v4(RS1), &udp(rec.local.port(), 5353, b"query"))
    );
    assert_checksums_ok(&out);
    let r = ip(v4(RS1), v4(LIP), &udp(5353, rec.local.port(), b"answer!"));
    let (v, out) = run(&mut w, T0, &r);
    assert_eq!(v, Verdict::Forward(Direction::Outbound));
    assert_eq!(out, ip(v4(VIP), v4(CLIENT), &udp(53, 5000, b"answer!")));
    assert_checksums_ok(&out);
    assert_eq!(engine.session_count(), 1);
}

#[test]
fn test_udp_zero_checksum_ipv4_kept_ipv6_dropped() {
    let (engine, mut w) = engine_with(
        &[
            service(v4(VIP), 53, L4Proto::Udp, vec![backend(v4(RS1), 53, 1)]),
            service(v6(VIP6), 53, L4Proto::Udp, vec![backend(v6(RS6), 53, 1)]),
        ],
        small_config(),
    );
    let mut q = ip(v4(CLIENT), v4(VIP), &udp(5000, 53, b"q"));
    q[26..28].copy_from_slice(&[0, 0]);
    let (v, out) = run(&mut w, T0, &q);
    assert_eq!(v, Verdict::Forward(Direction::Inbound));
    assert_eq!(&out[26..28], &[0, 0], "no checksum stays no checksum");
    let mut q6 = ip(v6(CLIENT6), v6(VIP6), &udp(5000, 53, b"q"));
    q6[46..48].copy_from_slice(&[0, 0]);
    assert_eq!(
        run(&mut w, T0, &q6).0,
        Verdict::Drop(DropReason::BadChecksum)
    );
    assert_eq!(engine.session_count(), 1);
}

/// An ICMP error quoting `quoted` (its IP header and first 8 bytes of L4... or more).
fn icmp4_error(
    src: IpAddr,
    dst: IpAddr,
    typ: u8,
    code: u8,
    rest: [u8; 4],
    quoted: &[u8],
) -> Vec<u8> {
    ip(
        src,
        dst,
        &L4::Icmp {
            typ,
            code,
            rest,
            data: quoted.to_vec(),
        },
    )
}

#[test]
fn test_icmp_frag_needed_from_backend_side_reaches_client() {
    let (engine, mut w) = engine();
    let lport = establish(&mut w);
    // The node sent LIP → RS a 1400-byte segment; a router on the backend side answers
    // "fragmentation needed, MTU 1280" quoting its header and 8 bytes (RFC 792 minimum) — and a
    // longer quote (RFC 1812) in a second case.
    let big = ip(
        v4(LIP),
        v4(RS1),
        &tcp(lport, 8080, ACK, 1001, 5001, &[7u8; 1400]),
    );
    for quote_len in [28, 548] {
        let mtu = [0, 0, 0x05, 0x00];
        let err = icmp4_error(v4(ROUTER), v4(LIP), 3, 4, mtu, &big[..quote_len]);
        let (v, out) = run(&mut w, T0, &err);
        assert_eq!(v, Verdict::Forward(Direction::Outbound));
        // What the client sent, as the client sees it: client → VIP.
        let original = ip(
            v4(CLIENT),
            v4(VIP),
            &tcp(40000, 80, ACK, 1001, 5001, &[7u8; 1400]),
        );
        let mut expected_quote = original[..quote_len].to_vec();
        if quote_len < 20 + 18 {
            // The quoted TCP checksum is not in an 8-byte quote; nothing to compare there.
            expected_quote.truncate(quote_len);
        }
        let expected = icmp4_error(v4(VIP), v4(CLIENT), 3, 4, mtu, &expected_quote);
        assert_eq!(out, expected, "quote of {quote_len} bytes");
        assert_checksums_ok(&out);
    }
    assert_eq!(engine.counters().events(Event::IcmpTranslated), 2);
}

#[test]
fn test_icmp_error_from_client_side_reaches_backend() {
    let (_, mut w) = engine();
    let lport = establish(&mut w);
    let reply = ip(
        v4(VIP),
        v4(CLIENT),
        &tcp(80, 40000, ACK, 5001, 1001, &[1u8; 600]),
    );
    let err = icmp4_error(v4(CLIENT), v4(VIP), 3, 4, [0, 0, 0x02, 0x40], &reply[..60]);
    let (v, out) = run(&mut w, T0, &err);
    assert_eq!(v, Verdict::Forward(Direction::Inbound));
    let original = ip(
        v4(RS1),
        v4(LIP),
        &tcp(8080, lport, ACK, 5001, 1001, &[1u8; 600]),
    );
    assert_eq!(
        out,
        icmp4_error(v4(LIP), v4(RS1), 3, 4, [0, 0, 0x02, 0x40], &original[..60])
    );
    assert_checksums_ok(&out);
}

#[test]
fn test_icmp_error_unknown_flow_dropped() {
    let (engine, mut w) = engine();
    establish(&mut w);
    let stranger = ip(v4(LIP), v4(RS1), &tcp(9999, 8080, ACK, 1, 1, b""));
    let err = icmp4_error(v4(ROUTER), v4(LIP), 3, 4, [0, 0, 5, 0], &stranger[..28]);
    assert_eq!(
        run(&mut w, T0, &err).0,
        Verdict::Drop(DropReason::IcmpNoSession)
    );
    // An echo reply is no error (echo requests to a VIP are answered: tests/echo.rs).
    let echo = ip(
        v4(CLIENT),
        v4(VIP),
        &L4::Icmp {
            typ: 0,
            code: 0,
            rest: [0, 1, 0, 1],
            data: b"ping".to_vec(),
        },
    );
    assert_eq!(
        run(&mut w, T0, &echo).0,
        Verdict::Drop(DropReason::IcmpUnsupported)
    );
    assert_eq!(engine.counters().drops(DropReason::IcmpNoSession), 1);
}

#[test]
fn test_icmpv6_packet_too_big_translated() {
    let (_, mut w) = engine();
    let syn = ip(v6(CLIENT6), v6(VIP6), &tcp(40000, 80, SYN, 1000, 0, b""));
    run(&mut w, T0, &syn);
    let lport = created(&mut w).local.port();
    let big = ip(
        v6(LIP6),
        v6(RS6),
        &tcp(lport, 8080, ACK, 1001, 1, &[3u8; 1400]),
    );
    let router6 = "2001:db8:3::1".parse().unwrap();
    let err = ip(
        router6,
        v6(LIP6),
        &L4::Icmp {
            typ: 2,
            code: 0,
            rest: 1280u32.to_be_bytes(),
            data: big[..1232].to_vec(),
        },
    );
    let (v, out) = run(&mut w, T0, &err);
    assert_eq!(v, Verdict::Forward(Direction::Outbound));
    let original = ip(
        v6(CLIENT6),
        v6(VIP6),
        &tcp(40000, 80, ACK, 1001, 1, &[3u8; 1400]),
    );
    let expected = ip(
        v6(VIP6),
        v6(CLIENT6),
        &L4::Icmp {
            typ: 2,
            code: 0,
            rest: 1280u32.to_be_bytes(),
            data: original[..1232].to_vec(),
        },
    );
    assert_eq!(out, expected);
    assert_checksums_ok(&out);
}

#[test]
fn test_ipv4_options_dropped() {
    let (_, mut w) = engine();
    let p = ip(v4(CLIENT), v4(VIP), &tcp(40000, 80, SYN, 1, 0, b""));
    // Insert a 4-byte option (NOP NOP NOP EOL) into the header: IHL 6.
    let mut q = p[..20].to_vec();
    q.extend_from_slice(&[1, 1, 1, 0]);
    q.extend_from_slice(&p[20..]);
    q[0] = 0x46;
    let total = q.len() as u16;
    q[2..4].copy_from_slice(&total.to_be_bytes());
    q[10..12].copy_from_slice(&[0, 0]);
    let c = !fold(sum16(&q[..24]));
    q[10..12].copy_from_slice(&c.to_be_bytes());
    assert_eq!(run(&mut w, T0, &q).0, Verdict::Drop(DropReason::IpOptions));
}

fn refill_ipv4_checksum(p: &mut [u8]) {
    p[10..12].copy_from_slice(&[0, 0]);
    let c = !fold(sum16(&p[..20]));
    p[10..12].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn test_fragments_without_their_first_are_dropped() {
    // More in tests/fragments.rs.
    let (engine, mut w) = engine();
    let p = ip(v4(CLIENT), v4(VIP), &udp(5000, 53, b"q"));
    let mut later = p.clone();
    later[6] = 0x00;
    later[7] = 0x10; // offset 128 bytes
    refill_ipv4_checksum(&mut later);
    assert_eq!(
        run(&mut w, T0, &later).0,
        Verdict::Drop(DropReason::FragmentUntracked)
    );
    // IPv6 fragment header before UDP, offset 8, more to come.
    let body = {
        let (_, u) = (17u8, ip(v6(CLIENT6), v6(VIP6), &udp(5000, 53, b"q")));
        u[40..].to_vec()
    };
    let mut frag = vec![17, 0, 0, 9, 0, 0, 0, 42];
    frag.extend_from_slice(&body);
    let p6 = ip_raw(v6(CLIENT6), v6(VIP6), 44, &frag);
    assert_eq!(
        run(&mut w, T0, &p6).0,
        Verdict::Drop(DropReason::FragmentUntracked)
    );
    assert_eq!(engine.counters().drops(DropReason::FragmentUntracked), 2);
}

#[test]
fn test_truncation_at_every_boundary() {
    let (engine, mut w) = engine();
    let packets = [
        ip(v4(CLIENT), v4(VIP), &tcp(40000, 80, SYN, 1, 0, b"")),
        ip(v4(CLIENT), v4(VIP), &udp(5000, 53, b"q")),
        ip(v6(CLIENT6), v6(VIP6), &tcp(40000, 80, SYN, 1, 0, b"")),
    ];
    for p in &packets {
        for cut in 0..p.len() {
            let (v, _) = run(&mut w, T0, &p[..cut]);
            assert_eq!(
                v,
                Verdict::Drop(DropReason::Truncated),
                "cut at {cut} of {}",
                p.len()
            );
        }
    }
    assert_eq!(engine.session_count(), 0);
}

#[test]
fn test_bad_header_fields() {
    let (_, mut w) = engine();
    let good = ip(v4(CLIENT), v4(VIP), &tcp(40000, 80, SYN, 1, 0, b""));
    // IHL below 5.
    let mut p = good.clone();
    p[0] = 0x44;
    assert_eq!(run(&mut w, T0, &p).0, Verdict::Drop(DropReason::Malformed));
    // Total length shorter than the header.
    let mut p = good.clone();
    p[2..4].copy_from_slice(&16u16.to_be_bytes());
    refill_ipv4_checksum(&mut p);
    assert_eq!(run(&mut w, T0, &p).0, Verdict::Drop(DropReason::Malformed));
    // Total length longer than the buffer.
    let mut p = good.clone();
    p[2..4].copy_from_slice(&200u16.to_be_bytes());
    refill_ipv4_checksum(&mut p);
    assert_eq!(run(&mut w, T0, &p).0, Verdict::Drop(DropReason::Truncated));
    // TCP data offset below 5.
    let mut p = good.clone();
    p[32] = 0x40;
    assert_eq!(run(&mut w, T0, &p).0, Verdict::Drop(DropReason::Malformed));
    // IP version 5.
    let mut p = good.clone();
    p[0] = 0x55;
    assert_eq!(run(&mut w, T0, &p).0, Verdict::Drop(DropReason::Malformed));
    // Bad IPv4 header checksum, bad TCP checksum on a SYN.
    let mut p = good.clone();
    p[8] = 63;
    assert_eq!(
        run(&mut w, T0, &p).0,
        Verdict::Drop(DropReason::BadChecksum)
    );
    let mut p = good.clone();
    p[36] ^= 0x55;
    assert_eq!(
        run(&mut w, T0, &p).0,
        Verdict::Drop(DropReason::BadChecksum)
    );
}

#[test]
fn test_ipv6_extension_header_before_tcp() {
    let (_, mut w) = engine();
    let tcp_bytes = ip(v6(CLIENT6), v6(VIP6), &tcp(40000, 80, SYN, 77, 0, b""))[40..].to_vec();
    // Hop-by-hop (8 bytes: next=60) then destination options (8 bytes: next=TCP).
    let mut body = vec![60, 0, 1, 4, 0, 0, 0, 0, 6, 0, 1, 4, 0, 0, 0, 0];
    body.extend_from_slice(&tcp_bytes);
    let p = ip_raw(v6(CLIENT6), v6(VIP6), 0, &body);
    let (v, out) = run(&mut w, T0, &p);
    assert_eq!(v, Verdict::Forward(Direction::Inbound));
    let lport = created(&mut w).local.port();
    let expected_tcp = ip(v6(LIP6), v6(RS6), &tcp(lport, 8080, SYN, 77, 0, b""))[40..].to_vec();
    let mut expected_body = body[..16].to_vec();
    expected_body.extend_from_slice(&expected_tcp);
    assert_eq!(out, ip_raw(v6(LIP6), v6(RS6), 0, &expected_body));
    assert_checksums_ok(&out);
}

fn toa_engine() -> (std::sync::Arc<dataplane::Engine>, dataplane::Worker) {
    let mut s = services();
    s[0].toa = true;
    s[2].toa = true;
    engine_with(&s, small_config())
}

#[test]
fn test_toa_inserted_ipv4_and_ipv6() {
    let (engine, mut w) = toa_engine();
    let mss = vec![2, 4, 0x05, 0xb4];
    let syn = ip(v4(CLIENT), v4(VIP), &tcp_opts(40000, 80, SYN, 9, 0, &mss));
    let (v, out) = run(&mut w, T0, &syn);
    assert_eq!(v, Verdict::Forward(Direction::Inbound));
    let lport = created(&mut w).local.port();
    let mut opts = mss.clone();
    opts.extend_from_slice(&[254, 8]);
    opts.extend_from_slice(&40000u16.to_be_bytes());
    opts.extend_from_slice(&CLIENT.octets());
    let expected = ip(v4(LIP), v4(RS1), &tcp_opts(lport, 8080, SYN, 9, 0, &opts));
    assert_eq!(out, expected);
    assert_checksums_ok(&out);

    let syn6 = ip(v6(CLIENT6), v6(VIP6), &tcp_opts(40000, 80, SYN, 9, 0, &mss));
    let (_, out) = run(&mut w, T0, &syn6);
    let lport = created(&mut w).local.port();
    let mut opts = mss;
    opts.extend_from_slice(&[254, 20]);
    opts.extend_from_slice(&40000u16.to_be_bytes());
    opts.extend_from_slice(&CLIENT6.octets());
    let expected = ip(v6(LIP6), v6(RS6), &tcp_opts(lport, 8080, SYN, 9, 0, &opts));
    assert_eq!(out, expected);
    assert_checksums_ok(&out);
    assert_eq!(engine.counters().events(Event::ToaInserted), 2);
}

#[test]
fn test_toa_without_room() {
    let (engine, mut w) = toa_engine();
    // 36 bytes of options (MSS, SACK-permitted, timestamps, window scale, NOPs): 56-byte header.
    let mut opts = vec![
        2, 4, 5, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
    ];
    opts.extend_from_slice(&[1; 16]);
    let syn = ip(v4(CLIENT), v4(VIP), &tcp_opts(40000, 80, SYN, 9, 0, &opts));
    let (v, out) = run(&mut w, T0, &syn);
    assert_eq!(v, Verdict::Forward(Direction::Inbound));
    let lport = created(&mut w).local.port();
    let expected = ip(v4(LIP), v4(RS1), &tcp_opts(lport, 8080, SYN, 9, 0, &opts));
    assert_eq!(out, expected);
    assert_eq!(engine.counters().events(Event::ToaNoRoom), 1);
    assert_eq!(engine.counters().events(Event::ToaInserted), 0);
}

/// A table full of established flows refuses a new one (there is no embryonic flow to evict:
/// see `pressure.rs`).
#[test]
fn test_table_full_refuses_new_flows_established_carry_on() {
    let config = EngineConfig {
        max_sessions_v4: 2,
        ..small_config()
    };
    let (engine, mut w) = engine_with(&services(), config);
    let mut lports = Vec::new();
    for cport in [40000, 40001] {
        lports.push(handshake(&mut w, T0, cport).local.port());
    }
    let third = ip(v4(CLIENT), v4(VIP), &tcp(40002, 80, SYN, 1, 0, b""));
    assert_eq!(
        run(&mut w, T0, &third).0,
        Verdict::Drop(DropReason::TableFull)
    );
    // The two existing flows still pass both ways.
    let (v, _) = run(
        &mut w,
        T0,
        &ip(
            v4(RS1),
            v4(LIP),
            &tcp(8080, lports[1], ACK, 5001, 1001, b"x"),
        ),
    );
    assert_eq!(v, Verdict::Forward(Direction::Outbound));
    let (v, _) = run(
        &mut w,
        T0,
        &ip(v4(CLIENT), v4(VIP), &tcp(40000, 80, ACK, 1001, 5001, b"y")),
    );
    assert_eq!(v, Verdict::Forward(Direction::Inbound));
    assert_eq!(engine.counters().drops(DropReason::TableFull), 1);
    // The refused flow left no port behind.
    let tcp_usage = engine
        .local_addrs()
        .usage()
        .into_iter()
        .find(|u| u.ip == v4(LIP) && u.proto == L4Proto::Tcp)
        .unwrap();
    assert_eq!(tcp_usage.in_use, 2);
}

/// Every port held by an established flow: a new flow is refused.
#[test]
fn test_ports_exhausted() {
    let config = EngineConfig {
        local_ports: 2000..=2001,
        ..small_config()
    };
    let (engine, mut w) = engine_with(&services(), config);
    for cport in [40000, 40001] {
        handshake(&mut w, T0, cport);
    }
    let third = ip(v4(CLIENT), v4(VIP), &tcp(40002, 80, SYN, 1, 0, b""));
    assert_eq!(
        run(&mut w, T0, &third).0,
        Verdict::Drop(DropReason::NoLocalPort)
    );
    assert_eq!(engine.counters().drops(DropReason::NoLocalPort), 1);
    assert_eq!(engine.session_count(), 2);
}

#[test]
fn test_expiry_frees_session_and_port() {
    let (engine, mut w) = engine();
    open_tcp(&mut w);
    // SYN_RECV times out after 60 s.
    assert_eq!(
        w.expire(T0.saturating_add(std::time::Duration::from_secs(59)), 1024),
        0
    );
    assert_eq!(engine.session_count(), 1);
    assert_eq!(
        w.expire(T0.saturating_add(std::time::Duration::from_secs(61)), 1024),
        1
    );
    assert_eq!(engine.session_count(), 0);
    assert!(
        w.drain_events()
            .any(|e| matches!(e, SessionEvent::Closed(_)))
    );
    assert!(engine.local_addrs().usage().iter().all(|u| u.in_use == 0));
    // The flow is gone: a non-SYN is now dropped.
    let p = ip(v4(CLIENT), v4(VIP), &tcp(40000, 80, ACK, 1001, 1, b""));
    assert_eq!(run(&mut w, T0, &p).0, Verdict::Drop(DropReason::NoSession));
}

#[test]
fn test_expiry_bounded_per_call() {
    let (engine, mut w) = engine();
    for cport in 0..100u16 {
        run(
            &mut w,
            T0,
            &ip(v4(CLIENT), v4(VIP), &udp(10000 + cport, 53, b"q")),
        );
    }
    let later = T0.saturating_add(std::time::Duration::from_secs(301));
    let first = w.expire(later, 16);
    assert!(first <= 16);
    let mut total = first;
    for _ in 0..200 {
        total += w.expire(later, 16);
    }
    assert_eq!(total, 100);
    assert_eq!(engine.session_count(), 0);
}

#[test]
fn test_partial_checksum_offload() {
    let (_, mut w) = engine();
    let lport = establish(&mut w);
    // A 60 KB GSO segment from the real server with the pseudo-header sum in the field.
    let payload = vec![0x42u8; 60_000];
    let mut p = ip(
        v4(RS1),
        v4(LIP),
        &tcp(8080, lport, ACK, 5001, 1001, &payload),
    );
    let l4_len = p.len() - 20;
    p[36..38].copy_from_slice(&partial_sum(v4(RS1), v4(LIP), 6, l4_len).to_be_bytes());
    let (v, out) = run_with(&mut w, T0, &p, L4Checksum::Partial);
    assert_eq!(v, Verdict::Forward(Direction::Outbound));
    assert_eq!(
        &out[36..38],
        &partial_sum(v4(VIP), v4(CLIENT), 6, l4_len).to_be_bytes()
    );
    // Completing the sum as the kernel would gives a valid segment.
    let mut done = out.clone();
    let c = !fold(
        u32::from(partial_sum(v4(VIP), v4(CLIENT), 6, l4_len))
            + sum16(&{
                let mut seg = done[20..].to_vec();
                seg[16..18].copy_from_slice(&[0, 0]);
                seg
            }),
    );
    done[36..38].copy_from_slice(&c.to_be_bytes());
    assert_checksums_ok(&done);
    assert_eq!(
        &done[..36],
        &ip(
            v4(VIP),
            v4(CLIENT),
            &tcp(80, 40000, ACK, 5001, 1001, &payload)
        )[..36]
    );
}

#[test]
fn test_session_record_installed_on_another_node_carries_the_flow() {
    let (a, mut wa) = engine();
    let lport = establish(&mut wa);
    let rec = a.sessions(T0)[0];
    // Node B has the same services but its own LIP; the record names A's LIP.
    let config_b = EngineConfig {
        local_addrs: vec!["198.19.200.2".parse().unwrap()],
        ..small_config()
    };
    let (b, mut wb) = engine_with(&services(), config_b);
    let owner = dataplane::Authority::Owner { mark: 1 };
    assert_eq!(b.install(T0, &rec, owner), Ok(dataplane::Installed::New));
    assert_eq!(
        b.install(T0, &rec, owner),
        Ok(dataplane::Installed::Updated)
    );
    let data = ip(
        v4(CLIENT),
        v4(VIP),
        &tcp(40000, 80, ACK, 1001, 5001, b"more"),
    );
    let (va, out_a) = run(&mut wa, T0, &data);
    let (vb, out_b) = run(&mut wb, T0, &data);
    assert_eq!(
        (va, vb),
        (
            Verdict::Forward(Direction::Inbound),
            Verdict::Forward(Direction::Inbound)
        )
    );
    assert_eq!(out_a, out_b, "same LIP:port and backend on both nodes");
    let back = ip(v4(RS1), v4(LIP), &tcp(8080, lport, ACK, 5001, 1005, b"ok"));
    assert_eq!(run(&mut wa, T0, &back).1, run(&mut wb, T0, &back).1);
    assert!(b.sessions(T0)[0].synced);
    assert_eq!(b.remove(&rec), Ok(true));
    assert_eq!(b.session_count(), 0);
}

/// Two backends behind an rr service, a flow opened on RS1, then `change` applied to the
/// configuration: new flows must all go to RS2. Returns the worker and the RS1 flow.
fn rs1_flow_then_only_rs2(
    change: impl FnOnce(&mut dataplane::ServiceConfig),
) -> (dataplane::Worker, dataplane::SessionRecord) {
    let two = vec![service(
        v4(VIP),
        80,
        L4Proto::Tcp,
        vec![backend(v4(RS1), 8080, 1), backend(v4(RS2), 8080, 1)],
    )];
    let (engine, mut w) = engine_with(&two, small_config());
    let mut on_rs1 = None;
    for cport in 40000..40004 {
        run(
            &mut w,
            T0,
            &ip(v4(CLIENT), v4(VIP), &tcp(cport, 80, SYN, 1, 0, b"")),
        );
        let rec = created(&mut w);
        if rec.backend.ip() == v4(RS1) {
            on_rs1 = Some(rec);
        }
    }
    let rec = on_rs1.expect("rr used RS1");
    let mut changed = two.clone();
    change(&mut changed[0]);
    let snap = dataplane::Snapshot::new(2, &changed, Default::default(), Some(&engine.snapshot()))
        .unwrap();
    engine.set_snapshot(snap);
    for cport in 41000..41010 {
        run(
            &mut w,
            T0,
            &ip(v4(CLIENT), v4(VIP), &tcp(cport, 80, SYN, 1, 0, b"")),
        );
        assert_eq!(created(&mut w).backend.ip(), v4(RS2));
    }
    (w, rec)
}

#[test]
fn test_weight_zero_takes_no_new_flows_but_keeps_sessions() {
    let (mut w, rec) = rs1_flow_then_only_rs2(|svc| svc.backends[0].weight = 0);
    // The old flow on RS1 still goes to RS1.
    let data = ip(
        v4(CLIENT),
        v4(VIP),
        &tcp(rec.client.port(), 80, ACK, 2, 1, b"x"),
    );
    let (v, out) = run(&mut w, T0, &data);
    assert_eq!(v, Verdict::Forward(Direction::Inbound));
    assert_eq!(&out[16..20], &RS1.octets());
}

/// A backend deleted from the configuration takes no new flows; its sessions end naturally:
/// they keep going to it, both ways, until they close or expire.
#[test]
fn test_removed_backend_keeps_its_sessions_until_they_end() {
    let (mut w, rec) = rs1_flow_then_only_rs2(|svc| {
        svc.backends.remove(0);
    });
    let data = ip(
        v4(CLIENT),
        v4(VIP),
        &tcp(rec.client.port(), 80, ACK, 2, 1, b"x"),
    );
    let (v, out) = run(&mut w, T0, &data);
    assert_eq!(v, Verdict::Forward(Direction::Inbound));
    assert_eq!(&out[16..20], &RS1.octets());
    let reply = ip(
        v4(RS1),
        rec.local.ip(),
        &tcp(8080, rec.local.port(), ACK, 1, 3, b"y"),
    );
    let (v, out) = run(&mut w, T0, &reply);
    assert_eq!(v, Verdict::Forward(Direction::Outbound));
    assert_eq!(&out[12..16], &VIP.octets());
}

#[test]
fn test_no_backend() {
    let (_, mut w) = engine_with(
        &[service(
            v4(VIP),
            80,
            L4Proto::Tcp,
            vec![backend(v4(RS1), 8080, 0)],
        )],
        small_config(),
    );
    let syn = ip(v4(CLIENT), v4(VIP), &tcp(40000, 80, SYN, 1, 0, b""));
    assert_eq!(
        run(&mut w, T0, &syn).0,
        Verdict::Drop(DropReason::NoBackend)
    );
}

const LIP_B: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 19, 200, 2);

/// Ports held per IPv4 LIP for TCP, as the engine reports them now.
fn tcp_ports_in_use(engine: &dataplane::Engine) -> Vec<(IpAddr, u32)> {
    engine
        .local_addrs()
        .usage()
        .into_iter()
        .filter(|u| u.proto == L4Proto::Tcp && u.ip.is_ipv4())
        .map(|u| (u.ip, u.in_use))
        .collect()
}

/// One data segment each way of the flow `establish` opened: both are still translated.
fn assert_flow_carries_on(w: &mut dataplane::Worker, lport: u16) {
    let (v, out) = run(
        w,
        T0,
        &ip(v4(CLIENT), v4(VIP), &tcp(40000, 80, ACK, 1001, 5001, b"q")),
    );
    assert_eq!(v, Verdict::Forward(Direction::Inbound));
    assert_eq!(
        out,
        ip(v4(LIP), v4(RS1), &tcp(lport, 8080, ACK, 1001, 5001, b"q"))
    );
    let (v, out) = run(
        w,
        T0,
        &ip(v4(RS1), v4(LIP), &tcp(8080, lport, ACK, 5001, 1002, b"r")),
    );
    assert_eq!(v, Verdict::Forward(Direction::Outbound));
    assert_eq!(
        out,
        ip(v4(VIP), v4(CLIENT), &tcp(80, 40000, ACK, 5001, 1002, b"r"))
    );
}

#[test]
fn test_flow_outlives_the_removal_of_its_lip() {
    let (engine, mut w) = engine();
    let lport = establish(&mut w);

    engine.set_local_addrs(&[v4(LIP), v4(LIP_B)]).unwrap();
    assert_flow_carries_on(&mut w, lport);
    assert_eq!(tcp_ports_in_use(&engine), [(v4(LIP), 1), (v4(LIP_B), 0)]);

    engine.set_local_addrs(&[v4(LIP_B)]).unwrap();
    assert_eq!(engine.local_addrs().lips().collect::<Vec<_>>(), [v4(LIP_B)]);
    assert_flow_carries_on(&mut w, lport);
    w.drain_events().for_each(drop);
    // New flows only get the remaining LIP, IPv6 ones none at all.
    for cport in 41000..41020 {
        let syn = ip(v4(CLIENT), v4(VIP), &tcp(cport, 80, SYN, 1, 0, b""));
        let (v, out) = run(&mut w, T0, &syn);
        assert_eq!(v, Verdict::Forward(Direction::Inbound));
        assert_eq!(out[12..16], LIP_B.octets());
        assert_eq!(created(&mut w).local.ip(), v4(LIP_B));
    }
    let syn6 = ip(v6(CLIENT6), v6(VIP6), &tcp(41000, 80, SYN, 1, 0, b""));
    assert_eq!(
        run(&mut w, T0, &syn6).0,
        Verdict::Drop(DropReason::NoLocalPort)
    );
    assert_eq!(tcp_ports_in_use(&engine), [(v4(LIP_B), 20)]);

    // The old flow closes; its port goes back to the retired LIP, none of B's is touched.
    let (v, _) = run(
        &mut w,
        T0,
        &ip(v4(RS1), v4(LIP), &tcp(8080, lport, RST, 5001, 0, b"")),
    );
    assert_eq!(v, Verdict::Forward(Direction::Outbound));
    let later = T0.saturating_add(std::time::Duration::from_secs(11));
    assert_eq!(w.expire(later, 1024), 1);
    assert!(
        w.drain_events()
            .any(|e| matches!(e, SessionEvent::Closed(r) if r.local.ip() == v4(LIP)))
    );
    assert_eq!(engine.session_count(), 20);
    assert_eq!(tcp_ports_in_use(&engine), [(v4(LIP_B), 20)]);
    // Back again, the old LIP has every port free.
    engine.set_local_addrs(&[v4(LIP), v4(LIP_B)]).unwrap();
    assert_eq!(tcp_ports_in_use(&engine), [(v4(LIP), 0), (v4(LIP_B), 20)]);
}

#[test]
fn test_lip_change_never_hands_out_a_held_port() {
    let config = EngineConfig {
        local_ports: 2000..=2000,
        local_addrs: vec![v4(LIP)],
        ..small_config()
    };
    let (engine, mut w) = engine_with(&services(), config);
    let syn = |cport| ip(v4(CLIENT), v4(VIP), &tcp(cport, 80, SYN, 1, 0, b""));
    // Established, so that no new flow may evict it.
    assert_eq!(
        handshake(&mut w, T0, 40000).local,
        SocketAddr::new(v4(LIP), 2000)
    );

    // The same list again, then A with B: A's only port stays taken.
    engine.set_local_addrs(&[v4(LIP)]).unwrap();
    assert_eq!(
        run(&mut w, T0, &syn(40001)).0,
        Verdict::Drop(DropReason::NoLocalPort)
    );
    engine.set_local_addrs(&[v4(LIP_B), v4(LIP)]).unwrap();
    assert_eq!(
        handshake(&mut w, T0, 40002).local,
        SocketAddr::new(v4(LIP_B), 2000)
    );
    assert_eq!(
        run(&mut w, T0, &syn(40003)).0,
        Verdict::Drop(DropReason::NoLocalPort)
    );

    // A removed and added back while its flow lives: its port is still taken.
    engine.set_local_addrs(&[]).unwrap();
    engine.set_local_addrs(&[v4(LIP), v4(LIP_B)]).unwrap();
    assert_eq!(
        run(&mut w, T0, &syn(40004)).0,
        Verdict::Drop(DropReason::NoLocalPort)
    );
    assert_eq!(tcp_ports_in_use(&engine), [(v4(LIP), 1), (v4(LIP_B), 1)]);
    assert_eq!(engine.counters().drops(DropReason::NoLocalPort), 3);
}

#[test]
fn test_invalid_lip_list_changes_nothing() {
    use dataplane::laddr::LocalAddrError;
    let (engine, mut w) = engine();
    let lport = establish(&mut w);
    let before = engine.local_addrs().lips().collect::<Vec<_>>();
    assert_eq!(
        engine.set_local_addrs(&[v4(LIP_B), v4(LIP_B)]),
        Err(LocalAddrError::DuplicateLip(v4(LIP_B)))
    );
    let unspecified = IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED);
    assert_eq!(
        engine.set_local_addrs(&[v4(LIP_B), unspecified]),
        Err(LocalAddrError::UnspecifiedLip(unspecified))
    );
    assert_eq!(engine.local_addrs().lips().collect::<Vec<_>>(), before);
    assert_eq!(tcp_ports_in_use(&engine), [(v4(LIP), 1)]);
    assert_flow_carries_on(&mut w, lport);
}

#[test]
fn test_no_lips_drops_new_flows_and_keeps_old_ones() {
    let (engine, mut w) = engine();
    let lport = establish(&mut w);
    engine.set_local_addrs(&[]).unwrap();
    assert_eq!(engine.local_addrs().lips().count(), 0);
    let syn = ip(v4(CLIENT), v4(VIP), &tcp(41000, 80, SYN, 1, 0, b""));
    assert_eq!(
        run(&mut w, T0, &syn).0,
        Verdict::Drop(DropReason::NoLocalPort)
    );
    assert_flow_carries_on(&mut w, lport);
}

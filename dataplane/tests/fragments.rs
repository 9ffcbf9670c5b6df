//! Golden packet tests of fragments (see the engine's `frag` module): a first fragment is
//! translated like its flow's packets and may open the flow, later fragments follow its
//! translation, in both directions and both families; fragments before their first, after
//! their entry expired, too many datagrams at once, and fragments of what is not TCP or UDP are
//! dropped and counted. Expected fragments are cut, by the test's own code, from the whole
//! translated datagram the test-side builder makes with fully recomputed checksums: a byte-exact
//! match proves the incremental L4 checksum update of the first fragment holds for the
//! reassembled datagram.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use dataplane::frag::{FRAG_SLOTS, FRAG_TIMEOUT};
use dataplane::{Direction, DropReason, Event, Instant, L4Proto, Verdict};

const T0: Instant = Instant::from_secs(1000);
const IDENT: u32 = 0x4242;
/// Fragment data per fragment: a 1500-byte MTU less the IPv4 header.
const CHUNK: usize = 1480;

fn v4(a: std::net::Ipv4Addr) -> IpAddr {
    a.into()
}

fn v6(a: std::net::Ipv6Addr) -> IpAddr {
    a.into()
}

/// A payload that shows where every byte went.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// Cuts a whole IPv4 packet (20-byte header) into fragments of `chunk` data bytes (a multiple
/// of 8) with identification `ident`, as a sender's kernel does: DF clear, MF on all but the
/// last, each header's checksum recomputed.
fn fragment_v4(packet: &[u8], chunk: usize, ident: u16) -> Vec<Vec<u8>> {
    assert_eq!(chunk % 8, 0);
    let (header, data) = packet.split_at(20);
    let pieces: Vec<&[u8]> = data.chunks(chunk).collect();
    pieces
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            let mut f = header.to_vec();
            f[2..4].copy_from_slice(&((20 + piece.len()) as u16).to_be_bytes());
            f[4..6].copy_from_slice(&ident.to_be_bytes());
            let more = if i + 1 < pieces.len() { 0x2000 } else { 0 };
            let off = ((i * chunk / 8) as u16) | more;
            f[6..8].copy_from_slice(&off.to_be_bytes());
            f[10..12].copy_from_slice(&[0, 0]);
            let c = !fold(sum16(&f));
            f[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(piece);
            f
        })
        .collect()
}

/// Cuts a whole IPv6 packet (no extension headers) into fragments of `chunk` data bytes with a
/// Fragment header (identification `ident`) after the fixed header.
fn fragment_v6(packet: &[u8], chunk: usize, ident: u32) -> Vec<Vec<u8>> {
    assert_eq!(chunk % 8, 0);
    let (header, data) = packet.split_at(40);
    let next = header[6];
    let pieces: Vec<&[u8]> = data.chunks(chunk).collect();
    pieces
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            let mut f = header.to_vec();
            f[4..6].copy_from_slice(&((8 + piece.len()) as u16).to_be_bytes());
            f[6] = 44;
            let more = u16::from(i + 1 < pieces.len());
            let off = ((i * chunk) as u16) | more;
            f.extend_from_slice(&[next, 0]);
            f.extend_from_slice(&off.to_be_bytes());
            f.extend_from_slice(&ident.to_be_bytes());
            f.extend_from_slice(piece);
            f
        })
        .collect()
}

/// Runs every fragment through the worker; each must be forwarded in `dir`. The fragments as
/// they leave.
fn forward_all(
    w: &mut dataplane::Worker,
    now: Instant,
    frags: &[Vec<u8>],
    dir: Direction,
) -> Vec<Vec<u8>> {
    frags
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let (v, out) = run(w, now, f);
            assert_eq!(v, Verdict::Forward(dir), "fragment {i}");
            out
        })
        .collect()
}

/// The usual services plus UDP on the IPv6 VIP.
fn engine6() -> (std::sync::Arc<dataplane::Engine>, dataplane::Worker) {
    let mut services = services();
    services.push(service(
        VIP6.into(),
        53,
        L4Proto::Udp,
        vec![backend(RS6.into(), 5353, 1)],
    ));
    engine_with(&services, small_config())
}

#[test]
fn test_v4_udp_fragments_open_a_flow_and_follow_both_ways() {
    let (engine, mut w) = engine();
    let request = payload(3000);
    let whole = ip(v4(CLIENT), v4(VIP), &udp(5000, 53, &request));
    let frags = fragment_v4(&whole, CHUNK, IDENT as u16);
    assert_eq!(frags.len(), 3);
    let out = forward_all(&mut w, T0, &frags, Direction::Inbound);
    // The first fragment opened the flow.
    let rec = created(&mut w);
    assert_eq!(rec.backend, SocketAddr::new(v4(RS1), 5353));
    let lport = rec.local.port();
    let expected = ip(v4(LIP), v4(RS1), &udp(lport, 5353, &request));
    assert_checksums_ok(&expected);
    assert_eq!(out, fragment_v4(&expected, CHUNK, IDENT as u16));
    // The real server's answer, fragmented by its kernel on a 1000-byte link.
    let answer = payload(2500);
    let reply = ip(v4(RS1), v4(LIP), &udp(5353, lport, &answer));
    let frags = fragment_v4(&reply, 976, 0x0777);
    assert_eq!(frags.len(), 3);
    let out = forward_all(&mut w, T0, &frags, Direction::Outbound);
    let expected = ip(v4(VIP), v4(CLIENT), &udp(53, 5000, &answer));
    assert_eq!(out, fragment_v4(&expected, 976, 0x0777));
    let c = engine.counters();
    assert_eq!(c.events(Event::FragmentsTracked), 2);
    assert_eq!(c.events(Event::FragmentsFollowed), 4);
    assert_eq!(c.events(Event::SessionsCreated), 1);
    assert_eq!(c.total_drops(), 0);
}

#[test]
fn test_v6_udp_fragments_open_a_flow_and_follow_both_ways() {
    let (engine, mut w) = engine6();
    let request = payload(3000);
    let whole = ip(v6(CLIENT6), v6(VIP6), &udp(5000, 53, &request));
    // 1500-byte MTU: 1448 data bytes after the fixed and the Fragment header.
    let frags = fragment_v6(&whole, 1448, 0xdead_beef);
    assert_eq!(frags.len(), 3);
    let out = forward_all(&mut w, T0, &frags, Direction::Inbound);
    let rec = created(&mut w);
    assert_eq!(rec.backend, SocketAddr::new(v6(RS6), 5353));
    let lport = rec.local.port();
    let expected = ip(v6(LIP6), v6(RS6), &udp(lport, 5353, &request));
    assert_checksums_ok(&expected);
    assert_eq!(out, fragment_v6(&expected, 1448, 0xdead_beef));
    // The answer on a 1280-byte path (IPv6's minimum MTU).
    let answer = payload(2500);
    let reply = ip(v6(RS6), v6(LIP6), &udp(5353, lport, &answer));
    let frags = fragment_v6(&reply, 1232, 7);
    let out = forward_all(&mut w, T0, &frags, Direction::Outbound);
    let expected = ip(v6(VIP6), v6(CLIENT6), &udp(53, 5000, &answer));
    assert_eq!(out, fragment_v6(&expected, 1232, 7));
    let c = engine.counters();
    assert_eq!(c.events(Event::FragmentsTracked), 2);
    assert_eq!(c.events(Event::FragmentsFollowed), 4);
    assert_eq!(c.total_drops(), 0);
}

#[test]
fn test_fragments_of_a_known_flow_use_its_session() {
    let (engine, mut w) = engine();
    // An unfragmented datagram opens the flow first.
    let (v, _) = run(
        &mut w,
        T0,
        &ip(v4(CLIENT), v4(VIP), &udp(5000, 53, b"hello")),
    );
    assert_eq!(v, Verdict::Forward(Direction::Inbound));
    let lport = created(&mut w).local.port();
    let big = payload(2000);
    let whole = ip(v4(CLIENT), v4(VIP), &udp(5000, 53, &big));
    let out = forward_all(
        &mut w,
        T0,
        &fragment_v4(&whole, CHUNK, 9),
        Direction::Inbound,
    );
    let expected = ip(v4(LIP), v4(RS1), &udp(lport, 5353, &big));
    assert_eq!(out, fragment_v4(&expected, CHUNK, 9));
    assert_eq!(engine.counters().events(Event::SessionsCreated), 1);
    assert_eq!(engine.session_count(), 1);
}

#[test]
fn test_tcp_segment_fragments_follow_an_established_flow() {
    let (engine, mut w) = engine();
    let rec = handshake(&mut w, T0, 40000);
    let data = payload(2000);
    let seg = ip(
        v4(CLIENT),
        v4(VIP),
        &tcp(40000, 80, ACK | PSH, 1001, 5001, &data),
    );
    let out = forward_all(
        &mut w,
        T0,
        &fragment_v4(&seg, CHUNK, 11),
        Direction::Inbound,
    );
    let expected = ip(
        v4(LIP),
        v4(RS1),
        &tcp(rec.local.port(), 8080, ACK | PSH, 1001, 5001, &data),
    );
    assert_eq!(out, fragment_v4(&expected, CHUNK, 11));
    assert_eq!(engine.counters().total_drops(), 0);
}

#[test]
fn test_fragment_before_its_first_is_dropped_and_counted() {
    let (engine, mut w) = engine();
    let whole = ip(v4(CLIENT), v4(VIP), &udp(5000, 53, &payload(3000)));
    let frags = fragment_v4(&whole, CHUNK, IDENT as u16);
    // The second fragment overtook the first: nothing says where it goes.
    assert_eq!(
        run(&mut w, T0, &frags[1]).0,
        Verdict::Drop(DropReason::FragmentUntracked)
    );
    // The first and the rest are forwarded.
    assert_eq!(
        run(&mut w, T0, &frags[0]).0,
        Verdict::Forward(Direction::Inbound)
    );
    assert_eq!(
        run(&mut w, T0, &frags[2]).0,
        Verdict::Forward(Direction::Inbound)
    );
    // A server-side fragment of no datagram the node saw.
    let stray = ip(v4(RS1), v4(LIP), &udp(5353, 2000, &payload(3000)));
    let stray = fragment_v4(&stray, CHUNK, 1);
    assert_eq!(
        run(&mut w, T0, &stray[2]).0,
        Verdict::Drop(DropReason::FragmentUntracked)
    );
    assert_eq!(engine.counters().drops(DropReason::FragmentUntracked), 2);
}

#[test]
fn test_fragment_after_its_entry_expired_is_dropped_and_counted() {
    let (engine, mut w) = engine6();
    let whole = ip(v6(CLIENT6), v6(VIP6), &udp(5000, 53, &payload(3000)));
    let frags = fragment_v6(&whole, 1448, 5);
    let (v, _) = run(&mut w, T0, &frags[0]);
    assert_eq!(v, Verdict::Forward(Direction::Inbound));
    let almost = T0.saturating_add(FRAG_TIMEOUT - Duration::from_millis(1));
    assert_eq!(
        run(&mut w, almost, &frags[1]).0,
        Verdict::Forward(Direction::Inbound)
    );
    let late = T0.saturating_add(FRAG_TIMEOUT);
    assert_eq!(
        run(&mut w, late, &frags[2]).0,
        Verdict::Drop(DropReason::FragmentExpired)
    );
    assert_eq!(engine.counters().drops(DropReason::FragmentExpired), 1);
}

#[test]
fn test_too_many_datagrams_in_flight_are_refused_and_counted() {
    let (engine, mut w) = engine();
    let whole = ip(v4(CLIENT), v4(VIP), &udp(5000, 53, &payload(3000)));
    let mut refused = 0;
    let tries = 2 * FRAG_SLOTS;
    for ident in 0..tries {
        let first = &fragment_v4(&whole, CHUNK, ident as u16)[0];
        match run(&mut w, T0, first).0 {
            Verdict::Forward(Direction::Inbound) => {}
            Verdict::Drop(DropReason::FragmentTableFull) => refused += 1,
            v => panic!("first fragment {ident}: {v:?}"),
        }
    }
    // Never more datagrams in flight than the table holds.
    assert!(refused >= tries - FRAG_SLOTS, "{refused} refused");
    let c = engine.counters();
    assert_eq!(c.drops(DropReason::FragmentTableFull), refused as u64);
    assert_eq!(c.events(Event::FragmentsTracked), (tries - refused) as u64);
    // Expired entries make room again.
    let later = T0.saturating_add(FRAG_TIMEOUT);
    let first = &fragment_v4(&whole, CHUNK, 0xffff)[0];
    assert_eq!(
        run(&mut w, later, first).0,
        Verdict::Forward(Direction::Inbound)
    );
}

#[test]
fn test_fragments_not_followed_are_dropped_and_counted() {
    let (engine, mut w) = engine();
    // A fragmented ping to the VIP: only TCP and UDP fragments are followed.
    let ping = ip(
        v4(CLIENT),
        v4(VIP),
        &L4::Icmp {
            typ: 8,
            code: 0,
            rest: [0, 1, 0, 1],
            data: payload(3000),
        },
    );
    let frags = fragment_v4(&ping, CHUNK, 3);
    assert_eq!(
        run(&mut w, T0, &frags[0]).0,
        Verdict::Drop(DropReason::Fragment)
    );
    assert_eq!(
        run(&mut w, T0, &frags[1]).0,
        Verdict::Drop(DropReason::Fragment)
    );
    // A first fragment too short for the TCP header.
    let seg = ip(
        v4(CLIENT),
        v4(VIP),
        &tcp(40000, 80, ACK, 1, 1, &payload(100)),
    );
    let frags = fragment_v4(&seg, 8, 4);
    assert_eq!(
        run(&mut w, T0, &frags[0]).0,
        Verdict::Drop(DropReason::Fragment)
    );
    assert_eq!(engine.counters().drops(DropReason::Fragment), 3);
    // A datagram ending past 65,535 bytes.
    let whole = ip(v4(CLIENT), v4(VIP), &udp(5000, 53, &payload(3000)));
    let frags = fragment_v4(&whole, CHUNK, 6);
    assert_eq!(
        run(&mut w, T0, &frags[0]).0,
        Verdict::Forward(Direction::Inbound)
    );
    let mut huge = frags[2].clone();
    huge[6..8].copy_from_slice(&(65_528u16 / 8).to_be_bytes());
    huge[10..12].copy_from_slice(&[0, 0]);
    let c = !fold(sum16(&huge[..20]));
    huge[10..12].copy_from_slice(&c.to_be_bytes());
    assert_eq!(
        run(&mut w, T0, &huge).0,
        Verdict::Drop(DropReason::Malformed)
    );
}

#[test]
fn test_atomic_v6_fragment_is_a_whole_datagram() {
    let (_, mut w) = engine6();
    let whole = ip(v6(CLIENT6), v6(VIP6), &udp(5000, 53, b"atomic"));
    let frags = fragment_v6(&whole, 1448, 8);
    assert_eq!(frags.len(), 1, "offset 0, no more fragments");
    let (v, out) = run(&mut w, T0, &frags[0]);
    assert_eq!(v, Verdict::Forward(Direction::Inbound));
    let lport = created(&mut w).local.port();
    let expected = ip(v6(LIP6), v6(RS6), &udp(lport, 5353, b"atomic"));
    assert_eq!(out, fragment_v6(&expected, 1448, 8)[0]);
}

#[test]
fn test_packet_too_big_quoting_a_first_fragment_is_translated() {
    // The client's fragments are too big for a path behind the node: the router there says so
    // to the LIP, quoting the translated first fragment; the client must hear it about its own.
    let (engine, mut w) = engine6();
    let request = payload(3000);
    let whole = ip(v6(CLIENT6), v6(VIP6), &udp(5000, 53, &request));
    let frags = fragment_v6(&whole, 1448, 21);
    let out = forward_all(&mut w, T0, &frags, Direction::Inbound);
    let router6: IpAddr = "2001:db8:3::1".parse().unwrap();
    let too_big = |quoted: &[u8], src: IpAddr, dst: IpAddr| {
        ip(
            src,
            dst,
            &L4::Icmp {
                typ: 2,
                code: 0,
                rest: 1280u32.to_be_bytes(),
                data: quoted[..1232].to_vec(),
            },
        )
    };
    let (v, translated) = run(&mut w, T0, &too_big(&out[0], router6, v6(LIP6)));
    assert_eq!(v, Verdict::Forward(Direction::Outbound));
    assert_eq!(translated, too_big(&frags[0], v6(VIP6), v6(CLIENT6)));
    assert_checksums_ok(&translated);
    // About a later fragment (no ports to find the flow by): not translated, counted.
    assert_eq!(
        run(&mut w, T0, &too_big(&out[1], router6, v6(LIP6))).0,
        Verdict::Drop(DropReason::IcmpUnsupported)
    );
    assert_eq!(engine.counters().events(Event::IcmpTranslated), 1);
}

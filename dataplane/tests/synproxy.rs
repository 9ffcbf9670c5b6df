//! Golden packets of the SYN proxy (`dataplane::synproxy`): the cookie SYN-ACK, the ACK that
//! proves it and becomes the proxy's SYN, the real server's SYN-ACK that joins the halves, the
//! sequence shift both ways (SACK blocks, rescaled windows, ICMP quotes), held data, refusals and
//! retries, `auto`, and a joined flow carried on by another node from its session record.
//! Expected packets are built whole by the test-side builder, so a byte-exact match also proves
//! every checksum.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use common::*;
use dataplane::{
    Authority, Direction, DropReason, EngineConfig, Event, FlowState, Instant, L4Proto,
    SessionEvent, SynProxy, TcpState, Verdict,
};

const T0: Instant = Instant::from_secs(6400);
const ISN: u32 = 1_000_000;
const SERVER_ISN: u32 = 3_000_000_000;
/// MSS 1460, SACK permitted, timestamps, window scale 9: a Linux client's SYN.
const CLIENT_OPTS: [u8; 20] = [
    2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 9,
];

fn c() -> IpAddr {
    CLIENT.into()
}

fn vip() -> IpAddr {
    VIP.into()
}

fn lip() -> IpAddr {
    LIP.into()
}

fn rs() -> IpAddr {
    RS1.into()
}

fn at(secs: u64) -> Instant {
    T0.saturating_add(Duration::from_secs(secs))
}

fn seg(sport: u16, dport: u16, flags: u8, seq: u32, ack: u32, window: u16) -> L4 {
    L4::Tcp {
        sport,
        dport,
        seq,
        ack,
        flags,
        window,
        options: Vec::new(),
        payload: Vec::new(),
    }
}

fn with(l4: L4, options: &[u8], payload: &[u8]) -> L4 {
    match l4 {
        L4::Tcp {
            sport,
            dport,
            seq,
            ack,
            flags,
            window,
            ..
        } => L4::Tcp {
            sport,
            dport,
            seq,
            ack,
            flags,
            window,
            options: options.to_vec(),
            payload: payload.to_vec(),
        },
        other => other,
    }
}

fn u32_at(p: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]])
}

/// A one-backend TCP service on VIP:80 with `mode`.
fn proxied(
    mode: SynProxy,
    config: EngineConfig,
) -> (std::sync::Arc<dataplane::Engine>, dataplane::Worker) {
    let mut svc = service(vip(), 80, L4Proto::Tcp, vec![backend(rs(), 8080, 1)]);
    svc.syn_proxy = mode;
    engine_with(&[svc], config)
}

/// The client's SYN, answered: returns the cookie.
fn cookie_handshake(w: &mut dataplane::Worker, now: Instant) -> u32 {
    let syn = ip(c(), vip(), &tcp_opts(40000, 80, SYN, ISN, 0, &CLIENT_OPTS));
    let (v, out) = run(w, now, &syn);
    assert_eq!(v, Verdict::Forward(Direction::Outbound));
    u32_at(&out, 24)
}

/// The whole proxied handshake: SYN, cookie SYN-ACK, ACK → proxy SYN, real server SYN-ACK →
/// proxy ACK. Returns the cookie and the local port.
fn join(w: &mut dataplane::Worker) -> (u32, u16) {
    let cookie = cookie_handshake(w, T0);
    let ack = ip(c(), vip(), &seg(40000, 80, ACK, ISN + 1, cookie + 1, 502));
    let (v, out) = run(w, T0, &ack);
    assert_eq!(v, Verdict::Forward(Direction::Inbound));
    let lport = u16::from_be_bytes([out[20], out[21]]);
    let synack = ip(
        rs(),
        lip(),
        &tcp_opts(
            8080,
            lport,
            SYN | ACK,
            SERVER_ISN,
            ISN + 1,
            &[2, 4, 0x05, 0xb4, 1, 3, 3, 7],
        ),
    );
    let (v, _) = run(w, T0, &synack);
    assert_eq!(v, Verdict::Forward(Direction::Inbound));
    (cookie, lport)
}

#[test]
fn test_a_syn_is_answered_with_a_cookie_and_nothing_is_kept() {
    let (engine, mut w) = proxied(SynProxy::On, small_config());
    let syn = ip(c(), vip(), &tcp_opts(40000, 80, SYN, ISN, 0, &CLIENT_OPTS));
    let (v, out) = run(&mut w, T0, &syn);
    assert_eq!(v, Verdict::Forward(Direction::Outbound));
    let cookie = u32_at(&out, 24);
    // MSS 1460, SACK permitted and the proxy's window scale 7; no timestamps.
    let expected = ip(
        vip(),
        c(),
        &with(
            seg(80, 40000, SYN | ACK, cookie, ISN + 1, 65535),
            &[2, 4, 0x05, 0xb4, 1, 1, 4, 2, 1, 3, 3, 7],
            b"",
        ),
    );
    assert_eq!(out, expected);
    assert_eq!(engine.session_count(), 0);
    assert!(engine.local_addrs().usage().iter().all(|u| u.in_use == 0));
    assert_eq!(engine.counters().events(Event::SynCookiesSent), 1);
    // A retransmitted SYN gets the same cookie.
    assert_eq!(u32_at(&run(&mut w, T0, &syn).1, 24), cookie);
}

#[test]
fn test_the_ack_that_proves_the_cookie_becomes_the_syn_to_the_real_server() {
    let (engine, mut w) = proxied(SynProxy::On, small_config());
    let cookie = cookie_handshake(&mut w, T0);
    let ack = ip(c(), vip(), &seg(40000, 80, ACK, ISN + 1, cookie + 1, 502));
    let (v, out) = run(&mut w, T0, &ack);
    assert_eq!(v, Verdict::Forward(Direction::Inbound));
    let lport = u16::from_be_bytes([out[20], out[21]]);
    // The client's ISN and options (MSS from the table, SACK, its own window scale 9).
    let expected = ip(
        lip(),
        rs(),
        &with(
            seg(lport, 8080, SYN, ISN, 0, 65535),
            &[2, 4, 0x05, 0xb4, 1, 1, 4, 2, 1, 3, 3, 9],
            b"",
        ),
    );
    assert_eq!(out, expected);
    let sessions = engine.sessions(T0);
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].state, FlowState::Tcp(TcpState::SynSent));
    // Nothing is announced before the real server answers.
    assert!(w.drain_events().next().is_none());
    assert_eq!(engine.counters().events(Event::SynCookiesAccepted), 1);
}

#[test]
fn test_the_real_server_s_syn_ack_joins_the_halves() {
    let (_, mut w) = proxied(SynProxy::On, small_config());
    let cookie = cookie_handshake(&mut w, T0);
    let ack = ip(c(), vip(), &seg(40000, 80, ACK, ISN + 1, cookie + 1, 502));
    let out = run(&mut w, T0, &ack).1;
    let lport = u16::from_be_bytes([out[20], out[21]]);
    let synack = ip(
        rs(),
        lip(),
        &tcp_opts(
            8080,
            lport,
            SYN | ACK,
            SERVER_ISN,
            ISN + 1,
            &[2, 4, 0x05, 0xb4, 1, 3, 3, 7],
        ),
    );
    let (v, out) = run(&mut w, T0, &synack);
    assert_eq!(v, Verdict::Forward(Direction::Inbound));
    // The proxy's ACK, with the client's window.
    assert_eq!(
        out,
        ip(
            lip(),
            rs(),
            &seg(lport, 8080, ACK, ISN + 1, SERVER_ISN + 1, 502)
        )
    );
    let delta = SERVER_ISN.wrapping_sub(cookie);
    let created: Vec<_> = w
        .drain_events()
        .filter_map(|e| match e {
            SessionEvent::Created(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(created.len(), 1);
    assert_eq!(created[0].syn_proxy, Some(delta));
    assert_eq!(created[0].state, FlowState::Tcp(TcpState::Established));
}

#[test]
fn test_sequence_numbers_sack_and_windows_are_shifted_both_ways() {
    let (_, mut w) = proxied(SynProxy::On, small_config());
    let (cookie, lport) = join(&mut w);
    // Server → client: sequence number down by the delta; window from scale 7 (the server's)
    // to 7 (the proxy's): unchanged.
    let data = vec![0x5a; 100];
    let from_rs = ip(
        rs(),
        lip(),
        &with(
            seg(8080, lport, ACK | PSH, SERVER_ISN + 1, ISN + 1, 300),
            &[],
            &data,
        ),
    );
    let (v, out) = run(&mut w, T0, &from_rs);
    assert_eq!(v, Verdict::Forward(Direction::Outbound));
    assert_eq!(
        out,
        ip(
            vip(),
            c(),
            &with(
                seg(80, 40000, ACK | PSH, cookie + 1, ISN + 1, 300),
                &[],
                &data
            )
        )
    );
    // Client → server: the acknowledgement and the SACK block up by the delta.
    let sack = |a: u32, b: u32| {
        let mut o = vec![1, 1, 5, 10];
        o.extend_from_slice(&a.to_be_bytes());
        o.extend_from_slice(&b.to_be_bytes());
        o
    };
    let from_client = ip(
        c(),
        vip(),
        &with(
            seg(40000, 80, ACK, ISN + 1, cookie + 1, 502),
            &sack(cookie + 101, cookie + 201),
            b"",
        ),
    );
    let (v, out) = run(&mut w, T0, &from_client);
    assert_eq!(v, Verdict::Forward(Direction::Inbound));
    assert_eq!(
        out,
        ip(
            lip(),
            rs(),
            &with(
                seg(lport, 8080, ACK, ISN + 1, SERVER_ISN + 1, 502),
                &sack(SERVER_ISN + 101, SERVER_ISN + 201),
                b""
            )
        )
    );
}

#[test]
fn test_a_real_server_with_another_window_scale_has_its_windows_rescaled() {
    let (_, mut w) = proxied(SynProxy::On, small_config());
    let cookie = cookie_handshake(&mut w, T0);
    let ack = ip(c(), vip(), &seg(40000, 80, ACK, ISN + 1, cookie + 1, 502));
    let out = run(&mut w, T0, &ack).1;
    let lport = u16::from_be_bytes([out[20], out[21]]);
    // The real server scales by 9, the client was told 7: windows × 4.
    let synack = ip(
        rs(),
        lip(),
        &tcp_opts(8080, lport, SYN | ACK, SERVER_ISN, ISN + 1, &[1, 3, 3, 9]),
    );
    run(&mut w, T0, &synack);
    let from_rs = ip(
        rs(),
        lip(),
        &seg(8080, lport, ACK, SERVER_ISN + 1, ISN + 1, 1000),
    );
    let out = run(&mut w, T0, &from_rs).1;
    assert_eq!(
        out,
        ip(vip(), c(), &seg(80, 40000, ACK, cookie + 1, ISN + 1, 4000))
    );
}

#[test]
fn test_bad_and_old_cookies_are_refused() {
    let (engine, mut w) = proxied(SynProxy::On, small_config());
    let cookie = cookie_handshake(&mut w, T0);
    let forged = ip(c(), vip(), &seg(40000, 80, ACK, ISN + 1, cookie + 2, 502));
    assert_eq!(
        run(&mut w, T0, &forged).0,
        Verdict::Drop(DropReason::BadCookie)
    );
    let other_isn = ip(c(), vip(), &seg(40000, 80, ACK, ISN + 2, cookie + 1, 502));
    assert_eq!(
        run(&mut w, T0, &other_isn).0,
        Verdict::Drop(DropReason::BadCookie)
    );
    // Two cookie slots later the cookie is stale; a fresh SYN keeps the proxy engaged.
    cookie_handshake(&mut w, at(128));
    let late = ip(c(), vip(), &seg(40000, 80, ACK, ISN + 1, cookie + 1, 502));
    assert_eq!(
        run(&mut w, at(128), &late).0,
        Verdict::Drop(DropReason::BadCookie)
    );
    assert_eq!(engine.session_count(), 0);
    assert_eq!(engine.counters().drops(DropReason::BadCookie), 3);
}

#[test]
fn test_the_client_s_first_data_is_held_and_sent_when_the_real_server_answers() {
    let (engine, mut w) = proxied(SynProxy::On, small_config());
    let cookie = cookie_handshake(&mut w, T0);
    let ack = ip(c(), vip(), &seg(40000, 80, ACK, ISN + 1, cookie + 1, 502));
    let lport = u16::from_be_bytes(run(&mut w, T0, &ack).1[20..22].try_into().unwrap());
    let req = b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n";
    let data = ip(
        c(),
        vip(),
        &with(
            seg(40000, 80, ACK | PSH, ISN + 1, cookie + 1, 502),
            &[],
            req,
        ),
    );
    assert_eq!(
        run(&mut w, T0, &data).0,
        Verdict::Drop(DropReason::SynProxyOpening)
    );
    let synack = ip(
        rs(),
        lip(),
        &tcp_opts(8080, lport, SYN | ACK, SERVER_ISN, ISN + 1, &[1, 3, 3, 7]),
    );
    let (v, out) = run(&mut w, T0, &synack);
    assert_eq!(v, Verdict::Forward(Direction::Inbound));
    assert_eq!(
        out,
        ip(
            lip(),
            rs(),
            &with(
                seg(lport, 8080, ACK | PSH, ISN + 1, SERVER_ISN + 1, 502),
                &[],
                req
            )
        )
    );
    assert_eq!(
        engine.sessions(T0)[0].state,
        FlowState::Tcp(TcpState::Established)
    );
}

#[test]
fn test_a_refusing_real_server_resets_the_client() {
    let (engine, mut w) = proxied(SynProxy::On, small_config());
    let cookie = cookie_handshake(&mut w, T0);
    let ack = ip(c(), vip(), &seg(40000, 80, ACK, ISN + 1, cookie + 1, 502));
    let lport = u16::from_be_bytes(run(&mut w, T0, &ack).1[20..22].try_into().unwrap());
    let rst = ip(rs(), lip(), &seg(8080, lport, RST | ACK, 0, ISN + 1, 0));
    let (v, out) = run(&mut w, T0, &rst);
    assert_eq!(v, Verdict::Forward(Direction::Outbound));
    assert_eq!(out, ip(vip(), c(), &seg(80, 40000, RST, cookie + 1, 0, 0)));
    assert_eq!(engine.session_count(), 0);
    assert!(engine.local_addrs().usage().iter().all(|u| u.in_use == 0));
    assert_eq!(engine.counters().events(Event::SynProxyRefused), 1);
}

#[test]
fn test_a_silent_real_server_gets_three_syns_then_the_client_a_reset() {
    let (engine, mut w) = proxied(SynProxy::On, small_config());
    let cookie = cookie_handshake(&mut w, T0);
    let ack = ip(c(), vip(), &seg(40000, 80, ACK, ISN + 1, cookie + 1, 502));
    run(&mut w, T0, &ack);
    let retry = ip(
        c(),
        vip(),
        &with(
            seg(40000, 80, ACK | PSH, ISN + 1, cookie + 1, 502),
            &[],
            b"x",
        ),
    );
    // Within the second: held, not sent again.
    assert_eq!(
        run(&mut w, T0, &retry).0,
        Verdict::Drop(DropReason::SynProxyOpening)
    );
    for secs in [1, 2] {
        let (v, out) = run(&mut w, at(secs), &retry);
        assert_eq!(v, Verdict::Forward(Direction::Inbound), "at +{secs} s");
        assert_eq!(out[33], SYN, "a SYN again at +{secs} s");
        assert_eq!(u32_at(&out, 24), ISN);
    }
    let (v, out) = run(&mut w, at(3), &retry);
    assert_eq!(v, Verdict::Forward(Direction::Outbound));
    assert_eq!(out, ip(vip(), c(), &seg(80, 40000, RST, cookie + 1, 0, 0)));
    assert_eq!(engine.session_count(), 0);
    assert_eq!(engine.counters().events(Event::SynProxyFailed), 1);
}

#[test]
fn test_icmp_quoting_a_proxied_flow_is_shifted_back() {
    let (_, mut w) = proxied(SynProxy::On, small_config());
    let (cookie, lport) = join(&mut w);
    // The client's side reports our VIP → client segment (sequence number in the client's
    // view): the real server must see its own sequence number.
    let quoted = ip(vip(), c(), &seg(80, 40000, ACK, cookie + 1, ISN + 1, 300));
    let err = ip(
        ROUTER.into(),
        vip(),
        &L4::Icmp {
            typ: 3,
            code: 4,
            rest: [0, 0, 0x05, 0x00],
            data: quoted.clone(),
        },
    );
    let (v, out) = run(&mut w, T0, &err);
    assert_eq!(v, Verdict::Forward(Direction::Inbound));
    let inner = &out[28..];
    assert_eq!(u32_at(inner, 24), SERVER_ISN + 1, "quoted sequence number");
    assert_eq!(u16::from_be_bytes([inner[20], inner[21]]), 8080);
    assert_eq!(u16::from_be_bytes([inner[22], inner[23]]), lport);
    assert_checksums_ok(&out);
}

#[test]
fn test_auto_proxies_only_past_the_threshold() {
    let config = EngineConfig {
        syn_proxy_threshold: 2,
        ..small_config()
    };
    let (engine, mut w) = proxied(SynProxy::Auto, config);
    for cport in [40001, 40002] {
        let syn = ip(c(), vip(), &tcp(cport, 80, SYN, ISN, 0, b""));
        let (v, out) = run(&mut w, T0, &syn);
        assert_eq!(
            v,
            Verdict::Forward(Direction::Inbound),
            "to the real server"
        );
        assert_eq!(&out[16..20], &RS1.octets());
    }
    // Two half-open flows: the third SYN gets a cookie.
    let (v, out) = cookie_or_not(&mut w, 40003, T0);
    assert_eq!(v, Verdict::Forward(Direction::Outbound));
    assert_eq!(&out[16..20], &CLIENT.octets());
    assert_eq!(engine.session_count(), 2);
    // One completes its handshake: below the threshold again, but cookies go on 10 s more.
    let rec = engine
        .sessions(T0)
        .into_iter()
        .find(|r| r.client.port() == 40001)
        .unwrap();
    let synack = tcp(8080, rec.local.port(), SYN | ACK, SERVER_ISN, ISN + 1, b"");
    run(&mut w, T0, &ip(rs(), lip(), &synack));
    run(
        &mut w,
        T0,
        &ip(
            c(),
            vip(),
            &tcp(40001, 80, ACK, ISN + 1, SERVER_ISN + 1, b""),
        ),
    );
    let (v, _) = cookie_or_not(&mut w, 40004, at(9));
    assert_eq!(v, Verdict::Forward(Direction::Outbound), "still a cookie");
    let (v, _) = cookie_or_not(&mut w, 40005, at(10));
    assert_eq!(
        v,
        Verdict::Forward(Direction::Inbound),
        "to the real server"
    );
}

fn cookie_or_not(w: &mut dataplane::Worker, cport: u16, now: Instant) -> (Verdict, Vec<u8>) {
    run(w, now, &ip(c(), vip(), &tcp(cport, 80, SYN, ISN, 0, b"")))
}

#[test]
fn test_another_node_carries_a_joined_flow_on_from_its_record() {
    let (_, mut a) = proxied(SynProxy::On, small_config());
    let (cookie, lport) = join(&mut a);
    let rec = a
        .drain_events()
        .find_map(|e| match e {
            SessionEvent::Created(r) => Some(r),
            _ => None,
        })
        .unwrap();
    let config = EngineConfig {
        local_addrs: vec![Ipv4Addr::new(198, 19, 200, 2).into()],
        ..small_config()
    };
    let (b_engine, mut b) = proxied(SynProxy::On, config);
    b_engine
        .install(T0, &rec, Authority::Owner { mark: 1 })
        .unwrap();
    let from_rs = ip(
        rs(),
        lip(),
        &seg(8080, lport, ACK, SERVER_ISN + 1, ISN + 1, 300),
    );
    let (v, out) = run(&mut b, T0, &from_rs);
    assert_eq!(v, Verdict::Forward(Direction::Outbound));
    assert_eq!(
        out,
        ip(vip(), c(), &seg(80, 40000, ACK, cookie + 1, ISN + 1, 300))
    );
    let from_client = ip(c(), vip(), &seg(40000, 80, ACK, ISN + 1, cookie + 1, 502));
    let (_, out) = run(&mut b, T0, &from_client);
    assert_eq!(
        out,
        ip(
            lip(),
            rs(),
            &seg(lport, 8080, ACK, ISN + 1, SERVER_ISN + 1, 502)
        )
    );
}

/// A client that sends its request and closes at once: the request and its FIN are held and
/// sent on together, and the flow is half closed.
#[test]
fn test_a_request_with_its_fin_is_held_whole() {
    let (engine, mut w) = proxied(SynProxy::On, small_config());
    let cookie = cookie_handshake(&mut w, T0);
    let ack = ip(c(), vip(), &seg(40000, 80, ACK, ISN + 1, cookie + 1, 502));
    let lport = u16::from_be_bytes(run(&mut w, T0, &ack).1[20..22].try_into().unwrap());
    let req = b"QUIT\r\n";
    let last = seg(40000, 80, FIN | PSH | ACK, ISN + 1, cookie + 1, 502);
    let data = ip(c(), vip(), &with(last, &[], req));
    assert_eq!(
        run(&mut w, T0, &data).0,
        Verdict::Drop(DropReason::SynProxyOpening)
    );
    let synack = tcp(8080, lport, SYN | ACK, SERVER_ISN, ISN + 1, b"");
    let (_, out) = run(&mut w, T0, &ip(rs(), lip(), &synack));
    let sent = seg(lport, 8080, FIN | PSH | ACK, ISN + 1, SERVER_ISN + 1, 502);
    assert_eq!(out, ip(lip(), rs(), &with(sent, &[], req)));
    assert_eq!(
        engine.sessions(T0)[0].state,
        FlowState::Tcp(TcpState::CloseWait)
    );
}

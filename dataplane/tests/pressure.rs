//! The engine under pressure and at port reuse: flows that never completed a handshake (TCP
//! SYN_RECV, UDP without a reply) make room for new flows when the table or a port pool runs
//! out, oldest first; a handshake that never completes is not kept alive by retransmissions; a
//! UDP flow without a reply holds its port 30 s; a client's SYN on the port of a session in
//! TIME_WAIT or CLOSE is scheduled afresh (IPVS `conn_reuse_mode = 1`) or continues the old
//! session (`keep`).

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::*;
use dataplane::{
    ConnReuse, Direction, DropReason, EngineConfig, Event, Instant, L4Proto, SessionEvent,
    SessionRecord, Verdict,
};

const T0: Instant = Instant::from_secs(1000);

fn client() -> IpAddr {
    CLIENT.into()
}

fn vip() -> IpAddr {
    VIP.into()
}

fn at(secs: u64) -> Instant {
    T0.saturating_add(Duration::from_secs(secs))
}

fn syn(cport: u16) -> Vec<u8> {
    ip(client(), vip(), &tcp(cport, 80, SYN, 1000, 0, b""))
}

/// The client ports of the sessions closed since the last drain.
fn closed(w: &mut dataplane::Worker) -> Vec<u16> {
    w.drain_events()
        .filter_map(|e| match e {
            SessionEvent::Closed(r) => Some(r.client.port()),
            _ => None,
        })
        .collect()
}

#[test]
fn test_a_full_table_evicts_the_oldest_flow_that_never_completed_its_handshake() {
    let config = EngineConfig {
        max_sessions_v4: 3,
        ..small_config()
    };
    let (engine, mut w) = engine_with(&services(), config);
    let established = handshake(&mut w, T0, 40000);
    for cport in [40001, 40002] {
        assert_eq!(
            run(&mut w, T0, &syn(cport)).0,
            Verdict::Forward(Direction::Inbound)
        );
    }
    w.drain_events().for_each(drop);
    // Full: the new SYN takes the place of the oldest half-open flow, 40001.
    assert_eq!(
        run(&mut w, T0, &syn(40003)).0,
        Verdict::Forward(Direction::Inbound)
    );
    assert_eq!(closed(&mut w), [40001]);
    assert_eq!(engine.counters().events(Event::EmbryonicEvicted), 1);
    assert_eq!(engine.session_count(), 3);
    let late_ack = ip(client(), vip(), &tcp(40001, 80, ACK, 1001, 5001, b""));
    assert_eq!(
        run(&mut w, T0, &late_ack).0,
        Verdict::Drop(DropReason::NoSession)
    );
    // Then 40002; the established flow is never the one to go.
    run(&mut w, T0, &syn(40004));
    assert_eq!(closed(&mut w), [40002]);
    let data = ip(client(), vip(), &tcp(40000, 80, ACK, 1001, 5001, b"x"));
    let (v, out) = run(&mut w, T0, &data);
    assert_eq!(v, Verdict::Forward(Direction::Inbound));
    assert_eq!(
        u16::from_be_bytes([out[20], out[21]]),
        established.local.port()
    );
    assert_eq!(engine.counters().drops(DropReason::TableFull), 0);
}

#[test]
fn test_a_flow_that_completed_its_handshake_is_not_evicted() {
    let config = EngineConfig {
        max_sessions_v4: 2,
        ..small_config()
    };
    let (engine, mut w) = engine_with(&services(), config);
    run(&mut w, T0, &syn(40000));
    handshake(&mut w, T0, 40001);
    // 40000 completes its handshake late: no longer a candidate.
    let rec = engine
        .sessions(T0)
        .into_iter()
        .find(|r| r.client.port() == 40000)
        .unwrap();
    complete(&mut w, &rec);
    w.drain_events().for_each(drop);
    assert_eq!(
        run(&mut w, T0, &syn(40002)).0,
        Verdict::Drop(DropReason::TableFull)
    );
    assert!(closed(&mut w).is_empty());
    assert_eq!(engine.counters().events(Event::EmbryonicEvicted), 0);
}

/// The real server's SYN-ACK and the client's ACK for a flow opened with [`syn`].
fn complete(w: &mut dataplane::Worker, rec: &SessionRecord) {
    let synack = tcp(
        rec.backend.port(),
        rec.local.port(),
        SYN | ACK,
        5000,
        1001,
        b"",
    );
    run(w, T0, &ip(rec.backend.ip(), rec.local.ip(), &synack));
    let ack = tcp(rec.client.port(), 80, ACK, 1001, 5001, b"");
    run(w, T0, &ip(client(), vip(), &ack));
}

#[test]
fn test_spoofed_datagrams_give_their_ports_to_new_flows() {
    let config = EngineConfig {
        local_ports: 2000..=2001,
        ..small_config()
    };
    let (engine, mut w) = engine_with(&services(), config);
    let dgram = |cport| ip(client(), vip(), &udp(cport, 53, b"q"));
    for cport in [5000, 5001] {
        assert_eq!(
            run(&mut w, T0, &dgram(cport)).0,
            Verdict::Forward(Direction::Inbound)
        );
    }
    // 5000 gets an answer: a flow, no longer embryonic.
    let rec = engine
        .sessions(T0)
        .into_iter()
        .find(|r| r.client.port() == 5000)
        .unwrap();
    let answer = ip(
        rec.backend.ip(),
        rec.local.ip(),
        &udp(rec.backend.port(), rec.local.port(), b"a"),
    );
    assert_eq!(
        run(&mut w, T0, &answer).0,
        Verdict::Forward(Direction::Outbound)
    );
    w.drain_events().for_each(drop);
    // No port left: 5001, never answered, gives its own up.
    assert_eq!(
        run(&mut w, T0, &dgram(5002)).0,
        Verdict::Forward(Direction::Inbound)
    );
    assert_eq!(closed(&mut w), [5001]);
    // And with every port held by answered or newer flows ... 5002 is next, then none.
    assert_eq!(
        run(&mut w, T0, &dgram(5003)).0,
        Verdict::Forward(Direction::Inbound)
    );
    assert_eq!(closed(&mut w), [5002]);
    assert_eq!(engine.counters().events(Event::EmbryonicEvicted), 2);
    assert_eq!(engine.counters().drops(DropReason::NoLocalPort), 0);
}

#[test]
fn test_ports_held_by_tcp_half_open_flows_go_to_new_flows() {
    let config = EngineConfig {
        local_ports: 2000..=2001,
        ..small_config()
    };
    let (engine, mut w) = engine_with(&services(), config);
    handshake(&mut w, T0, 40000);
    run(&mut w, T0, &syn(40001));
    w.drain_events().for_each(drop);
    assert_eq!(
        run(&mut w, T0, &syn(40002)).0,
        Verdict::Forward(Direction::Inbound)
    );
    assert_eq!(closed(&mut w), [40001]);
    assert_eq!(engine.counters().events(Event::EmbryonicEvicted), 1);
}

#[test]
fn test_retransmissions_do_not_stretch_syn_recv() {
    let (engine, mut w) = engine();
    run(&mut w, T0, &syn(40000));
    let rec = created(&mut w);
    let synack = ip(
        rec.backend.ip(),
        rec.local.ip(),
        &tcp(8080, rec.local.port(), SYN | ACK, 5000, 1001, b""),
    );
    // The SYN and the SYN-ACK are sent again and again; the handshake never completes.
    for secs in [1, 3, 7, 15, 31, 59] {
        run(&mut w, at(secs), &syn(40000));
        run(&mut w, at(secs), &synack);
    }
    assert_eq!(w.expire(at(59), 1024), 0);
    // SYN_RECV's 60 s count from the first SYN.
    assert_eq!(w.expire(at(60), 1024), 1);
    assert_eq!(engine.session_count(), 0);
}

#[test]
fn test_a_udp_flow_without_a_reply_lives_30_s_with_one_the_udp_timeout() {
    let (engine, mut w) = engine();
    for cport in [5000, 5001] {
        run(&mut w, T0, &ip(client(), vip(), &udp(cport, 53, b"q")));
    }
    let answered = engine
        .sessions(T0)
        .into_iter()
        .find(|r| r.client.port() == 5001)
        .unwrap();
    run(
        &mut w,
        T0,
        &ip(
            answered.backend.ip(),
            answered.local.ip(),
            &udp(answered.backend.port(), answered.local.port(), b"a"),
        ),
    );
    w.drain_events().for_each(drop);
    assert_eq!(w.expire(at(29), 1024), 0);
    assert_eq!(w.expire(at(30), 1024), 1);
    assert_eq!(closed(&mut w), [5000]);
    assert_eq!(w.expire(at(299), 1024), 0);
    assert_eq!(w.expire(at(300), 1024), 1);
    assert_eq!(closed(&mut w), [5001]);
}

/// Two real servers behind an rr service with `conn_reuse`; a flow from CLIENT:40000 completed,
/// closed to TIME_WAIT by FINs both ways, and its real server then marked down. Returns the
/// engine, the worker and the flow's record.
fn time_wait_on_a_dead_backend(
    conn_reuse: ConnReuse,
) -> (
    std::sync::Arc<dataplane::Engine>,
    dataplane::Worker,
    SessionRecord,
) {
    let mut svc = service(
        vip(),
        80,
        L4Proto::Tcp,
        vec![backend(RS1.into(), 8080, 1), backend(RS2.into(), 8080, 1)],
    );
    svc.conn_reuse = conn_reuse;
    let (engine, mut w) = engine_with(std::slice::from_ref(&svc), small_config());
    let rec = handshake(&mut w, T0, 40000);
    let fin = ip(client(), vip(), &tcp(40000, 80, FIN | ACK, 1001, 5001, b""));
    run(&mut w, T0, &fin);
    let fin_back = tcp(8080, rec.local.port(), FIN | ACK, 5001, 1002, b"");
    run(&mut w, T0, &ip(rec.backend.ip(), rec.local.ip(), &fin_back));
    assert_eq!(
        engine.sessions(T0)[0].state,
        dataplane::FlowState::Tcp(dataplane::TcpState::TimeWait)
    );
    for b in &mut svc.backends {
        b.healthy = b.addr != rec.backend;
    }
    let snap =
        dataplane::Snapshot::new(2, &[svc], Default::default(), Some(&engine.snapshot())).unwrap();
    engine.set_snapshot(snap);
    w.drain_events().for_each(drop);
    (engine, w, rec)
}

#[test]
fn test_a_syn_on_a_time_wait_port_is_scheduled_again() {
    let (engine, mut w, old) = time_wait_on_a_dead_backend(ConnReuse::Reschedule);
    let (v, out) = run(&mut w, at(1), &syn(40000));
    assert_eq!(v, Verdict::Forward(Direction::Inbound));
    let events: Vec<SessionEvent> = w.drain_events().collect();
    assert!(
        matches!(events[..], [SessionEvent::Closed(c), SessionEvent::Created(n)]
            if c.backend == old.backend && n.backend != old.backend),
        "{events:?}"
    );
    let live = if old.backend.ip() == IpAddr::from(RS1) {
        RS2
    } else {
        RS1
    };
    assert_eq!(&out[16..20], &live.octets());
    assert_eq!(engine.counters().events(Event::SessionsRescheduled), 1);
    assert_eq!(engine.session_count(), 1);
    assert_eq!(
        engine.sessions(at(1))[0].state,
        dataplane::FlowState::Tcp(dataplane::TcpState::SynRecv)
    );
}

#[test]
fn test_a_syn_on_a_closed_port_is_scheduled_again() {
    let mut svc = service(vip(), 80, L4Proto::Tcp, vec![backend(RS1.into(), 8080, 1)]);
    svc.conn_reuse = ConnReuse::Reschedule;
    let (engine, mut w) = engine_with(&[svc], small_config());
    let rec = handshake(&mut w, T0, 40000);
    let rst = tcp(8080, rec.local.port(), RST, 5001, 0, b"");
    run(&mut w, T0, &ip(rec.backend.ip(), rec.local.ip(), &rst));
    assert_eq!(
        engine.sessions(T0)[0].state,
        dataplane::FlowState::Tcp(dataplane::TcpState::Close)
    );
    assert_eq!(
        run(&mut w, T0, &syn(40000)).0,
        Verdict::Forward(Direction::Inbound)
    );
    assert_eq!(engine.counters().events(Event::SessionsRescheduled), 1);
    // A SYN of an ongoing handshake is no reuse: the session stays.
    run(&mut w, T0, &syn(40000));
    assert_eq!(engine.counters().events(Event::SessionsRescheduled), 1);
    assert_eq!(engine.counters().events(Event::SessionsCreated), 2);
}

#[test]
fn test_conn_reuse_keep_continues_the_old_session() {
    let (engine, mut w, old) = time_wait_on_a_dead_backend(ConnReuse::Keep);
    let (v, out) = run(&mut w, at(1), &syn(40000));
    assert_eq!(v, Verdict::Forward(Direction::Inbound));
    assert_eq!(
        IpAddr::from([out[16], out[17], out[18], out[19]]),
        old.backend.ip()
    );
    assert!(
        w.drain_events()
            .all(|e| !matches!(e, SessionEvent::Closed(_)))
    );
    assert_eq!(engine.counters().events(Event::SessionsRescheduled), 0);
    assert_eq!(engine.counters().events(Event::SessionsCreated), 1);
}

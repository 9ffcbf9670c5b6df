//! Session lifecycle across nodes and over time: records that travel through serde and are
//! installed elsewhere, per-service timeout overrides, and closes removing a flow on peers.

mod common;

use std::time::Duration;

use common::*;
use dataplane::{
    Direction, DropReason, FlowState, Installed, Instant, L4Proto, SessionEvent, SessionRecord,
    Timeouts, Verdict,
};

const T0: Instant = Instant::from_secs(500);

fn later(secs: u64) -> Instant {
    T0.saturating_add(Duration::from_secs(secs))
}

#[test]
fn test_record_survives_serde_and_carries_the_flow_on_a_peer() {
    let (_a, mut wa) = engine();
    let syn = ip(CLIENT.into(), VIP.into(), &tcp(41000, 80, SYN, 10, 0, b""));
    run(&mut wa, T0, &syn);
    let rec = created(&mut wa);
    // What session sync would put on the wire, and read back.
    let wire = serde_json::to_vec(&rec).expect("serialise");
    let back: SessionRecord = serde_json::from_slice(&wire).expect("deserialise");
    assert_eq!(back, rec);
    let peer = small_config();
    let (b, mut wb) = engine_with(
        &services(),
        dataplane::EngineConfig {
            local_addrs: vec!["198.19.200.2".parse().unwrap()],
            ..peer
        },
    );
    assert_eq!(b.install(T0, &back), Ok(Installed::New));
    // The server's SYN-ACK reaches node B (the LIP route moved): B sends it to the client.
    let synack = ip(
        RS1.into(),
        LIP.into(),
        &tcp(8080, rec.local.port(), SYN | ACK, 99, 11, b""),
    );
    let (v, out) = run(&mut wb, T0, &synack);
    assert_eq!(v, Verdict::Forward(Direction::Outbound));
    assert_eq!(
        out,
        ip(
            VIP.into(),
            CLIENT.into(),
            &tcp(80, 41000, SYN | ACK, 99, 11, b"")
        )
    );
    // A's close reaches B as a removal.
    assert!(b.remove(&back));
    assert_eq!(
        run(&mut wb, T0, &synack).0,
        Verdict::Drop(DropReason::NoSession)
    );
}

#[test]
fn test_install_refuses_inconsistent_records() {
    let (a, mut wa) = engine();
    run(
        &mut wa,
        T0,
        &ip(CLIENT.into(), VIP.into(), &tcp(41000, 80, SYN, 10, 0, b"")),
    );
    let rec = created(&mut wa);
    let (b, _) = engine();
    let mut wrong_state = rec;
    wrong_state.state = FlowState::Udp;
    assert_eq!(
        b.install(T0, &wrong_state),
        Err(dataplane::InstallError::StateMismatch)
    );
    let mut no_service = rec;
    no_service.vip.set_port(81);
    assert!(matches!(
        b.install(T0, &no_service),
        Err(dataplane::InstallError::UnknownService(_))
    ));
    let mut mixed = rec;
    mixed.backend = "[2001:db8:3::10]:8080".parse().unwrap();
    assert_eq!(
        b.install(T0, &mixed),
        Err(dataplane::InstallError::FamilyMismatch)
    );
    // The record names this node's own LIP (b has the same LIP as a): the port is reserved,
    // so the same LIP:port cannot be installed for another flow.
    assert_eq!(b.install(T0, &rec), Ok(Installed::New));
    let mut other_flow = rec;
    other_flow.client.set_port(41001);
    assert!(matches!(
        b.install(T0, &other_flow),
        Err(dataplane::InstallError::LocalPortInUse(_))
    ));
    assert_eq!(a.session_count(), 1);
    assert_eq!(b.session_count(), 1);
    assert!(a.local_addrs().usage().iter().any(|u| u.in_use == 1));
}

#[test]
fn test_per_service_timeouts_override_the_defaults() {
    let mut svcs = services();
    svcs[0].timeouts = Timeouts {
        syn_recv: Duration::from_secs(5),
        ..Timeouts::default()
    };
    svcs[1].timeouts = Timeouts {
        udp: Duration::from_secs(7),
        ..Timeouts::default()
    };
    let (engine, mut w) = engine_with(&svcs, small_config());
    run(
        &mut w,
        T0,
        &ip(CLIENT.into(), VIP.into(), &tcp(41000, 80, SYN, 10, 0, b"")),
    );
    run(
        &mut w,
        T0,
        &ip(CLIENT.into(), VIP.into(), &udp(5000, 53, b"q")),
    );
    // IPv6 service keeps the IPVS default (60 s in SYN_RECV).
    run(
        &mut w,
        T0,
        &ip(
            CLIENT6.into(),
            VIP6.into(),
            &tcp(41000, 80, SYN, 10, 0, b""),
        ),
    );
    w.drain_events().for_each(drop);
    assert_eq!(w.expire(later(4), 4096), 0);
    assert_eq!(
        w.expire(later(6), 4096),
        1,
        "the TCP session after its 5 s override"
    );
    assert_eq!(
        w.expire(later(8), 4096),
        1,
        "the UDP session after its 7 s override"
    );
    assert_eq!(w.expire(later(59), 4096), 0);
    assert_eq!(
        w.expire(later(61), 4096),
        1,
        "the IPv6 session after the 60 s default"
    );
    let closed: Vec<L4Proto> = w
        .drain_events()
        .filter_map(|e| match e {
            SessionEvent::Closed(r) => Some(r.proto),
            _ => None,
        })
        .collect();
    assert_eq!(closed, [L4Proto::Tcp, L4Proto::Udp, L4Proto::Tcp]);
    assert_eq!(engine.session_count(), 0);
}

#[test]
fn test_traffic_refreshes_the_deadline() {
    let (engine, mut w) = engine();
    run(
        &mut w,
        T0,
        &ip(CLIENT.into(), VIP.into(), &udp(5000, 53, b"q")),
    );
    let lport = created(&mut w).local.port();
    // An answer at 200 s pushes the 300 s UDP deadline to 500 s.
    run(
        &mut w,
        later(200),
        &ip(RS1.into(), LIP.into(), &udp(5353, lport, b"a")),
    );
    assert_eq!(w.expire(later(400), 4096), 0);
    assert_eq!(engine.sessions(later(400))[0].expires_in_secs, 100);
    assert_eq!(w.expire(later(501), 4096), 1);
}

#[test]
fn test_traffic_counted_per_backend_both_ways_across_workers() {
    let (engine, mut w1) = engine();
    let mut w2 = engine.worker();
    let syn = ip(CLIENT.into(), VIP.into(), &tcp(41000, 80, SYN, 10, 0, b""));
    run(&mut w1, T0, &syn);
    let lport = created(&mut w1).local.port();
    let synack = ip(
        RS1.into(),
        LIP.into(),
        &tcp(8080, lport, SYN | ACK, 99, 11, b""),
    );
    let data = ip(
        CLIENT.into(),
        VIP.into(),
        &tcp(41000, 80, ACK, 11, 100, &[1; 300]),
    );
    // The two directions on different workers, as on two queues.
    run(&mut w2, T0, &synack);
    run(&mut w1, T0, &data);
    run(&mut w2, T0, &data);
    let key = dataplane::ServiceKey {
        proto: L4Proto::Tcp,
        vip: "198.18.100.1:80".parse().unwrap(),
    };
    let snap = engine.snapshot();
    let t = snap.dests(&key).unwrap()[0].stats.traffic();
    assert_eq!(t.packets_in, 3);
    assert_eq!(t.bytes_in, (syn.len() + 2 * data.len()) as u64);
    assert_eq!(t.packets_out, 1);
    assert_eq!(t.bytes_out, synack.len() as u64);
    // A dropped packet counts nowhere.
    let stray = ip(CLIENT.into(), VIP.into(), &tcp(41001, 80, ACK, 1, 1, b""));
    assert_eq!(
        run(&mut w1, T0, &stray).0,
        Verdict::Drop(DropReason::NoSession)
    );
    assert_eq!(snap.dests(&key).unwrap()[0].stats.traffic(), t);
}

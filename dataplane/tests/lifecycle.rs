//! Session lifecycle across nodes and over time: records that travel through serde and are
//! installed elsewhere, per-service timeout overrides, and closes removing a flow on peers.

mod common;

use std::time::Duration;

use common::*;
use dataplane::{
    Authority, Direction, DropReason, FlowState, InstallError, Installed, Instant, L4Proto,
    SessionEvent, SessionRecord, Timeouts, Verdict,
};

/// What session sync applies for the owner of the record's LIP.
const OWNER: Authority = Authority::Owner { mark: 1 };

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
    assert_eq!(b.install(T0, &back, OWNER), Ok(Installed::New));
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
    assert_eq!(b.remove(&back), Ok(true));
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
    let (b, _) = engine_with(&services(), peer_config());
    let mut wrong_state = rec;
    wrong_state.state = FlowState::Udp;
    assert_eq!(
        b.install(T0, &wrong_state, OWNER),
        Err(InstallError::StateMismatch)
    );
    let mut no_service = rec;
    no_service.vip.set_port(81);
    assert!(matches!(
        b.install(T0, &no_service, OWNER),
        Err(InstallError::UnknownService(_))
    ));
    let mut no_backend = rec;
    no_backend.backend.set_port(8081);
    assert_eq!(
        b.install(T0, &no_backend, OWNER),
        Err(InstallError::UnknownBackend(no_backend.backend))
    );
    let mut mixed = rec;
    mixed.backend = "[2001:db8:3::10]:8080".parse().unwrap();
    assert_eq!(
        b.install(T0, &mixed, OWNER),
        Err(InstallError::FamilyMismatch)
    );
    // Window scales above 14 (RFC 7323) are tracking no node produces.
    let mut scaled = rec;
    scaled.window = window_with_scale(40);
    assert_eq!(b.install(T0, &scaled, OWNER), Err(InstallError::Window));
    assert_eq!(b.session_count(), 0);
    // Only the owner of a LIP speaks for its flows: a record naming B's own LIP is refused
    // unless B takes it back as its own.
    let (c, _) = engine();
    assert_eq!(
        c.install(T0, &rec, OWNER),
        Err(InstallError::OwnLip(LIP.into()))
    );
    assert_eq!(
        b.install(T0, &rec, Authority::Reclaim),
        Err(InstallError::ForeignLip(LIP.into()))
    );
    assert_eq!(a.session_count(), 1);
}

/// A node that restarted takes its own flows back from a peer's bulk answer: as its own
/// sessions, their local ports reserved.
#[test]
fn test_a_reclaimed_flow_is_owned_and_holds_its_port() {
    let (a, mut wa) = engine();
    run(
        &mut wa,
        T0,
        &ip(CLIENT.into(), VIP.into(), &tcp(41000, 80, SYN, 10, 0, b"")),
    );
    let rec = created(&mut wa);
    let (b, _) = engine();
    assert_eq!(b.install(T0, &rec, Authority::Reclaim), Ok(Installed::New));
    assert!(!b.sessions(T0)[0].synced);
    let mut other_flow = rec;
    other_flow.client.set_port(41001);
    assert!(matches!(
        b.install(T0, &other_flow, Authority::Reclaim),
        Err(InstallError::LocalPortInUse(_))
    ));
    // Taken back, it is B's: no peer's record changes or removes it.
    assert_eq!(
        b.install(T0, &rec, Authority::Reclaim),
        Err(InstallError::Owned)
    );
    assert_eq!(b.remove(&rec), Err(InstallError::Owned));
    assert_eq!(b.session_count(), 1);
    assert!(a.local_addrs().usage().iter().any(|u| u.in_use == 1));
    assert!(b.local_addrs().usage().iter().any(|u| u.in_use == 1));
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

/// A peer with the same services and its own LIPs.
fn peer_config() -> dataplane::EngineConfig {
    dataplane::EngineConfig {
        local_addrs: vec![
            "198.19.200.2".parse().unwrap(),
            "2001:db8:200::2".parse().unwrap(),
        ],
        ..small_config()
    }
}

/// Tracking as a peer could send it: both sides seen, both offering window scale `w`.
fn window_with_scale(w: u8) -> dataplane::tcp_state::TcpWindow {
    serde_json::from_value(serde_json::json!({
        "end": [1000, 5000],
        "max_win": [65535, 65535],
        "wscale": [w, w],
        "seen": [true, true],
    }))
    .unwrap()
}

/// A's first flow on its only local port: A's engine (one port), B (a peer), the record.
fn owner_with_one_port() -> (
    std::sync::Arc<dataplane::Engine>,
    dataplane::Worker,
    std::sync::Arc<dataplane::Engine>,
    dataplane::Worker,
    SessionRecord,
) {
    let config_a = dataplane::EngineConfig {
        local_ports: 1024..=1024,
        ..small_config()
    };
    let (a, mut wa) = engine_with(&services(), config_a);
    let (b, wb) = engine_with(&services(), peer_config());
    run(
        &mut wa,
        T0,
        &ip(CLIENT.into(), VIP.into(), &tcp(41000, 80, SYN, 10, 0, b"")),
    );
    let first = created(&mut wa);
    (a, wa, b, wb, first)
}

/// The cross-client misdelivery: node B holds a stale copy of A's flow from client 1 (A closed
/// it, the removal never reached B). A gives the same LIP:port towards the same real server to
/// client 2's new flow. B must take A's record of the new flow over the stale copy: when A fails
/// and A's LIP is routed to B, the real server's answers to client 2 must reach client 2, never
/// client 1.
#[test]
fn test_a_stale_copy_never_takes_the_owners_new_flow_on_its_port() {
    let (a, mut wa, b, mut wb, old) = owner_with_one_port();
    let client2: std::net::Ipv4Addr = "198.18.1.20".parse().unwrap();
    assert_eq!(b.install(T0, &old, OWNER), Ok(Installed::New));
    // The first flow ends on A (its SYN_RECV timeout); the removal is lost on the way to B.
    assert_eq!(wa.expire(later(61), 4096), 1);
    run(
        &mut wa,
        later(61),
        &ip(client2.into(), VIP.into(), &tcp(42000, 80, SYN, 10, 0, b"")),
    );
    let new = created(&mut wa);
    assert_eq!(new.local, old.local, "A reused its only port");
    assert_eq!(a.session_count(), 1);
    assert_eq!(b.install(later(61), &new, OWNER), Ok(Installed::New));
    assert_eq!(b.session_count(), 1, "the stale copy is gone");

    // A fails: the real server's SYN-ACK to A's LIP:port reaches B.
    let synack = ip(
        RS1.into(),
        LIP.into(),
        &tcp(8080, new.local.port(), SYN | ACK, 99, 11, b""),
    );
    let (v, out) = run(&mut wb, later(61), &synack);
    assert_eq!(v, Verdict::Forward(Direction::Outbound));
    assert_eq!(
        out,
        ip(
            VIP.into(),
            client2.into(),
            &tcp(80, 42000, SYN | ACK, 99, 11, b"")
        ),
        "client 2's answer goes to client 2"
    );
    // Client 1's flow is no more, on B either.
    let from_client1 = ip(
        CLIENT.into(),
        VIP.into(),
        &tcp(41000, 80, ACK, 11, 100, b""),
    );
    assert_eq!(
        run(&mut wb, later(61), &from_client1).0,
        Verdict::Drop(DropReason::NoSession)
    );
}

/// The client reused its port for a new connection, which A put on another local port; B's
/// copy of the old connection holds the client-side key. A's record wins.
#[test]
fn test_an_owner_record_replaces_the_copy_of_the_clients_earlier_connection() {
    let (_a, mut wa) = engine();
    let (b, _) = engine_with(&services(), peer_config());
    run(
        &mut wa,
        T0,
        &ip(CLIENT.into(), VIP.into(), &tcp(41000, 80, SYN, 10, 0, b"")),
    );
    let old = created(&mut wa);
    assert_eq!(b.install(T0, &old, OWNER), Ok(Installed::New));
    let mut new = old;
    new.local.set_port(old.local.port() + 1);
    // A relayed record does not replace it; the owner's does.
    assert_eq!(
        b.install(T0, &new, Authority::Relay),
        Err(InstallError::Conflict)
    );
    assert_eq!(b.install(T0, &new, OWNER), Ok(Installed::New));
    let held = b.sessions(T0);
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].local, new.local);
}

/// A peer's record never changes or removes a session this node created: not an update, not a
/// close, not a record of another flow on one of its keys.
#[test]
fn test_a_peer_never_changes_or_removes_a_session_this_node_owns() {
    let (a, mut wa) = engine();
    run(
        &mut wa,
        T0,
        &ip(CLIENT.into(), VIP.into(), &tcp(41000, 80, SYN, 10, 0, b"")),
    );
    let mine = created(&mut wa);
    // The same client flow as another node saw it (its SYN reached both), on the peer's LIP.
    let mut theirs = mine;
    theirs.local = "198.19.200.2:2000".parse().unwrap();
    theirs.state = FlowState::Tcp(dataplane::TcpState::Close);
    for authority in [OWNER, Authority::Relay] {
        assert_eq!(a.install(T0, &theirs, authority), Err(InstallError::Owned));
    }
    assert_eq!(a.remove(&theirs), Err(InstallError::Owned));
    assert_eq!(a.remove(&mine), Err(InstallError::Owned));
    let held = a.sessions(T0);
    assert_eq!(held, vec![mine]);
}

/// A relayed record (a flow of a node not connected here) fills a gap and updates the copy of
/// the same flow, and replaces nothing.
#[test]
fn test_a_relayed_record_fills_a_gap_and_replaces_nothing() {
    let (_a, wa, b, _, first) = owner_with_one_port();
    drop(wa);
    assert_eq!(b.install(T0, &first, Authority::Relay), Ok(Installed::New));
    let mut later_state = first;
    later_state.state = FlowState::Tcp(dataplane::TcpState::Established);
    assert_eq!(
        b.install(T0, &later_state, Authority::Relay),
        Ok(Installed::Updated)
    );
    // Another client on the same LIP:port: the copy stays.
    let mut other = first;
    other.client.set_port(41001);
    assert_eq!(
        b.install(T0, &other, Authority::Relay),
        Err(InstallError::Conflict)
    );
    assert_eq!(b.sessions(T0)[0].client, first.client);
}

/// A removal takes out the copy of the flow it names, never a copy of another flow under the
/// same client-side key.
#[test]
fn test_a_removal_takes_out_only_the_copy_of_the_same_flow() {
    let (_a, _wa, b, _, first) = owner_with_one_port();
    assert_eq!(b.install(T0, &first, OWNER), Ok(Installed::New));
    let mut other = first;
    other.local.set_port(2000);
    assert_eq!(b.remove(&other), Ok(false));
    assert_eq!(b.session_count(), 1);
    assert_eq!(b.remove(&first), Ok(true));
    assert_eq!(b.remove(&first), Ok(false));
}

/// The owner's complete table stream marked every flow it holds: the copies of its LIPs it did
/// not mark are flows it no longer has. Other nodes' copies and this node's own sessions stay.
#[test]
fn test_reconcile_drops_the_copies_the_owner_no_longer_has() {
    let (_a, mut wa) = engine();
    let (b, mut wb) = engine_with(&services(), peer_config());
    let mut records = Vec::new();
    for cport in 41000..41004 {
        run(
            &mut wa,
            T0,
            &ip(CLIENT.into(), VIP.into(), &tcp(cport, 80, SYN, 10, 0, b"")),
        );
        records.push(created(&mut wa));
    }
    for r in &records {
        assert_eq!(
            b.install(T0, r, Authority::Owner { mark: 1 }),
            Ok(Installed::New)
        );
    }
    // A node C's flow, and one of B's own.
    let mut of_c = records[0];
    of_c.local = "198.19.200.3:3000".parse().unwrap();
    of_c.client.set_port(50000);
    assert_eq!(b.install(T0, &of_c, Authority::Relay), Ok(Installed::New));
    run(
        &mut wb,
        T0,
        &ip(CLIENT.into(), VIP.into(), &tcp(50001, 80, SYN, 10, 0, b"")),
    );
    // A's next stream confirms two of its flows.
    for r in &records[..2] {
        assert_eq!(
            b.install(T0, r, Authority::Owner { mark: 2 }),
            Ok(Installed::Updated)
        );
    }
    assert_eq!(b.reconcile(&[LIP.into(), LIP6.into()], 2), 2);
    let mut left: Vec<u16> = b.sessions(T0).iter().map(|r| r.client.port()).collect();
    left.sort_unstable();
    assert_eq!(left, [41000, 41001, 50000, 50001]);
    // What went gave back its place in the counters.
    let key = dataplane::ServiceKey {
        proto: L4Proto::Tcp,
        vip: "198.18.100.1:80".parse().unwrap(),
    };
    let conns = b.snapshot().dests(&key).unwrap()[0].stats.conns();
    assert_eq!(conns.active + conns.inactive, 4);
}

/// A copy that B already holds keeps its real server after the configuration dropped it, as
/// the session lives on on its owner; a new copy for that real server is refused.
#[test]
fn test_a_copy_outlives_its_backend_leaving_the_config() {
    let (_a, mut wa) = engine();
    let (b, _) = engine_with(&services(), peer_config());
    run(
        &mut wa,
        T0,
        &ip(CLIENT.into(), VIP.into(), &tcp(41000, 80, SYN, 10, 0, b"")),
    );
    let rec = created(&mut wa);
    assert_eq!(b.install(T0, &rec, OWNER), Ok(Installed::New));
    let mut without_rs1 = services();
    without_rs1[0].backends = vec![backend(RS2.into(), 8080, 1)];
    b.set_snapshot(
        dataplane::Snapshot::new(
            2,
            &without_rs1,
            dataplane::sched::MaglevParams::default(),
            Some(&b.snapshot()),
        )
        .unwrap(),
    );
    assert_eq!(b.install(T0, &rec, OWNER), Ok(Installed::Updated));
    let mut other = rec;
    other.client.set_port(41001);
    other.local.set_port(rec.local.port() + 1);
    assert_eq!(
        b.install(T0, &other, OWNER),
        Err(InstallError::UnknownBackend(rec.backend))
    );
}

/// A record keeps at most its state's timeout plus the sync grace.
#[test]
fn test_a_peer_records_remaining_time_is_capped() {
    let (_a, mut wa) = engine();
    let (b, _) = engine_with(&services(), peer_config());
    run(
        &mut wa,
        T0,
        &ip(CLIENT.into(), VIP.into(), &tcp(41000, 80, SYN, 10, 0, b"")),
    );
    let mut rec = created(&mut wa);
    rec.expires_in_secs = u32::MAX;
    assert_eq!(b.install(T0, &rec, OWNER), Ok(Installed::New));
    // SYN_RECV: 60 s, plus 60 s of grace.
    assert_eq!(b.sessions(T0)[0].expires_in_secs, 120);
}

/// A window scale above 14 reaches the window arithmetic of no packet: the record is refused,
/// and a SYN offering one is taken as 14 (RFC 7323 §2.3).
#[test]
fn test_window_scales_above_14_never_reach_the_window_arithmetic() {
    let (_a, mut wa) = engine();
    let (b, mut wb) = engine_with(&services(), peer_config());
    run(
        &mut wa,
        T0,
        &ip(CLIENT.into(), VIP.into(), &tcp(41000, 80, SYN, 10, 0, b"")),
    );
    let mut rec = created(&mut wa);
    rec.state = FlowState::Tcp(dataplane::TcpState::Established);
    rec.window = window_with_scale(32);
    assert_eq!(b.install(T0, &rec, OWNER), Err(InstallError::Window));
    rec.window = window_with_scale(14);
    assert_eq!(b.install(T0, &rec, OWNER), Ok(Installed::New));
    let data = ip(
        CLIENT.into(),
        VIP.into(),
        &tcp(41000, 80, ACK, 11, 100, b"x"),
    );
    assert_eq!(
        run(&mut wb, T0, &data).0,
        Verdict::Forward(Direction::Inbound)
    );
    // SYNs offering a shift of 255 on both sides, then data both ways.
    let (_, mut w) = engine();
    let wscale_255 = [1, 3, 3, 255];
    run(
        &mut w,
        T0,
        &ip(
            CLIENT.into(),
            VIP.into(),
            &tcp_opts(41000, 80, SYN, 10, 0, &wscale_255),
        ),
    );
    let lport = created(&mut w).local.port();
    run(
        &mut w,
        T0,
        &ip(
            RS1.into(),
            LIP.into(),
            &tcp_opts(8080, lport, SYN | ACK, 99, 11, &wscale_255),
        ),
    );
    for p in [
        ip(
            CLIENT.into(),
            VIP.into(),
            &tcp(41000, 80, ACK, 11, 100, b"x"),
        ),
        ip(
            RS1.into(),
            LIP.into(),
            &tcp(8080, lport, ACK, 100, 12, b"y"),
        ),
    ] {
        assert!(matches!(run(&mut w, T0, &p).0, Verdict::Forward(_)));
    }
}

//! The engine as the authority over a faster path (`dataplane::offload`): when it offloads and
//! withdraws a flow, how it folds back what the faster path saw, and how expiry and the RST
//! check use it. The faster path is a recording stand-in here; the node's kernel fast path is
//! tested for real in the lab.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use dataplane::{
    FlowActivity, FlowState, Instant, L4Proto, Offload, OffloadFlow, SideActivity, TcpState,
    Verdict,
};
use parking_lot::Mutex;

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const SYNACK: u8 = 0x12;
const FIN_ACK: u8 = 0x11;
const RST: u8 = 0x04;

const T0: Instant = Instant::from_secs(1000);

/// Records offloads and withdrawals; answers activity with what a test sets.
#[derive(Debug, Default)]
struct Recorder {
    held: Mutex<HashMap<(SocketAddr, SocketAddr), OffloadFlow>>,
    offloaded: Mutex<Vec<OffloadFlow>>,
    withdrawn: Mutex<Vec<OffloadFlow>>,
    seen: Mutex<FlowActivity>,
    refuse: bool,
}

impl Offload for Recorder {
    fn offload(&self, flow: &OffloadFlow) -> bool {
        if self.refuse {
            return false;
        }
        self.offloaded.lock().push(*flow);
        self.held.lock().insert(flow.client_side.arrives, *flow);
        true
    }

    fn withdraw(&self, flow: &OffloadFlow) -> Option<FlowActivity> {
        self.held.lock().remove(&flow.client_side.arrives)?;
        self.withdrawn.lock().push(*flow);
        Some(*self.seen.lock())
    }

    fn activity(&self, flow: &OffloadFlow) -> Option<FlowActivity> {
        self.held
            .lock()
            .contains_key(&flow.client_side.arrives)
            .then(|| *self.seen.lock())
    }
}

fn client() -> SocketAddr {
    SocketAddr::new(CLIENT.into(), 40000)
}

fn vip() -> SocketAddr {
    SocketAddr::new(VIP.into(), 80)
}

/// A TCP handshake through the engine; returns the session's LIP:port.
fn handshake(w: &mut dataplane::Worker, now: Instant) -> SocketAddr {
    let (v, out) = run(
        w,
        now,
        &ip(CLIENT.into(), VIP.into(), &tcp(40000, 80, SYN, 100, 0, b"")),
    );
    assert!(matches!(v, Verdict::Forward(_)));
    let lport = u16::from_be_bytes([out[20], out[21]]);
    let (v, _) = run(
        w,
        now,
        &ip(
            RS1.into(),
            LIP.into(),
            &tcp(8080, lport, SYNACK, 500, 101, b""),
        ),
    );
    assert!(matches!(v, Verdict::Forward(_)));
    let (v, _) = run(
        w,
        now,
        &ip(
            CLIENT.into(),
            VIP.into(),
            &tcp(40000, 80, ACK, 101, 501, b""),
        ),
    );
    assert!(matches!(v, Verdict::Forward(_)));
    SocketAddr::new(LIP.into(), lport)
}

/// Packets and bytes counted for real server RS1:8080 of the VIP:80 service.
fn rs1_traffic(engine: &dataplane::Engine) -> dataplane::service::Traffic {
    let key = dataplane::ServiceKey {
        proto: L4Proto::Tcp,
        vip: vip(),
    };
    engine.snapshot().dests(&key).unwrap()[0].stats.traffic()
}

fn with_recorder(refuse: bool) -> (Arc<dataplane::Engine>, dataplane::Worker, Arc<Recorder>) {
    let (engine, w) = engine();
    let recorder = Arc::new(Recorder {
        refuse,
        ..Recorder::default()
    });
    assert!(engine.set_offload(recorder.clone()));
    (engine, w, recorder)
}

#[test]
fn test_a_tcp_flow_is_offloaded_when_established_both_sides() {
    let (_, mut w, rec) = with_recorder(false);
    let lip = handshake(&mut w, T0);
    let offloaded = rec.offloaded.lock().clone();
    assert_eq!(offloaded.len(), 1, "offloaded once, at ESTABLISHED");
    let f = offloaded[0];
    let rs = SocketAddr::new(RS1.into(), 8080);
    assert_eq!(f.proto, L4Proto::Tcp);
    assert_eq!(f.client_side.arrives, (client(), vip()));
    assert_eq!(f.client_side.leaves, (lip, rs));
    assert_eq!(f.server_side.arrives, (rs, lip));
    assert_eq!(f.server_side.leaves, (vip(), client()));
    // The engine's window edges go with it: the client sent up to 101, the server up to 501.
    assert_eq!(f.client_side.seq_end, 101);
    assert_eq!(f.server_side.seq_end, 501);
}

#[test]
fn test_a_fin_withdraws_the_flow_and_folds_its_counters() {
    let (engine, mut w, rec) = with_recorder(false);
    let lip = handshake(&mut w, T0);
    let before = rs1_traffic(&engine);
    let side = |packets, bytes, seq_end| SideActivity {
        last_seen: Some(T0),
        packets,
        bytes,
        seq_end,
        max_win: 65535,
    };
    *rec.seen.lock() = [side(10, 15_000, 101 + 14_000), side(7, 900, 501 + 500)];
    let fin = ip(
        CLIENT.into(),
        VIP.into(),
        &tcp(40000, 80, FIN_ACK, 101 + 14_000, 1001, b""),
    );
    assert!(matches!(run(&mut w, T0, &fin).0, Verdict::Forward(_)));
    assert_eq!(rec.withdrawn.lock().len(), 1);
    let after = rs1_traffic(&engine);
    // The FIN itself, plus what the faster path carried.
    assert_eq!(after.packets_in - before.packets_in, 10 + 1);
    assert_eq!(after.packets_out - before.packets_out, 7);
    assert_eq!(after.bytes_out - before.bytes_out, 900);
    let _ = lip;
}

#[test]
fn test_an_in_window_rst_counts_the_faster_path_s_edges() {
    let (engine, mut w, rec) = with_recorder(false);
    let lip = handshake(&mut w, T0);
    // The faster path carried 1 MB each way: an RST at the new edge is in window only with
    // the edges it saw.
    let side = |seq_end| SideActivity {
        last_seen: Some(T0),
        packets: 700,
        bytes: 1_000_000,
        seq_end,
        max_win: 65535,
    };
    *rec.seen.lock() = [side(101 + 1_000_000), side(501 + 1_000_000)];
    let rst = ip(
        RS1.into(),
        LIP.into(),
        &tcp(8080, lip.port(), RST, 501 + 1_000_000, 0, b""),
    );
    assert!(matches!(run(&mut w, T0, &rst).0, Verdict::Forward(_)));
    let state = engine.sessions(T0)[0].state;
    assert_eq!(state, FlowState::Tcp(TcpState::Close), "the RST closed it");
    assert_eq!(rec.withdrawn.lock().len(), 1);
}

#[test]
fn test_a_flow_the_faster_path_keeps_busy_does_not_expire() {
    let (engine, mut w, rec) = with_recorder(false);
    handshake(&mut w, T0);
    let established = Duration::from_secs(900);
    let seen = |at: Instant| SideActivity {
        last_seen: Some(at),
        packets: 1,
        bytes: 100,
        seq_end: 101,
        max_win: 0,
    };
    // Past the engine's deadline, but the faster path saw a packet a second ago.
    let later = T0.saturating_add(established + Duration::from_secs(10));
    let recent = T0.saturating_add(established + Duration::from_secs(9));
    *rec.seen.lock() = [seen(recent), SideActivity::default()];
    assert_eq!(w.expire(later, 4096), 0);
    assert_eq!(engine.sessions(later).len(), 1);
    assert!(rec.withdrawn.lock().is_empty());
    // Idle since: it expires, and is withdrawn.
    let idle = recent.saturating_add(established + Duration::from_secs(1));
    assert_eq!(w.expire(idle, 4096), 1);
    assert!(engine.sessions(idle).is_empty());
    assert_eq!(rec.withdrawn.lock().len(), 1);
}

#[test]
fn test_udp_is_offloaded_on_its_second_packet() {
    let (_, mut w, rec) = with_recorder(false);
    let q = ip(CLIENT.into(), VIP.into(), &udp(40001, 53, b"query"));
    let (v, out) = run(&mut w, T0, &q);
    assert!(matches!(v, Verdict::Forward(_)));
    assert!(
        rec.offloaded.lock().is_empty(),
        "not on the packet that opens it"
    );
    let lport = u16::from_be_bytes([out[20], out[21]]);
    let a = ip(RS1.into(), LIP.into(), &udp(5353, lport, b"answer"));
    assert!(matches!(run(&mut w, T0, &a).0, Verdict::Forward(_)));
    let offloaded = rec.offloaded.lock().clone();
    assert_eq!(offloaded.len(), 1);
    assert_eq!(offloaded[0].proto, L4Proto::Udp);
}

/// A one-way UDP flow (a stream to a sink) is offloaded on its second datagram, before any
/// reply: no longer a single datagram that may be spoofed, it keeps its port when the pool runs
/// out, where a flow of one unanswered datagram would give it up (see `pressure.rs`).
#[test]
fn test_an_offloaded_one_way_udp_flow_is_not_evicted() {
    let config = dataplane::EngineConfig {
        local_ports: 2000..=2000,
        ..small_config()
    };
    let (engine, mut w) = engine_with(&services(), config);
    let recorder = Arc::new(Recorder::default());
    assert!(engine.set_offload(recorder.clone()));
    let dgram = |cport| ip(CLIENT.into(), VIP.into(), &udp(cport, 53, b"log line"));
    for _ in 0..2 {
        assert!(matches!(
            run(&mut w, T0, &dgram(5000)).0,
            Verdict::Forward(_)
        ));
    }
    assert_eq!(recorder.offloaded.lock().len(), 1);
    assert_eq!(
        run(&mut w, T0, &dgram(5001)).0,
        Verdict::Drop(dataplane::DropReason::NoLocalPort)
    );
    assert_eq!(
        engine.counters().events(dataplane::Event::EmbryonicEvicted),
        0
    );
}

#[test]
fn test_a_refused_flow_stays_with_the_engine_and_is_not_asked_again() {
    let (_, mut w, rec) = with_recorder(true);
    let lip = handshake(&mut w, T0);
    for seq in 0..3 {
        let data = ip(
            RS1.into(),
            LIP.into(),
            &tcp(8080, lip.port(), ACK, 501 + seq, 101, b"x"),
        );
        assert!(matches!(run(&mut w, T0, &data).0, Verdict::Forward(_)));
    }
    assert!(rec.offloaded.lock().is_empty());
    assert!(rec.held.lock().is_empty());
}

#[test]
fn test_a_session_from_a_peer_is_offloaded_and_a_removal_or_reconcile_withdraws_it() {
    let (engine, mut w, rec) = with_recorder(false);
    handshake(&mut w, T0);
    let record = engine.sessions(T0)[0];
    // The same flow as a peer would send it, to another engine.
    let (other, _, other_rec) = {
        let (e, w) = engine_with(&services(), small_config());
        let r = Arc::new(Recorder::default());
        assert!(e.set_offload(r.clone()));
        (e, w, r)
    };
    let mut peer = record;
    peer.local = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(198, 19, 200, 2)), 2000);
    let owner = dataplane::Authority::Owner { mark: 1 };
    other.install(T0, &peer, owner).unwrap();
    assert_eq!(other_rec.offloaded.lock().len(), 1);
    assert_eq!(other.remove(&peer), Ok(true));
    assert_eq!(other_rec.withdrawn.lock().len(), 1);
    // A copy its owner's next table stream does not confirm goes, and its entries with it.
    other.install(T0, &peer, owner).unwrap();
    assert_eq!(other_rec.offloaded.lock().len(), 2);
    assert_eq!(other.reconcile(&[peer.local.ip()], 2), 1);
    assert_eq!(other_rec.withdrawn.lock().len(), 2);
    let _ = rec;
}

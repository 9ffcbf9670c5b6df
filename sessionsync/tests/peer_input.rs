//! Whatever a peer sends goes through the core into a real engine without a panic: arbitrary
//! batches (any stamps, stream markers and requests, records naming any addresses, states,
//! windows and remaining times), then a packet of every flow installed, both ways, then expiry.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

use dataplane::sched::{MaglevParams, SchedulerKind};
use dataplane::tcp_state::TcpWindow;
use dataplane::{
    BackendConfig, Engine, EngineConfig, FlowState, L4Checksum, L4Proto, Packet, ServiceConfig,
    SessionRecord, Snapshot, TcpState, Timeouts,
};
use proptest::prelude::*;
use sessionsync::codec::{self, Batch, BulkRequest, Entry, TableEnd};
use sessionsync::{Apply, Config, Core, Output};

const VIP: &str = "198.18.100.1:80";
const BACKEND: &str = "198.18.3.10:8080";
/// The peer's LIP, this node's, and one nobody has.
const LIPS: [[u8; 4]; 3] = [[198, 19, 200, 1], [198, 19, 200, 2], [198, 19, 250, 1]];

fn addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        Just(VIP.parse().unwrap()),
        Just(BACKEND.parse().unwrap()),
        (0..LIPS.len(), 1024u16..1100).prop_map(|(i, p)| SocketAddr::from((LIPS[i], p))),
        (any::<u8>(), any::<u16>()).prop_map(|(h, p)| SocketAddr::from(([10, 0, 0, h], p))),
        Just("[2001:db8::1]:80".parse().unwrap()),
    ]
}

/// Tracking as a sound peer sends it (scales up to 14, or none) and as any peer could.
fn window() -> impl Strategy<Value = TcpWindow> {
    let scale = prop_oneof![0u8..=14, Just(255)];
    prop_oneof![
        (
            any::<[u32; 2]>(),
            0u32..(1 << 30),
            [scale.clone(), scale],
            any::<[bool; 2]>()
        ),
        (
            any::<[u32; 2]>(),
            any::<u32>(),
            [any::<u8>(), any::<u8>()],
            any::<[bool; 2]>()
        ),
    ]
    .prop_map(|(end, max_win, wscale, seen)| {
        serde_json::from_value(serde_json::json!({
            "end": end, "max_win": [max_win, max_win], "wscale": wscale, "seen": seen,
        }))
        .unwrap()
    })
}

fn state() -> impl Strategy<Value = FlowState> {
    prop_oneof![
        Just(FlowState::Udp),
        proptest::sample::select(vec![
            TcpState::None,
            TcpState::SynRecv,
            TcpState::Established,
            TcpState::FinWait,
            TcpState::Close,
        ])
        .prop_map(FlowState::Tcp),
    ]
}

/// Client, VIP, LIP:port and real server: as a flow of the service, or anything.
fn addrs() -> impl Strategy<Value = (SocketAddr, SocketAddr, SocketAddr, SocketAddr)> {
    prop_oneof![
        ((any::<u8>(), any::<u16>()), 0..LIPS.len(), 1024u16..1040).prop_map(|((h, p), l, lp)| (
            SocketAddr::from(([10, 0, 0, h % 4], p % 4)),
            VIP.parse().unwrap(),
            SocketAddr::from((LIPS[l], lp)),
            BACKEND.parse().unwrap(),
        )),
        (addr(), addr(), addr(), addr()),
    ]
}

fn entry() -> impl Strategy<Value = Entry> {
    (
        (proptest::bool::weighted(0.2), addrs()),
        (state(), window(), any::<u32>(), any::<bool>()),
        any::<bool>(),
        proptest::option::of(any::<u32>()),
    )
        .prop_map(
            |(
                (udp, (client, vip, local, backend)),
                (state, window, expires, synced),
                closed,
                age,
            )| {
                Entry {
                    record: SessionRecord {
                        proto: if udp { L4Proto::Udp } else { L4Proto::Tcp },
                        client,
                        vip,
                        local,
                        backend,
                        state,
                        window,
                        expires_in_secs: expires,
                        synced,
                        syn_proxy: None,
                    },
                    closed,
                    age_us: age,
                }
            },
        )
}

fn batch() -> impl Strategy<Value = Batch> {
    (
        (0u64..3, any::<u64>()),
        proptest::option::of(0u64..4),
        proptest::collection::vec(entry(), 0..8),
        proptest::option::of((0u64..4, any::<bool>())),
        proptest::option::of((0u64..4, any::<bool>(), proptest::option::of(0u64..4))),
    )
        .prop_map(|((epoch, seq), start, entries, request, end)| Batch {
            from: "a".into(),
            to: "b".into(),
            epoch,
            seq: seq % 4,
            table_start: start,
            entries,
            bulk_request: request.map(|(id, own_flows)| BulkRequest { id, own_flows }),
            table_end: end.map(|(stream, complete, request)| TableEnd {
                stream,
                complete,
                request,
            }),
        })
}

/// A TCP ACK (or a UDP datagram) from `src` to `dst`; checksums are not the point.
fn packet(udp: bool, src: SocketAddr, dst: SocketAddr) -> Option<Vec<u8>> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
        return None;
    };
    let l4: Vec<u8> = if udp {
        [
            &src.port().to_be_bytes()[..],
            &dst.port().to_be_bytes(),
            &[0, 9, 0, 0, 1],
        ]
        .concat()
    } else {
        [
            &src.port().to_be_bytes()[..],
            &dst.port().to_be_bytes(),
            &[0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0],
        ]
        .concat()
    };
    let len = 20 + l4.len() as u16;
    let proto = if udp { 17 } else { 6 };
    let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0];
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&s.octets());
    p.extend_from_slice(&d.octets());
    p.extend_from_slice(&l4);
    Some(p)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(5000))]

    #[test]
    fn prop_arbitrary_batches_never_panic_the_core_or_the_engine(
        batches in proptest::collection::vec(batch(), 1..6),
    ) {
        let now = Instant::now();
        let at = dataplane::Instant::from_secs(1000);
        let mut core = Core::new("b", 1, Config::default(), now).unwrap();
        core.set_peers(&["a"]);
        core.set_lips(&[
            ("a".to_owned(), vec![IpAddr::V4(Ipv4Addr::from(LIPS[0]))]),
            ("b".to_owned(), vec![IpAddr::V4(Ipv4Addr::from(LIPS[1]))]),
        ]);
        core.peer_connected("a");
        let service = |proto| ServiceConfig {
            vip: VIP.parse().unwrap(),
            proto,
            scheduler: SchedulerKind::Rr,
            timeouts: Timeouts::default(),
            toa: false,
            conn_reuse: dataplane::ConnReuse::default(),
            syn_proxy: dataplane::SynProxy::default(),
            backends: vec![BackendConfig { addr: BACKEND.parse().unwrap(), weight: 1, healthy: true }],
        };
        let snap = Snapshot::new(1, &[service(L4Proto::Tcp), service(L4Proto::Udp)], MaglevParams::default(), None).unwrap();
        let engine = Engine::new(
            EngineConfig {
                max_sessions_v4: 256,
                max_sessions_v6: 16,
                local_addrs: vec![IpAddr::V4(Ipv4Addr::from(LIPS[1]))],
                ..EngineConfig::default()
            },
            snap,
        )
        .unwrap();
        let mut worker = engine.worker();
        let mut seq = 0;
        for mut b in batches {
            // Mostly in sequence, with gaps and repeats.
            seq = (seq + b.seq).saturating_sub(1);
            b.seq = seq;
            core.handle_frame(now, "a", &codec::encode(&b).unwrap());
            while let Some(out) = core.poll_output(now) {
                match out {
                    Output::TableWanted => core.handle_table(engine.sessions(at)),
                    Output::Apply(Apply::Install(r, authority)) => {
                        if engine.install(at, &r, authority).is_ok() {
                            let udp = r.proto == L4Proto::Udp;
                            for p in [packet(udp, r.client, r.vip), packet(udp, r.backend, r.local)]
                                .into_iter()
                                .flatten()
                            {
                                let mut buf = p.clone();
                                let mut pkt = Packet::new(&mut buf, p.len(), L4Checksum::Verified);
                                let _ = worker.process(at, &mut pkt);
                            }
                        }
                    }
                    Output::Apply(Apply::Remove(r)) => {
                        let _ = engine.remove(&r);
                    }
                    Output::Apply(Apply::Reconcile { lips, mark }) => {
                        engine.reconcile(&lips, mark);
                    }
                }
            }
            while core.poll_transmit(now, "a").is_some() {}
        }
        worker.expire(dataplane::Instant::from_secs(u64::from(u32::MAX) * 2), 4096);
        prop_assert_eq!(engine.session_count(), 0);
    }
}

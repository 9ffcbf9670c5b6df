//! Fuzzes the frame decoder and the core's frame input: arbitrary bytes, as a frame from a
//! connected peer, and as the body of a current-version frame. What the core hands out is
//! applied to a real engine (with a service, and LIPs for this node and the peer), and a packet
//! of every flow installed goes through it both ways. Nothing may panic, and whatever decodes
//! must encode again.
#![no_main]

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use dataplane::sched::{MaglevParams, SchedulerKind};
use dataplane::{
    BackendConfig, Engine, EngineConfig, L4Checksum, L4Proto, Packet, ServiceConfig, Snapshot,
    Timeouts, Worker,
};
use libfuzzer_sys::fuzz_target;
use sessionsync::{Apply, Config, Core, Output, codec};

struct Node {
    core: Core,
    engine: Arc<Engine>,
    worker: Worker,
}

fn node() -> &'static Mutex<Node> {
    static NODE: OnceLock<Mutex<Node>> = OnceLock::new();
    NODE.get_or_init(|| {
        let mut core = Core::new("b", 1, Config::default(), Instant::now()).unwrap();
        core.set_peers(&["a"]);
        core.set_lips(&[
            ("a".to_owned(), vec!["198.19.200.1".parse().unwrap()]),
            ("b".to_owned(), vec!["198.19.200.2".parse().unwrap()]),
        ]);
        core.peer_connected("a");
        let service = ServiceConfig {
            vip: "198.18.100.1:80".parse().unwrap(),
            proto: L4Proto::Tcp,
            scheduler: SchedulerKind::Maglev,
            timeouts: Timeouts::default(),
            toa: false,
            conn_reuse: dataplane::ConnReuse::default(),
            syn_proxy: dataplane::SynProxy::default(),
            backends: vec![BackendConfig {
                addr: "198.18.3.10:8080".parse().unwrap(),
                weight: 1,
                healthy: true,
            }],
        };
        let snap = Snapshot::new(1, &[service], MaglevParams::default(), None).unwrap();
        let config = EngineConfig {
            max_sessions_v4: 4096,
            max_sessions_v6: 64,
            local_addrs: vec!["198.19.200.2".parse::<IpAddr>().unwrap()],
            ..EngineConfig::default()
        };
        let engine = Engine::new(config, snap).unwrap();
        let worker = engine.worker();
        Mutex::new(Node {
            core,
            engine,
            worker,
        })
    })
}

/// A minimal TCP segment (ACK, a window of 1000) from `src` to `dst`, checksums left for the
/// engine to find wrong or right: its window arithmetic runs either way on the established path.
fn segment(src: SocketAddr, dst: SocketAddr) -> Option<Vec<u8>> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
        return None;
    };
    let mut p = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
    p.extend_from_slice(&s.octets());
    p.extend_from_slice(&d.octets());
    p.extend_from_slice(&src.port().to_be_bytes());
    p.extend_from_slice(&dst.port().to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x10, 0x03, 0xe8, 0, 0, 0, 0]);
    Some(p)
}

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = codec::decode(data) {
        let _ = codec::encode(&batch);
    }
    let mut framed = Vec::with_capacity(data.len() + 1);
    framed.push(codec::VERSION);
    framed.extend_from_slice(data);
    let now = Instant::now();
    let at = dataplane::Instant::from_secs(1000);
    let mut node = node().lock().unwrap();
    let Node {
        core,
        engine,
        worker,
    } = &mut *node;
    core.handle_frame(now, "a", data);
    core.handle_frame(now, "a", &framed);
    while let Some(out) = core.poll_output(now) {
        match out {
            Output::TableWanted => core.handle_table(engine.sessions(at)),
            Output::Apply(Apply::Install(r, authority)) => {
                if engine.install(at, &r, authority).is_ok() {
                    for p in [segment(r.client, r.vip), segment(r.backend, r.local)]
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
    worker.expire(dataplane::Instant::from_secs(1_000_000), 4096);
});

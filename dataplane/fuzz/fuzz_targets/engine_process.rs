//! Fuzzes the engine's packet entry point: arbitrary bytes, in either checksum mode, against an
//! engine with IPv4 and IPv6 services, TOA on, and some sessions already open. Nothing may panic.
#![no_main]

use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, OnceLock};

use dataplane::sched::{MaglevParams, SchedulerKind};
use dataplane::{
    BackendConfig, Engine, EngineConfig, Instant, L4Checksum, L4Proto, Packet, ServiceConfig, Snapshot, Timeouts, Worker,
};
use libfuzzer_sys::fuzz_target;

fn worker() -> &'static Mutex<Worker> {
    static WORKER: OnceLock<Mutex<Worker>> = OnceLock::new();
    WORKER.get_or_init(|| {
        let svc = |vip: &str, proto, rs: &str| ServiceConfig {
            vip: vip.parse::<SocketAddr>().unwrap(),
            proto,
            scheduler: SchedulerKind::Maglev,
            timeouts: Timeouts::default(),
            toa: true,
            conn_reuse: dataplane::ConnReuse::default(),
            syn_proxy: dataplane::SynProxy::default(),
            backends: vec![BackendConfig { addr: rs.parse().unwrap(), weight: 1, healthy: true }],
        };
        let services = [
            svc("198.18.100.1:80", L4Proto::Tcp, "198.18.3.10:8080"),
            svc("198.18.100.1:53", L4Proto::Udp, "198.18.3.10:53"),
            svc("[2001:db8:100::1]:80", L4Proto::Tcp, "[2001:db8:3::10]:8080"),
        ];
        let snap = Snapshot::new(1, &services, MaglevParams::default(), None).unwrap();
        let config = EngineConfig {
            max_sessions_v4: 4096,
            max_sessions_v6: 4096,
            local_addrs: vec!["198.19.200.1".parse::<IpAddr>().unwrap(), "2001:db8:200::1".parse().unwrap()],
            ..EngineConfig::default()
        };
        Mutex::new(Engine::new(config, snap).unwrap().worker())
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else { return };
    let csum = match mode % 3 {
        0 => L4Checksum::Unverified,
        1 => L4Checksum::Verified,
        _ => L4Checksum::Partial,
    };
    let mut worker = worker().lock().unwrap();
    let mut buf = vec![0u8; bytes.len() + 64];
    buf[..bytes.len()].copy_from_slice(bytes);
    let mut pkt = Packet::new(&mut buf, bytes.len(), csum);
    let _ = worker.process(Instant::from_secs(1), &mut pkt);
    worker.expire(Instant::from_secs(u64::from(mode)), 64);
});

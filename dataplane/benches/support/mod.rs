//! What the engine benchmarks share: an engine with IPv4 and IPv6 Maglev services and 20 LIPs
//! per family, and the SYNs of numbered flows.
// Shared by several bench binaries, each of which uses only part of it.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use dataplane::sched::{MaglevParams, SchedulerKind};
use dataplane::{Engine, EngineConfig, L4Proto, Snapshot, Worker};

use crate::common::{SYN, backend, ip, service, tcp};

pub(crate) const SESSIONS: u32 = 1_000_000;

pub(crate) fn vip4() -> IpAddr {
    Ipv4Addr::new(198, 18, 100, 1).into()
}

pub(crate) fn vip6() -> IpAddr {
    "2001:db8:100::1".parse().unwrap()
}

pub(crate) fn lips() -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = (1..=20)
        .map(|i| Ipv4Addr::new(198, 19, 200, i).into())
        .collect();
    v.extend((1..=20u16).map(|i| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 200, 0, 0, 0, 0, i))));
    v
}

pub(crate) fn engine(max_v4: u32, max_v6: u32) -> (Arc<Engine>, Worker) {
    let backends4 = (0..10)
        .map(|i| backend(Ipv4Addr::new(198, 18, 3, 10 + i).into(), 8080, 1))
        .collect();
    let backends6 = (0..10u16)
        .map(|i| {
            backend(
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 10 + i)),
                8080,
                1,
            )
        })
        .collect();
    let mut services = vec![
        service(vip4(), 80, L4Proto::Tcp, backends4),
        service(vip6(), 80, L4Proto::Tcp, backends6),
    ];
    for s in &mut services {
        s.scheduler = SchedulerKind::Maglev;
    }
    let snap = Snapshot::new(1, &services, MaglevParams::default(), None).unwrap();
    let config = EngineConfig {
        max_sessions_v4: max_v4,
        max_sessions_v6: max_v6,
        local_addrs: lips(),
        event_capacity: 64,
        ..EngineConfig::default()
    };
    let engine = Engine::new(config, snap).unwrap();
    let worker = engine.worker();
    (engine, worker)
}

/// The client of flow `i`: 1,000 ports on each of 1,000+ addresses in 198.19.0.0/16.
pub(crate) fn client(i: u32, v6: bool) -> (IpAddr, u16) {
    let port = 10_000 + (i % 1000) as u16;
    if v6 {
        (
            IpAddr::V6(Ipv6Addr::from(
                0x2001_0db8_0001_0000_0000_0000_0000_0000u128 + u128::from(i / 1000),
            )),
            port,
        )
    } else {
        (Ipv4Addr::from(0xc613_0000 + i / 1000).into(), port)
    }
}

pub(crate) fn syn(i: u32, v6: bool) -> Vec<u8> {
    let (c, port) = client(i, v6);
    ip(
        c,
        if v6 { vip6() } else { vip4() },
        &tcp(port, 80, SYN, i, 0, b""),
    )
}

/// The baseline the session table is measured against: a `DashMap` from both keys of a flow
/// to one shared, locked session of the same payload size as an IPv4 session slot.
pub(crate) mod dashmap_baseline {
    use std::sync::Arc;

    use dashmap::DashMap;
    use parking_lot::Mutex;

    /// Protocol, source, destination, ports: the key of one direction.
    pub(crate) type Key = (u8, [u8; 4], [u8; 4], u16, u16);

    /// As many bytes as an IPv4 session holds (addresses, ports, state, window, deadline,
    /// real-server reference).
    #[derive(Debug, Default)]
    pub(crate) struct Session {
        pub(crate) words: [u64; 7],
    }

    pub(crate) type Table = DashMap<Key, Arc<Mutex<Session>>>;

    pub(crate) fn client_key(i: u32) -> Key {
        (
            6,
            (0xc613_0000 + i / 1000).to_be_bytes(),
            [198, 18, 100, 1],
            10_000 + (i % 1000) as u16,
            80,
        )
    }

    pub(crate) fn server_key(i: u32) -> Key {
        (
            6,
            [198, 18, 3, 10 + (i % 10) as u8],
            [198, 19, 200, 1 + (i % 20) as u8],
            8080,
            1024 + (i / 20 % 60_000) as u16,
        )
    }

    /// A table presized for `n` sessions (2n keys), as the session table is.
    pub(crate) fn filled(n: u32) -> Table {
        let table = DashMap::with_capacity(2 * n as usize);
        for i in 0..n {
            let s = Arc::new(Mutex::new(Session::default()));
            table.insert(client_key(i), s.clone());
            table.insert(server_key(i), s);
        }
        table
    }
}

//! Test-side packet builder and checker, written independently of the crate's `wire` module so
//! that the engine's output is judged by a second implementation: every checksum here is a full
//! recompute over the bytes.
#![allow(dead_code, unreachable_pub)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use dataplane::sched::{MaglevParams, SchedulerKind};
use dataplane::{
    BackendConfig, Direction, Engine, EngineConfig, Instant, L4Checksum, L4Proto, Packet,
    ServiceConfig, SessionEvent, SessionRecord, Snapshot, Timeouts, Verdict, Worker,
};

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const FIN: u8 = 0x01;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;

pub fn sum16(data: &[u8]) -> u32 {
    let mut s = 0u32;
    for chunk in data.chunks(2) {
        let w = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from(chunk[0]) << 8
        };
        s += u32::from(w);
    }
    s
}

pub fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut s = 0;
    match (src, dst) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            s += sum16(&a.octets()) + sum16(&b.octets());
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            s += sum16(&a.octets()) + sum16(&b.octets());
        }
        _ => panic!("mixed families"),
    }
    s + u32::from(proto) + len as u32
}

/// The pseudo-header sum as virtio-net NEEDS_CSUM leaves it in the L4 checksum field.
pub fn partial_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u16 {
    fold(pseudo(src, dst, proto, len))
}

pub fn l4_checksum(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> u16 {
    let c = !fold(pseudo(src, dst, proto, l4.len()) + sum16(l4));
    if proto == 17 && c == 0 { 0xffff } else { c }
}

/// An L4 segment description.
#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        window: u16,
        options: Vec<u8>,
        payload: Vec<u8>,
    },
    Udp {
        sport: u16,
        dport: u16,
        payload: Vec<u8>,
    },
    /// ICMP (v4 or v6 by the addresses) with type, code, the 4 bytes after the checksum, and data.
    Icmp {
        typ: u8,
        code: u8,
        rest: [u8; 4],
        data: Vec<u8>,
    },
}

impl L4 {
    /// The same segment between other ports: what a peer answering a translated packet sends.
    pub fn with_ports(mut self, new_sport: u16, new_dport: u16) -> L4 {
        match &mut self {
            L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport, .. } => {
                *sport = new_sport;
                *dport = new_dport;
            }
            L4::Icmp { .. } => {}
        }
        self
    }
}

pub fn tcp(sport: u16, dport: u16, flags: u8, seq: u32, ack: u32, payload: &[u8]) -> L4 {
    tcp_segment(sport, dport, flags, seq, ack, &[], payload)
}

/// A payload-free segment carrying TCP `options` (a multiple of 4 bytes).
pub fn tcp_opts(sport: u16, dport: u16, flags: u8, seq: u32, ack: u32, options: &[u8]) -> L4 {
    tcp_segment(sport, dport, flags, seq, ack, options, &[])
}

fn tcp_segment(
    sport: u16,
    dport: u16,
    flags: u8,
    seq: u32,
    ack: u32,
    options: &[u8],
    payload: &[u8],
) -> L4 {
    L4::Tcp {
        sport,
        dport,
        seq,
        ack,
        flags,
        window: 64240,
        options: options.to_vec(),
        payload: payload.to_vec(),
    }
}

pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> L4 {
    L4::Udp {
        sport,
        dport,
        payload: payload.to_vec(),
    }
}

/// Fills the zeroed checksum field at `at` of a TCP or UDP segment; returns the protocol with
/// the segment, as `l4_bytes` does.
fn with_l4_checksum(
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    mut segment: Vec<u8>,
    at: usize,
) -> (u8, Vec<u8>) {
    let c = l4_checksum(src, dst, proto, &segment);
    segment[at..at + 2].copy_from_slice(&c.to_be_bytes());
    (proto, segment)
}

fn l4_bytes(src: IpAddr, dst: IpAddr, l4: &L4) -> (u8, Vec<u8>) {
    match l4 {
        L4::Tcp {
            sport,
            dport,
            seq,
            ack,
            flags,
            window,
            options,
            payload,
        } => {
            assert!(options.len() % 4 == 0);
            let hl = 20 + options.len();
            let mut b = Vec::with_capacity(hl + payload.len());
            b.extend_from_slice(&sport.to_be_bytes());
            b.extend_from_slice(&dport.to_be_bytes());
            b.extend_from_slice(&seq.to_be_bytes());
            b.extend_from_slice(&ack.to_be_bytes());
            b.push(((hl / 4) as u8) << 4);
            b.push(*flags);
            b.extend_from_slice(&window.to_be_bytes());
            b.extend_from_slice(&[0, 0, 0, 0]);
            b.extend_from_slice(options);
            b.extend_from_slice(payload);
            with_l4_checksum(src, dst, 6, b, 16)
        }
        L4::Udp {
            sport,
            dport,
            payload,
        } => {
            let mut b = Vec::new();
            b.extend_from_slice(&sport.to_be_bytes());
            b.extend_from_slice(&dport.to_be_bytes());
            b.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            b.extend_from_slice(&[0, 0]);
            b.extend_from_slice(payload);
            with_l4_checksum(src, dst, 17, b, 6)
        }
        L4::Icmp {
            typ,
            code,
            rest,
            data,
        } => {
            let mut b = vec![*typ, *code, 0, 0];
            b.extend_from_slice(rest);
            b.extend_from_slice(data);
            let (proto, c) = if src.is_ipv4() {
                (1, !fold(sum16(&b)))
            } else {
                (58, !fold(pseudo(src, dst, 58, b.len()) + sum16(&b)))
            };
            b[2..4].copy_from_slice(&c.to_be_bytes());
            (proto, b)
        }
    }
}

/// A complete IPv4 or IPv6 packet (no options, DF set, TTL/hop limit 64).
pub fn ip(src: IpAddr, dst: IpAddr, l4: &L4) -> Vec<u8> {
    let (proto, body) = l4_bytes(src, dst, l4);
    ip_raw(src, dst, proto, &body)
}

pub fn ip_raw(src: IpAddr, dst: IpAddr, proto: u8, body: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut b = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, proto, 0, 0];
            b[2..4].copy_from_slice(&((20 + body.len()) as u16).to_be_bytes());
            b.extend_from_slice(&s.octets());
            b.extend_from_slice(&d.octets());
            let c = !fold(sum16(&b));
            b[10..12].copy_from_slice(&c.to_be_bytes());
            b.extend_from_slice(body);
            b
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut b = vec![0x60, 0, 0, 0];
            b.extend_from_slice(&(body.len() as u16).to_be_bytes());
            b.push(proto);
            b.push(64);
            b.extend_from_slice(&s.octets());
            b.extend_from_slice(&d.octets());
            b.extend_from_slice(body);
            b
        }
        _ => panic!("mixed families"),
    }
}

/// Checks every checksum of a packet by full recompute: IPv4 header, L4 (TCP, UDP unless zero
/// over IPv4, ICMP, ICMPv6), and for ICMP errors the quoted IPv4 header.
pub fn assert_checksums_ok(p: &[u8]) {
    let (src, dst, proto, l4): (IpAddr, IpAddr, u8, &[u8]) = match p[0] >> 4 {
        4 => {
            let hl = usize::from(p[0] & 0xf) * 4;
            assert_eq!(fold(sum16(&p[..hl])), 0xffff, "IPv4 header checksum");
            let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
            assert_eq!(total, p.len(), "IPv4 total length");
            let s = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
            let d = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
            (s.into(), d.into(), p[9], &p[hl..])
        }
        6 => {
            let plen = usize::from(u16::from_be_bytes([p[4], p[5]]));
            assert_eq!(plen + 40, p.len(), "IPv6 payload length");
            let s: [u8; 16] = p[8..24].try_into().unwrap();
            let d: [u8; 16] = p[24..40].try_into().unwrap();
            // Walk extension headers (hop-by-hop, routing, destination options).
            let (mut next, mut off) = (p[6], 40);
            while matches!(next, 0 | 43 | 60) {
                next = p[off];
                off += (usize::from(p[off + 1]) + 1) * 8;
            }
            (
                Ipv6Addr::from(s).into(),
                Ipv6Addr::from(d).into(),
                next,
                &p[off..],
            )
        }
        v => panic!("IP version {v}"),
    };
    match proto {
        6 | 58 => assert_eq!(
            fold(pseudo(src, dst, proto, l4.len()) + sum16(l4)),
            0xffff,
            "L4 checksum"
        ),
        17 => {
            let c = u16::from_be_bytes([l4[6], l4[7]]);
            if !(c == 0 && src.is_ipv4()) {
                assert_eq!(
                    fold(pseudo(src, dst, 17, l4.len()) + sum16(l4)),
                    0xffff,
                    "UDP checksum"
                );
            }
        }
        1 => {
            assert_eq!(fold(sum16(l4)), 0xffff, "ICMP checksum");
            let inner = &l4[8..];
            let hl = usize::from(inner[0] & 0xf) * 4;
            assert_eq!(
                fold(sum16(&inner[..hl])),
                0xffff,
                "quoted IPv4 header checksum"
            );
        }
        other => panic!("unexpected protocol {other}"),
    }
}

pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
pub const RS1: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 10);
pub const RS2: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 11);
pub const LIP: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 1);
pub const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 1);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 10);
pub const RS6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 10);
pub const LIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 200, 0, 0, 0, 0, 1);

pub fn backend(addr: IpAddr, port: u16, weight: u32) -> BackendConfig {
    BackendConfig {
        addr: SocketAddr::new(addr, port),
        weight,
        healthy: true,
    }
}

pub fn service(
    vip: IpAddr,
    port: u16,
    proto: L4Proto,
    backends: Vec<BackendConfig>,
) -> ServiceConfig {
    ServiceConfig {
        vip: SocketAddr::new(vip, port),
        proto,
        scheduler: SchedulerKind::Rr,
        timeouts: Timeouts::default(),
        toa: false,
        conn_reuse: dataplane::ConnReuse::default(),
        syn_proxy: dataplane::SynProxy::default(),
        backends,
    }
}

/// The usual lab: TCP and UDP services on an IPv4 VIP and a TCP service on an IPv6 VIP, one
/// real server each, one LIP per family.
pub fn services() -> Vec<ServiceConfig> {
    vec![
        service(
            VIP.into(),
            80,
            L4Proto::Tcp,
            vec![backend(RS1.into(), 8080, 1)],
        ),
        service(
            VIP.into(),
            53,
            L4Proto::Udp,
            vec![backend(RS1.into(), 5353, 1)],
        ),
        service(
            VIP6.into(),
            80,
            L4Proto::Tcp,
            vec![backend(RS6.into(), 8080, 1)],
        ),
    ]
}

pub fn engine_with(services: &[ServiceConfig], config: EngineConfig) -> (Arc<Engine>, Worker) {
    let snap = Snapshot::new(1, services, MaglevParams::default(), None).expect("snapshot");
    let engine = Engine::new(config, snap).expect("engine");
    let worker = engine.worker();
    (engine, worker)
}

pub fn small_config() -> EngineConfig {
    EngineConfig {
        max_sessions_v4: 1024,
        max_sessions_v6: 256,
        local_addrs: vec![LIP.into(), LIP6.into()],
        ..EngineConfig::default()
    }
}

pub fn engine() -> (Arc<Engine>, Worker) {
    engine_with(&services(), small_config())
}

/// Runs one packet through the worker; returns the verdict and the bytes as they leave.
pub fn run(worker: &mut Worker, now: Instant, input: &[u8]) -> (Verdict, Vec<u8>) {
    run_with(worker, now, input, L4Checksum::Unverified)
}

pub fn run_with(
    worker: &mut Worker,
    now: Instant,
    input: &[u8],
    csum: L4Checksum,
) -> (Verdict, Vec<u8>) {
    let mut buf = vec![0u8; input.len() + 64];
    buf[..input.len()].copy_from_slice(input);
    let mut pkt = Packet::new(&mut buf, input.len(), csum);
    let v = worker.process(now, &mut pkt);
    let out = pkt.data().to_vec();
    (v, out)
}

/// The record of the last `Created` event.
pub fn created(worker: &mut Worker) -> SessionRecord {
    let created: Vec<SessionRecord> = worker
        .drain_events()
        .filter_map(|e| match e {
            SessionEvent::Created(r) => Some(r),
            _ => None,
        })
        .collect();
    *created.last().expect("a Created event")
}

/// Opens a TCP flow from CLIENT:`cport` to VIP:80 and completes its handshake (SYN, the real
/// server's SYN-ACK, the client's ACK); returns the session's record.
pub fn handshake(worker: &mut Worker, now: Instant, cport: u16) -> SessionRecord {
    let (client, vip) = (IpAddr::V4(CLIENT), IpAddr::V4(VIP));
    let (v, _) = run(
        worker,
        now,
        &ip(client, vip, &tcp(cport, 80, SYN, 1000, 0, b"")),
    );
    assert_eq!(v, Verdict::Forward(Direction::Inbound), "SYN from {cport}");
    let rec = created(worker);
    let synack = tcp(
        rec.backend.port(),
        rec.local.port(),
        SYN | ACK,
        5000,
        1001,
        b"",
    );
    let (v, _) = run(worker, now, &ip(rec.backend.ip(), rec.local.ip(), &synack));
    assert_eq!(
        v,
        Verdict::Forward(Direction::Outbound),
        "SYN-ACK to {cport}"
    );
    let (v, _) = run(
        worker,
        now,
        &ip(client, vip, &tcp(cport, 80, ACK, 1001, 5001, b"")),
    );
    assert_eq!(v, Verdict::Forward(Direction::Inbound), "ACK from {cport}");
    rec
}

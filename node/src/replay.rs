//! `lbcluster replay`: runs the real Full-NAT engine over a generated packet trace.
//!
//! The trace is built from the seed alone, so two runs with the same arguments send the same
//! packets. The real servers are simulated: each answer is addressed to whatever local address,
//! port and backend the engine put on the packet it answers, so a flow only completes if the
//! engine translated it consistently. Every forwarded packet is parsed back with the crate's own
//! wire views and checked against what Full-NAT requires; the engine's counters are checked
//! against the replay's own tally at the end. Any disagreement fails the replay.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use dataplane::laddr::LipUsage;
use dataplane::sched::{MaglevParams, SchedulerKind};
use dataplane::service::Dest;
use dataplane::wire::{
    Icmpv4Message, Icmpv4Packet, Icmpv6Message, Icmpv6Packet, IpProtocol, Ipv4Packet, Ipv4Repr,
    Ipv6Packet, Ipv6Repr, TcpControl, TcpOption, TcpOptions, TcpPacket, TcpRepr, UdpPacket,
    UdpRepr, checksum,
};
use dataplane::{
    BackendConfig, Direction, DropReason, Engine, EngineConfig, Event, FlowState, Instant,
    L4Checksum, L4Proto, Packet, ServiceConfig, ServiceKey, SessionEvent, Snapshot, TcpState,
    Timeouts, Verdict, Worker,
};
use serde::Serialize;

use crate::api::{SessionEntry, scheduler_name};

const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1);
const LIP4: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 1);
const LIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 1);
/// Routers on the real-server side, which send the "packet too big" errors.
const ROUTER4: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 1);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 1);
/// Bad packets come from their own /24 so they can never match a generated flow's session.
const BAD_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 9, 9);

/// Sessions the trace leaves behind are listed up to this many.
const LISTED_SESSIONS: usize = 10;
/// Room past the longest packet so the engine can insert TOA into a SYN.
const SCRATCH_LEN: usize = 2048;
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: lab.example\r\n\r\n";

/// What to replay.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    pub(crate) flows: u32,
    pub(crate) seed: u64,
}

/// Everything the replay observed; the text and the JSON output both render this one struct.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub(crate) seed: u64,
    pub(crate) trace: TraceSummary,
    pub(crate) counters: CounterReport,
    pub(crate) services: Vec<ServiceReport>,
    pub(crate) local_addrs: Vec<LipUsage>,
    /// Sessions still in the table after the final expiry sweep.
    pub(crate) sessions_total: usize,
    /// The first sessions of the table, as `ipvsadm -Lnc` lists them.
    pub(crate) sessions: Vec<SessionEntry>,
    pub(crate) rate: Rate,
}

/// What the generated trace contained.
#[derive(Debug, Default, Serialize)]
pub(crate) struct TraceSummary {
    pub(crate) flows: u64,
    pub(crate) tcp_v4_flows: u64,
    pub(crate) udp_v4_flows: u64,
    pub(crate) tcp_v6_flows: u64,
    /// TCP flows closed with FIN from both sides (they end in TIME_WAIT).
    pub(crate) flows_closed: u64,
    /// TCP flows torn down by a client RST (CLOSE, then expired by the final sweep).
    pub(crate) flows_reset: u64,
    /// Flows left open: established, half-closed, unanswered SYNs, and all UDP flows.
    pub(crate) flows_left_open: u64,
    pub(crate) icmp_errors: u64,
    pub(crate) bad_packets: u64,
    /// Packets handed to the engine.
    pub(crate) packets: u64,
    /// Forwarded packets parsed back and checked.
    pub(crate) forwarded_checked: u64,
    /// Simulated time the trace spans, including the final sweep.
    pub(crate) simulated_secs: f64,
}

/// The engine's own counters.
#[derive(Debug, Serialize)]
pub(crate) struct CounterReport {
    pub(crate) forwarded_inbound: u64,
    pub(crate) forwarded_outbound: u64,
    pub(crate) sessions_created: u64,
    pub(crate) sessions_expired: u64,
    pub(crate) icmp_translated: u64,
    pub(crate) toa_inserted: u64,
    /// Non-zero drop counters, in the engine's order.
    pub(crate) drops: Vec<NamedCount>,
}

#[derive(Debug, Serialize)]
pub(crate) struct NamedCount {
    pub(crate) name: &'static str,
    pub(crate) count: u64,
}

#[derive(Debug, Serialize)]
pub(crate) struct ServiceReport {
    pub(crate) proto: &'static str,
    pub(crate) vip: SocketAddr,
    /// The name `ipvsadm` uses (`mh` for Maglev).
    pub(crate) scheduler: &'static str,
    pub(crate) backends: Vec<BackendReport>,
}

#[derive(Debug, Serialize)]
pub(crate) struct BackendReport {
    pub(crate) addr: SocketAddr,
    pub(crate) weight: u32,
    pub(crate) active_conns: u32,
    pub(crate) inactive_conns: u32,
    pub(crate) total_conns: u64,
}

/// Wall-clock speed of the replay loop, packet building and checking included.
#[derive(Debug, Serialize)]
pub(crate) struct Rate {
    pub(crate) packets: u64,
    pub(crate) wall_secs: f64,
    pub(crate) packets_per_sec: f64,
    /// `release` or `debug`: a debug build is many times slower.
    pub(crate) build: &'static str,
}

/// The lab services: one per scheduler family worth showing, IPv4 and IPv6.
fn services() -> Vec<ServiceConfig> {
    let backend = |addr: SocketAddr, weight| BackendConfig {
        addr,
        weight,
        healthy: true,
    };
    let v4 = |last, port| SocketAddr::new(Ipv4Addr::new(198, 18, 3, last).into(), port);
    let v6 = |last, port| {
        SocketAddr::new(
            Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, last).into(),
            port,
        )
    };
    // The replay checks the Full-NAT path: the SYN proxy, which would answer its SYNs itself
    // once its many open handshakes pass `auto`'s threshold, is off (it has its own fixtures).
    vec![
        ServiceConfig {
            vip: SocketAddr::new(VIP4.into(), 80),
            proto: L4Proto::Tcp,
            scheduler: SchedulerKind::Maglev,
            timeouts: Timeouts::default(),
            toa: true,
            conn_reuse: dataplane::ConnReuse::default(),
            syn_proxy: dataplane::SynProxy::Off,
            backends: (10..=12).map(|i| backend(v4(i, 8080), 1)).collect(),
        },
        ServiceConfig {
            vip: SocketAddr::new(VIP4.into(), 53),
            proto: L4Proto::Udp,
            scheduler: SchedulerKind::Wrr,
            timeouts: Timeouts::default(),
            toa: false,
            conn_reuse: dataplane::ConnReuse::default(),
            syn_proxy: dataplane::SynProxy::Off,
            backends: vec![backend(v4(20, 53), 2), backend(v4(21, 53), 1)],
        },
        ServiceConfig {
            vip: SocketAddr::new(VIP6.into(), 80),
            proto: L4Proto::Tcp,
            scheduler: SchedulerKind::Rr,
            timeouts: Timeouts::default(),
            toa: false,
            conn_reuse: dataplane::ConnReuse::default(),
            syn_proxy: dataplane::SynProxy::Off,
            backends: vec![backend(v6(0x10, 8080), 1), backend(v6(0x11, 8080), 1)],
        },
    ]
}

/// Runs the whole replay and checks the engine's accounting against the trace.
pub(crate) fn run(params: Params) -> Result<Report> {
    let configs = services();
    let snapshot = Snapshot::new(1, &configs, MaglevParams::default(), None)
        .context("building the service snapshot")?;
    // Headroom beyond one session per flow costs little and keeps the table off its limit.
    let max_sessions = params.flows.saturating_add(64);
    let engine = Engine::new(
        EngineConfig {
            max_sessions_v4: max_sessions,
            max_sessions_v6: max_sessions,
            local_addrs: vec![LIP4.into(), LIP6.into()],
            ..Default::default()
        },
        snapshot,
    )
    .context("starting the engine")?;
    let mut replay = Replay::new(&engine, &configs, params.seed);

    // A few ms between flows, but the whole trace within TRACE_SPAN however many flows, so that
    // the final sweep finds exactly the reset flows expired.
    let flow_step = Duration::from_millis(3).min(TRACE_SPAN / params.flows.max(1));
    let started = std::time::Instant::now();
    for i in 0..params.flows {
        replay.flow(i)?;
        // One bad packet every ten flows, cycling through the kinds.
        if i % 10 == 5 {
            replay.bad_packet(i / 10)?;
        }
        replay.now = replay.now.saturating_add(flow_step);
    }
    let wall = started.elapsed();

    // One sweep past the CLOSE timeout: the reset flows go, everything else outlives it.
    let sweep_at = replay
        .now
        .saturating_add(Timeouts::default().close + Duration::from_secs(1));
    // The sweep goes in chunks that cannot overflow the worker's event buffer (each call may
    // report a chunk per address family), draining it in between, like a node's timer would.
    let chunk = EngineConfig::default().event_capacity / 2;
    let (mut expired, mut closed) = (0, 0);
    for _ in 0..(max_sessions as usize).div_ceil(chunk) {
        expired += replay.worker.expire(sweep_at, chunk);
        closed += replay
            .worker
            .drain_events()
            .filter(|e| matches!(e, SessionEvent::Closed(_)))
            .count();
    }
    ensure!(
        closed == expired,
        "the sweep expired {expired} sessions but reported {closed} closed"
    );
    replay.trace.simulated_secs = sweep_at.saturating_duration_since(START).as_secs_f64();
    replay.check_accounting(&engine, &configs, expired as u64)?;
    Ok(replay.report(&engine, &configs, params.seed, sweep_at, wall))
}

/// The longest simulated time the flows may span. With the final sweep (CLOSE timeout plus a
/// second) it stays below the shortest timeout but CLOSE's (SYN_RECV and CLOSE_WAIT, 60 s).
const TRACE_SPAN: Duration = Duration::from_secs(20);
/// Simulated time between two packets.
const PACKET_STEP: Duration = Duration::from_micros(10);

/// The simulated clock starts here rather than at zero so that "seconds since start" reads well.
const START: Instant = Instant::from_secs(1);

/// How a TCP flow ends, cycled by the flow's index so even a short trace shows every state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    ClientCloses,
    ServerCloses,
    Open,
    Reset,
    HalfClosed,
    SynOnly,
}

impl Fate {
    fn of(tcp_index: u64) -> Fate {
        use Fate::{
            ClientCloses as C, HalfClosed as H, Open as O, Reset as R, ServerCloses as S,
            SynOnly as Y,
        };
        // Interleaved so the first sessions of the table already show several states.
        const CYCLE: [Fate; 20] = [C, O, S, H, C, O, S, C, Y, C, O, S, C, R, O, C, S, C, O, R];
        CYCLE[(tcp_index % 20) as usize]
    }

    /// The IPVS state the session must be in once the flow's packets are through.
    fn final_state(self) -> TcpState {
        match self {
            Fate::ClientCloses | Fate::ServerCloses => TcpState::TimeWait,
            Fate::Open => TcpState::Established,
            Fate::Reset => TcpState::Close,
            Fate::HalfClosed => TcpState::CloseWait,
            Fate::SynOnly => TcpState::SynRecv,
        }
    }
}

/// splitmix64: tiny, deterministic, and good enough to scatter addresses and ports.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One flow as the client sees it, plus the translation the engine chose for it.
#[derive(Debug)]
struct Flow {
    proto: L4Proto,
    client: SocketAddr,
    vip: SocketAddr,
    /// LIP:lport and backend, learnt from the first translated packet.
    translated: Option<(SocketAddr, SocketAddr)>,
}

impl Flow {
    fn translated(&self) -> Result<(SocketAddr, SocketAddr)> {
        self.translated
            .with_context(|| format!("flow {} → {} was never translated", self.client, self.vip))
    }
}

/// Addresses and checks of a forwarded TCP or UDP packet, as parsed back.
#[derive(Debug)]
struct Seen {
    src: SocketAddr,
    dst: SocketAddr,
    /// The client address a TOA option carries, if the segment has one.
    toa: Option<SocketAddr>,
}

#[derive(Debug)]
struct Replay {
    worker: Worker,
    now: Instant,
    rng: Rng,
    backends: HashMap<(L4Proto, SocketAddr), Vec<SocketAddr>>,
    clients: HashSet<(L4Proto, SocketAddr)>,
    scratch: Box<[u8; SCRATCH_LEN]>,
    trace: TraceSummary,
    inbound: u64,
    outbound: u64,
    icmp_translated: u64,
    expected_drops: HashMap<DropReason, u64>,
    /// TCP flows so far, IPv4 and IPv6.
    tcp_flows: [u64; 2],
}

impl Replay {
    fn new(engine: &Arc<Engine>, configs: &[ServiceConfig], seed: u64) -> Replay {
        Replay {
            worker: engine.worker(),
            now: START,
            rng: Rng(seed),
            backends: configs
                .iter()
                .map(|c| {
                    (
                        (c.proto, c.vip),
                        c.backends.iter().map(|b| b.addr).collect(),
                    )
                })
                .collect(),
            clients: HashSet::new(),
            scratch: Box::new([0; SCRATCH_LEN]),
            trace: TraceSummary::default(),
            inbound: 0,
            outbound: 0,
            icmp_translated: 0,
            expected_drops: HashMap::new(),
            tcp_flows: [0; 2],
        }
    }

    /// Flow `i`: seven in ten IPv4 TCP, two UDP, one IPv6 TCP.
    fn flow(&mut self, i: u32) -> Result<()> {
        self.trace.flows += 1;
        match i % 10 {
            0..=6 => {
                self.trace.tcp_v4_flows += 1;
                let client = self.new_client(L4Proto::Tcp, false);
                let vip = SocketAddr::new(VIP4.into(), 80);
                self.tcp_flow(client, vip, i % 20 == 3)
            }
            7 | 8 => {
                self.trace.udp_v4_flows += 1;
                let client = self.new_client(L4Proto::Udp, false);
                self.udp_flow(client, SocketAddr::new(VIP4.into(), 53))
            }
            _ => {
                self.trace.tcp_v6_flows += 1;
                let client = self.new_client(L4Proto::Tcp, true);
                let vip = SocketAddr::new(VIP6.into(), 80);
                self.tcp_flow(client, vip, i % 40 == 9)
            }
        }
    }

    /// A client address and port no earlier flow used, so every flow opens a session.
    fn new_client(&mut self, proto: L4Proto, v6: bool) -> SocketAddr {
        loop {
            let r = self.rng.next();
            let ip: IpAddr = if v6 {
                Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, (r % 0xfffe + 1) as u16).into()
            } else {
                Ipv4Addr::new(198, 18, 1, (r % 254 + 1) as u8).into()
            };
            let port = 1024 + ((r >> 32) % 64512) as u16;
            let client = SocketAddr::new(ip, port);
            if self.clients.insert((proto, client)) {
                return client;
            }
        }
    }

    /// A whole TCP conversation: handshake, request, response, then the flow's fate.
    fn tcp_flow(&mut self, client: SocketAddr, vip: SocketAddr, icmp: bool) -> Result<()> {
        // Counted per family: one shared counter would give the IPv6 flows (every eighth TCP
        // flow) only a fifth of the cycle.
        let family = usize::from(vip.is_ipv6());
        let fate = Fate::of(self.tcp_flows[family]);
        self.tcp_flows[family] += 1;
        let mut flow = Flow {
            proto: L4Proto::Tcp,
            client,
            vip,
            translated: None,
        };
        let mut cseq = self.rng.next() as u32;
        let mut sseq = self.rng.next() as u32;

        let syn = tcp_segment(client, vip, TcpControl::Syn, cseq, None, &[]);
        let (seen, _) = self.inbound(&mut flow, &syn, "SYN")?;
        if vip.is_ipv4() {
            ensure!(
                seen.toa == Some(client),
                "SYN of {client} → {vip}: TOA option carries {:?}, expected the client",
                seen.toa
            );
        }
        cseq = cseq.wrapping_add(1);
        if fate != Fate::SynOnly {
            let (local, backend) = flow.translated()?;
            let synack = tcp_segment(backend, local, TcpControl::Syn, sseq, Some(cseq), &[]);
            self.outbound(&flow, &synack, "SYN-ACK")?;
            sseq = sseq.wrapping_add(1);
            let ack = tcp_segment(client, vip, TcpControl::None, cseq, Some(sseq), &[]);
            self.inbound(&mut flow, &ack, "ACK")?;

            let request = tcp_segment(client, vip, TcpControl::Psh, cseq, Some(sseq), REQUEST);
            let (_, translated) = self.inbound(&mut flow, &request, "request")?;
            cseq = cseq.wrapping_add(REQUEST.len() as u32);
            if icmp {
                // A router towards the real server cannot forward the translated request.
                self.packet_too_big(&flow, &translated)?;
            }
            let body = vec![b'x'; 200 + self.rng.below(1000) as usize];
            let response = tcp_segment(backend, local, TcpControl::Psh, sseq, Some(cseq), &body);
            self.outbound(&flow, &response, "response")?;
            sseq = sseq.wrapping_add(body.len() as u32);
            let ack = tcp_segment(client, vip, TcpControl::None, cseq, Some(sseq), &[]);
            self.inbound(&mut flow, &ack, "ACK of response")?;

            let fin = TcpControl::Fin;
            match fate {
                Fate::ClientCloses => {
                    let seg = tcp_segment(client, vip, fin, cseq, Some(sseq), &[]);
                    self.inbound(&mut flow, &seg, "client FIN")?;
                    cseq = cseq.wrapping_add(1);
                    let seg = tcp_segment(backend, local, fin, sseq, Some(cseq), &[]);
                    self.outbound(&flow, &seg, "server FIN")?;
                    sseq = sseq.wrapping_add(1);
                    let seg = tcp_segment(client, vip, TcpControl::None, cseq, Some(sseq), &[]);
                    self.inbound(&mut flow, &seg, "last ACK")?;
                    self.trace.flows_closed += 1;
                }
                Fate::ServerCloses => {
                    let seg = tcp_segment(backend, local, fin, sseq, Some(cseq), &[]);
                    self.outbound(&flow, &seg, "server FIN")?;
                    sseq = sseq.wrapping_add(1);
                    let seg = tcp_segment(client, vip, fin, cseq, Some(sseq), &[]);
                    self.inbound(&mut flow, &seg, "client FIN")?;
                    cseq = cseq.wrapping_add(1);
                    let seg = tcp_segment(backend, local, TcpControl::None, sseq, Some(cseq), &[]);
                    self.outbound(&flow, &seg, "last ACK")?;
                    self.trace.flows_closed += 1;
                }
                Fate::Reset => {
                    let seg = tcp_segment(client, vip, TcpControl::Rst, cseq, None, &[]);
                    self.inbound(&mut flow, &seg, "client RST")?;
                    self.trace.flows_reset += 1;
                }
                Fate::HalfClosed => {
                    let seg = tcp_segment(client, vip, fin, cseq, Some(sseq), &[]);
                    self.inbound(&mut flow, &seg, "client FIN")?;
                    self.trace.flows_left_open += 1;
                }
                Fate::Open | Fate::SynOnly => self.trace.flows_left_open += 1,
            }
        } else {
            self.trace.flows_left_open += 1;
        }
        self.check_final_state(&flow, FlowState::Tcp(fate.final_state()))
    }

    /// A query and its answer.
    fn udp_flow(&mut self, client: SocketAddr, vip: SocketAddr) -> Result<()> {
        let mut flow = Flow {
            proto: L4Proto::Udp,
            client,
            vip,
            translated: None,
        };
        let query = vec![0x42; 28 + self.rng.below(20) as usize];
        self.inbound(&mut flow, &udp_datagram(client, vip, &query), "query")?;
        let (local, backend) = flow.translated()?;
        let answer = vec![0x24; 60 + self.rng.below(400) as usize];
        self.outbound(&flow, &udp_datagram(backend, local, &answer), "answer")?;
        self.trace.flows_left_open += 1;
        self.check_final_state(&flow, FlowState::Udp)
    }

    /// The last session event of the flow must show the state its packets lead to.
    fn check_final_state(&mut self, flow: &Flow, expected: FlowState) -> Result<()> {
        // Dropping the drain discards the flow's earlier events: only the last one matters.
        let last = self.worker.drain_events().next_back();
        let Some(SessionEvent::Created(rec) | SessionEvent::StateChanged(rec)) = last else {
            bail!(
                "flow {} → {}: no session event, last was {last:?}",
                flow.client,
                flow.vip
            );
        };
        ensure!(
            rec.client == flow.client && rec.vip == flow.vip && rec.state == expected,
            "flow {} → {}: session ends as {} {} → {}, expected {}",
            flow.client,
            flow.vip,
            rec.state.name(),
            rec.client,
            rec.vip,
            expected.name()
        );
        Ok(())
    }

    /// Hands one packet to the engine at the current simulated time.
    fn send(&mut self, pkt: &[u8]) -> (Verdict, Vec<u8>) {
        self.trace.packets += 1;
        self.now = self.now.saturating_add(PACKET_STEP);
        self.scratch[..pkt.len()].copy_from_slice(pkt);
        let mut packet = Packet::new(&mut self.scratch[..], pkt.len(), L4Checksum::Unverified);
        let verdict = self.worker.process(self.now, &mut packet);
        (verdict, packet.data().to_vec())
    }

    /// Hands one packet to the engine, which must forward it `direction`; returns the packet as
    /// it left. `ctx` names the packet in the error.
    fn forward(
        &mut self,
        pkt: &[u8],
        direction: Direction,
        ctx: impl Fn() -> String,
    ) -> Result<Vec<u8>> {
        let (verdict, out) = self.send(pkt);
        let expected = match direction {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        };
        ensure!(
            verdict == Verdict::Forward(direction),
            "{}: engine said {verdict:?}, expected forward {expected}",
            ctx()
        );
        Ok(out)
    }

    /// Client → VIP: must leave as LIP:lport → one of the service's backends, the same for
    /// every packet of the flow. Returns what was seen and the packet as it left.
    fn inbound(&mut self, flow: &mut Flow, pkt: &[u8], what: &str) -> Result<(Seen, Vec<u8>)> {
        let ctx = || format!("{what} of {} → {}", flow.client, flow.vip);
        let out = self.forward(pkt, Direction::Inbound, ctx)?;
        let seen = parse_forwarded(&out).with_context(ctx)?;
        let lip: IpAddr = if flow.vip.is_ipv4() {
            LIP4.into()
        } else {
            LIP6.into()
        };
        ensure!(
            seen.src.ip() == lip,
            "{}: source {} is not the LIP {lip}",
            ctx(),
            seen.src
        );
        let backends = &self.backends[&(flow.proto, flow.vip)];
        ensure!(
            backends.contains(&seen.dst),
            "{}: destination {} is no backend of the service",
            ctx(),
            seen.dst
        );
        match flow.translated {
            None => flow.translated = Some((seen.src, seen.dst)),
            Some(t) => ensure!(
                t == (seen.src, seen.dst),
                "{}: translated to {} → {}, earlier packets went {} → {}",
                ctx(),
                seen.src,
                seen.dst,
                t.0,
                t.1
            ),
        }
        self.inbound += 1;
        self.trace.forwarded_checked += 1;
        Ok((seen, out))
    }

    /// Backend → LIP:lport: must leave as VIP → client.
    fn outbound(&mut self, flow: &Flow, pkt: &[u8], what: &str) -> Result<()> {
        let ctx = || format!("{what} of {} → {}", flow.client, flow.vip);
        let out = self.forward(pkt, Direction::Outbound, ctx)?;
        let seen = parse_forwarded(&out).with_context(ctx)?;
        ensure!(
            seen.src == flow.vip && seen.dst == flow.client,
            "{}: answer went {} → {}",
            ctx(),
            seen.src,
            seen.dst
        );
        self.outbound += 1;
        self.trace.forwarded_checked += 1;
        Ok(())
    }

    /// A router on the backend side reports that `translated` (LIP → backend) was too big. The
    /// error must reach the client from the VIP, quoting the client's own packet.
    fn packet_too_big(&mut self, flow: &Flow, translated: &[u8]) -> Result<()> {
        self.trace.icmp_errors += 1;
        let (local, _) = flow.translated()?;
        let error = match local.ip() {
            IpAddr::V4(lip) => icmpv4_frag_needed(ROUTER4, lip, translated),
            IpAddr::V6(lip) => icmpv6_too_big(ROUTER6, lip, translated),
        };
        let ctx = || format!("ICMP error about {} → {}", flow.client, flow.vip);
        let out = self.forward(&error, Direction::Outbound, ctx)?;
        let (outer_src, outer_dst, quoted_src, quoted_dst) =
            parse_icmp_error(&out).with_context(ctx)?;
        ensure!(
            outer_src == flow.vip.ip()
                && outer_dst == flow.client.ip()
                && quoted_src == flow.client
                && quoted_dst == flow.vip,
            "{}: came out {outer_src} → {outer_dst} quoting {quoted_src} → {quoted_dst}",
            ctx()
        );
        self.outbound += 1;
        self.icmp_translated += 1;
        self.trace.forwarded_checked += 1;
        Ok(())
    }

    /// One packet the engine must drop, and under which reason.
    fn bad_packet(&mut self, n: u32) -> Result<()> {
        self.trace.bad_packets += 1;
        let client = SocketAddr::new(BAD_CLIENT.into(), 1024 + self.rng.below(60000) as u16);
        let web = SocketAddr::new(VIP4.into(), 80);
        let dns = SocketAddr::new(VIP4.into(), 53);
        let (reason, pkt) = match n % 5 {
            0 => (
                DropReason::NoSession,
                tcp_segment(client, web, TcpControl::None, 1, Some(1), &[]),
            ),
            1 => {
                let syn = tcp_segment(client, web, TcpControl::Syn, 1, None, &[]);
                (DropReason::Truncated, syn[..12].to_vec())
            }
            2 => {
                let mut pkt = udp_datagram(client, dns, b"a later fragment");
                let mut ip = Ipv4Packet::new_unchecked(&mut pkt[..]);
                ip.set_frag_offset(1480);
                ip.fill_checksum();
                (DropReason::FragmentUntracked, pkt)
            }
            3 => {
                let mut pkt = tcp_segment(client, web, TcpControl::Syn, 1, None, &[]);
                let mut ip = Ipv4Packet::new_unchecked(&mut pkt[..]);
                ip.set_checksum(!ip.checksum());
                (DropReason::BadChecksum, pkt)
            }
            _ => {
                let ntp = SocketAddr::new(VIP4.into(), 123);
                (DropReason::NoService, udp_datagram(client, ntp, b"time?"))
            }
        };
        let (verdict, _) = self.send(&pkt);
        ensure!(
            verdict == Verdict::Drop(reason),
            "bad packet ({}) from {client}: engine said {verdict:?}",
            reason.name()
        );
        *self.expected_drops.entry(reason).or_default() += 1;
        Ok(())
    }

    /// The engine's counters and per-backend totals must match what the replay sent.
    fn check_accounting(
        &self,
        engine: &Engine,
        configs: &[ServiceConfig],
        expired: u64,
    ) -> Result<()> {
        let c = engine.counters();
        let pairs = [
            ("forwarded inbound", Event::ForwardedInbound, self.inbound),
            (
                "forwarded outbound",
                Event::ForwardedOutbound,
                self.outbound,
            ),
            ("sessions created", Event::SessionsCreated, self.trace.flows),
            ("sessions expired", Event::SessionsExpired, expired),
            (
                "ICMP translated",
                Event::IcmpTranslated,
                self.icmp_translated,
            ),
            ("TOA inserted", Event::ToaInserted, self.trace.tcp_v4_flows),
        ];
        for (label, event, expected) in pairs {
            let got = c.events(event);
            ensure!(
                got == expected,
                "engine counts {got} {label}, the trace expects {expected}"
            );
        }
        ensure!(
            expired == self.trace.flows_reset,
            "the sweep expired {expired} sessions, the trace reset {}",
            self.trace.flows_reset
        );
        for &reason in DropReason::ALL {
            let expected = self.expected_drops.get(&reason).copied().unwrap_or(0);
            ensure!(
                c.drops(reason) == expected,
                "engine dropped {} packets as {}, the trace expects {expected}",
                c.drops(reason),
                reason.name()
            );
        }
        let live = self.trace.flows - expired;
        ensure!(
            engine.session_count() as u64 == live,
            "engine holds {} sessions, the trace expects {live}",
            engine.session_count()
        );
        let snapshot = engine.snapshot();
        let scheduled: u64 = configs
            .iter()
            .flat_map(|cfg| service_dests(&snapshot, cfg))
            .map(|d| d.stats.total())
            .sum();
        ensure!(
            scheduled == self.trace.flows,
            "backends count {scheduled} connections in total, the trace opened {}",
            self.trace.flows
        );
        Ok(())
    }

    fn report(
        self,
        engine: &Engine,
        configs: &[ServiceConfig],
        seed: u64,
        now: Instant,
        wall: Duration,
    ) -> Report {
        let c = engine.counters();
        let snapshot = engine.snapshot();
        let services = configs
            .iter()
            .map(|cfg| {
                let dests = service_dests(&snapshot, cfg);
                ServiceReport {
                    proto: proto_name(cfg.proto),
                    vip: cfg.vip,
                    scheduler: scheduler_name(cfg.scheduler),
                    backends: cfg
                        .backends
                        .iter()
                        .zip(dests)
                        .map(|(b, d)| BackendReport {
                            addr: b.addr,
                            weight: b.weight,
                            active_conns: d.stats.conns().active,
                            inactive_conns: d.stats.conns().inactive,
                            total_conns: d.stats.total(),
                        })
                        .collect(),
                }
            })
            .collect();
        let sessions = engine.sessions(now);
        let wall_secs = wall.as_secs_f64();
        Report {
            seed,
            counters: CounterReport {
                forwarded_inbound: c.events(Event::ForwardedInbound),
                forwarded_outbound: c.events(Event::ForwardedOutbound),
                sessions_created: c.events(Event::SessionsCreated),
                sessions_expired: c.events(Event::SessionsExpired),
                icmp_translated: c.events(Event::IcmpTranslated),
                toa_inserted: c.events(Event::ToaInserted),
                drops: c
                    .nonzero_drops()
                    .map(|(r, count)| NamedCount {
                        name: r.name(),
                        count,
                    })
                    .collect(),
            },
            services,
            local_addrs: engine.local_addrs().usage(),
            sessions_total: sessions.len(),
            sessions: sessions
                .iter()
                .take(LISTED_SESSIONS)
                .map(SessionEntry::from)
                .collect(),
            rate: Rate {
                packets: self.trace.packets,
                wall_secs,
                packets_per_sec: if wall_secs > 0.0 {
                    self.trace.packets as f64 / wall_secs
                } else {
                    0.0
                },
                build: if cfg!(debug_assertions) {
                    "debug"
                } else {
                    "release"
                },
            },
            trace: self.trace,
        }
    }
}

/// The engine's destinations of a configured service, in the order of its backends (none if
/// the snapshot lacks the service).
fn service_dests<'a>(snapshot: &'a Snapshot, cfg: &ServiceConfig) -> &'a [Arc<Dest>] {
    let key = ServiceKey {
        proto: cfg.proto,
        vip: cfg.vip,
    };
    snapshot.dests(&key).unwrap_or_default()
}

pub(crate) fn proto_name(proto: L4Proto) -> &'static str {
    match proto {
        L4Proto::Tcp => "TCP",
        L4Proto::Udp => "UDP",
    }
}

/// An IP packet from `src` to `dst` whose `l4_len`-byte payload `fill` writes, given the
/// pseudo-header sum of the L4 checksum.
fn ip_packet(
    src: IpAddr,
    dst: IpAddr,
    proto: IpProtocol,
    l4_len: usize,
    fill: impl FnOnce(&mut [u8], u16),
) -> Vec<u8> {
    let len32 = l4_len as u32;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let repr = Ipv4Repr {
                src_addr: s,
                dst_addr: d,
                next_header: proto,
                payload_len: l4_len,
                hop_limit: 64,
            };
            let mut buf = vec![0; repr.buffer_len() + l4_len];
            repr.emit(&mut Ipv4Packet::new_unchecked(&mut buf[..]));
            let pseudo = checksum::pseudo_header_v4(&s, &d, proto, len32);
            fill(&mut buf[repr.buffer_len()..], pseudo);
            buf
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let repr = Ipv6Repr {
                src_addr: s,
                dst_addr: d,
                next_header: proto,
                payload_len: l4_len,
                hop_limit: 64,
            };
            let mut buf = vec![0; repr.buffer_len() + l4_len];
            repr.emit(&mut Ipv6Packet::new_unchecked(&mut buf[..]));
            let pseudo = checksum::pseudo_header_v6(&s, &d, proto, len32);
            fill(&mut buf[repr.buffer_len()..], pseudo);
            buf
        }
        // Every caller pairs addresses of one family; the lab has no mixed flows.
        _ => unreachable!("mixed address families: {src} → {dst}"),
    }
}

fn tcp_segment(
    src: SocketAddr,
    dst: SocketAddr,
    control: TcpControl,
    seq: u32,
    ack: Option<u32>,
    payload: &[u8],
) -> Vec<u8> {
    let syn = control == TcpControl::Syn;
    // MSS, SACK-permitted and timestamps fill the options exactly (16 bytes): without EOL
    // padding, the TOA option the engine appends stays reachable by an option walk.
    let repr = TcpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
        control,
        seq_number: seq,
        ack_number: ack,
        window_len: 64240,
        window_scale: None,
        max_seg_size: syn.then_some(1460),
        sack_permitted: syn,
        timestamps: syn.then_some((seq, 0)),
        payload,
    };
    ip_packet(
        src.ip(),
        dst.ip(),
        IpProtocol::Tcp,
        repr.buffer_len(),
        |l4, pseudo| repr.emit(&mut TcpPacket::new_unchecked(l4), pseudo),
    )
}

fn udp_datagram(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let repr = UdpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
        payload,
    };
    ip_packet(
        src.ip(),
        dst.ip(),
        IpProtocol::Udp,
        repr.buffer_len(),
        |l4, pseudo| repr.emit(&mut UdpPacket::new_unchecked(l4), pseudo),
    )
}

/// ICMP destination unreachable, fragmentation needed (type 3 code 4), quoting `quoted` whole.
fn icmpv4_frag_needed(router: Ipv4Addr, to: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
    ip_packet(
        router.into(),
        to.into(),
        IpProtocol::Icmp,
        8 + quoted.len(),
        |l4, _| {
            let mut msg = Icmpv4Packet::new_unchecked(l4);
            msg.set_msg_type(Icmpv4Message::DstUnreachable);
            msg.set_msg_code(4);
            msg.set_next_hop_mtu(1400);
            msg.data_mut().copy_from_slice(quoted);
            msg.fill_checksum();
        },
    )
}

/// ICMPv6 packet too big, quoting `quoted` whole.
fn icmpv6_too_big(router: Ipv6Addr, to: Ipv6Addr, quoted: &[u8]) -> Vec<u8> {
    ip_packet(
        router.into(),
        to.into(),
        IpProtocol::Icmpv6,
        8 + quoted.len(),
        |l4, pseudo| {
            let mut msg = Icmpv6Packet::new_unchecked(l4);
            msg.set_msg_type(Icmpv6Message::PktTooBig);
            msg.set_msg_code(0);
            msg.set_mtu(1280);
            msg.data_mut().copy_from_slice(quoted);
            msg.fill_checksum(pseudo);
        },
    )
}

/// The IP layer of a packet: addresses, protocol, L4 bytes, and the L4 pseudo-header sum.
fn parse_ip(bytes: &[u8]) -> Result<(IpAddr, IpAddr, IpProtocol, &[u8], u16)> {
    match bytes.first().map(|b| b >> 4) {
        Some(4) => {
            let ip = Ipv4Packet::new_checked(bytes).context("IPv4 header")?;
            ensure!(ip.verify_checksum(), "bad IPv4 header checksum");
            // Sliced from `bytes` rather than the view so the L4 bytes outlive the view.
            let l4 = &bytes[usize::from(ip.header_len())..usize::from(ip.total_len())];
            let (s, d, p) = (ip.src_addr(), ip.dst_addr(), ip.next_header());
            let pseudo = checksum::pseudo_header_v4(&s, &d, p, l4.len() as u32);
            Ok((s.into(), d.into(), p, l4, pseudo))
        }
        Some(6) => {
            let ip = Ipv6Packet::new_checked(bytes).context("IPv6 header")?;
            let l4 = &bytes[40..40 + usize::from(ip.payload_len())];
            let (s, d, p) = (ip.src_addr(), ip.dst_addr(), ip.next_header());
            let pseudo = checksum::pseudo_header_v6(&s, &d, p, l4.len() as u32);
            Ok((s.into(), d.into(), p, l4, pseudo))
        }
        _ => bail!("not an IP packet"),
    }
}

/// Parses a forwarded TCP or UDP packet, verifying every checksum from scratch.
fn parse_forwarded(bytes: &[u8]) -> Result<Seen> {
    let (src, dst, proto, l4, pseudo) = parse_ip(bytes)?;
    match proto {
        IpProtocol::Tcp => {
            let tcp = TcpPacket::new_checked(l4).context("TCP header")?;
            ensure!(tcp.verify_checksum(pseudo), "bad TCP checksum");
            let toa = TcpOptions::new(tcp.options()).find_map(|opt| match opt {
                Ok(TcpOption::Unknown { kind: 254, data }) => toa_client(data),
                _ => None,
            });
            Ok(Seen {
                src: SocketAddr::new(src, tcp.src_port()),
                dst: SocketAddr::new(dst, tcp.dst_port()),
                toa,
            })
        }
        IpProtocol::Udp => {
            let udp = UdpPacket::new_checked(l4).context("UDP header")?;
            ensure!(udp.verify_checksum(pseudo), "bad UDP checksum");
            Ok(Seen {
                src: SocketAddr::new(src, udp.src_port()),
                dst: SocketAddr::new(dst, udp.dst_port()),
                toa: None,
            })
        }
        other => bail!("forwarded a {other} packet"),
    }
}

/// The client a TOA option's data (port, then address) names.
fn toa_client(data: &[u8]) -> Option<SocketAddr> {
    let port = u16::from_be_bytes([*data.first()?, *data.get(1)?]);
    let ip: IpAddr = match data.len() {
        6 => <[u8; 4]>::try_from(&data[2..]).ok()?.into(),
        18 => <[u8; 16]>::try_from(&data[2..]).ok()?.into(),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Parses a forwarded ICMP error: outer source and destination, quoted source and destination.
fn parse_icmp_error(bytes: &[u8]) -> Result<(IpAddr, IpAddr, SocketAddr, SocketAddr)> {
    let (src, dst, proto, l4, pseudo) = parse_ip(bytes)?;
    let quoted = match proto {
        IpProtocol::Icmp => {
            let msg = Icmpv4Packet::new_checked(l4).context("ICMP header")?;
            ensure!(msg.verify_checksum(), "bad ICMP checksum");
            &l4[8..]
        }
        IpProtocol::Icmpv6 => {
            let msg = Icmpv6Packet::new_checked(l4).context("ICMPv6 header")?;
            ensure!(msg.verify_checksum(pseudo), "bad ICMPv6 checksum");
            &l4[8..]
        }
        other => bail!("expected an ICMP error, got {other}"),
    };
    // The whole packet was quoted, so the quote parses and checksums like any other.
    let inner = parse_forwarded(quoted).context("quoted packet")?;
    Ok((src, dst, inner.src, inner.dst))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_fates_cover_every_state() {
        let states: HashSet<_> = (0..20).map(|i| Fate::of(i).final_state()).collect();
        assert_eq!(states.len(), 5);
    }
}

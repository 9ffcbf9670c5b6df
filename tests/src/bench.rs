//! The lab benchmark (`lbcluster-bench`): one topology, client → router → n1 → router → b1, and
//! four data paths on n1 measured in the same run, so their figures compare:
//!
//! * (a) plain kernel routing: the client targets b1 directly, but policy routing in the router
//!   sends client → b1 and b1 → client through n1, which forwards with no NAT (same hops as the
//!   other paths);
//! * (b) nftables Full-NAT on n1 (TESTBED's ruleset: DNAT VIP → b1, SNAT to n1's uplink address);
//! * (c) HAProxy `mode tcp` on n1, listening on the VIP (on n1's `lo`); TCP only;
//! * (d) lbcluster on n1 (TUN with virtio-net offloads, Full-NAT to the LIP).
//!
//! For each path: TCP throughput (iperf3, one stream, client → VIP:5201 → b1's iperf3 server) and
//! the small-packet rate (64-byte UDP payloads sent by [`udp_send`] with `sendmmsg` in batches of
//! 64 over a few flows, counted by [`udp_sink`] with `recvmmsg` in b1). The same binary runs the
//! sender and the sink inside the namespaces (hidden subcommands).
//!
//! Needs root and the programs of [`PROGRAMS`]; [`install_missing`] installs their packages
//! ([`crate::tools`] names them) with apt-get.

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand};

use crate::lab::{Lab, LabProcess, LabSpec, NODE_UPLINK_IF};
use crate::site::{LIP, VIP, run_node};

/// The TCP service port (iperf3's default).
pub const IPERF_PORT: u16 = 5201;
/// The UDP service port on the VIP.
pub const UDP_VIP_PORT: u16 = 53;
/// The UDP sink's port in b1.
pub const SINK_PORT: u16 = 5300;
/// UDP payload bytes per datagram (92-byte IPv4 packets).
pub const PAYLOAD: usize = 64;
/// Datagrams per `sendmmsg`/`recvmmsg` call.
pub const BATCH: usize = 64;
/// Sender sockets (source ports): that many flows through the path.
pub const FLOWS: usize = 8;
/// Packet worker threads of lbcluster.
pub const LB_WORKERS: usize = 2;
/// HAProxy's threads.
pub const HAPROXY_THREADS: usize = 2;
/// The most datagrams one sender sends per second of measurement (the count bound).
const MAX_PPS: u64 = 5_000_000;
/// The sink stops after this long without a datagram.
const SINK_IDLE: Duration = Duration::from_millis(1000);
/// Policy-routing table and rule preferences in the router for path (a).
const VIA_NODE_TABLE: &str = "100";
const VIA_NODE_PREFS: [&str; 2] = ["100", "101"];

/// `lbcluster-bench`: the lab benchmark.
#[derive(Debug, Parser, PartialEq, Eq)]
#[command(
    name = "lbcluster-bench",
    about = "Benchmark lbcluster against kernel routing, nftables Full-NAT and HAProxy in the lab"
)]
pub struct Cli {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=300),
          conflicts_with = "quick")]
    pub seconds: u32,
    /// A short smoke run (1 second per measurement).
    #[arg(long)]
    pub quick: bool,
    /// Turn tx checksum offload (and with it TSO) back on on n1's uplink; the lab turns it off.
    #[arg(long)]
    pub uplink_tx_offload: bool,
    #[command(subcommand)]
    pub command: Option<Helper>,
}

/// The traffic tools, run by the benchmark inside the lab's namespaces.
#[derive(Debug, Subcommand, PartialEq, Eq)]
pub enum Helper {
    /// Send 64-byte UDP datagrams to TO with sendmmsg until SECONDS or MAX_PACKETS.
    #[command(hide = true)]
    UdpSend {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=300))]
        seconds: u32,
        #[arg(long)]
        max_packets: u64,
    },
    /// Count UDP datagrams on PORT until none came for a second or MAX_SECONDS passed.
    #[command(hide = true)]
    UdpSink {
        #[arg(long)]
        port: u16,
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=600))]
        max_seconds: u32,
    },
}

impl Cli {
    /// Seconds per measurement, `--quick` included.
    pub fn seconds(&self) -> u32 {
        if self.quick { 1 } else { self.seconds }
    }
}

/// The five data paths on n1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPath {
    Kernel,
    Nftables,
    Haproxy,
    /// lbcluster with `fastpath = "off"`: every packet through the TUN device.
    Lbcluster,
    /// lbcluster with its kernel fast path: established flows forwarded by eBPF.
    Fastpath,
}

impl DataPath {
    pub const ALL: [DataPath; 5] = [
        DataPath::Kernel,
        DataPath::Nftables,
        DataPath::Haproxy,
        DataPath::Lbcluster,
        DataPath::Fastpath,
    ];

    fn label(self) -> &'static str {
        match self {
            DataPath::Kernel => "(a) kernel routing via n1, no NAT",
            DataPath::Nftables => "(b) nftables Full-NAT on n1",
            DataPath::Haproxy => "(c) HAProxy mode tcp on n1",
            DataPath::Lbcluster => "(d) lbcluster on n1, TUN only",
            DataPath::Fastpath => "(e) lbcluster on n1, fast path",
        }
    }
}

/// What iperf3 measured of one TCP stream.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TcpRate {
    pub bps: f64,
    /// Segments the sender sent again.
    pub retransmits: u64,
}

/// One measured figure, or why there is none.
#[derive(Debug, Clone, PartialEq)]
pub enum Figure<T> {
    Measured(T),
    NotApplicable(String),
    Failed(String),
}

impl<T> Figure<T> {
    fn from_result(r: Result<T>) -> Self {
        r.map_or_else(|e| Figure::Failed(format!("{e:#}")), Figure::Measured)
    }

    fn value(&self) -> Option<&T> {
        match self {
            Figure::Measured(v) => Some(v),
            _ => None,
        }
    }
}

/// What the UDP sender sent and the sink received.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UdpRate {
    pub sent: u64,
    pub send_secs: f64,
    pub received: u64,
    /// Seconds from the sink's first datagram to its last.
    pub receive_secs: f64,
}

impl UdpRate {
    /// Datagrams per second the backend received.
    pub fn received_pps(&self) -> f64 {
        if self.received < 2 || self.receive_secs <= 0.0 {
            0.0
        } else {
            self.received as f64 / self.receive_secs
        }
    }

    /// Datagrams per second the sender offered.
    pub fn offered_pps(&self) -> f64 {
        if self.send_secs <= 0.0 {
            0.0
        } else {
            self.sent as f64 / self.send_secs
        }
    }
}

/// Everything the benchmark prints.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub seconds: u32,
    /// `(interface, ethtool -k summary)` lines.
    pub offloads: Vec<(String, String)>,
    /// TCP throughput, per path in [`DataPath::ALL`] order.
    pub tcp: Vec<(DataPath, Figure<TcpRate>)>,
    pub udp: Vec<(DataPath, Figure<UdpRate>)>,
}

/// `a / b` when both are measured and `b` is positive.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn figure_of<T: Copy>(list: &[(DataPath, Figure<T>)], path: DataPath) -> Option<T> {
    list.iter()
        .find(|(p, _)| *p == path)
        .and_then(|(_, f)| f.value().copied())
}

fn ratio_line(out: &mut String, what: &str, r: Option<f64>, goal: Option<f64>) {
    let _ = match (r, goal) {
        (Some(r), Some(g)) => writeln!(
            out,
            "  {what:<36} {r:>6.2}×   (goal ≥ {g}×: {})",
            if r >= g { "met" } else { "NOT met" }
        ),
        (Some(r), None) => writeln!(out, "  {what:<36} {r:>6.2}×"),
        (None, _) => writeln!(out, "  {what:<36}    n/a"),
    };
}

fn not_measured<T>(f: &Figure<T>) -> Option<String> {
    match f {
        Figure::Measured(_) => None,
        Figure::NotApplicable(why) => Some(format!("n/a ({why})")),
        Figure::Failed(why) => Some(format!("FAILED: {why}")),
    }
}

/// The report as printed.
pub fn render(report: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "lbcluster lab benchmark: client → router → n1 → router → b1 (veth, network namespaces)"
    );
    let _ = writeln!(
        s,
        "(a) = kernel forwarding only: router policy routing sends client ⇄ b1 through n1, \
         which forwards without NAT"
    );
    let _ = writeln!(
        s,
        "lbcluster: {LB_WORKERS} packet workers; HAProxy: nbthread {HAPROXY_THREADS}; \
         machine: {} CPUs",
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    let _ = writeln!(
        s,
        "offloads (ethtool -k; the lab turns tx checksumming off on n1's uplink, which also \
         drops TSO there, unless --uplink-tx-offload):"
    );
    for (iface, summary) in &report.offloads {
        let _ = writeln!(s, "  {iface:<28} {summary}");
    }
    let _ = writeln!(
        s,
        "\nTCP throughput (iperf3, 1 stream, {} s, client → VIP:{IPERF_PORT} → b1)",
        report.seconds
    );
    for (path, fig) in &report.tcp {
        let text = match fig {
            Figure::Measured(t) => format!(
                "{:>8.2} Gbit/s   ({} retransmissions)",
                t.bps / 1e9,
                t.retransmits
            ),
            other => not_measured(other).unwrap_or_default(),
        };
        let _ = writeln!(s, "  {:<36} {text}", path.label());
    }
    let _ = writeln!(
        s,
        "\nUDP packet rate ({PAYLOAD}-byte payload, sendmmsg × {BATCH}, {FLOWS} flows, {} s; \
         counted by a recvmmsg sink in b1)",
        report.seconds
    );
    for (path, fig) in &report.udp {
        let text = match fig {
            Figure::Measured(r) => format!(
                "{:>8.0} kpps received   (offered {:.0} kpps, {} of {} delivered{})",
                r.received_pps() / 1e3,
                r.offered_pps() / 1e3,
                r.received,
                r.sent,
                if r.received >= r.sent {
                    ": sender-bound *"
                } else {
                    ""
                }
            ),
            other => not_measured(other).unwrap_or_default(),
        };
        let _ = writeln!(s, "  {:<36} {text}", path.label());
    }
    let _ = writeln!(
        s,
        "  * on veth the sender's CPU carries each datagram through every kernel hop (softirq \
         in its context): where all arrive, the path kept up with one CPU's sending"
    );
    let tcp = |p| figure_of(&report.tcp, p).map(|t: TcpRate| t.bps);
    let udp = |p| figure_of(&report.udp, p).map(|r: UdpRate| r.received_pps());
    let offered = |p| figure_of(&report.udp, p).map(|r: UdpRate| r.offered_pps());
    let _ = writeln!(s, "\nRatios (e = the fast path, d = TUN only)");
    let (d, e) = (DataPath::Lbcluster, DataPath::Fastpath);
    let (nft, kernel, haproxy) = (DataPath::Nftables, DataPath::Kernel, DataPath::Haproxy);
    for (what, a, b, goal) in [
        ("TCP (e) / nftables Full-NAT", tcp(e), tcp(nft), Some(1.0)),
        ("TCP (e) / HAProxy", tcp(e), tcp(haproxy), Some(2.0)),
        ("TCP (e) / kernel routing", tcp(e), tcp(kernel), None),
        ("TCP (d) / nftables Full-NAT", tcp(d), tcp(nft), None),
        (
            "UDP offered (e) / nftables Full-NAT",
            offered(e),
            offered(nft),
            Some(1.1),
        ),
        (
            "UDP offered (e) / kernel routing",
            offered(e),
            offered(kernel),
            Some(0.95),
        ),
        ("UDP pps (e) / nftables Full-NAT", udp(e), udp(nft), None),
        ("UDP pps (d) / nftables Full-NAT", udp(d), udp(nft), None),
    ] {
        ratio_line(&mut s, what, ratio(a, b), goal);
    }
    if let Some(r) = figure_of(&report.udp, e) {
        let _ = writeln!(
            s,
            "  {:<36} {:>6.1} %   (goal 100 %: {})",
            "UDP delivered by (e)",
            100.0 * r.received as f64 / r.sent.max(1) as f64,
            if r.received >= r.sent {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    let retransmits = |p| figure_of(&report.tcp, p).map(|t: TcpRate| t.retransmits);
    if let (Some(re), Some(rn)) = (retransmits(e), retransmits(nft)) {
        let _ = writeln!(
            s,
            "  {:<36} {re} vs {rn}   (goal ≤ nftables': {})",
            "TCP retransmissions (e) vs nftables",
            if re <= rn { "met" } else { "NOT met" }
        );
    }
    let _ = writeln!(
        s,
        "\nGoals: (e) ≥ 1.0× nftables Full-NAT in TCP throughput with no more retransmissions, \
         ≥ 2× HAProxy; in UDP every datagram delivered at an offered rate ≥ 1.1× nftables' and \
         ≥ 0.95× kernel routing's."
    );
    s
}

/// A short summary of `ethtool -k` output: tx checksum, TSO, GSO, GRO.
pub fn offload_summary(ethtool_k: &str) -> String {
    let features = [
        ("tx-checksumming", "tx-csum"),
        // The aggregate `tcp-segmentation-offload` line says "on" even when the kernel dropped
        // TSO for want of tx checksumming; the sub-feature tells the truth.
        ("tx-tcp-segmentation", "TSO"),
        ("generic-segmentation-offload", "GSO"),
        ("generic-receive-offload", "GRO"),
    ];
    features
        .iter()
        .map(|(name, short)| {
            let state = ethtool_k
                .lines()
                .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap_or("?");
            format!("{short} {state}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Bits per second received and the sender's retransmissions, from `iperf3 -J` output.
pub fn iperf3_rate(json: &str) -> Result<TcpRate> {
    let v: serde_json::Value = serde_json::from_str(json).context("iperf3 output is not JSON")?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {err}");
    }
    let bps = v
        .pointer("/end/sum_received/bits_per_second")
        .and_then(serde_json::Value::as_f64)
        .context("iperf3 output has no end.sum_received.bits_per_second")?;
    let retransmits = v
        .pointer("/end/sum_sent/retransmits")
        .and_then(serde_json::Value::as_u64)
        .context("iperf3 output has no end.sum_sent.retransmits")?;
    Ok(TcpRate { bps, retransmits })
}

/// What the sender prints: `sent N SECONDS`.
fn parse_sent(line: &str) -> Option<(u64, f64)> {
    let mut w = line.strip_prefix("sent ")?.split_whitespace();
    Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
}

/// What the sink prints last: `received N SECONDS`.
fn parse_received(log: &str) -> Option<(u64, f64)> {
    let line = log.lines().rev().find(|l| l.starts_with("received "))?;
    let mut w = line.strip_prefix("received ")?.split_whitespace();
    Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Sends [`PAYLOAD`]-byte datagrams to `to` over [`FLOWS`] sockets, [`BATCH`] per `sendmmsg`,
/// until `duration` has passed or `max_packets` were sent. Returns (sent, seconds).
pub fn udp_send(to: SocketAddr, duration: Duration, max_packets: u64) -> Result<(u64, f64)> {
    let any: IpAddr = match to {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let sockets = (0..FLOWS)
        .map(|_| {
            let s = UdpSocket::bind((any, 0))?;
            s.connect(to)?;
            Ok(s)
        })
        .collect::<io::Result<Vec<_>>>()
        .with_context(|| format!("UDP sockets to {to}"))?;
    let payload = [0x5a_u8; PAYLOAD];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: PAYLOAD,
    };
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH)
        .map(|_| {
            // SAFETY: mmsghdr is plain data; all-zero is a valid empty header.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = &mut iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let start = Instant::now();
    let mut sent = 0_u64;
    let mut turn = 0_usize;
    while sent < max_packets && start.elapsed() < duration {
        let n = (max_packets - sent).min(BATCH as u64) as u32;
        let fd = sockets[turn % FLOWS].as_raw_fd();
        turn += 1;
        // SAFETY: `msgs` holds BATCH valid headers, each pointing at `iov`, which points at
        // `payload`; all outlive the call, and the kernel only reads them.
        let r = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), n, 0) };
        if r >= 0 {
            sent += r as u64;
        } else {
            match errno() {
                // Full queues and ICMP errors from earlier datagrams: keep sending.
                libc::ENOBUFS | libc::EAGAIN | libc::ECONNREFUSED | libc::EINTR => {}
                e => bail!("sendmmsg: {}", io::Error::from_raw_os_error(e)),
            }
        }
    }
    Ok((sent, start.elapsed().as_secs_f64()))
}

/// Counts datagrams arriving on UDP `port` ([`BATCH`] per `recvmmsg`). Prints `ready` once bound;
/// stops after [`SINK_IDLE`] without a datagram (once one came) or after `max`. Returns
/// (datagrams, seconds from the first to the last).
pub fn udp_sink(port: u16, max: Duration) -> Result<(u64, f64)> {
    let socket = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port))
        .with_context(|| format!("bind UDP port {port}"))?;
    let size: libc::c_int = 16 << 20;
    // SAFETY: setsockopt reads a c_int from a valid pointer of the given length.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    ensure!(r == 0, "SO_RCVBUFFORCE: {}", io::Error::last_os_error());
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut bufs = vec![[0_u8; 2048]; BATCH];
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .map(|iov| {
            // SAFETY: mmsghdr is plain data; all-zero is a valid empty header.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    println!("ready");
    io::stdout().flush()?;
    let start = Instant::now();
    let mut count = 0_u64;
    let mut first_last: Option<(Instant, Instant)> = None;
    loop {
        let now = Instant::now();
        if now - start >= max || first_last.is_some_and(|(_, last)| now - last >= SINK_IDLE) {
            break;
        }
        // SAFETY: `msgs` holds BATCH headers pointing at distinct live buffers in `bufs`.
        let r = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if r > 0 {
            count += r as u64;
            let now = Instant::now();
            first_last = Some((first_last.map_or(now, |(first, _)| first), now));
        } else if r < 0 && !matches!(errno(), libc::EAGAIN | libc::EINTR) {
            bail!("recvmmsg: {}", io::Error::last_os_error());
        }
    }
    let span = first_last.map_or(0.0, |(first, last)| (last - first).as_secs_f64());
    Ok((count, span))
}

/// Runs a hidden helper subcommand; prints its result line.
pub fn run_helper(helper: &Helper) -> Result<()> {
    match *helper {
        Helper::UdpSend {
            to,
            seconds,
            max_packets,
        } => {
            let (sent, secs) = udp_send(to, Duration::from_secs(seconds.into()), max_packets)?;
            println!("sent {sent} {secs:.6}");
        }
        Helper::UdpSink { port, max_seconds } => {
            let (received, secs) = udp_sink(port, Duration::from_secs(max_seconds.into()))?;
            println!("received {received} {secs:.6}");
        }
    }
    Ok(())
}

/// The programs the benchmark runs besides every lab's ([`crate::lab::PROGRAMS`]): `ss` to see
/// its servers listen, `timeout` to bound the clients, `nft` for (b), `iperf3` for the TCP
/// figures, `haproxy` for (c). `scripts/packages` puts iperf3 and haproxy in set `bench`, which
/// the scripts do not install: this benchmark installs whatever it lacks itself.
pub const PROGRAMS: &[&str] = &["ss", "timeout", "nft", "iperf3", "haproxy"];

/// Installs the Debian packages of the programs the benchmark and its lab run that are missing.
pub fn install_missing() -> Result<()> {
    let missing = crate::tools::missing_packages(&[crate::lab::PROGRAMS, PROGRAMS].concat())?;
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing {}", missing.join(" "));
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
    };
    if !install()?.success() {
        let updated = Command::new("apt-get")
            .args(["update", "-q"])
            .stdin(Stdio::null())
            .status()?;
        ensure!(updated.success(), "apt-get update failed");
        ensure!(
            install()?.success(),
            "apt-get install {} failed",
            missing.join(" ")
        );
    }
    Ok(())
}

/// A path's TCP and UDP figures.
type PathFigures = (Figure<TcpRate>, Figure<UdpRate>);

/// The benchmark's lab: 1 node, 1 backend running an iperf3 server.
#[derive(Debug)]
pub struct Bench {
    lab: Lab,
    seconds: u32,
    exe: String,
    _iperf3: LabProcess,
}

impl Bench {
    /// Builds the lab, starts iperf3 in b1, sets forwarding on n1 and the uplink's tx offload.
    pub fn start(seconds: u32, uplink_tx_offload: bool) -> Result<Bench> {
        let lab = Lab::up(LabSpec {
            nodes: 1,
            backends: 1,
        })?;
        lab.exec(
            "n1",
            &[
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.send_redirects=0",
                &format!("net.ipv4.conf.{NODE_UPLINK_IF}.send_redirects=0"),
            ],
        )?;
        if uplink_tx_offload {
            lab.exec("n1", &["ethtool", "-K", NODE_UPLINK_IF, "tx", "on"])?;
        }
        let port = IPERF_PORT.to_string();
        let iperf3 = lab.spawn("b1", &["iperf3", "-s", "-p", &port])?;
        let exe = std::env::current_exe()?.to_string_lossy().into_owned();
        let bench = Bench {
            lab,
            seconds,
            exe,
            _iperf3: iperf3,
        };
        bench.wait_listening("b1", IPERF_PORT)?;
        Ok(bench)
    }

    fn wait_listening(&self, role: &str, port: u16) -> Result<()> {
        let filter = format!("sport = :{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let out = self.lab.exec(role, &["ss", "-Hltn", &filter])?;
            if !out.stdout.is_empty() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("nothing listens on TCP port {port} in {role}")
    }

    /// `(interface, summary)` of the offloads on every hop's interfaces.
    pub fn offloads(&self, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut hops = vec![
            ("client", "eth0"),
            ("router", "client"),
            ("router", "n1"),
            ("n1", NODE_UPLINK_IF),
            ("router", "b1"),
            ("b1", "eth0"),
        ];
        hops.extend_from_slice(extra);
        hops.iter()
            .map(|(role, iface)| {
                let summary = match self.lab.exec(role, &["ethtool", "-k", iface]) {
                    Ok(out) => offload_summary(&String::from_utf8_lossy(&out.stdout)),
                    Err(e) => format!("ethtool failed: {e:#}"),
                };
                (format!("{role} {iface}"), summary)
            })
            .collect()
    }

    /// iperf3, one stream, from the client to `addr`:IPERF_PORT.
    fn tcp(&self, addr: Ipv4Addr) -> Result<TcpRate> {
        let (t, limit) = (self.seconds.to_string(), (self.seconds + 20).to_string());
        let addr = addr.to_string();
        let port = IPERF_PORT.to_string();
        let out = Command::new("ip")
            .args(["netns", "exec", &self.lab.ns("client")])
            .args(["timeout", &limit, "iperf3", "-c", &addr, "-p", &port])
            .args(["-t", &t, "-J", "--connect-timeout", "3000"])
            .stdin(Stdio::null())
            .output()
            .context("run iperf3")?;
        // iperf3 -J prints its errors as JSON on stdout, with a failing exit status.
        iperf3_rate(&String::from_utf8_lossy(&out.stdout))
            .with_context(|| format!("iperf3 to {addr} exited with {}", out.status))
    }

    /// The UDP sink in b1 and the sender in the client, to `to`.
    fn udp(&self, to: SocketAddr) -> Result<UdpRate> {
        let max = (self.seconds + 10).to_string();
        let sink = self.lab.spawn(
            "b1",
            &[
                &self.exe,
                "udp-sink",
                "--port",
                &SINK_PORT.to_string(),
                "--max-seconds",
                &max,
            ],
        )?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !sink.log().contains("ready") {
            ensure!(
                sink.is_running() && Instant::now() < deadline,
                "UDP sink did not start: {}",
                sink.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let max_packets = (MAX_PPS * u64::from(self.seconds)).to_string();
        let limit = (self.seconds + 10).to_string();
        let out = self.lab.exec(
            "client",
            &[
                "timeout",
                &limit,
                &self.exe,
                "udp-send",
                "--to",
                &to.to_string(),
                "--seconds",
                &self.seconds.to_string(),
                "--max-packets",
                &max_packets,
            ],
        )?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let (sent, send_secs) = stdout
            .lines()
            .find_map(parse_sent)
            .with_context(|| format!("sender printed {stdout:?}"))?;
        sink.wait_timeout(Duration::from_secs(u64::from(self.seconds) + 15))
            .context("UDP sink did not stop")?;
        let (received, receive_secs) =
            parse_received(&sink.log()).with_context(|| format!("sink log: {}", sink.log()))?;
        Ok(UdpRate {
            sent,
            send_secs,
            received,
            receive_secs,
        })
    }

    fn both(&self, tcp: Ipv4Addr, udp: SocketAddr) -> PathFigures {
        let t = Figure::from_result(self.tcp(tcp));
        let u = Figure::from_result(self.udp(udp));
        (t, u)
    }

    fn router(&self, args: &str) -> Result<()> {
        let mut cmd = vec!["ip"];
        cmd.extend(args.split_whitespace());
        self.lab.exec("router", &cmd)?;
        Ok(())
    }

    /// (a): router policy routing sends client → b1 and b1 → client via n1; n1 forwards.
    fn kernel(&self) -> Result<PathFigures> {
        let n1 = self.lab.node_uplink(1);
        let b1 = self.lab.backend_addr(1);
        let client = self.lab.client_addr();
        let t = VIA_NODE_TABLE;
        self.router(&format!("route add {b1}/32 via {n1} dev n1 table {t}"))?;
        self.router(&format!("route add {client}/32 via {n1} dev n1 table {t}"))?;
        let [p1, p2] = VIA_NODE_PREFS;
        self.router(&format!("rule add iif client lookup {t} pref {p1}"))?;
        self.router(&format!("rule add iif backends lookup {t} pref {p2}"))?;
        let figures = match self.check_via_node() {
            Ok(()) => self.both(b1, SocketAddr::new(b1.into(), SINK_PORT)),
            Err(e) => failed_both(&e),
        };
        self.router(&format!("rule del pref {p1}"))?;
        self.router(&format!("rule del pref {p2}"))?;
        self.router(&format!("route flush table {t}"))?;
        Ok(figures)
    }

    /// Checks (a)'s detour: the router's route from the client to b1 leads to n1.
    fn check_via_node(&self) -> Result<()> {
        let (b1, client) = (self.lab.backend_addr(1), self.lab.client_addr());
        let out = self.lab.exec(
            "router",
            &[
                "ip",
                "route",
                "get",
                &b1.to_string(),
                "from",
                &client.to_string(),
                "iif",
                "client",
            ],
        )?;
        let route = String::from_utf8_lossy(&out.stdout);
        ensure!(
            route.contains("dev n1"),
            "policy routing does not lead via n1: {route}"
        );
        Ok(())
    }

    /// (b): TESTBED's nftables Full-NAT ruleset on n1, plus the same for the UDP service.
    fn nftables(&self) -> Result<PathFigures> {
        let (b1, node) = (self.lab.backend_addr(1), self.lab.node_uplink(1));
        let rules = format!(
            "table ip fnat {{\n\
             \x20 chain pre {{ type nat hook prerouting priority dstnat;\n\
             \x20   ip daddr {VIP} tcp dport {IPERF_PORT} dnat to {b1}:{IPERF_PORT};\n\
             \x20   ip daddr {VIP} udp dport {UDP_VIP_PORT} dnat to {b1}:{SINK_PORT}; }}\n\
             \x20 chain post {{ type nat hook postrouting priority srcnat;\n\
             \x20   ct status dnat ip daddr {b1} snat to {node}; }}\n\
             }}\n"
        );
        let file = self.lab.dir().join("bench-fnat.nft");
        std::fs::write(&file, rules)?;
        self.lab
            .exec("n1", &["nft", "-f", &file.to_string_lossy()])?;
        self.lab.route_to_node(VIP.into(), 1)?;
        let figures = self.both(VIP, SocketAddr::new(VIP.into(), UDP_VIP_PORT));
        self.lab
            .exec("n1", &["nft", "delete", "table", "ip", "fnat"])?;
        Ok(figures)
    }

    /// (c): HAProxy `mode tcp` on n1, listening on the VIP (on n1's `lo`).
    fn haproxy(&self) -> Result<Figure<TcpRate>> {
        let b1 = self.lab.backend_addr(1);
        let config = format!(
            "global\n  nbthread {HAPROXY_THREADS}\n  maxconn 1000\n\
             defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  \
             timeout server 60s\n\
             frontend vip\n  bind {VIP}:{IPERF_PORT}\n  default_backend b1\n\
             backend b1\n  server b1 {b1}:{IPERF_PORT}\n"
        );
        let file = self.lab.dir().join("bench-haproxy.cfg");
        std::fs::write(&file, config)?;
        let vip = format!("{VIP}/32");
        self.lab
            .exec("n1", &["ip", "addr", "add", &vip, "dev", "lo"])?;
        self.lab.route_to_node(VIP.into(), 1)?;
        let figure = self
            .lab
            .spawn("n1", &["haproxy", "-db", "-f", &file.to_string_lossy()])
            .and_then(|haproxy| {
                self.wait_listening("n1", IPERF_PORT)
                    .with_context(|| haproxy.log())?;
                self.tcp(VIP)
            });
        self.lab
            .exec("n1", &["ip", "addr", "del", &vip, "dev", "lo"])?;
        Ok(Figure::from_result(figure))
    }

    /// (d) and (e): `lbcluster run` on n1 with a TCP service on VIP:5201 and a UDP one on
    /// VIP:53, both to b1, and its LIP routed to n1; the fast path off (d) or on (e, and
    /// failing if the kernel refuses it). Also returns the TUN device's offloads.
    fn lbcluster(&self, fastpath: bool) -> Result<(PathFigures, (String, String))> {
        let b1 = self.lab.backend_addr(1);
        let socket = self.lab.dir().join("bench-n1.sock");
        let mode = if fastpath { "on" } else { "off" };
        let config = format!(
            "[node]\nname = \"n1\"\ntun = \"lbc0\"\nworkers = {LB_WORKERS}\n\
             local_addrs = [\"{LIP}\"]\nfastpath = \"{mode}\"\n\n\
             [admin]\nsocket = \"{}\"\n\n\
             [[service]]\nvip = \"{VIP}:{IPERF_PORT}\"\nproto = \"tcp\"\n\
             [[service.backend]]\naddr = \"{b1}:{IPERF_PORT}\"\n\n\
             [[service]]\nvip = \"{VIP}:{UDP_VIP_PORT}\"\nproto = \"udp\"\n\
             [[service.backend]]\naddr = \"{b1}:{SINK_PORT}\"\n",
            socket.display()
        );
        let file = self.lab.dir().join("bench-n1.toml");
        std::fs::write(&file, config)?;
        let node = run_node(&self.lab, "n1", &file, &socket)?;
        self.lab.route_to_node(VIP.into(), 1)?;
        self.lab.route_to_node(LIP.into(), 1)?;
        let tun = self
            .offloads(&[("n1", "lbc0")])
            .pop()
            .context("no TUN offloads")?;
        let figures = self.both(VIP, SocketAddr::new(VIP.into(), UDP_VIP_PORT));
        ensure!(node.is_running(), "lbcluster exited:\n{}", node.log());
        node.signal("TERM")?;
        ensure!(
            node.wait_timeout(Duration::from_secs(15)).is_some(),
            "lbcluster did not stop:\n{}",
            node.log()
        );
        Ok((figures, tun))
    }

    /// Runs the five paths in turn and returns the report.
    pub fn run(&self) -> Report {
        let mut offloads = self.offloads(&[]);
        let (ka, ua) = self.kernel().unwrap_or_else(|e| failed_both(&e));
        let (kb, ub) = self.nftables().unwrap_or_else(|e| failed_both(&e));
        let kc = self
            .haproxy()
            .unwrap_or_else(|e| Figure::Failed(format!("{e:#}")));
        let (kd, ud) = match self.lbcluster(false) {
            Ok(((kd, ud), (iface, tun))) => {
                offloads.push((iface, format!("{tun} (lbcluster's TUN, while it ran)")));
                (kd, ud)
            }
            Err(e) => failed_both(&e),
        };
        let (ke, ue) = self
            .lbcluster(true)
            .map_or_else(|e| failed_both(&e), |(figures, _)| figures);
        let udp_na = Figure::NotApplicable("HAProxy does not do UDP".into());
        let [a, b, c, d, e] = DataPath::ALL;
        Report {
            seconds: self.seconds,
            offloads,
            tcp: vec![(a, ka), (b, kb), (c, kc), (d, kd), (e, ke)],
            udp: vec![(a, ua), (b, ub), (c, udp_na), (d, ud), (e, ue)],
        }
    }
}

/// Both figures of a path whose setup failed.
fn failed_both<A, B>(e: &anyhow::Error) -> (Figure<A>, Figure<B>) {
    let why = format!("{e:#}");
    (Figure::Failed(why.clone()), Figure::Failed(why))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("lbcluster-bench").chain(args.iter().copied()))
    }

    #[test]
    fn arguments() {
        let cli = parse(&[]).unwrap();
        assert_eq!((cli.seconds(), cli.quick, cli.command), (5, false, None));
        assert_eq!(parse(&["--seconds", "12"]).unwrap().seconds(), 12);
        assert_eq!(parse(&["--quick"]).unwrap().seconds(), 1);
        assert!(parse(&["--uplink-tx-offload"]).unwrap().uplink_tx_offload);
        for bad in [
            &["--seconds", "0"][..],
            &["--seconds", "301"],
            &["--seconds", "x"],
            &["--quick", "--seconds", "3"],
            &["--bogus"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn helper_arguments() {
        let cli = parse(&[
            "udp-send",
            "--to",
            "198.18.100.1:53",
            "--seconds",
            "2",
            "--max-packets",
            "1000",
        ])
        .unwrap();
        assert_eq!(
            cli.command,
            Some(Helper::UdpSend {
                to: "198.18.100.1:53".parse().unwrap(),
                seconds: 2,
                max_packets: 1000
            })
        );
        let cli = parse(&["udp-sink", "--port", "5300", "--max-seconds", "15"]).unwrap();
        assert_eq!(
            cli.command,
            Some(Helper::UdpSink {
                port: 5300,
                max_seconds: 15
            })
        );
        assert!(parse(&["udp-send", "--to", "198.18.100.1:53", "--seconds", "2"]).is_err());
    }

    #[test]
    fn ethtool_summary() {
        let text = "Features for uplink:\nrx-checksumming: on\ntx-checksumming: off\n\
                    \ttx-checksum-ipv4: off [fixed]\ntcp-segmentation-offload: on\n\
                    \ttx-tcp-segmentation: off [requested on]\n\
                    generic-segmentation-offload: on\ngeneric-receive-offload: on [fixed]\n";
        assert_eq!(
            offload_summary(text),
            "tx-csum off, TSO off, GSO on, GRO on"
        );
        assert_eq!(offload_summary(""), "tx-csum ?, TSO ?, GSO ?, GRO ?");
    }

    #[test]
    fn iperf3_json() {
        let ok = r#"{"start":{},"end":{"sum_received":{"bits_per_second":1.5e10},
                     "sum_sent":{"retransmits":12}}}"#;
        assert_eq!(
            iperf3_rate(ok).unwrap(),
            TcpRate {
                bps: 1.5e10,
                retransmits: 12
            }
        );
        let err = r#"{"start":{},"end":{},"error":"unable to connect to server"}"#;
        assert!(
            iperf3_rate(err)
                .unwrap_err()
                .to_string()
                .contains("unable to connect")
        );
        assert!(iperf3_rate("").is_err());
    }

    #[test]
    fn helper_output() {
        assert_eq!(parse_sent("sent 1200 2.000100"), Some((1200, 2.0001)));
        assert_eq!(parse_sent("sent x"), None);
        assert_eq!(
            parse_received("ready\nreceived 640 1.500000\n"),
            Some((640, 1.5))
        );
        assert_eq!(parse_received("ready\n"), None);
    }

    #[test]
    fn rates_and_ratios() {
        let r = UdpRate {
            sent: 1000,
            send_secs: 2.0,
            received: 500,
            receive_secs: 1.0,
        };
        assert_eq!((r.offered_pps(), r.received_pps()), (500.0, 500.0));
        let none = UdpRate { received: 1, ..r };
        assert_eq!(none.received_pps(), 0.0);
        assert_eq!(ratio(Some(3.0), Some(2.0)), Some(1.5));
        assert_eq!(ratio(Some(3.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(2.0)), None);
    }

    fn sample() -> Report {
        let [a, b, c, d, e] = DataPath::ALL;
        let udp = |sent: u64, pps: u64| {
            Figure::Measured(UdpRate {
                sent,
                send_secs: 1.0,
                received: pps,
                receive_secs: 1.0,
            })
        };
        let tcp = |bps, retransmits| Figure::Measured(TcpRate { bps, retransmits });
        Report {
            seconds: 5,
            offloads: vec![("n1 uplink".into(), "tx-csum off, TSO off".into())],
            tcp: vec![
                (a, tcp(20e9, 10)),
                (b, tcp(18e9, 600)),
                (c, tcp(6e9, 0)),
                (d, tcp(9e9, 5)),
                (e, tcp(16e9, 900)),
            ],
            udp: vec![
                (a, udp(200_000, 200_000)),
                (b, udp(360_000, 180_000)),
                (c, Figure::NotApplicable("HAProxy does not do UDP".into())),
                (d, Figure::Failed("sink did not start".into())),
                (e, udp(220_000, 220_000)),
            ],
        }
    }

    #[test]
    fn report_text() {
        let text = render(&sample());
        for want in [
            "n1 uplink                    tx-csum off, TSO off",
            "(a) kernel routing via n1, no NAT       20.00 Gbit/s   (10 retransmissions)",
            "(d) lbcluster on n1, TUN only            9.00 Gbit/s   (5 retransmissions)",
            "(b) nftables Full-NAT on n1               180 kpps received   (offered 360 kpps, \
             180000 of 360000 delivered)",
            "(a) kernel routing via n1, no NAT         200 kpps received   (offered 200 kpps, \
             200000 of 200000 delivered: sender-bound *)",
            "(c) HAProxy mode tcp on n1           n/a (HAProxy does not do UDP)",
            "(d) lbcluster on n1, TUN only        FAILED: sink did not start",
            "TCP (e) / nftables Full-NAT            0.89×   (goal ≥ 1×: NOT met)",
            "TCP (e) / HAProxy                      2.67×   (goal ≥ 2×: met)",
            "TCP (d) / nftables Full-NAT            0.50×",
            "UDP offered (e) / nftables Full-NAT    0.61×   (goal ≥ 1.1×: NOT met)",
            "UDP offered (e) / kernel routing       1.10×   (goal ≥ 0.95×: met)",
            "UDP pps (d) / nftables Full-NAT         n/a",
            "UDP delivered by (e)                  100.0 %   (goal 100 %: met)",
            "TCP retransmissions (e) vs nftables  900 vs 600   (goal ≤ nftables': NOT met)",
        ] {
            assert!(text.contains(want), "{want:?} missing from\n{text}");
        }
    }

    #[test]
    fn goal_met() {
        let mut report = sample();
        report.tcp[4].1 = Figure::Measured(TcpRate {
            bps: 18e9,
            retransmits: 600,
        });
        let text = render(&report);
        assert!(text.contains("1.00×   (goal ≥ 1×: met)"), "{text}");
        assert!(
            text.contains("600 vs 600   (goal ≤ nftables': met)"),
            "{text}"
        );
    }
}

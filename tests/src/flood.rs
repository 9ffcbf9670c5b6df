//! The SYN-flood benchmark (`lbcluster-lab flood`): one node with `max_sessions_v4 = 50000`,
//! its HTTP service on VIP:80 with the SYN proxy as asked; legitimate clients open 50
//! connections per second for the whole run while, in the middle, a flood of SYNs from spoofed
//! lab addresses (198.18.1.100–.249, in the client's subnet: the router accepts them and finds
//! no neighbour for the answers) is sent as fast as one raw socket can, bounded in packets and
//! time. It reports legitimate success and latency before, during and after the flood, how
//! long full service took to return, the session table's and the port pool's peak use, and
//! the node's CPU and RSS.
//!
//! The flooder ([`syn_flood`]) is `lab-backend syn-flood`, run in the client namespace; it
//! writes whole IPv4 packets (`IPPROTO_RAW`), addresses only from 198.18.0.0/15.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::load::Short;
use crate::site::{Site, SiteOptions, VIP};

/// Spoofed sources: 198.18.1.100 to .249.
const SPOOF_BASE: u32 = u32::from_be_bytes([198, 18, 1, 100]);
const SPOOF_COUNT: u32 = 150;
/// Packets one `sendmmsg` call sends.
const BATCH: usize = 64;

/// Sends SYNs from spoofed lab sources to `to` until `seconds` pass or `max_packets` are sent;
/// returns how many were sent and over how long.
pub fn syn_flood(to: SocketAddrV4, seconds: u64, max_packets: u64) -> Result<(u64, Duration)> {
    ensure!(is_lab(*to.ip()), "{to} is outside the lab's 198.18.0.0/15");
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("raw socket (needs root)");
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    let mut packets = vec![[0u8; 40]; BATCH];
    let dst = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(*to.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let start = Instant::now();
    let limit = Duration::from_secs(seconds);
    let mut sent = 0u64;
    while start.elapsed() < limit && sent < max_packets {
        for p in &mut packets {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let src = Ipv4Addr::from(SPOOF_BASE + (rng as u32 % SPOOF_COUNT));
            let sport = 1024 + (rng >> 32) as u16 % 60000;
            syn_packet(p, src, to, sport, (rng >> 16) as u32);
        }
        let mut iov: Vec<libc::iovec> = packets
            .iter_mut()
            .map(|p| libc::iovec {
                iov_base: p.as_mut_ptr().cast(),
                iov_len: p.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iov
            .iter_mut()
            .map(|v| {
                // SAFETY: an all-zero mmsghdr is a valid empty header.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_name = (&raw const dst).cast_mut().cast();
                m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
                m.msg_hdr.msg_iov = v;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        // SAFETY: `msgs` points at `iov` and `packets`, which outlive the call.
        let n = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                0,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOBUFS) {
                return Err(e).context("sendmmsg");
            }
            continue;
        }
        sent += n as u64;
    }
    Ok((sent, start.elapsed()))
}

fn is_lab(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    o[0] == 198 && (o[1] == 18 || o[1] == 19)
}

/// A TCP SYN (MSS 1460) from `src`:`sport` to `to`, with its TCP checksum; the kernel fills in
/// the IPv4 checksum and ID.
fn syn_packet(p: &mut [u8; 40], src: Ipv4Addr, to: SocketAddrV4, sport: u16, seq: u32) {
    p.fill(0);
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&to.ip().octets());
    let t = &mut p[20..];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&to.port().to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x02;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut sum: u32 = 0;
    for pair in p[12..20].chunks_exact(2).chain(p[20..40].chunks_exact(2)) {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    sum += 6 + 20;
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[36..38].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

/// How the benchmark runs.
#[derive(Debug, Clone, Copy)]
pub struct FloodSpec {
    /// `syn_proxy` of the VIP:80 service: `off`, `on` or `auto`.
    pub syn_proxy: &'static str,
    pub before: Duration,
    pub flood: Duration,
    pub after: Duration,
    pub rate: u32,
    pub max_packets: u64,
}

/// Runs the benchmark in a lab of its own and returns its report.
pub fn run(spec: FloodSpec) -> Result<Value> {
    let http = format!(r#"syn_proxy = "{}""#, spec.syn_proxy);
    let site = Site::start_with(SiteOptions {
        node: "max_sessions_v4 = 50000",
        http: &http,
        ..SiteOptions::default()
    })?;
    let target = SocketAddr::new(VIP.into(), 80);
    site.lab
        .http_get("client", target, "/")
        .context("the HTTP service before the run")?;
    let total = spec.before + spec.flood + spec.after;
    let legit = crate::load::client_tool(
        &site.lab,
        &[
            "short",
            &target.to_string(),
            "--rate",
            &spec.rate.to_string(),
            "--seconds",
            &total.as_secs().to_string(),
        ],
    )?;
    let node_pid = site.node.pid();
    let cpu0 = cpu_ticks(node_pid)?;
    let rss0 = rss_kib(node_pid)?;
    std::thread::sleep(spec.before);
    let flooder = crate::load::client_tool(
        &site.lab,
        &[
            "syn-flood",
            &target.to_string(),
            "--seconds",
            &spec.flood.as_secs().to_string(),
            "--max-packets",
            &spec.max_packets.to_string(),
        ],
    )?;
    let flood_started = Instant::now();
    let mut peak = Peak::default();
    while flooder.wait_timeout(Duration::from_millis(500)).is_none() {
        peak.sample(&site)?;
        if flood_started.elapsed() > spec.flood + Duration::from_secs(10) {
            bail!("the flooder did not end");
        }
    }
    let flood_took = flood_started.elapsed();
    let cpu1 = cpu_ticks(node_pid)?;
    let rss1 = rss_kib(node_pid)?;
    let flood_log = flooder.log();
    let flood: Value = flood_log
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .with_context(|| format!("the flooder's report: {flood_log}"))?;
    let report = crate::load::report(&legit, total + Duration::from_secs(30))?;
    let shorts: Vec<Short> = serde_json::from_value(report["each"].clone())?;
    let flood_start = spec.before;
    let flood_end = spec.before + flood_took;
    let phase = |from: Duration, to: Duration| {
        crate::load::phase_json(shorts.iter().filter(|s| s.at >= from && s.at < to))
    };
    let recovery = shorts
        .iter()
        .filter(|s| s.error.is_some() && s.at >= flood_end)
        .map(|s| s.at + s.latency - flood_end)
        .max()
        .unwrap_or_default();
    let hz = 100.0; // USER_HZ
    Ok(json!({
        "syn_proxy": spec.syn_proxy,
        "flood": flood,
        "legitimate": {
            "rate": spec.rate,
            "before": phase(Duration::ZERO, flood_start),
            "during": phase(flood_start, flood_end),
            "after": phase(flood_end, total + Duration::from_secs(60)),
            "full_service_after_flood_ms": recovery.as_millis(),
            "first_failures": shorts
                .iter()
                .filter_map(|s| s.error.as_ref().map(|e| json!({ "at_ms": s.at.as_millis(), "error": e })))
                .take(5)
                .collect::<Vec<_>>(),
        },
        "node": {
            "sessions_peak": peak.sessions,
            "sessions_capacity": peak.capacity,
            "lip_tcp_ports_peak": peak.ports,
            "lip_tcp_ports_capacity": peak.ports_capacity,
            "cpu_during_flood_pct": (cpu1 - cpu0) as f64 / hz / flood_took.as_secs_f64() * 100.0,
            "rss_kib_before": rss0,
            "rss_kib_after": rss1,
            "events": site_events(&site)?,
        },
    }))
}

/// The highest session and port use seen.
#[derive(Debug, Default)]
struct Peak {
    sessions: u64,
    capacity: u64,
    ports: u64,
    ports_capacity: u64,
}

impl Peak {
    fn sample(&mut self, site: &Site) -> Result<()> {
        let out = site.status(true)?;
        let st: Value = serde_json::from_slice(&out.stdout)?;
        self.sessions = self
            .sessions
            .max(st["sessions"]["count"].as_u64().unwrap_or_default());
        self.capacity = st["sessions"]["by_family"]["v4_capacity"]
            .as_u64()
            .unwrap_or_default();
        for l in st["local_addrs"].as_array().into_iter().flatten() {
            if l["proto"] == "tcp" && l["ip"].as_str().is_some_and(|ip| ip.contains('.')) {
                self.ports = self.ports.max(l["in_use"].as_u64().unwrap_or_default());
                self.ports_capacity = l["capacity"].as_u64().unwrap_or_default();
            }
        }
        Ok(())
    }
}

fn site_events(site: &Site) -> Result<Value> {
    let mut out = serde_json::Map::new();
    for name in [
        "syn_cookies_sent",
        "syn_cookies_accepted",
        "embryonic_evicted",
        "sessions_created",
    ] {
        out.insert(name.into(), site.event(name)?.into());
    }
    for name in ["table_full", "no_local_port", "bad_cookie"] {
        out.insert(name.into(), site.drop_count(name)?.into());
    }
    Ok(out.into())
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("/proc/PID/stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field =
        |i: usize| -> Result<u64> { Ok(fields.get(i).context("/proc/PID/stat field")?.parse()?) };
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    Ok(field(11)? + field(12)?)
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("VmRSS")?
        .parse()
        .context("VmRSS")
}

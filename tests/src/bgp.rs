//! The lab's routing layer (DESIGN §5, §9; TESTBED "BIRD 2 with ECMP"): a BIRD 2 instance in the
//! router (AS 65000) that learns the nodes' VIP and LIP host routes over BGP and installs them as
//! multipath kernel routes, and one BIRD instance per node (AS 65100) whose configuration the
//! node writes (the lab only writes a minimal valid one if there is none yet).
//!
//! Router: one IPv4 BGP session per node k to 198.18.(50+k).2 carrying the ipv4 and ipv6
//! channels (`nK`), hold 3 s, keepalive 1 s, BFD 100 ms × 3 when asked; it imports only /32 and
//! /128 routes inside the VIP ranges (198.18.100.0/24, 2001:db8:100::/64) and LIP ranges
//! (198.19.200.0/24, 2001:db8:200::/64) and exports nothing. Every instance has its own config,
//! socket and pid file in the lab directory and logs to its process log; all run with `-f`
//! through [`Lab::spawn`], so they are killed by pid with the lab.
//!
//! Needs the programs of [`PROGRAMS`] ([`crate::tools`] names their package).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::lab::{Lab, LabProcess};

/// The programs BGP in the lab runs (checked when the router's BIRD starts).
pub const PROGRAMS: &[&str] = &["bird", "birdc"];

/// The router's AS.
pub const ROUTER_AS: u32 = 65000;
/// The nodes' AS.
pub const NODE_AS: u32 = 65100;
/// BGP hold time of every session, in seconds.
pub const HOLD_SECS: u32 = 3;
/// BGP keepalive time of every session, in seconds.
pub const KEEPALIVE_SECS: u32 = 1;
/// BFD transmit and receive interval, in milliseconds.
pub const BFD_INTERVAL_MS: u32 = 100;
/// BFD detection multiplier.
pub const BFD_MULTIPLIER: u32 = 3;

/// How long a BIRD instance may take to answer on its control socket after it is started.
const BIRD_START: Duration = Duration::from_secs(5);
/// How often [`Lab::wait_next_hops`] looks at the router's routes.
const POLL: Duration = Duration::from_millis(5);

/// How the lab's BGP is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BgpOptions {
    /// BFD on every session, [`BFD_INTERVAL_MS`] × [`BFD_MULTIPLIER`].
    pub bfd: bool,
}

/// The running BIRD instances of a lab: the router's and one per node.
#[derive(Debug)]
pub struct Bgp {
    options: BgpOptions,
    router: LabProcess,
    /// Node k's BIRD at index k-1, `None` while it is stopped.
    nodes: Vec<Option<LabProcess>>,
}

/// `birdc -s SOCKET ARGS` (outside any namespace: it only needs the socket); its output, or an
/// error with what it said.
fn birdc(socket: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("birdc")
        .arg("-s")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run birdc")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "birdc -s {} {args:?} failed ({}): {stdout}{}",
        socket.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(stdout)
}

/// Starts `bird -f` with `config` in `role`'s namespace and waits until it answers on `socket`.
fn start_bird(
    lab: &Lab,
    role: &str,
    config: &Path,
    socket: &Path,
    pid: &Path,
) -> Result<LabProcess> {
    let process = lab.spawn(
        role,
        &[
            "bird",
            "-f",
            "-c",
            &config.to_string_lossy(),
            "-s",
            &socket.to_string_lossy(),
            "-P",
            &pid.to_string_lossy(),
        ],
    )?;
    let deadline = Instant::now() + BIRD_START;
    loop {
        ensure!(
            process.is_running(),
            "bird in {role} exited:\n{}",
            process.log()
        );
        if birdc(socket, &["show", "status"]).is_ok_and(|s| s.contains("Daemon is up")) {
            return Ok(process);
        }
        if Instant::now() >= deadline {
            bail!(
                "bird in {role} did not answer within {BIRD_START:?}:\n{}",
                process.log()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The router's BIRD configuration for `nodes` nodes.
fn router_config(lab: &Lab, options: BgpOptions) -> String {
    let bfd = if options.bfd {
        format!(
            "protocol bfd {{\n  interface \"*\" {{ min rx interval {BFD_INTERVAL_MS} ms; \
             min tx interval {BFD_INTERVAL_MS} ms; multiplier {BFD_MULTIPLIER}; }};\n}}\n"
        )
    } else {
        String::new()
    };
    let peers: String = (1..=lab.spec().nodes)
        .map(|k| {
            format!(
                "protocol bgp n{k} from lbnode {{ neighbor {} as {NODE_AS}; }}\n",
                lab.node_uplink(k)
            )
        })
        .collect();
    format!(
        r#"# The lab router (AS {ROUTER_AS}): ECMP over the nodes' VIP and LIP host routes.
router id {router_id};
log stderr all;

protocol device {{ }}

protocol kernel kernel4 {{
  ipv4 {{ import none; export where source = RTS_BGP; }};
  merge paths on;
}}

protocol kernel kernel6 {{
  ipv6 {{ import none; export where source = RTS_BGP; }};
  merge paths on;
}}

{bfd}
filter lab_in4 {{
  if net ~ [ 198.18.100.0/24{{32,32}}, 198.19.200.0/24{{32,32}} ] then accept;
  reject;
}}

filter lab_in6 {{
  if net ~ [ 2001:db8:100::/64{{128,128}}, 2001:db8:200::/64{{128,128}} ] then accept;
  reject;
}}

template bgp lbnode {{
  local as {ROUTER_AS};
  ipv4 {{ import filter lab_in4; export none; }};
  ipv6 {{ import filter lab_in6; export none; }};
  hold time {HOLD_SECS}; keepalive time {KEEPALIVE_SECS};
  start delay time 1; connect retry time 1; error wait time 1, 3;
  bfd {bfd_on};
}}

{peers}"#,
        router_id = lab.node_gateway(1),
        bfd_on = if options.bfd { "on" } else { "off" },
    )
}

impl Bgp {
    /// Starts the router's BIRD, then each node's (writing a minimal node configuration — router
    /// id and `protocol device` — where the node has none yet).
    pub fn start(lab: &Lab, options: BgpOptions) -> Result<Bgp> {
        let mut bgp = Self::start_router(lab, options)?;
        for k in 1..=lab.spec().nodes {
            bgp.start_node_bird(lab, k)?;
        }
        Ok(bgp)
    }

    /// Starts the router's BIRD only: the nodes' BIRDs are someone else's (Ansible starts them
    /// in the deployment test).
    pub fn start_router(lab: &Lab, options: BgpOptions) -> Result<Bgp> {
        crate::tools::require(PROGRAMS)?;
        let config = lab.router_bird_config();
        std::fs::write(&config, router_config(lab, options))
            .with_context(|| format!("write {}", config.display()))?;
        let router = start_bird(
            lab,
            "router",
            &config,
            &lab.router_bird_socket(),
            &lab.dir().join("router-bird.pid"),
        )?;
        Ok(Bgp {
            options,
            router,
            nodes: (0..lab.spec().nodes).map(|_| None).collect(),
        })
    }

    /// What the BIRD instances were started with.
    pub fn options(&self) -> BgpOptions {
        self.options
    }

    /// The router's BIRD log so far.
    pub fn router_log(&self) -> String {
        self.router.log()
    }

    /// Node k's BIRD log so far (empty while it is stopped).
    pub fn node_log(&self, k: usize) -> String {
        self.nodes[k - 1]
            .as_ref()
            .map(LabProcess::log)
            .unwrap_or_default()
    }

    /// Starts node k's BIRD (again) with its configuration file, writing a minimal one first
    /// if there is none, and waits until it answers on its socket. Does nothing if it runs.
    pub fn start_node_bird(&mut self, lab: &Lab, k: usize) -> Result<()> {
        if self.nodes[k - 1]
            .as_ref()
            .is_some_and(LabProcess::is_running)
        {
            return Ok(());
        }
        let config = lab.node_bird_config(k);
        if !config.exists() {
            std::fs::write(
                &config,
                format!(
                    "# Node n{k}'s BIRD; the node rewrites this file.\n\
                     router id {};\nlog stderr all;\nprotocol device {{ }}\n",
                    lab.node_uplink(k)
                ),
            )
            .with_context(|| format!("write {}", config.display()))?;
        }
        let process = start_bird(
            lab,
            &format!("n{k}"),
            &config,
            &lab.node_bird_socket(k),
            &lab.dir().join(format!("n{k}-bird.pid")),
        )?;
        self.nodes[k - 1] = Some(process);
        Ok(())
    }

    /// Kills node k's BIRD (SIGKILL, by pid): its TCP sessions close, nothing is withdrawn
    /// gracefully.
    pub fn kill_node_bird(&mut self, k: usize) {
        if let Some(p) = self.nodes[k - 1].take() {
            p.kill();
        }
    }
}

/// The next hops in `ip route show` output: every address after `via` (single-path routes and
/// multipath `nexthop via …` lines alike; `via inet6 X` names the family first).
pub fn parse_next_hops(routes: &str) -> Result<Vec<IpAddr>> {
    let mut hops = Vec::new();
    let mut words = routes.split_whitespace();
    while let Some(word) = words.next() {
        if word != "via" {
            continue;
        }
        let mut addr = words.next().context("`via` without an address")?;
        if addr == "inet" || addr == "inet6" {
            addr = words.next().context("`via inet` without an address")?;
        }
        hops.push(
            addr.parse()
                .with_context(|| format!("next hop {addr:?} in {routes:?}"))?,
        );
    }
    Ok(hops)
}

impl Lab {
    /// The router's BIRD configuration file.
    pub fn router_bird_config(&self) -> PathBuf {
        self.dir().join("router-bird.conf")
    }

    /// The router's BIRD control socket.
    pub fn router_bird_socket(&self) -> PathBuf {
        self.dir().join("router-bird.sock")
    }

    /// Node k's BIRD configuration file (written by the node; the lab only writes a minimal one
    /// when there is none).
    pub fn node_bird_config(&self, k: usize) -> PathBuf {
        self.dir().join(format!("n{k}-bird.conf"))
    }

    /// Node k's BIRD control socket.
    pub fn node_bird_socket(&self, k: usize) -> PathBuf {
        self.dir().join(format!("n{k}-bird.sock"))
    }

    /// `birdc ARGS` against the router's BIRD.
    pub fn router_birdc(&self, args: &[&str]) -> Result<String> {
        birdc(&self.router_bird_socket(), args)
    }

    /// `birdc ARGS` against node k's BIRD.
    pub fn node_birdc(&self, k: usize, args: &[&str]) -> Result<String> {
        birdc(&self.node_bird_socket(k), args)
    }

    /// The router's BGP session to each node (`nK`) that is not Established, with its state.
    pub fn bgp_sessions_down(&self) -> Result<Vec<String>> {
        let protocols = self.router_birdc(&["show", "protocols"])?;
        Ok((1..=self.spec().nodes)
            .filter_map(|k| {
                let name = format!("n{k}");
                let line = protocols
                    .lines()
                    .find(|l| l.split_whitespace().next() == Some(name.as_str()));
                match line {
                    Some(l) if l.trim_end().ends_with("Established") => None,
                    Some(l) => Some(l.trim().to_owned()),
                    None => Some(format!("{name}: no such protocol")),
                }
            })
            .collect())
    }

    /// Waits up to `timeout` until the router's BGP sessions to all nodes are Established; how
    /// long that took.
    pub fn wait_bgp_established(&self, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        loop {
            let down = self.bgp_sessions_down()?;
            if down.is_empty() {
                return Ok(started.elapsed());
            }
            ensure!(
                started.elapsed() < timeout,
                "BGP sessions not Established within {timeout:?}: {down:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The router's next hops towards `addr` (`ip route show ADDR`, `-6` for IPv6): empty when
    /// it has no route, several for a multipath route.
    pub fn router_next_hops(&self, addr: IpAddr) -> Result<Vec<IpAddr>> {
        let family = if addr.is_ipv6() { "-6" } else { "-4" };
        let out = self.exec(
            "router",
            &["ip", family, "route", "show", &addr.to_string()],
        )?;
        parse_next_hops(&String::from_utf8_lossy(&out.stdout))
    }

    /// Waits up to `timeout` (polling every few milliseconds) until the router's next hops
    /// towards `addr` are exactly the uplinks of `nodes` (none: no route); how long that took.
    pub fn wait_next_hops(
        &self,
        addr: IpAddr,
        nodes: &[usize],
        timeout: Duration,
    ) -> Result<Duration> {
        let started = Instant::now();
        let expected: BTreeSet<IpAddr> = nodes
            .iter()
            .map(|&k| match addr {
                IpAddr::V4(_) => IpAddr::V4(self.node_uplink(k)),
                IpAddr::V6(_) => IpAddr::V6(self.node_uplink6(k)),
            })
            .collect();
        loop {
            let hops = self.router_next_hops(addr)?;
            if hops.len() == expected.len()
                && hops.iter().copied().collect::<BTreeSet<_>>() == expected
            {
                return Ok(started.elapsed());
            }
            ensure!(
                started.elapsed() < timeout,
                "the router's next hops to {addr} are {hops:?}, not nodes {nodes:?}, after {timeout:?}"
            );
            std::thread::sleep(POLL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_next_hops;

    #[test]
    fn next_hops_of_single_and_multipath_routes() {
        assert_eq!(
            parse_next_hops("198.18.100.1 via 198.18.51.2 dev n1 proto bird metric 32 \n").unwrap(),
            ["198.18.51.2".parse::<std::net::IpAddr>().unwrap()]
        );
        let multi = "198.18.100.1 proto bird metric 32 \n\
                     \tnexthop via 198.18.51.2 dev n1 weight 1 \n\
                     \tnexthop via 198.18.52.2 dev n2 weight 1 \n";
        assert_eq!(parse_next_hops(multi).unwrap().len(), 2);
        let v6 = "2001:db8:100::1 proto bird metric 32 pref medium\n\
                  \tnexthop via 2001:db8:51::2 dev n1 weight 1 \n\
                  \tnexthop via 2001:db8:53::2 dev n3 weight 1 \n";
        assert_eq!(
            parse_next_hops(v6).unwrap()[1],
            "2001:db8:53::2".parse::<std::net::IpAddr>().unwrap()
        );
        assert_eq!(
            parse_next_hops("198.18.100.1 via inet6 fe80::1 dev n1 proto bird\n").unwrap()[0],
            "fe80::1".parse::<std::net::IpAddr>().unwrap()
        );
        assert!(parse_next_hops("").unwrap().is_empty());
        assert!(parse_next_hops("198.18.100.1 via\n").is_err());
    }
}

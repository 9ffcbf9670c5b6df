//! A cluster site: the lab with N lbcluster nodes that share one configuration through Raft
//! over their QUIC endpoints (mutual TLS with a cluster CA made by `lbcluster tls`), managed
//! only through `lbcluster` commands. Node 1 bootstraps the cluster (`cluster init`) with the
//! services of its file; the others join with `node add`, once their join token file holds
//! what `cluster join-token` prints. VIPs and LIPs are routed by hand,
//! or, with [`ClusterOptions::bgp`], announced by the nodes through BIRD to the router's BIRD.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::bgp::{Bgp, BgpOptions, HOLD_SECS, KEEPALIVE_SECS, NODE_AS, ROUTER_AS};
use crate::lab::{Lab, LabProcess, LabSpec};
use crate::site::{VIP, lbcluster_bin, run_node};

/// The programs a cluster site runs besides every lab's: `nft` cuts nodes off in
/// [`ClusterSite::silence`] and [`ClusterSite::partition`], which check for it first.
pub const PROGRAMS: &[&str] = &["nft"];

/// The UDP port of every node's QUIC endpoint.
pub const QUIC_PORT: u16 = 7946;

/// The TCP port of every node's metrics address (`/metrics` and the status page), on its
/// uplink address.
pub const METRICS_PORT: u16 = 9100;

/// Node k's IPv4 LIP, 198.19.200.k.
pub fn lip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 200, u8::try_from(k).unwrap_or(u8::MAX))
}

/// Node k's IPv6 LIP, 2001:db8:200::k.
pub fn lip6(k: usize) -> Ipv6Addr {
    Ipv6Addr::new(
        0x2001,
        0xdb8,
        0x200,
        0,
        0,
        0,
        0,
        u16::try_from(k).unwrap_or(u16::MAX),
    )
}

/// What [`ClusterSite::change_latencies`] measured, one entry per change.
#[derive(Debug, Default)]
pub struct ChangeLatencies {
    /// How long `lbcluster backend edit` took, from start to return (commit, and the local data
    /// plane running it).
    pub commands: Vec<Duration>,
    /// From the command returning until every node's data plane ran the change.
    pub to_all: Vec<Duration>,
    /// The configuration version each change made.
    pub versions: Vec<u64>,
}

/// How long a node waits after withdrawing its VIPs before it stops (`[bgp] drain_wait_ms`).
pub const DRAIN_WAIT_MS: u64 = 1000;

/// What [`ClusterSite::start_with`] builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterOptions {
    /// Node namespaces `n1..=nodes`.
    pub nodes: usize,
    /// How many of them form the cluster at the start (`n1..=members`).
    pub members: usize,
    /// Backend namespaces.
    pub backends: usize,
    /// BGP through BIRD (the router's and one per node, each node's daemon configuring its
    /// own) instead of routes set by hand.
    pub bgp: Option<BgpOptions>,
}

/// A lab whose nodes form one cluster.
#[derive(Debug)]
pub struct ClusterSite {
    pub lab: Lab,
    /// Node k's daemon at index k-1, `None` while it is stopped.
    nodes: Vec<Option<LabProcess>>,
    /// The BIRD instances, with [`ClusterOptions::bgp`].
    bgp: Option<Bgp>,
}

/// Who leads the Raft cluster, and in which term.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    pub leader: String,
    pub term: u64,
}

/// The answer of one `lbcluster` command.
#[derive(Debug)]
pub struct CliOutput {
    /// The exit code (-1 if killed by a signal).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for CliOutput {
    fn from(o: Output) -> Self {
        CliOutput {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl CliOutput {
    /// The answer of `lbcluster status -o json` on node k: its exit code (below 3) and
    /// document.
    pub fn status(self, k: usize) -> Result<(i32, Value)> {
        ensure!(
            self.code < 3,
            "status of n{k}: exit {}: {}",
            self.code,
            self.stderr
        );
        Ok((self.code, serde_json::from_str(&self.stdout)?))
    }

    /// The output, or an error with everything it said.
    pub fn ok(self) -> Result<String> {
        ensure!(
            self.code == 0,
            "exit {}: {}{}",
            self.code,
            self.stdout,
            self.stderr
        );
        Ok(self.stdout)
    }
}

impl ClusterSite {
    /// Brings up a lab with `nodes` node namespaces and `backends` backends, writes a CA and a
    /// certificate and config for every node, starts the first `members` nodes and forms the
    /// cluster: `cluster init` on node 1 (which bootstraps a TCP service on VIP:80 over the
    /// backends' HTTP servers), `node add` for each of the others, and routes the VIP to node
    /// 1 and each node's LIPs to it.
    pub fn start(nodes: usize, members: usize, backends: usize) -> Result<ClusterSite> {
        Self::start_with(ClusterOptions {
            nodes,
            members,
            backends,
            bgp: None,
        })
    }

    /// Like [`ClusterSite::start`]; with [`ClusterOptions::bgp`] it first starts the router's
    /// BIRD and each node's, gives every node a `[bgp]` section (its BIRD's config file and
    /// socket, one peer: the router) and routes nothing by hand: the nodes announce.
    pub fn start_with(options: ClusterOptions) -> Result<ClusterSite> {
        let ClusterOptions {
            nodes,
            members,
            backends,
            bgp,
        } = options;
        ensure!(
            (1..=nodes).contains(&members),
            "{members} members of {nodes} nodes"
        );
        let lab = Lab::up(LabSpec { nodes, backends })?;
        let bgp = bgp.map(|o| Bgp::start(&lab, o)).transpose()?;
        let mut site = ClusterSite {
            nodes: (0..nodes).map(|_| None).collect(),
            lab,
            bgp,
        };
        site.lbc(&[
            "tls",
            "ca",
            "create",
            "--dir",
            &site.tls_dir().to_string_lossy(),
        ])?
        .ok()?;
        for k in 1..=nodes {
            site.write_cert(k, &site.tls_dir())?;
            site.write_config(k, &site.tls_dir())?;
        }
        for k in 1..=members {
            site.start_node(k)?;
        }
        site.cli(1, &["cluster", "init"])?.ok()?;
        for k in 2..=members {
            site.add_node(1, k).with_context(|| {
                format!(
                    "adding n{k}\n--- n1 log:\n{}\n--- n{k} log:\n{}",
                    site.log(1),
                    site.log(k)
                )
            })?;
        }
        if site.bgp.is_some() {
            return Ok(site);
        }
        site.lab.route_to_node(IpAddr::V4(VIP), 1)?;
        for k in 1..=nodes {
            site.lab.route_to_node(IpAddr::V4(lip(k)), k)?;
            site.lab.route_to_node(IpAddr::V6(lip6(k)), k)?;
        }
        Ok(site)
    }

    fn tls_dir(&self) -> PathBuf {
        self.lab.dir().join("tls")
    }

    /// Runs `lbcluster ARGS` (not in a namespace: it only needs the admin socket).
    pub fn lbc(&self, args: &[&str]) -> Result<CliOutput> {
        Ok(Command::new(lbcluster_bin()?)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("lbcluster {args:?}"))?
            .into())
    }

    /// Writes node k's certificate (signed by the CA in `ca_dir`) into the lab's TLS directory
    /// as nK.pem / nK.key.
    pub fn write_cert(&self, k: usize, ca_dir: &Path) -> Result<()> {
        self.lbc(&[
            "tls",
            "cert",
            "create",
            "--ca-dir",
            &ca_dir.to_string_lossy(),
            "--node",
            &format!("n{k}"),
            "--ip",
            &self.lab.node_uplink(k).to_string(),
            "--out",
            &self.tls_dir().to_string_lossy(),
            "--force",
        ])?
        .ok()
        .map(drop)
    }

    /// Writes node k's config file, trusting the CA certificate in `ca_dir`.
    pub fn write_config(&self, k: usize, ca_dir: &Path) -> Result<()> {
        let tls = self.tls_dir();
        let backends: String = (1..=self.lab.spec().backends)
            .map(|j| {
                format!(
                    "[[service.backend]]\naddr = \"{}:8080\"\n",
                    self.lab.backend_addr(j)
                )
            })
            .collect();
        let config = format!(
            r#"[node]
name = "n{k}"
tun = "lbc0"
workers = 1
local_addrs = ["{lip}", "{lip6}"]

[admin]
socket = "{socket}"
metrics = "{uplink}:{METRICS_PORT}"

[cluster]
listen = "{uplink}:{QUIC_PORT}"
data_dir = "{data}"
ca = "{ca}"
cert = "{tls}/n{k}.pem"
key = "{tls}/n{k}.key"
heartbeat_ms = 100
election_timeout_ms = [400, 800]
join_token_file = "{join}"
{bgp}
[[service]]
vip = "{VIP}:80"
proto = "tcp"
scheduler = "rr"
{backends}"#,
            lip = lip(k),
            lip6 = lip6(k),
            socket = self.socket(k).display(),
            uplink = self.lab.node_uplink(k),
            data = self.data_dir(k).display(),
            ca = ca_dir.join("ca.pem").display(),
            tls = tls.display(),
            join = self.join_token_file(k).display(),
            bgp = self.bgp_section(k),
        );
        std::fs::write(self.config_path(k), config)?;
        Ok(())
    }

    /// Node k's `[bgp]` section (empty without BGP): its BIRD's files, and the router as its
    /// one peer.
    fn bgp_section(&self, k: usize) -> String {
        let Some(bgp) = &self.bgp else {
            return String::new();
        };
        let bfd = if bgp.options().bfd {
            "bfd = true\n"
        } else {
            ""
        };
        format!(
            r#"
[bgp]
bird_config = "{config}"
bird_socket = "{socket}"
local_as = {NODE_AS}
router_id = "{uplink}"
drain_wait_ms = {DRAIN_WAIT_MS}
[[bgp.peer]]
name = "router"
addr = "{gateway}"
remote_as = {ROUTER_AS}
hold_secs = {HOLD_SECS}
keepalive_secs = {KEEPALIVE_SECS}
{bfd}"#,
            config = self.bird_config(k).display(),
            socket = self.bird_socket(k).display(),
            uplink = self.lab.node_uplink(k),
            gateway = self.lab.node_gateway(k),
        )
    }

    /// Node k's metrics address: `/metrics` and the status page at `/`.
    pub fn metrics_addr(&self, k: usize) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.lab.node_uplink(k)), METRICS_PORT)
    }

    /// Node k's Raft data directory (`cluster.data_dir`).
    pub fn data_dir(&self, k: usize) -> PathBuf {
        self.lab.dir().join(format!("n{k}-raft"))
    }

    /// Node k's BIRD configuration file (written by its daemon).
    pub fn bird_config(&self, k: usize) -> PathBuf {
        self.lab.node_bird_config(k)
    }

    /// Node k's BIRD control socket.
    pub fn bird_socket(&self, k: usize) -> PathBuf {
        self.lab.node_bird_socket(k)
    }

    /// The BIRD instances, if the site was started with BGP.
    pub fn bgp(&self) -> Option<&Bgp> {
        self.bgp.as_ref()
    }

    /// Kills node k's BIRD (SIGKILL): the router drops its routes when the session closes.
    pub fn kill_node_bird(&mut self, k: usize) -> Result<()> {
        self.bgp
            .as_mut()
            .context("the site runs without BGP")?
            .kill_node_bird(k);
        Ok(())
    }

    /// Starts node k's BIRD again with the configuration its daemon wrote.
    pub fn start_node_bird(&mut self, k: usize) -> Result<()> {
        let bgp = self.bgp.as_mut().context("the site runs without BGP")?;
        bgp.start_node_bird(&self.lab, k)
    }

    /// Node k's join token file (written by [`ClusterSite::add_node`]).
    pub fn join_token_file(&self, k: usize) -> PathBuf {
        self.lab.dir().join(format!("n{k}.join"))
    }

    fn config_path(&self, k: usize) -> PathBuf {
        self.lab.dir().join(format!("n{k}.toml"))
    }

    /// Node k's admin socket.
    pub fn socket(&self, k: usize) -> PathBuf {
        self.lab.dir().join(format!("n{k}.sock"))
    }

    /// Node k's QUIC address.
    pub fn quic_addr(&self, k: usize) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.lab.node_uplink(k)), QUIC_PORT)
    }

    /// Starts node k's daemon (again), keeping its Raft data.
    pub fn start_node(&mut self, k: usize) -> Result<()> {
        let process = run_node(
            &self.lab,
            &format!("n{k}"),
            &self.config_path(k),
            &self.socket(k),
        )?;
        self.nodes[k - 1] = Some(process);
        Ok(())
    }

    /// Kills node k's daemon (SIGKILL): no goodbye to its peers.
    pub fn kill_node(&mut self, k: usize) {
        if let Some(p) = self.nodes[k - 1].take() {
            p.kill();
        }
    }

    /// Stops node k's daemon with SIGTERM and waits for it to exit.
    pub fn stop_node(&mut self, k: usize) -> Result<()> {
        if let Some(p) = self.nodes[k - 1].take() {
            p.signal("TERM")?;
            ensure!(
                p.wait_timeout(Duration::from_secs(15)).is_some(),
                "n{k} did not stop after SIGTERM:\n{}",
                p.log()
            );
        }
        Ok(())
    }

    /// Node k's daemon, `None` while it is stopped.
    pub fn node(&self, k: usize) -> Option<&LabProcess> {
        self.nodes[k - 1].as_ref()
    }

    /// Node k's daemon log so far.
    pub fn log(&self, k: usize) -> String {
        self.nodes[k - 1]
            .as_ref()
            .map(LabProcess::log)
            .unwrap_or_default()
    }

    /// `lbcluster ARGS --socket <node k's socket>`.
    pub fn cli(&self, k: usize, args: &[&str]) -> Result<CliOutput> {
        let socket = self.socket(k);
        let mut all: Vec<&str> = args.to_vec();
        let socket = socket.to_string_lossy();
        all.extend(["--socket", &socket]);
        self.lbc(&all)
    }

    /// `node add nK` through node `via`, with node k's address and LIPs, after writing the
    /// cluster's join token (`cluster join-token` on `via`) into node k's token file.
    pub fn add_node(&self, via: usize, k: usize) -> Result<String> {
        let token = self.cli(via, &["cluster", "join-token"])?.ok()?;
        std::fs::write(self.join_token_file(k), token)?;
        self.cli(
            via,
            &[
                "node",
                "add",
                &format!("n{k}"),
                "--addr",
                &self.quic_addr(k).to_string(),
                "--lip",
                &lip(k).to_string(),
                "--lip",
                &lip6(k).to_string(),
            ],
        )?
        .ok()
    }

    /// `lbcluster status -o json` on node k: its exit code and document.
    pub fn status(&self, k: usize) -> Result<(i32, Value)> {
        self.cli(k, &["status", "-o", "json"])?.status(k)
    }

    /// The cluster configuration as node k reads it (`service list -o json`).
    pub fn services(&self, k: usize) -> Result<Value> {
        Ok(serde_json::from_str(
            &self.cli(k, &["service", "list", "-o", "json"])?.ok()?,
        )?)
    }

    /// The name of the node that node k's status reports as leader.
    pub fn leader(&self, k: usize) -> Result<Option<String>> {
        let (_, status) = self.status(k)?;
        Ok(status["cluster"]["leader"].as_str().map(str::to_owned))
    }

    /// The leader node k's status names and that leader's term (from its row), once it names
    /// one.
    pub fn leadership(&self, k: usize) -> Result<Leadership> {
        let (_, status) = self.status(k)?;
        let leader = status["cluster"]["leader"]
            .as_str()
            .with_context(|| format!("n{k} knows no leader: {}", status["cluster"]))?;
        let term = status["cluster"]["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["name"] == leader)
            .and_then(|n| n["term"].as_u64())
            .with_context(|| format!("no term for {leader}: {}", status["cluster"]))?;
        Ok(Leadership {
            leader: leader.to_owned(),
            term,
        })
    }

    /// The number k of the node that leads, as node `via` sees it (waits up to `timeout` for
    /// one).
    pub fn leader_index(&self, via: usize, timeout: Duration) -> Result<usize> {
        let name = self.wait_for("a leader", timeout, |s| {
            s.leader(via)?.context("no leader yet")
        })?;
        name.strip_prefix('n')
            .and_then(|k| k.parse().ok())
            .with_context(|| format!("leader {name:?}"))
    }

    /// Waits up to `timeout` for `check` to hold, polling every 100 ms; the last error if it
    /// never does.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Self) -> Result<T>,
    ) -> Result<T> {
        crate::lab::wait_for(what, timeout, Duration::from_millis(100), || check(self))
    }

    /// `GET path` on node k's admin socket, answered as JSON (a plain HTTP/1.0 exchange, so
    /// that polling costs no process start).
    pub fn admin_get(&self, k: usize, path: &str) -> Result<Value> {
        let mut stream = UnixStream::connect(self.socket(k))
            .with_context(|| format!("connecting to n{k}'s admin socket"))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: lbcluster\r\n\r\n")?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .with_context(|| format!("no HTTP answer from n{k}: {answer:?}"))?;
        ensure!(
            head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
            "{head}"
        );
        Ok(serde_json::from_str(body)?)
    }

    /// The configuration version node k's data plane runs.
    pub fn running_version(&self, k: usize) -> Result<u64> {
        self.admin_get(k, "/v1/status?local=true")?["config_version"]
            .as_u64()
            .context("no config_version")
    }

    /// The benchmark of DESIGN §4's promise: `changes` backend weight changes, each made with
    /// `lbcluster backend edit` on node 1; for each, the time from the command returning until
    /// every node in `nodes` runs the new version in its data plane (polled every 200 µs).
    /// Needs a service on VIP:80 with backend 1 (what [`ClusterSite::start`] bootstraps).
    pub fn change_latencies(&self, nodes: &[usize], changes: usize) -> Result<ChangeLatencies> {
        let vip = format!("{VIP}:80");
        let backend = format!("{}:8080", self.lab.backend_addr(1));
        let mut result = ChangeLatencies::default();
        for i in 0..changes {
            let weight = (i % 50 + 2).to_string();
            let started = Instant::now();
            let out = self
                .cli(
                    1,
                    &["backend", "edit", "-t", &vip, "-r", &backend, "-w", &weight],
                )?
                .ok()?;
            let returned = Instant::now();
            result.commands.push(returned - started);
            let version: u64 = out
                .rsplit_once("configuration version ")
                .and_then(|(_, v)| v.trim().trim_end_matches(')').parse().ok())
                .with_context(|| format!("no version in {out:?}"))?;
            let mut pending: Vec<usize> = nodes.to_vec();
            let deadline = returned + Duration::from_secs(10);
            while !pending.is_empty() {
                ensure!(
                    Instant::now() < deadline,
                    "version {version} not running on {pending:?} after 10 s"
                );
                let mut still = Vec::new();
                for &k in &pending {
                    if self.running_version(k)? < version {
                        still.push(k);
                    }
                }
                pending = still;
                if !pending.is_empty() {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            result.to_all.push(returned.elapsed());
            result.versions.push(version);
        }
        Ok(result)
    }

    /// Starts `lab-backend streams` in the client namespace: `conns` long-lived connections
    /// through the TCP echo service at `target` for `seconds`, every byte checked.
    pub fn start_streams(
        &self,
        target: SocketAddr,
        conns: u32,
        seconds: u64,
    ) -> Result<LabProcess> {
        crate::load::client_tool(
            &self.lab,
            &[
                "streams",
                &target.to_string(),
                "--conns",
                &conns.to_string(),
                "--seconds",
                &seconds.to_string(),
            ],
        )
    }

    /// Starts `lab-backend load` in the client namespace ([`crate::load::start`]).
    pub fn start_load(
        &self,
        streams_to: SocketAddr,
        http_to: SocketAddr,
        conns: u32,
        rate: u32,
        seconds: u64,
    ) -> Result<LabProcess> {
        crate::load::start(&self.lab, streams_to, http_to, conns, rate, seconds)
    }

    /// Waits (at most `timeout`) for a [`ClusterSite::start_streams`] or
    /// [`ClusterSite::start_load`] run to end and returns its JSON report.
    pub fn streams_report(&self, streams: &LabProcess, timeout: Duration) -> Result<Value> {
        crate::load::report(streams, timeout)
    }

    /// Takes node k's uplink down: the node is cut off from the router, its processes keep
    /// running.
    pub fn cut_links(&self, k: usize) -> Result<()> {
        self.lab.exec(
            &format!("n{k}"),
            &["ip", "link", "set", crate::lab::NODE_UPLINK_IF, "down"],
        )?;
        Ok(())
    }

    /// Moves the router's routes for the VIP and node `from`'s LIPs to node `to`, as BGP would
    /// when `from` fails.
    pub fn move_routes(&self, from: usize, to: usize) -> Result<()> {
        self.lab.route_to_node(IpAddr::V4(VIP), to)?;
        self.lab.route_to_node(IpAddr::V4(lip(from)), to)?;
        self.lab.route_to_node(IpAddr::V6(lip6(from)), to)?;
        Ok(())
    }

    /// Makes node k silently stop answering: nftables in its namespace drops everything on its
    /// uplink, both ways (no TCP reset, no link change: only timers or BFD notice).
    pub fn silence(&self, k: usize) -> Result<()> {
        crate::tools::require(PROGRAMS)?;
        let dev = crate::lab::NODE_UPLINK_IF;
        let rules = format!(
            "table inet lbc_silence {{\n\
               chain input {{ type filter hook input priority 0; iifname \"{dev}\" drop; }}\n\
               chain output {{ type filter hook output priority 0; oifname \"{dev}\" drop; }}\n\
             }}\n"
        );
        let path = self.lab.dir().join(format!("n{k}-silence.nft"));
        std::fs::write(&path, rules)?;
        self.lab
            .exec(&format!("n{k}"), &["nft", "-f", &path.to_string_lossy()])?;
        Ok(())
    }

    /// Cuts node k off from the cluster's QUIC traffic with nftables in its namespace (its
    /// data plane keeps running).
    pub fn partition(&self, k: usize) -> Result<()> {
        crate::tools::require(PROGRAMS)?;
        let rules = format!(
            "table inet lbc_partition {{\n\
               chain input {{ type filter hook input priority 0; udp dport {QUIC_PORT} drop; udp sport {QUIC_PORT} drop; }}\n\
               chain output {{ type filter hook output priority 0; udp dport {QUIC_PORT} drop; udp sport {QUIC_PORT} drop; }}\n\
             }}\n"
        );
        let path = self.lab.dir().join(format!("n{k}-partition.nft"));
        std::fs::write(&path, rules)?;
        self.lab
            .exec(&format!("n{k}"), &["nft", "-f", &path.to_string_lossy()])?;
        Ok(())
    }

    /// Undoes [`ClusterSite::partition`].
    pub fn heal(&self, k: usize) -> Result<()> {
        self.lab.exec(
            &format!("n{k}"),
            &["nft", "delete", "table", "inet", "lbc_partition"],
        )?;
        Ok(())
    }
}

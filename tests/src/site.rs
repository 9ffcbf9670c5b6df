//! A site: the lab with one lbcluster node in front of two backends, its VIPs and LIPs routed
//! to the node by hand (until BGP exists). Used by the end-to-end tests and the demo.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::lab::{Lab, LabProcess, LabSpec};

pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1);
pub const LIP: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 1);
pub const LIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 1);

/// The `lbcluster` binary: `$LBC_BIN`, else next to the running executable or one directory up.
pub fn lbcluster_bin() -> Result<PathBuf> {
    crate::lab::find_binary("lbcluster", "LBC_BIN", "cargo build -p node")
}

/// Starts `lbcluster run --config CONFIG` in a lab namespace and waits until it answers on its
/// admin socket (`status` exits 0–2), or fails with the daemon's log.
pub fn run_node(lab: &Lab, role: &str, config: &Path, socket: &Path) -> Result<LabProcess> {
    let bin = lbcluster_bin()?;
    let node = lab.spawn(
        role,
        &[
            &bin.to_string_lossy(),
            "run",
            "--config",
            &config.to_string_lossy(),
        ],
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        ensure!(node.is_running(), "lbcluster exited:\n{}", node.log());
        let status = Command::new(&bin)
            .arg("status")
            .arg("--socket")
            .arg(socket)
            .stdin(Stdio::null())
            .output();
        if status.is_ok_and(|o| o.status.code().is_some_and(|c| c < 3)) {
            return Ok(node);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("lbcluster did not come up:\n{}", node.log())
}

/// How a [`Site`] is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiteOptions<'a> {
    /// The scheduler of the TCP services (`rr`, `maglev`, …).
    pub scheduler: &'a str,
    /// Whether the TCP services insert the client's address into the SYN (TOA).
    pub toa: bool,
    /// More lines for the node file's `[node]` section (`fastpath = "off"`, …).
    pub node: &'a str,
    /// More lines for the TCP echo services on port 9000 (`timeouts = { … }`, …).
    pub echo: &'a str,
    /// More lines for the IPv4 HTTP service on port 80 (`syn_proxy = "on"`, …).
    pub http: &'a str,
}

impl Default for SiteOptions<'_> {
    fn default() -> Self {
        SiteOptions {
            scheduler: "rr",
            toa: false,
            node: "",
            echo: "",
            http: "",
        }
    }
}

/// A lab with one lbcluster node in front of two backends.
#[derive(Debug)]
pub struct Site {
    pub lab: Lab,
    pub node: LabProcess,
    pub socket: PathBuf,
}

impl Site {
    /// [`Site::start_with`] without TOA.
    pub fn start(scheduler: &str) -> Result<Site> {
        Self::start_with(SiteOptions {
            scheduler,
            ..SiteOptions::default()
        })
    }

    /// Brings the lab up, starts `lbcluster run` in node 1 with TCP services on both VIPs (port
    /// 80 to the backends' HTTP server, HTTP health checks on the IPv4 one; port 9000 to their
    /// TCP echo server) and a UDP service on port 53 (to their UDP echo server), and routes the
    /// VIPs and LIPs to it.
    pub fn start_with(options: SiteOptions<'_>) -> Result<Site> {
        let SiteOptions {
            scheduler,
            toa,
            node,
            echo,
            http,
        } = options;
        let lab = Lab::up(LabSpec {
            nodes: 1,
            backends: 2,
        })?;
        let socket = lab.dir().join("n1.sock");
        let (b1, b2) = (lab.backend_addr(1), lab.backend_addr(2));
        let (b1v6, b2v6) = (lab.backend_addr6(1), lab.backend_addr6(2));
        let health = r#"health = { kind = "http", path = "/", expect_status = 200, interval_ms = 300, timeout_ms = 200, rise = 1, fall = 2 }"#;
        let config = format!(
            r#"[node]
name = "n1"
tun = "lbc0"
workers = 2
local_addrs = ["{LIP}", "{LIP6}"]
{node}

[admin]
socket = "{socket}"

[[service]]
vip = "{VIP}:80"
proto = "tcp"
scheduler = "{scheduler}"
toa = {toa}
{health}
{http}
[[service.backend]]
addr = "{b1}:8080"
[[service.backend]]
addr = "{b2}:8080"

[[service]]
vip = "{VIP}:9000"
proto = "tcp"
scheduler = "{scheduler}"
toa = {toa}
{echo}
[[service.backend]]
addr = "{b1}:9000"
[[service.backend]]
addr = "{b2}:9000"

[[service]]
vip = "{VIP}:53"
proto = "udp"
scheduler = "rr"
[[service.backend]]
addr = "{b1}:5353"
[[service.backend]]
addr = "{b2}:5353"

[[service]]
vip = "[{VIP6}]:80"
proto = "tcp"
scheduler = "{scheduler}"
toa = {toa}
[[service.backend]]
addr = "[{b1v6}]:8080"
[[service.backend]]
addr = "[{b2v6}]:8080"

[[service]]
vip = "[{VIP6}]:9000"
proto = "tcp"
scheduler = "{scheduler}"
toa = {toa}
{echo}
[[service.backend]]
addr = "[{b1v6}]:9000"
[[service.backend]]
addr = "[{b2v6}]:9000"

[[service]]
vip = "[{VIP6}]:53"
proto = "udp"
scheduler = "rr"
[[service.backend]]
addr = "[{b1v6}]:5353"
[[service.backend]]
addr = "[{b2v6}]:5353"
"#,
            socket = socket.display(),
        );
        let path = lab.dir().join("n1.toml");
        std::fs::write(&path, config)?;
        let node = run_node(&lab, "n1", &path, &socket)?;
        let site = Site { lab, node, socket };
        for addr in [
            IpAddr::V4(VIP),
            IpAddr::V6(VIP6),
            IpAddr::V4(LIP),
            IpAddr::V6(LIP6),
        ] {
            site.lab.route_to_node(addr, 1)?;
        }
        Ok(site)
    }

    /// `lbcluster status` against the node.
    pub fn status(&self, json: bool) -> Result<Output> {
        let mut cmd = Command::new(lbcluster_bin()?);
        cmd.args(["status", "--socket"]).arg(&self.socket);
        if json {
            cmd.args(["-o", "json"]);
        }
        Ok(cmd.output()?)
    }

    /// `lbcluster sessions` against the node (text, like `ipvsadm -Lnc`).
    pub fn sessions(&self) -> Result<String> {
        let out = Command::new(lbcluster_bin()?)
            .args(["sessions", "--socket"])
            .arg(&self.socket)
            .output()?;
        ensure!(
            out.status.success(),
            "lbcluster sessions: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    /// An engine event counter (`icmp_translated`, `toa_inserted`, …) from
    /// `lbcluster status -o json`.
    pub fn event(&self, name: &str) -> Result<u64> {
        self.counter("events", name)
    }

    /// A drop counter (`table_full`, `bad_cookie`, …) from `lbcluster status -o json`.
    pub fn drop_count(&self, name: &str) -> Result<u64> {
        self.counter("drops", name)
    }

    fn counter(&self, list: &str, name: &str) -> Result<u64> {
        let out = self.status(true)?;
        ensure!(
            out.status.code().is_some_and(|c| c < 3),
            "lbcluster status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        status[list]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == name)
            .and_then(|e| e["count"].as_u64())
            .with_context(|| format!("no {list} counter {name} in the status"))
    }

    /// An engine drop counter (`fragment_untracked`, `echo_not_vip`, …) from
    /// `lbcluster status -o json`.
    pub fn dropped(&self, name: &str) -> Result<u64> {
        let out = self.status(true)?;
        ensure!(
            out.status.code().is_some_and(|c| c < 3),
            "lbcluster status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        status["drops"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == name)
            .and_then(|e| e["count"].as_u64())
            .with_context(|| format!("no drop reason {name} in the status"))
    }

    /// `GET path` on port 80 of a VIP, from the client namespace.
    pub fn get(&self, vip: IpAddr, path: &str) -> Result<String> {
        self.lab.http_get("client", SocketAddr::new(vip, 80), path)
    }
}

//! The node's config file: TOML read into types that mirror it key for key (unknown keys are
//! rejected), then checked as a whole into a [`Config`]. Loading binds, opens and changes
//! nothing; the first error names the file, the line where toml knows it, the key and the reason.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dataplane::sched::{MaglevParams, SchedulerKind};
use dataplane::service::SnapshotError;
use dataplane::{BackendConfig, ConnReuse, ServiceConfig, Snapshot, SynProxy, Timeouts};
use serde::Deserialize;
use toml::Spanned;

use crate::api::Proto;

/// Where the daemon listens and the CLI connects unless told otherwise.
pub(crate) const DEFAULT_SOCKET: &str = "/run/lbcluster/lbcluster.sock";
/// Weights are 16-bit, as in IPVS.
const MAX_WEIGHT: u32 = 65535;
/// Linux interface names hold at most 15 bytes.
const MAX_IFNAME: usize = 15;

/// A checked config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Config {
    pub(crate) node: NodeConfig,
    pub(crate) admin: AdminConfig,
    /// Present when the node is a member of a replicated cluster: its services then come from
    /// the cluster configuration, and the file's services only bootstrap it (`cluster init`).
    pub(crate) cluster: Option<ClusterSettings>,
    /// Present when the node announces its VIPs and LIPs over BGP through a local BIRD.
    pub(crate) bgp: Option<BgpSettings>,
    pub(crate) services: ServiceSet,
}

/// `[bgp]`: the node's BIRD and its BGP sessions (host settings; the drain state is replicated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BgpSettings {
    /// The BIRD config file the node writes (whole) and BIRD reads.
    pub(crate) bird_config: PathBuf,
    /// BIRD's control socket (`birdc -s`).
    pub(crate) bird_socket: PathBuf,
    pub(crate) local_as: u32,
    pub(crate) router_id: std::net::Ipv4Addr,
    /// How long a drain announces the VIPs with the graceful-shutdown community before it
    /// withdraws them.
    pub(crate) drain_wait: Duration,
    pub(crate) communities: Vec<(u16, u16)>,
    pub(crate) med: Option<u32>,
    pub(crate) peers: Vec<bgp::Peer>,
}

/// `[cluster]`: how the node takes part in the replicated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClusterSettings {
    /// The node's QUIC endpoint (Raft, session sync); peers dial this address.
    pub(crate) listen: SocketAddr,
    /// Raft log, vote and snapshot.
    pub(crate) data_dir: PathBuf,
    /// The cluster CA certificate, the node's certificate and its private key (PEM).
    pub(crate) ca: PathBuf,
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    pub(crate) heartbeat: Duration,
    /// A follower that hears no leader for a random time in this range starts an election.
    pub(crate) election_timeout: RangeInclusive<Duration>,
    /// The file holding the join token of the cluster this node is being added to (what
    /// `lbcluster cluster join-token` prints); read only while the node has not joined one.
    pub(crate) join_token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeConfig {
    pub(crate) name: String,
    pub(crate) tun: String,
    /// Packet worker threads; 0 means one per core.
    pub(crate) workers: usize,
    pub(crate) local_addrs: Vec<IpAddr>,
    pub(crate) local_ports: RangeInclusive<u16>,
    pub(crate) max_sessions_v4: u32,
    pub(crate) max_sessions_v6: u32,
    /// Whether established flows are forwarded by the kernel fast path.
    pub(crate) fastpath: FastPathMode,
    /// The devices the fast path is attached to; `None`: every device that is up, but the
    /// loopback and the TUN device.
    pub(crate) fastpath_devices: Option<Vec<String>>,
    /// Sessions the fast path holds at most (its map has two entries a session); more stay on
    /// the slow path.
    pub(crate) fastpath_sessions: u32,
}

/// `[node] fastpath`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum FastPathMode {
    /// On when the kernel accepts the program; otherwise off, said in the log and `status`.
    #[default]
    Auto,
    /// On, or the node does not start.
    On,
    Off,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AdminConfig {
    pub(crate) socket: PathBuf,
    pub(crate) metrics: Option<SocketAddr>,
}

/// The services the data plane runs, as one versioned whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServiceSet {
    pub(crate) version: u64,
    pub(crate) maglev: MaglevParams,
    pub(crate) services: Vec<Service>,
}

/// A service with its backends (all `healthy` as configured) and its health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Service {
    pub(crate) config: ServiceConfig,
    pub(crate) health: HealthCheck,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HealthCheck {
    /// Not checked: always healthy.
    None,
    /// A TCP connect.
    Tcp(Probe),
    /// An HTTP/1.1 GET whose status must be `expect_status`.
    Http {
        probe: Probe,
        path: String,
        expect_status: u16,
    },
}

impl HealthCheck {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            HealthCheck::None => "none",
            HealthCheck::Tcp(_) => "tcp",
            HealthCheck::Http { .. } => "http",
        }
    }
}

/// When a check runs and how many results in a row change a backend's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Probe {
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
    /// Successes in a row that bring a down backend up.
    pub(crate) rise: u32,
    /// Failures in a row that take an up backend down.
    pub(crate) fall: u32,
}

/// The first thing wrong with a config file.
#[derive(Debug)]
pub(crate) struct ConfigError {
    path: PathBuf,
    /// 1-based line and column, where known.
    at: Option<(usize, usize)>,
    /// The key at fault, as a path (`service[198.18.100.1:80/tcp].backend[…].weight`).
    key: Option<String>,
    reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some((line, col)) = self.at {
            write!(f, ":{line}:{col}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// Reads and checks a config file; the service set gets `version`.
pub(crate) fn load(path: &Path, version: u64) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        path: path.to_owned(),
        at: None,
        key: None,
        reason: format!("cannot read the file: {e}"),
    })?;
    parse(&text, version).map_err(|e| ConfigError {
        path: path.to_owned(),
        at: e.span.map(|s| line_col(&text, s.start)),
        key: e.key,
        reason: e.reason,
    })
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

/// A config error before the file name is known.
#[derive(Debug)]
struct Invalid {
    span: Option<std::ops::Range<usize>>,
    key: Option<String>,
    reason: String,
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Invalid {
    Invalid {
        span: None,
        key: Some(key.into()),
        reason: reason.into(),
    }
}

impl Invalid {
    fn at(mut self, span: std::ops::Range<usize>) -> Self {
        self.span = Some(span);
        self
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    node: NodeFile,
    #[serde(default)]
    admin: AdminFile,
    #[serde(default)]
    maglev: MaglevFile,
    cluster: Option<ClusterFile>,
    bgp: Option<BgpFile>,
    #[serde(default, rename = "service")]
    services: Vec<Spanned<ServiceFile>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    name: String,
    #[serde(default = "default_tun")]
    tun: String,
    #[serde(default)]
    workers: usize,
    local_addrs: Vec<IpAddr>,
    local_ports: Option<[u16; 2]>,
    max_sessions_v4: Option<u32>,
    max_sessions_v6: Option<u32>,
    #[serde(default)]
    fastpath: FastPathMode,
    fastpath_devices: Option<Vec<String>>,
    fastpath_sessions: Option<u32>,
}

fn default_tun() -> String {
    "lbc0".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminFile {
    #[serde(default = "default_socket")]
    socket: PathBuf,
    metrics: Option<SocketAddr>,
}

impl Default for AdminFile {
    fn default() -> Self {
        AdminFile {
            socket: default_socket(),
            metrics: None,
        }
    }
}

fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BgpFile {
    bird_config: PathBuf,
    bird_socket: PathBuf,
    local_as: u32,
    router_id: std::net::Ipv4Addr,
    #[serde(default = "default_drain_wait_ms")]
    drain_wait_ms: u64,
    #[serde(default)]
    communities: Vec<[u16; 2]>,
    med: Option<u32>,
    #[serde(default, rename = "peer")]
    peers: Vec<BgpPeerFile>,
}

fn default_drain_wait_ms() -> u64 {
    3000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BgpPeerFile {
    name: String,
    addr: IpAddr,
    remote_as: u32,
    local_addr: Option<IpAddr>,
    #[serde(default = "default_hold_secs")]
    hold_secs: u16,
    #[serde(default = "default_keepalive_secs")]
    keepalive_secs: u16,
    #[serde(default)]
    bfd: bool,
    #[serde(default = "default_bfd_interval_ms")]
    bfd_interval_ms: u32,
    #[serde(default = "default_bfd_multiplier")]
    bfd_multiplier: u8,
    /// A file holding the TCP-MD5 password (secrets by path, never in this file).
    password_file: Option<PathBuf>,
}

fn default_hold_secs() -> u16 {
    3
}

fn default_keepalive_secs() -> u16 {
    1
}

fn default_bfd_interval_ms() -> u32 {
    100
}

fn default_bfd_multiplier() -> u8 {
    3
}

fn check_bgp(b: BgpFile, device: &str) -> Result<BgpSettings, Invalid> {
    for (key, path) in [
        ("bgp.bird_config", &b.bird_config),
        ("bgp.bird_socket", &b.bird_socket),
    ] {
        if path.as_os_str().is_empty() {
            return Err(invalid(key, "must not be empty"));
        }
    }
    let mut peers = Vec::with_capacity(b.peers.len());
    for (i, p) in b.peers.into_iter().enumerate() {
        let key = format!("bgp.peer[{i}]");
        let password = match &p.password_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| {
                        invalid(
                            format!("{key}.password_file"),
                            format!("cannot read {}: {e}", path.display()),
                        )
                    })?
                    .trim_end_matches(['\n', '\r'])
                    .to_owned(),
            ),
            None => None,
        };
        peers.push(bgp::Peer {
            name: p.name,
            addr: p.addr,
            remote_as: p.remote_as,
            local_addr: p.local_addr,
            hold_secs: p.hold_secs,
            keepalive_secs: p.keepalive_secs,
            bfd: p.bfd.then_some(bgp::Bfd {
                interval_ms: p.bfd_interval_ms,
                multiplier: p.bfd_multiplier,
            }),
            password,
        });
    }
    let settings = BgpSettings {
        bird_config: b.bird_config,
        bird_socket: b.bird_socket,
        local_as: b.local_as,
        router_id: b.router_id,
        drain_wait: Duration::from_millis(b.drain_wait_ms),
        communities: b.communities.into_iter().map(|[a, v]| (a, v)).collect(),
        med: b.med,
        peers,
    };
    // The renderer knows what BIRD accepts: render once with everything announced.
    let mut probe = bgp::Announce::new(settings.router_id, settings.local_as, device);
    probe.communities.clone_from(&settings.communities);
    probe.med = settings.med;
    probe.peers.clone_from(&settings.peers);
    bgp::render(&probe).map_err(|e| invalid("bgp", e.to_string()))?;
    Ok(settings)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    listen: SocketAddr,
    data_dir: PathBuf,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    #[serde(default = "default_heartbeat_ms")]
    heartbeat_ms: u64,
    #[serde(default = "default_election_timeout_ms")]
    election_timeout_ms: [u64; 2],
    join_token_file: Option<PathBuf>,
}

fn default_heartbeat_ms() -> u64 {
    150
}

fn default_election_timeout_ms() -> [u64; 2] {
    [750, 1500]
}

fn check_cluster(c: ClusterFile) -> Result<ClusterSettings, Invalid> {
    if c.listen.ip().is_unspecified() || c.listen.ip().is_multicast() || c.listen.port() == 0 {
        return Err(invalid(
            "cluster.listen",
            format!(
                "{} is not an address peers can dial (a unicast address and a port other than 0)",
                c.listen
            ),
        ));
    }
    for (key, path) in [
        ("cluster.data_dir", Some(&c.data_dir)),
        ("cluster.ca", Some(&c.ca)),
        ("cluster.cert", Some(&c.cert)),
        ("cluster.key", Some(&c.key)),
        ("cluster.join_token_file", c.join_token_file.as_ref()),
    ] {
        if path.is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(invalid(key, "must not be empty"));
        }
    }
    let [low, high] = c.election_timeout_ms;
    if c.heartbeat_ms == 0 || c.heartbeat_ms >= low {
        return Err(invalid(
            "cluster.heartbeat_ms",
            format!(
                "{} must be greater than 0 and less than the election timeout ({low} ms)",
                c.heartbeat_ms
            ),
        ));
    }
    if low >= high {
        return Err(invalid(
            "cluster.election_timeout_ms",
            format!("[{low}, {high}] is not a range with the first below the second"),
        ));
    }
    Ok(ClusterSettings {
        listen: c.listen,
        data_dir: c.data_dir,
        ca: c.ca,
        cert: c.cert,
        key: c.key,
        heartbeat: Duration::from_millis(c.heartbeat_ms),
        election_timeout: Duration::from_millis(low)..=Duration::from_millis(high),
        join_token_file: c.join_token_file,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MaglevFile {
    #[serde(default)]
    seed: u64,
    #[serde(default = "default_table_size")]
    table_size: u32,
}

impl Default for MaglevFile {
    fn default() -> Self {
        MaglevFile {
            seed: 0,
            table_size: default_table_size(),
        }
    }
}

fn default_table_size() -> u32 {
    MaglevParams::DEFAULT_TABLE_SIZE
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceFile {
    vip: SocketAddr,
    proto: Proto,
    #[serde(default)]
    scheduler: SchedulerKind,
    #[serde(default)]
    toa: bool,
    #[serde(default)]
    conn_reuse: ConnReuse,
    #[serde(default)]
    syn_proxy: SynProxy,
    #[serde(default)]
    timeouts: Timeouts,
    health: Option<HealthFile>,
    #[serde(default, rename = "backend")]
    backends: Vec<Spanned<BackendFile>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendFile {
    addr: SocketAddr,
    #[serde(default = "default_weight")]
    weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum HealthKind {
    #[default]
    None,
    Tcp,
    Http,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthFile {
    #[serde(default)]
    kind: HealthKind,
    path: Option<String>,
    expect_status: Option<u16>,
    #[serde(default = "default_interval_ms")]
    interval_ms: u64,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "default_rise")]
    rise: u32,
    #[serde(default = "default_fall")]
    fall: u32,
}

fn default_interval_ms() -> u64 {
    2000
}

fn default_timeout_ms() -> u64 {
    1000
}

fn default_rise() -> u32 {
    2
}

fn default_fall() -> u32 {
    3
}

fn parse(text: &str, version: u64) -> Result<Config, Invalid> {
    let file: File = toml::from_str(text).map_err(|e| Invalid {
        span: e.span(),
        key: None,
        reason: e.message().trim_end().to_owned(),
    })?;
    let node = check_node(file.node)?;
    let admin = AdminConfig {
        socket: file.admin.socket,
        metrics: file.admin.metrics,
    };
    if admin.socket.as_os_str().is_empty() {
        return Err(invalid("admin.socket", "must not be empty"));
    }
    let cluster = file.cluster.map(check_cluster).transpose()?;
    let bgp = file.bgp.map(|b| check_bgp(b, &node.tun)).transpose()?;
    if bgp.is_some() && cluster.is_none() {
        return Err(invalid(
            "bgp",
            "needs [cluster]: what a node announces follows the cluster (drain, sync warm-up)",
        ));
    }
    let maglev = MaglevParams {
        seed: file.maglev.seed,
        table_size: file.maglev.table_size,
    };
    let mut seen = HashSet::new();
    let mut services = Vec::with_capacity(file.services.len());
    for svc in file.services {
        let span = svc.span();
        let svc = svc.into_inner();
        let key = format!("service[{}/{}]", svc.vip, proto_key(svc.proto));
        if !seen.insert((svc.vip, svc.proto)) {
            return Err(invalid(key, "listed twice (VIP, port and proto must be unique)").at(span));
        }
        services.push(check_service(&key, svc, &node).map_err(|e| match e.span {
            Some(_) => e,
            None => e.at(span),
        })?);
    }
    let set = ServiceSet {
        version,
        maglev,
        services,
    };
    // The scheduler checks what only it knows (a prime Maglev table big enough for the
    // backends): build the snapshot once and throw it away.
    let configs: Vec<ServiceConfig> = set.services.iter().map(|s| s.config.clone()).collect();
    Snapshot::new(version, &configs, maglev, None).map_err(|e| match e {
        SnapshotError::Scheduler { source, .. } => invalid("maglev.table_size", source.to_string()),
        other => invalid("service", other.to_string()),
    })?;
    Ok(Config {
        node,
        admin,
        cluster,
        bgp,
        services: set,
    })
}

fn proto_key(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    }
}

fn check_node(n: NodeFile) -> Result<NodeConfig, Invalid> {
    if n.name.is_empty() {
        return Err(invalid("node.name", "must not be empty"));
    }
    if n.tun.is_empty() || n.tun.len() > MAX_IFNAME {
        return Err(invalid(
            "node.tun",
            format!(
                "{:?} is not a device name of 1 to {MAX_IFNAME} bytes",
                n.tun
            ),
        ));
    }
    if n.local_addrs.is_empty() {
        return Err(invalid(
            "node.local_addrs",
            "needs at least one local address (LIP)",
        ));
    }
    let mut seen = HashSet::new();
    for ip in &n.local_addrs {
        if !seen.insert(ip) {
            return Err(invalid("node.local_addrs", format!("{ip} is listed twice")));
        }
        if ip.is_unspecified() || ip.is_multicast() {
            return Err(invalid(
                "node.local_addrs",
                format!("{ip} cannot be a local address"),
            ));
        }
    }
    let [first, last] = n.local_ports.unwrap_or([
        *dataplane::LocalAddrPool::DEFAULT_PORTS.start(),
        *dataplane::LocalAddrPool::DEFAULT_PORTS.end(),
    ]);
    if first == 0 || first > last {
        return Err(invalid(
            "node.local_ports",
            format!("[{first}, {last}] is not a range of ports from 1 to 65535, first <= last"),
        ));
    }
    let defaults = dataplane::EngineConfig::default();
    let max_v4 = n.max_sessions_v4.unwrap_or(defaults.max_sessions_v4);
    let max_v6 = n.max_sessions_v6.unwrap_or(defaults.max_sessions_v6);
    for (key, max) in [
        ("node.max_sessions_v4", max_v4),
        ("node.max_sessions_v6", max_v6),
    ] {
        if max == 0 {
            return Err(invalid(key, "must be greater than 0"));
        }
    }
    let fastpath_sessions = n
        .fastpath_sessions
        .unwrap_or_else(|| max_v4.saturating_add(max_v6));
    if fastpath_sessions == 0 {
        return Err(invalid(
            "node.fastpath_sessions",
            "must be greater than 0 (fastpath = \"off\" turns the fast path off)",
        ));
    }
    if let Some(devices) = &n.fastpath_devices {
        if devices.is_empty() {
            return Err(invalid(
                "node.fastpath_devices",
                "name at least one device, or leave the key out for every device that is up",
            ));
        }
        if let Some(tun) = devices.iter().find(|d| **d == n.tun) {
            return Err(invalid(
                "node.fastpath_devices",
                format!("{tun} is the node's TUN device: the fast path belongs on the uplinks"),
            ));
        }
    }
    Ok(NodeConfig {
        name: n.name,
        tun: n.tun,
        workers: n.workers,
        local_addrs: n.local_addrs,
        local_ports: first..=last,
        max_sessions_v4: max_v4,
        max_sessions_v6: max_v6,
        fastpath: n.fastpath,
        fastpath_devices: n.fastpath_devices,
        fastpath_sessions,
    })
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

fn check_service(key: &str, s: ServiceFile, node: &NodeConfig) -> Result<Service, Invalid> {
    if s.vip.port() == 0 {
        return Err(invalid(
            format!("{key}.vip"),
            "port 0 cannot be a service port",
        ));
    }
    let fam = family(s.vip.ip());
    if !node.local_addrs.iter().any(|l| family(*l) == fam) {
        return Err(invalid(
            format!("{key}.vip"),
            format!("an {fam} service needs an {fam} address in node.local_addrs"),
        ));
    }
    let t = &s.timeouts;
    for (name, d) in [
        ("established", t.established),
        ("syn_sent", t.syn_sent),
        ("syn_recv", t.syn_recv),
        ("fin_wait", t.fin_wait),
        ("time_wait", t.time_wait),
        ("close", t.close),
        ("close_wait", t.close_wait),
        ("last_ack", t.last_ack),
        ("udp", t.udp),
    ] {
        if d.is_zero() {
            return Err(invalid(
                format!("{key}.timeouts.{name}"),
                "must be greater than 0 seconds",
            ));
        }
    }
    let health = match s.health {
        None => HealthCheck::None,
        Some(h) => check_health(&format!("{key}.health"), h)?,
    };
    let mut seen = HashSet::new();
    let mut backends = Vec::with_capacity(s.backends.len());
    for b in s.backends {
        let span = b.span();
        let b = b.into_inner();
        let bkey = format!("{key}.backend[{}]", b.addr);
        let fail = |field: &str, reason: String| {
            invalid(format!("{bkey}{field}"), reason).at(span.clone())
        };
        if !seen.insert(b.addr) {
            return Err(fail("", "listed twice in this service".to_owned()));
        }
        if family(b.addr.ip()) != fam {
            return Err(fail(
                ".addr",
                format!("is {}, the VIP is {fam}", family(b.addr.ip())),
            ));
        }
        if b.addr.port() == 0 {
            return Err(fail(".addr", "port 0 cannot be a backend port".to_owned()));
        }
        if b.weight > MAX_WEIGHT {
            return Err(fail(
                ".weight",
                format!("{} is above the maximum weight of {MAX_WEIGHT}", b.weight),
            ));
        }
        backends.push(BackendConfig {
            addr: b.addr,
            weight: b.weight,
            healthy: true,
        });
    }
    Ok(Service {
        config: ServiceConfig {
            vip: s.vip,
            proto: s.proto.into(),
            scheduler: s.scheduler,
            timeouts: s.timeouts,
            toa: s.toa,
            conn_reuse: s.conn_reuse,
            syn_proxy: s.syn_proxy,
            backends,
        },
        health,
    })
}

fn check_health(key: &str, h: HealthFile) -> Result<HealthCheck, Invalid> {
    for (name, v) in [
        ("interval_ms", h.interval_ms),
        ("timeout_ms", h.timeout_ms),
        ("rise", u64::from(h.rise)),
        ("fall", u64::from(h.fall)),
    ] {
        if v == 0 {
            return Err(invalid(format!("{key}.{name}"), "must be greater than 0"));
        }
    }
    if h.timeout_ms >= h.interval_ms {
        return Err(invalid(
            format!("{key}.timeout_ms"),
            format!(
                "{} must be less than interval_ms ({})",
                h.timeout_ms, h.interval_ms
            ),
        ));
    }
    let probe = Probe {
        interval: Duration::from_millis(h.interval_ms),
        timeout: Duration::from_millis(h.timeout_ms),
        rise: h.rise,
        fall: h.fall,
    };
    if h.kind != HealthKind::Http {
        for (name, set) in [
            ("path", h.path.is_some()),
            ("expect_status", h.expect_status.is_some()),
        ] {
            if set {
                return Err(invalid(
                    format!("{key}.{name}"),
                    "applies only to kind = \"http\"",
                ));
            }
        }
    }
    Ok(match h.kind {
        HealthKind::None => HealthCheck::None,
        HealthKind::Tcp => HealthCheck::Tcp(probe),
        HealthKind::Http => {
            let path = h.path.unwrap_or_else(|| "/".to_owned());
            if !path.starts_with('/')
                || path
                    .chars()
                    .any(|c| c.is_ascii_whitespace() || c.is_control())
            {
                return Err(invalid(
                    format!("{key}.path"),
                    format!("{path:?} is not an absolute path without spaces"),
                ));
            }
            let expect_status = h.expect_status.unwrap_or(200);
            if !(100..=599).contains(&expect_status) {
                return Err(invalid(
                    format!("{key}.expect_status"),
                    format!("{expect_status} is not an HTTP status (100 to 599)"),
                ));
            }
            HealthCheck::Http {
                probe,
                path,
                expect_status,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: &str = "[node]\nname = \"n1\"\nlocal_addrs = [\"198.19.200.1\"]\n";
    const SVC: &str = "[[service]]\nvip = \"198.18.100.1:80\"\nproto = \"tcp\"\n";

    fn error(text: &str) -> String {
        let e = parse(text, 1).unwrap_err();
        format!("{}: {}", e.key.unwrap_or_default(), e.reason)
    }

    #[test]
    fn test_defaults() {
        let c = parse(&format!("{NODE}{SVC}"), 7).unwrap();
        assert_eq!(c.node.tun, "lbc0");
        assert_eq!(c.node.local_ports, 1024..=65535);
        assert_eq!(c.admin.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.services.version, 7);
        assert_eq!(c.services.maglev, MaglevParams::default());
        assert_eq!(c.services.services[0].health, HealthCheck::None);
    }

    #[test]
    fn test_node_errors() {
        let lips = |l: &str| format!("[node]\nname = \"n1\"\nlocal_addrs = {l}\n");
        assert_eq!(
            error(&lips("[]")),
            "node.local_addrs: needs at least one local address (LIP)"
        );
        assert_eq!(
            error(&lips("[\"198.19.200.1\", \"198.19.200.1\"]")),
            "node.local_addrs: 198.19.200.1 is listed twice"
        );
        assert_eq!(
            error(&format!("{NODE}local_ports = [2000, 1000]\n")),
            "node.local_ports: [2000, 1000] is not a range of ports from 1 to 65535, first <= last"
        );
    }

    #[test]
    fn test_service_errors() {
        assert_eq!(
            error(&format!("{NODE}{SVC}timeouts = {{ established = 0 }}\n")),
            "service[198.18.100.1:80/tcp].timeouts.established: must be greater than 0 seconds"
        );
        assert_eq!(
            error(&format!(
                "{NODE}{SVC}health = {{ kind = \"tcp\", interval_ms = 500, timeout_ms = 500 }}\n"
            )),
            "service[198.18.100.1:80/tcp].health.timeout_ms: 500 must be less than interval_ms (500)"
        );
        assert_eq!(
            error(&format!(
                "{NODE}{SVC}health = {{ kind = \"tcp\", path = \"/\" }}\n"
            )),
            "service[198.18.100.1:80/tcp].health.path: applies only to kind = \"http\""
        );
        assert_eq!(
            error(&format!(
                "{NODE}{SVC}[[service.backend]]\naddr = \"[2001:db8::1]:80\"\n"
            )),
            "service[198.18.100.1:80/tcp].backend[[2001:db8::1]:80].addr: is IPv6, the VIP is IPv4"
        );
        assert_eq!(
            error(&format!(
                "{NODE}{SVC}[[service.backend]]\naddr = \"198.18.3.1:80\"\n\
                 [[service.backend]]\naddr = \"198.18.3.1:80\"\n"
            )),
            "service[198.18.100.1:80/tcp].backend[198.18.3.1:80]: listed twice in this service"
        );
        assert_eq!(
            error(&format!("{NODE}[maglev]\ntable_size = 100\n{SVC}")),
            "maglev.table_size: maglev table size 100 is not a prime number"
        );
    }

    #[test]
    fn test_cluster_section() {
        const CLUSTER: &str = "[cluster]\nlisten = \"198.18.1.2:7946\"\ndata_dir = \"/var/lib/lbc\"\n\
                               ca = \"ca.pem\"\ncert = \"n1.pem\"\nkey = \"n1.key\"\n";
        let c = parse(&format!("{NODE}{CLUSTER}"), 1).unwrap();
        let cluster = c.cluster.unwrap();
        assert_eq!(cluster.listen, "198.18.1.2:7946".parse().unwrap());
        assert_eq!(cluster.heartbeat, Duration::from_millis(150));
        assert_eq!(cluster.join_token_file, None);
        let joining = parse(
            &format!("{NODE}{CLUSTER}join_token_file = \"/etc/lbc/join.token\"\n"),
            1,
        )
        .unwrap();
        assert_eq!(
            joining.cluster.unwrap().join_token_file,
            Some(PathBuf::from("/etc/lbc/join.token"))
        );
        assert_eq!(
            error(&format!("{NODE}{CLUSTER}join_token_file = \"\"\n")),
            "cluster.join_token_file: must not be empty"
        );
        assert!(parse(NODE, 1).unwrap().cluster.is_none());
        assert_eq!(
            error(&format!(
                "{NODE}{}",
                CLUSTER.replace("198.18.1.2:7946", "0.0.0.0:7946")
            )),
            "cluster.listen: 0.0.0.0:7946 is not an address peers can dial (a unicast address and a port other than 0)"
        );
        assert_eq!(
            error(&format!("{NODE}{CLUSTER}heartbeat_ms = 800\n")),
            "cluster.heartbeat_ms: 800 must be greater than 0 and less than the election timeout (750 ms)"
        );
        assert_eq!(
            error(&format!(
                "{NODE}{CLUSTER}election_timeout_ms = [900, 900]\n"
            )),
            "cluster.election_timeout_ms: [900, 900] is not a range with the first below the second"
        );
    }

    #[test]
    fn test_line_col() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }
}

//! The cluster configuration — the Raft state machine's data — and the commands that change it.
//!
//! Plain data with no I/O: [`ClusterConfig::validate`] checks a [`Command`] against the current
//! configuration and [`ClusterConfig::apply`] performs it. A rejected command changes nothing,
//! not even the version; an accepted one raises the version by exactly one.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A Raft node id; the same number names the node in the configuration.
pub type NodeId = u64;

/// Weights are 16-bit, as in IPVS.
pub const MAX_WEIGHT: u32 = 65535;
/// The smallest Maglev table the paper's construction works with (its Table 1 uses M = 7).
pub const MIN_MAGLEV_TABLE_SIZE: u32 = 7;

/// The whole replicated configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    /// Raised by one with every accepted command; 0 for the empty configuration.
    pub version: u64,
    pub nodes: BTreeMap<NodeId, Node>,
    /// In the order they were added.
    pub services: Vec<Service>,
    pub settings: Settings,
    /// Set once, by the first command of `cluster init` (or, for a cluster initialized before
    /// identities existed, by its first leader); `None` only before that.
    #[serde(default)]
    pub identity: Option<ClusterIdentity>,
}

/// The length of a [`ClusterId`] and of a cluster secret, in bytes.
const IDENTITY_PART: usize = 16;

/// A cluster's public name: 16 random bytes, written as 32 lowercase hex digits. Never all
/// zeros (the Raft requests of a node that knows no cluster carry zeros).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterId([u8; IDENTITY_PART]);

impl ClusterId {
    pub fn as_bytes(&self) -> &[u8; IDENTITY_PART] {
        &self.0
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterId({self})")
    }
}

impl FromStr for ClusterId {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, TokenError> {
        Ok(ClusterId(unhex(s)?))
    }
}

impl Serialize for ClusterId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ClusterId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What sets a cluster apart from every other cluster whose nodes the same CA signed: its
/// [`ClusterId`] and a random secret. Every Raft request carries its sender's, and a node
/// answers only requests that carry its own cluster's (see the consensus crate's `access`
/// module). Its text form, `ID.SECRET` in hex, is the join token a node must hold to be added
/// to the cluster. `Debug` does not show the secret.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterIdentity {
    pub id: ClusterId,
    secret: Secret,
}

/// The secret half of a [`ClusterIdentity`], serialized as hex.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Secret([u8; IDENTITY_PART]);

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&hex(&self.0))
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        unhex(&text).map(Secret).map_err(serde::de::Error::custom)
    }
}

/// The length of [`ClusterIdentity::to_bytes`].
pub const IDENTITY_BYTES: usize = 2 * IDENTITY_PART;

impl ClusterIdentity {
    /// The identity made of these 32 bytes (id, then secret); `None` for an id of all zeros,
    /// which no cluster has.
    pub fn from_bytes(bytes: [u8; IDENTITY_BYTES]) -> Option<ClusterIdentity> {
        let mut id = [0; IDENTITY_PART];
        let mut secret = [0; IDENTITY_PART];
        id.copy_from_slice(&bytes[..IDENTITY_PART]);
        secret.copy_from_slice(&bytes[IDENTITY_PART..]);
        (id != [0; IDENTITY_PART]).then_some(ClusterIdentity {
            id: ClusterId(id),
            secret: Secret(secret),
        })
    }

    /// The id, then the secret.
    pub fn to_bytes(&self) -> [u8; IDENTITY_BYTES] {
        let mut bytes = [0; IDENTITY_BYTES];
        bytes[..IDENTITY_PART].copy_from_slice(&self.id.0);
        bytes[IDENTITY_PART..].copy_from_slice(&self.secret.0);
        bytes
    }

    /// Whether `other` carries this identity's secret too; compared in constant time, so the
    /// time an answer takes tells nothing about the secret.
    pub fn same_secret(&self, other: &ClusterIdentity) -> bool {
        self.secret
            .0
            .iter()
            .zip(&other.secret.0)
            .fold(0, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    /// The join token: `ID.SECRET`, both in hex.
    pub fn token(&self) -> String {
        format!("{}.{}", self.id, hex(&self.secret.0))
    }
}

impl fmt::Debug for ClusterIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterIdentity")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Parses a join token ([`ClusterIdentity::token`]).
impl FromStr for ClusterIdentity {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, TokenError> {
        let (id, secret) = s.split_once('.').ok_or(TokenError)?;
        let bytes = {
            let mut bytes = [0; IDENTITY_BYTES];
            bytes[..IDENTITY_PART].copy_from_slice(&unhex(id)?);
            bytes[IDENTITY_PART..].copy_from_slice(&unhex(secret)?);
            bytes
        };
        ClusterIdentity::from_bytes(bytes).ok_or(TokenError)
    }
}

/// A join token or cluster id that is not one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "not a join token (ID.SECRET, 32 hex digits each, as `lbcluster cluster join-token` prints \
     it) or cluster id"
)]
pub struct TokenError;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Result<[u8; IDENTITY_PART], TokenError> {
    let mut out = [0; IDENTITY_PART];
    if s.len() != 2 * IDENTITY_PART || !s.is_ascii() {
        return Err(TokenError);
    }
    for (byte, pair) in out.iter_mut().zip(s.as_bytes().chunks(2)) {
        let pair = std::str::from_utf8(pair).map_err(|_| TokenError)?;
        *byte = u8::from_str_radix(pair, 16).map_err(|_| TokenError)?;
    }
    Ok(out)
}

/// A forwarding node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: NodeId,
    pub name: String,
    /// The node's QUIC endpoint (Raft and session sync).
    pub quic_addr: SocketAddr,
    /// The local addresses the node owns for Full-NAT source addresses.
    pub lips: Vec<IpAddr>,
    /// Drained: the node withdraws its VIPs (after announcing them with the graceful-shutdown
    /// community for a moment) and keeps forwarding what still reaches it. Its BGP sessions
    /// themselves are host settings, in its own config file.
    #[serde(default)]
    pub drained: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// What identifies a service: VIP, port and protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceKey {
    pub vip: SocketAddr,
    pub proto: Proto,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.vip, self.proto)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub key: ServiceKey,
    pub settings: ServiceSettings,
    pub backends: Vec<Backend>,
}

/// Everything about a service except its identity and its backends: what `EditService` replaces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSettings {
    pub scheduler: Scheduler,
    pub timeouts: Timeouts,
    /// Insert the client address as a TOA option into the SYN sent to the backend.
    pub toa: bool,
    pub health: HealthCheck,
    /// What a client's SYN on the port of a session in TIME_WAIT or CLOSE does. Last, and
    /// defaulted: entries written before it existed read as `reschedule`.
    #[serde(default)]
    pub conn_reuse: ConnReuse,
    /// Whether the node answers the service's SYNs with SYN cookies. Defaulted like
    /// `conn_reuse`.
    #[serde(default)]
    pub syn_proxy: SynProxy,
}

/// Whether a TCP service's SYNs are answered with SYN cookies: `off`, `on`, or `auto` (the
/// default: while the node's half-open flows pass a threshold).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SynProxy {
    Off,
    On,
    #[default]
    Auto,
}

/// What a client's SYN does when it matches a session in TIME_WAIT or CLOSE: IPVS's
/// `conn_reuse_mode` (`reschedule` = 1, the default; `keep` = 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnReuse {
    #[default]
    Reschedule,
    Keep,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    #[default]
    Maglev,
    Wrr,
    Wlc,
    Rr,
    Sh,
}

/// Idle timeouts per TCP state and for UDP, in seconds. Defaults follow Linux IPVS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeouts {
    pub established: u32,
    pub syn_sent: u32,
    pub syn_recv: u32,
    pub fin_wait: u32,
    pub time_wait: u32,
    pub close: u32,
    pub close_wait: u32,
    pub last_ack: u32,
    pub udp: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            established: 900,
            syn_sent: 120,
            syn_recv: 60,
            fin_wait: 120,
            time_wait: 120,
            close: 10,
            close_wait: 60,
            last_ack: 30,
            udp: 300,
        }
    }
}

impl Timeouts {
    fn named(&self) -> [(&'static str, u32); 9] {
        [
            ("established", self.established),
            ("syn_sent", self.syn_sent),
            ("syn_recv", self.syn_recv),
            ("fin_wait", self.fin_wait),
            ("time_wait", self.time_wait),
            ("close", self.close),
            ("close_wait", self.close_wait),
            ("last_ack", self.last_ack),
            ("udp", self.udp),
        ]
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HealthCheck {
    /// Not checked: always healthy.
    #[default]
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

/// When a check runs and how many results in a row change a backend's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub interval_ms: u32,
    pub timeout_ms: u32,
    /// Successes in a row that bring a down backend up.
    pub rise: u32,
    /// Failures in a row that take an up backend down.
    pub fall: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    pub addr: SocketAddr,
    /// 0 takes no new flows but keeps its sessions; at most [`MAX_WEIGHT`].
    pub weight: u32,
}

/// Cluster-wide settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    pub maglev_seed: u64,
    /// A prime, at least [`MIN_MAGLEV_TABLE_SIZE`].
    pub maglev_table_size: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            maglev_seed: 0,
            maglev_table_size: 65537,
        }
    }
}

/// A change to the configuration: the Raft log's application data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    AddNode(Node),
    RemoveNode {
        id: NodeId,
    },
    /// Adds a service together with its initial backends.
    AddService(Service),
    /// Replaces the settings of a service; its backends stay.
    EditService {
        key: ServiceKey,
        settings: ServiceSettings,
    },
    DelService {
        key: ServiceKey,
    },
    AddBackend {
        service: ServiceKey,
        backend: Backend,
    },
    /// Replaces the backend with the same address.
    EditBackend {
        service: ServiceKey,
        backend: Backend,
    },
    DelBackend {
        service: ServiceKey,
        addr: SocketAddr,
    },
    SetSettings(Settings),
    /// Drains (`true`) or undrains a node.
    SetDrain {
        id: NodeId,
        drained: bool,
    },
    /// Gives the cluster its identity; refused once it has one.
    SetIdentity(ClusterIdentity),
}

/// Why a command was rejected. Each says what is wrong; none changes the configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ConfigError {
    #[error("node id {id} is already taken by node {name:?}")]
    DuplicateNodeId { id: NodeId, name: String },
    #[error("node name {name:?} is already taken by node {id}")]
    DuplicateNodeName { name: String, id: NodeId },
    #[error("a node name must not be empty")]
    EmptyNodeName,
    #[error("no node with id {id}")]
    UnknownNode { id: NodeId },
    #[error("local address {lip} is listed twice for node {id}")]
    DuplicateLip { lip: IpAddr, id: NodeId },
    #[error("local address {lip} already belongs to node {owner:?}")]
    LipOverlap { lip: IpAddr, owner: String },
    #[error("node {name:?} needs at least one local address (LIP)")]
    NoLip { name: String },
    #[error("{addr} cannot be {what}")]
    BadAddress { addr: String, what: String },
    #[error("service {service}: health check: {reason}")]
    BadHealthCheck { service: ServiceKey, reason: String },
    #[error("local address {lip} is the VIP of service {service}")]
    LipIsVip { lip: IpAddr, service: ServiceKey },
    #[error("the VIP of service {service} is a local address of node {owner:?}")]
    VipIsLip { service: ServiceKey, owner: String },
    #[error("no service {key}")]
    UnknownService { key: ServiceKey },
    #[error("service {key} is already defined")]
    DuplicateService { key: ServiceKey },
    #[error("service {service} has no backend {addr}")]
    UnknownBackend {
        service: ServiceKey,
        addr: SocketAddr,
    },
    #[error("service {service} already has backend {addr}")]
    DuplicateBackend {
        service: ServiceKey,
        addr: SocketAddr,
    },
    #[error("backend {addr} of service {service}: weight {weight} is above {MAX_WEIGHT}")]
    WeightTooLarge {
        service: ServiceKey,
        addr: SocketAddr,
        weight: u32,
    },
    #[error("backend {addr} is not of the same address family as the VIP of service {service}")]
    AddressFamilyMismatch {
        service: ServiceKey,
        addr: SocketAddr,
    },
    #[error("service {service}: timeout {which} must be at least 1")]
    ZeroTimeout { service: ServiceKey, which: String },
    #[error("maglev table size {size} must be a prime of at least {MIN_MAGLEV_TABLE_SIZE}")]
    BadMaglevTableSize { size: u32 },
    #[error("the cluster already has its identity (cluster {id}); it never changes")]
    IdentitySet { id: ClusterId },
}

impl ClusterConfig {
    /// Checks `command` against this configuration without changing it.
    pub fn validate(&self, command: &Command) -> Result<(), ConfigError> {
        match command {
            Command::AddNode(node) => self.check_new_node(node),
            Command::RemoveNode { id } | Command::SetDrain { id, .. } => self.node(*id).map(drop),
            Command::AddService(service) => {
                if self.service(&service.key).is_ok() {
                    return Err(ConfigError::DuplicateService { key: service.key });
                }
                self.check_vip(&service.key)?;
                check_settings(&service.key, &service.settings)?;
                for (i, backend) in service.backends.iter().enumerate() {
                    check_backend(&service.key, backend)?;
                    if service.backends[..i].iter().any(|b| b.addr == backend.addr) {
                        return Err(ConfigError::DuplicateBackend {
                            service: service.key,
                            addr: backend.addr,
                        });
                    }
                }
                Ok(())
            }
            Command::EditService { key, settings } => {
                self.service(key)?;
                check_settings(key, settings)
            }
            Command::DelService { key } => self.service(key).map(drop),
            Command::AddBackend { service, backend } => {
                let s = self.service(service)?;
                check_backend(service, backend)?;
                if s.backends.iter().any(|b| b.addr == backend.addr) {
                    return Err(ConfigError::DuplicateBackend {
                        service: *service,
                        addr: backend.addr,
                    });
                }
                Ok(())
            }
            Command::EditBackend { service, backend } => {
                self.backend(service, backend.addr)?;
                check_backend(service, backend)
            }
            Command::DelBackend { service, addr } => self.backend(service, *addr).map(drop),
            Command::SetSettings(settings) => {
                let size = settings.maglev_table_size;
                if size < MIN_MAGLEV_TABLE_SIZE || !is_prime(size) {
                    return Err(ConfigError::BadMaglevTableSize { size });
                }
                Ok(())
            }
            Command::SetIdentity(_) => match self.identity {
                Some(identity) => Err(ConfigError::IdentitySet { id: identity.id }),
                None => Ok(()),
            },
        }
    }

    /// Validates and performs `command`, raising the version by one; on error nothing changes.
    pub fn apply(&mut self, command: &Command) -> Result<(), ConfigError> {
        self.validate(command)?;
        // Validation has established every lookup below, so none of them misses.
        match command {
            Command::AddNode(node) => {
                self.nodes.insert(node.id, node.clone());
            }
            Command::RemoveNode { id } => {
                self.nodes.remove(id);
            }
            Command::AddService(service) => self.services.push(service.clone()),
            Command::EditService { key, settings } => {
                if let Some(s) = self.service_mut(key) {
                    s.settings = settings.clone();
                }
            }
            Command::DelService { key } => self.services.retain(|s| s.key != *key),
            Command::AddBackend { service, backend } => {
                if let Some(s) = self.service_mut(service) {
                    s.backends.push(*backend);
                }
            }
            Command::EditBackend { service, backend } => {
                if let Some(b) = self
                    .service_mut(service)
                    .and_then(|s| s.backends.iter_mut().find(|b| b.addr == backend.addr))
                {
                    *b = *backend;
                }
            }
            Command::DelBackend { service, addr } => {
                if let Some(s) = self.service_mut(service) {
                    s.backends.retain(|b| b.addr != *addr);
                }
            }
            Command::SetSettings(settings) => self.settings = *settings,
            Command::SetDrain { id, drained } => {
                if let Some(node) = self.nodes.get_mut(id) {
                    node.drained = *drained;
                }
            }
            Command::SetIdentity(identity) => self.identity = Some(*identity),
        }
        self.version += 1;
        Ok(())
    }

    /// The node with this id.
    pub fn node(&self, id: NodeId) -> Result<&Node, ConfigError> {
        self.nodes.get(&id).ok_or(ConfigError::UnknownNode { id })
    }

    /// The service with this key.
    pub fn service(&self, key: &ServiceKey) -> Result<&Service, ConfigError> {
        self.services
            .iter()
            .find(|s| s.key == *key)
            .ok_or(ConfigError::UnknownService { key: *key })
    }

    fn service_mut(&mut self, key: &ServiceKey) -> Option<&mut Service> {
        self.services.iter_mut().find(|s| s.key == *key)
    }

    fn backend(&self, service: &ServiceKey, addr: SocketAddr) -> Result<&Backend, ConfigError> {
        self.service(service)?
            .backends
            .iter()
            .find(|b| b.addr == addr)
            .ok_or(ConfigError::UnknownBackend {
                service: *service,
                addr,
            })
    }

    fn check_new_node(&self, node: &Node) -> Result<(), ConfigError> {
        if let Some(existing) = self.nodes.get(&node.id) {
            return Err(ConfigError::DuplicateNodeId {
                id: node.id,
                name: existing.name.clone(),
            });
        }
        if node.name.is_empty() {
            return Err(ConfigError::EmptyNodeName);
        }
        if let Some(existing) = self.nodes.values().find(|n| n.name == node.name) {
            return Err(ConfigError::DuplicateNodeName {
                name: node.name.clone(),
                id: existing.id,
            });
        }
        if node.lips.is_empty() {
            return Err(ConfigError::NoLip {
                name: node.name.clone(),
            });
        }
        check_endpoint(node.quic_addr, "a node's QUIC address")?;
        for (i, &lip) in node.lips.iter().enumerate() {
            if lip.is_unspecified() || lip.is_multicast() {
                return Err(ConfigError::BadAddress {
                    addr: lip.to_string(),
                    what: "a local address".to_owned(),
                });
            }
            if node.lips[..i].contains(&lip) {
                return Err(ConfigError::DuplicateLip { lip, id: node.id });
            }
            if let Some(owner) = self.nodes.values().find(|n| n.lips.contains(&lip)) {
                return Err(ConfigError::LipOverlap {
                    lip,
                    owner: owner.name.clone(),
                });
            }
            if let Some(service) = self.services.iter().find(|s| s.key.vip.ip() == lip) {
                return Err(ConfigError::LipIsVip {
                    lip,
                    service: service.key,
                });
            }
        }
        Ok(())
    }

    /// A VIP must not be any node's local address: return traffic to a LIP would be taken for
    /// client traffic to the service.
    fn check_vip(&self, key: &ServiceKey) -> Result<(), ConfigError> {
        check_endpoint(key.vip, "a VIP")?;
        let vip = key.vip.ip();
        match self.nodes.values().find(|n| n.lips.contains(&vip)) {
            Some(owner) => Err(ConfigError::VipIsLip {
                service: *key,
                owner: owner.name.clone(),
            }),
            None => Ok(()),
        }
    }
}

fn check_settings(key: &ServiceKey, settings: &ServiceSettings) -> Result<(), ConfigError> {
    let zero = |which: &str| ConfigError::ZeroTimeout {
        service: *key,
        which: which.to_owned(),
    };
    if let Some((which, _)) = settings.timeouts.named().into_iter().find(|&(_, t)| t == 0) {
        return Err(zero(which));
    }
    let bad = |reason: String| ConfigError::BadHealthCheck {
        service: *key,
        reason,
    };
    let probe = match &settings.health {
        HealthCheck::None => return Ok(()),
        HealthCheck::Tcp(probe) => probe,
        HealthCheck::Http {
            probe,
            path,
            expect_status,
        } => {
            if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(bad(format!(
                    "path {path:?} must start with / and hold no spaces or control characters"
                )));
            }
            if !(100..=599).contains(expect_status) {
                return Err(bad(format!(
                    "expected status {expect_status} is not an HTTP status (100 to 599)"
                )));
            }
            probe
        }
    };
    if probe.interval_ms == 0 {
        return Err(zero("health interval"));
    }
    if probe.timeout_ms == 0 {
        return Err(zero("health timeout"));
    }
    if probe.timeout_ms >= probe.interval_ms {
        return Err(bad(format!(
            "timeout {} ms must be less than the interval {} ms",
            probe.timeout_ms, probe.interval_ms
        )));
    }
    if probe.rise == 0 || probe.fall == 0 {
        return Err(bad("rise and fall must be at least 1".to_owned()));
    }
    Ok(())
}

/// An address traffic is sent to: neither unspecified nor multicast, and not port 0.
fn check_endpoint(addr: SocketAddr, what: &str) -> Result<(), ConfigError> {
    if addr.ip().is_unspecified() || addr.ip().is_multicast() || addr.port() == 0 {
        return Err(ConfigError::BadAddress {
            addr: addr.to_string(),
            what: what.to_owned(),
        });
    }
    Ok(())
}

fn check_backend(service: &ServiceKey, backend: &Backend) -> Result<(), ConfigError> {
    check_endpoint(backend.addr, "a backend")?;
    if backend.weight > MAX_WEIGHT {
        return Err(ConfigError::WeightTooLarge {
            service: *service,
            addr: backend.addr,
            weight: backend.weight,
        });
    }
    if backend.addr.is_ipv4() != service.vip.is_ipv4() {
        return Err(ConfigError::AddressFamilyMismatch {
            service: *service,
            addr: backend.addr,
        });
    }
    Ok(())
}

fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = u64::from(n);
    (2..).take_while(|d| d * d <= n).all(|d| n % d != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: NodeId, name: &str, lips: &[&str]) -> Node {
        Node {
            id,
            name: name.to_owned(),
            quic_addr: SocketAddr::from(([10, 0, 0, id as u8], 7000)),
            lips: lips.iter().map(|l| l.parse().unwrap()).collect(),
            drained: false,
        }
    }

    fn key(vip: &str, proto: Proto) -> ServiceKey {
        ServiceKey {
            vip: vip.parse().unwrap(),
            proto,
        }
    }

    fn backend(addr: &str, weight: u32) -> Backend {
        Backend {
            addr: addr.parse().unwrap(),
            weight,
        }
    }

    fn settings() -> ServiceSettings {
        ServiceSettings {
            scheduler: Scheduler::Maglev,
            timeouts: Timeouts::default(),
            toa: false,
            conn_reuse: Default::default(),
            syn_proxy: Default::default(),
            health: HealthCheck::Tcp(Probe {
                interval_ms: 2000,
                timeout_ms: 1000,
                rise: 2,
                fall: 3,
            }),
        }
    }

    fn new_service(vip: &str, backends: &[Backend]) -> Service {
        Service {
            key: key(vip, Proto::Tcp),
            settings: settings(),
            backends: backends.to_vec(),
        }
    }

    const WEB: &str = "198.18.0.1:80";

    /// Two nodes and one TCP service with one backend, version 3.
    fn base() -> ClusterConfig {
        let mut config = ClusterConfig::default();
        for command in [
            Command::AddNode(node(1, "n1", &["198.19.0.1", "198.19.0.2"])),
            Command::AddNode(node(2, "n2", &["198.19.0.3"])),
            Command::AddService(new_service(WEB, &[backend("10.1.0.1:8080", 1)])),
        ] {
            config.apply(&command).unwrap();
        }
        assert_eq!(config.version, 3);
        config
    }

    /// Applies a command that must be rejected and checks that nothing changed.
    fn rejected(command: Command) -> ConfigError {
        let mut config = base();
        let before = config.clone();
        let err = config.apply(&command).unwrap_err();
        assert_eq!(config, before, "a rejected command changed the config");
        assert_eq!(config.validate(&command), Err(err.clone()));
        err
    }

    fn accepted(config: &mut ClusterConfig, command: Command) {
        let version = config.version;
        config.apply(&command).unwrap();
        assert_eq!(config.version, version + 1);
    }

    #[test]
    fn test_drain_and_undrain_a_node() {
        let mut config = base();
        accepted(
            &mut config,
            Command::SetDrain {
                id: 2,
                drained: true,
            },
        );
        assert!(config.node(2).unwrap().drained);
        accepted(
            &mut config,
            Command::SetDrain {
                id: 2,
                drained: false,
            },
        );
        assert!(!config.node(2).unwrap().drained);
        assert_eq!(
            rejected(Command::SetDrain {
                id: 9,
                drained: true
            }),
            ConfigError::UnknownNode { id: 9 }
        );
    }

    #[test]
    fn test_version_increases_by_one_per_command() {
        let mut config = base();
        accepted(
            &mut config,
            Command::AddNode(node(3, "n3", &["198.19.0.4"])),
        );
        accepted(&mut config, Command::RemoveNode { id: 3 });
        assert_eq!(config.version, 5);
        assert!(config.node(3).is_err());
    }

    #[test]
    fn test_add_node_duplicate_id() {
        let err = rejected(Command::AddNode(node(1, "other", &[])));
        assert_eq!(
            err,
            ConfigError::DuplicateNodeId {
                id: 1,
                name: "n1".into()
            }
        );
        assert_eq!(err.to_string(), "node id 1 is already taken by node \"n1\"");
    }

    #[test]
    fn test_add_node_duplicate_name() {
        let err = rejected(Command::AddNode(node(3, "n2", &[])));
        assert_eq!(
            err,
            ConfigError::DuplicateNodeName {
                name: "n2".into(),
                id: 2
            }
        );
    }

    #[test]
    fn test_add_node_empty_name() {
        assert_eq!(
            rejected(Command::AddNode(node(3, "", &[]))),
            ConfigError::EmptyNodeName
        );
    }

    #[test]
    fn test_remove_unknown_node() {
        let err = rejected(Command::RemoveNode { id: 9 });
        assert_eq!(err, ConfigError::UnknownNode { id: 9 });
        assert_eq!(err.to_string(), "no node with id 9");
    }

    #[test]
    fn test_lip_listed_twice_in_one_node() {
        let err = rejected(Command::AddNode(node(
            3,
            "n3",
            &["198.19.0.9", "198.19.0.9"],
        )));
        assert_eq!(
            err,
            ConfigError::DuplicateLip {
                lip: "198.19.0.9".parse().unwrap(),
                id: 3
            }
        );
    }

    #[test]
    fn test_lips_overlap_between_nodes() {
        let err = rejected(Command::AddNode(node(
            3,
            "n3",
            &["198.19.0.9", "198.19.0.2"],
        )));
        assert_eq!(
            err,
            ConfigError::LipOverlap {
                lip: "198.19.0.2".parse().unwrap(),
                owner: "n1".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "local address 198.19.0.2 already belongs to node \"n1\""
        );
    }

    #[test]
    fn test_lip_in_use_by_service_vip() {
        let err = rejected(Command::AddNode(node(3, "n3", &["198.18.0.1"])));
        assert_eq!(
            err,
            ConfigError::LipIsVip {
                lip: "198.18.0.1".parse().unwrap(),
                service: key(WEB, Proto::Tcp)
            }
        );
        assert_eq!(
            err.to_string(),
            "local address 198.18.0.1 is the VIP of service 198.18.0.1:80/tcp"
        );
    }

    #[test]
    fn test_service_vip_is_a_lip() {
        let err = rejected(Command::AddService(new_service("198.19.0.3:443", &[])));
        assert_eq!(
            err,
            ConfigError::VipIsLip {
                service: key("198.19.0.3:443", Proto::Tcp),
                owner: "n2".into()
            }
        );
    }

    #[test]
    fn test_service_defined_twice() {
        let err = rejected(Command::AddService(new_service(WEB, &[])));
        assert_eq!(
            err,
            ConfigError::DuplicateService {
                key: key(WEB, Proto::Tcp)
            }
        );
        assert_eq!(
            err.to_string(),
            "service 198.18.0.1:80/tcp is already defined"
        );
    }

    #[test]
    fn test_same_vip_port_other_proto_is_another_service() {
        let mut config = base();
        let mut udp = new_service(WEB, &[]);
        udp.key.proto = Proto::Udp;
        accepted(&mut config, Command::AddService(udp));
        assert_eq!(config.services.len(), 2);
    }

    #[test]
    fn test_unknown_service() {
        let other = key("198.18.0.2:80", Proto::Tcp);
        let unknown = ConfigError::UnknownService { key: other };
        assert_eq!(rejected(Command::DelService { key: other }), unknown);
        let edit = Command::EditService {
            key: other,
            settings: settings(),
        };
        assert_eq!(rejected(edit), unknown);
        let add = Command::AddBackend {
            service: other,
            backend: backend("10.1.0.2:80", 1),
        };
        assert_eq!(rejected(add), unknown);
        // Same address and port, other protocol: still unknown.
        let udp = key(WEB, Proto::Udp);
        assert_eq!(
            rejected(Command::DelService { key: udp }),
            ConfigError::UnknownService { key: udp }
        );
    }

    #[test]
    fn test_unknown_backend() {
        let service = key(WEB, Proto::Tcp);
        let addr = "10.1.0.9:8080".parse().unwrap();
        let unknown = ConfigError::UnknownBackend { service, addr };
        assert_eq!(rejected(Command::DelBackend { service, addr }), unknown);
        let edit = Command::EditBackend {
            service,
            backend: backend("10.1.0.9:8080", 5),
        };
        assert_eq!(rejected(edit), unknown);
        assert_eq!(
            unknown.to_string(),
            "service 198.18.0.1:80/tcp has no backend 10.1.0.9:8080"
        );
    }

    #[test]
    fn test_backend_added_twice() {
        let service = key(WEB, Proto::Tcp);
        let add = Command::AddBackend {
            service,
            backend: backend("10.1.0.1:8080", 7),
        };
        let twice = ConfigError::DuplicateBackend {
            service,
            addr: "10.1.0.1:8080".parse().unwrap(),
        };
        assert_eq!(rejected(add), twice);
        let b = backend("10.2.0.1:80", 1);
        let new = new_service("198.18.0.5:80", &[b, b]);
        assert_eq!(
            rejected(Command::AddService(new)),
            ConfigError::DuplicateBackend {
                service: key("198.18.0.5:80", Proto::Tcp),
                addr: b.addr
            }
        );
    }

    #[test]
    fn test_weight_above_65535() {
        let service = key(WEB, Proto::Tcp);
        let heavy = backend("10.1.0.2:8080", MAX_WEIGHT + 1);
        let too_large = ConfigError::WeightTooLarge {
            service,
            addr: heavy.addr,
            weight: 65536,
        };
        let add = Command::AddBackend {
            service,
            backend: heavy,
        };
        assert_eq!(rejected(add), too_large);
        assert_eq!(
            too_large.to_string(),
            "backend 10.1.0.2:8080 of service 198.18.0.1:80/tcp: weight 65536 is above 65535"
        );
        let edit = Command::EditBackend {
            service,
            backend: backend("10.1.0.1:8080", 70000),
        };
        assert!(matches!(rejected(edit), ConfigError::WeightTooLarge { .. }));
        let new = new_service("198.18.0.5:80", &[backend("10.2.0.1:80", 100_000)]);
        assert!(matches!(
            rejected(Command::AddService(new)),
            ConfigError::WeightTooLarge { .. }
        ));

        let mut config = base();
        let max = Command::EditBackend {
            service,
            backend: backend("10.1.0.1:8080", MAX_WEIGHT),
        };
        accepted(&mut config, max);
        assert_eq!(
            config.service(&service).unwrap().backends[0].weight,
            MAX_WEIGHT
        );
    }

    #[test]
    fn test_timeout_zero() {
        let service = key(WEB, Proto::Tcp);
        let mut zero = settings();
        zero.timeouts.fin_wait = 0;
        let edit = Command::EditService {
            key: service,
            settings: zero.clone(),
        };
        let err = rejected(edit);
        assert_eq!(
            err,
            ConfigError::ZeroTimeout {
                service,
                which: "fin_wait".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "service 198.18.0.1:80/tcp: timeout fin_wait must be at least 1"
        );
        let mut new = new_service("198.18.0.5:53", &[]);
        new.settings.timeouts.udp = 0;
        assert!(matches!(
            rejected(Command::AddService(new)),
            ConfigError::ZeroTimeout { .. }
        ));
    }

    #[test]
    fn test_health_check_timeout_zero() {
        let service = key(WEB, Proto::Tcp);
        let mut zero = settings();
        zero.health = HealthCheck::Http {
            probe: Probe {
                interval_ms: 1000,
                timeout_ms: 0,
                rise: 1,
                fall: 1,
            },
            path: "/".into(),
            expect_status: 200,
        };
        let edit = Command::EditService {
            key: service,
            settings: zero,
        };
        assert_eq!(
            rejected(edit),
            ConfigError::ZeroTimeout {
                service,
                which: "health timeout".into()
            }
        );
    }

    #[test]
    fn test_health_check_must_be_usable() {
        let service = key(WEB, Proto::Tcp);
        let probe = Probe {
            interval_ms: 1000,
            timeout_ms: 500,
            rise: 1,
            fall: 1,
        };
        let edit = |health| Command::EditService {
            key: service,
            settings: ServiceSettings {
                health,
                ..settings()
            },
        };
        let http = |path: &str, expect_status| HealthCheck::Http {
            probe,
            path: path.into(),
            expect_status,
        };
        for (health, reason) in [
            (
                HealthCheck::Tcp(Probe {
                    timeout_ms: 1000,
                    ..probe
                }),
                "timeout 1000 ms must be less than the interval 1000 ms",
            ),
            (
                HealthCheck::Tcp(Probe { rise: 0, ..probe }),
                "rise and fall must be at least 1",
            ),
            (
                http("up", 200),
                "path \"up\" must start with / and hold no spaces or control characters",
            ),
            (
                http("/a b", 200),
                "path \"/a b\" must start with / and hold no spaces or control characters",
            ),
            (
                http("/", 99),
                "expected status 99 is not an HTTP status (100 to 599)",
            ),
        ] {
            let err = rejected(edit(health));
            assert_eq!(
                err,
                ConfigError::BadHealthCheck {
                    service,
                    reason: reason.into()
                }
            );
        }
        let mut config = base();
        accepted(&mut config, edit(http("/health", 204)));
    }

    #[test]
    fn test_addresses_traffic_is_sent_to() {
        assert_eq!(
            rejected(Command::AddService(new_service("198.18.0.9:0", &[]))),
            ConfigError::BadAddress {
                addr: "198.18.0.9:0".into(),
                what: "a VIP".into()
            }
        );
        let err = rejected(Command::AddBackend {
            service: key(WEB, Proto::Tcp),
            backend: backend("0.0.0.0:80", 1),
        });
        assert_eq!(err.to_string(), "0.0.0.0:80 cannot be a backend");
        assert_eq!(
            rejected(Command::AddNode(node(3, "n3", &[]))),
            ConfigError::NoLip { name: "n3".into() }
        );
        assert_eq!(
            rejected(Command::AddNode(node(3, "n3", &["224.0.0.1"]))).to_string(),
            "224.0.0.1 cannot be a local address"
        );
    }

    #[test]
    fn test_maglev_table_size_not_prime() {
        let set = |size| {
            Command::SetSettings(Settings {
                maglev_seed: 1,
                maglev_table_size: size,
            })
        };
        assert_eq!(
            rejected(set(65536)),
            ConfigError::BadMaglevTableSize { size: 65536 }
        );
        assert_eq!(
            rejected(set(9)),
            ConfigError::BadMaglevTableSize { size: 9 }
        );
        assert_eq!(
            ConfigError::BadMaglevTableSize { size: 9 }.to_string(),
            "maglev table size 9 must be a prime of at least 7"
        );
    }

    #[test]
    fn test_maglev_table_size_below_7() {
        for size in [0, 1, 2, 3, 5] {
            assert_eq!(
                rejected(Command::SetSettings(Settings {
                    maglev_seed: 0,
                    maglev_table_size: size
                })),
                ConfigError::BadMaglevTableSize { size }
            );
        }
        let mut config = base();
        for size in [7, 251, 65537] {
            let settings = Settings {
                maglev_seed: 42,
                maglev_table_size: size,
            };
            accepted(&mut config, Command::SetSettings(settings));
            assert_eq!(config.settings, settings);
        }
    }

    #[test]
    fn test_backend_of_other_address_family() {
        let service = key(WEB, Proto::Tcp);
        let v6 = backend("[2001:db8::1]:8080", 1);
        let mismatch = ConfigError::AddressFamilyMismatch {
            service,
            addr: v6.addr,
        };
        let add = Command::AddBackend {
            service,
            backend: v6,
        };
        assert_eq!(rejected(add), mismatch);
        let v6_service = new_service("[2001:db8:100::1]:443", &[backend("10.1.0.1:443", 1)]);
        assert!(matches!(
            rejected(Command::AddService(v6_service)),
            ConfigError::AddressFamilyMismatch { .. }
        ));
        let mut config = base();
        let v6_service = new_service("[2001:db8:100::1]:443", &[backend("[2001:db8::1]:443", 1)]);
        accepted(&mut config, Command::AddService(v6_service));
    }

    #[test]
    fn test_service_and_backend_lifecycle() {
        let mut config = base();
        let web = key(WEB, Proto::Tcp);
        let b2 = backend("10.1.0.2:8080", 3);
        accepted(
            &mut config,
            Command::AddBackend {
                service: web,
                backend: b2,
            },
        );
        let mut edited = settings();
        edited.scheduler = Scheduler::Wrr;
        edited.toa = true;
        accepted(
            &mut config,
            Command::EditService {
                key: web,
                settings: edited.clone(),
            },
        );
        let s = config.service(&web).unwrap();
        assert_eq!(s.settings, edited);
        assert_eq!(s.backends.len(), 2, "editing a service keeps its backends");
        accepted(
            &mut config,
            Command::DelBackend {
                service: web,
                addr: "10.1.0.1:8080".parse().unwrap(),
            },
        );
        assert_eq!(config.service(&web).unwrap().backends, vec![b2]);
        accepted(&mut config, Command::DelService { key: web });
        assert!(config.services.is_empty());
        assert_eq!(config.version, 7);
    }

    fn identity(id: u8, secret: u8) -> ClusterIdentity {
        let mut bytes = [secret; IDENTITY_BYTES];
        bytes[..IDENTITY_PART].fill(id);
        ClusterIdentity::from_bytes(bytes).unwrap()
    }

    #[test]
    fn test_identity_is_set_once() {
        let mut config = base();
        let first = identity(1, 2);
        accepted(&mut config, Command::SetIdentity(first));
        assert_eq!(config.identity, Some(first));
        let before = config.clone();
        let err = config
            .apply(&Command::SetIdentity(identity(3, 4)))
            .unwrap_err();
        assert_eq!(err, ConfigError::IdentitySet { id: first.id });
        assert_eq!(config, before);
        assert_eq!(
            err.to_string(),
            format!(
                "the cluster already has its identity (cluster {}); it never changes",
                "01".repeat(16)
            )
        );
    }

    #[test]
    fn test_join_token_round_trips_and_hides_its_secret() {
        let identity = identity(0xab, 0x5c);
        let token = identity.token();
        assert_eq!(token, format!("{}.{}", "ab".repeat(16), "5c".repeat(16)));
        assert_eq!(token.parse::<ClusterIdentity>(), Ok(identity));
        assert_eq!(
            ClusterIdentity::from_bytes(identity.to_bytes()),
            Some(identity)
        );
        assert!(!format!("{identity:?}").contains("5c5c"), "{identity:?}");
        assert!(identity.same_secret(&identity));
        assert!(!identity.same_secret(&self::identity(0xab, 0x5d)));
        assert_eq!(
            identity.id.to_string().parse::<ClusterId>(),
            Ok(identity.id)
        );
        // Through the snapshot's MessagePack, as hex text.
        let mut config = base();
        config.identity = Some(identity);
        let packed = rmp_serde::to_vec_named(&config).unwrap();
        assert_eq!(
            rmp_serde::from_slice::<ClusterConfig>(&packed).unwrap(),
            config
        );
        let secret = "5c".repeat(16);
        assert!(packed.windows(32).any(|w| w == secret.as_bytes()));
        // A snapshot written before identities existed has none.
        let mut old = base();
        old.identity = None;
        let packed = rmp_serde::to_vec_named(&old).unwrap();
        assert_eq!(
            rmp_serde::from_slice::<ClusterConfig>(&packed).unwrap(),
            old
        );
    }

    #[test]
    fn test_bad_join_tokens() {
        let good = identity(1, 2).token();
        for bad in [
            "",
            ".",
            "0102",
            &good[..good.len() - 1],
            &format!("{good}0"),
            &good.replace('.', ":"),
            &good.replacen('0', "g", 1),
            // An id of zeros is no cluster's.
            &format!("{}.{}", "00".repeat(16), "02".repeat(16)),
            "é".repeat(32).as_str(),
        ] {
            assert_eq!(bad.parse::<ClusterIdentity>(), Err(TokenError), "{bad:?}");
        }
        assert_eq!(ClusterIdentity::from_bytes([0; IDENTITY_BYTES]), None);
    }

    #[test]
    fn test_is_prime() {
        let primes: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(65537));
        assert!(is_prime(4_294_967_291));
        assert!(!is_prime(65535));
    }
}

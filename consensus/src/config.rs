//! The cluster configuration — the Raft state machine's data — and the commands that change it.
//!
//! Plain data with no I/O: [`ClusterConfig::validate`] checks a [`Command`] against the current
//! configuration and [`ClusterConfig::apply`] performs it. A rejected command changes nothing,
//! not even the version; an accepted one raises the version by exactly one.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

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
    pub bgp: Option<BgpSettings>,
}

/// Per-node BGP session settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgpSettings {
    pub local_as: u32,
    pub router_id: Ipv4Addr,
    pub neighbors: Vec<BgpNeighbor>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgpNeighbor {
    pub addr: IpAddr,
    pub remote_as: u32,
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
    #[error("local address {lip} already belongs to node {owner}")]
    LipOverlap { lip: IpAddr, owner: NodeId },
    #[error("local address {lip} is the VIP of service {service}")]
    LipIsVip { lip: IpAddr, service: ServiceKey },
    #[error("the VIP of service {service} is a local address of node {owner}")]
    VipIsLip { service: ServiceKey, owner: NodeId },
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
}

impl ClusterConfig {
    /// Checks `command` against this configuration without changing it.
    pub fn validate(&self, command: &Command) -> Result<(), ConfigError> {
        match command {
            Command::AddNode(node) => self.check_new_node(node),
            Command::RemoveNode { id } => self.node(*id).map(drop),
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
        for (i, &lip) in node.lips.iter().enumerate() {
            if node.lips[..i].contains(&lip) {
                return Err(ConfigError::DuplicateLip { lip, id: node.id });
            }
            if let Some(owner) = self.nodes.values().find(|n| n.lips.contains(&lip)) {
                return Err(ConfigError::LipOverlap {
                    lip,
                    owner: owner.id,
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
        let vip = key.vip.ip();
        match self.nodes.values().find(|n| n.lips.contains(&vip)) {
            Some(owner) => Err(ConfigError::VipIsLip {
                service: *key,
                owner: owner.id,
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
    match &settings.health {
        HealthCheck::None => Ok(()),
        HealthCheck::Tcp(probe) | HealthCheck::Http { probe, .. } => {
            if probe.interval_ms == 0 {
                Err(zero("health interval"))
            } else if probe.timeout_ms == 0 {
                Err(zero("health timeout"))
            } else {
                Ok(())
            }
        }
    }
}

fn check_backend(service: &ServiceKey, backend: &Backend) -> Result<(), ConfigError> {
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

//! The data plane's own immutable view of the configured services: what the engine consults when
//! a new flow arrives. The node builds a new `Snapshot` for every committed config (or health
//! change) and swaps it in whole; the packet path never locks it.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::laddr::L4Proto;
use crate::sched::{
    BackendSpec, ConnCounts, MaglevParams, Scheduler, SchedulerError, SchedulerKind,
};
use crate::tcp_state::{Direction, Timeouts};

/// A real server of a service, as configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendConfig {
    pub addr: SocketAddr,
    pub weight: u32,
    /// A backend that fails its health checks takes no new flows; its sessions stay.
    pub healthy: bool,
}

/// A virtual service, as configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceConfig {
    pub vip: SocketAddr,
    pub proto: L4Proto,
    pub scheduler: SchedulerKind,
    pub timeouts: Timeouts,
    /// Insert the client's address as a TCP option (TOA, kind 254) into SYNs.
    pub toa: bool,
    pub conn_reuse: ConnReuse,
    pub syn_proxy: SynProxy,
    pub backends: Vec<BackendConfig>,
}

/// Whether a TCP service's SYNs are answered by the node with SYN cookies (see
/// [`crate::synproxy`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SynProxy {
    /// Every SYN goes to a real server.
    Off,
    /// Every SYN is answered with a cookie.
    On,
    /// Cookies only while the node's flows that never completed a handshake number at least
    /// [`EngineConfig::syn_proxy_threshold`](crate::EngineConfig::syn_proxy_threshold), as
    /// Linux's `tcp_syncookies = 1` answers with cookies only while its SYN queue overflows.
    #[default]
    Auto,
}

impl SynProxy {
    /// The name in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            SynProxy::Off => "off",
            SynProxy::On => "on",
            SynProxy::Auto => "auto",
        }
    }
}

/// What a client's SYN does when it matches a session in TIME_WAIT or CLOSE (a client reusing
/// its port for a new connection): IPVS's `conn_reuse_mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnReuse {
    /// The old session ends and the SYN is scheduled afresh among the live real servers
    /// (IPVS's default, `conn_reuse_mode = 1`): a port reused under load never stays pinned to a
    /// real server that went down.
    #[default]
    Reschedule,
    /// The SYN continues the old session, to its real server (`conn_reuse_mode = 0`).
    Keep,
}

impl ConnReuse {
    /// The name in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            ConnReuse::Reschedule => "reschedule",
            ConnReuse::Keep => "keep",
        }
    }
}

/// Connection counters of one real server; they outlive snapshots so that a config change does
/// not reset them, and sessions keep them alive while they last.
#[derive(Debug)]
pub struct DestStats {
    active: AtomicU32,
    inactive: AtomicU32,
    total: AtomicU64,
    /// Packet and byte counters, one cache line per worker slot so that workers never write
    /// the same line on the packet path.
    traffic: Box<[TrafficSlot]>,
}

impl Default for DestStats {
    fn default() -> Self {
        DestStats {
            active: AtomicU32::new(0),
            inactive: AtomicU32::new(0),
            total: AtomicU64::new(0),
            // One more than the workers': the shared slot (see `TrafficSlotId::SHARED`).
            traffic: (0..=WORKER_SLOTS).map(|_| TrafficSlot::default()).collect(),
        }
    }
}

/// Worker slots of the per-real-server traffic counters. Workers past this many share slots
/// and then count with atomic adds.
pub(crate) const WORKER_SLOTS: usize = 16;

/// Where a worker counts traffic.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TrafficSlotId {
    index: usize,
    /// The only worker writing this slot: a plain load and store is enough.
    exclusive: bool,
}

impl TrafficSlotId {
    /// Where counts from outside the packet workers go (a faster path's, folded in when its
    /// flow is withdrawn): no worker writes it, every writer adds atomically.
    pub(crate) const SHARED: TrafficSlotId = TrafficSlotId {
        index: WORKER_SLOTS,
        exclusive: false,
    };

    pub(crate) fn for_worker(n: usize) -> Self {
        TrafficSlotId {
            index: n % WORKER_SLOTS,
            exclusive: n < WORKER_SLOTS,
        }
    }
}

#[repr(align(64))]
#[derive(Debug, Default)]
struct TrafficSlot {
    /// Inbound (client → real server), outbound (real server → client).
    packets: [AtomicU64; 2],
    bytes: [AtomicU64; 2],
}

/// Packets and bytes each way, as IPVS counts them per real server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    /// Client → real server.
    pub packets_in: u64,
    pub bytes_in: u64,
    /// Real server → client.
    pub packets_out: u64,
    pub bytes_out: u64,
}

impl std::ops::AddAssign for Traffic {
    fn add_assign(&mut self, o: Traffic) {
        self.packets_in += o.packets_in;
        self.bytes_in += o.bytes_in;
        self.packets_out += o.packets_out;
        self.bytes_out += o.bytes_out;
    }
}

impl DestStats {
    /// Active (established) and inactive (every other state) connections.
    pub fn conns(&self) -> ConnCounts {
        ConnCounts {
            active: self.active.load(Ordering::Relaxed),
            inactive: self.inactive.load(Ordering::Relaxed),
        }
    }

    /// Connections ever scheduled to or installed for this real server.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Packets and bytes forwarded for this real server, both ways.
    pub fn traffic(&self) -> Traffic {
        let mut t = Traffic::default();
        for slot in self.traffic.iter() {
            let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
            t += Traffic {
                packets_in: get(&slot.packets[0]),
                bytes_in: get(&slot.bytes[0]),
                packets_out: get(&slot.packets[1]),
                bytes_out: get(&slot.bytes[1]),
            };
        }
        t
    }

    /// Counts one forwarded packet of `len` bytes.
    pub(crate) fn count(&self, slot: TrafficSlotId, dir: Direction, len: usize) {
        self.count_many(slot, dir, 1, len as u64);
    }

    /// Counts `packets` forwarded packets of `bytes` bytes in all.
    pub(crate) fn count_many(&self, slot: TrafficSlotId, dir: Direction, packets: u64, bytes: u64) {
        let Some(s) = self.traffic.get(slot.index) else {
            return;
        };
        let i = match dir {
            Direction::Inbound => 0,
            Direction::Outbound => 1,
        };
        let add = |a: &AtomicU64, n: u64| {
            if slot.exclusive {
                a.store(a.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
            } else {
                a.fetch_add(n, Ordering::Relaxed);
            }
        };
        add(&s.packets[i], packets);
        add(&s.bytes[i], bytes);
    }

    pub(crate) fn opened(&self, active: bool) {
        self.total.fetch_add(1, Ordering::Relaxed);
        self.counter(active).fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn closed(&self, active: bool) {
        // Saturating: a counter must not wrap if a close is ever reported twice.
        let _ = self
            .counter(active)
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
    }

    pub(crate) fn moved(&self, was_active: bool, is_active: bool) {
        if was_active != is_active {
            self.closed(was_active);
            self.counter(is_active).fetch_add(1, Ordering::Relaxed);
        }
    }

    fn counter(&self, active: bool) -> &AtomicU32 {
        if active { &self.active } else { &self.inactive }
    }
}

/// Per-service settings a session needs on every packet.
#[derive(Debug)]
pub(crate) struct ServiceParams {
    pub(crate) timeouts: Timeouts,
    pub(crate) conn_reuse: ConnReuse,
    pub(crate) syn_proxy: SynProxy,
    pub(crate) toa: bool,
}

/// A real server as sessions reference it.
#[derive(Debug)]
pub struct Dest {
    pub addr: SocketAddr,
    pub stats: Arc<DestStats>,
    pub(crate) params: Arc<ServiceParams>,
}

/// How a service is found: protocol, VIP and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServiceKey {
    pub proto: L4Proto,
    pub vip: SocketAddr,
}

#[derive(Debug)]
pub(crate) struct Service {
    pub(crate) config: ServiceConfig,
    pub(crate) dests: Vec<Arc<Dest>>,
    pub(crate) scheduler: Scheduler,
    pub(crate) params: Arc<ServiceParams>,
}

impl Service {
    pub(crate) fn dest_by_addr(&self, addr: SocketAddr) -> Option<&Arc<Dest>> {
        self.dests.iter().find(|d| d.addr == addr)
    }
}

/// Why a snapshot could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("service {proto:?} {vip}: listed twice")]
    DuplicateService { proto: L4Proto, vip: SocketAddr },
    #[error("service {proto:?} {vip}: backend {backend} listed twice")]
    DuplicateBackend {
        proto: L4Proto,
        vip: SocketAddr,
        backend: SocketAddr,
    },
    #[error("service {proto:?} {vip}: backend {backend} is of another address family than the VIP")]
    FamilyMismatch {
        proto: L4Proto,
        vip: SocketAddr,
        backend: SocketAddr,
    },
    #[error("service {proto:?} {vip}: {source}")]
    Scheduler {
        proto: L4Proto,
        vip: SocketAddr,
        source: SchedulerError,
    },
}

/// The immutable service view the engine works from.
#[derive(Debug)]
pub struct Snapshot {
    version: u64,
    services: HashMap<ServiceKey, Service>,
    /// The addresses of the VIPs, whatever their ports: what the node answers pings on.
    vips: HashSet<IpAddr>,
    maglev: MaglevParams,
}

impl Snapshot {
    /// Builds a snapshot; counters of real servers that exist in `previous` carry over.
    pub fn new(
        version: u64,
        services: &[ServiceConfig],
        maglev: MaglevParams,
        previous: Option<&Snapshot>,
    ) -> Result<Snapshot, SnapshotError> {
        let mut map = HashMap::with_capacity(services.len());
        for cfg in services {
            let key = ServiceKey {
                proto: cfg.proto,
                vip: cfg.vip,
            };
            let (proto, vip) = (cfg.proto, cfg.vip);
            let mut seen = HashSet::new();
            for b in &cfg.backends {
                if !seen.insert(b.addr) {
                    return Err(SnapshotError::DuplicateBackend {
                        proto,
                        vip,
                        backend: b.addr,
                    });
                }
                if b.addr.is_ipv4() != vip.is_ipv4() {
                    return Err(SnapshotError::FamilyMismatch {
                        proto,
                        vip,
                        backend: b.addr,
                    });
                }
            }
            let specs: Vec<BackendSpec> = cfg
                .backends
                .iter()
                .map(|b| BackendSpec {
                    name: b.addr.to_string(),
                    weight: if b.healthy { b.weight } else { 0 },
                })
                .collect();
            let scheduler = Scheduler::new(cfg.scheduler, &specs, maglev)
                .map_err(|source| SnapshotError::Scheduler { proto, vip, source })?;
            let params = Arc::new(ServiceParams {
                timeouts: cfg.timeouts,
                conn_reuse: cfg.conn_reuse,
                syn_proxy: cfg.syn_proxy,
                toa: cfg.toa,
            });
            let old = previous.and_then(|p| p.services.get(&key));
            let dests = cfg
                .backends
                .iter()
                .map(|b| {
                    let stats = old
                        .and_then(|s| s.dest_by_addr(b.addr))
                        .map(|d| d.stats.clone())
                        .unwrap_or_default();
                    Arc::new(Dest {
                        addr: b.addr,
                        stats,
                        params: params.clone(),
                    })
                })
                .collect();
            let service = Service {
                config: cfg.clone(),
                dests,
                scheduler,
                params,
            };
            if map.insert(key, service).is_some() {
                return Err(SnapshotError::DuplicateService { proto, vip });
            }
        }
        let vips = map.keys().map(|k| k.vip.ip()).collect();
        Ok(Snapshot {
            version,
            services: map,
            vips,
            maglev,
        })
    }

    /// An empty snapshot: every packet is dropped as having no service.
    pub fn empty() -> Snapshot {
        Snapshot {
            version: 0,
            services: HashMap::new(),
            vips: HashSet::new(),
            maglev: MaglevParams::default(),
        }
    }

    /// The config version this snapshot was built from.
    pub fn version(&self) -> u64 {
        self.version
    }

    pub(crate) fn service(&self, proto: L4Proto, vip: SocketAddr) -> Option<&Service> {
        self.services.get(&ServiceKey { proto, vip })
    }

    /// Whether `ip` is the VIP of some service.
    pub fn is_vip(&self, ip: IpAddr) -> bool {
        self.vips.contains(&ip)
    }

    /// The real servers of a service with their counters, in config order.
    pub fn dests(&self, key: &ServiceKey) -> Option<&[Arc<Dest>]> {
        self.services.get(key).map(|s| s.dests.as_slice())
    }

    /// The Maglev parameters, which also seed the flow hash that every node computes alike.
    pub fn maglev(&self) -> MaglevParams {
        self.maglev
    }
}

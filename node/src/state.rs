//! What the admin API, the metrics and the health checks share: the engine, the service set it
//! runs and each backend's health. Every change of either rebuilds the engine's snapshot.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dataplane::service::Traffic;
use dataplane::{Engine, ServiceConfig, ServiceKey, Snapshot};
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::api::{BackendStatus, LipPorts, NamedCount, NodeStatus, ServiceStatus, SessionCounts};
use crate::config::ServiceSet;
use crate::packet_io::DataplaneHandle;

/// A backend of one service: the same address behind two services is checked twice.
pub(crate) type BackendKey = (ServiceKey, SocketAddr);

#[derive(Debug)]
pub(crate) struct NodeState {
    name: String,
    started: Instant,
    engine: Arc<Engine>,
    services: Mutex<Services>,
    /// The packet workers, once started; the daemon takes them back to stop them.
    dataplane: Mutex<Option<DataplaneHandle>>,
    /// The version of the service set the engine's snapshot was last built from.
    running_version: watch::Sender<u64>,
}

#[derive(Debug)]
struct Services {
    set: Arc<ServiceSet>,
    /// Backends that fail their checks; every other backend is healthy.
    down: HashSet<BackendKey>,
}

pub(crate) fn service_key(cfg: &ServiceConfig) -> ServiceKey {
    ServiceKey {
        proto: cfg.proto,
        vip: cfg.vip,
    }
}

impl NodeState {
    /// The node state over an engine, whose snapshot is built from `set` at once.
    pub(crate) fn new(name: String, engine: Arc<Engine>, set: Arc<ServiceSet>) -> Result<Self> {
        let state = NodeState {
            name,
            started: Instant::now(),
            engine,
            services: Mutex::new(Services {
                set,
                down: HashSet::new(),
            }),
            dataplane: Mutex::new(None),
            running_version: watch::Sender::new(0),
        };
        state.rebuild(&state.services.lock())?;
        Ok(state)
    }

    pub(crate) fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Hands the running packet workers to the state, so status and metrics can show them.
    pub(crate) fn set_dataplane(&self, handle: DataplaneHandle) {
        *self.dataplane.lock() = Some(handle);
    }

    /// Routes exactly `routes` into the data plane (no-op before it runs).
    pub(crate) fn set_routes(&self, routes: &[std::net::IpAddr]) -> Result<()> {
        match self.dataplane.lock().as_mut() {
            Some(d) => d.set_routes(routes),
            None => Ok(()),
        }
    }

    /// Takes the packet workers back, to stop them.
    pub(crate) fn take_dataplane(&self) -> Option<DataplaneHandle> {
        self.dataplane.lock().take()
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Runs a new service set. Backends that stay keep their health; new ones start healthy.
    pub(crate) fn set_services(&self, set: Arc<ServiceSet>) -> Result<()> {
        let mut s = self.services.lock();
        let keep: HashSet<BackendKey> = backend_keys(&set).filter(|k| s.down.contains(k)).collect();
        s.set = set;
        s.down = keep;
        self.rebuild(&s)
    }

    /// Whether a backend passes its health checks now.
    pub(crate) fn is_healthy(&self, key: &BackendKey) -> bool {
        !self.services.lock().down.contains(key)
    }

    /// Records a backend's health; a change rebuilds the snapshot.
    pub(crate) fn set_health(&self, key: BackendKey, healthy: bool) -> Result<()> {
        let mut s = self.services.lock();
        let changed = if healthy {
            s.down.remove(&key)
        } else {
            s.down.insert(key)
        };
        if changed { self.rebuild(&s) } else { Ok(()) }
    }

    /// Builds the engine's snapshot from the service set and the health of each backend, with
    /// the current snapshot as `previous` so that the backends' counters carry over.
    fn rebuild(&self, s: &Services) -> Result<()> {
        let configs: Vec<ServiceConfig> = s
            .set
            .services
            .iter()
            .map(|svc| {
                let key = service_key(&svc.config);
                let mut cfg = svc.config.clone();
                for b in &mut cfg.backends {
                    b.healthy = !s.down.contains(&(key, b.addr));
                }
                cfg
            })
            .collect();
        let snapshot = Snapshot::new(
            s.set.version,
            &configs,
            s.set.maglev,
            Some(&self.engine.snapshot()),
        )
        .context("building the data-plane snapshot")?;
        self.engine.set_snapshot(snapshot);
        self.running_version.send_replace(s.set.version);
        Ok(())
    }

    /// Distinct VIPs of the services now.
    pub(crate) fn vips_configured(&self) -> usize {
        let set = self.service_set();
        let vips: HashSet<std::net::IpAddr> =
            set.services.iter().map(|s| s.config.vip.ip()).collect();
        vips.len()
    }

    /// The version of the service set the data plane runs.
    pub(crate) fn running_version(&self) -> u64 {
        *self.running_version.borrow()
    }

    /// Waits until the data plane runs service set `version` or a later one; false if it did
    /// not within `timeout`.
    pub(crate) async fn wait_running(&self, version: u64, timeout: Duration) -> bool {
        let mut rx = self.running_version.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|v| *v >= version))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The services now, for the health checkers.
    pub(crate) fn service_set(&self) -> Arc<ServiceSet> {
        self.services.lock().set.clone()
    }

    pub(crate) fn status(&self) -> NodeStatus {
        let (set, down) = {
            let s = self.services.lock();
            (s.set.clone(), s.down.clone())
        };
        let snapshot = self.engine.snapshot();
        let (live, fastpath) = match self.dataplane.lock().as_ref() {
            Some(d) => (d.fastpath_traffic(), Some(d.fastpath_status())),
            None => Default::default(),
        };
        let services = set
            .services
            .iter()
            .map(|svc| {
                let key = service_key(&svc.config);
                let dests = snapshot.dests(&key).unwrap_or_default();
                let backends: Vec<BackendStatus> = svc
                    .config
                    .backends
                    .iter()
                    .map(|b| {
                        let dest = dests.iter().find(|d| d.addr == b.addr);
                        let conns = dest.map(|d| d.stats.conns()).unwrap_or_default();
                        // One picture: what the engine counted, and what the fast path carries
                        // for flows it still holds.
                        let mut traffic = dest.map(|d| d.stats.traffic()).unwrap_or_default();
                        if let Some(t) = live.get(&(svc.config.proto, svc.config.vip, b.addr)) {
                            traffic += *t;
                        }
                        BackendStatus {
                            addr: b.addr,
                            weight: b.weight,
                            healthy: !down.contains(&(key, b.addr)),
                            active: conns.active,
                            inactive: conns.inactive,
                            total: dest.map_or(0, |d| d.stats.total()),
                            traffic,
                        }
                    })
                    .collect();
                let mut traffic = Traffic::default();
                for b in &backends {
                    traffic += b.traffic;
                }
                ServiceStatus {
                    vip: svc.config.vip,
                    proto: svc.config.proto.into(),
                    scheduler: svc.config.scheduler,
                    health_check: svc.health.kind().to_owned(),
                    backends,
                    traffic,
                }
            })
            .collect();
        let counters = self.engine.counters();
        NodeStatus {
            node: self.name.clone(),
            config_version: set.version,
            uptime_secs: self.started.elapsed().as_secs(),
            services,
            sessions: {
                let by_family = self.engine.session_counts();
                SessionCounts {
                    count: by_family.total(),
                    capacity: by_family.capacity(),
                    by_family,
                }
            },
            drops: dataplane::DropReason::ALL
                .iter()
                .map(|&r| NamedCount {
                    name: r.name().to_owned(),
                    count: counters.drops(r),
                })
                .collect(),
            events: dataplane::Event::ALL
                .iter()
                .map(|&e| NamedCount {
                    name: e.name().to_owned(),
                    count: counters.events(e),
                })
                .collect(),
            local_addrs: self
                .engine
                .local_addrs()
                .usage()
                .into_iter()
                .map(|u| LipPorts {
                    ip: u.ip,
                    proto: u.proto.into(),
                    in_use: u.in_use,
                    capacity: u.capacity,
                })
                .collect(),
            io: self
                .dataplane
                .lock()
                .as_ref()
                .map_or_else(Vec::new, |d| d.stats().workers),
            fastpath,
            cluster: None,
            sync: None,
            bgp: None,
        }
    }
}

/// Every backend of every service.
pub(crate) fn backend_keys(set: &ServiceSet) -> impl Iterator<Item = BackendKey> + '_ {
    set.services.iter().flat_map(|svc| {
        let key = service_key(&svc.config);
        svc.config.backends.iter().map(move |b| (key, b.addr))
    })
}

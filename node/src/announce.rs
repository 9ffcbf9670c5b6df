//! What the node announces over BGP (DESIGN §2, §5), kept in BIRD by the `bgp` crate's applier.
//!
//! * Nothing while the node is cold (its session tables not complete) or not yet in the
//!   committed configuration: a node that (re)joins pulls the sessions first, then announces.
//! * Its own LIPs as preferred routes and every other node's LIPs as backup routes (AS-path
//!   prepended), so return traffic follows a failed node's LIPs to the survivors.
//! * A VIP only while the data plane runs the committed configuration, the node is not drained,
//!   and a service on that VIP has a healthy backend with weight above 0. Every route goes via the
//!   TUN device with `check link`, so a dead data plane withdraws them all.
//! * Drain: the VIPs first carry the graceful-shutdown community (65535:0) for `drain_wait`, then
//!   are withdrawn; the LIP routes stay, so flows still returning to this node's LIPs arrive.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bgp::{Announce, Applier, Bird};
use consensus::{BgpPeerReport, BgpReport, ClusterConfig, NodeId};
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::BgpSettings;
use crate::state::{NodeState, service_key};
use crate::sync::NodeSync;

/// How often the announcement is worked out again (health, warm-up and drain change without a
/// configuration change).
const TICK: Duration = Duration::from_millis(50);
/// How often BIRD is asked for its sessions, for status and reports.
const REFRESH: Duration = Duration::from_secs(1);
/// How long the data plane may run an older configuration than the committed one before the
/// node withdraws its VIPs. Every change is committed a moment before the data plane runs it;
/// a node that cannot apply one (an error in its log) stops attracting traffic after this.
const BEHIND_GRACE: Duration = Duration::from_secs(1);

/// The node's BGP side.
#[derive(Debug)]
pub(crate) struct Announcer {
    settings: BgpSettings,
    device: String,
    bird: Arc<Bird>,
    /// The announcement last handed to the applier.
    current: Mutex<Option<Announce>>,
    /// BIRD's sessions and what is announced, refreshed every [`REFRESH`].
    report: Mutex<BgpReport>,
}

/// What the policy looks at, at one moment.
#[derive(Debug)]
struct Inputs<'a> {
    config: &'a ClusterConfig,
    me: NodeId,
    warm: bool,
    /// The data plane runs the committed configuration, or has been behind it for less than
    /// [`BEHIND_GRACE`].
    running: bool,
    /// VIPs with a service in the running data plane that has a healthy backend of weight
    /// above 0.
    healthy_vips: BTreeSet<IpAddr>,
    /// Drained for at least the drain wait.
    drain_done: bool,
}

impl Announcer {
    pub(crate) fn new(settings: BgpSettings, device: String) -> Arc<Announcer> {
        let bird = Arc::new(Bird::new(&settings.bird_config, &settings.bird_socket));
        Arc::new(Announcer {
            settings,
            device,
            bird,
            current: Mutex::new(None),
            report: Mutex::new(BgpReport::default()),
        })
    }

    /// Makes BIRD announce nothing: before the data plane starts (a config left by an earlier
    /// run would otherwise announce the VIPs as soon as the TUN device is up again, while this
    /// run is still cold), and when the node exits because its Raft failed. BIRD not running is
    /// not an error here (then nothing is announced).
    pub(crate) async fn withdraw_all(&self) {
        let s = &self.settings;
        let mut nothing = Announce::new(s.router_id, s.local_as, self.device.clone());
        nothing.peers.clone_from(&s.peers);
        match self.bird.apply(&nothing).await {
            Ok(_) => {}
            Err(e) => tracing::info!("BIRD not told to withdraw everything: {e}"),
        }
        *self.current.lock() = Some(nothing);
    }

    /// The announcement for `inputs`.
    fn desired(&self, inputs: &Inputs<'_>) -> Announce {
        let s = &self.settings;
        let mut a = Announce::new(s.router_id, s.local_as, self.device.clone());
        a.communities.clone_from(&s.communities);
        a.med = s.med;
        a.peers.clone_from(&s.peers);
        let Some(me) = inputs.config.nodes.get(&inputs.me) else {
            return a;
        };
        if !inputs.warm {
            return a;
        }
        a.own_lips.clone_from(&me.lips);
        a.backup_lips = inputs
            .config
            .nodes
            .values()
            .filter(|n| n.id != inputs.me)
            .flat_map(|n| n.lips.iter().copied())
            .collect();
        a.graceful_shutdown = me.drained;
        if inputs.running && !(me.drained && inputs.drain_done) {
            // Served by the data plane now and still in the committed configuration: a VIP
            // just removed goes at once, one just added waits for the data plane.
            let committed: BTreeSet<IpAddr> = inputs
                .config
                .services
                .iter()
                .map(|s| s.key.vip.ip())
                .collect();
            a.vips = inputs
                .healthy_vips
                .intersection(&committed)
                .copied()
                .collect();
        }
        a
    }

    /// Keeps BIRD on the desired announcement until `stop`.
    pub(crate) async fn run(
        self: Arc<Self>,
        state: Arc<NodeState>,
        sync: Arc<NodeSync>,
        configs: watch::Receiver<Arc<ClusterConfig>>,
        stop: watch::Receiver<bool>,
    ) {
        let applier = Applier::spawn(self.bird.clone(), bgp::DEFAULT_INTERVAL, stop.clone());
        let me = consensus::node_id(state.name());
        let mut drained_since: Option<Instant> = None;
        let mut behind_since: Option<Instant> = None;
        let mut tick = tokio::time::interval(TICK);
        let mut refreshed: Option<Instant> = None;
        let mut stop = stop;
        loop {
            let config = configs.borrow().clone();
            let drained = config.nodes.get(&me).is_some_and(|n| n.drained);
            let since = match (drained, drained_since) {
                (false, _) => None,
                (true, None) => Some(Instant::now()),
                (true, Some(t)) => Some(t),
            };
            drained_since = since;
            behind_since = if state.running_version() >= config.version {
                None
            } else {
                behind_since.or_else(|| Some(Instant::now()))
            };
            let inputs = Inputs {
                config: &config,
                me,
                warm: sync.is_warm(),
                running: behind_since.is_none_or(|t| t.elapsed() < BEHIND_GRACE),
                healthy_vips: healthy_vips(&state),
                drain_done: since.is_some_and(|t| t.elapsed() >= self.settings.drain_wait),
            };
            let desired = self.desired(&inputs);
            let changed = self.current.lock().as_ref() != Some(&desired);
            if changed {
                applier.set(desired.clone());
                *self.current.lock() = Some(desired);
            }
            if changed || refreshed.is_none_or(|t| t.elapsed() >= REFRESH) {
                self.refresh(state.vips_configured()).await;
                refreshed = Some(Instant::now());
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                _ = tick.tick() => {}
            }
        }
        applier.join().await;
    }

    /// BGP as `lbcluster status` shows it (at most [`REFRESH`] old).
    pub(crate) fn report(&self) -> BgpReport {
        self.report.lock().clone()
    }

    /// Asks BIRD for its sessions and records them with what is announced now.
    async fn refresh(&self, vips_configured: usize) {
        let current = self.current.lock().clone();
        let (peers, error) = match self.bird.show_protocols().await {
            Ok(protocols) => (
                protocols
                    .iter()
                    .filter_map(|p| {
                        Some(BgpPeerReport {
                            name: p.peer_name()?.to_owned(),
                            addr: p.neighbor,
                            remote_as: p.neighbor_as,
                            established: p.is_established(),
                            state: p.bgp_state.clone().unwrap_or_else(|| p.info.clone()),
                            since: p.since.clone(),
                            bfd: p.bfd,
                            exported: p.routes().exported,
                        })
                    })
                    .collect(),
                None,
            ),
            Err(e) => (Vec::new(), Some(e.to_string())),
        };
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        *self.report.lock() = BgpReport {
            peers,
            vips_announced: current.as_ref().map_or_else(Vec::new, |a| a.vips.clone()),
            vips_configured: count(vips_configured),
            lips_announced: count(current.as_ref().map_or(0, |a| a.own_lips.len())),
            graceful_shutdown: current.as_ref().is_some_and(|a| a.graceful_shutdown),
            error,
        };
    }
}

/// The VIPs with a service that has a healthy backend of weight above 0.
fn healthy_vips(state: &NodeState) -> BTreeSet<IpAddr> {
    let set = state.service_set();
    set.services
        .iter()
        .filter(|svc| {
            let key = service_key(&svc.config);
            svc.config
                .backends
                .iter()
                .any(|b| b.weight > 0 && state.is_healthy(&(key, b.addr)))
        })
        .map(|svc| svc.config.vip.ip())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use consensus::config::{
        Command, HealthCheck, Node, Proto, Scheduler, Service, ServiceKey, ServiceSettings,
        Timeouts,
    };

    const VIP: &str = "198.18.100.1";

    fn service_key() -> ServiceKey {
        ServiceKey {
            vip: format!("{VIP}:80").parse().unwrap(),
            proto: Proto::Tcp,
        }
    }

    fn settings() -> BgpSettings {
        BgpSettings {
            bird_config: "bird.conf".into(),
            bird_socket: "bird.sock".into(),
            local_as: 65100,
            router_id: "198.18.51.2".parse().unwrap(),
            drain_wait: Duration::from_secs(1),
            communities: Vec::new(),
            med: None,
            peers: vec![bgp::Peer::new(
                "router",
                "198.18.51.1".parse().unwrap(),
                65000,
            )],
        }
    }

    fn config() -> ClusterConfig {
        let mut c = ClusterConfig::default();
        for (name, lip, port) in [("n1", "198.19.200.1", 7946), ("n2", "198.19.200.2", 7947)] {
            c.apply(&Command::AddNode(Node {
                id: consensus::node_id(name),
                name: name.into(),
                quic_addr: format!("198.18.51.2:{port}").parse().unwrap(),
                lips: vec![lip.parse().unwrap()],
                drained: false,
            }))
            .unwrap();
        }
        c.apply(&Command::AddService(Service {
            key: service_key(),
            settings: ServiceSettings {
                scheduler: Scheduler::default(),
                timeouts: Timeouts::default(),
                toa: false,
                conn_reuse: Default::default(),
                syn_proxy: Default::default(),
                health: HealthCheck::None,
            },
            backends: Vec::new(),
        }))
        .unwrap();
        c
    }

    fn inputs(config: &ClusterConfig) -> Inputs<'_> {
        Inputs {
            config,
            me: consensus::node_id("n1"),
            warm: true,
            running: true,
            healthy_vips: BTreeSet::from([VIP.parse().unwrap()]),
            drain_done: false,
        }
    }

    #[test]
    fn test_the_announcement_follows_the_policy() {
        let a = Announcer::new(settings(), "lbc0".into());
        let mut cfg = config();
        let vip: IpAddr = VIP.parse().unwrap();
        let lip1: IpAddr = "198.19.200.1".parse().unwrap();
        let lip2: IpAddr = "198.19.200.2".parse().unwrap();

        let all = a.desired(&inputs(&cfg));
        assert_eq!(
            (all.vips.clone(), all.own_lips.clone()),
            (vec![vip], vec![lip1])
        );
        assert_eq!(all.backup_lips, vec![lip2]);
        assert!(!all.graceful_shutdown);
        bgp::render(&all).unwrap();

        // Cold, or not in the configuration: nothing at all.
        let cold = a.desired(&Inputs {
            warm: false,
            ..inputs(&cfg)
        });
        assert!(cold.vips.is_empty() && cold.own_lips.is_empty() && cold.backup_lips.is_empty());
        let stranger = a.desired(&Inputs {
            me: consensus::node_id("n9"),
            ..inputs(&cfg)
        });
        assert!(stranger.vips.is_empty() && stranger.own_lips.is_empty());

        // No healthy backend, or the data plane behind the configuration: LIPs but no VIP.
        let unhealthy = a.desired(&Inputs {
            healthy_vips: BTreeSet::new(),
            ..inputs(&cfg)
        });
        assert!(unhealthy.vips.is_empty());
        assert_eq!(unhealthy.own_lips, vec![lip1]);
        let behind = a.desired(&Inputs {
            running: false,
            ..inputs(&cfg)
        });
        assert!(behind.vips.is_empty());

        // A VIP the data plane still serves but the committed configuration no longer has goes
        // at once; one the data plane does not serve yet is not announced.
        let mut removed = cfg.clone();
        removed
            .apply(&Command::DelService { key: service_key() })
            .unwrap();
        assert!(a.desired(&inputs(&removed)).vips.is_empty());
        let not_yet = a.desired(&Inputs {
            healthy_vips: BTreeSet::from(["198.18.100.2".parse().unwrap()]),
            ..inputs(&cfg)
        });
        assert!(not_yet.vips.is_empty());

        // Drain: graceful shutdown first, then the VIPs go; the LIPs stay.
        cfg.apply(&Command::SetDrain {
            id: consensus::node_id("n1"),
            drained: true,
        })
        .unwrap();
        let draining = a.desired(&inputs(&cfg));
        assert!(draining.graceful_shutdown);
        assert_eq!(draining.vips, vec![vip]);
        let drained = a.desired(&Inputs {
            drain_done: true,
            ..inputs(&cfg)
        });
        assert!(drained.vips.is_empty());
        assert_eq!(drained.own_lips, vec![lip1]);
        bgp::render(&drained).unwrap();
    }
}

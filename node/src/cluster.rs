//! The node as a member of a replicated cluster (DESIGN §3, §4): its QUIC endpoint carries the
//! Raft RPCs of `consensus` and session sync, and every configuration the cluster commits
//! becomes this node's service set, local addresses, routes and sync peers.
//!
//! The conversion between the cluster's configuration model (`consensus::config`) and the node's
//! own (`crate::config`, built on `dataplane` types) lives here, in both directions: committed
//! config → service set, and the node file's services → the commands that bootstrap a cluster.

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use consensus::config::{self as cc, ClusterConfig, Command};
use consensus::{Member, NodeId};
use dataplane::sched::{MaglevParams, SchedulerKind};
use dataplane::{BackendConfig, ConnReuse, Engine, L4Proto, ServiceConfig, SynProxy};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{Instrument, info_span};

use crate::announce::Announcer;
use crate::config::{self, ClusterSettings, HealthCheck, Probe, ServiceSet};
use crate::packet_io::EventSink;
use crate::quic::{self, PeerConnection};
use crate::sync::NodeSync;

/// The cluster handle of a node: Raft over the node's QUIC endpoint.
pub(crate) type RaftCluster = consensus::Cluster<QuicDialer>;

/// Dials Raft peers on the node's endpoint, with the Raft ALPN and the full peer checks.
#[derive(Debug, Clone)]
pub(crate) struct QuicDialer(Arc<quic::Endpoint>);

impl consensus::Dialer for QuicDialer {
    type Error = anyhow::Error;

    async fn connect(
        &self,
        addr: std::net::SocketAddr,
        peer_name: &str,
    ) -> Result<quinn::Connection, anyhow::Error> {
        Ok(self
            .0
            .connect(addr, peer_name, quic::ALPN_RAFT)
            .await?
            .connection)
    }
}

/// A running cluster member: the Raft node, session sync, and the endpoint that serves both.
#[derive(Debug)]
pub(crate) struct ClusterNode {
    pub(crate) cluster: RaftCluster,
    pub(crate) sync: Arc<NodeSync>,
    pub(crate) endpoint: Arc<quic::Endpoint>,
    pub(crate) serve_counters: Arc<consensus::ServeCounters>,
    accept: JoinHandle<()>,
}

impl ClusterNode {
    /// Loads the node's certificate (it must name `name`), binds the QUIC endpoint, opens the
    /// Raft storage, starts session sync over `engine` and starts serving peers. Returns the
    /// node, the configurations it applies (starting with the one restored from disk), and the
    /// inbox of session events for the packet workers.
    pub(crate) async fn start(
        name: &str,
        settings: &ClusterSettings,
        engine: &Arc<Engine>,
        announcer: Option<Arc<Announcer>>,
    ) -> Result<(ClusterNode, watch::Receiver<Arc<ClusterConfig>>, EventSink)> {
        let tls = quic::NodeTls::load(&settings.ca, &settings.cert, &settings.key)?;
        ensure!(
            tls.name() == name,
            "{} is the certificate of node {:?}, but this node is {name:?} (node.name)",
            settings.cert.display(),
            tls.name()
        );
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&settings.data_dir)
            .with_context(|| format!("creating {}", settings.data_dir.display()))?;

        // The membership check asks the Raft node, which needs the endpoint to dial: the check
        // refuses everybody until the node exists. Raft connections follow the cluster's access
        // rules (a node not yet joined takes them with a join token); session sync is for
        // members only.
        let raft_cell: Arc<OnceLock<RaftCluster>> = Arc::default();
        let membership: quic::Membership = {
            let cell = raft_cell.clone();
            let me = name.to_owned();
            Arc::new(move |peer: &str, alpn: &[u8]| match cell.get() {
                Some(c) if alpn == quic::ALPN_RAFT => c.admit(peer),
                Some(c) if c.is_member(peer) => Ok(()),
                _ => Err(consensus::Refusal::NotMember {
                    by: me.clone(),
                    peer: peer.to_owned(),
                }),
            })
        };
        let endpoint = Arc::new(quic::Endpoint::bind(
            settings.listen,
            &tls,
            quic::ALPNS,
            membership,
        )?);
        let raft_config = openraft::Config {
            cluster_name: "lbcluster".to_owned(),
            heartbeat_interval: millis(settings.heartbeat),
            election_timeout_min: millis(*settings.election_timeout.start()),
            election_timeout_max: millis(*settings.election_timeout.end()),
            ..openraft::Config::default()
        }
        .validate()
        .context("raft timing settings")?;
        let me = Member {
            name: name.to_owned(),
            quic_addr: settings.listen,
        };
        let (cluster, configs) = consensus::Cluster::start(
            me,
            Arc::new(raft_config),
            &settings.data_dir,
            QuicDialer(endpoint.clone()),
            join_token(settings.join_token_file.clone()),
        )
        .await
        .with_context(|| format!("starting raft on {}", settings.data_dir.display()))?;
        // Set once, here; nothing else sets it.
        let _ = raft_cell.set(cluster.clone());

        let serve_counters = Arc::new(consensus::ServeCounters::default());
        let handler: quic::Handler = {
            let cluster = cluster.clone();
            let counters = serve_counters.clone();
            Arc::new(move |conn: PeerConnection| {
                let span = info_span!("raft_peer", peer = %conn.peer);
                tokio::spawn(
                    consensus::serve_connection(
                        cluster.clone(),
                        conn.connection,
                        conn.peer,
                        counters.clone(),
                    )
                    .instrument(span),
                );
            })
        };
        let (sync, events) = NodeSync::start(name, engine, &settings.data_dir)?;
        {
            let sync = sync.clone();
            let announcer = announcer.clone();
            cluster.set_probes(consensus::Probes {
                warm: Box::new(move || sync.is_warm()),
                bgp: Box::new(move || announcer.as_ref().map(|a| a.report())),
            });
        }
        let sync_handler: quic::Handler = {
            let sync = sync.clone();
            Arc::new(move |conn: PeerConnection| sync.accept(conn))
        };
        let accept = {
            let endpoint = endpoint.clone();
            tokio::spawn(async move {
                endpoint
                    .serve(HashMap::from([
                        (quic::ALPN_RAFT.to_vec(), handler),
                        (quic::ALPN_SYNC.to_vec(), sync_handler),
                    ]))
                    .await;
            })
        };
        Ok((
            ClusterNode {
                cluster,
                sync,
                endpoint,
                serve_counters,
                accept,
            },
            configs,
            events,
        ))
    }

    /// Hands the node's last sessions to its peers (call it once the data plane has stopped:
    /// see [`NodeSync::close`]), stops Raft and closes the endpoint.
    pub(crate) async fn shutdown(self) {
        self.sync.close().await;
        self.cluster.shutdown().await;
        self.endpoint.close();
        let _ = self.accept.await;
    }
}

/// The join token in `file` (`[cluster] join_token_file`), read whenever the node needs it:
/// only while it has not joined a cluster, so a token written after the node started counts.
fn join_token(file: Option<PathBuf>) -> consensus::JoinToken {
    Arc::new(move || {
        let Some(path) = &file else {
            return Err("no [cluster] join_token_file in its config".to_owned());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        text.trim()
            .parse()
            .map_err(|e| format!("{}: {e}", path.display()))
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// This node's entry for `cluster init`: its name, QUIC address and the file's LIPs.
pub(crate) fn self_node(name: &str, settings: &ClusterSettings, lips: &[IpAddr]) -> cc::Node {
    cc::Node {
        id: consensus::node_id(name),
        name: name.to_owned(),
        quic_addr: settings.listen,
        lips: lips.to_vec(),
        drained: false,
    }
}

/// The local addresses this node runs with: its own in the cluster config once it is listed
/// there, else those of its file.
pub(crate) fn local_addrs(cfg: &ClusterConfig, me: NodeId, file: &[IpAddr]) -> Vec<IpAddr> {
    cfg.nodes
        .get(&me)
        .map_or_else(|| file.to_vec(), |n| n.lips.clone())
}

/// Host routes into the data plane: the node's LIPs, every other node's LIPs (their return
/// traffic reaches this node when the router moves a peer's LIP here, DESIGN §2) and every VIP.
pub(crate) fn routes(cfg: &ClusterConfig, lips: &[IpAddr]) -> Vec<IpAddr> {
    let mut routes = lips.to_vec();
    routes.extend(cfg.nodes.values().flat_map(|n| n.lips.iter().copied()));
    routes.extend(cfg.services.iter().map(|s| s.key.vip.ip()));
    routes.sort();
    routes.dedup();
    routes
}

/// The service set a committed configuration gives the data plane (every backend starts
/// healthy; the health checks decide from there).
pub(crate) fn service_set(cfg: &ClusterConfig) -> ServiceSet {
    ServiceSet {
        version: cfg.version,
        maglev: MaglevParams {
            seed: cfg.settings.maglev_seed,
            table_size: cfg.settings.maglev_table_size,
        },
        services: cfg.services.iter().map(service_from_cluster).collect(),
    }
}

fn service_from_cluster(s: &cc::Service) -> config::Service {
    let t = &s.settings.timeouts;
    let secs = |v: u32| Duration::from_secs(u64::from(v));
    config::Service {
        config: ServiceConfig {
            vip: s.key.vip,
            proto: match s.key.proto {
                cc::Proto::Tcp => L4Proto::Tcp,
                cc::Proto::Udp => L4Proto::Udp,
            },
            scheduler: match s.settings.scheduler {
                cc::Scheduler::Maglev => SchedulerKind::Maglev,
                cc::Scheduler::Wrr => SchedulerKind::Wrr,
                cc::Scheduler::Wlc => SchedulerKind::Wlc,
                cc::Scheduler::Rr => SchedulerKind::Rr,
                cc::Scheduler::Sh => SchedulerKind::Sh,
            },
            timeouts: dataplane::Timeouts {
                established: secs(t.established),
                syn_sent: secs(t.syn_sent),
                syn_recv: secs(t.syn_recv),
                fin_wait: secs(t.fin_wait),
                time_wait: secs(t.time_wait),
                close: secs(t.close),
                close_wait: secs(t.close_wait),
                last_ack: secs(t.last_ack),
                udp: secs(t.udp),
            },
            toa: s.settings.toa,
            conn_reuse: match s.settings.conn_reuse {
                cc::ConnReuse::Reschedule => ConnReuse::Reschedule,
                cc::ConnReuse::Keep => ConnReuse::Keep,
            },
            syn_proxy: match s.settings.syn_proxy {
                cc::SynProxy::Off => SynProxy::Off,
                cc::SynProxy::On => SynProxy::On,
                cc::SynProxy::Auto => SynProxy::Auto,
            },
            backends: s
                .backends
                .iter()
                .map(|b| BackendConfig {
                    addr: b.addr,
                    weight: b.weight,
                    healthy: true,
                })
                .collect(),
        },
        health: match &s.settings.health {
            cc::HealthCheck::None => HealthCheck::None,
            cc::HealthCheck::Tcp(p) => HealthCheck::Tcp(probe_from_cluster(p)),
            cc::HealthCheck::Http {
                probe,
                path,
                expect_status,
            } => HealthCheck::Http {
                probe: probe_from_cluster(probe),
                path: path.clone(),
                expect_status: *expect_status,
            },
        },
    }
}

fn probe_from_cluster(p: &cc::Probe) -> Probe {
    Probe {
        interval: Duration::from_millis(u64::from(p.interval_ms)),
        timeout: Duration::from_millis(u64::from(p.timeout_ms)),
        rise: p.rise,
        fall: p.fall,
    }
}

/// The commands that make a new cluster run the node file's services: its Maglev settings,
/// then each service with its backends.
pub(crate) fn bootstrap_commands(set: &ServiceSet) -> Result<Vec<Command>> {
    let mut commands = vec![Command::SetSettings(cc::Settings {
        maglev_seed: set.maglev.seed,
        maglev_table_size: set.maglev.table_size,
    })];
    for s in &set.services {
        commands.push(Command::AddService(service_to_cluster(s)?));
    }
    Ok(commands)
}

fn service_to_cluster(s: &config::Service) -> Result<cc::Service> {
    let c = &s.config;
    let t = &c.timeouts;
    let secs = |d: Duration| {
        u32::try_from(d.as_secs())
            .with_context(|| format!("timeout {d:?} of {} is too long", c.vip))
    };
    Ok(cc::Service {
        key: cc::ServiceKey {
            vip: c.vip,
            proto: match c.proto {
                L4Proto::Tcp => cc::Proto::Tcp,
                L4Proto::Udp => cc::Proto::Udp,
            },
        },
        settings: cc::ServiceSettings {
            scheduler: match c.scheduler {
                SchedulerKind::Maglev => cc::Scheduler::Maglev,
                SchedulerKind::Wrr => cc::Scheduler::Wrr,
                SchedulerKind::Wlc => cc::Scheduler::Wlc,
                SchedulerKind::Rr => cc::Scheduler::Rr,
                SchedulerKind::Sh => cc::Scheduler::Sh,
            },
            timeouts: cc::Timeouts {
                established: secs(t.established)?,
                syn_sent: secs(t.syn_sent)?,
                syn_recv: secs(t.syn_recv)?,
                fin_wait: secs(t.fin_wait)?,
                time_wait: secs(t.time_wait)?,
                close: secs(t.close)?,
                close_wait: secs(t.close_wait)?,
                last_ack: secs(t.last_ack)?,
                udp: secs(t.udp)?,
            },
            toa: c.toa,
            conn_reuse: match c.conn_reuse {
                ConnReuse::Reschedule => cc::ConnReuse::Reschedule,
                ConnReuse::Keep => cc::ConnReuse::Keep,
            },
            syn_proxy: match c.syn_proxy {
                SynProxy::Off => cc::SynProxy::Off,
                SynProxy::On => cc::SynProxy::On,
                SynProxy::Auto => cc::SynProxy::Auto,
            },
            health: match &s.health {
                HealthCheck::None => cc::HealthCheck::None,
                HealthCheck::Tcp(p) => cc::HealthCheck::Tcp(probe_to_cluster(p)?),
                HealthCheck::Http {
                    probe,
                    path,
                    expect_status,
                } => cc::HealthCheck::Http {
                    probe: probe_to_cluster(probe)?,
                    path: path.clone(),
                    expect_status: *expect_status,
                },
            },
        },
        backends: c
            .backends
            .iter()
            .map(|b| cc::Backend {
                addr: b.addr,
                weight: b.weight,
            })
            .collect(),
    })
}

fn probe_to_cluster(p: &Probe) -> Result<cc::Probe> {
    let ms = |d: Duration| {
        u32::try_from(d.as_millis()).with_context(|| format!("probe time {d:?} is too long"))
    };
    Ok(cc::Probe {
        interval_ms: ms(p.interval)?,
        timeout_ms: ms(p.timeout)?,
        rise: p.rise,
        fall: p.fall,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "[node]\nname = \"n1\"\nlocal_addrs = [\"198.19.200.1\", \"2001:db8:200::1\"]\n\
        [maglev]\nseed = 7\ntable_size = 251\n\
        [[service]]\nvip = \"198.18.100.1:80\"\nproto = \"tcp\"\nscheduler = \"wlc\"\ntoa = true\n\
        timeouts = { established = 60, udp = 20 }\n\
        health = { kind = \"http\", path = \"/up\", expect_status = 204, interval_ms = 500, timeout_ms = 200, rise = 1, fall = 2 }\n\
        [[service.backend]]\naddr = \"198.18.3.10:8080\"\nweight = 3\n\
        [[service.backend]]\naddr = \"198.18.3.11:8080\"\nweight = 0\n\
        [[service]]\nvip = \"[2001:db8:100::1]:53\"\nproto = \"udp\"\nscheduler = \"sh\"\n\
        health = { kind = \"tcp\" }\n\
        [[service.backend]]\naddr = \"[2001:db8:3::10]:5353\"\n";

    /// The file's services, committed as bootstrap commands, come back as the same service set.
    #[test]
    fn test_bootstrap_round_trips_through_the_cluster_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n1.toml");
        std::fs::write(&path, FILE).unwrap();
        let file = config::load(&path, 1).unwrap();

        let mut cfg = ClusterConfig::default();
        for command in bootstrap_commands(&file.services).unwrap() {
            cfg.apply(&command).unwrap();
        }
        let set = service_set(&cfg);
        assert_eq!(set.version, 3);
        assert_eq!(set.maglev, file.services.maglev);
        assert_eq!(set.services, file.services.services);
    }

    /// The token file is read at each ask: missing, then written, then spoilt.
    #[test]
    fn test_join_token_is_read_from_its_file_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("join.token");
        assert_eq!(
            join_token(None)().unwrap_err(),
            "no [cluster] join_token_file in its config"
        );
        let token = join_token(Some(path.clone()));
        assert!(token().unwrap_err().starts_with("cannot read"));
        let text = format!("{}.{}", "ab".repeat(16), "cd".repeat(16));
        std::fs::write(&path, format!("{text}\n")).unwrap();
        assert_eq!(token().unwrap().token(), text);
        std::fs::write(&path, "not a token").unwrap();
        assert!(token().unwrap_err().contains("not a join token"));
    }

    #[test]
    fn test_local_addrs_and_routes_follow_the_config() {
        let settings = ClusterSettings {
            listen: "198.18.1.2:7946".parse().unwrap(),
            data_dir: "d".into(),
            ca: "ca".into(),
            cert: "c".into(),
            key: "k".into(),
            heartbeat: Duration::from_millis(100),
            election_timeout: Duration::from_millis(500)..=Duration::from_millis(900),
            join_token_file: None,
        };
        let file_lips: Vec<IpAddr> = vec!["198.19.200.1".parse().unwrap()];
        let mut cfg = ClusterConfig::default();
        let me = consensus::node_id("n1");
        assert_eq!(local_addrs(&cfg, me, &file_lips), file_lips);

        let mut node = self_node("n1", &settings, &file_lips);
        node.lips = vec!["198.19.201.1".parse().unwrap()];
        cfg.apply(&Command::AddNode(node)).unwrap();
        let lips = local_addrs(&cfg, me, &file_lips);
        assert_eq!(lips, vec!["198.19.201.1".parse::<IpAddr>().unwrap()]);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n1.toml");
        std::fs::write(&path, FILE).unwrap();
        for command in bootstrap_commands(&config::load(&path, 1).unwrap().services).unwrap() {
            cfg.apply(&command).unwrap();
        }
        let want: Vec<IpAddr> = ["198.18.100.1", "198.19.201.1", "2001:db8:100::1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(routes(&cfg, &lips), want);
        // A peer's LIPs are routed here too.
        let mut peer = self_node("n2", &settings, &["198.19.200.2".parse().unwrap()]);
        peer.quic_addr = "198.18.1.3:7946".parse().unwrap();
        cfg.apply(&Command::AddNode(peer)).unwrap();
        assert!(routes(&cfg, &lips).contains(&"198.19.200.2".parse().unwrap()));
    }
}

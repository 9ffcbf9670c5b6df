//! What the QUIC tests share: a cluster CA, mutual-TLS endpoints on loopback, a dialer, and
//! nodes that run a [`Cluster`] behind an accept loop as the node daemon does.

use std::error::Error;
use std::net::SocketAddr;

use consensus::Command;
use consensus::config::{
    Backend, HealthCheck, Proto, Scheduler, Service, ServiceKey, ServiceSettings, Timeouts,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use consensus::{
    Cluster, ClusterConfig, Deadlines, Dialer, Member, ServeCounters, serve_connection,
};
use openraft::Config;
use quinn::{Connection, Endpoint};
use tempfile::TempDir;
use tokio::sync::watch;

/// The ALPN of Raft RPCs, as the node serves them.
pub(crate) const ALPN_RAFT: &[u8] = b"lbc-raft/1";

pub(crate) use testpki::Ca;

/// Dials with the node's endpoint, as the node does; counts its dials.
#[derive(Clone)]
pub(crate) struct TestDialer {
    endpoint: Endpoint,
    client: quinn::ClientConfig,
    pub(crate) dials: Arc<AtomicUsize>,
}

impl TestDialer {
    pub(crate) fn new(endpoint: &Endpoint, client: &quinn::ClientConfig) -> TestDialer {
        TestDialer {
            endpoint: endpoint.clone(),
            client: client.clone(),
            dials: Arc::default(),
        }
    }
}

impl Dialer for TestDialer {
    type Error = Box<dyn Error + Send + Sync>;

    async fn connect(&self, addr: SocketAddr, peer_name: &str) -> Result<Connection, Self::Error> {
        self.dials.fetch_add(1, Ordering::Relaxed);
        let connecting = self
            .endpoint
            .connect_with(self.client.clone(), addr, peer_name)?;
        Ok(connecting.await?)
    }
}

/// Short Raft timeouts, so elections take a fraction of a second.
fn raft_config() -> Arc<Config> {
    let config = Config {
        heartbeat_interval: 100,
        election_timeout_min: 300,
        election_timeout_max: 600,
        ..Default::default()
    };
    Arc::new(config.validate().unwrap())
}

/// One node: its cluster handle behind its own endpoint.
pub(crate) struct TestNode {
    pub(crate) cluster: Cluster<TestDialer>,
    pub(crate) endpoint: Endpoint,
    pub(crate) member: Member,
    pub(crate) applied: watch::Receiver<Arc<ClusterConfig>>,
    pub(crate) counters: Arc<ServeCounters>,
    _dir: TempDir,
}

impl TestNode {
    /// Starts node `name`, answering on its endpoint as the node's ALPN dispatch does.
    pub(crate) async fn start(ca: &Ca, name: &str, deadlines: Deadlines) -> TestNode {
        let (endpoint, client) = ca.endpoint(name, ALPN_RAFT);
        let member = Member {
            name: name.to_owned(),
            quic_addr: endpoint.local_addr().unwrap(),
        };
        let dir = TempDir::new().unwrap();
        let dialer = TestDialer::new(&endpoint, &client);
        let (cluster, applied) =
            Cluster::start_with(member.clone(), raft_config(), dir.path(), dialer, deadlines)
                .await
                .unwrap();
        let counters = Arc::new(ServeCounters::default());
        let (accepting, serving, counting) = (endpoint.clone(), cluster.clone(), counters.clone());
        tokio::spawn(async move {
            while let Some(incoming) = accepting.accept().await {
                let (cluster, counters) = (serving.clone(), counting.clone());
                tokio::spawn(async move {
                    if let Ok(connection) = incoming.await {
                        serve_connection(cluster, connection, counters).await;
                    }
                });
            }
        });
        TestNode {
            cluster,
            endpoint,
            member,
            applied,
            counters,
            _dir: dir,
        }
    }

    /// Stops the node as the daemon does: its Raft, then its endpoint.
    pub(crate) async fn stop(&self) {
        self.cluster.shutdown().await;
        self.endpoint.close(0u32.into(), b"shutting down");
    }
}

/// The key of test service `last_octet`: 192.0.2.N:80/tcp.
pub(crate) fn service_key(last_octet: u8) -> ServiceKey {
    ServiceKey {
        vip: SocketAddr::from(([192, 0, 2, last_octet], 80)),
        proto: Proto::Tcp,
    }
}

/// Adds test service `last_octet` with one backend, 10.1.0.N:8080.
pub(crate) fn add_service(last_octet: u8) -> Command {
    Command::AddService(Service {
        key: service_key(last_octet),
        settings: ServiceSettings {
            scheduler: Scheduler::Maglev,
            timeouts: Timeouts::default(),
            toa: false,
            health: HealthCheck::None,
        },
        backends: vec![Backend {
            addr: SocketAddr::from(([10, 1, 0, last_octet], 8080)),
            weight: 1,
        }],
    })
}

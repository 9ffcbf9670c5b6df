//! What the QUIC tests share: a cluster CA, mutual-TLS endpoints on loopback, a dialer, and
//! nodes that run a [`Cluster`] behind an accept loop as the node daemon does.

#![allow(
    dead_code,
    reason = "each test binary uses its own part of these helpers"
)]

use std::error::Error;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use consensus::Command;
use consensus::config::{
    Backend, HealthCheck, Proto, Scheduler, Service, ServiceKey, ServiceSettings, Timeouts,
};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use consensus::{
    Cluster, ClusterConfig, ClusterIdentity, Deadlines, Dialer, JoinToken, Member, ServeCounters,
    serve_connection,
};
use openraft::Config;
use quinn::{Connection, Endpoint};
use tempfile::TempDir;
use tokio::sync::watch;

/// The ALPN of Raft RPCs, as the node serves them.
pub(crate) const ALPN_RAFT: &[u8] = consensus::transport::ALPN;

pub(crate) use testpki::Ca;

/// Whether a node is cut off from the others, and the connections to cut when it is.
#[derive(Clone, Default)]
pub(crate) struct Links {
    cut: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<Connection>>>,
}

impl Links {
    fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }

    fn keep(&self, connection: &Connection) {
        let mut open = self.open.lock().unwrap();
        open.retain(|c| c.close_reason().is_none());
        open.push(connection.clone());
    }
}

/// Dials with the node's endpoint, as the node does; counts its dials. A node that is cut off
/// dials nobody.
#[derive(Clone)]
pub(crate) struct TestDialer {
    endpoint: Endpoint,
    client: quinn::ClientConfig,
    links: Links,
    pub(crate) dials: Arc<AtomicUsize>,
}

impl TestDialer {
    pub(crate) fn new(endpoint: &Endpoint, client: &quinn::ClientConfig) -> TestDialer {
        Self::with_links(endpoint, client, Links::default())
    }

    /// Dials with the transport settings the node's endpoint has.
    fn with_links(endpoint: &Endpoint, client: &quinn::ClientConfig, links: Links) -> TestDialer {
        let mut client = client.clone();
        client.transport_config(Arc::new(consensus::transport::quic_transport()));
        TestDialer {
            endpoint: endpoint.clone(),
            client,
            links,
            dials: Arc::default(),
        }
    }
}

impl Dialer for TestDialer {
    type Error = Box<dyn Error + Send + Sync>;

    async fn connect(&self, addr: SocketAddr, peer_name: &str) -> Result<Connection, Self::Error> {
        self.dials.fetch_add(1, Ordering::Relaxed);
        if self.links.is_cut() {
            return Err("this node is cut off".into());
        }
        let connecting = self
            .endpoint
            .connect_with(self.client.clone(), addr, peer_name)?;
        let connection = connecting.await?;
        self.links.keep(&connection);
        Ok(connection)
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

/// The join token a test node holds, as its token file would: none until one is given.
#[derive(Clone, Default)]
pub(crate) struct TokenFile(Arc<Mutex<Option<ClusterIdentity>>>);

impl TokenFile {
    pub(crate) fn set(&self, identity: ClusterIdentity) {
        *self.0.lock().unwrap() = Some(identity);
    }

    fn source(&self) -> JoinToken {
        let file = self.clone();
        Arc::new(move || (*file.0.lock().unwrap()).ok_or_else(|| "no join token given".to_owned()))
    }
}

/// One node: its cluster handle behind its own endpoint.
pub(crate) struct TestNode {
    pub(crate) cluster: Cluster<TestDialer>,
    pub(crate) endpoint: Endpoint,
    pub(crate) member: Member,
    pub(crate) applied: watch::Receiver<Arc<ClusterConfig>>,
    pub(crate) counters: Arc<ServeCounters>,
    /// The identity of the cluster the node joins.
    pub(crate) token: TokenFile,
    deadlines: Deadlines,
    links: Links,
    dir: TempDir,
}

impl TestNode {
    /// Starts node `name`, answering on its endpoint as the node's ALPN dispatch does. It holds
    /// no join token until one is given ([`TestNode::token`], [`TestNode::join_token_of`]).
    pub(crate) async fn start(ca: &Ca, name: &str, deadlines: Deadlines) -> TestNode {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let dir = TempDir::new().unwrap();
        Self::start_in(ca, name, deadlines, socket, dir, TokenFile::default()).await
    }

    /// Starts node `name` on `socket` with the storage in `dir`, its join token in `token`.
    async fn start_in(
        ca: &Ca,
        name: &str,
        deadlines: Deadlines,
        socket: UdpSocket,
        dir: TempDir,
        token: TokenFile,
    ) -> TestNode {
        let (endpoint, client) = ca.endpoint_on(socket, name, ALPN_RAFT);
        let member = Member {
            name: name.to_owned(),
            quic_addr: endpoint.local_addr().unwrap(),
        };
        let links = Links::default();
        let dialer = TestDialer::with_links(&endpoint, &client, links.clone());
        let (cluster, applied) = Cluster::start_with(
            member.clone(),
            raft_config(),
            dir.path(),
            dialer,
            token.source(),
            deadlines,
        )
        .await
        .unwrap();
        let counters = Arc::new(ServeCounters::default());
        let (accepting, serving, counting) = (endpoint.clone(), cluster.clone(), counters.clone());
        let accepted = links.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accepting.accept().await {
                if accepted.is_cut() {
                    incoming.refuse();
                    continue;
                }
                let (cluster, counters, accepted) =
                    (serving.clone(), counting.clone(), accepted.clone());
                tokio::spawn(async move {
                    let Ok(connection) = incoming.await else {
                        return;
                    };
                    // The node's endpoint checks the peer's name once, after the handshake.
                    let Some(peer) = testpki::peer_name(&connection) else {
                        connection.close(1u32.into(), b"no node name");
                        return;
                    };
                    if let Err(refusal) = cluster.admit(&peer) {
                        connection.close(refusal.code(), refusal.to_string().as_bytes());
                        return;
                    }
                    accepted.keep(&connection);
                    serve_connection(cluster, connection, peer, counters).await;
                });
            }
        });
        TestNode {
            cluster,
            endpoint,
            member,
            applied,
            counters,
            token,
            deadlines,
            links,
            dir,
        }
    }

    /// Gives this node the join token of `member`'s cluster, as an operator copies the output
    /// of `lbcluster cluster join-token` into the joining node's token file.
    pub(crate) async fn join_token_of(&self, member: &TestNode) {
        let token = member
            .cluster
            .join_token(Duration::from_secs(10))
            .await
            .unwrap();
        self.token.set(token.parse().unwrap());
    }

    /// Stops the node as the daemon does: its Raft, then its endpoint.
    pub(crate) async fn stop(&self) {
        self.cluster.shutdown().await;
        self.endpoint.close(0u32.into(), b"shutting down");
    }

    /// Starts the node again after [`TestNode::stop`], on the same address with the same
    /// storage, as a restarted daemon would, once the old endpoint has let go of the address.
    pub(crate) async fn start_again(self, ca: &Ca) -> TestNode {
        let TestNode {
            cluster,
            endpoint,
            member,
            applied,
            counters,
            token,
            deadlines,
            links,
            dir,
        } = self;
        // Every handle on the old endpoint must go for its address to be free again.
        drop((cluster, endpoint, applied, counters, links));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let socket = loop {
            match UdpSocket::bind(member.quic_addr) {
                Ok(socket) => break socket,
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "{} stays bound: {e}",
                        member.quic_addr
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        Self::start_in(ca, &member.name, deadlines, socket, dir, token).await
    }

    /// Cuts the node off: its connections close, it dials nobody and refuses every peer, until
    /// [`TestNode::heal`].
    pub(crate) fn cut(&self) {
        self.links.cut.store(true, Ordering::SeqCst);
        for connection in self.links.open.lock().unwrap().drain(..) {
            connection.close(0u32.into(), b"cut off");
        }
    }

    pub(crate) fn heal(&self) {
        self.links.cut.store(false, Ordering::SeqCst);
    }

    /// How many of the connections the node dialled or accepted are still open.
    pub(crate) fn open_connections(&self) -> usize {
        let open = self.links.open.lock().unwrap();
        open.iter().filter(|c| c.close_reason().is_none()).count()
    }

    /// The configuration entry of this node, with local address 198.19.0.`lip`.
    pub(crate) fn config_node(&self, lip: u8) -> consensus::config::Node {
        consensus::config::Node {
            id: self.cluster.id(),
            name: self.member.name.clone(),
            quic_addr: self.member.quic_addr,
            lips: vec![[198, 19, 0, lip].into()],
            drained: false,
        }
    }
}

/// Starts a node for each of `names` and forms a cluster of them: the first initializes it
/// with test service 1, then adds each of the others (given the join token first).
pub(crate) async fn form(ca: &Ca, names: &[&str], deadlines: Deadlines) -> Vec<TestNode> {
    let mut nodes = Vec::new();
    for name in names {
        nodes.push(TestNode::start(ca, name, deadlines).await);
    }
    nodes[0]
        .cluster
        .init(nodes[0].config_node(1), vec![add_service(1)])
        .await
        .unwrap();
    for (node, lip) in nodes[1..].iter().zip(2..) {
        node.join_token_of(&nodes[0]).await;
        nodes[0]
            .cluster
            .add_node(node.config_node(lip))
            .await
            .unwrap();
    }
    nodes
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
            conn_reuse: Default::default(),
            syn_proxy: Default::default(),
            health: HealthCheck::None,
        },
        backends: vec![Backend {
            addr: SocketAddr::from(([10, 1, 0, last_octet], 8080)),
            weight: 1,
        }],
    })
}

//! Raft over real QUIC with mutual TLS: three nodes agree on the configuration and fail over
//! when the leader goes; the transport's error mapping and its handling of bad frames.

use std::collections::BTreeMap;
use std::error::Error;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use consensus::config::{
    self, Backend, HealthCheck, Proto, Scheduler, Service, ServiceKey, ServiceSettings, Settings,
    Timeouts,
};
use consensus::transport::{MAX_RPC_FRAME, RpcKind, ServeCounterValues};
use consensus::{
    ClusterConfig, Command, Dialer, Member, NodeId, QuicNetwork, Raft, ServeCounters, TypeConfig,
    serve_connection,
};
use openraft::error::{Fatal, RPCError, RaftError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::{CommittedLeaderId, Config, Entry, EntryPayload, LogId, Vote};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use tempfile::TempDir;
use tokio::sync::watch;
use tokio::task::JoinHandle;

const ALPN_RAFT: &[u8] = b"lbc-raft/1";
const TIMEOUT: Duration = Duration::from_secs(10);

/// A cluster CA; hands out node certificates with the node name as DNS SAN.
struct Ca {
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "test cluster CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        Ca {
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A QUIC endpoint on 127.0.0.1:0 for node `name`, mutual TLS with this CA, ALPN Raft.
    fn endpoint(&self, name: &str) -> (Endpoint, quinn::ClientConfig) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let chain = vec![cert.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut roots = RootCertStore::empty();
        roots.add(self.cert.clone()).unwrap();
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());

        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .unwrap();
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .unwrap();
        server.alpn_protocols = vec![ALPN_RAFT.to_vec()];
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        client.alpn_protocols = vec![ALPN_RAFT.to_vec()];

        let server =
            quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server).unwrap()));
        let endpoint =
            Endpoint::server(server, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
        let client =
            quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client).unwrap()));
        (endpoint, client)
    }
}

/// Dials with the node's endpoint, as the node does; counts its dials.
#[derive(Clone)]
struct TestDialer {
    endpoint: Endpoint,
    client: quinn::ClientConfig,
    dials: Arc<AtomicUsize>,
}

impl TestDialer {
    fn new(endpoint: &Endpoint, client: &quinn::ClientConfig) -> TestDialer {
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

/// Hands every accepted connection to `serve_connection`, as the node's ALPN dispatch does.
fn accept_loop(endpoint: Endpoint, raft: Raft, counters: Arc<ServeCounters>) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let raft = raft.clone();
            let counters = counters.clone();
            tokio::spawn(async move {
                if let Ok(connection) = incoming.await {
                    serve_connection(raft, connection, counters).await;
                }
            });
        }
    })
}

struct Node {
    raft: Raft,
    endpoint: Endpoint,
    member: Member,
    applied: watch::Receiver<Arc<ClusterConfig>>,
    counters: Arc<ServeCounters>,
    _dir: TempDir,
}

fn raft_config() -> Arc<Config> {
    let config = Config {
        heartbeat_interval: 100,
        election_timeout_min: 300,
        election_timeout_max: 600,
        ..Default::default()
    };
    Arc::new(config.validate().unwrap())
}

async fn start_node(ca: &Ca, id: NodeId) -> Node {
    let name = format!("n{id}");
    let (endpoint, client) = ca.endpoint(&name);
    let member = Member {
        name,
        quic_addr: endpoint.local_addr().unwrap(),
    };
    let dir = TempDir::new().unwrap();
    let network = QuicNetwork::new(id, TestDialer::new(&endpoint, &client));
    let (raft, applied) = consensus::start(id, raft_config(), dir.path(), network)
        .await
        .unwrap();
    let counters = Arc::new(ServeCounters::default());
    accept_loop(endpoint.clone(), raft.clone(), counters.clone());
    Node {
        raft,
        endpoint,
        member,
        applied,
        counters,
        _dir: dir,
    }
}

fn add_service(last_octet: u8) -> Command {
    Command::AddService(Service {
        key: ServiceKey {
            vip: SocketAddr::from(([192, 0, 2, last_octet], 80)),
            proto: Proto::Tcp,
        },
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

/// Waits until `node` has applied configuration version `version`.
async fn converged(node: &mut Node, version: u64) -> Arc<ClusterConfig> {
    let config = tokio::time::timeout(TIMEOUT, node.applied.wait_for(|c| c.version >= version))
        .await
        .unwrap_or_else(|_| panic!("{} does not reach version {version}", node.member))
        .unwrap()
        .clone();
    assert_eq!(config.version, version, "{}", node.member);
    config
}

async fn leader_among(nodes: &[&Node], not: Option<NodeId>) -> NodeId {
    let metrics = nodes[0]
        .raft
        .wait(Some(TIMEOUT))
        .metrics(
            |m| m.current_leader.is_some() && m.current_leader != not,
            "a leader is elected",
        )
        .await
        .unwrap();
    metrics.current_leader.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_three_nodes_over_quic_agree_and_fail_over() {
    let ca = Ca::new();
    let mut nodes: BTreeMap<NodeId, Node> = BTreeMap::new();
    for id in 1..=3 {
        nodes.insert(id, start_node(&ca, id).await);
    }
    let members = nodes
        .iter()
        .map(|(id, n)| (*id, n.member.clone()))
        .collect::<BTreeMap<_, _>>();
    nodes[&1].raft.initialize(members).await.unwrap();
    let all = nodes.values().collect::<Vec<_>>();
    let leader = leader_among(&all, None).await;

    for command in [
        add_service(1),
        add_service(2),
        Command::SetSettings(Settings {
            maglev_seed: 7,
            maglev_table_size: 251,
        }),
    ] {
        let reply = nodes[&leader].raft.client_write(command).await.unwrap();
        assert_eq!(reply.data.result, Ok(()));
    }
    let mut configs = Vec::new();
    for node in nodes.values_mut() {
        configs.push(converged(node, 3).await);
    }
    assert!(configs.iter().all(|c| *c == configs[0]));
    assert_eq!(configs[0].services.len(), 2);
    assert_eq!(configs[0].settings.maglev_table_size, 251);

    // The leader goes away: its Raft stops and its endpoint closes every connection.
    let old = nodes.remove(&leader).unwrap();
    old.raft.shutdown().await.unwrap();
    old.endpoint.close(0u32.into(), b"shutting down");
    let survivors = nodes.values().collect::<Vec<_>>();
    let new_leader = leader_among(&survivors, Some(leader)).await;
    assert_ne!(new_leader, leader);
    let reply = nodes[&new_leader]
        .raft
        .client_write(add_service(3))
        .await
        .unwrap();
    assert_eq!(reply.data.result, Ok(()));
    let mut configs = Vec::new();
    for node in nodes.values_mut() {
        configs.push(converged(node, 4).await);
    }
    assert_eq!(configs[0], configs[1]);
    assert_eq!(configs[0].services.len(), 3);

    for node in nodes.values() {
        let counters = node.counters.values();
        assert!(counters.answered > 0, "{counters:?}");
        assert_eq!((counters.malformed, counters.oversized), (0, 0));
        node.raft.shutdown().await.unwrap();
        node.endpoint.close(0u32.into(), b"done");
    }
}

fn vote_request() -> VoteRequest<NodeId> {
    VoteRequest::new(Vote::new(1, 9), None)
}

/// An append-entries request with an entry of about each of `sizes` bytes.
fn entries_of(sizes: &[usize]) -> AppendEntriesRequest<TypeConfig> {
    let entries = sizes
        .iter()
        .zip(1..)
        .map(|(&size, index)| Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 9), index),
            payload: EntryPayload::Normal(Command::AddNode(config::Node {
                id: index,
                name: "x".repeat(size),
                quic_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 7000)),
                lips: Vec::new(),
                bgp: None,
            })),
        })
        .collect();
    AppendEntriesRequest {
        vote: Vote::new_committed(1, 9),
        prev_log_id: None,
        leader_commit: None,
        entries,
    }
}

const RPC: Duration = Duration::from_millis(400);
const MIB: usize = 1 << 20;

/// A single node and a client-only endpoint with its own certificate.
async fn node_and_client(ca: &Ca) -> (Node, QuicNetwork<TestDialer>, TestDialer) {
    let node = start_node(ca, 1).await;
    let (endpoint, client) = ca.endpoint("n9");
    let dialer = TestDialer::new(&endpoint, &client);
    (node, QuicNetwork::new(9, dialer.clone()), dialer)
}

/// Writes `bytes` on a new stream and returns how the server ended it.
async fn raw_request(connection: &Connection, bytes: &[u8]) -> Result<Vec<u8>, String> {
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    send.finish().unwrap();
    recv.read_to_end(1 << 20).await.map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_bad_frames_close_only_their_stream_and_are_counted() {
    let ca = Ca::new();
    let (node, _, dialer) = node_and_client(&ca).await;
    let connection = dialer
        .connect(node.member.quic_addr, &node.member.name)
        .await
        .unwrap();

    let unknown_kind = raw_request(&connection, &[0x7f, 0, 0, 0, 1, 0xc0]).await;
    assert!(unknown_kind.unwrap_err().contains("reset by peer"));
    let mut oversized = vec![RpcKind::AppendEntries as u8];
    oversized.extend_from_slice(&(MAX_RPC_FRAME + 1).to_be_bytes());
    assert!(raw_request(&connection, &oversized).await.is_err());
    // A vote request whose payload is not MessagePack of one.
    let garbage = [RpcKind::Vote as u8, 0, 0, 0, 3, 0xc1, 0xc1, 0xc1];
    assert!(raw_request(&connection, &garbage).await.is_err());
    // The sender gives up half way.
    let truncated = [RpcKind::Vote as u8, 0, 0, 0, 9, 1, 2];
    assert!(raw_request(&connection, &truncated).await.is_err());

    // The same connection still serves a good request.
    let mut network = QuicNetwork::new(9, dialer.clone());
    let mut peer = network.new_client(1, &node.member).await;
    let vote = peer
        .vote(vote_request(), RPCOption::new(RPC))
        .await
        .unwrap();
    assert!(vote.vote_granted);
    assert!(connection.close_reason().is_none());
    assert_eq!(
        node.counters.values(),
        ServeCounterValues {
            answered: 1,
            malformed: 2,
            oversized: 1,
            abandoned: 1,
        }
    );
    node.raft.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_rpc_errors_map_to_what_openraft_expects() {
    let ca = Ca::new();
    let (node, mut network, dialer) = node_and_client(&ca).await;

    // Nothing listens: the dial does not finish in time, the peer is unreachable.
    let dead = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let nobody = Member {
        name: "n2".into(),
        quic_addr: dead.local_addr().unwrap(),
    };
    drop(dead);
    let mut peer = network.new_client(2, &nobody).await;
    let err = peer
        .vote(vote_request(), RPCOption::new(RPC))
        .await
        .unwrap_err();
    assert!(matches!(err, RPCError::Unreachable(_)), "{err}");

    // A batch of entries over the frame cap is refused before any dial: openraft is asked for
    // half as many; a single entry over the cap cannot be split, so it is unreachable.
    let dials = dialer.dials.load(Ordering::Relaxed);
    let mut peer = network.new_client(1, &node.member).await;
    let err = peer
        .append_entries(entries_of(&[MIB * 9, MIB * 9]), RPCOption::new(RPC))
        .await
        .unwrap_err();
    match err {
        RPCError::PayloadTooLarge(too_large) => assert_eq!(too_large.entries_hint(), 1),
        other => panic!("unexpected error {other}"),
    }
    let err = peer
        .append_entries(entries_of(&[MIB * 17]), RPCOption::new(RPC))
        .await
        .unwrap_err();
    assert!(matches!(err, RPCError::Unreachable(_)), "{err}");
    assert_eq!(dialer.dials.load(Ordering::Relaxed), dials);

    // The wrong name for the node at that address: TLS refuses it, the peer is unreachable.
    let impostor = Member {
        name: "n3".into(),
        ..node.member.clone()
    };
    let mut peer = network.new_client(3, &impostor).await;
    let err = peer
        .vote(vote_request(), RPCOption::new(RPC))
        .await
        .unwrap_err();
    assert!(matches!(err, RPCError::Unreachable(_)), "{err}");

    // The remote Raft's own error comes back as a `RemoteError`.
    let mut peer = network.new_client(1, &node.member).await;
    peer.vote(vote_request(), RPCOption::new(RPC))
        .await
        .unwrap();
    node.raft.shutdown().await.unwrap();
    let err = peer
        .vote(vote_request(), RPCOption::new(RPC))
        .await
        .unwrap_err();
    match err {
        RPCError::RemoteError(e) => {
            assert_eq!(e.target, 1);
            assert_eq!(e.target_node.as_ref(), Some(&node.member));
            assert!(
                matches!(e.source, RaftError::Fatal(Fatal::Stopped)),
                "{}",
                e.source
            );
        }
        other => panic!("unexpected error {other}"),
    }
    let dials = dialer.dials.load(Ordering::Relaxed);

    // A peer that takes requests but never answers: each RPC times out; after three in a row
    // the client drops the connection and dials again.
    node.endpoint.close(0u32.into(), b"replaced");
    let (silent, _) = ca.endpoint("n4");
    let silent_member = Member {
        name: "n4".into(),
        quic_addr: silent.local_addr().unwrap(),
    };
    tokio::spawn(async move {
        while let Some(incoming) = silent.accept().await {
            tokio::spawn(async move {
                let connection = incoming.await.unwrap();
                let mut held = Vec::new();
                while let Ok(stream) = connection.accept_bi().await {
                    held.push(stream);
                }
            });
        }
    });
    let mut peer = network.new_client(4, &silent_member).await;
    for _ in 0..3 {
        let err = peer
            .vote(vote_request(), RPCOption::new(RPC))
            .await
            .unwrap_err();
        assert!(matches!(err, RPCError::Timeout(_)), "{err}");
    }
    assert_eq!(dialer.dials.load(Ordering::Relaxed), dials + 1);
    let _ = peer.vote(vote_request(), RPCOption::new(RPC)).await;
    assert_eq!(dialer.dials.load(Ordering::Relaxed), dials + 2);
}

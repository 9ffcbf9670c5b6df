//! Raft over real QUIC with mutual TLS: three nodes agree on the configuration (and, formed
//! without `init` as an earlier version did, get an identity from their leader) and fail over
//! when the leader goes; the transport's error mapping and its handling of bad frames.

mod common;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Ca, TestDialer, TestNode, add_service};
use consensus::config::{self, Settings};
use consensus::transport::{MAX_FORWARD_FRAME, MAX_RPC_FRAME, RpcKind, ServeCounterValues};
use consensus::{
    ClusterConfig, ClusterIdentity, Command, Deadlines, Dialer, Member, NodeId, NodeReport,
    QuicNetwork, Role, TypeConfig, node_id,
};
use openraft::error::{Fatal, RPCError, RaftError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};
use quinn::Connection;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Waits until `node` has applied configuration version `version`.
async fn converged(node: &mut TestNode, version: u64) -> Arc<ClusterConfig> {
    let config = tokio::time::timeout(TIMEOUT, node.applied.wait_for(|c| c.version >= version))
        .await
        .unwrap_or_else(|_| panic!("{} does not reach version {version}", node.member))
        .unwrap()
        .clone();
    assert_eq!(config.version, version, "{}", node.member);
    config
}

async fn leader_among(nodes: &[&TestNode], not: Option<NodeId>) -> NodeId {
    let metrics = nodes[0]
        .cluster
        .raft()
        .wait(Some(TIMEOUT))
        .metrics(
            |m| m.current_leader.is_some() && m.current_leader != not,
            "a leader is elected",
        )
        .await
        .unwrap();
    metrics.current_leader.unwrap()
}

/// A join token for tests.
fn token() -> ClusterIdentity {
    format!("{}.{}", "1d".repeat(16), "5e".repeat(16))
        .parse()
        .unwrap()
}

/// The cluster is formed with openraft's own `initialize`, as a cluster of an earlier version
/// was: without an identity. Its leader gives it one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_three_nodes_over_quic_agree_and_fail_over() {
    let ca = Ca::new();
    let mut nodes: BTreeMap<NodeId, TestNode> = BTreeMap::new();
    for name in ["n1", "n2", "n3"] {
        let node = TestNode::start(&ca, name, Deadlines::default()).await;
        // Not joined yet, they answer only a cluster whose identity they hold.
        node.token.set(token());
        nodes.insert(node.cluster.id(), node);
    }
    let members = nodes
        .iter()
        .map(|(id, n)| (*id, n.member.clone()))
        .collect::<BTreeMap<_, _>>();
    let first = node_id("n1");
    nodes[&first]
        .cluster
        .raft()
        .initialize(members)
        .await
        .unwrap();
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
        let reply = nodes[&leader]
            .cluster
            .raft()
            .client_write(command)
            .await
            .unwrap();
        assert_eq!(reply.data.result, Ok(()));
    }
    // The three commands and the identity the leader committed.
    let mut configs = Vec::new();
    for node in nodes.values_mut() {
        configs.push(converged(node, 4).await);
    }
    assert!(configs.iter().all(|c| *c == configs[0]));
    assert_eq!(configs[0].services.len(), 2);
    assert_eq!(configs[0].settings.maglev_table_size, 251);
    let identity = configs[0]
        .identity
        .expect("the leader gave the cluster an identity");
    assert_ne!(identity.id, token().id, "a new one, not a join token");

    // The leader goes away: its Raft stops and its endpoint closes every connection.
    let old = nodes.remove(&leader).unwrap();
    old.stop().await;
    let survivors = nodes.values().collect::<Vec<_>>();
    let new_leader = leader_among(&survivors, Some(leader)).await;
    assert_ne!(new_leader, leader);
    let reply = nodes[&new_leader]
        .cluster
        .raft()
        .client_write(add_service(3))
        .await
        .unwrap();
    assert_eq!(reply.data.result, Ok(()));
    let mut configs = Vec::new();
    for node in nodes.values_mut() {
        configs.push(converged(node, 5).await);
    }
    assert_eq!(configs[0], configs[1]);
    assert_eq!(configs[0].services.len(), 3);
    assert_eq!(configs[0].identity, Some(identity), "it never changes");

    for node in nodes.values() {
        let counters = node.counters.values();
        assert!(counters.answered > 0, "{counters:?}");
        assert_eq!((counters.malformed, counters.oversized), (0, 0));
        node.stop().await;
    }
}

/// A vote request of the client node n9.
fn vote_request() -> VoteRequest<NodeId> {
    VoteRequest::new(Vote::new(1, node_id("n9")), None)
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
                drained: false,
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

/// A single node that holds [`token`] and a client-only endpoint n9 with its own certificate
/// whose requests carry it.
async fn node_and_client(ca: &Ca) -> (TestNode, QuicNetwork<TestDialer>, TestDialer) {
    let node = TestNode::start(ca, "n1", Deadlines::default()).await;
    node.token.set(token());
    let (endpoint, client) = ca.endpoint("n9", common::ALPN_RAFT);
    let dialer = TestDialer::new(&endpoint, &client);
    (node, client_network(&dialer, Some(token())), dialer)
}

/// The Raft network of client n9, its requests carrying `identity`.
fn client_network(
    dialer: &TestDialer,
    identity: Option<ClusterIdentity>,
) -> QuicNetwork<TestDialer> {
    QuicNetwork::new(node_id("n9"), dialer.clone(), Arc::new(move || identity))
}

/// A raw request: `kind`, [`token`]'s identity, then `rest` (length and payload).
fn request(kind: RpcKind, rest: &[u8]) -> Vec<u8> {
    let mut bytes = vec![kind as u8];
    bytes.extend_from_slice(&token().to_bytes());
    bytes.extend_from_slice(rest);
    bytes
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
    let oversized = request(RpcKind::AppendEntries, &(MAX_RPC_FRAME + 1).to_be_bytes());
    assert!(raw_request(&connection, &oversized).await.is_err());
    // A vote request whose payload is not MessagePack of one.
    let garbage = request(RpcKind::Vote, &[0, 0, 0, 3, 0xc1, 0xc1, 0xc1]);
    assert!(raw_request(&connection, &garbage).await.is_err());
    // The sender gives up half way, in the payload and in the identity.
    let truncated = request(RpcKind::Vote, &[0, 0, 0, 9, 1, 2]);
    assert!(raw_request(&connection, &truncated).await.is_err());
    assert!(raw_request(&connection, &truncated[..20]).await.is_err());
    // A forwarded request that is MessagePack `nil`, not a request; one over its 1 MiB cap.
    let not_a_request = request(RpcKind::Forward, &[0, 0, 0, 1, 0xc0]);
    assert!(raw_request(&connection, &not_a_request).await.is_err());
    let oversized = request(RpcKind::Forward, &(MAX_FORWARD_FRAME + 1).to_be_bytes());
    assert!(raw_request(&connection, &oversized).await.is_err());
    // A report request carries `nil`, nothing else.
    let bad_report = request(RpcKind::Report, &[0, 0, 0, 1, 0x01]);
    assert!(raw_request(&connection, &bad_report).await.is_err());

    // The same connection still serves good requests.
    let report = raw_request(&connection, &request(RpcKind::Report, &[0, 0, 0, 1, 0xc0]))
        .await
        .unwrap();
    let report: NodeReport = rmp_serde::from_slice(&report[4..]).unwrap();
    assert_eq!((report.id, report.name.as_str()), (node_id("n1"), "n1"));
    assert_eq!(report.role, Some(Role::Learner));
    let mut network = client_network(&dialer, Some(token()));
    let mut peer = network.new_client(node_id("n1"), &node.member).await;
    let vote = peer
        .vote(vote_request(), RPCOption::new(RPC))
        .await
        .unwrap();
    assert!(vote.vote_granted);
    assert!(connection.close_reason().is_none());
    assert_eq!(
        node.counters.values(),
        ServeCounterValues {
            answered: 2,
            malformed: 4,
            oversized: 2,
            abandoned: 2,
            refused: 0,
            revoked: 0,
        }
    );
    node.stop().await;
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
    let mut peer = network.new_client(node_id("n1"), &node.member).await;
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
    let mut peer = network.new_client(node_id("n1"), &node.member).await;
    peer.vote(vote_request(), RPCOption::new(RPC))
        .await
        .unwrap();
    node.cluster.raft().shutdown().await.unwrap();
    let err = peer
        .vote(vote_request(), RPCOption::new(RPC))
        .await
        .unwrap_err();
    match err {
        RPCError::RemoteError(e) => {
            assert_eq!(e.target, node_id("n1"));
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
    let (silent, _) = ca.endpoint("n4", common::ALPN_RAFT);
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

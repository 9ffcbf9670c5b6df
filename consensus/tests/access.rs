//! Whom a node answers, over real QUIC with mutual TLS: a removed node is refused at once and
//! cut off; a joining node refuses a foreign cluster (same CA, same node names) and stays
//! joinable by its own; refused requests close their connection with a reason.

mod common;

use std::time::Duration;

use common::{Ca, TestDialer, TestNode, add_service, form, service_key};
use consensus::transport::{CLOSE_IMPERSONATION, CLOSE_WRONG_CLUSTER, RpcKind};
use consensus::{ClusterError, ClusterIdentity, Deadlines, Dialer, NodeId, node_id};
use openraft::Vote;
use openraft::raft::VoteRequest;
use quinn::ConnectionError;
use tokio::time::Instant;

const READ: Duration = Duration::from_secs(3);
const DEADLINES: Deadlines = Deadlines {
    write: Duration::from_secs(3),
    catch_up: Duration::from_secs(3),
};
/// A bound for what happens within milliseconds.
const SOON: Duration = Duration::from_secs(5);

/// Waits (at most [`SOON`]) until `check` holds.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + SOON;
    while !check() {
        assert!(Instant::now() < deadline, "not within {SOON:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_a_removed_node_is_refused_at_once_and_cut_off() {
    let ca = Ca::new();
    let nodes = form(&ca, &["n1", "n2", "n3", "n4"], DEADLINES).await;
    let (members, removed) = (&nodes[..3], &nodes[3]);
    // n4 has connections to every member: a write it forwards, and its reports.
    let version = removed.cluster.write(add_service(2)).await.unwrap();
    let reports = removed.cluster.reports(READ).await;
    assert!(reports.iter().all(|r| r.reachable), "{reports:?}");

    let removal = members[1].cluster.remove_node(removed.cluster.id()).await;
    assert_eq!(removal, Ok(version + 1));
    let returned = Instant::now();
    let err = removed.cluster.write(add_service(3)).await.unwrap_err();
    let took = returned.elapsed();
    match &err {
        ClusterError::Refused { reason } => assert!(
            reason.contains("refuses node n4: it is not a member of"),
            "{reason}"
        ),
        other => panic!("not refused: {other}"),
    }
    assert!(took < Duration::from_secs(1), "refused only after {took:?}");
    let read = removed.cluster.read(READ).await;
    assert!(
        matches!(read, Err(ClusterError::Refused { .. })),
        "{read:?}"
    );

    // Nothing it sent after its removal changed the cluster.
    for node in members {
        let config = node.cluster.read(READ).await.unwrap();
        assert_eq!(config.version, version + 1, "{}", node.member);
        assert!(config.service(&service_key(3)).is_err());
    }
    // Every member closed the connection it served for n4, and n4 has none left open.
    for node in members {
        eventually("the member closed n4's connection", || {
            node.counters.values().revoked >= 1
        })
        .await;
    }
    eventually("n4's connections are closed", || {
        removed.open_connections() == 0
    })
    .await;
    // Its later requests are refused too; the members carry on.
    assert!(members[2].cluster.write(add_service(4)).await.is_ok());
    for node in &nodes {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_a_joining_node_refuses_a_foreign_cluster_and_joins_its_own() {
    let ca = Ca::new();
    // Two clusters under the same CA, each with a node named n1.
    let ours = form(&ca, &["n1"], DEADLINES).await;
    let foreign = form(&ca, &["n1"], DEADLINES).await;
    let id = |node: &TestNode| node.cluster.local_config().identity.unwrap().id;
    let (our_id, their_id) = (id(&ours[0]), id(&foreign[0]));
    assert_ne!(our_id, their_id);
    let joining = TestNode::start(&ca, "n2", DEADLINES).await;
    joining.join_token_of(&ours[0]).await;

    let started = Instant::now();
    let err = foreign[0]
        .cluster
        .add_node(joining.config_node(2))
        .await
        .unwrap_err();
    match &err {
        ClusterError::CatchUp {
            name,
            refused: Some(reason),
            ..
        } => {
            assert_eq!(name, "n2");
            assert_eq!(
                reason,
                &format!(
                    "n2 refuses a request from node n1 of cluster {their_id}: n2 is joining \
                     cluster {our_id}"
                )
            );
        }
        other => panic!("not refused: {other}"),
    }
    assert!(err.to_string().contains("join token"), "{err}");
    assert!(
        started.elapsed() < DEADLINES.catch_up,
        "the refusal ends the attempt early"
    );
    // Nothing of the foreign cluster reached the joining node's Raft.
    assert!(!joining.cluster.raft().is_initialized().await.unwrap());
    {
        let metrics = joining.cluster.raft().metrics().borrow().clone();
        assert_eq!(metrics.vote, Vote::default());
        assert_eq!(metrics.current_term, 0);
        assert_eq!(metrics.last_log_index, None);
    }
    assert!(joining.counters.values().refused >= 1);

    // Its own cluster adds it: identity, n1, service 1, then n2.
    assert_eq!(
        ours[0].cluster.add_node(joining.config_node(2)).await,
        Ok(4)
    );
    let config = joining.cluster.read(READ).await.unwrap();
    assert_eq!(config.identity.map(|i| i.id), Some(our_id));
    assert_eq!(config.nodes.len(), 2);
    // Joined, it refuses the foreign n1 although our cluster has a node of that name.
    let refused = joining.counters.values().refused;
    let reports = foreign[0].cluster.reports(READ).await;
    let row = reports.iter().find(|r| r.name == "n2").unwrap();
    assert!(!row.reachable, "{row:?}");
    assert!(joining.counters.values().refused > refused);
    for node in ours.iter().chain(&foreign).chain([&joining]) {
        node.stop().await;
    }
}

/// A vote request in the name of node `candidate`.
fn vote(candidate: NodeId) -> Vec<u8> {
    let request = VoteRequest::new(Vote::new(1, candidate), None);
    let payload = rmp_serde::to_vec_named(&request).unwrap();
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&payload);
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_refused_requests_close_the_connection_with_their_reason() {
    let ca = Ca::new();
    let node = TestNode::start(&ca, "n1", DEADLINES).await;
    let (endpoint, client) = ca.endpoint("n9", common::ALPN_RAFT);
    let dialer = TestDialer::new(&endpoint, &client);

    // Without a join token, a node not yet joined refuses at the handshake.
    let connection = dialer.connect(node.member.quic_addr, "n1").await.unwrap();
    let closed = connection.closed().await;
    let expected = "n1 has not joined a cluster and answers none without a join token: no join \
                    token given";
    match &closed {
        ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, CLOSE_WRONG_CLUSTER);
            assert_eq!(&close.reason[..], expected.as_bytes());
        }
        other => panic!("unexpected close: {other}"),
    }

    let token: ClusterIdentity = format!("{}.{}", "1d".repeat(16), "5e".repeat(16))
        .parse()
        .unwrap();
    node.token.set(token);
    let wrong_secret: ClusterIdentity = format!("{}.{}", "1d".repeat(16), "5f".repeat(16))
        .parse()
        .unwrap();
    let cases = [
        (
            [0; 32],
            vote(node_id("n9")),
            CLOSE_WRONG_CLUSTER,
            format!(
                "n1 refuses a request from node n9 that names no cluster: n1 is joining cluster {}",
                token.id
            ),
        ),
        (
            wrong_secret.to_bytes(),
            vote(node_id("n9")),
            CLOSE_WRONG_CLUSTER,
            format!(
                "n1 refuses a request from node n9: a wrong secret for cluster {}",
                token.id
            ),
        ),
        (
            token.to_bytes(),
            vote(7),
            CLOSE_IMPERSONATION,
            "n1 refuses node n9: its Vote request is in the name of node 7".to_owned(),
        ),
    ];
    for (identity, frame, code, reason) in cases {
        let connection = dialer.connect(node.member.quic_addr, "n1").await.unwrap();
        let (mut send, mut recv) = connection.open_bi().await.unwrap();
        send.write_all(&[RpcKind::Vote as u8]).await.unwrap();
        send.write_all(&identity).await.unwrap();
        send.write_all(&frame).await.unwrap();
        send.finish().unwrap();
        assert!(recv.read_to_end(1 << 10).await.is_err());
        match connection.closed().await {
            ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code, code, "{reason}");
                assert_eq!(String::from_utf8_lossy(&close.reason), reason);
            }
            other => panic!("unexpected close: {other}"),
        }
    }
    let counters = node.counters.values();
    assert_eq!((counters.refused, counters.answered), (3, 0));
    // None of it reached the Raft.
    assert_eq!(node.cluster.raft().metrics().borrow().vote, Vote::default());
    node.stop().await;
}

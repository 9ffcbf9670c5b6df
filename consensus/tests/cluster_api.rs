//! The `Cluster` handle over real QUIC with mutual TLS: a cluster formed by `init` and
//! `add_node`, writes and linearizable reads through any node, rejections, failover, removing
//! the leader, reports, and no quorum.

mod common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Ca, TestNode, add_service, service_key};
use consensus::config;
use consensus::{ClusterError, ConfigError, Deadlines, NodeId, Role, node_id};
use openraft::ServerState;
use tokio::task::JoinHandle;
use tokio::time::Instant;

const TIMEOUT: Duration = Duration::from_secs(10);
const READ: Duration = Duration::from_secs(3);
const DEADLINES: Deadlines = Deadlines {
    write: Duration::from_secs(3),
    catch_up: Duration::from_secs(3),
};

/// The configuration entry of a node named `name` at `addr` with local address 198.19.0.`lip`.
fn config_node(name: &str, addr: SocketAddr, lip: u8) -> config::Node {
    config::Node {
        id: node_id(name),
        name: name.to_owned(),
        quic_addr: addr,
        lips: vec![[198, 19, 0, lip].into()],
        drained: false,
    }
}

fn node_of(node: &TestNode, lip: u8) -> config::Node {
    config_node(&node.member.name, node.member.quic_addr, lip)
}

/// The configuration version of [`three_nodes`]: the identity, three nodes and a service.
const FORMED: u64 = 5;

/// Three nodes: n1 initializes the cluster with one service, n1 adds n2, n2 (a follower, so
/// the request is forwarded) adds n3, each given the cluster's join token first. The
/// configuration is then at version [`FORMED`].
async fn three_nodes(ca: &Ca, deadlines: Deadlines) -> Vec<TestNode> {
    let mut nodes = Vec::new();
    for name in ["n1", "n2", "n3"] {
        nodes.push(TestNode::start(ca, name, deadlines).await);
    }
    let version = nodes[0]
        .cluster
        .init(node_of(&nodes[0], 1), vec![add_service(1)])
        .await
        .unwrap();
    assert_eq!(version, 3);
    for node in &nodes[1..] {
        node.join_token_of(&nodes[0]).await;
    }
    assert_eq!(
        nodes[0].cluster.add_node(node_of(&nodes[1], 2)).await,
        Ok(4)
    );
    assert_eq!(
        nodes[1].cluster.add_node(node_of(&nodes[2], 3)).await,
        Ok(FORMED)
    );
    nodes
}

/// The node among `nodes` that leads, once one does.
async fn leader<'a>(nodes: &[&'a TestNode]) -> &'a TestNode {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(node) = nodes
            .iter()
            .find(|n| n.cluster.raft().metrics().borrow().state == ServerState::Leader)
        {
            return node;
        }
        assert!(Instant::now() < deadline, "no leader among the nodes");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn voters(node: &TestNode) -> BTreeSet<NodeId> {
    let metrics = node.cluster.raft().metrics();
    let metrics = metrics.borrow();
    metrics.membership_config.membership().voter_ids().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_form_write_read_and_reject_through_any_node() {
    let ca = Ca::new();
    let nodes = three_nodes(&ca, DEADLINES).await;
    let ids = nodes
        .iter()
        .map(|n| n.cluster.id())
        .collect::<BTreeSet<_>>();

    // All three are voters, and every node reads the same configuration.
    let mut configs = Vec::new();
    for node in &nodes {
        configs.push(node.cluster.read(READ).await.unwrap());
        assert_eq!(voters(node), ids, "{}", node.member);
    }
    assert!(configs.iter().all(|c| *c == configs[0]));
    assert_eq!(configs[0].version, FORMED);
    assert_eq!(
        configs[0].nodes.keys().copied().collect::<BTreeSet<_>>(),
        ids
    );
    assert_eq!(configs[0].services.len(), 1);

    // A write through a follower is forwarded and applied there before it returns.
    let all = nodes.iter().collect::<Vec<_>>();
    let leader_id = leader(&all).await.cluster.id();
    let followers = nodes
        .iter()
        .filter(|n| n.cluster.id() != leader_id)
        .collect::<Vec<_>>();
    let version = followers[0].cluster.write(add_service(2)).await.unwrap();
    assert_eq!(version, FORMED + 1);
    let local = followers[0].cluster.local_config();
    assert_eq!(local.version, FORMED + 1);
    assert!(local.service(&service_key(2)).is_ok());
    // ... and a linearizable read on the other follower sees it.
    let read = followers[1].cluster.read(READ).await.unwrap();
    assert_eq!(read.version, FORMED + 1);
    assert!(read.service(&service_key(2)).is_ok());

    // Invalid commands are rejected on every node and change nothing anywhere.
    let stranger = config_node("n4", SocketAddr::from((Ipv4Addr::LOCALHOST, 1)), 1);
    for node in &nodes {
        assert_eq!(
            node.cluster.write(add_service(2)).await,
            Err(ClusterError::Rejected(ConfigError::DuplicateService {
                key: service_key(2)
            })),
            "{}",
            node.member
        );
        assert_eq!(
            node.cluster.add_node(stranger.clone()).await,
            Err(ClusterError::Rejected(ConfigError::LipOverlap {
                lip: [198, 19, 0, 1].into(),
                owner: "n1".into()
            })),
            "{}",
            node.member
        );
    }
    // Two nodes add the same service at once: both pass their local check, one is applied and
    // the other rejected (locally or when the leader applies it).
    let (a, b) = tokio::join!(
        followers[0].cluster.write(add_service(3)),
        followers[1].cluster.write(add_service(3)),
    );
    let mut outcomes = [a, b];
    outcomes.sort_by_key(Result::is_err);
    assert_eq!(outcomes[0], Ok(FORMED + 2));
    assert_eq!(
        outcomes[1],
        Err(ClusterError::Rejected(ConfigError::DuplicateService {
            key: service_key(3)
        }))
    );
    for node in &nodes {
        assert_eq!(node.cluster.read(READ).await.unwrap().version, FORMED + 2);
    }

    // Membership checks: members yes, strangers no; a node never added admits nobody until it
    // has a join token, then anybody at the handshake (its requests must carry the token).
    for node in &nodes {
        for name in ["n1", "n2", "n3"] {
            assert!(node.cluster.is_member(name), "{name} on {}", node.member);
            assert_eq!(node.cluster.admit(name), Ok(()));
        }
        assert!(!node.cluster.is_member("n4"), "{}", node.member);
        assert!(node.cluster.admit("n4").is_err(), "{}", node.member);
    }
    let fresh = TestNode::start(&ca, "n4", DEADLINES).await;
    assert!(!fresh.cluster.is_member("anyone"));
    let refused = fresh.cluster.admit("anyone").unwrap_err();
    assert_eq!(
        refused.to_string(),
        "n4 has not joined a cluster and answers none without a join token: no join token given"
    );
    fresh.join_token_of(&nodes[0]).await;
    assert_eq!(fresh.cluster.admit("anyone"), Ok(()));
    assert_eq!(
        fresh.cluster.write(add_service(4)).await,
        Err(ClusterError::NotInitialized)
    );
    assert_eq!(
        fresh.cluster.read(READ).await,
        Err(ClusterError::NotInitialized)
    );
    assert_eq!(
        nodes[0]
            .cluster
            .init(node_of(&nodes[0], 1), Vec::new())
            .await,
        Err(ClusterError::AlreadyInitialized)
    );

    // Reports: every node answers; one leads; all agree on the configuration version.
    let reports = followers[0].cluster.reports(READ).await;
    assert_eq!(reports.iter().map(|r| r.id).collect::<BTreeSet<_>>(), ids);
    assert!(reports.windows(2).all(|w| w[0].id < w[1].id));
    for report in &reports {
        assert!(report.reachable && report.voter, "{report:?}");
        assert_eq!(report.config_version, Some(FORMED + 2), "{report:?}");
        assert_eq!(report.leader, Some(leader_id), "{report:?}");
        assert!(
            report.applied.is_some() && report.committed.is_some(),
            "{report:?}"
        );
    }
    let leaders = reports.iter().filter(|r| r.role == Some(Role::Leader));
    assert_eq!(leaders.map(|r| r.id).collect::<Vec<_>>(), vec![leader_id]);

    // Every node published what it applied, and its RPCs were all well formed.
    for node in &nodes {
        assert_eq!(node.applied.borrow().version, FORMED + 2, "{}", node.member);
        let counters = node.counters.values();
        assert!(counters.answered > 0, "{counters:?}");
        assert_eq!((counters.malformed, counters.oversized), (0, 0));
    }
    fresh.stop().await;
    for node in &nodes {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_leader_failure_then_writes_and_reports_through_a_survivor() {
    let ca = Ca::new();
    let nodes = three_nodes(&ca, DEADLINES).await;
    let all = nodes.iter().collect::<Vec<_>>();
    let old = leader(&all).await;
    old.stop().await;
    let survivors = nodes
        .iter()
        .filter(|n| n.cluster.id() != old.cluster.id())
        .collect::<Vec<_>>();

    // The survivor forwards to the new leader once one is elected (within the write deadline).
    assert_eq!(
        survivors[0].cluster.write(add_service(2)).await,
        Ok(FORMED + 1)
    );
    assert_eq!(
        survivors[1].cluster.read(READ).await.unwrap().version,
        FORMED + 1
    );

    let reports = survivors[0]
        .cluster
        .reports(Duration::from_millis(500))
        .await;
    assert_eq!(reports.len(), 3);
    for report in reports {
        if report.id == old.cluster.id() {
            assert!(!report.reachable, "{report:?}");
            assert_eq!(
                (
                    report.role,
                    report.term,
                    report.applied,
                    report.config_version
                ),
                (None, None, None, None)
            );
            assert_eq!(report.name, old.member.name);
        } else {
            assert!(report.reachable, "{report:?}");
            assert!(matches!(report.role, Some(Role::Leader | Role::Follower)));
            assert!(
                report.term.is_some() && report.applied.is_some(),
                "{report:?}"
            );
            assert_eq!(report.config_version, Some(FORMED + 1));
        }
    }
    for node in survivors {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_the_leader_removes_itself() {
    let ca = Ca::new();
    let nodes = three_nodes(&ca, DEADLINES).await;
    let all = nodes.iter().collect::<Vec<_>>();
    let old = leader(&all).await;
    let old_id = old.cluster.id();

    assert_eq!(old.cluster.remove_node(old_id).await, Ok(FORMED + 1));

    let rest = nodes
        .iter()
        .filter(|n| n.cluster.id() != old_id)
        .collect::<Vec<_>>();
    let new = leader(&rest).await;
    assert_ne!(new.cluster.id(), old_id);
    let remaining = rest.iter().map(|n| n.cluster.id()).collect::<BTreeSet<_>>();
    for node in &rest {
        let config = node.cluster.read(READ).await.unwrap();
        assert_eq!(config.version, FORMED + 1);
        assert_eq!(
            config.nodes.keys().copied().collect::<BTreeSet<_>>(),
            remaining
        );
        assert_eq!(voters(node), remaining);
        assert!(!node.cluster.is_member(&old.member.name));
    }
    // The cluster goes on without it.
    assert_eq!(rest[0].cluster.write(add_service(2)).await, Ok(FORMED + 2));
    for node in &nodes {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_a_node_that_does_not_catch_up_and_no_quorum() {
    let ca = Ca::new();
    let deadlines = Deadlines {
        write: Duration::from_millis(1500),
        catch_up: Duration::from_millis(1000),
    };
    let nodes = three_nodes(&ca, deadlines).await;

    // A node that is not running: it is in the configuration and a learner, not a voter.
    let dead = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let ghost = config_node("ghost", dead.local_addr().unwrap(), 9);
    drop(dead);
    let err = nodes[1].cluster.add_node(ghost.clone()).await.unwrap_err();
    match &err {
        ClusterError::CatchUp { name, .. } => assert_eq!(name, "ghost"),
        other => panic!("unexpected error {other}"),
    }
    assert!(err.to_string().contains("learner"), "{err}");
    let config = nodes[2].cluster.read(READ).await.unwrap();
    assert_eq!(config.nodes.get(&ghost.id), Some(&ghost));
    assert!(!voters(&nodes[2]).contains(&ghost.id));
    assert!(nodes[2].cluster.is_member("ghost"));
    // Removing it takes it out of both.
    assert_eq!(nodes[2].cluster.remove_node(ghost.id).await, Ok(FORMED + 2));
    assert!(!nodes[2].cluster.is_member("ghost"));
    assert_eq!(
        nodes[2].cluster.remove_node(ghost.id).await,
        Err(ClusterError::Rejected(ConfigError::UnknownNode {
            id: ghost.id
        }))
    );

    // Two of three stop: the survivor (a follower) can neither write nor read.
    let all = nodes.iter().collect::<Vec<_>>();
    let leader_id = leader(&all).await.cluster.id();
    let survivor = nodes.iter().find(|n| n.cluster.id() != leader_id).unwrap();
    for node in &nodes {
        if node.cluster.id() != survivor.cluster.id() {
            node.stop().await;
        }
    }
    let started = Instant::now();
    let err = survivor.cluster.write(add_service(2)).await.unwrap_err();
    assert!(matches!(err, ClusterError::NoQuorum { .. }), "{err}");
    assert!(err.to_string().contains("may still be applied"), "{err}");
    let err = survivor
        .cluster
        .read(Duration::from_millis(1000))
        .await
        .unwrap_err();
    assert!(matches!(err, ClusterError::NoQuorum { .. }), "{err}");
    assert!(started.elapsed() < TIMEOUT);
    survivor.stop().await;
}

/// Records every (role, term) a node's Raft reports, from its start to [`Roles::stop`].
struct Roles {
    seen: Arc<Mutex<Vec<(ServerState, u64)>>>,
    task: JoinHandle<()>,
}

impl Roles {
    fn record(node: &TestNode) -> Roles {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut metrics = node.cluster.raft().metrics();
        let record = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let now = {
                    let m = metrics.borrow_and_update();
                    (m.state, m.current_term)
                };
                {
                    let mut seen = record.lock().unwrap();
                    if seen.last() != Some(&now) {
                        seen.push(now);
                    }
                }
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        });
        Roles { seen, task }
    }

    fn stop(self) -> Vec<(ServerState, u64)> {
        self.task.abort();
        self.seen.lock().unwrap().clone()
    }
}

/// Waits until `node` follows `leader` and has applied all `leader` has; returns how long that
/// took.
async fn caught_up(node: &TestNode, leader: &TestNode) -> Duration {
    let started = Instant::now();
    let leader_id = leader.cluster.id();
    loop {
        let applied = leader.cluster.raft().metrics().borrow().last_applied;
        let m = node.cluster.raft().metrics().borrow().clone();
        if m.current_leader == Some(leader_id) && m.last_applied >= applied {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < TIMEOUT,
            "{} did not catch up with {}",
            node.member.name,
            leader.member.name
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_the_leader_steps_down_and_the_node_it_names_leads() {
    let ca = Ca::new();
    let nodes = three_nodes(&ca, DEADLINES).await;
    let all = nodes.iter().collect::<Vec<_>>();
    let first = leader(&all).await;
    let follower = all
        .iter()
        .find(|n| n.cluster.id() != first.cluster.id())
        .unwrap();

    // A follower has nothing to hand over.
    assert_eq!(follower.cluster.step_down(TIMEOUT).await, Ok(None));

    // Hand over again and again: each time the node named is the one that leads, and it keeps
    // leading (nobody else campaigns meanwhile).
    let mut version = FORMED;
    for _ in 0..6 {
        let old = leader(&all).await;
        let term = old.cluster.raft().metrics().borrow().current_term;
        let named = old.cluster.step_down(TIMEOUT).await.unwrap().unwrap();
        assert_ne!(named, old.cluster.id());
        let new = all.iter().find(|n| n.cluster.id() == named).unwrap();
        let roles = Roles::record(new);
        assert_eq!(
            new.cluster.raft().metrics().borrow().state,
            ServerState::Leader,
            "the node named leads when step_down returns"
        );
        assert_ne!(
            old.cluster.raft().metrics().borrow().state,
            ServerState::Leader
        );
        let new_term = new.cluster.raft().metrics().borrow().current_term;
        assert!(new_term > term);
        // The old leader takes part again: writes through it commit.
        version += 1;
        assert_eq!(
            old.cluster.write(add_service(version as u8)).await,
            Ok(version)
        );
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(
            roles.stop(),
            vec![(ServerState::Leader, new_term)],
            "{} kept leading in its term",
            new.member.name
        );
    }
    for node in &nodes {
        assert_eq!(voters(node).len(), 3);
        let config = node.cluster.read(READ).await.unwrap();
        assert_eq!(config.version, version);
    }
    for node in &nodes {
        node.stop().await;
    }
}

/// A follower cut off for seconds (many election timeouts) comes back without an election: it
/// never campaigned (pre-vote), so the leader keeps its term and leadership.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_a_node_cut_off_comes_back_without_deposing_the_leader() {
    let ca = Ca::new();
    let nodes = three_nodes(&ca, DEADLINES).await;
    let all = nodes.iter().collect::<Vec<_>>();
    let lead = leader(&all).await;
    let cut = all
        .iter()
        .find(|n| n.cluster.id() != lead.cluster.id())
        .unwrap();
    let term = lead.cluster.raft().metrics().borrow().current_term;
    let leader_roles = Roles::record(lead);
    let cut_roles = Roles::record(cut);

    cut.cut();
    tokio::time::sleep(Duration::from_secs(4)).await;
    // The others carry on meanwhile.
    assert_eq!(lead.cluster.write(add_service(5)).await, Ok(FORMED + 1));
    cut.heal();
    let took = caught_up(cut, lead).await;
    assert!(took < Duration::from_secs(2), "caught up after {took:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;

    assert_eq!(leader_roles.stop(), vec![(ServerState::Leader, term)]);
    let cut_roles = cut_roles.stop();
    assert!(
        cut_roles
            .iter()
            .all(|&(state, t)| state == ServerState::Follower && t == term),
        "the cut-off node campaigned: {cut_roles:?}"
    );
    for node in &nodes {
        node.stop().await;
    }
}

/// A node restarted seconds after it stopped — the leader, so the others elect meanwhile, and
/// their dials to it start while it is down — follows the new leader within two seconds of its
/// start, without an election.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_a_restarted_leader_rejoins_without_an_election() {
    let ca = Ca::new();
    let mut nodes = three_nodes(&ca, DEADLINES).await;
    let old = {
        let all = nodes.iter().collect::<Vec<_>>();
        leader(&all).await.cluster.id()
    };
    let at = nodes.iter().position(|n| n.cluster.id() == old).unwrap();
    let restarting = nodes.remove(at);
    restarting.stop().await;
    // The survivors elect a leader while the old one is down; their dials to it fail.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (new_id, term, roles) = {
        let all = nodes.iter().collect::<Vec<_>>();
        let new = leader(&all).await;
        let roles = Roles::record(new);
        let term = new.cluster.raft().metrics().borrow().current_term;
        (new.cluster.id(), term, roles)
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let back = restarting.start_again(&ca).await;
    let back_roles = Roles::record(&back);
    let new = nodes.iter().find(|n| n.cluster.id() == new_id).unwrap();
    let took = caught_up(&back, new).await;
    assert!(took < Duration::from_secs(2), "caught up after {took:?}");
    assert_eq!(back.cluster.write(add_service(5)).await, Ok(FORMED + 1));
    tokio::time::sleep(Duration::from_secs(1)).await;

    assert_eq!(roles.stop(), vec![(ServerState::Leader, term)]);
    let back_roles = back_roles.stop();
    assert!(
        back_roles
            .iter()
            .all(|&(state, _)| state != ServerState::Candidate),
        "the restarted node campaigned: {back_roles:?}"
    );
    assert_eq!(back.cluster.raft().metrics().borrow().current_term, term);
    nodes.push(back);
    for node in &nodes {
        node.stop().await;
    }
}

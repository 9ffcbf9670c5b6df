//! The admin API: HTTP/1.1 and JSON on the node's unix socket (mode 0600, so only its owner may
//! talk to it). Routes and types are in [`crate::api`].
//!
//! On a cluster member, changes go through Raft (forwarded to the leader when this node is a
//! follower) and are answered once this node's data plane runs them; reads of the
//! configuration are linearizable.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use consensus::config::{ClusterConfig, Command, Node};
use consensus::{ClusterError, Role};
use tokio::net::UnixListener;

use crate::api::{
    ApiError, CLUSTER_INIT_PATH, COMMANDS_PATH, CONFIG_PATH, ClusterStatus, JOIN_TOKEN_PATH,
    JoinTokenAnswer, NODES_PATH, NodeSpec, NodeStatus, SESSIONS_PATH, STATUS_PATH, STEP_DOWN_PATH,
    SessionEntry, SessionList, SessionQuery, StatusQuery, SteppedDown, Written,
};
use crate::clock;
use crate::cluster::RaftCluster;
use crate::state::NodeState;

/// How long `status` waits for the linearizable read and for each node's report.
const STATUS_READ_TIMEOUT: Duration = Duration::from_secs(2);
const STATUS_REPORT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a configuration read waits for a quorum.
const CONFIG_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a committed change may take to reach this node's data plane before the answer
/// says so.
const RUNNING_TIMEOUT: Duration = Duration::from_secs(5);

/// What the admin API serves.
#[derive(Debug, Clone)]
pub(crate) struct Admin {
    pub(crate) node: Arc<NodeState>,
    /// Absent on a standalone node.
    pub(crate) cluster: Option<Arc<ClusterAdmin>>,
}

/// A cluster member's handle, and what `cluster init` proposes.
#[derive(Debug)]
pub(crate) struct ClusterAdmin {
    pub(crate) cluster: RaftCluster,
    pub(crate) sync: Arc<crate::sync::NodeSync>,
    /// Absent without `[bgp]`.
    pub(crate) announcer: Option<Arc<crate::announce::Announcer>>,
    pub(crate) endpoint: Arc<crate::quic::Endpoint>,
    pub(crate) serve_counters: Arc<consensus::ServeCounters>,
    /// This node as the first member.
    pub(crate) me: Node,
    /// The node file's settings and services.
    pub(crate) bootstrap: Vec<Command>,
}

/// Serves the admin API until `shutdown` completes; requests in flight finish first.
pub(crate) async fn serve(
    listener: UnixListener,
    admin: Admin,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(STATUS_PATH, get(status))
        .route(SESSIONS_PATH, get(sessions))
        .route(CLUSTER_INIT_PATH, post(init))
        .route(STEP_DOWN_PATH, post(step_down))
        .route(JOIN_TOKEN_PATH, get(join_token))
        .route(COMMANDS_PATH, post(command))
        .route(NODES_PATH, post(add_node))
        .route(&format!("{NODES_PATH}/{{name}}"), delete(remove_node))
        .route(CONFIG_PATH, get(read_config))
        .with_state(admin);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// An error answer: a status code and a message for the operator.
#[derive(Debug)]
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1 })).into_response()
    }
}

impl From<ClusterError> for Failure {
    fn from(e: ClusterError) -> Self {
        let code = match e {
            ClusterError::Rejected(_)
            | ClusterError::NotInitialized
            | ClusterError::AlreadyInitialized
            | ClusterError::Membership(_) => StatusCode::CONFLICT,
            ClusterError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            ClusterError::Refused { .. } => StatusCode::FORBIDDEN,
            ClusterError::NoQuorum { .. }
            | ClusterError::NotLeader { .. }
            | ClusterError::Unreachable { .. }
            | ClusterError::CatchUp { .. }
            | ClusterError::StepDown { .. }
            | ClusterError::NoIdentity => StatusCode::SERVICE_UNAVAILABLE,
            ClusterError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Failure(code, e.to_string())
    }
}

impl Admin {
    fn cluster(&self) -> Result<&Arc<ClusterAdmin>, Failure> {
        self.cluster.as_ref().ok_or_else(|| {
            Failure(
                StatusCode::BAD_REQUEST,
                "this node runs standalone (its config file has no [cluster] section): its \
                 services come from the file; change it and send SIGHUP"
                    .to_owned(),
            )
        })
    }

    /// The node's status with only its own view of the cluster: no quorum round trip, no peer
    /// reports (`status --local`, metrics).
    pub(crate) fn local_status(&self) -> NodeStatus {
        let mut status = self.node.status();
        if let Some(c) = &self.cluster {
            status.sync = Some(c.sync.status());
            status.bgp = c.announcer.as_ref().map(|a| a.report());
            let me = c.cluster.local_report();
            let config = c.cluster.local_config();
            status.cluster = Some(ClusterStatus {
                quorum: me.leader.is_some(),
                read_error: Some(
                    "this node's own view (--local): not a linearizable read".to_owned(),
                ),
                config_version: config.version,
                cluster_id: cluster_id(&config),
                leader: me
                    .leader
                    .and_then(|id| config.nodes.get(&id))
                    .map(|n| n.name.clone()),
                nodes: vec![me],
                quic: c.endpoint.counters(),
                raft_rpcs: c.serve_counters.values(),
            });
        }
        status
    }

    /// The node's status with the whole cluster: a linearizable read and every node's report
    /// (`status`, the status page).
    pub(crate) async fn status(&self) -> NodeStatus {
        let mut status = self.node.status();
        if let Some(c) = &self.cluster {
            let (read, mut nodes) = tokio::join!(
                c.cluster.read(STATUS_READ_TIMEOUT),
                c.cluster.reports(STATUS_REPORT_TIMEOUT)
            );
            // Taken after the peers answered (or not), so every row is as fresh as the node rows.
            status.sync = Some(c.sync.status());
            status.bgp = c.announcer.as_ref().map(|a| a.report());
            nodes.sort_by(|a, b| a.name.cmp(&b.name));
            let leader = nodes
                .iter()
                .find(|n| n.role == Some(Role::Leader))
                .map(|n| n.name.clone());
            let (quorum, read_error, config) = match read {
                Ok(cfg) => (true, None, cfg),
                Err(e) => (false, Some(e.to_string()), c.cluster.local_config()),
            };
            status.cluster = Some(ClusterStatus {
                quorum,
                read_error,
                config_version: config.version,
                cluster_id: cluster_id(&config),
                leader,
                nodes,
                quic: c.endpoint.counters(),
                raft_rpcs: c.serve_counters.values(),
            });
        }
        status
    }

    /// Answers a committed change once this node's data plane runs it.
    async fn written(&self, version: u64) -> Result<Json<Written>, Failure> {
        if self.node.wait_running(version, RUNNING_TIMEOUT).await {
            Ok(Json(Written { version }))
        } else {
            Err(Failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                    "configuration version {version} is committed but this node's data plane \
                     did not run it within {RUNNING_TIMEOUT:?}; see the node's log"
                ),
            ))
        }
    }
}

async fn status(State(admin): State<Admin>, Query(q): Query<StatusQuery>) -> Json<NodeStatus> {
    if q.local {
        return Json(admin.local_status());
    }
    Json(admin.status().await)
}

fn cluster_id(config: &ClusterConfig) -> Option<String> {
    config.identity.map(|i| i.id.to_string())
}

async fn sessions(State(admin): State<Admin>, Query(q): Query<SessionQuery>) -> Json<SessionList> {
    let sessions = admin
        .node
        .engine()
        .sessions(clock::now())
        .iter()
        .filter(|s| q.vip.is_none_or(|v| v == s.vip))
        .map(SessionEntry::from)
        .collect();
    Json(SessionList { sessions })
}

async fn init(State(admin): State<Admin>) -> Result<Json<Written>, Failure> {
    let c = admin.cluster()?;
    let version = c.cluster.init(c.me.clone(), c.bootstrap.clone()).await?;
    admin.written(version).await
}

async fn join_token(State(admin): State<Admin>) -> Result<Json<JoinTokenAnswer>, Failure> {
    let token = admin
        .cluster()?
        .cluster
        .join_token(CONFIG_READ_TIMEOUT)
        .await?;
    Ok(Json(JoinTokenAnswer { token }))
}

/// How long [`step_down`] waits for another voter to win an election.
const STEP_DOWN_TIMEOUT: Duration = Duration::from_secs(10);

async fn step_down(State(admin): State<Admin>) -> Result<Json<SteppedDown>, Failure> {
    let c = admin.cluster()?;
    let moved = c.cluster.step_down(STEP_DOWN_TIMEOUT).await?;
    let leader = moved.or_else(|| c.cluster.local_report().leader);
    let name = leader.and_then(|id| {
        c.cluster
            .local_config()
            .nodes
            .get(&id)
            .map(|n| n.name.clone())
    });
    Ok(Json(SteppedDown {
        moved: moved.is_some(),
        leader: name,
    }))
}

async fn command(
    State(admin): State<Admin>,
    Json(command): Json<Command>,
) -> Result<Json<Written>, Failure> {
    let version = admin.cluster()?.cluster.write(command).await?;
    admin.written(version).await
}

async fn add_node(
    State(admin): State<Admin>,
    Json(spec): Json<NodeSpec>,
) -> Result<Json<Written>, Failure> {
    let c = admin.cluster()?;
    crate::tls::validate_node_name(&spec.name).map_err(|e| Failure(StatusCode::BAD_REQUEST, e))?;
    let node = Node {
        id: consensus::node_id(&spec.name),
        name: spec.name,
        quic_addr: spec.addr,
        lips: spec.lips,
        drained: false,
    };
    let version = c.cluster.add_node(node).await?;
    admin.written(version).await
}

async fn remove_node(
    State(admin): State<Admin>,
    Path(name): Path<String>,
) -> Result<Json<Written>, Failure> {
    let c = admin.cluster()?;
    let config = c.cluster.read(CONFIG_READ_TIMEOUT).await?;
    let id = config
        .nodes
        .values()
        .find(|n| n.name == name)
        .map(|n| n.id)
        .ok_or_else(|| {
            Failure(
                StatusCode::CONFLICT,
                format!("no node named {name:?} in the cluster"),
            )
        })?;
    let version = c.cluster.remove_node(id).await?;
    // A node that removed itself no longer applies the cluster's changes.
    if id == c.cluster.id() {
        return Ok(Json(Written { version }));
    }
    admin.written(version).await
}

async fn read_config(State(admin): State<Admin>) -> Result<Json<ClusterConfig>, Failure> {
    let config = admin.cluster()?.cluster.read(CONFIG_READ_TIMEOUT).await?;
    Ok(Json((*config).clone()))
}

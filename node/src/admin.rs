//! The admin API: HTTP/1.1 and JSON on the node's unix socket (mode 0600, so only its owner may
//! talk to it). Routes and types are in [`crate::api`].

use std::future::Future;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::UnixListener;

use crate::api::{SESSIONS_PATH, STATUS_PATH, SessionEntry, SessionList, SessionQuery};
use crate::clock;
use crate::state::NodeState;

/// Serves the admin API until `shutdown` completes; requests in flight finish first.
pub(crate) async fn serve(
    listener: UnixListener,
    state: Arc<NodeState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(STATUS_PATH, get(status))
        .route(SESSIONS_PATH, get(sessions))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn status(State(state): State<Arc<NodeState>>) -> Json<crate::api::NodeStatus> {
    Json(state.status())
}

async fn sessions(
    State(state): State<Arc<NodeState>>,
    Query(q): Query<SessionQuery>,
) -> Json<SessionList> {
    let sessions = state
        .engine()
        .sessions(clock::now())
        .iter()
        .filter(|s| q.vip.is_none_or(|v| v == s.vip))
        .map(SessionEntry::from)
        .collect();
    Json(SessionList { sessions })
}

//! Whom a node answers (DESIGN §4): membership that ends when a node is removed, and a joining
//! node that answers only the cluster it is being added to.
//!
//! * **Authorised when served.** The node's endpoint checks a peer once, at the handshake
//!   ([`Cluster::admit`]). Every request is checked again when it is served
//!   ([`Cluster::authorize`], from `transport::serve_connection`), against this node's
//!   membership at that moment and with the peer's node name as its certificate says it; the
//!   sender a request names (a vote's candidate, a leader's append, a pre-vote, a hand-over)
//!   must be that peer ([`Cluster::check_sender`]). A refused request closes its connection
//!   with a [`Refusal`]: its code and a reason naming the node that refused and why.
//! * **Removal ends connections.** A member is a node in the Raft membership (voters and
//!   learners) or in the applied configuration. Once this node applies a membership and a
//!   configuration without a peer, each connection served for it stops reading requests and
//!   closes when the answers in flight are delivered (so a node that removed itself gets the
//!   answer to its own removal), and the connections this node dialled to it close. Its later
//!   handshakes are refused at once. The removed node, which may never learn of its removal,
//!   finds out at its next request: it asks the leader it knows or, knowing none, the voters in
//!   turn, and a refusal ends a request at once ([`ClusterError::Refused`]).
//! * **Cluster identity.** Every cluster has a [`ClusterIdentity`], created by the first
//!   command of [`Cluster::init`] and never changed: a public id (shown by `status`) and a
//!   secret. Every Raft request carries its sender's; a node answers only its own cluster's,
//!   the secret compared in constant time. A node of another cluster whose certificate the same
//!   CA signed, even one with a member's name, is refused.
//! * **Joining.** A node that has not joined — no membership in its Raft, no node in its
//!   configuration — has no identity of its own. It takes Raft connections only while it has a
//!   [`JoinToken`] (the text form of the identity of the cluster it is being added to, printed
//!   by `lbcluster cluster join-token`, read when needed), and a request only if it carries
//!   that identity, checked before anything reaches its Raft. So no other certificate holder
//!   can make it vote, append or install a snapshot: a refused attempt leaves it uninitialized
//!   and joinable. Session sync (another ALPN) waits until it has joined. The token is a secret
//!   of the cluster, like the CA key: every member knows it, and so does a node once removed.
//! * **Until a member has applied its cluster's identity** it checks names only, as before
//!   identities existed, and takes any identity: a node that has just joined (its join token
//!   got it that far), and the members of a cluster initialized by an earlier version, which
//!   has none until its first leader under this version commits one ([`run`]; the leader's
//!   requests carry the new identity before the followers have applied it). A member's
//!   requests carry its cluster's identity once applied, else its join token's, else none.

use std::sync::{Arc, Weak};

use openraft::{RaftMetrics, ServerState};
use quinn::VarInt;
use tracing::{info, warn};

use super::{Budget, Cluster, ClusterError, Inner, node_id};
use crate::Member;
use crate::config::{
    ClusterConfig, ClusterId, ClusterIdentity, Command, ConfigError, IDENTITY_BYTES, NodeId,
};
use crate::transport::{
    CLOSE_IMPERSONATION, CLOSE_NOT_MEMBER, CLOSE_WRONG_CLUSTER, Credentials, Dialer, RpcKind,
};

/// Where a node that has not joined a cluster finds the identity of the cluster it is being
/// added to. Asked whenever it is needed (the node reads its token file then, so a token written
/// after the node started counts); `Err` says why there is none.
pub type JoinToken = Arc<dyn Fn() -> Result<ClusterIdentity, String> + Send + Sync>;

/// The pause before a leader tries again to give its cluster an identity.
const IDENTITY_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Why a node refused a peer or one of its requests. Its text names the node that refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{by} refuses node {peer}: it is not a member of {by}'s cluster")]
    NotMember { by: String, peer: String },
    #[error(
        "{by} refuses a request from node {peer} {}: {by} {} cluster {ours}",
        DisplayTheirs(*.theirs),
        if *.joining { "is joining" } else { "belongs to" }
    )]
    WrongCluster {
        by: String,
        peer: String,
        ours: ClusterId,
        theirs: Option<ClusterId>,
        /// `by` has not joined yet: `ours` is its join token's.
        joining: bool,
    },
    #[error("{by} refuses a request from node {peer}: a wrong secret for cluster {id}")]
    WrongSecret {
        by: String,
        peer: String,
        id: ClusterId,
    },
    #[error("{by} has not joined a cluster and answers none without a join token: {why}")]
    NoJoinToken { by: String, why: String },
    #[error(
        "{by} refuses node {peer}: its {kind} request is in the name of {}",
        DisplayClaimed(*.claimed)
    )]
    Impersonation {
        by: String,
        peer: String,
        kind: RpcKind,
        claimed: Option<NodeId>,
    },
}

struct DisplayTheirs(Option<ClusterId>);

impl std::fmt::Display for DisplayTheirs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(id) => write!(f, "of cluster {id}"),
            None => f.write_str("that names no cluster"),
        }
    }
}

struct DisplayClaimed(Option<NodeId>);

impl std::fmt::Display for DisplayClaimed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(id) => write!(f, "node {id}"),
            None => f.write_str("no node"),
        }
    }
}

impl Refusal {
    /// The QUIC close code a connection refused so is closed with.
    pub fn code(&self) -> VarInt {
        match self {
            Refusal::NotMember { .. } => CLOSE_NOT_MEMBER,
            Refusal::WrongCluster { .. }
            | Refusal::WrongSecret { .. }
            | Refusal::NoJoinToken { .. } => CLOSE_WRONG_CLUSTER,
            Refusal::Impersonation { .. } => CLOSE_IMPERSONATION,
        }
    }
}

/// A new, random cluster identity (its id never all zeros).
pub(super) fn new_identity() -> Result<ClusterIdentity, ClusterError> {
    loop {
        let mut bytes = [0; IDENTITY_BYTES];
        getrandom::fill(&mut bytes).map_err(|e| {
            ClusterError::Internal(format!("no randomness for a cluster identity: {e}"))
        })?;
        if let Some(identity) = ClusterIdentity::from_bytes(bytes) {
            return Ok(identity);
        }
    }
}

/// Whether a node with these metrics and this configuration has joined a cluster.
fn joined(metrics: &RaftMetrics<NodeId, Member>, config: &ClusterConfig) -> bool {
    metrics.membership_config.nodes().next().is_some() || !config.nodes.is_empty()
}

/// The identity the requests of a node with configuration `config` and join token `join`
/// carry, for its [`QuicNetwork`](crate::QuicNetwork).
pub(super) fn credentials(
    applied: tokio::sync::watch::Receiver<Arc<ClusterConfig>>,
    join: JoinToken,
) -> Credentials {
    Arc::new(move || {
        let identity = applied.borrow().identity;
        identity.or_else(|| join().ok())
    })
}

impl<D: Dialer> Cluster<D> {
    /// Whether `name` is a current member: in the Raft membership (voters and learners) or in
    /// the applied configuration. Never, on a node that has not joined a cluster.
    pub fn is_member(&self, name: &str) -> bool {
        let in_membership = self
            .inner
            .raft
            .metrics()
            .borrow()
            .membership_config
            .nodes()
            .any(|(_, member)| member.name == name);
        in_membership || self.local_config().nodes.values().any(|n| n.name == name)
    }

    fn has_joined(&self) -> bool {
        joined(&self.inner.raft.metrics().borrow(), &self.local_config())
    }

    pub(crate) fn not_member(&self, peer: &str) -> Refusal {
        Refusal::NotMember {
            by: self.inner.me.name.clone(),
            peer: peer.to_owned(),
        }
    }

    /// The handshake check of a Raft connection from (or to) `peer`: a member; or, on a node
    /// that has not joined, anyone while it has a join token (each request then has to carry
    /// the token's identity, checked when each is served).
    pub fn admit(&self, peer: &str) -> Result<(), Refusal> {
        if self.has_joined() {
            return if self.is_member(peer) {
                Ok(())
            } else {
                Err(self.not_member(peer))
            };
        }
        (self.inner.join)()
            .map(drop)
            .map_err(|why| Refusal::NoJoinToken {
                by: self.inner.me.name.clone(),
                why,
            })
    }

    /// Whether a request from `peer` carrying cluster identity `sent` is answered now (see the
    /// module doc).
    pub(crate) fn authorize(
        &self,
        peer: &str,
        sent: Option<ClusterIdentity>,
    ) -> Result<(), Refusal> {
        let by = || self.inner.me.name.clone();
        let config = self.local_config();
        let joined = joined(&self.inner.raft.metrics().borrow(), &config);
        let expected = match (config.identity, joined) {
            (Some(identity), _) => Some(identity),
            // A member that has not applied its cluster's identity yet: names only, as before.
            (None, true) => None,
            (None, false) => match (self.inner.join)() {
                Ok(identity) => Some(identity),
                Err(why) => return Err(Refusal::NoJoinToken { by: by(), why }),
            },
        };
        if let Some(ours) = expected {
            match sent {
                Some(theirs) if theirs.id == ours.id => {
                    if !ours.same_secret(&theirs) {
                        return Err(Refusal::WrongSecret {
                            by: by(),
                            peer: peer.to_owned(),
                            id: ours.id,
                        });
                    }
                }
                theirs => {
                    return Err(Refusal::WrongCluster {
                        by: by(),
                        peer: peer.to_owned(),
                        ours: ours.id,
                        theirs: theirs.map(|t| t.id),
                        joining: !joined,
                    });
                }
            }
        }
        if joined && !self.is_member(peer) {
            return Err(self.not_member(peer));
        }
        Ok(())
    }

    /// A `kind` request from `peer` that names `claimed` as its sender is answered only if
    /// that is `peer`.
    pub(crate) fn check_sender(
        &self,
        peer: &str,
        kind: RpcKind,
        claimed: Option<NodeId>,
    ) -> Result<(), Refusal> {
        if claimed == Some(node_id(peer)) {
            return Ok(());
        }
        Err(Refusal::Impersonation {
            by: self.inner.me.name.clone(),
            peer: peer.to_owned(),
            kind,
            claimed,
        })
    }

    /// Returns once `peer` is no longer a member of the cluster this node has joined, checked
    /// whenever the applied configuration or the Raft metrics change; never if this node's Raft
    /// stops first.
    pub(crate) async fn until_not_member(&self, peer: &str) {
        let mut applied = self.inner.applied.clone();
        let mut metrics = self.inner.raft.metrics();
        loop {
            if self.has_joined() && !self.is_member(peer) {
                return;
            }
            tokio::select! {
                changed = applied.changed() => if changed.is_err() { break },
                changed = metrics.changed() => if changed.is_err() { break },
            }
        }
        std::future::pending::<()>().await;
    }

    /// The identity of this cluster, in the text form a joining node's token file holds.
    /// Linearizable; `Err` while a cluster from before identities has not been given one yet.
    pub async fn join_token(&self, timeout: std::time::Duration) -> Result<String, ClusterError> {
        let config = self.read(timeout).await?;
        match config.identity {
            Some(identity) => Ok(identity.token()),
            None => Err(ClusterError::NoIdentity),
        }
    }
}

/// Keeps this node's dialled Raft connections to members only, and has the leader of a
/// cluster from before identities commit one; until the node's Raft stops or its handle is
/// dropped. Acts when the applied configuration or the Raft membership or role changes.
pub(super) async fn run<D: Dialer>(inner: Weak<Inner<D>>) {
    let (mut applied, mut metrics) = match inner.upgrade() {
        Some(inner) => (inner.applied.clone(), inner.raft.metrics()),
        None => return,
    };
    let mut last = None;
    // The term in which this node last proposed an identity.
    let mut proposed = None;
    loop {
        let (state, term, membership, version) = {
            let m = metrics.borrow_and_update();
            let version = applied.borrow_and_update().version;
            (
                m.state,
                m.current_term,
                m.membership_config.log_id().map(|l| l.index),
                version,
            )
        };
        if state == ServerState::Shutdown {
            return;
        }
        if last != Some((state, membership, version)) {
            last = Some((state, membership, version));
            let Some(inner) = inner.upgrade() else {
                return;
            };
            let cluster = Cluster { inner };
            if cluster.has_joined() {
                cluster
                    .inner
                    .network
                    .retain(|member| cluster.is_member(&member.name));
            }
            if state == ServerState::Leader && proposed != Some(term) {
                let config = cluster.local_config();
                // Version 0: `init` is under way, and gives the identity itself.
                if config.version > 0 && config.identity.is_none() {
                    proposed = Some(term);
                    if !cluster.give_identity().await {
                        drop(cluster);
                        (proposed, last) = (None, None);
                        tokio::time::sleep(IDENTITY_RETRY).await;
                        continue;
                    }
                }
            }
        }
        tokio::select! {
            changed = applied.changed() => if changed.is_err() { return },
            changed = metrics.changed() => if changed.is_err() { return },
        }
    }
}

impl<D: Dialer> Cluster<D> {
    /// Commits a new identity for a cluster initialized before identities (this node leads);
    /// false if that failed and is worth another try.
    async fn give_identity(&self) -> bool {
        let committed = match new_identity() {
            Ok(identity) => {
                let budget = Budget::new(self.inner.deadlines.write);
                self.commit(Command::SetIdentity(identity), budget)
                    .await
                    .map(|_| identity)
            }
            Err(e) => Err(e),
        };
        match committed {
            Ok(identity) => {
                info!(
                    cluster = %identity.id,
                    "gave the cluster (initialized by an earlier version) its identity"
                );
                true
            }
            // Another leader gave it one first.
            Err(ClusterError::Rejected(ConfigError::IdentitySet { .. })) => true,
            Err(e) => {
                warn!(error = %e, "could not give the cluster its identity; trying again");
                false
            }
        }
    }
}

//! When a node campaigns, and how a leader hands over (DESIGN §4).
//!
//! openraft 0.9 campaigns on its own timer, raising its term at every attempt, and has neither
//! pre-vote nor leadership transfer. A node that cannot reach the leader — restarted while the
//! leader's dial to it was stuck, or cut off by a partition — would therefore come back with a
//! higher term, and a leader that sees a higher term steps down, although a majority still
//! follows it. So openraft's own elections are off (`Config::enable_elect = false`) and this
//! module decides, in one place:
//!
//! * **When.** A voter that does not lead campaigns once it has heard nothing from a leader
//!   (openraft's vote was last granted or refreshed) for the leader lease — `election_timeout_max`,
//!   openraft's own lease, before which no voter would grant a vote anyway — plus a random
//!   jitter below `election_timeout_max - election_timeout_min`, so that two followers of a dead
//!   leader do not both start at once; after an attempt, again after a random election timeout.
//!   A node that restarted counts from its start.
//! * **Pre-vote** (Raft thesis §9.6). Before it campaigns, a node asks every other voter whether
//!   it would grant the vote; nobody changes state. A voter says yes only if it does not lead
//!   with a quorum that acknowledged it within the lease, it holds no leader lease itself (it has
//!   not heard from a leader within the lease: the test openraft applies to the real vote), no
//!   hand-over to another node is under way, and the candidate's last log id is at least its own.
//!   Only with a majority in every configuration of the (possibly joint) membership does the node
//!   call openraft's `elect`. A node that could not win never raises its term, so it cannot
//!   depose a leader that a majority follows.
//! * **Hand-over** ([`Cluster::step_down`]). The leader picks the voter whose log matches its own
//!   furthest, stops its heartbeats and sends every other voter [`TimeoutNow`]: the target
//!   campaigns at once, skipping the pre-vote, and every voter refuses the pre-votes of anyone
//!   else for the transfer window, so the named node is the one that wins. The old leader grants
//!   the target's vote (its own lease dates from its election); in a cluster of five or more the
//!   target also needs a follower whose lease ran out, at most one lease after the last
//!   heartbeat. A pending hand-over ends when a leader other than the old one is known, or when
//!   its window closes.
//!
//! Pre-vote and `TimeoutNow` travel as [`RpcKind::PreVote`] and [`RpcKind::TimeoutNow`] on the
//! Raft connections.

use std::collections::{BTreeSet, HashMap};
use std::sync::Weak;
use std::time::Duration;

use openraft::{LogId, RaftMetrics, ServerState};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout_at};
use tracing::{debug, info, warn};

use super::{Cluster, ClusterError, Inner, known_leader, stopped};
use crate::transport::{Dialer, RpcKind};
use crate::{Member, NodeId};

/// How often the election timer is checked.
const TICK: Duration = Duration::from_millis(25);
/// A hand-over window is at most this many leases: the target wins within one lease after the
/// last heartbeat; past the window the voters elect as usual again.
const TRANSFER_WINDOW_LEASES: u32 = 3;

/// Asked of every other voter before a node campaigns: would you grant me your vote?
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PreVoteRequest {
    pub(crate) candidate: NodeId,
    /// The candidate's term now; it would campaign for the next one.
    pub(crate) term: u64,
    pub(crate) last_log_id: Option<LogId<NodeId>>,
}

/// A voter's answer to a pre-vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum PreVote {
    Granted,
    /// The voter leads, and a quorum acknowledged it within the lease.
    Leading,
    /// The voter heard from a leader within the lease.
    LeaderHeard,
    /// The voter's log is ahead of the candidate's.
    LogBehind,
    /// Leadership is being handed over to `to`.
    Transferring {
        to: NodeId,
    },
}

/// Sent by a leader handing over to `to`: `to` campaigns at once; every voter refuses the
/// pre-votes of anyone else for `window_ms`. A `window_ms` of 0 cancels a hand-over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TimeoutNow {
    pub(crate) from: NodeId,
    pub(crate) term: u64,
    pub(crate) to: NodeId,
    pub(crate) window_ms: u64,
}

/// What a voter knows when it answers a pre-vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct VoterView {
    pub(crate) leading_with_quorum: bool,
    pub(crate) lease_holds: bool,
    pub(crate) last_log_id: Option<LogId<NodeId>>,
    pub(crate) transfer_to: Option<NodeId>,
}

/// The pre-vote rule (see the module doc).
pub(crate) fn decide(view: &VoterView, request: &PreVoteRequest) -> PreVote {
    if view.leading_with_quorum {
        return PreVote::Leading;
    }
    if let Some(to) = view.transfer_to
        && to != request.candidate
    {
        return PreVote::Transferring { to };
    }
    if view.lease_holds {
        return PreVote::LeaderHeard;
    }
    if request.last_log_id < view.last_log_id {
        return PreVote::LogBehind;
    }
    PreVote::Granted
}

/// Whether the voters in `granted` are a majority of every configuration in `joint`.
pub(crate) fn quorum(joint: &[BTreeSet<NodeId>], granted: &BTreeSet<NodeId>) -> bool {
    !joint.is_empty()
        && joint
            .iter()
            .all(|config| config.intersection(granted).count() * 2 > config.len())
}

/// A hand-over this node knows of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pending {
    from: NodeId,
    to: NodeId,
    until: Instant,
    /// When this node, the target, last campaigned for it.
    campaigned: Option<Instant>,
}

/// The hand-over under way, if any.
#[derive(Debug, Default)]
pub(super) struct Transfers {
    pending: Mutex<Option<Pending>>,
}

impl Transfers {
    /// From now until `until`, leadership goes from `from` to `to`; `until` in the past ends it.
    fn begin(&self, from: NodeId, to: NodeId, until: Instant) {
        *self.pending.lock() = Some(Pending {
            from,
            to,
            until,
            campaigned: None,
        });
    }

    fn end(&self) {
        *self.pending.lock() = None;
    }

    /// The hand-over still under way at `now` while `leader` is known; a finished or expired
    /// one is forgotten.
    fn current(&self, now: Instant, leader: Option<NodeId>) -> Option<Pending> {
        let mut pending = self.pending.lock();
        match *pending {
            Some(p) if now < p.until && leader.is_none_or(|l| l == p.from) => Some(p),
            Some(_) => {
                *pending = None;
                None
            }
            None => None,
        }
    }

    /// The target of [`Transfers::current`].
    fn target(&self, now: Instant, leader: Option<NodeId>) -> Option<NodeId> {
        self.current(now, leader).map(|p| p.to)
    }

    /// The target campaigns at `now`, if its last campaign for the hand-over was `retry` ago
    /// or there was none; false otherwise.
    fn campaign(&self, now: Instant, retry: Duration) -> bool {
        let mut pending = self.pending.lock();
        match &mut *pending {
            Some(p) if p.campaigned.is_none_or(|at| now >= at + retry) => {
                p.campaigned = Some(now);
                true
            }
            _ => false,
        }
    }
}

/// The election timer's state in [`run`].
#[derive(Debug)]
struct Timer {
    /// The jitter after the lease before the next campaign.
    jitter: Duration,
    /// The pause after an attempt before the next one.
    retry: Duration,
    last_attempt: Option<Instant>,
}

impl Timer {
    fn new<D>(inner: &Inner<D>) -> Timer {
        let mut timer = Timer {
            jitter: Duration::ZERO,
            retry: Duration::ZERO,
            last_attempt: None,
        };
        timer.redraw(inner);
        timer
    }

    fn redraw<D>(&mut self, inner: &Inner<D>) {
        let config = &inner.raft_config;
        let timeout = config.new_rand_election_timeout::<openraft::TokioRuntime>();
        self.retry = Duration::from_millis(timeout);
        self.jitter = Duration::from_millis(timeout - config.election_timeout_min);
    }
}

/// Runs the election timer of `inner`'s node until its Raft stops or the cluster handle is
/// dropped.
pub(super) async fn run<D: Dialer>(inner: Weak<Inner<D>>) {
    let mut timer = match inner.upgrade() {
        Some(inner) => Timer::new(&inner),
        None => return,
    };
    loop {
        tokio::time::sleep(TICK).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let cluster = Cluster { inner };
        if !cluster.election_tick(&mut timer).await {
            return;
        }
    }
}

impl<D: Dialer> Cluster<D> {
    fn lease(&self) -> Duration {
        Duration::from_millis(self.inner.raft_config.election_timeout_max)
    }

    /// One check of the election timer; false once the Raft has stopped.
    async fn election_tick(&self, timer: &mut Timer) -> bool {
        let metrics = self.metrics();
        if metrics.state == ServerState::Shutdown {
            return false;
        }
        let membership = metrics.membership_config.membership();
        if metrics.state == ServerState::Leader || !membership.voter_ids().any(|v| v == self.id()) {
            timer.last_attempt = None;
            return true;
        }
        let now = Instant::now();
        let transfer = self.inner.transfers.target(now, known_leader(&metrics));
        let heard = match self
            .inner
            .raft
            .with_raft_state(|state| state.vote_last_modified())
            .await
        {
            Ok(heard) => heard.unwrap_or(self.inner.started),
            Err(_) => return false,
        };
        *self.inner.heard.lock() = heard;
        if transfer == Some(self.id()) {
            // The named target campaigns until it wins or the window closes, skipping the
            // pre-vote; the voters refuse everybody else meanwhile.
            let retry = Duration::from_millis(self.inner.raft_config.election_timeout_min);
            if self.inner.transfers.campaign(now, retry) {
                info!(
                    term = metrics.current_term,
                    "campaigning: the leader hands over"
                );
                return self.inner.raft.trigger().elect().await.is_ok();
            }
            return true;
        }
        let due = now >= heard + self.lease() + timer.jitter
            && timer
                .last_attempt
                .is_none_or(|last| now >= last + timer.retry);
        if !due {
            return true;
        }
        timer.last_attempt = Some(now);
        timer.redraw(&self.inner);
        if self.pre_vote(&metrics).await {
            info!(
                term = metrics.current_term,
                "no leader heard from and a majority would vote: campaigning"
            );
            return self.inner.raft.trigger().elect().await.is_ok();
        }
        true
    }

    /// Asks every other voter whether it would vote for this node; true with a majority in
    /// every configuration.
    async fn pre_vote(&self, metrics: &RaftMetrics<NodeId, Member>) -> bool {
        let membership = metrics.membership_config.membership();
        let joint = membership.get_joint_config();
        let request = PreVoteRequest {
            candidate: self.id(),
            term: metrics.current_term,
            last_log_id: self.inner.log.last_log_id(),
        };
        let mut granted = BTreeSet::from([self.id()]);
        if quorum(joint, &granted) {
            return true;
        }
        let deadline =
            Instant::now() + Duration::from_millis(self.inner.raft_config.election_timeout_min);
        let mut asked = JoinSet::new();
        let voters = joint.iter().flatten().copied().collect::<BTreeSet<_>>();
        for id in voters.into_iter().filter(|&v| v != self.id()) {
            let Some(member) = membership.get_node(&id).cloned() else {
                continue;
            };
            let this = self.clone();
            asked.spawn(async move {
                let answer =
                    this.ask::<_, PreVote>(id, &member, RpcKind::PreVote, &request, deadline);
                (id, answer.await)
            });
        }
        let mut answers = HashMap::new();
        while let Some(joined) = asked.join_next().await {
            let Ok((id, answer)) = joined else { continue };
            match answer {
                Ok(PreVote::Granted) => {
                    granted.insert(id);
                    if quorum(joint, &granted) {
                        debug!(?granted, "pre-vote won");
                        return true;
                    }
                }
                Ok(refused) => {
                    answers.insert(id, format!("{refused:?}"));
                }
                Err(e) => {
                    answers.insert(id, e.reason);
                }
            }
        }
        debug!(?granted, ?answers, "pre-vote lost; not campaigning");
        false
    }

    /// Answers a pre-vote (see the module doc); changes nothing.
    pub(crate) async fn serve_pre_vote(&self, request: PreVoteRequest) -> PreVote {
        let metrics = self.metrics();
        let lease = self.lease();
        let now = Instant::now();
        let lease_holds = self
            .inner
            .raft
            .with_raft_state(move |state| {
                state.vote_ref().is_committed()
                    && state
                        .vote_last_modified()
                        .is_some_and(|at| now <= at + lease)
            })
            .await
            // A Raft that stopped grants nothing.
            .unwrap_or(true);
        let view = VoterView {
            leading_with_quorum: metrics.state == ServerState::Leader
                && metrics
                    .millis_since_quorum_ack
                    .is_some_and(|ms| u128::from(ms) <= lease.as_millis()),
            lease_holds,
            last_log_id: self.inner.log.last_log_id(),
            transfer_to: self.inner.transfers.target(now, known_leader(&metrics)),
        };
        let answer = decide(&view, &request);
        debug!(?request, ?answer, "pre-vote asked");
        answer
    }

    /// Takes part in a hand-over announced by the leader this node follows.
    pub(crate) async fn serve_timeout_now(&self, request: TimeoutNow) -> Result<(), ClusterError> {
        let metrics = self.metrics();
        let leader = known_leader(&metrics);
        if leader != Some(request.from) || metrics.current_term != request.term {
            return Err(ClusterError::NotLeader { leader });
        }
        let window = Duration::from_millis(request.window_ms).min(self.transfer_window());
        let now = Instant::now();
        self.inner
            .transfers
            .begin(request.from, request.to, now + window);
        if request.to == self.id()
            && !window.is_zero()
            && self.inner.transfers.campaign(now, window)
        {
            info!(
                from = request.from,
                "the leader hands over to this node: campaigning"
            );
            self.inner
                .raft
                .trigger()
                .elect()
                .await
                .map_err(|_| stopped())?;
        }
        Ok(())
    }

    fn transfer_window(&self) -> Duration {
        self.lease() * TRANSFER_WINDOW_LEASES
    }

    /// Hands this node's leadership to another voter, before a planned restart of the leader:
    /// the voter whose log matches this node's furthest (see the module doc). Returns the new
    /// leader once this node sees it lead (within `timeout`), or `None` when this node did not
    /// lead (nothing to do). Writes pause for the moment of the election.
    pub async fn step_down(&self, timeout: Duration) -> Result<Option<NodeId>, ClusterError> {
        let started = Instant::now();
        let metrics = self.metrics();
        if metrics.state != ServerState::Leader {
            return Ok(None);
        }
        let me = self.id();
        let membership = metrics.membership_config.membership();
        let matched = |id: NodeId| {
            metrics
                .replication
                .as_ref()
                .and_then(|r| r.get(&id).copied().flatten())
        };
        let Some(to) = membership
            .voter_ids()
            .filter(|&v| v != me)
            // The furthest match first, then the lowest id.
            .max_by_key(|&v| (matched(v), std::cmp::Reverse(v)))
        else {
            return Err(ClusterError::Membership(
                "this node is the only voter: no other node can lead".to_owned(),
            ));
        };
        let deadline = started + timeout;
        // A target whose log is as long as this node's cannot lose its campaign on the log.
        let last_index = metrics.last_log_index;
        let mut watch = self.inner.raft.metrics();
        let _ = timeout_at(
            deadline.min(Instant::now() + self.lease()),
            watch.wait_for(|m| {
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&to).copied().flatten());
                matched.map(|l| l.index) >= last_index || m.state != ServerState::Leader
            }),
        )
        .await;
        let window = self.transfer_window().min(timeout);
        self.inner.transfers.begin(me, to, Instant::now() + window);
        let runtime = self.inner.raft.runtime_config();
        runtime.heartbeat(false);
        info!(to, "handing the leadership over");
        let announce = TimeoutNow {
            from: me,
            term: metrics.current_term,
            to,
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
        };
        let delivered = self.announce(&metrics, announce).await;
        let moved = if delivered.contains(&to) {
            timeout_at(
                deadline,
                watch.wait_for(|m| known_leader(m).is_some_and(|l| l != me)),
            )
            .await
            .ok()
            .and_then(Result::ok)
            .and_then(|m| known_leader(&m))
        } else {
            warn!(
                to,
                "the hand-over target did not answer; this node leads on"
            );
            None
        };
        runtime.heartbeat(true);
        self.inner.transfers.end();
        match moved {
            Some(leader) => Ok(Some(leader)),
            None => {
                // Let the other voters elect as usual again at once.
                self.announce(
                    &metrics,
                    TimeoutNow {
                        window_ms: 0,
                        ..announce
                    },
                )
                .await;
                Err(ClusterError::StepDown {
                    waited_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                })
            }
        }
    }

    /// Sends `announce` to every other voter in parallel; returns those that took it.
    async fn announce(
        &self,
        metrics: &RaftMetrics<NodeId, Member>,
        announce: TimeoutNow,
    ) -> BTreeSet<NodeId> {
        let membership = metrics.membership_config.membership();
        let deadline =
            Instant::now() + Duration::from_millis(self.inner.raft_config.election_timeout_max);
        let mut sent = JoinSet::new();
        for id in membership.voter_ids().filter(|&v| v != self.id()) {
            let Some(member) = membership.get_node(&id).cloned() else {
                continue;
            };
            let this = self.clone();
            sent.spawn(async move {
                let answer = this.ask::<_, Result<(), ClusterError>>(
                    id,
                    &member,
                    RpcKind::TimeoutNow,
                    &announce,
                    deadline,
                );
                match answer.await {
                    Ok(Ok(())) => Some(id),
                    Ok(Err(e)) => {
                        warn!(peer = %member, error = %e, "hand-over refused");
                        None
                    }
                    Err(e) => {
                        warn!(peer = %member, error = %e.reason, "hand-over not delivered");
                        None
                    }
                }
            });
        }
        let mut delivered = BTreeSet::new();
        while let Some(joined) = sent.join_next().await {
            if let Ok(Some(id)) = joined {
                delivered.insert(id);
            }
        }
        delivered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_id(term: u64, index: u64) -> Option<LogId<NodeId>> {
        Some(LogId::new(openraft::CommittedLeaderId::new(term, 1), index))
    }

    fn view() -> VoterView {
        VoterView {
            leading_with_quorum: false,
            lease_holds: false,
            last_log_id: log_id(2, 10),
            transfer_to: None,
        }
    }

    fn request(candidate: NodeId, last: Option<LogId<NodeId>>) -> PreVoteRequest {
        PreVoteRequest {
            candidate,
            term: 2,
            last_log_id: last,
        }
    }

    #[test]
    fn test_pre_vote_granted_only_without_leader_transfer_or_better_log() {
        let up_to_date = request(7, log_id(2, 10));
        assert_eq!(decide(&view(), &up_to_date), PreVote::Granted);
        assert_eq!(decide(&view(), &request(7, log_id(3, 1))), PreVote::Granted);
        assert_eq!(
            decide(&view(), &request(7, log_id(2, 9))),
            PreVote::LogBehind
        );
        assert_eq!(decide(&view(), &request(7, None)), PreVote::LogBehind);
        let leading = VoterView {
            leading_with_quorum: true,
            ..view()
        };
        assert_eq!(decide(&leading, &up_to_date), PreVote::Leading);
        let following = VoterView {
            lease_holds: true,
            ..view()
        };
        assert_eq!(decide(&following, &up_to_date), PreVote::LeaderHeard);
        let handing_over = VoterView {
            transfer_to: Some(8),
            ..view()
        };
        assert_eq!(
            decide(&handing_over, &up_to_date),
            PreVote::Transferring { to: 8 }
        );
        assert_eq!(
            decide(&handing_over, &request(8, log_id(2, 10))),
            PreVote::Granted
        );
        // The target still needs the lease to have run out, as its real vote would.
        let handing_over_with_lease = VoterView {
            lease_holds: true,
            ..handing_over
        };
        assert_eq!(
            decide(&handing_over_with_lease, &request(8, log_id(2, 10))),
            PreVote::LeaderHeard
        );
    }

    #[test]
    fn test_quorum_needs_a_majority_of_every_joint_configuration() {
        let set = |ids: &[NodeId]| ids.iter().copied().collect::<BTreeSet<_>>();
        let three = vec![set(&[1, 2, 3])];
        assert!(!quorum(&three, &set(&[1])));
        assert!(quorum(&three, &set(&[1, 2])));
        assert!(quorum(&[set(&[1])], &set(&[1])));
        let joint = vec![set(&[1, 2, 3]), set(&[3, 4, 5])];
        assert!(!quorum(&joint, &set(&[1, 2])));
        assert!(!quorum(&joint, &set(&[1, 2, 3])));
        assert!(quorum(&joint, &set(&[1, 3, 4])));
        let four = vec![set(&[1, 2, 3, 4])];
        assert!(!quorum(&four, &set(&[1, 2])));
        assert!(quorum(&four, &set(&[1, 2, 3])));
        assert!(!quorum(&[], &set(&[1])));
    }

    #[test]
    fn test_a_transfer_ends_at_its_window_or_when_another_leader_is_known() {
        let transfers = Transfers::default();
        let now = Instant::now();
        assert_eq!(transfers.target(now, Some(1)), None);
        transfers.begin(1, 2, now + Duration::from_secs(1));
        assert_eq!(transfers.target(now, Some(1)), Some(2));
        assert_eq!(transfers.target(now, None), Some(2));
        assert_eq!(transfers.target(now + Duration::from_secs(1), None), None);
        assert_eq!(transfers.target(now, Some(1)), None, "expired is forgotten");
        transfers.begin(1, 2, now + Duration::from_secs(1));
        assert_eq!(transfers.target(now, Some(2)), None);
        assert_eq!(
            transfers.target(now, Some(1)),
            None,
            "finished is forgotten"
        );
        transfers.begin(1, 2, now + Duration::from_secs(1));
        transfers.end();
        assert_eq!(transfers.target(now, Some(1)), None);
    }
}

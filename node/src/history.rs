//! What the status page shows over time, kept in the node (nothing of it is exported or
//! persisted):
//!
//! * a bounded history of the node's counters, one [`Sample`] every [`SAMPLE_SECS`] for the last
//!   [`HISTORY_LEN`] samples (ten minutes), from which the page draws rates as sparklines;
//! * a bounded ring of recent [`Event`]s, found by comparing each observation (every
//!   [`OBSERVE_EVERY`]) with the one before: backend health changes, nodes joining, leaving,
//!   drained and undrained, leader changes, session sync turning warm or cold, BGP sessions going
//!   up or down.
//!
//! Decisions, in one place:
//! * [`Observations::observe`] is pure (the time comes in as an argument), so the unit tests
//!   drive it; [`run`] is the thin task around it.
//! * Events come from comparing snapshots a second apart, not from hooks in the health checker,
//!   Raft and BGP code: one place, and nothing on those paths changes. What changes and changes
//!   back within one observation is not an event; a leader change is still seen by its term.
//! * The history holds the node's and each service's totals; per backend only the last two
//!   counters are kept (1,000 backends × 120 samples would be most of the memory for a figure
//!   the page shows as one number).
//! * The figures are this node's own: what its data plane forwarded and dropped. The cluster's
//!   sum is what the Grafana dashboard shows.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use consensus::config::ClusterConfig;

use crate::admin::Admin;
use crate::api::{NodeStatus, Proto};

/// How often the node is observed for events.
pub(crate) const OBSERVE_EVERY: Duration = Duration::from_secs(1);
/// Seconds between two history samples.
pub(crate) const SAMPLE_SECS: u64 = 5;
/// Samples kept: ten minutes of them.
pub(crate) const HISTORY_LEN: usize = 120;
/// Events kept, the newest.
pub(crate) const EVENTS_KEPT: usize = 200;

/// A service as the page names it.
pub(crate) type ServiceId = (Proto, SocketAddr);
/// A backend of a service.
pub(crate) type BackendId = (Proto, SocketAddr, SocketAddr);

/// Packets and bytes, both directions together.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Volume {
    pub(crate) packets: u64,
    pub(crate) bytes: u64,
}

/// The node's counters at one moment.
#[derive(Debug, Clone)]
struct Sample {
    /// Unix seconds.
    at: u64,
    forwarded: Volume,
    drops: u64,
    sessions: u64,
    services: HashMap<ServiceId, Volume>,
}

/// A rate per second between two samples, or a gauge's value.
pub(crate) type Series = Vec<f64>;

/// Something that changed on the node or in the cluster as the node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Event {
    /// Unix seconds.
    pub(crate) at: u64,
    /// The change is for the worse (a backend down, a node gone, sync cold, …).
    pub(crate) bad: bool,
    pub(crate) text: String,
}

/// What events are found from: the states compared between two observations.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct View {
    backends: BTreeMap<BackendId, bool>,
    leader: Option<String>,
    term: Option<u64>,
    /// Members of the configuration by name, and whether each is drained.
    members: BTreeMap<String, bool>,
    warm: Option<bool>,
    bgp_peers: BTreeMap<String, bool>,
}

impl View {
    /// The view of this node's own status (`Admin::local_status`) and, on a cluster member,
    /// the configuration it applied.
    pub(crate) fn of(status: &NodeStatus, config: Option<&ClusterConfig>) -> View {
        let backends = status
            .services
            .iter()
            .flat_map(|s| {
                s.backends
                    .iter()
                    .map(move |b| ((s.proto, s.vip, b.addr), b.healthy))
            })
            .collect();
        let me = status.cluster.as_ref().and_then(|c| c.nodes.first());
        View {
            backends,
            leader: status.cluster.as_ref().and_then(|c| c.leader.clone()),
            term: me.and_then(|n| n.term),
            members: config
                .map(|c| {
                    c.nodes
                        .values()
                        .map(|n| (n.name.clone(), n.drained))
                        .collect()
                })
                .unwrap_or_default(),
            warm: status.sync.as_ref().map(|s| s.warm),
            bgp_peers: status
                .bgp
                .iter()
                .flat_map(|b| &b.peers)
                .map(|p| (p.name.clone(), p.established))
                .collect(),
        }
    }
}

/// What the page reads: the series and the events, copied out under the lock.
#[derive(Debug, Clone, Default)]
pub(crate) struct PageHistory {
    /// Seconds between two points of a series.
    pub(crate) step_secs: u64,
    pub(crate) packets_per_sec: Series,
    pub(crate) bytes_per_sec: Series,
    pub(crate) drops_per_sec: Series,
    pub(crate) sessions: Series,
    pub(crate) services: HashMap<ServiceId, (Series, Series)>,
    /// Each backend's packet and byte rate over the last sample interval.
    pub(crate) backends: HashMap<BackendId, (f64, f64)>,
    /// Newest first.
    pub(crate) events: Vec<Event>,
}

/// The history and the events of one node.
#[derive(Debug, Default)]
pub(crate) struct Observations {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    samples: VecDeque<Sample>,
    /// Each backend's counters at the last two samples, and those samples' times.
    backends_then: (u64, HashMap<BackendId, Volume>),
    backends_now: (u64, HashMap<BackendId, Volume>),
    events: VecDeque<Event>,
    last: Option<View>,
}

impl Observations {
    /// Takes one observation at `at` (Unix seconds): records the events since the last one and,
    /// every [`SAMPLE_SECS`], a sample of the counters.
    pub(crate) fn observe(&self, at: u64, status: &NodeStatus, view: View) {
        let mut inner = self.inner.lock();
        match &inner.last {
            None => inner.push_event(Event {
                at,
                bad: false,
                text: format!("node {} observed first", status.node),
            }),
            Some(last) => {
                for event in changes(at, last, &view) {
                    inner.push_event(event);
                }
            }
        }
        inner.last = Some(view);
        let due = inner
            .samples
            .back()
            .is_none_or(|s| at.saturating_sub(s.at) >= SAMPLE_SECS);
        if due {
            inner.sample(at, status);
        }
    }

    /// Copies out what the page shows.
    pub(crate) fn page(&self) -> PageHistory {
        let inner = self.inner.lock();
        let pairs: Vec<(&Sample, &Sample)> = inner
            .samples
            .iter()
            .zip(inner.samples.iter().skip(1))
            .filter(|(a, b)| b.at > a.at)
            .collect();
        let rate = |f: &dyn Fn(&Sample) -> u64| -> Series {
            pairs
                .iter()
                .map(|(a, b)| f(b).saturating_sub(f(a)) as f64 / (b.at - a.at) as f64)
                .collect()
        };
        let services = inner
            .samples
            .back()
            .map(|s| s.services.keys().copied().collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .map(|id| {
                let get = |s: &Sample| s.services.get(&id).copied().unwrap_or_default();
                (id, (rate(&|s| get(s).packets), rate(&|s| get(s).bytes)))
            })
            .collect();
        let ((then, before), (now, after)) = (&inner.backends_then, &inner.backends_now);
        let backends = if now > then {
            let secs = (now - then) as f64;
            after
                .iter()
                .filter_map(|(id, v)| {
                    let b = before.get(id)?;
                    Some((
                        *id,
                        (
                            v.packets.saturating_sub(b.packets) as f64 / secs,
                            v.bytes.saturating_sub(b.bytes) as f64 / secs,
                        ),
                    ))
                })
                .collect()
        } else {
            HashMap::new()
        };
        PageHistory {
            step_secs: SAMPLE_SECS,
            packets_per_sec: rate(&|s| s.forwarded.packets),
            bytes_per_sec: rate(&|s| s.forwarded.bytes),
            drops_per_sec: rate(&|s| s.drops),
            sessions: inner.samples.iter().map(|s| s.sessions as f64).collect(),
            services,
            backends,
            events: inner.events.iter().rev().cloned().collect(),
        }
    }
}

impl Inner {
    fn push_event(&mut self, event: Event) {
        if self.events.len() == EVENTS_KEPT {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    fn sample(&mut self, at: u64, status: &NodeStatus) {
        let mut forwarded = Volume::default();
        let mut services = HashMap::with_capacity(status.services.len());
        let mut backends = HashMap::new();
        for s in &status.services {
            let t = &s.traffic;
            let v = Volume {
                packets: t.packets_in + t.packets_out,
                bytes: t.bytes_in + t.bytes_out,
            };
            forwarded.packets += v.packets;
            forwarded.bytes += v.bytes;
            services.insert((s.proto, s.vip), v);
            for b in &s.backends {
                let t = &b.traffic;
                backends.insert(
                    (s.proto, s.vip, b.addr),
                    Volume {
                        packets: t.packets_in + t.packets_out,
                        bytes: t.bytes_in + t.bytes_out,
                    },
                );
            }
        }
        if self.samples.len() == HISTORY_LEN {
            self.samples.pop_front();
        }
        self.samples.push_back(Sample {
            at,
            forwarded,
            drops: status.total_drops(),
            sessions: status.sessions.count as u64,
            services,
        });
        self.backends_then = std::mem::replace(&mut self.backends_now, (at, backends));
    }
}

/// The events between two views.
fn changes(at: u64, before: &View, now: &View) -> Vec<Event> {
    let mut events = Vec::new();
    let mut push = |bad: bool, text: String| events.push(Event { at, bad, text });
    for ((proto, vip, addr), healthy) in &now.backends {
        let was = before.backends.get(&(*proto, *vip, *addr));
        if was.is_some_and(|w| w != healthy) {
            let state = if *healthy { "up" } else { "DOWN" };
            push(
                !healthy,
                format!("backend {addr} of {proto} {vip}: health check {state}"),
            );
        }
    }
    for (name, drained) in &now.members {
        match before.members.get(name) {
            None if !before.members.is_empty() => push(false, format!("node {name} joined")),
            Some(was) if was != drained => push(
                *drained,
                format!(
                    "node {name} {}",
                    if *drained { "drained" } else { "undrained" }
                ),
            ),
            _ => {}
        }
    }
    for name in before.members.keys() {
        if !now.members.contains_key(name) {
            push(true, format!("node {name} left the cluster"));
        }
    }
    if before.leader != now.leader || (now.term > before.term && before.term.is_some()) {
        let term = now
            .term
            .map_or_else(String::new, |t| format!(" (term {t})"));
        match &now.leader {
            Some(l) => push(false, format!("leader is {l}{term}")),
            None => push(true, format!("no leader known{term}")),
        }
    }
    if let (Some(was), Some(warm)) = (before.warm, now.warm)
        && was != warm
    {
        push(
            !warm,
            format!(
                "session sync {}",
                if warm {
                    "warm"
                } else {
                    "COLD: a peer's table has not arrived"
                }
            ),
        );
    }
    for (peer, up) in &now.bgp_peers {
        if before.bgp_peers.get(peer).is_some_and(|was| was != up) {
            push(
                !up,
                format!(
                    "BGP session with {peer} {}",
                    if *up { "established" } else { "DOWN" }
                ),
            );
        }
    }
    events
}

/// Unix seconds now.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Observes the node every [`OBSERVE_EVERY`] until `shutdown` completes.
pub(crate) async fn run(
    admin: Admin,
    observations: Arc<Observations>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let mut tick = tokio::time::interval(OBSERVE_EVERY);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = &mut shutdown => return,
        }
        let status = admin.local_status();
        let config = admin.cluster.as_ref().map(|c| c.cluster.local_config());
        let view = View::of(&status, config.as_deref());
        observations.observe(unix_now(), &status, view);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(up: bool) -> View {
        let vip: SocketAddr = "198.18.100.1:80".parse().unwrap();
        let addr: SocketAddr = "198.18.3.2:8080".parse().unwrap();
        View {
            backends: [((Proto::Tcp, vip, addr), up)].into(),
            leader: Some("n1".to_owned()),
            term: Some(2),
            members: [("n1".to_owned(), false), ("n2".to_owned(), false)].into(),
            warm: Some(true),
            bgp_peers: [("router".to_owned(), true)].into(),
        }
    }

    #[test]
    fn test_changes_backend_drain_leader_membership_sync_bgp() {
        let before = backend(true);
        assert!(changes(10, &before, &before).is_empty());

        let now = View {
            leader: Some("n2".to_owned()),
            term: Some(3),
            members: [("n1".to_owned(), false), ("n3".to_owned(), true)].into(),
            warm: Some(false),
            bgp_peers: [("router".to_owned(), false)].into(),
            ..backend(false)
        };
        let texts: Vec<(bool, String)> = changes(11, &before, &now)
            .into_iter()
            .map(|e| (e.bad, e.text))
            .collect();
        for want in [
            (
                true,
                "backend 198.18.3.2:8080 of TCP 198.18.100.1:80: health check DOWN",
            ),
            (false, "node n3 joined"),
            (true, "node n2 left the cluster"),
            (false, "leader is n2 (term 3)"),
            (true, "session sync COLD: a peer's table has not arrived"),
            (true, "BGP session with router DOWN"),
        ] {
            assert!(
                texts.iter().any(|(b, t)| (*b, t.as_str()) == want),
                "{want:?} not in {texts:#?}"
            );
        }
        // A drain is seen on a member that stays.
        let drained = View {
            members: [("n1".to_owned(), true), ("n2".to_owned(), false)].into(),
            ..backend(true)
        };
        let events = changes(12, &before, &drained);
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].text, "node n1 drained");
        // A new term with the same leader is an election too.
        let reelected = View {
            term: Some(5),
            ..backend(true)
        };
        assert_eq!(
            changes(13, &before, &reelected)[0].text,
            "leader is n1 (term 5)"
        );
    }

    #[test]
    fn test_events_and_history_are_bounded() {
        let obs = Observations::default();
        let status = crate::page::tests::status(1, 1, 1);
        for i in 0..(EVENTS_KEPT as u64 + 10) {
            obs.observe(i * SAMPLE_SECS, &status, backend(i % 2 == 0));
        }
        let page = obs.page();
        assert_eq!(page.events.len(), EVENTS_KEPT);
        // Newest first: the last observation's event (i odd: down).
        assert!(page.events[0].text.ends_with("health check DOWN"));
        assert_eq!(page.sessions.len(), HISTORY_LEN);
        assert_eq!(page.packets_per_sec.len(), HISTORY_LEN - 1);
    }

    #[test]
    fn test_rates_from_counters() {
        let obs = Observations::default();
        let mut status = crate::page::tests::status(1, 1, 2);
        let view = View::of(&status, None);
        obs.observe(100, &status, view.clone());
        // Between samples only events are taken.
        obs.observe(101, &status, view.clone());
        let svc = &mut status.services[0];
        svc.traffic.packets_in += 500;
        svc.traffic.bytes_out += 50_000;
        svc.backends[1].traffic.packets_in += 500;
        svc.backends[1].traffic.bytes_out += 50_000;
        status.drops[0].count += 10;
        obs.observe(100 + SAMPLE_SECS, &status, view);
        let page = obs.page();
        assert_eq!(page.packets_per_sec, vec![100.0]);
        assert_eq!(page.bytes_per_sec, vec![10_000.0]);
        assert_eq!(page.drops_per_sec, vec![2.0]);
        let svc = &status.services[0];
        let (packets, bytes) = &page.services[&(svc.proto, svc.vip)];
        assert_eq!(
            (packets.as_slice(), bytes.as_slice()),
            (&[100.0][..], &[10_000.0][..])
        );
        assert_eq!(
            page.backends[&(svc.proto, svc.vip, svc.backends[1].addr)],
            (100.0, 10_000.0)
        );
        assert_eq!(
            page.backends[&(svc.proto, svc.vip, svc.backends[0].addr)],
            (0.0, 0.0)
        );
    }
}

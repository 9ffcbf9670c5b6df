//! Prometheus metrics over HTTP (`GET /metrics`, text exposition format 0.0.4). Every figure is
//! read from the node state and the engine when scraped; nothing is counted twice.
//!
//! Written by hand rather than with an OpenMetrics encoder: OpenMetrics forbids a gauge
//! `lbcluster_backend_connections` next to the counter `lbcluster_backend_connections_total`,
//! and operators of IPVS exporters expect both. The format is a few lines of escaping.
//!
//! The engine counts sessions of both families together and keeps no per-VIP or per-backend
//! packet and byte counters, so neither is exported.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use dataplane::service::Traffic;

use consensus::Role;

use crate::admin::Admin;
use crate::api::{
    BackendStatus, ClusterStatus, LipPorts, NamedCount, NodeStatus, ServiceStatus, SyncPeer,
    SyncStatus, WorkerIoStats,
};
use crate::history::Observations;
use crate::packet_io::FastPathStatus;

const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `/metrics`, and the status page at `/` ([`crate::page`]), until `shutdown` completes.
pub(crate) async fn serve(
    listener: TcpListener,
    admin: Admin,
    observations: Arc<Observations>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(admin.clone())
        .merge(crate::page::router(admin, observations));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// A scrape reads this node's own view of the cluster, never asks the peers.
async fn scrape(State(admin): State<Admin>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        exposition(&admin.local_status()),
    )
}

type Labels = Vec<(&'static str, String)>;
/// Labels and value of one sample.
type Sample = (Labels, u64);

#[derive(Debug, Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    /// A gauge whose samples are millionths of its unit, written as decimals (seconds from
    /// microseconds).
    GaugeMicros,
}

/// One metric family: full name, help, type and its samples.
#[derive(Debug)]
struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    samples: Vec<Sample>,
}

/// The whole exposition of a node's status.
fn exposition(status: &NodeStatus) -> String {
    // Writing into a String cannot fail, so the fmt::Results below carry no information.
    let mut out = String::new();
    for f in families(status) {
        let kind = match f.kind {
            Kind::Counter => "counter",
            Kind::Gauge | Kind::GaugeMicros => "gauge",
        };
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {kind}", f.name);
        for (labels, value) in &f.samples {
            out.push_str(f.name);
            if !labels.is_empty() {
                out.push('{');
                for (i, (k, v)) in labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let _ = write!(out, "{k}=\"{}\"", escape(v));
                }
                out.push('}');
            }
            let _ = match f.kind {
                Kind::GaugeMicros => {
                    writeln!(out, " {}.{:06}", value / 1_000_000, value % 1_000_000)
                }
                Kind::Counter | Kind::Gauge => writeln!(out, " {value}"),
            };
        }
    }
    out
}

/// A label value with backslash, double quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The samples `f` gives of a running fast path; none without one.
fn fastpath(s: &NodeStatus, f: fn(&FastPathStatus) -> Vec<Sample>) -> Vec<Sample> {
    s.fastpath
        .as_ref()
        .filter(|fp| fp.running)
        .map(f)
        .unwrap_or_default()
}

fn families(s: &NodeStatus) -> Vec<Family> {
    let backend_labels = |svc: &ServiceStatus, b: &BackendStatus| -> Labels {
        vec![
            ("vip", svc.vip.ip().to_string()),
            ("port", svc.vip.port().to_string()),
            ("proto", svc.proto.to_string().to_lowercase()),
            ("backend", b.addr.to_string()),
        ]
    };
    // `f` gives each backend's samples, with the labels they add to the backend's.
    let per_backend = |f: fn(&BackendStatus) -> Vec<Sample>| {
        s.services
            .iter()
            .flat_map(|svc| {
                svc.backends.iter().flat_map(move |b| {
                    f(b).into_iter().map(move |(extra, v)| {
                        let mut l = backend_labels(svc, b);
                        l.extend(extra);
                        (l, v)
                    })
                })
            })
            .collect::<Vec<_>>()
    };
    let per_service = |f: fn(&Traffic) -> Vec<Sample>| {
        s.services
            .iter()
            .flat_map(|svc| {
                f(&svc.traffic).into_iter().map(move |(extra, v)| {
                    let mut l = vec![
                        ("vip", svc.vip.ip().to_string()),
                        ("port", svc.vip.port().to_string()),
                        ("proto", svc.proto.to_string().to_lowercase()),
                    ];
                    l.extend(extra);
                    (l, v)
                })
            })
            .collect::<Vec<_>>()
    };
    let lip = |f: fn(&LipPorts) -> u32| {
        s.local_addrs
            .iter()
            .map(|u| {
                (
                    vec![
                        ("lip", u.ip.to_string()),
                        ("proto", u.proto.to_string().to_lowercase()),
                    ],
                    u64::from(f(u)),
                )
            })
            .collect()
    };
    let named = |counts: &[NamedCount], label: &'static str| {
        counts
            .iter()
            .map(|c| (vec![(label, c.name.clone())], c.count))
            .collect::<Vec<_>>()
    };
    let event = |name: &str| {
        s.events
            .iter()
            .find(|e| e.name == name)
            .map_or(0, |e| e.count)
    };
    vec![
        Family {
            name: "lbcluster_backend_connections",
            help: "Connections of a backend by state: active (established) or inactive.",
            kind: Kind::Gauge,
            samples: per_backend(|b| {
                vec![
                    (vec![("state", "active".to_owned())], u64::from(b.active)),
                    (
                        vec![("state", "inactive".to_owned())],
                        u64::from(b.inactive),
                    ),
                ]
            }),
        },
        Family {
            name: "lbcluster_backend_connections_total",
            help: "Connections scheduled to or installed for a backend.",
            kind: Kind::Counter,
            samples: per_backend(|b| vec![(vec![], b.total)]),
        },
        Family {
            name: "lbcluster_backend_packets_total",
            help: "Packets forwarded for a backend: in = client to backend, out = back.",
            kind: Kind::Counter,
            samples: per_backend(|b| directions(b.traffic.packets_in, b.traffic.packets_out)),
        },
        Family {
            name: "lbcluster_backend_bytes_total",
            help: "IP bytes forwarded for a backend: in = client to backend, out = back.",
            kind: Kind::Counter,
            samples: per_backend(|b| directions(b.traffic.bytes_in, b.traffic.bytes_out)),
        },
        Family {
            name: "lbcluster_service_packets_total",
            help: "Packets forwarded for a virtual service (its backends' sum).",
            kind: Kind::Counter,
            samples: per_service(|t| directions(t.packets_in, t.packets_out)),
        },
        Family {
            name: "lbcluster_service_bytes_total",
            help: "IP bytes forwarded for a virtual service (its backends' sum).",
            kind: Kind::Counter,
            samples: per_service(|t| directions(t.bytes_in, t.bytes_out)),
        },
        Family {
            name: "lbcluster_backend_up",
            help: "1 if the backend passes its health checks, else 0.",
            kind: Kind::Gauge,
            samples: per_backend(|b| vec![(vec![], u64::from(b.healthy))]),
        },
        Family {
            name: "lbcluster_backend_weight",
            help: "Configured weight of the backend.",
            kind: Kind::Gauge,
            samples: per_backend(|b| vec![(vec![], u64::from(b.weight))]),
        },
        Family {
            name: "lbcluster_drops_total",
            help: "Packets dropped by the engine, by reason.",
            kind: Kind::Counter,
            samples: named(&s.drops, "reason"),
        },
        Family {
            name: "lbcluster_packets_forwarded_total",
            help: "Packets forwarded, client to backend (inbound) or back (outbound).",
            kind: Kind::Counter,
            samples: vec![
                (
                    vec![("direction", "inbound".to_owned())],
                    event("forwarded_inbound"),
                ),
                (
                    vec![("direction", "outbound".to_owned())],
                    event("forwarded_outbound"),
                ),
            ],
        },
        Family {
            name: "lbcluster_engine_events_total",
            help: "Other things the engine did, by event.",
            kind: Kind::Counter,
            samples: named(&s.events, "event")
                .into_iter()
                .filter(|(l, _)| !l[0].1.starts_with("forwarded_"))
                .collect(),
        },
        Family {
            name: "lbcluster_sessions",
            help: "Sessions in the table, by address family.",
            kind: Kind::Gauge,
            samples: per_family(s.sessions.by_family.v4, s.sessions.by_family.v6),
        },
        Family {
            name: "lbcluster_sessions_capacity",
            help: "Sessions the table can hold, by address family.",
            kind: Kind::Gauge,
            samples: per_family(
                s.sessions.by_family.v4_capacity,
                s.sessions.by_family.v6_capacity,
            ),
        },
        Family {
            name: "lbcluster_local_ports_in_use",
            help: "Local ports held on a local address (LIP).",
            kind: Kind::Gauge,
            samples: lip(|u| u.in_use),
        },
        Family {
            name: "lbcluster_local_ports_capacity",
            help: "Local ports available on a local address (LIP).",
            kind: Kind::Gauge,
            samples: lip(|u| u.capacity),
        },
        Family {
            name: "lbcluster_io_packets_total",
            help: "Packets a packet worker read or wrote (drops: lbcluster_drops_total).",
            kind: Kind::Counter,
            samples: per_worker(&s.io, |w| {
                vec![("read", w.packets_read), ("written", w.packets_written)]
            }),
        },
        Family {
            name: "lbcluster_io_read_bytes_total",
            help: "IP bytes a packet worker read.",
            kind: Kind::Counter,
            samples: per_worker(&s.io, |w| vec![("read", w.bytes_read)]),
        },
        Family {
            name: "lbcluster_io_gso_packets_total",
            help: "Packets read as GSO super-packets (several segments in one read).",
            kind: Kind::Counter,
            samples: per_worker(&s.io, |w| vec![("read", w.gso_packets)]),
        },
        Family {
            name: "lbcluster_io_errors_total",
            help: "Read and write errors of a packet worker.",
            kind: Kind::Counter,
            samples: per_worker(&s.io, |w| {
                vec![("read", w.read_errors), ("write", w.write_errors)]
            }),
        },
        Family {
            name: "lbcluster_fastpath_running",
            help: "1 while the kernel fast path forwards established flows, else 0.",
            kind: Kind::Gauge,
            samples: vec![(
                vec![],
                u64::from(s.fastpath.as_ref().is_some_and(|f| f.running)),
            )],
        },
        Family {
            name: "lbcluster_fastpath_sessions",
            help: "Sessions the kernel fast path forwards now.",
            kind: Kind::Gauge,
            samples: fastpath(s, |f| vec![(vec![], f.sessions.offloaded)]),
        },
        Family {
            name: "lbcluster_fastpath_offloads_total",
            help: "Sessions handed to the fast path (refused: its map was full).",
            kind: Kind::Counter,
            samples: fastpath(s, |f| {
                vec![
                    (
                        vec![("result", "offloaded".to_owned())],
                        f.sessions.offloads,
                    ),
                    (vec![("result", "refused".to_owned())], f.sessions.refused),
                ]
            }),
        },
        Family {
            name: "lbcluster_fastpath_packets_total",
            help: "Packets the fast path saw at the uplinks: forwarded, or left to the kernel \
                   and the engine, by why.",
            kind: Kind::Counter,
            samples: fastpath(s, |f| {
                let p = &f.program;
                [
                    ("forwarded", p.forwarded),
                    ("no_entry", p.no_entry),
                    ("not_forwardable", p.not_forwardable),
                    ("no_route", p.no_route),
                    ("rewrite_failed", p.rewrite_failed),
                    ("too_big", p.too_big),
                ]
                .into_iter()
                .map(|(r, n)| (vec![("result", r.to_owned())], n))
                .collect()
            }),
        },
        Family {
            name: "lbcluster_config_version",
            help: "Version of the service set the data plane runs.",
            kind: Kind::Gauge,
            samples: vec![(vec![], s.config_version)],
        },
        Family {
            name: "lbcluster_uptime_seconds",
            help: "Seconds since the daemon started.",
            kind: Kind::Gauge,
            samples: vec![(vec![], s.uptime_secs)],
        },
    ]
    .into_iter()
    .chain(s.cluster.iter().flat_map(cluster_families))
    .chain(s.sync.iter().flat_map(sync_families))
    .chain(s.bgp.iter().flat_map(bgp_families))
    .collect()
}

/// BGP: sessions and announcements.
fn bgp_families(b: &consensus::BgpReport) -> Vec<Family> {
    vec![
        Family {
            name: "lbcluster_bgp_peer_established",
            help: "1 while the BGP session with a peer is established.",
            kind: Kind::Gauge,
            samples: b
                .peers
                .iter()
                .map(|p| (vec![("peer", p.name.clone())], u64::from(p.established)))
                .collect(),
        },
        Family {
            name: "lbcluster_bgp_vips_announced",
            help: "VIPs this node announces now.",
            kind: Kind::Gauge,
            samples: vec![(vec![], b.vips_announced.len() as u64)],
        },
        Family {
            name: "lbcluster_bgp_vips_configured",
            help: "VIPs of the configuration.",
            kind: Kind::Gauge,
            samples: vec![(vec![], u64::from(b.vips_configured))],
        },
        Family {
            name: "lbcluster_bgp_graceful_shutdown",
            help: "1 while the VIPs carry the graceful-shutdown community (draining).",
            kind: Kind::Gauge,
            samples: vec![(vec![], u64::from(b.graceful_shutdown))],
        },
    ]
}

/// Session sync: warm or cold, and per peer.
fn sync_families(sync: &SyncStatus) -> Vec<Family> {
    let per_peer = |f: fn(&SyncPeer) -> u64| {
        sync.peers
            .iter()
            .map(|p| (vec![("peer", p.peer.clone())], f(p)))
            .collect()
    };
    vec![
        Family {
            name: "lbcluster_sync_warm",
            help: "1 once every peer's session table has arrived since it connected, else 0.",
            kind: Kind::Gauge,
            samples: vec![(vec![], u64::from(sync.warm))],
        },
        Family {
            name: "lbcluster_sync_peer_connected",
            help: "1 while the session sync connection to a peer is up.",
            kind: Kind::Gauge,
            samples: per_peer(|p| u64::from(p.connected)),
        },
        Family {
            name: "lbcluster_sync_updates_total",
            help: "Session updates exchanged with a peer, by direction.",
            kind: Kind::Counter,
            samples: sync
                .peers
                .iter()
                .flat_map(|p| {
                    [("sent", p.sent), ("received", p.received)].map(|(d, v)| {
                        (
                            vec![("peer", p.peer.clone()), ("direction", d.to_owned())],
                            v,
                        )
                    })
                })
                .collect(),
        },
        Family {
            name: "lbcluster_sync_dropped_total",
            help: "Session updates and frames of a peer dropped, every reason together.",
            kind: Kind::Counter,
            samples: per_peer(|p| p.dropped),
        },
        Family {
            name: "lbcluster_sync_queue_depth",
            help: "Session updates waiting to be sent to a peer.",
            kind: Kind::Gauge,
            samples: per_peer(|p| p.queue_depth),
        },
        Family {
            name: "lbcluster_sync_lag_seconds",
            help: "From a session event on a peer to its update applied here: the last one.",
            kind: Kind::GaugeMicros,
            samples: per_peer(|p| p.lag_last_us),
        },
        Family {
            name: "lbcluster_sync_resyncs_total",
            help: "Times a peer's queue overflowed and it was sent the whole table again.",
            kind: Kind::Counter,
            samples: per_peer(|p| p.resyncs),
        },
        Family {
            name: "lbcluster_sync_applied_total",
            help: "Peers' session updates applied to the engine, by result; reconciled: copies \
                   dropped because their owner's complete table no longer had them.",
            kind: Kind::Counter,
            samples: [
                ("installed", sync.installed),
                ("removed", sync.removed),
                ("refused", sync.refused),
                ("reconciled", sync.reconciled),
            ]
            .map(|(r, v)| (vec![("result", r.to_owned())], v))
            .to_vec(),
        },
        Family {
            name: "lbcluster_sync_refused_total",
            help: "Peers' session updates refused, by reason.",
            kind: Kind::Counter,
            samples: sync
                .refused_by
                .iter()
                .map(|(reason, v)| (vec![("reason", reason.clone())], *v))
                .collect(),
        },
    ]
}

/// The cluster member's own Raft state and its QUIC endpoint's peers.
fn cluster_families(c: &ClusterStatus) -> Vec<Family> {
    let me = c.nodes.first();
    let gauge = |name, help, v: Option<u64>| Family {
        name,
        help,
        kind: Kind::Gauge,
        samples: v.map(|v| (vec![], v)).into_iter().collect(),
    };
    let results = |pairs: &[(&str, u64)]| {
        pairs
            .iter()
            .map(|&(r, v)| (vec![("result", r.to_owned())], v))
            .collect()
    };
    vec![
        gauge(
            "lbcluster_raft_term",
            "The Raft term this node is in.",
            me.and_then(|n| n.term),
        ),
        gauge(
            "lbcluster_raft_leader",
            "1 when this node is the Raft leader, else 0.",
            me.map(|n| u64::from(n.role == Some(Role::Leader))),
        ),
        gauge(
            "lbcluster_raft_commit_index",
            "The last Raft log index this node knows to be committed.",
            me.and_then(|n| n.committed),
        ),
        gauge(
            "lbcluster_raft_applied_index",
            "The last Raft log index this node applied.",
            me.and_then(|n| n.applied),
        ),
        gauge(
            "lbcluster_node_drained",
            "1 while the configuration has this node drained, else 0.",
            me.map(|n| u64::from(n.drained)),
        ),
        gauge(
            "lbcluster_cluster_config_version",
            "Version of the cluster configuration this node applied.",
            Some(c.config_version),
        ),
        Family {
            name: "lbcluster_quic_peers_total",
            help: "QUIC connections by outcome: accepted, or refused (certificate not from the \
                   cluster CA, or node not a member).",
            kind: Kind::Counter,
            samples: results(&[
                ("accepted", c.quic.accepted),
                ("refused_untrusted_ca", c.quic.refused_untrusted_ca),
                ("refused_not_member", c.quic.refused_not_member),
            ]),
        },
        Family {
            name: "lbcluster_raft_rpcs_total",
            help: "Raft RPC streams this node served, by outcome (refused: not a member, \
                   another cluster, or in another node's name).",
            kind: Kind::Counter,
            samples: results(&[
                ("answered", c.raft_rpcs.answered),
                ("malformed", c.raft_rpcs.malformed),
                ("oversized", c.raft_rpcs.oversized),
                ("abandoned", c.raft_rpcs.abandoned),
                ("refused", c.raft_rpcs.refused),
            ]),
        },
        Family {
            name: "lbcluster_raft_connections_revoked_total",
            help: "Raft connections closed because their peer stopped being a member.",
            kind: Kind::Counter,
            samples: vec![(Vec::new(), c.raft_rpcs.revoked)],
        },
    ]
}

/// One sample per worker and operation, labelled `worker` and `op`.
fn per_worker(
    io: &[WorkerIoStats],
    f: impl Fn(&WorkerIoStats) -> Vec<(&'static str, u64)>,
) -> Vec<Sample> {
    io.iter()
        .enumerate()
        .flat_map(|(i, w)| {
            f(w).into_iter()
                .map(move |(op, v)| (vec![("worker", i.to_string()), ("op", op.to_owned())], v))
        })
        .collect()
}

/// The two samples of a per-direction counter.
fn directions(inbound: u64, outbound: u64) -> Vec<Sample> {
    vec![
        (vec![("direction", "in".to_owned())], inbound),
        (vec![("direction", "out".to_owned())], outbound),
    ]
}

/// The two samples of a per-family gauge.
fn per_family(v4: usize, v6: usize) -> Vec<Sample> {
    vec![
        (vec![("family", "ipv4".to_owned())], v4 as u64),
        (vec![("family", "ipv6".to_owned())], v6 as u64),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_sync_families() {
        let sync = SyncStatus {
            warm: true,
            epoch: 1,
            installed: 10,
            removed: 4,
            refused: 3,
            refused_by: [("conflict".to_owned(), 1), ("not_owner".to_owned(), 2)].into(),
            reconciled: 5,
            peers: vec![SyncPeer {
                peer: "n2".to_owned(),
                connected: true,
                bulk_complete: true,
                sent: 7,
                received: 9,
                dropped: 2,
                queue_depth: 3,
                resyncs: 1,
                lag_last_us: 100,
                lag_max_us: 900,
            }],
        };
        let text = samples(&sync_families(&sync));
        for want in [
            "lbcluster_sync_warm{} 1",
            "lbcluster_sync_peer_connected{peer=n2} 1",
            "lbcluster_sync_updates_total{peer=n2,direction=sent} 7",
            "lbcluster_sync_updates_total{peer=n2,direction=received} 9",
            "lbcluster_sync_dropped_total{peer=n2} 2",
            "lbcluster_sync_queue_depth{peer=n2} 3",
            "lbcluster_sync_lag_seconds{peer=n2} 100",
            "lbcluster_sync_applied_total{result=refused} 3",
            "lbcluster_sync_applied_total{result=reconciled} 5",
            "lbcluster_sync_refused_total{reason=conflict} 1",
            "lbcluster_sync_refused_total{reason=not_owner} 2",
        ] {
            assert!(text.iter().any(|t| t == want), "{want} not in {text:#?}");
        }
    }

    /// The lag is exported in seconds, from the microseconds the node keeps.
    #[test]
    fn test_exposition_writes_micros_as_seconds() {
        let text = exposition(&crate::page::tests::status(2, 1, 1));
        assert!(
            text.contains("\nlbcluster_sync_lag_seconds{peer=\"n2\"} 0.001500\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE lbcluster_sync_lag_seconds gauge\n"));
    }

    /// Every sample as `name{k=v,...} value`.
    fn samples(families: &[Family]) -> Vec<String> {
        families
            .iter()
            .flat_map(|f| {
                f.samples.iter().map(|(labels, v)| {
                    let labels: Vec<String> =
                        labels.iter().map(|(k, l)| format!("{k}={l}")).collect();
                    format!("{}{{{}}} {v}", f.name, labels.join(","))
                })
            })
            .collect()
    }

    /// A cluster member exports its own Raft state and its QUIC peers' outcomes.
    #[test]
    fn test_cluster_families() {
        let cluster = ClusterStatus {
            quorum: true,
            read_error: None,
            config_version: 12,
            cluster_id: Some("ab".repeat(16)),
            leader: Some("n1".to_owned()),
            nodes: vec![consensus::NodeReport {
                id: 7,
                name: "n1".to_owned(),
                addr: "198.18.51.2:7946".parse().unwrap(),
                reachable: true,
                role: Some(Role::Leader),
                term: Some(3),
                committed: Some(40),
                applied: Some(39),
                config_version: Some(12),
                leader: Some(7),
                voter: true,
                warm: Some(true),
                drained: false,
                bgp: None,
            }],
            quic: crate::quic::CounterValues {
                refused_untrusted_ca: 2,
                refused_not_member: 1,
                accepted: 5,
            },
            raft_rpcs: consensus::transport::ServeCounterValues {
                answered: 100,
                malformed: 1,
                refused: 4,
                revoked: 2,
                ..Default::default()
            },
        };
        let text = samples(&cluster_families(&cluster));
        for want in [
            "lbcluster_raft_term{} 3",
            "lbcluster_raft_leader{} 1",
            "lbcluster_raft_commit_index{} 40",
            "lbcluster_raft_applied_index{} 39",
            "lbcluster_node_drained{} 0",
            "lbcluster_cluster_config_version{} 12",
            "lbcluster_quic_peers_total{result=refused_untrusted_ca} 2",
            "lbcluster_quic_peers_total{result=accepted} 5",
            "lbcluster_raft_rpcs_total{result=malformed} 1",
            "lbcluster_raft_rpcs_total{result=refused} 4",
            "lbcluster_raft_connections_revoked_total{} 2",
        ] {
            assert!(text.iter().any(|t| t == want), "{want} not in {text:#?}");
        }
    }
}

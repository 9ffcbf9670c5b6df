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

use crate::api::{BackendStatus, LipPorts, NamedCount, NodeStatus, ServiceStatus, WorkerIoStats};
use crate::state::NodeState;

const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `/metrics` until `shutdown` completes.
pub(crate) async fn serve(
    listener: TcpListener,
    state: Arc<NodeState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn scrape(State(state): State<Arc<NodeState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        exposition(&state.status()),
    )
}

type Labels = Vec<(&'static str, String)>;
/// Labels and value of one sample.
type Sample = (Labels, u64);

#[derive(Debug, Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
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
            Kind::Gauge => "gauge",
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
            let _ = writeln!(out, " {value}");
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

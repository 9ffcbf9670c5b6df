//! The live status page (`GET /` on the metrics address): the cluster, this node's services
//! and backends, sessions and local ports, drops, session sync, the fast path and recent events,
//! with this node's rates over the last ten minutes as SVG sparklines ([`crate::history`]).
//!
//! Read-only and secret-free: the handler reads [`Admin::status`] (what `lbcluster status`
//! shows) and the history, and changes nothing; it shows no join token, no key and no
//! certificate (the cluster id on it is the identity's public half, as `status` prints it).
//! It marks what is degraded by [`NodeStatus::health`], the judgement `status` exits with, and
//! by the same per-row facts (a node unreachable, a backend down, no quorum).
//!
//! Server-rendered HTML; a little inline script refetches the page every `refresh` seconds and
//! swaps its `main` element, records script errors in the page (`#script-errors`,
//! `data-script-errors`) and marks the body `data-script="ok"` once it runs. Every text from the
//! configuration or a peer is escaped.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

use consensus::Role;

use crate::admin::Admin;
use crate::api::{Health, NodeStatus, ServiceStatus, SyncStatus, scheduler_name};
use crate::history::{Observations, PageHistory, Series};

/// Seconds between two refreshes unless the query asks otherwise.
const DEFAULT_REFRESH_SECS: u32 = 5;
/// The range `?refresh=` accepts.
const REFRESH_RANGE: std::ops::RangeInclusive<u32> = 1..=3600;
/// A share of a pool at or above this is marked as a warning (the alert rules' threshold).
const FULL_WARNING: f64 = 0.9;

/// The page's state: the admin handle it reads status from, and the node's history.
#[derive(Debug, Clone)]
struct Page {
    admin: Admin,
    observations: Arc<Observations>,
}

/// The route of the page, to merge into the metrics listener's router.
pub(crate) fn router(admin: Admin, observations: Arc<Observations>) -> Router {
    Router::new().route("/", get(page)).with_state(Page {
        admin,
        observations,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    /// Seconds between refreshes.
    refresh: Option<u32>,
}

/// A bad request, answered in plain text.
fn bad_request(message: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        message + "\n",
    )
        .into_response()
}

/// The refresh the query asks for, or what is wrong with it.
fn refresh_secs(query: Result<Query<PageQuery>, QueryRejection>) -> Result<u32, String> {
    match query {
        Ok(Query(PageQuery { refresh: None })) => Ok(DEFAULT_REFRESH_SECS),
        Ok(Query(PageQuery { refresh: Some(r) })) if REFRESH_RANGE.contains(&r) => Ok(r),
        Ok(Query(PageQuery { refresh: Some(r) })) => Err(format!(
            "refresh={r}: the refresh must be {} to {} seconds",
            REFRESH_RANGE.start(),
            REFRESH_RANGE.end()
        )),
        Err(e) => Err(format!(
            "{}: the page takes only ?refresh=SECONDS ({} to {})",
            e.body_text(),
            REFRESH_RANGE.start(),
            REFRESH_RANGE.end()
        )),
    }
}

async fn page(State(p): State<Page>, query: Result<Query<PageQuery>, QueryRejection>) -> Response {
    let refresh = match refresh_secs(query) {
        Ok(r) => r,
        Err(message) => return bad_request(message),
    };
    let status = p.admin.status().await;
    let history = p.observations.page();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        render(&status, &history, refresh, now),
    )
        .into_response()
}

/// `text` with `&`, `<`, `>`, `"` and `'` escaped, for element content and quoted attributes.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Unix seconds as `HH:MM:SS` UTC.
fn clock(at: u64) -> String {
    let s = at % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// A rate or count with an SI prefix: `950`, `12.3k`, `4.56M`.
fn si(v: f64) -> String {
    let (v, unit) = match v {
        v if v >= 1e9 => (v / 1e9, "G"),
        v if v >= 1e6 => (v / 1e6, "M"),
        v if v >= 1e3 => (v / 1e3, "k"),
        v => (v, ""),
    };
    if unit.is_empty() && v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v >= 100.0 {
        format!("{v:.0}{unit}")
    } else {
        format!("{v:.1}{unit}")
    }
}

/// Width and height of a sparkline, in pixels.
const SPARK_W: f64 = 120.0;
const SPARK_H: f64 = 24.0;

/// A sparkline of `series` (oldest first) with its last value beside it.
fn sparkline(out: &mut String, series: &Series, unit: &str, step_secs: u64) {
    let Some(&last) = series.last() else {
        out.push_str("<span class=\"muted\">collecting…</span>");
        return;
    };
    let max = series.iter().copied().fold(0.0_f64, f64::max);
    let n = series.len();
    let dx = if n > 1 { SPARK_W / (n - 1) as f64 } else { 0.0 };
    let _ = write!(
        out,
        "<svg class=\"spark\" width=\"{SPARK_W}\" height=\"{SPARK_H}\" viewBox=\"0 0 {SPARK_W} \
         {SPARK_H}\" role=\"img\"><title>last {} min, max {}{unit}</title><polyline points=\"",
        (n as u64 * step_secs).div_ceil(60),
        si(max),
    );
    for (i, v) in series.iter().enumerate() {
        let y = if max > 0.0 {
            SPARK_H - 1.0 - v / max * (SPARK_H - 2.0)
        } else {
            SPARK_H - 1.0
        };
        let _ = write!(out, "{:.1},{y:.1} ", i as f64 * dx);
    }
    let _ = write!(
        out,
        "\"/></svg> <span class=\"num\">{}{unit}</span>",
        si(last)
    );
}

/// The page's style: degraded rows red, warnings amber.
const STYLE: &str = "body{font:14px/1.35 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}\
header{padding:10px 16px;background:#234;color:#fff}header h1{font-size:18px;margin:0}\
header .meta{font-size:12px;opacity:.8}main{padding:0 16px 16px}\
h2{font-size:15px;margin:18px 0 6px}table{border-collapse:collapse;background:#fff;margin-bottom:6px}\
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;white-space:nowrap}\
th{background:#eef1f4;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}\
.banner{padding:8px 16px;font-weight:600}.healthy{background:#dfd;color:#063}\
.degraded{background:#fdd;color:#a00}.critical{background:#a00;color:#fff}\
tr.down td,span.down,.bad{background:#fdd;color:#a00;font-weight:600}\
.warn{background:#ffe9b3;color:#740}.muted{color:#888}.spark polyline{fill:none;stroke:#2a6;stroke-width:1.5}\
.num{font-variant-numeric:tabular-nums}tr.service td{background:#f3f6f9;font-weight:600}\
#script-errors{background:#a00;color:#fff;padding:6px 16px;margin:0}footer{padding:8px 16px;font-size:12px;color:#666}";

/// The refresh script: refetch, swap `main`, count refreshes; record errors in the page.
const SCRIPT: &str = r#"(function(){
var errs=0,refreshes=0,period=Number(document.body.dataset.refresh)*1000;
function report(msg){errs++;document.body.dataset.scriptErrors=String(errs);
var el=document.getElementById('script-errors');el.hidden=false;el.textContent+=msg+'\n';}
window.addEventListener('error',function(e){report('error: '+e.message+' at '+e.lineno+':'+e.colno);});
window.addEventListener('unhandledrejection',function(e){report('unhandled rejection: '+e.reason);});
function stale(why){var el=document.getElementById('stale');el.hidden=!why;el.textContent=why?'not refreshed: '+why:'';}
function refresh(){fetch(location.href,{cache:'no-store'}).then(function(r){
if(!r.ok){throw new Error('HTTP '+r.status);}return r.text();}).then(function(text){
var doc=new DOMParser().parseFromString(text,'text/html');var next=doc.getElementById('main');
if(!next){throw new Error('no main element in the answer');}
document.getElementById('main').replaceWith(next);document.title=doc.title;
refreshes++;document.body.dataset.refreshes=String(refreshes);stale('');
}).catch(function(e){stale(String(e));}).finally(function(){setTimeout(refresh,period);});}
setTimeout(refresh,period);document.body.dataset.script='ok';
})();"#;

/// The whole page.
pub(crate) fn render(st: &NodeStatus, h: &PageHistory, refresh: u32, now: u64) -> String {
    let backends: usize = st.services.iter().map(|s| s.backends.len()).sum();
    let mut out = String::with_capacity(4096 + backends * 400);
    let health = st.health();
    let (class, verdict) = match health {
        Health::Healthy => ("healthy", "healthy".to_owned()),
        Health::Degraded => {
            let nodes = st.cluster.as_ref().map_or(0, |c| c.nodes_down());
            let backends = st.backends_down();
            (
                "degraded",
                format!("DEGRADED: {nodes} node(s) unreachable, {backends} backend(s) down"),
            )
        }
        Health::Critical => ("critical", "CRITICAL: the cluster has no quorum".to_owned()),
    };
    let _ = write!(
        out,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>{} {} — lbcluster</title><style>{STYLE}</style></head>\
         <body data-refresh=\"{refresh}\"><pre id=\"script-errors\" hidden></pre>\
         <div id=\"main\" data-health=\"{class}\">",
        esc(&st.node),
        match health {
            Health::Healthy => "ok",
            Health::Degraded => "DEGRADED",
            Health::Critical => "CRITICAL",
        }
    );
    let _ = write!(
        out,
        "<header><h1>lbcluster · node {}</h1><div class=\"meta\">config version {} · up {} s · \
         rendered {} UTC · refreshes every {refresh} s · read-only</div></header>\
         <div class=\"banner {class}\" id=\"health\">{}</div>\
         <div class=\"banner warn\" id=\"stale\" hidden></div><main>",
        esc(&st.node),
        st.config_version,
        st.uptime_secs,
        clock(now),
        esc(&verdict)
    );
    cluster(&mut out, st);
    traffic(&mut out, st, h);
    services(&mut out, st, h);
    sessions(&mut out, st);
    drops(&mut out, st);
    if let Some(sync) = &st.sync {
        sync_peers(&mut out, sync);
    }
    events(&mut out, h);
    out.push_str(
        "</main><footer>This page is read-only: it changes nothing and shows no secret (no \
         join token, no key). Rates are this node's own; each node serves its own page.\
         </footer></div><script>",
    );
    out.push_str(SCRIPT);
    out.push_str("</script></body></html>");
    out
}

fn cluster(out: &mut String, st: &NodeStatus) {
    let Some(c) = &st.cluster else {
        out.push_str("<h2>Cluster</h2><p class=\"muted\">standalone node (no [cluster])</p>");
        return;
    };
    let _ = write!(
        out,
        "<h2>Cluster</h2><p>{} node(s), leader {}, config version {}{}{}</p>",
        c.nodes.len(),
        esc(c.leader.as_deref().unwrap_or("none")),
        c.config_version,
        if c.quorum {
            ""
        } else {
            ", <span class=\"down\">no quorum</span>"
        },
        c.cluster_id
            .as_deref()
            .map(|id| format!(", cluster id <code>{}</code>", esc(id)))
            .unwrap_or_default()
    );
    if let Some(e) = c.read_error.as_deref().filter(|_| !c.quorum) {
        let _ = write!(out, "<p class=\"bad\">{}</p>", esc(e));
    }
    out.push_str(
        "<table id=\"nodes\"><tr><th>Node</th><th>Address</th><th>Reachable</th><th>Role</th>\
         <th>Term</th><th>Commit</th><th>Applied</th><th>Version</th><th>BGP sessions</th>\
         <th>VIPs announced</th><th>Sync</th><th>Drained</th></tr>",
    );
    let opt = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    for n in &c.nodes {
        let role = match n.role {
            None => "-",
            Some(Role::Leader) => "leader",
            Some(Role::Follower) => "follower",
            Some(Role::Candidate) => "candidate",
            Some(Role::Learner) => "learner",
            Some(Role::Shutdown) => "shutdown",
        };
        let (peers, vips) = n.bgp.as_ref().map_or_else(
            || ("-".to_owned(), "-".to_owned()),
            |b| {
                let up = b.peers.iter().filter(|p| p.established).count();
                let cls = if up < b.peers.len() { "down" } else { "" };
                let vcls = if (b.vips_announced.len() as u32) < b.vips_configured {
                    "warn"
                } else {
                    ""
                };
                (
                    format!("<span class=\"{cls}\">{up}/{} up</span>", b.peers.len()),
                    format!(
                        "<span class=\"{vcls}\">{}/{}</span>",
                        b.vips_announced.len(),
                        b.vips_configured
                    ),
                )
            },
        );
        let _ = write!(
            out,
            "<tr class=\"node{}\" data-node=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{role}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td>{peers}</td><td>{vips}</td><td>{}</td><td>{}</td></tr>",
            if n.reachable { "" } else { " down" },
            esc(&n.name),
            esc(&n.name),
            n.addr,
            if n.reachable { "yes" } else { "NO" },
            opt(n.term),
            opt(n.committed),
            opt(n.applied),
            opt(n.config_version),
            match n.warm {
                Some(true) => "warm",
                Some(false) => "<span class=\"down\">COLD</span>",
                None => "-",
            },
            if n.drained { "drained" } else { "no" },
        );
    }
    out.push_str("</table>");
}

fn traffic(out: &mut String, st: &NodeStatus, h: &PageHistory) {
    let _ = write!(
        out,
        "<h2>Traffic of {} (every {} s, last 10 min)</h2><table id=\"traffic\"><tr>\
         <th>Packets/s</th><th>Bytes/s</th><th>Sessions</th><th>Drops/s</th></tr><tr><td>",
        esc(&st.node),
        h.step_secs
    );
    sparkline(out, &h.packets_per_sec, "", h.step_secs);
    out.push_str("</td><td>");
    sparkline(out, &h.bytes_per_sec, "B", h.step_secs);
    out.push_str("</td><td>");
    sparkline(out, &h.sessions, "", h.step_secs);
    out.push_str("</td><td>");
    sparkline(out, &h.drops_per_sec, "", h.step_secs);
    out.push_str("</td></tr></table>");
    if let Some(f) = &st.fastpath {
        let _ = write!(
            out,
            "<p>fast path: {}</p>",
            if f.running {
                format!(
                    "on ({}), {} sessions offloaded, {} refused (map full)",
                    esc(&f.devices.join(", ")),
                    f.sessions.offloaded,
                    f.sessions.refused
                )
            } else {
                format!(
                    "off, every packet through the TUN device ({})",
                    esc(f.reason.as_deref().unwrap_or("not started"))
                )
            }
        );
    }
}

fn services(out: &mut String, st: &NodeStatus, h: &PageHistory) {
    let _ = write!(
        out,
        "<h2>Services ({})</h2><table id=\"services\"><tr><th>Service / backend</th>\
         <th>Method</th><th>Weight</th><th>Health</th><th>Active</th><th>Inactive</th>\
         <th>Total</th><th>Packets/s</th><th>Bytes/s</th></tr>",
        st.services.len()
    );
    let empty = Series::new();
    for svc in &st.services {
        service(out, svc, h, &empty);
    }
    out.push_str("</table>");
}

fn service(out: &mut String, svc: &ServiceStatus, h: &PageHistory, empty: &Series) {
    let all_down = !svc.backends.is_empty() && svc.backends.iter().all(|b| !b.healthy);
    let (packets, bytes) = h
        .services
        .get(&(svc.proto, svc.vip))
        .map_or((empty, empty), |(p, b)| (p, b));
    let _ = write!(
        out,
        "<tr class=\"service{}\" data-service=\"{} {}\"><td>{} {} {} check {}</td><td></td>\
         <td></td><td>{}</td><td colspan=\"3\"></td><td>",
        if all_down { " down" } else { "" },
        svc.proto,
        svc.vip,
        svc.proto,
        svc.vip,
        scheduler_name(svc.scheduler),
        esc(&svc.health_check),
        if all_down {
            "ALL DOWN".to_owned()
        } else {
            format!(
                "{}/{} up",
                svc.backends.iter().filter(|b| b.healthy).count(),
                svc.backends.len()
            )
        }
    );
    sparkline(out, packets, "", h.step_secs);
    out.push_str("</td><td>");
    sparkline(out, bytes, "B", h.step_secs);
    out.push_str("</td></tr>");
    for b in &svc.backends {
        let rates = h.backends.get(&(svc.proto, svc.vip, b.addr));
        let rate = |f: fn(&(f64, f64)) -> f64, unit: &str| {
            rates.map_or_else(|| "-".to_owned(), |r| format!("{}{unit}", si(f(r))))
        };
        let _ = write!(
            out,
            "<tr class=\"backend{}\" data-backend=\"{}\"><td>&nbsp;&nbsp;→ {}</td><td>fullnat</td>\
             <td class=\"n\">{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            if b.healthy { "" } else { " down" },
            b.addr,
            b.addr,
            b.weight,
            if b.healthy { "up" } else { "DOWN" },
            b.active,
            b.inactive,
            b.total,
            rate(|r| r.0, ""),
            rate(|r| r.1, "B"),
        );
    }
}

/// `used` of `capacity` as a percentage cell, amber from [`FULL_WARNING`].
fn share(used: u64, capacity: u64) -> String {
    if capacity == 0 {
        return "<td class=\"n\">-</td>".to_owned();
    }
    let f = used as f64 / capacity as f64;
    format!(
        "<td class=\"n{}\">{:.1} %</td>",
        if f >= FULL_WARNING { " warn" } else { "" },
        f * 100.0
    )
}

fn sessions(out: &mut String, st: &NodeStatus) {
    let s = &st.sessions;
    let f = &s.by_family;
    let _ = write!(
        out,
        "<h2>Sessions and local ports</h2><table id=\"sessions\"><tr><th>Table</th>\
         <th>Sessions</th><th>Capacity</th><th>Used</th></tr>\
         <tr><td>IPv4</td><td class=\"n\">{}</td><td class=\"n\">{}</td>{}</tr>\
         <tr><td>IPv6</td><td class=\"n\">{}</td><td class=\"n\">{}</td>{}</tr></table>",
        f.v4,
        f.v4_capacity,
        share(f.v4 as u64, f.v4_capacity as u64),
        f.v6,
        f.v6_capacity,
        share(f.v6 as u64, f.v6_capacity as u64),
    );
    out.push_str(
        "<table id=\"lips\"><tr><th>Local address (LIP)</th><th>Proto</th><th>Ports in use</th>\
         <th>Ports</th><th>Used</th></tr>",
    );
    for u in &st.local_addrs {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>{}</tr>",
            u.ip,
            u.proto,
            u.in_use,
            u.capacity,
            share(u64::from(u.in_use), u64::from(u.capacity))
        );
    }
    out.push_str("</table>");
}

fn drops(out: &mut String, st: &NodeStatus) {
    let _ = write!(out, "<h2>Drops ({} packets)</h2>", st.total_drops());
    let nonzero: Vec<_> = st.drops.iter().filter(|d| d.count > 0).collect();
    if nonzero.is_empty() {
        out.push_str("<p class=\"muted\">none</p>");
        return;
    }
    out.push_str("<table id=\"drops\"><tr><th>Reason</th><th>Packets</th></tr>");
    for d in nonzero {
        let _ = write!(
            out,
            "<tr><td>{}</td><td class=\"n\">{}</td></tr>",
            esc(&d.name),
            d.count
        );
    }
    out.push_str("</table>");
}

fn sync_peers(out: &mut String, sync: &SyncStatus) {
    let _ = write!(
        out,
        "<h2>Session sync: {}</h2><p>from peers: {} installed, {} removed, {} reconciled, {} \
         refused</p><table id=\"sync\"><tr><th>Peer</th><th>Connected</th><th>Table</th>\
         <th>Sent</th><th>Received</th><th>Dropped</th><th>Queue</th><th>Resyncs</th>\
         <th>Lag (ms)</th><th>Lag max (ms)</th></tr>",
        if sync.warm {
            "warm"
        } else {
            "<span class=\"down\">COLD (a peer's table has not arrived yet)</span>"
        },
        sync.installed,
        sync.removed,
        sync.reconciled,
        sync.refused
    );
    let ms = |us: u64| format!("{:.2}", us as f64 / 1000.0);
    for p in &sync.peers {
        let _ = write!(
            out,
            "<tr class=\"peer{}\"><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            if p.connected { "" } else { " down" },
            esc(&p.peer),
            if p.connected { "yes" } else { "NO" },
            if p.bulk_complete {
                "complete"
            } else {
                "arriving"
            },
            p.sent,
            p.received,
            p.dropped,
            p.queue_depth,
            p.resyncs,
            ms(p.lag_last_us),
            ms(p.lag_max_us),
        );
    }
    out.push_str("</table>");
}

fn events(out: &mut String, h: &PageHistory) {
    out.push_str("<h2>Recent events (UTC, newest first)</h2>");
    if h.events.is_empty() {
        out.push_str("<p class=\"muted\">none yet</p>");
        return;
    }
    out.push_str("<table id=\"events\">");
    for e in &h.events {
        let _ = write!(
            out,
            "<tr{}><td>{}</td><td>{}</td></tr>",
            if e.bad { " class=\"down\"" } else { "" },
            clock(e.at),
            esc(&e.text)
        );
    }
    out.push_str("</table>");
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::time::Instant;

    use dataplane::sched::SchedulerKind;
    use dataplane::service::Traffic;

    use super::*;
    use crate::api::{
        BackendStatus, ClusterStatus, LipPorts, NamedCount, Proto, SessionCounts, SyncPeer,
    };
    use crate::history::{Event, View};

    /// A status of `nodes` nodes and `services` services of `per_service` backends each.
    pub(crate) fn status(nodes: usize, services: usize, per_service: usize) -> NodeStatus {
        let addr = |i: usize, port: u16| {
            SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(
                    198,
                    18,
                    (i / 250) as u8 + 3,
                    (i % 250) as u8 + 2,
                )),
                port,
            )
        };
        NodeStatus {
            node: "n1".to_owned(),
            config_version: 7,
            uptime_secs: 60,
            services: (0..services)
                .map(|s| ServiceStatus {
                    vip: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 100, s as u8 + 1)), 80),
                    proto: Proto::Tcp,
                    scheduler: SchedulerKind::Maglev,
                    health_check: "http".to_owned(),
                    backends: (0..per_service)
                        .map(|b| BackendStatus {
                            addr: addr(s * per_service + b, 8080),
                            weight: 1,
                            healthy: true,
                            active: 3,
                            inactive: 1,
                            total: 40,
                            traffic: Traffic::default(),
                        })
                        .collect(),
                    traffic: Traffic::default(),
                })
                .collect(),
            sessions: SessionCounts {
                count: 4,
                capacity: 2048,
                by_family: dataplane::SessionCounts {
                    v4: 4,
                    v6: 0,
                    v4_capacity: 1024,
                    v6_capacity: 1024,
                },
            },
            drops: vec![NamedCount {
                name: "no_session".to_owned(),
                count: 0,
            }],
            events: Vec::new(),
            local_addrs: vec![LipPorts {
                ip: "198.19.200.1".parse().unwrap(),
                proto: Proto::Tcp,
                in_use: 950,
                capacity: 1000,
            }],
            io: Vec::new(),
            fastpath: None,
            cluster: (nodes > 0).then(|| ClusterStatus {
                quorum: true,
                read_error: None,
                config_version: 7,
                cluster_id: Some("ab".repeat(16)),
                leader: Some("n1".to_owned()),
                nodes: (1..=nodes)
                    .map(|k| consensus::NodeReport {
                        id: k as u64,
                        name: format!("n{k}"),
                        addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 2, k as u8)), 7946),
                        reachable: true,
                        role: Some(if k == 1 { Role::Leader } else { Role::Follower }),
                        term: Some(2),
                        committed: Some(10),
                        applied: Some(10),
                        config_version: Some(7),
                        leader: Some(1),
                        voter: true,
                        warm: Some(true),
                        drained: false,
                        bgp: None,
                    })
                    .collect(),
                quic: crate::quic::CounterValues::default(),
                raft_rpcs: consensus::transport::ServeCounterValues::default(),
            }),
            sync: Some(SyncStatus {
                warm: true,
                epoch: 1,
                installed: 0,
                removed: 0,
                refused: 0,
                refused_by: Default::default(),
                reconciled: 0,
                peers: (2..=nodes)
                    .map(|k| SyncPeer {
                        peer: format!("n{k}"),
                        connected: true,
                        bulk_complete: true,
                        sent: 1,
                        received: 1,
                        dropped: 0,
                        queue_depth: 0,
                        resyncs: 0,
                        lag_last_us: 1500,
                        lag_max_us: 3000,
                    })
                    .collect(),
            }),
            bgp: None,
        }
    }

    /// Bad queries are answered with what is wrong, never a panic.
    #[test]
    fn test_refresh_query() {
        let refresh = |uri: &str| refresh_secs(Query::try_from_uri(&uri.parse().unwrap()));
        assert_eq!(refresh("/"), Ok(DEFAULT_REFRESH_SECS));
        assert_eq!(refresh("/?refresh=30"), Ok(30));
        assert_eq!(
            refresh("/?refresh=0"),
            Err("refresh=0: the refresh must be 1 to 3600 seconds".to_owned())
        );
        for bad in [
            "/?refresh=abc",
            "/?refresh=-1",
            "/?refresh=99999999999",
            "/?x=1",
        ] {
            let e = refresh(bad).unwrap_err();
            assert!(
                e.ends_with("the page takes only ?refresh=SECONDS (1 to 3600)"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn test_escape() {
        assert_eq!(
            esc(r#"<a href="x">&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn test_si_and_clock() {
        assert_eq!(si(0.0), "0");
        assert_eq!(si(950.0), "950");
        assert_eq!(si(2.5), "2.5");
        assert_eq!(si(12_345.0), "12.3k");
        assert_eq!(si(4_560_000.0), "4.6M");
        assert_eq!(clock(86_400 + 3_723), "01:02:03");
    }

    /// Text from peers and the configuration cannot inject markup.
    #[test]
    fn test_render_escapes_names() {
        let mut st = status(2, 1, 1);
        st.node = "<script>alert(1)</script>".to_owned();
        let c = st.cluster.as_mut().unwrap();
        c.nodes[1].name = "n2\"><img src=x onerror=alert(1)>".to_owned();
        st.services[0].health_check = "<b>".to_owned();
        let html = render(&st, &PageHistory::default(), 5, 0);
        assert!(!html.contains("<script>alert"));
        assert!(!html.contains("<img"));
        assert!(!html.contains("<b>"));
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        // One script element: the page's own.
        assert_eq!(html.matches("<script>").count(), 1);
    }

    /// Degraded is marked as `status` exits: a backend down turns its row and the banner red,
    /// a node unreachable its row, no quorum the banner critical.
    #[test]
    fn test_render_marks_degraded() {
        let mut st = status(3, 2, 2);
        let html = render(&st, &PageHistory::default(), 5, 0);
        assert!(html.contains("data-health=\"healthy\""));
        assert!(!html.contains("class=\"backend down\""));

        st.services[1].backends[0].healthy = false;
        let html = render(&st, &PageHistory::default(), 5, 0);
        assert!(html.contains("data-health=\"degraded\""));
        let down = format!(
            "<tr class=\"backend down\" data-backend=\"{}\"",
            st.services[1].backends[0].addr
        );
        assert!(html.contains(&down), "{html}");
        assert!(html.contains("DEGRADED: 0 node(s) unreachable, 1 backend(s) down"));

        st.services[1].backends[1].healthy = false;
        let html = render(&st, &PageHistory::default(), 5, 0);
        assert!(html.contains("<tr class=\"service down\""));

        let c = st.cluster.as_mut().unwrap();
        c.nodes[2].reachable = false;
        let html = render(&st, &PageHistory::default(), 5, 0);
        assert!(html.contains("<tr class=\"node down\" data-node=\"n3\""));

        let standalone = render(&status(0, 1, 1), &PageHistory::default(), 5, 0);
        assert!(standalone.contains("standalone node"));
        assert!(standalone.contains("data-health=\"healthy\""));

        st.cluster.as_mut().unwrap().quorum = false;
        let html = render(&st, &PageHistory::default(), 5, 0);
        assert!(html.contains("data-health=\"critical\""));
        assert_eq!(st.health(), Health::Critical);
    }

    #[test]
    fn test_render_history_and_events() {
        let st = status(1, 1, 1);
        let obs = Observations::default();
        obs.observe(100, &st, View::of(&st, None));
        obs.observe(105, &st, View::of(&st, None));
        let mut h = obs.page();
        h.events.push(Event {
            at: 3_600,
            bad: true,
            text: "backend <x> DOWN".to_owned(),
        });
        let html = render(&st, &h, 5, 0);
        assert!(html.contains("<svg class=\"spark\""));
        assert!(html.contains("node n1 observed first"));
        assert!(html.contains("<tr class=\"down\"><td>01:00:00</td><td>backend &lt;x&gt; DOWN"));
        // The LIP at 95 % of its ports is a warning.
        assert!(html.contains("<td class=\"n warn\">95.0 %</td>"));
    }

    /// The size the issue names: 16 nodes and 1,000 backends, with a full history. Prints the
    /// time it took; asserts what is on the page and that its size grows linearly.
    #[test]
    fn test_render_16_nodes_1000_backends() {
        let st = status(16, 50, 20);
        let obs = Observations::default();
        let mut st2 = status(16, 50, 20);
        for i in 0..crate::history::HISTORY_LEN as u64 {
            for s in &mut st2.services {
                s.traffic.packets_in += 1000 * i;
                for b in &mut s.backends {
                    b.traffic.packets_in += 50 * i;
                }
            }
            obs.observe(i * crate::history::SAMPLE_SECS, &st2, View::of(&st2, None));
        }
        let h = obs.page();
        let started = Instant::now();
        let html = render(&st, &h, 5, 0);
        println!(
            "rendered 16 nodes, 50 services, 1,000 backends: {} bytes in {:?}",
            html.len(),
            started.elapsed()
        );
        assert_eq!(html.matches("<tr class=\"backend").count(), 1000);
        assert_eq!(html.matches("<tr class=\"node").count(), 16);
        assert_eq!(html.matches("<svg class=\"spark\"").count(), 4 + 2 * 50);
        assert!(html.len() < 1000 * 600 + 200_000, "{} bytes", html.len());
    }
}

//! Renders what the CLI prints: text laid out like `ipvsadm`, or JSON of the very struct the
//! text renders (a replay [`Report`], or an admin API answer).

use std::fmt::Write as _;

use anyhow::{Context, Result};
use serde::Serialize;

use consensus::Role;
use consensus::config::{ClusterConfig, ConnReuse, HealthCheck, Scheduler, SynProxy};

use crate::api::{
    ClusterStatus, NodeStatus, SessionEntry, SessionList, SyncStatus, scheduler_name,
};
use crate::packet_io::FastPathStatus;
use crate::replay::{Report, proto_name};

/// Any output as JSON, one document, ending with a newline.
pub(crate) fn json<T: Serialize>(value: &T) -> Result<String> {
    let mut s = serde_json::to_string_pretty(value).context("serialising the output")?;
    s.push('\n');
    Ok(s)
}

/// The report as text for a terminal.
pub(crate) fn text(r: &Report) -> String {
    // Writing into a String cannot fail, so the fmt::Results below carry no information.
    let mut s = String::new();
    let t = &r.trace;
    let _ = writeln!(
        s,
        "lbcluster replay: {} flows (seed {}), {} packets through one Full-NAT worker, \
         {} forwarded packets checked, {:.1} s simulated",
        t.flows, r.seed, t.packets, t.forwarded_checked, t.simulated_secs
    );
    let _ = writeln!(
        s,
        "  trace: {} TCP/IPv4, {} UDP/IPv4, {} TCP/IPv6 flows; {} closed, {} reset, {} left open; \
         {} ICMP errors, {} bad packets",
        t.tcp_v4_flows,
        t.udp_v4_flows,
        t.tcp_v6_flows,
        t.flows_closed,
        t.flows_reset,
        t.flows_left_open,
        t.icmp_errors,
        t.bad_packets
    );

    let c = &r.counters;
    let _ = writeln!(s, "\nCounters");
    let rows = [
        ("packets forwarded inbound", c.forwarded_inbound),
        ("packets forwarded outbound", c.forwarded_outbound),
        ("sessions created", c.sessions_created),
        ("sessions expired", c.sessions_expired),
        ("ICMP errors translated", c.icmp_translated),
        ("TOA options inserted", c.toa_inserted),
    ];
    for (label, n) in rows {
        let _ = writeln!(s, "  {label:<30} {n:>8}");
    }
    for d in &c.drops {
        let label = format!("dropped: {}", d.name);
        let _ = writeln!(s, "  {label:<30} {:>8}", d.count);
    }

    let _ = writeln!(s, "\nServices");
    let _ = writeln!(s, "Prot LocalAddress:Port Scheduler");
    let _ = writeln!(
        s,
        "  -> RemoteAddress:Port{:12}Forward Weight ActiveConn InActConn TotalConn",
        ""
    );
    for svc in &r.services {
        let _ = writeln!(s, "{:<4} {} {}", svc.proto, svc.vip, svc.scheduler);
        for b in &svc.backends {
            let _ = writeln!(
                s,
                "  -> {:<29} FullNat {:<6} {:<10} {:<9} {}",
                b.addr.to_string(),
                b.weight,
                b.active_conns,
                b.inactive_conns,
                b.total_conns
            );
        }
    }

    lip_table(
        &mut s,
        r.local_addrs
            .iter()
            .map(|u| (u.ip, proto_name(u.proto).to_string(), u.in_use, u.capacity)),
    );

    let _ = writeln!(
        s,
        "\nSessions ({} in the table, first {} shown)",
        r.sessions_total,
        r.sessions.len()
    );
    session_table(&mut s, &r.sessions);

    let rate = &r.rate;
    let _ = writeln!(
        s,
        "\nreplay rate: {:.0} packets/s ({} packets in {:.3} s wall clock; one worker, {} build, \
         packet building and checks included; not a benchmark)",
        rate.packets_per_sec, rate.packets, rate.wall_secs, rate.build
    );
    s
}

/// Sessions as `ipvsadm -Lnc` lists them, with the local address (LIP) column.
fn session_table(s: &mut String, sessions: &[SessionEntry]) {
    let _ = writeln!(
        s,
        "pro expire state       {:<22} {:<22} {:<26} destination",
        "source", "virtual", "local"
    );
    for x in sessions {
        let _ = writeln!(
            s,
            "{:<3} {:02}:{:02}  {:<11} {:<22} {:<22} {:<26} {}",
            x.proto,
            x.expires_in_secs / 60,
            x.expires_in_secs % 60,
            x.state,
            x.client.to_string(),
            x.vip.to_string(),
            x.local.to_string(),
            x.backend
        );
    }
}

fn cluster_table(s: &mut String, c: &ClusterStatus) {
    let down = c.nodes_down();
    let health = match (c.quorum, down) {
        (false, _) => "CRITICAL: no quorum".to_owned(),
        (true, 0) => "healthy".to_owned(),
        (true, n) => format!("DEGRADED: {n} node(s) unreachable"),
    };
    let _ = writeln!(
        s,
        "cluster: {} node(s), leader {}, config version {}, {health}",
        c.nodes.len(),
        c.leader.as_deref().unwrap_or("none"),
        c.config_version,
    );
    if let Some(id) = &c.cluster_id {
        let _ = writeln!(s, "  cluster id {id}");
    }
    if let Some(e) = &c.read_error {
        let _ = writeln!(s, "  {e}");
    }
    let _ = writeln!(
        s,
        "  {:<16} {:<24} {:<9} {:<9} {:>6} {:>8} {:>8} {:>7}  {:<14} {:<16} Sync",
        "Node",
        "Address",
        "Reachable",
        "Role",
        "Term",
        "Commit",
        "Applied",
        "Version",
        "BGP peers",
        "VIPs announced"
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
                (
                    format!(
                        "{}/{} up",
                        b.peers.iter().filter(|p| p.established).count(),
                        b.peers.len()
                    ),
                    format!("{}/{}", b.vips_announced.len(), b.vips_configured),
                )
            },
        );
        let _ = writeln!(
            s,
            "  {:<16} {:<24} {:<9} {:<9} {:>6} {:>8} {:>8} {:>7}  {:<14} {:<16} {}",
            n.name,
            n.addr.to_string(),
            if n.reachable { "yes" } else { "NO" },
            role,
            opt(n.term),
            opt(n.committed),
            opt(n.applied),
            opt(n.config_version),
            peers,
            vips,
            match (n.warm, n.drained) {
                (Some(true), false) => "warm",
                (Some(true), true) => "warm, drained",
                (Some(false), false) => "COLD",
                (Some(false), true) => "COLD, drained",
                (None, false) => "-",
                (None, true) => "drained",
            },
        );
    }
    s.push('\n');
}

fn sync_table(s: &mut String, sync: &SyncStatus) {
    let reasons: Vec<String> = sync
        .refused_by
        .iter()
        .map(|(reason, n)| format!("{reason} {n}"))
        .collect();
    let _ = writeln!(
        s,
        "session sync: {}; from peers: {} installed, {} removed, {} reconciled, {} refused{}",
        if sync.warm {
            "warm"
        } else {
            "COLD (a peer's table has not arrived yet)"
        },
        sync.installed,
        sync.removed,
        sync.reconciled,
        sync.refused,
        if reasons.is_empty() {
            String::new()
        } else {
            format!(" ({})", reasons.join(", "))
        }
    );
    let _ = writeln!(
        s,
        "  {:<16} {:<9} {:<5} {:>10} {:>10} {:>8} {:>6} {:>8} {:>10} {:>10}",
        "Peer",
        "Connected",
        "Bulk",
        "Sent",
        "Received",
        "Dropped",
        "Queue",
        "Resyncs",
        "Lag(ms)",
        "LagMax(ms)"
    );
    let ms = |us: u64| format!("{:.2}", us as f64 / 1000.0);
    for p in &sync.peers {
        let _ = writeln!(
            s,
            "  {:<16} {:<9} {:<5} {:>10} {:>10} {:>8} {:>6} {:>8} {:>10} {:>10}",
            p.peer,
            if p.connected { "yes" } else { "NO" },
            if p.bulk_complete { "done" } else { "-" },
            p.sent,
            p.received,
            p.dropped,
            p.queue_depth,
            p.resyncs,
            ms(p.lag_last_us),
            ms(p.lag_max_us),
        );
    }
    s.push('\n');
}

/// `lbcluster status bgp`: every BGP session of every node, as the nodes report them (this
/// node's own when it is not a cluster member).
pub(crate) fn bgp_text(st: &NodeStatus) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<16} {:<10} {:<24} {:>6} {:<12} {:<20} {:<5} {:>8}",
        "Node", "Peer", "Address", "ASN", "State", "Since", "BFD", "Exported"
    );
    let mine;
    let nodes: Vec<(&str, Option<&consensus::BgpReport>)> = match &st.cluster {
        Some(c) => c
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.bgp.as_ref()))
            .collect(),
        None => {
            mine = st.bgp.as_ref();
            vec![(st.node.as_str(), mine)]
        }
    };
    for (node, bgp) in nodes {
        let Some(b) = bgp else {
            let _ = writeln!(s, "{node:<16} (no BGP report)");
            continue;
        };
        if let Some(e) = &b.error {
            let _ = writeln!(s, "{node:<16} BIRD: {e}");
        }
        for p in &b.peers {
            let _ = writeln!(
                s,
                "{:<16} {:<10} {:<24} {:>6} {:<12} {:<20} {:<5} {:>8}",
                node,
                p.name,
                p.addr.map_or_else(|| "-".to_owned(), |a| a.to_string()),
                p.remote_as
                    .map_or_else(|| "-".to_owned(), |a| a.to_string()),
                p.state,
                p.since,
                match p.bfd {
                    Some(true) => "up",
                    Some(false) => "down",
                    None => "-",
                },
                p.exported
            );
        }
        let vips: Vec<String> = b.vips_announced.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            s,
            "{node:<16} announces {} of {} VIPs{} ({}), {} own LIPs",
            b.vips_announced.len(),
            b.vips_configured,
            if b.graceful_shutdown {
                " with graceful shutdown"
            } else {
                ""
            },
            vips.join(", "),
            b.lips_announced
        );
    }
    s
}

/// `lbcluster service list`: the cluster's services laid out like `ipvsadm -Ln`.
pub(crate) fn services_text(cfg: &ClusterConfig) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "cluster configuration version {}", cfg.version);
    let _ = writeln!(s, "Prot LocalAddress:Port Scheduler Flags");
    let _ = writeln!(s, "  -> RemoteAddress:Port{:12}Forward Weight", "");
    for svc in &cfg.services {
        let set = &svc.settings;
        let scheduler = match set.scheduler {
            Scheduler::Maglev => "mh",
            Scheduler::Wrr => "wrr",
            Scheduler::Wlc => "wlc",
            Scheduler::Rr => "rr",
            Scheduler::Sh => "sh",
        };
        let mut flags = Vec::new();
        if set.toa {
            flags.push("toa".to_owned());
        }
        if set.conn_reuse == ConnReuse::Keep {
            flags.push("conn_reuse=keep".to_owned());
        }
        match set.syn_proxy {
            SynProxy::Auto => {}
            SynProxy::On => flags.push("synproxy".to_owned()),
            SynProxy::Off => flags.push("synproxy=off".to_owned()),
        }
        match &set.health {
            HealthCheck::None => {}
            HealthCheck::Tcp(p) => flags.push(format!("check=tcp/{}ms", p.interval_ms)),
            HealthCheck::Http {
                probe,
                path,
                expect_status,
            } => flags.push(format!(
                "check=http:{path}={expect_status}/{}ms",
                probe.interval_ms
            )),
        }
        let _ = writeln!(
            s,
            "{:<4} {} {scheduler} {}",
            svc.key.proto.to_string().to_uppercase(),
            svc.key.vip,
            flags.join(" ")
        );
        for b in &svc.backends {
            let _ = writeln!(s, "  -> {:<29} FullNat {}", b.addr.to_string(), b.weight);
        }
    }
    s
}

/// The local port usage per LIP and protocol: (address, protocol, in use, ports).
fn lip_table(s: &mut String, rows: impl Iterator<Item = (std::net::IpAddr, String, u32, u32)>) {
    let _ = writeln!(s, "\nLocal addresses (LIP)");
    let _ = writeln!(
        s,
        "  {:<20} {:<5} {:>8} {:>8}",
        "address", "pro", "in use", "ports"
    );
    for (ip, proto, in_use, capacity) in rows {
        let _ = writeln!(
            s,
            "  {:<20} {:<5} {:>8} {:>8}",
            ip.to_string(),
            proto,
            in_use,
            capacity
        );
    }
}

/// `lbcluster sessions`.
pub(crate) fn sessions_text(list: &SessionList) -> String {
    let mut s = String::new();
    session_table(&mut s, &list.sessions);
    s
}

/// `lbcluster status`: the cluster's nodes (on a member), then this node.
/// Which path established flows take, and what the fast path carried.
fn fastpath_line(s: &mut String, f: &FastPathStatus) {
    if !f.running {
        let why = f.reason.as_deref().unwrap_or("not started");
        let _ = writeln!(
            s,
            "fast path: off, every packet through the TUN device ({why})"
        );
        return;
    }
    let _ = writeln!(
        s,
        "fast path: on ({}): {} sessions offloaded ({} refused, map full); {} packets \
         forwarded, {} left to the engine",
        f.devices.join(", "),
        f.sessions.offloaded,
        f.sessions.refused,
        f.program.forwarded,
        f.program.no_entry + f.program.not_forwardable + f.program.no_route + f.program.too_big
    );
}

pub(crate) fn status_text(st: &NodeStatus) -> String {
    let mut s = String::new();
    if let Some(c) = &st.cluster {
        cluster_table(&mut s, c);
    }
    if let Some(sync) = &st.sync {
        sync_table(&mut s, sync);
    }
    let down = st.backends_down();
    let _ = writeln!(
        s,
        "node {}: config version {}, up {} s, {}",
        st.node,
        st.config_version,
        st.uptime_secs,
        if down == 0 {
            "all backends healthy".to_owned()
        } else {
            format!("DEGRADED: {down} backend(s) down")
        }
    );
    let _ = writeln!(
        s,
        "sessions: {} of {}; packets dropped: {}",
        st.sessions.count,
        st.sessions.capacity,
        st.total_drops()
    );
    for what in st.exhausted() {
        let _ = writeln!(s, "DEGRADED: {what}");
    }
    if let Some(f) = &st.fastpath {
        fastpath_line(&mut s, f);
    }
    let _ = writeln!(s, "\nProt LocalAddress:Port Scheduler Check");
    let _ = writeln!(
        s,
        "  -> RemoteAddress:Port{:12}Forward Weight ActiveConn InActConn TotalConn Health",
        ""
    );
    for svc in &st.services {
        let _ = writeln!(
            s,
            "{:<4} {} {} {}",
            svc.proto,
            svc.vip,
            scheduler_name(svc.scheduler),
            svc.health_check
        );
        for b in &svc.backends {
            let _ = writeln!(
                s,
                "  -> {:<29} FullNat {:<6} {:<10} {:<9} {:<9} {}",
                b.addr.to_string(),
                b.weight,
                b.active,
                b.inactive,
                b.total,
                if b.healthy { "up" } else { "DOWN" }
            );
        }
    }
    lip_table(
        &mut s,
        st.local_addrs
            .iter()
            .map(|u| (u.ip, u.proto.to_string(), u.in_use, u.capacity)),
    );
    let drops: Vec<_> = st.drops.iter().filter(|d| d.count > 0).collect();
    if !drops.is_empty() {
        let _ = writeln!(s, "\nDrops");
        for d in drops {
            let _ = writeln!(s, "  {:<30} {:>8}", d.name, d.count);
        }
    }
    s
}

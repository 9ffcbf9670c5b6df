//! The operator's view, checked for real: the alert rules with promtool; then a 3-node BGP
//! cluster under load, scraped by a real Prometheus (Debian's) in the lab's router namespace,
//! which answers every dashboard query and every alert rule's series and fires the
//! backend-down alert when a backend is killed; and node 1's status page held open in headless
//! Chromium (Debian's, driven over the DevTools protocol), without script errors, with the three
//! nodes and the services, turning the killed backend red at one of its own refreshes. The lab
//! test needs root, bird2, prometheus and chromium.
//!
//! Alert expressions are conditions: on a healthy cluster most of them rightly return nothing.
//! So for each rule the test checks that Prometheus evaluates it without error (health `ok`)
//! and that every metric it selects has series; the backend-down rule is checked to fire.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use tests::bgp::BgpOptions;
use tests::cluster::{ClusterOptions, ClusterSite};
use tests::lab::wait_for;
use tests::observe::{
    self, DevTools, Prometheus, dashboard_queries, deploy_file, metric_names, substitute,
    with_short_for,
};
use tests::site::VIP;
use tests::tools;

/// Sessions come up, routes settle, series appear within this.
const SETTLE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(500);
/// The `for:` of every alert rule in the lab, so an alert fires a moment after its condition.
const ALERT_FOR_SECS: u64 = 2;
/// The status page's refresh in the checks (`?refresh=`).
const PAGE_REFRESH_SECS: u64 = 2;
/// Health checks of the HTTP service: a killed backend is down after FALL × INTERVAL.
const CHECK_INTERVAL_MS: u64 = 200;
const CHECK_FALL: u64 = 2;

/// Where the screenshots are kept.
fn artifacts() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("artifacts")
}

/// `promtool check` on the scrape config and the rules, and the rules' unit tests.
#[test]
fn promtool_checks_and_unit_tests_the_alert_rules() -> Result<()> {
    tools::require(&["promtool"])?;
    let dir = deploy_file("prometheus");
    for args in [
        &["check", "config", "prometheus.yml"][..],
        &["check", "rules", "lbcluster.rules.yml"],
        &["test", "rules", "tests.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .context("run promtool")?;
        ensure!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[test]
fn prometheus_dashboard_alerts_and_status_page_on_a_bgp_cluster() -> Result<()> {
    tools::require(observe::PROGRAMS)?;
    let site = ClusterSite::start_with(ClusterOptions {
        nodes: 3,
        members: 3,
        backends: 2,
        bgp: Some(BgpOptions { bfd: false }),
    })?;
    site.lab
        .wait_next_hops(IpAddr::V4(VIP), &[1, 2, 3], SETTLE)
        .with_context(|| format!("n1's log:\n{}", site.log(1)))?;
    let vip80 = format!("{VIP}:80");
    let vip9000 = format!("{VIP}:9000");
    site.cli(
        1,
        &[
            "service",
            "edit",
            "-t",
            &vip80,
            "--check",
            "http",
            "--check-path",
            "/",
            "--check-interval-ms",
            &CHECK_INTERVAL_MS.to_string(),
            "--check-timeout-ms",
            "100",
            "--check-rise",
            "1",
            "--check-fall",
            &CHECK_FALL.to_string(),
        ],
    )?
    .ok()?;
    site.cli(1, &["service", "add", "-t", &vip9000, "-s", "mh"])?
        .ok()?;
    for j in 1..=2 {
        let backend = format!("{}:9000", site.lab.backend_addr(j));
        site.cli(1, &["backend", "add", "-t", &vip9000, "-r", &backend])?
            .ok()?;
    }
    site.wait_for("echo through VIP:9000", SETTLE, |s| {
        s.lab
            .tcp_echo_check("client", SocketAddr::new(IpAddr::V4(VIP), 9000), 10_000)
    })?;
    // Load for the rest of the test: long-lived streams and new HTTP connections.
    let _load = site.start_load(
        SocketAddr::new(IpAddr::V4(VIP), 9000),
        SocketAddr::new(IpAddr::V4(VIP), 80),
        8,
        20,
        600,
    )?;

    // Prometheus in the router's namespace, which reaches every node's uplink.
    let rules = std::fs::read_to_string(deploy_file("prometheus/lbcluster.rules.yml"))?;
    let targets: Vec<SocketAddr> = (1..=3).map(|k| site.metrics_addr(k)).collect();
    let listen = SocketAddr::new(IpAddr::V4(site.lab.node_gateway(1)), 9090);
    let prom = Prometheus::start(
        &site.lab,
        "router",
        listen,
        &targets,
        &with_short_for(&rules, ALERT_FOR_SECS),
    )?;
    wait_for("every node scraped", SETTLE, POLL, || {
        let up = prom.query(&site.lab, "up{job=\"lbcluster\"} == 1")?;
        ensure!(up.len() == 3, "{up:?}\n{}", prom.log());
        Ok(())
    })?;
    // Traffic shows as rates once a few scrapes saw it.
    wait_for("traffic rates", SETTLE, POLL, || {
        let r = prom.query(
            &site.lab,
            "sum(rate(lbcluster_service_packets_total[10s])) > 0",
        )?;
        ensure!(!r.is_empty(), "no traffic yet");
        Ok(())
    })?;

    // Rates need several scrapes of every node.
    wait_for("five scrapes of every node", SETTLE, POLL, || {
        let r = prom.query(
            &site.lab,
            "count_over_time(up{job=\"lbcluster\"}[10s]) >= 5",
        )?;
        ensure!(r.len() == 3, "{r:?}");
        Ok(())
    })?;

    // Every dashboard query returns series; one that keeps the instance label has every node.
    let instances: BTreeSet<String> = (1..=3).map(|k| site.metrics_addr(k).to_string()).collect();
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(deploy_file(
        "grafana/lbcluster.json",
    ))?)?;
    let queries = dashboard_queries(&dashboard);
    for (panel, expr) in &queries {
        let promql = substitute(expr)?;
        let n = wait_for(&format!("series of {panel:?}"), SETTLE, POLL, || {
            let r = prom.query(&site.lab, &promql)?;
            ensure!(!r.is_empty(), "{promql} returned no series");
            let seen: BTreeSet<String> = r
                .iter()
                .filter_map(|v| v["metric"]["instance"].as_str().map(str::to_owned))
                .collect();
            ensure!(
                seen.is_empty() || seen == instances,
                "{promql}: series of {seen:?}, not of every node {instances:?}"
            );
            Ok(r.len())
        })?;
        println!("dashboard {panel:?}: {n} series");
    }
    println!("{} dashboard queries answered", queries.len());

    // Every alert rule evaluates, and every metric it selects has series.
    let loaded = wait_for("the rules evaluated", SETTLE, POLL, || {
        let rules = prom.rules(&site.lab)?;
        ensure!(
            rules.len() >= 14 && rules.iter().all(|r| r.2 == "ok"),
            "{rules:#?}"
        );
        Ok(rules)
    })?;
    for (name, query, _, _) in &loaded {
        let names = metric_names(query);
        ensure!(!names.is_empty(), "{name}: no metric in {query}");
        for metric in names {
            let r = prom.query(&site.lab, &format!("{metric}{{job=\"lbcluster\"}}"))?;
            ensure!(!r.is_empty(), "{name}: {metric} has no series");
        }
    }
    println!(
        "{} alert rules evaluate; their metrics have series",
        loaded.len()
    );

    // The status page, held open in Chromium: three nodes, the services, no script error,
    // and its script refreshes it.
    let killed = SocketAddr::new(IpAddr::V4(site.lab.backend_addr(2)), 8080);
    let page = format!(
        "http://{}/?refresh={PAGE_REFRESH_SECS}",
        site.metrics_addr(1)
    );
    let bad = site
        .lab
        .http_get("router", site.metrics_addr(1), "/?refresh=abc")
        .expect_err("?refresh=abc is answered 200");
    ensure!(format!("{bad:#}").contains("400 Bad Request"), "{bad:#}");
    let mut browser = DevTools::open(&site.lab, "router", &page, (1400, 1400))?;
    let refreshes = |b: &mut DevTools| -> Result<u64> {
        b.eval("Number(document.body.dataset.refreshes || 0)")?
            .as_u64()
            .context("refreshes is not a number")
    };
    wait_for("the page refreshed by its script", SETTLE, POLL, || {
        let html = browser.html()?;
        check_page(&html)?;
        ensure!(
            !html.contains("class=\"backend down\""),
            "a backend is down before the kill"
        );
        ensure!(refreshes(&mut browser)? >= 1, "not refreshed yet");
        Ok(())
    })?;
    browser.screenshot(&artifacts().join("status-page-healthy.png"))?;
    ensure!(
        prom.firing(&site.lab, "LbclusterBackendDown")?.is_empty(),
        "backend-down fires before a backend is down"
    );

    // Kill backend 2: the page open in Chromium turns it red at a refresh of its own (it is
    // never reloaded), and the alert fires in Prometheus.
    let before = refreshes(&mut browser)?;
    let killed_at = Instant::now();
    site.lab.backend_processes()[1].kill();
    // Down on the node after FALL failed checks; on the page at its next refresh. The bound is
    // generous (the machine is shared); the time it took is printed.
    let bound = Duration::from_millis(CHECK_FALL * CHECK_INTERVAL_MS)
        + Duration::from_secs(2 * PAGE_REFRESH_SECS)
        + SETTLE;
    let red_row = format!("<tr class=\"backend down\" data-backend=\"{killed}\">");
    let html = wait_for("the open page marks the backend down", bound, POLL, || {
        let html = browser.html()?;
        check_page(&html)?;
        ensure!(html.contains(&red_row), "backend {killed} not marked down");
        ensure!(html.contains("data-health=\"degraded\""), "not degraded");
        Ok(html)
    })?;
    println!(
        "the open page showed {killed} down {:?} after the kill",
        killed_at.elapsed()
    );
    ensure!(
        refreshes(&mut browser)? > before,
        "the page turned red without refreshing itself"
    );
    ensure!(html.contains("1 backend(s) down"), "{html}");
    let shot = artifacts().join("status-page.png");
    browser.screenshot(&shot)?;
    println!("status page screenshot: {}", shot.display());
    let alert = wait_for("LbclusterBackendDown firing", SETTLE, POLL, || {
        let firing = prom.firing(&site.lab, "LbclusterBackendDown")?;
        firing
            .into_iter()
            .find(|l| l["backend"] == killed.to_string() && l["port"] == "80")
            .context("not firing for the killed backend")
    })?;
    println!("alert firing: {alert}");
    Ok(())
}

/// What the page shows whenever it is looked at: its script ran without errors, the three
/// nodes and both services.
fn check_page(dom: &str) -> Result<()> {
    ensure!(
        dom.contains("data-script=\"ok\""),
        "the page's script did not run:\n{dom}"
    );
    ensure!(
        !dom.contains("data-script-errors"),
        "script errors on the page:\n{dom}"
    );
    for k in 1..=3 {
        ensure!(
            dom.contains(&format!("data-node=\"n{k}\"")),
            "node n{k} missing:\n{dom}"
        );
    }
    for port in [80, 9000] {
        ensure!(
            dom.contains(&format!("data-service=\"TCP {VIP}:{port}\"")),
            "service {VIP}:{port} missing:\n{dom}"
        );
    }
    Ok(())
}

//! Looking at a cluster site as an operator does: a real Prometheus server (Debian's) inside a
//! lab namespace scraping the nodes' metrics addresses, asked through its HTTP API, and headless
//! Chromium (Debian's) loading a node's status page. Both run as lab processes, so the lab ends
//! them by pid, also when a test fails.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::lab::{Lab, LabProcess};

/// The programs these tests run besides the lab's.
pub const PROGRAMS: &[&str] = &["prometheus", "promtool", "chromium"];

/// Seconds between two scrapes and two rule evaluations: short, so a test sees rates and alerts
/// within seconds.
pub const SCRAPE_SECS: u64 = 1;

/// What the dashboard's template variables are replaced with: every node, every VIP, and a rate
/// window of several scrapes.
pub const SUBSTITUTIONS: &[(&str, &str)] =
    &[("$__rate_interval", "10s"), ("$node", ".*"), ("$vip", ".*")];

/// A file of the repository's `deploy/` directory.
pub fn deploy_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

/// A Prometheus server running in a lab namespace.
#[derive(Debug)]
pub struct Prometheus {
    process: LabProcess,
    role: String,
    addr: SocketAddr,
}

impl Prometheus {
    /// Starts Prometheus in `role`'s namespace listening on `listen`, scraping `targets` as job
    /// `lbcluster` every [`SCRAPE_SECS`] and evaluating the rules `rules` (the text of a rules
    /// file) as often; waits until it is ready.
    pub fn start(
        lab: &Lab,
        role: &str,
        listen: SocketAddr,
        targets: &[SocketAddr],
        rules: &str,
    ) -> Result<Prometheus> {
        let dir = lab.dir().join("prometheus");
        std::fs::create_dir_all(dir.join("data"))?;
        let rules_path = dir.join("lbcluster.rules.yml");
        std::fs::write(&rules_path, rules)?;
        let mut config = format!(
            "global:\n  scrape_interval: {SCRAPE_SECS}s\n  scrape_timeout: {SCRAPE_SECS}s\n  \
             evaluation_interval: {SCRAPE_SECS}s\nrule_files:\n  - {}\nscrape_configs:\n  - \
             job_name: lbcluster\n    static_configs:\n      - targets:\n",
            rules_path.display()
        );
        for t in targets {
            let _ = writeln!(config, "          - \"{t}\"");
        }
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        let process = lab.spawn(
            role,
            &[
                "prometheus",
                &format!("--config.file={}", config_path.display()),
                &format!("--storage.tsdb.path={}", dir.join("data").display()),
                &format!("--web.listen-address={listen}"),
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
        )?;
        let prometheus = Prometheus {
            process,
            role: role.to_owned(),
            addr: listen,
        };
        crate::lab::wait_for(
            "Prometheus ready",
            Duration::from_secs(30),
            Duration::from_millis(200),
            || {
                ensure!(
                    prometheus.process.is_running(),
                    "prometheus exited:\n{}",
                    prometheus.process.log()
                );
                lab.http_get(&prometheus.role, prometheus.addr, "/-/ready")
            },
        )?;
        Ok(prometheus)
    }

    /// Prometheus's own log.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// `GET path` of the HTTP API: its `data`, once `status` says success.
    pub fn api(&self, lab: &Lab, path: &str) -> Result<Value> {
        let body = lab.http_get(&self.role, self.addr, path)?;
        let answer: Value =
            serde_json::from_str(&body).with_context(|| format!("GET {path}: {body}"))?;
        ensure!(answer["status"] == "success", "GET {path}: {answer}");
        Ok(answer["data"].clone())
    }

    /// The series an instant query returns.
    pub fn query(&self, lab: &Lab, promql: &str) -> Result<Vec<Value>> {
        let data = self.api(lab, &format!("/api/v1/query?query={}", urlencode(promql)))?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// The alerts named `name` that fire now, each its labels.
    pub fn firing(&self, lab: &Lab, name: &str) -> Result<Vec<Value>> {
        let data = self.api(lab, "/api/v1/alerts")?;
        Ok(data["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["labels"]["alertname"] == name && a["state"] == "firing")
            .map(|a| a["labels"].clone())
            .collect())
    }

    /// Every alerting rule Prometheus loaded: (name, expression, health, last error).
    pub fn rules(&self, lab: &Lab) -> Result<Vec<(String, String, String, String)>> {
        let data = self.api(lab, "/api/v1/rules?type=alert")?;
        let mut rules = Vec::new();
        for group in data["groups"].as_array().into_iter().flatten() {
            for r in group["rules"].as_array().into_iter().flatten() {
                let text = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
                rules.push((
                    text("name"),
                    text("query"),
                    text("health"),
                    text("lastError"),
                ));
            }
        }
        Ok(rules)
    }
}

/// `text` percent-encoded for a URL's query string.
pub fn urlencode(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Every query of a Grafana dashboard: (panel title, expression), rows' nested panels included.
pub fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push((
                        p["title"].as_str().unwrap_or_default().to_owned(),
                        expr.to_owned(),
                    ));
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// `expr` with the dashboard's template variables replaced by [`SUBSTITUTIONS`]; an error if a
/// `$` is left.
pub fn substitute(expr: &str) -> Result<String> {
    let mut out = expr.to_owned();
    for (var, value) in SUBSTITUTIONS {
        out = out.replace(var, value);
    }
    ensure!(!out.contains('$'), "unknown template variable in {expr}");
    Ok(out)
}

/// The metric names an expression selects: `lbcluster_*` and `up`, each once.
pub fn metric_names(expr: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let bytes = expr.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut i = 0;
    while i < bytes.len() {
        if word(bytes[i]) && (i == 0 || !word(bytes[i - 1])) {
            let start = i;
            while i < bytes.len() && word(bytes[i]) {
                i += 1;
            }
            let name = &expr[start..i];
            // A selector, not a label name (followed by `=`) or a function (followed by `(`).
            let next = expr[i..].trim_start().chars().next();
            let selector = !matches!(next, Some('=' | '(' | '!' | '~'));
            if (name.starts_with("lbcluster_") || name == "up")
                && selector
                && !names.iter().any(|n| n == name)
            {
                names.push(name.to_owned());
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The alert rules file's text with every `for:` shortened to `for_secs`, so an alert fires
/// within seconds of its condition.
pub fn with_short_for(rules: &str, for_secs: u64) -> String {
    rules
        .lines()
        .map(|l| match l.trim_start().strip_prefix("for:") {
            Some(_) => {
                let indent = &l[..l.len() - l.trim_start().len()];
                format!("{indent}for: {for_secs}s")
            }
            None => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs headless Chromium in `role`'s namespace with `args` after the common ones (no sandbox:
/// the tests run as root; a profile in the lab's directory), for at most `timeout`; its stdout.
pub fn chromium(lab: &Lab, role: &str, args: &[&str], timeout: Duration) -> Result<String> {
    let profile = lab.dir().join("chromium-profile");
    let secs = timeout.as_secs().max(1).to_string();
    let profile_arg = format!("--user-data-dir={}", profile.display());
    let mut cmd = vec![
        "timeout",
        &secs,
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        &profile_arg,
    ];
    cmd.extend_from_slice(args);
    let out = lab.exec(role, &cmd)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The DOM of `url` after its scripts ran for `virtual_ms` of virtual time.
pub fn dump_dom(lab: &Lab, role: &str, url: &str, virtual_ms: u64) -> Result<String> {
    let budget = format!("--virtual-time-budget={virtual_ms}");
    let dom = chromium(
        lab,
        role,
        &[&budget, "--dump-dom", url],
        Duration::from_secs(60),
    )?;
    if dom.trim().is_empty() {
        bail!("chromium printed no DOM for {url}");
    }
    Ok(dom)
}

/// A PNG screenshot of `url` in a `width`×`height` window, written to `path`.
pub fn screenshot(
    lab: &Lab,
    role: &str,
    url: &str,
    path: &Path,
    (width, height): (u32, u32),
) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let shot = format!("--screenshot={}", path.display());
    let size = format!("--window-size={width},{height}");
    chromium(
        lab,
        role,
        &[&shot, &size, "--hide-scrollbars", url],
        Duration::from_secs(60),
    )?;
    let png = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    ensure!(
        png.starts_with(b"\x89PNG"),
        "{} is not a PNG",
        path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_urlencode() {
        assert_eq!(
            urlencode("sum(rate(x{a=~\".*\"}[1m]))"),
            "sum%28rate%28x%7Ba%3D~%22.%2A%22%7D%5B1m%5D%29%29"
        );
    }

    #[test]
    fn test_metric_names() {
        assert_eq!(
            metric_names(
                "min by (vip, backend) (lbcluster_backend_up{job=\"lbcluster\"}) == 0 \
                 or count(up{job=\"lbcluster\"} == 1) unless on (instance) lbcluster_node_drained"
            ),
            ["lbcluster_backend_up", "up", "lbcluster_node_drained"]
        );
    }

    #[test]
    fn test_substitute_and_short_for() {
        assert_eq!(
            substitute("rate(x{instance=~\"$node\"}[$__rate_interval])").unwrap(),
            "rate(x{instance=~\".*\"}[10s])"
        );
        assert!(substitute("x{a=\"$other\"}").is_err());
        assert_eq!(
            with_short_for("  - alert: A\n    for: 5m\n    expr: x", 1),
            "  - alert: A\n    for: 1s\n    expr: x"
        );
    }

    /// The files under deploy/ parse, and the dashboard has its selectors.
    #[test]
    fn test_dashboard_has_queries_and_selectors() {
        let text = std::fs::read_to_string(deploy_file("grafana/lbcluster.json")).unwrap();
        let dashboard: Value = serde_json::from_str(&text).unwrap();
        let queries = dashboard_queries(&dashboard);
        assert!(queries.len() > 30, "{queries:?}");
        for (_, expr) in &queries {
            substitute(expr).unwrap();
        }
        let vars: Vec<&str> = dashboard["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v["name"].as_str())
            .collect();
        assert!(vars.contains(&"node") && vars.contains(&"vip"), "{vars:?}");
    }
}

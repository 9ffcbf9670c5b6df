//! Looking at a cluster site as an operator does: a real Prometheus server (Debian's) inside a
//! lab namespace scraping the nodes' metrics addresses, asked through its HTTP API, and headless
//! Chromium (Debian's) holding a node's status page open, driven over the DevTools protocol.
//! Both run as lab processes, so the lab ends them by pid, also when a test fails (Chromium's
//! helper processes with the rest of the namespace's).

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

/// Headless Chromium driven over the DevTools protocol through its pipe
/// (`--remote-debugging-pipe`: commands in on fd 3, answers and events out on fd 4, each
/// message JSON ended by a NUL byte), with one page open. Unlike `--dump-dom`, the page stays
/// open: its own script refreshes it, and the test watches what it shows.
#[derive(Debug)]
pub struct DevTools {
    /// Dropped first: closing the pipe ends Chromium; the process is killed by pid after.
    commands: std::fs::File,
    answers: std::sync::mpsc::Receiver<Value>,
    session: String,
    next_id: u64,
    _process: LabProcess,
}

/// How long a DevTools command may take.
const DEVTOOLS_TIMEOUT: Duration = Duration::from_secs(30);

impl DevTools {
    /// Starts Chromium in `role`'s namespace and opens `url` in a page of `width`×`height`.
    pub fn open(lab: &Lab, role: &str, url: &str, (width, height): (u32, u32)) -> Result<Self> {
        use std::io::{BufRead, BufReader};
        use std::os::fd::OwnedFd;

        let (to_chromium_read, to_chromium_write) = pipe()?;
        let (from_chromium_read, from_chromium_write) = pipe()?;
        let profile = format!(
            "--user-data-dir={}",
            lab.dir().join("chromium-devtools").display()
        );
        let size = format!("--window-size={width},{height}");
        let process = lab.spawn_with_fds(
            role,
            &[
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                "--remote-debugging-pipe",
                &profile,
                &size,
            ],
            &[(&to_chromium_read, 3), (&from_chromium_write, 4)],
        )?;
        drop((to_chromium_read, from_chromium_write));
        let (tx, answers) = std::sync::mpsc::channel();
        let reader: OwnedFd = from_chromium_read;
        std::thread::spawn(move || {
            let mut reader = BufReader::new(std::fs::File::from(reader));
            let mut frame = Vec::new();
            while reader.read_until(0, &mut frame).is_ok_and(|n| n > 0) {
                frame.pop_if(|b| *b == 0);
                if let Ok(v) = serde_json::from_slice::<Value>(&frame)
                    && tx.send(v).is_err()
                {
                    return;
                }
                frame.clear();
            }
        });
        let mut devtools = DevTools {
            commands: std::fs::File::from(to_chromium_write),
            answers,
            session: String::new(),
            next_id: 1,
            _process: process,
        };
        let target = devtools.call("Target.createTarget", serde_json::json!({ "url": url }))?;
        let target = target["targetId"]
            .as_str()
            .context("no targetId")?
            .to_owned();
        let attached = devtools.call(
            "Target.attachToTarget",
            serde_json::json!({ "targetId": target, "flatten": true }),
        )?;
        devtools.session = attached["sessionId"]
            .as_str()
            .context("no sessionId")?
            .to_owned();
        Ok(devtools)
    }

    /// Sends a command (to the page once attached) and waits for its result.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        use std::io::Write as _;

        let id = self.next_id;
        self.next_id += 1;
        let mut message = serde_json::json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            message["sessionId"] = Value::String(self.session.clone());
        }
        let mut bytes = serde_json::to_vec(&message)?;
        bytes.push(0);
        self.commands
            .write_all(&bytes)
            .with_context(|| format!("send {method} to Chromium"))?;
        let deadline = std::time::Instant::now() + DEVTOOLS_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let answer = self
                .answers
                .recv_timeout(left)
                .with_context(|| format!("no answer to {method} within {DEVTOOLS_TIMEOUT:?}"))?;
            if answer["id"] != id {
                continue;
            }
            ensure!(answer["error"].is_null(), "{method}: {}", answer["error"]);
            return Ok(answer["result"].clone());
        }
    }

    /// The value of a JavaScript expression in the page.
    pub fn eval(&mut self, expression: &str) -> Result<Value> {
        let r = self.call(
            "Runtime.evaluate",
            serde_json::json!({ "expression": expression, "returnByValue": true }),
        )?;
        ensure!(r["exceptionDetails"].is_null(), "{expression}: {r}");
        Ok(r["result"]["value"].clone())
    }

    /// The page's whole HTML now.
    pub fn html(&mut self) -> Result<String> {
        Ok(self
            .eval("document.documentElement.outerHTML")?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// A PNG screenshot of the page, written to `path`.
    pub fn screenshot(&mut self, path: &Path) -> Result<()> {
        let shot = self.call(
            "Page.captureScreenshot",
            serde_json::json!({ "format": "png" }),
        )?;
        let png = base64_decode(shot["data"].as_str().context("no screenshot data")?)?;
        ensure!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png).with_context(|| format!("write {}", path.display()))
    }
}

/// A pipe: (read end, write end), both close-on-exec.
fn pipe() -> Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;

    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe2");
    }
    // SAFETY: both were just returned by pipe2 and nothing else owns them.
    Ok(unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    })
}

/// Standard base64 (what DevTools sends screenshots in) decoded.
fn base64_decode(text: &str) -> Result<Vec<u8>> {
    let value = |c: u8| -> Result<u32> {
        Ok(match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => bail!("not base64: {:?}", char::from(c)),
        })
    };
    let bytes: Vec<u8> = text.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= value(c)? << (18 - 6 * i);
        }
        let [_, a, b, c] = n.to_be_bytes();
        out.extend_from_slice(&[a, b, c][..chunk.len().saturating_sub(1)]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_base64_decode() {
        assert_eq!(base64_decode("TWFu").unwrap(), b"Man");
        assert_eq!(base64_decode("TWE=").unwrap(), b"Ma");
        assert_eq!(base64_decode("TQ==").unwrap(), b"M");
        assert_eq!(base64_decode("").unwrap(), b"");
        assert!(base64_decode("T*==").is_err());
    }

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

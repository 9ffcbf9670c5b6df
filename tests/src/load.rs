//! The lab's load generator: long-lived TCP streams with content checks ([`crate::streams`])
//! together with a steady rate of new short HTTP connections, for a set duration. Reports the
//! streams' resets, stalls and bytes verified, and for the short connections the failures (with
//! when they happened) and latency percentiles. Bounded in count, rate and time.

use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use crate::backend::http_get;
use crate::lab::{Lab, LabProcess};
use crate::streams;

/// At most this many new connections per second.
pub const MAX_RATE: u32 = 5000;
/// Threads that open the short connections.
const WORKERS: usize = 64;
/// A short connection that takes longer than this has failed.
const SHORT_TIMEOUT: Duration = Duration::from_secs(3);

/// One short connection: when it was due and when a worker began it (from the start of the
/// run), how long it took, and what went wrong if it failed.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Short {
    pub at: Duration,
    pub began: Duration,
    pub latency: Duration,
    pub error: Option<String>,
}

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct LoadSpec {
    /// The TCP echo service the long-lived connections go through.
    pub streams_target: SocketAddr,
    pub streams: usize,
    /// The HTTP service the short connections `GET /` from.
    pub http_target: SocketAddr,
    /// New connections per second.
    pub rate: u32,
    pub duration: Duration,
}

/// Runs `spec` and returns its report as JSON: `streams` (see [`streams::to_json`]) and `short`.
pub fn run(spec: LoadSpec) -> Value {
    let duration = spec.duration.min(streams::MAX_DURATION);
    let rate = spec.rate.clamp(1, MAX_RATE);
    let streams_thread = std::thread::spawn(move || {
        streams::run(
            spec.streams_target,
            spec.streams,
            duration,
            Duration::from_millis(20),
        )
    });
    let shorts = short_connections(spec.http_target, rate, duration);
    let reports = streams_thread.join().unwrap_or_default();
    json!({
        "streams": streams::to_json(&reports),
        "short": short_json(&shorts, rate),
    })
}

/// Opens `rate` connections per second for `duration`, each a `GET /`.
pub fn short_connections(target: SocketAddr, rate: u32, duration: Duration) -> Vec<Short> {
    let start = Instant::now();
    let (tx, rx) = mpsc::channel::<Duration>();
    let rx = Arc::new(Mutex::new(rx));
    let results = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (rx, results) = (rx.clone(), results.clone());
            std::thread::spawn(move || {
                loop {
                    let next = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                    let Ok(at) = next else { break };
                    let began = Instant::now();
                    let error = http_get(target, "/", SHORT_TIMEOUT)
                        .err()
                        .map(|e| format!("{e:#}"));
                    let short = Short {
                        at,
                        began: began.duration_since(start),
                        latency: began.elapsed(),
                        error,
                    };
                    results
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(short);
                }
            })
        })
        .collect();
    let interval = Duration::from_secs(1) / rate;
    let total = u64::from(rate) * duration.as_secs().max(1);
    for i in 0..total {
        let due = interval * u32::try_from(i).unwrap_or(u32::MAX);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        if streams::stop_requested() || tx.send(start.elapsed()).is_err() {
            break;
        }
    }
    drop(tx);
    for w in workers {
        let _ = w.join();
    }
    let mut shorts = std::mem::take(&mut *results.lock().unwrap_or_else(PoisonError::into_inner));
    shorts.sort_by_key(|s| s.at);
    shorts
}

/// Success and latency of some short connections.
pub fn phase_json<'a>(shorts: impl Iterator<Item = &'a Short>) -> Value {
    let shorts: Vec<&Short> = shorts.collect();
    let mut ok: Vec<Duration> = shorts
        .iter()
        .filter(|s| s.error.is_none())
        .map(|s| s.latency)
        .collect();
    ok.sort_unstable();
    let pct = |p: usize| {
        ok.get((ok.len() * p / 100).min(ok.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    let attempted = shorts.len();
    json!({
        "attempted": attempted,
        "succeeded": ok.len(),
        "success_pct": if attempted == 0 { 100.0 } else { ok.len() as f64 * 100.0 / attempted as f64 },
        "latency_ms": { "p50": pct(50), "p99": pct(99), "max": ok.last().map_or(0.0, |d| d.as_secs_f64() * 1e3) },
    })
}

fn short_json(shorts: &[Short], rate: u32) -> Value {
    let phase = phase_json(shorts.iter());
    let failures: Vec<Value> = shorts
        .iter()
        .filter_map(|s| {
            s.error.as_ref().map(|e| {
                json!({
                    "at_ms": s.at.as_millis(),
                    "began_ms": s.began.as_millis(),
                    "failed_after_ms": s.latency.as_millis(),
                    "error": e,
                })
            })
        })
        .take(100)
        .collect();
    json!({
        "rate": rate,
        "attempted": shorts.len(),
        "failed": shorts.iter().filter(|s| s.error.is_some()).count(),
        "latency_ms": phase["latency_ms"],
        "failures": failures,
    })
}

/// Starts `lab-backend load` in `lab`'s client namespace: `conns` long-lived streams through
/// the echo service at `streams_to` and `rate` new HTTP connections per second to `http_to`,
/// for `seconds`. Its report comes from [`report`].
pub fn start(
    lab: &Lab,
    streams_to: SocketAddr,
    http_to: SocketAddr,
    conns: u32,
    rate: u32,
    seconds: u64,
) -> Result<LabProcess> {
    client_tool(
        lab,
        &[
            "load",
            "--streams-to",
            &streams_to.to_string(),
            "--conns",
            &conns.to_string(),
            "--http-to",
            &http_to.to_string(),
            "--rate",
            &rate.to_string(),
            "--seconds",
            &seconds.to_string(),
        ],
    )
}

/// `lab-backend ARGS` in `lab`'s client namespace.
pub fn client_tool(lab: &Lab, args: &[&str]) -> Result<LabProcess> {
    let bin = crate::lab::backend_binary()?;
    let bin = bin.to_string_lossy();
    let mut cmd = vec![bin.as_ref()];
    cmd.extend_from_slice(args);
    lab.spawn("client", &cmd)
}

/// Waits (at most `timeout`) for a `lab-backend load` or `streams` run to end and returns its
/// JSON report.
pub fn report(run: &LabProcess, timeout: Duration) -> Result<Value> {
    ensure!(
        run.wait_timeout(timeout).is_some(),
        "the load did not end within {timeout:?}"
    );
    let log = run.log();
    let line = log
        .lines()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("no report in {log:?}"))?;
    Ok(serde_json::from_str(line)?)
}

/// A load report ([`report`]) in one paragraph.
pub fn summary(load: &Value) -> String {
    let (st, sh) = (&load["streams"], &load["short"]);
    format!(
        "streams {}/{} completed, resets {}, content errors {}, stall p50 {} ms p99 {} ms max {} ms, \
         {} MB verified; new connections {} attempted, {} failed, latency p50 {:.1} ms p99 {:.1} ms max {:.1} ms",
        st["completed"],
        st["connections"],
        st["resets"],
        st["content_errors"],
        st["stall_ms"]["p50"],
        st["stall_ms"]["p99"],
        st["stall_ms"]["max"],
        st["bytes_verified"].as_u64().unwrap_or(0) / 1_000_000,
        sh["attempted"],
        sh["failed"],
        sh["latency_ms"]["p50"].as_f64().unwrap_or(0.0),
        sh["latency_ms"]["p99"].as_f64().unwrap_or(0.0),
        sh["latency_ms"]["max"].as_f64().unwrap_or(0.0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_and_short_connections_against_a_local_backend() {
        let (http, echo, _) = crate::backend::start_local("l1");
        let report = run(LoadSpec {
            streams_target: echo,
            streams: 3,
            http_target: http,
            rate: 50,
            duration: Duration::from_secs(1),
        });
        assert_eq!(report["streams"]["completed"], 3, "{report}");
        assert_eq!(report["short"]["attempted"], 50, "{report}");
        assert_eq!(report["short"]["failed"], 0, "{report}");
    }
}

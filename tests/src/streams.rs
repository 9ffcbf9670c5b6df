//! Long-lived TCP connections with content checks: each connection sends a chunk of the lab's
//! pattern to a TCP echo server every interval and checks that exactly those bytes come back,
//! for a set duration. Reports, per connection, the bytes verified, the longest time without
//! progress, and how it ended (a reset, a content error, a stall past the limit). Bounded in
//! count and time; used across failovers to show that no connection breaks. A run may end early
//! on SIGUSR1 ([`stop_on_sigusr1`]): for a caller that cannot know in advance how long the load
//! must last (an Ansible playbook under load), it is the end of the duration brought forward.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::backend::pattern;

/// At most this many connections per run.
pub const MAX_CONNS: usize = 2000;
/// At most this long per run.
pub const MAX_DURATION: Duration = Duration::from_secs(600);
/// Bytes per round trip.
const CHUNK: usize = 1024;
/// A connection that makes no progress for this long has failed.
const STALL_LIMIT: Duration = Duration::from_secs(10);

/// Set by SIGUSR1 once [`stop_on_sigusr1`] is installed.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_signal: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// From now on, SIGUSR1 ends every run of this process as its duration would: connections
/// finish their round trip and close cleanly, and the report is printed.
pub fn stop_on_sigusr1() -> std::io::Result<()> {
    let handler: extern "C" fn(libc::c_int) = request_stop;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe, and it stays
    // valid for the life of the process.
    let previous = unsafe { libc::signal(libc::SIGUSR1, handler as libc::sighandler_t) };
    if previous == libc::SIG_ERR {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether a stop was requested (SIGUSR1).
pub fn stop_requested() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// How one connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It ran for the whole duration and closed cleanly.
    Completed,
    /// The connection could not be opened.
    ConnectFailed(String),
    /// The peer reset it.
    Reset,
    /// Bytes came back different from those sent.
    ContentError { at: u64 },
    /// No progress for longer than the stall limit.
    Stalled,
    /// Any other I/O error.
    Failed(String),
}

/// One connection's record.
#[derive(Debug, Clone)]
pub struct ConnReport {
    pub bytes_verified: u64,
    pub longest_stall: Duration,
    pub outcome: Outcome,
}

/// Runs `conns` connections to `target` for `duration`, one round trip per `interval` each.
pub fn run(
    target: SocketAddr,
    conns: usize,
    duration: Duration,
    interval: Duration,
) -> Vec<ConnReport> {
    let conns = conns.min(MAX_CONNS);
    let duration = duration.min(MAX_DURATION);
    let end = Instant::now() + duration;
    let threads: Vec<_> = (0..conns)
        .map(|i| {
            std::thread::spawn(move || {
                // Spread the connections' rounds over one interval.
                std::thread::sleep(interval.mul_f64(i as f64 / conns.max(1) as f64));
                one(target, end, interval)
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| {
            t.join().unwrap_or(ConnReport {
                bytes_verified: 0,
                longest_stall: Duration::ZERO,
                outcome: Outcome::Failed("the connection's thread panicked".to_owned()),
            })
        })
        .collect()
}

fn one(target: SocketAddr, end: Instant, interval: Duration) -> ConnReport {
    let mut report = ConnReport {
        bytes_verified: 0,
        longest_stall: Duration::ZERO,
        outcome: Outcome::Completed,
    };
    let mut stream = match TcpStream::connect_timeout(&target, Duration::from_secs(3)) {
        Ok(s) => s,
        Err(e) => {
            report.outcome = Outcome::ConnectFailed(e.to_string());
            return report;
        }
    };
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let data = pattern(1 << 20);
    let mut last_progress = Instant::now();
    let mut back = vec![0u8; CHUNK];
    while Instant::now() < end && !stop_requested() {
        let at = (report.bytes_verified as usize) % (data.len() - CHUNK);
        let chunk = &data[at..at + CHUNK];
        if let Err(e) = stream.write_all(chunk) {
            report.outcome = classify(&e);
            return report;
        }
        let mut got = 0;
        while got < CHUNK {
            match stream.read(&mut back[got..]) {
                Ok(0) => {
                    report.outcome = Outcome::Failed("closed by the peer".to_owned());
                    return report;
                }
                Ok(n) => {
                    got += n;
                    let now = Instant::now();
                    report.longest_stall = report.longest_stall.max(now - last_progress);
                    last_progress = now;
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if last_progress.elapsed() > STALL_LIMIT {
                        report.longest_stall = last_progress.elapsed();
                        report.outcome = Outcome::Stalled;
                        return report;
                    }
                }
                Err(e) => {
                    report.outcome = classify(&e);
                    return report;
                }
            }
        }
        if back != chunk {
            report.outcome = Outcome::ContentError {
                at: report.bytes_verified,
            };
            return report;
        }
        report.bytes_verified += CHUNK as u64;
        std::thread::sleep(interval);
        // The pause is ours, not a stall.
        last_progress = Instant::now();
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    report
}

fn classify(e: &std::io::Error) -> Outcome {
    match e.kind() {
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
            Outcome::Reset
        }
        _ => Outcome::Failed(e.to_string()),
    }
}

/// The run as one JSON document: totals, then one entry per connection.
pub fn to_json(reports: &[ConnReport]) -> Value {
    let count = |f: fn(&Outcome) -> bool| reports.iter().filter(|r| f(&r.outcome)).count();
    let mut stalls: Vec<u128> = reports
        .iter()
        .map(|r| r.longest_stall.as_millis())
        .collect();
    stalls.sort_unstable();
    let pct = |p: usize| {
        stalls
            .get((stalls.len() * p / 100).min(stalls.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    json!({
        "connections": reports.len(),
        "completed": count(|o| *o == Outcome::Completed),
        "resets": count(|o| *o == Outcome::Reset),
        "content_errors": count(|o| matches!(o, Outcome::ContentError { .. })),
        "stalled": count(|o| *o == Outcome::Stalled),
        "failed": count(|o| matches!(o, Outcome::ConnectFailed(_) | Outcome::Failed(_))),
        "bytes_verified": reports.iter().map(|r| r.bytes_verified).sum::<u64>(),
        "stall_ms": { "p50": pct(50), "p99": pct(99), "max": stalls.last().copied().unwrap_or(0) },
        "each": reports.iter().map(|r| json!({
            "bytes_verified": r.bytes_verified,
            "longest_stall_ms": r.longest_stall.as_millis(),
            "outcome": format!("{:?}", r.outcome),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_through_an_echo_server_complete_with_every_byte_verified() {
        let (_, target, _) = crate::backend::start_local("s1");
        let reports = run(
            target,
            4,
            Duration::from_millis(300),
            Duration::from_millis(10),
        );
        let summary = to_json(&reports);
        assert_eq!(summary["completed"], 4, "{summary}");
        assert!(reports.iter().all(|r| r.bytes_verified >= 4 * CHUNK as u64));
    }

    #[test]
    fn a_refused_connection_is_reported_not_a_panic() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = listener.local_addr().unwrap();
        drop(listener);
        let reports = run(
            target,
            1,
            Duration::from_millis(50),
            Duration::from_millis(10),
        );
        assert!(matches!(reports[0].outcome, Outcome::ConnectFailed(_)));
        assert_eq!(to_json(&reports)["failed"], 1);
    }
}

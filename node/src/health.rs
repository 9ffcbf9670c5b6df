//! Health checks: one task per checked backend probes it (TCP connect, or an HTTP/1.1 GET whose
//! status line must match) every interval; `fall` failures in a row take it down, `rise`
//! successes bring it back. A change of state rebuilds the engine's snapshot at once, so a down
//! backend gets no new flows; its sessions stay.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::{MissedTickBehavior, timeout};
use tracing::{Instrument, info, info_span, warn};

use crate::config::{HealthCheck, Probe, ServiceSet};
use crate::state::{BackendKey, NodeState, service_key};

/// The running checkers, one per checked backend. A new service set stops the checkers of
/// backends that went or whose check changed and starts the new ones; a backend whose check
/// stays keeps its checker, so its rise/fall count is not reset by unrelated changes.
#[derive(Debug, Default)]
pub(crate) struct Checkers {
    running: HashMap<BackendKey, (HealthCheck, AbortHandle)>,
    tasks: JoinSet<()>,
}

impl Checkers {
    /// Makes the checkers match `set`.
    pub(crate) fn update(&mut self, set: &ServiceSet, state: &Arc<NodeState>) {
        while self.tasks.try_join_next().is_some() {}
        let mut wanted = HashMap::new();
        for svc in &set.services {
            if probe_of(&svc.health).is_none() {
                continue;
            }
            let key = service_key(&svc.config);
            for b in &svc.config.backends {
                wanted.insert((key, b.addr), &svc.health);
            }
        }
        self.running.retain(|key, (check, handle)| {
            let keep = wanted.get(key).is_some_and(|w| *w == check);
            if !keep {
                handle.abort();
            }
            keep
        });
        for (key, check) in wanted {
            let Some(probe) = probe_of(check) else {
                continue;
            };
            if self.running.contains_key(&key) {
                continue;
            }
            let span = info_span!("check", vip = %key.0.vip, backend = %key.1);
            let handle = self
                .tasks
                .spawn(check_forever(key, check.clone(), probe, state.clone()).instrument(span));
            self.running.insert(key, (check.clone(), handle));
        }
    }

    /// Stops every checker.
    pub(crate) async fn shutdown(&mut self) {
        self.running.clear();
        self.tasks.shutdown().await;
    }
}

fn probe_of(check: &HealthCheck) -> Option<Probe> {
    match check {
        HealthCheck::None => None,
        HealthCheck::Tcp(p) | HealthCheck::Http { probe: p, .. } => Some(*p),
    }
}

/// Counts results in a row against `rise` and `fall`.
#[derive(Debug)]
struct Verdicts {
    up: bool,
    streak: u32,
}

impl Verdicts {
    /// Records one result; `Some(new state)` when it changes the backend's state.
    fn record(&mut self, ok: bool, probe: &Probe) -> Option<bool> {
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { probe.fall } else { probe.rise };
        if self.streak < needed {
            return None;
        }
        self.up = ok;
        self.streak = 0;
        Some(ok)
    }
}

async fn check_forever(key: BackendKey, check: HealthCheck, probe: Probe, state: Arc<NodeState>) {
    let mut verdicts = Verdicts {
        up: state.is_healthy(&key),
        streak: 0,
    };
    let mut ticks = tokio::time::interval(probe.interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let result = match timeout(probe.timeout, probe_once(key.1, &check)).await {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!("no answer within {:?}", probe.timeout)),
        };
        let ok = result.is_ok();
        if let Some(up) = verdicts.record(ok, &probe) {
            match &result {
                Ok(()) => info!("backend up"),
                Err(e) => warn!("backend down: {e:#}"),
            }
            if let Err(e) = state.set_health(key, up) {
                warn!("health change not applied: {e:#}");
            }
        }
    }
}

async fn probe_once(addr: SocketAddr, check: &HealthCheck) -> Result<()> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    match check {
        HealthCheck::None | HealthCheck::Tcp(_) => Ok(()),
        HealthCheck::Http {
            path,
            expect_status,
            ..
        } => http_get(stream, addr, path, *expect_status).await,
    }
}

/// One GET on a fresh connection; only the status line counts, the body is not read.
async fn http_get(stream: TcpStream, addr: SocketAddr, path: &str, expect: u16) -> Result<()> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")?;
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::USER_AGENT, "lbcluster-health")
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .context("building the request")?;
    // The connection is driven here rather than in a task of its own, so that a probe that
    // times out leaves nothing behind. It may finish (server closes) in the same poll that hands
    // over the response, so the response is still awaited after it.
    let mut conn = std::pin::pin!(conn);
    let mut response = std::pin::pin!(sender.send_request(request));
    let response = tokio::select! {
        biased;
        r = &mut response => r.context("HTTP GET")?,
        r = &mut conn => {
            r.context("HTTP connection")?;
            response.await.context("HTTP GET")?
        }
    };
    let status = response.status().as_u16();
    ensure!(status == expect, "HTTP status {status}, expected {expect}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    const PROBE: Probe = Probe {
        interval: Duration::from_millis(20),
        timeout: Duration::from_millis(10),
        rise: 2,
        fall: 3,
    };

    #[test]
    fn test_verdicts_need_fall_failures_and_rise_successes() {
        let mut v = Verdicts {
            up: true,
            streak: 0,
        };
        assert_eq!(v.record(false, &PROBE), None);
        assert_eq!(v.record(false, &PROBE), None);
        assert_eq!(v.record(true, &PROBE), None, "a success resets the streak");
        assert_eq!(v.record(false, &PROBE), None);
        assert_eq!(v.record(false, &PROBE), None);
        assert_eq!(v.record(false, &PROBE), Some(false));
        assert_eq!(v.record(true, &PROBE), None);
        assert_eq!(v.record(true, &PROBE), Some(true));
    }

    /// Serves one HTTP answer with `status` per connection.
    async fn http_server(status: u16) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let answer = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        addr
    }

    fn http(expect_status: u16) -> HealthCheck {
        HealthCheck::Http {
            probe: PROBE,
            path: "/health".to_owned(),
            expect_status,
        }
    }

    #[tokio::test]
    async fn test_http_probe_checks_the_status() {
        let addr = http_server(200).await;
        probe_once(addr, &http(200)).await.unwrap();
        let e = probe_once(addr, &http(204)).await.unwrap_err();
        assert_eq!(e.to_string(), "HTTP status 200, expected 204");
    }

    #[tokio::test]
    async fn test_tcp_probe_fails_without_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        probe_once(addr, &HealthCheck::Tcp(PROBE)).await.unwrap();
        drop(listener);
        assert!(probe_once(addr, &HealthCheck::Tcp(PROBE)).await.is_err());
    }

    /// A node whose one service has one TCP-checked backend at `addr`.
    fn node_with_backend(addr: SocketAddr) -> (Arc<NodeState>, ServiceSet) {
        let set = ServiceSet {
            version: 1,
            maglev: dataplane::sched::MaglevParams::default(),
            services: vec![crate::config::Service {
                config: dataplane::ServiceConfig {
                    vip: "198.18.100.1:80".parse().unwrap(),
                    proto: dataplane::L4Proto::Tcp,
                    scheduler: dataplane::sched::SchedulerKind::Wrr,
                    timeouts: dataplane::Timeouts::default(),
                    toa: false,
                    conn_reuse: dataplane::ConnReuse::default(),
                    syn_proxy: dataplane::SynProxy::default(),
                    backends: vec![dataplane::BackendConfig {
                        addr,
                        weight: 1,
                        healthy: true,
                    }],
                },
                health: HealthCheck::Tcp(PROBE),
            }],
        };
        let engine = dataplane::Engine::new(
            dataplane::EngineConfig {
                local_addrs: vec!["198.19.200.1".parse().unwrap()],
                ..Default::default()
            },
            dataplane::Snapshot::empty(),
        )
        .unwrap();
        let state = NodeState::new("t".to_owned(), engine, Arc::new(set.clone())).unwrap();
        (Arc::new(state), set)
    }

    /// Waits until the backend's health is `up`, for at most two seconds.
    async fn wait_for(state: &NodeState, up: bool) -> Duration {
        let start = tokio::time::Instant::now();
        while state.status().backends_down() == usize::from(up) {
            assert!(
                start.elapsed() < Duration::from_secs(2),
                "backend never became up={up}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        start.elapsed()
    }

    #[tokio::test]
    async fn test_backend_goes_down_after_fall_and_up_after_rise() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (state, set) = node_with_backend(addr);
        let mut checkers = Checkers::default();
        checkers.update(&set, &state);

        tokio::time::sleep(PROBE.interval * 3).await;
        assert_eq!(state.status().backends_down(), 0);
        drop(listener);
        let took = wait_for(&state, false).await;
        // Three failures in a row: the first probe after the drop and two intervals more.
        assert!(took >= PROBE.interval * 2, "down after {took:?}");

        let _listener = TcpListener::bind(addr).await.unwrap();
        let took = wait_for(&state, true).await;
        assert!(took >= PROBE.interval, "up after {took:?}");
        assert_eq!(state.engine().snapshot().version(), 1);
        checkers.shutdown().await;
    }

    /// A new service set keeps the checker of a backend whose check stays, restarts the one
    /// whose check changed, and stops the one of a backend that went.
    #[tokio::test]
    async fn test_checkers_follow_the_service_set() {
        let (state, mut set) = node_with_backend("127.0.0.1:9".parse().unwrap());
        let mut checkers = Checkers::default();
        checkers.update(&set, &state);
        let id = |c: &Checkers| c.running.values().next().map(|(_, h)| h.id());
        let first = id(&checkers).unwrap();

        set.version = 2;
        set.services[0].config.backends[0].weight = 5;
        checkers.update(&set, &state);
        assert_eq!(id(&checkers), Some(first), "same backend, same check: kept");

        set.services[0].health = HealthCheck::Tcp(Probe { rise: 3, ..PROBE });
        checkers.update(&set, &state);
        let second = id(&checkers).unwrap();
        assert_ne!(second, first, "changed check: restarted");

        set.services[0].config.backends.clear();
        checkers.update(&set, &state);
        assert!(checkers.running.is_empty());
        checkers.shutdown().await;
    }
}

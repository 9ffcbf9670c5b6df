//! A background task that keeps BIRD on the newest desired [`Announce`], coalescing bursts.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, info_span, warn};

use crate::{Announce, Applied, BgpError, Bird};

/// Default spacing of two applies: a burst of changes within it becomes one reload.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(50);

/// Wait before applying the same announcement again after a transient failure (BIRD down).
const RETRY: Duration = Duration::from_secs(1);

/// Handle of the apply task. Dropping it does not stop the task; the shutdown signal does.
#[derive(Debug)]
pub struct Applier {
    desired: watch::Sender<Option<Announce>>,
    outcome: watch::Receiver<Option<Result<Applied, BgpError>>>,
    task: JoinHandle<()>,
}

impl Applier {
    /// Starts the task (in the `bgp` span). It applies at most once per `interval`, always the
    /// newest announcement, retries transient failures, and ends when `stop` turns true or its
    /// sender is gone. Call it within a Tokio runtime.
    pub fn spawn(bird: Arc<Bird>, interval: Duration, stop: watch::Receiver<bool>) -> Applier {
        let (desired, desired_rx) = watch::channel(None);
        let (outcome_tx, outcome) = watch::channel(None);
        let task = tokio::spawn(
            run(bird, interval, desired_rx, outcome_tx, stop).instrument(info_span!("bgp")),
        );
        Applier {
            desired,
            outcome,
            task,
        }
    }

    /// Makes `announce` the desired state; replaces one not applied yet.
    pub fn set(&self, announce: Announce) {
        self.desired.send_replace(Some(announce));
    }

    /// The result of the latest apply (`None` before the first), for `status`.
    pub fn outcome(&self) -> watch::Receiver<Option<Result<Applied, BgpError>>> {
        self.outcome.clone()
    }

    /// Waits for the task to end (after the shutdown signal).
    pub async fn join(self) {
        let _ = self.task.await;
    }
}

async fn run(
    bird: Arc<Bird>,
    interval: Duration,
    mut desired: watch::Receiver<Option<Announce>>,
    outcome: watch::Sender<Option<Result<Applied, BgpError>>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut retry = false;
    loop {
        if *stop.borrow() {
            return;
        }
        tokio::select! {
            changed = desired.changed() => if changed.is_err() { return },
            // A dropped sender is a shutdown too; `changed` would return at once forever.
            res = stop.changed() => if res.is_err() { return } else { continue },
            () = tokio::time::sleep(RETRY), if retry => {}
        }
        let Some(announce) = desired.borrow_and_update().clone() else {
            continue;
        };
        let result = bird.apply(&announce).await;
        match &result {
            Ok(applied) => debug!(?applied, "BIRD config applied"),
            Err(e) => warn!(error = %e, "applying the BIRD config failed"),
        }
        retry = result.as_ref().is_err_and(BgpError::is_transient);
        outcome.send_replace(Some(result));
        // Changes arriving now wait for the next round: one apply per interval at most.
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            res = stop.changed() => if res.is_err() { return },
        }
    }
}

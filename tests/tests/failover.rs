//! End-to-end: zero broken connections while the pool of nodes changes under load (the
//! scenarios of `tests::scenarios`, 500 long-lived streams and 500 new connections per second
//! through three nodes announcing over BGP with BFD). Needs root and bird2. The scenarios run
//! one at a time: each loads both cores.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use anyhow::Result;
use tests::scenarios::{RATE, STREAMS, Scenario, ScenarioReport, run};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn scenario(s: Scenario) -> Result<ScenarioReport> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let r = run(s)?;
    for line in &r.timeline {
        println!("{s:?}: {line}");
    }
    println!("{s:?}: {}", r.summary());
    Ok(r)
}

/// Every long-lived connection completed with no reset and no content error.
fn streams_intact(r: &ScenarioReport) {
    let st = &r.load["streams"];
    assert_eq!(st["connections"], STREAMS, "{st}");
    assert_eq!(st["resets"], 0, "{st}");
    assert_eq!(st["content_errors"], 0, "{st}");
    assert_eq!(st["completed"], STREAMS, "{st}");
    assert!(
        r.load["short"]["attempted"].as_u64() >= Some(u64::from(RATE) * 9),
        "{}",
        r.load["short"]
    );
}

fn no_failed_connections(r: &ScenarioReport) {
    assert_eq!(r.load["short"]["failed"], 0, "{}", r.load["short"]);
}

/// The longest stall within 1 s, and new-connection failures only inside the failure's
/// window: from a moment before it (a connection whose handshake was in flight through the
/// failed node, its session not yet synced) to one second after it.
fn failure_window(r: &ScenarioReport) {
    assert!(
        r.longest_stall() <= Duration::from_secs(1),
        "{:?}",
        r.longest_stall()
    );
    let at = r.failure_at.expect("the failure's time").as_millis();
    let window = at.saturating_sub(IN_FLIGHT.as_millis())..at + 1000;
    for f in r.load["short"]["failures"].as_array().into_iter().flatten() {
        let t = f["at_ms"].as_u64().map(u128::from).unwrap_or(u128::MAX);
        assert!(
            window.contains(&t),
            "failure at {t} ms outside {window:?}: {f}"
        );
    }
}

/// How long before the failure a new connection can have been in flight through the node that
/// failed.
const IN_FLIGHT: Duration = Duration::from_millis(250);

#[test]
fn hard_failure() -> Result<()> {
    let r = scenario(Scenario::HardFailure)?;
    streams_intact(&r);
    failure_window(&r);
    Ok(())
}

/// Every stream opened through the SYN proxy: the survivors carry them on with the sequence
/// delta session sync gave them.
#[test]
fn hard_failure_with_every_stream_proxied() -> Result<()> {
    let r = scenario(Scenario::HardFailureProxied)?;
    streams_intact(&r);
    failure_window(&r);
    let proxied = r.proxied.unwrap_or_default();
    assert!(
        proxied >= u64::from(STREAMS),
        "{proxied} flows opened by cookies, {STREAMS} streams"
    );
    Ok(())
}

/// The leader killed, restarted 10 s later under load: warm within 2 s of its start, and no
/// election caused by its return (the leadership and term the survivors had stay).
#[test]
fn restart_after_failure() -> Result<()> {
    let r = scenario(Scenario::RestartAfterFailure)?;
    streams_intact(&r);
    failure_window(&r);
    assert!(
        r.created_after > Some(0),
        "the restarted node takes new flows"
    );
    let rejoin = r.rejoin.as_ref().expect("the rejoin's figures");
    assert!(
        rejoin.warm_after <= Duration::from_secs(2),
        "warm {:?} after its start",
        rejoin.warm_after
    );
    assert_eq!(
        rejoin.after, rejoin.before,
        "the returning node caused an election"
    );
    assert_eq!(rejoin.own_term, Some(rejoin.before.term));
    Ok(())
}

#[test]
fn scale_out() -> Result<()> {
    let r = scenario(Scenario::ScaleOut)?;
    streams_intact(&r);
    no_failed_connections(&r);
    assert!(
        r.pulled >= Some(u64::from(STREAMS)),
        "pulled {:?}",
        r.pulled
    );
    assert!(r.created_after > Some(0), "the new node takes new flows");
    Ok(())
}

#[test]
fn drain_and_remove() -> Result<()> {
    let r = scenario(Scenario::DrainAndRemove)?;
    streams_intact(&r);
    no_failed_connections(&r);
    Ok(())
}

#[test]
fn rolling_restart() -> Result<()> {
    let r = scenario(Scenario::RollingRestart)?;
    streams_intact(&r);
    no_failed_connections(&r);
    Ok(())
}

//! Runs the real `lbcluster` binary: the replay must succeed, print every section, and its JSON
//! must agree with itself and with the trace it generated.

use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn lbcluster(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lbcluster"))
        .args(args)
        .output()
        .expect("lbcluster runs")
}

fn replay_json(args: &[&str]) -> Value {
    let mut all = vec!["replay", "-o", "json"];
    all.extend_from_slice(args);
    let out = lbcluster(&all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("{v} is not a count"))
}

#[test]
fn test_replay_text_has_every_section() {
    let out = lbcluster(&["replay", "--flows", "50"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "lbcluster replay: 50 flows",
        "Counters",
        "TCP  198.18.100.1:80 mh",
        "UDP  198.18.100.1:53 wrr",
        "TCP  [2001:db8:100::1]:80 rr",
        "  -> 198.18.3.10:8080",
        "Local addresses (LIP)",
        "198.19.200.1",
        "pro expire state",
        "ESTABLISHED",
        "TIME_WAIT",
        "dropped: no_session",
        "dropped: truncated",
        "dropped: fragment",
        "dropped: bad_checksum",
        "dropped: no_service",
        "replay rate:",
        "not a benchmark",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    for label in ["packets forwarded inbound", "packets forwarded outbound"] {
        let line = text.lines().find(|l| l.contains(label)).unwrap();
        let n: u64 = line.split_whitespace().last().unwrap().parse().unwrap();
        assert!(n > 0, "{line}");
    }
}

#[test]
fn test_replay_json_agrees_with_the_trace() {
    let r = replay_json(&["--flows", "50"]);
    let (t, c) = (&r["trace"], &r["counters"]);
    assert_eq!(num(&t["flows"]), 50);
    assert_eq!(num(&c["sessions_created"]), 50);
    assert_eq!(
        num(&t["tcp_v4_flows"]) + num(&t["udp_v4_flows"]) + num(&t["tcp_v6_flows"]),
        50
    );
    assert_eq!(
        num(&c["forwarded_inbound"]) + num(&c["forwarded_outbound"]),
        num(&t["forwarded_checked"])
    );
    assert_eq!(num(&c["toa_inserted"]), num(&t["tcp_v4_flows"]));
    assert_eq!(num(&c["icmp_translated"]), num(&t["icmp_errors"]));
    assert!(num(&c["icmp_translated"]) > 0);
    assert_eq!(num(&c["sessions_expired"]), num(&t["flows_reset"]));
    assert!(num(&c["sessions_expired"]) > 0);

    let drops = c["drops"].as_array().unwrap();
    let dropped: u64 = drops.iter().map(|d| num(&d["count"])).sum();
    assert_eq!(dropped, num(&t["bad_packets"]));
    assert!(drops.iter().any(|d| d["name"] == "no_session"));

    let live = num(&r["sessions_total"]);
    assert_eq!(live, 50 - num(&c["sessions_expired"]));
    let scheduled: u64 = r["services"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["backends"].as_array().unwrap())
        .map(|b| num(&b["total_conns"]))
        .sum();
    assert_eq!(scheduled, 50);
    // Every live session holds exactly one local port.
    let ports: u64 = r["local_addrs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| num(&u["in_use"]))
        .sum();
    assert_eq!(ports, live);
    assert_eq!(r["sessions"].as_array().unwrap().len(), 10);
}

#[test]
fn test_replay_is_deterministic_per_seed() {
    let mut a = replay_json(&["--flows", "40", "--seed", "7"]);
    let mut b = replay_json(&["--flows", "40", "--seed", "7"]);
    let mut c = replay_json(&["--flows", "40", "--seed", "8"]);
    // Only the wall-clock rate may differ between runs.
    for r in [&mut a, &mut b, &mut c] {
        r.as_object_mut().unwrap().remove("rate");
    }
    assert_eq!(a, b);
    assert_ne!(a["sessions"], c["sessions"]);
}

#[test]
fn test_bad_argument_exits_2() {
    let out = lbcluster(&["replay", "--flows", "abc"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--flows"), "{err}");
}

#[test]
fn test_closed_stdout_is_not_an_error() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lbcluster"))
        .args(["replay", "--flows", "200"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close the read end before the replay has printed anything.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

//! A real BIRD, started inside a network namespace this test creates (only `lo`, no link to the
//! outside; deleted on drop, also when the test fails). Its one BGP peer never answers, so no
//! session comes up and nothing leaves the namespace. Needs root, `ip` and BIRD 2.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bgp::{Announce, Applied, Applier, BgpError, Bird, Peer, ProtoState, ProtocolState, render};
use tokio::sync::watch;

/// Generous: the test waits for states, it does not measure how fast they come.
const DEADLINE: Duration = Duration::from_secs(20);

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("`ip` not found");
    assert!(
        out.status.success(),
        "ip {args:?}: {} (this test needs root)",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespace and the BIRD in it. Drop kills the BIRD this test started (by its pid) and
/// deletes the namespace.
struct Lab {
    ns: String,
    dir: tempfile::TempDir,
    bird: Option<Child>,
}

impl Lab {
    fn new() -> Lab {
        static N: AtomicUsize = AtomicUsize::new(0);
        let ns = format!(
            "lbcbgp-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &ns]);
        let lab = Lab {
            ns,
            dir: tempfile::tempdir().unwrap(),
            bird: None,
        };
        ip(&["-n", &lab.ns, "link", "set", "lo", "up"]);
        lab
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `ip netns exec NS bird -f …`: `ip` execs BIRD, so the child's pid is BIRD's.
    fn start_bird(&mut self) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "bird", "-f", "-c"])
            .arg(self.path("bird.conf"))
            .arg("-s")
            .arg(self.path("bird.ctl"))
            .arg("-P")
            .arg(self.path("bird.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting bird in the namespace");
        self.bird = Some(child);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut child) = self.bird.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

fn addr(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Announces through `lo` (the namespace has no other device) to a peer nobody answers.
fn announce(vips: &[&str]) -> Announce {
    let mut a = Announce::new(Ipv4Addr::new(198, 18, 250, 1), 65100, "lo");
    a.vips = vips.iter().map(|v| addr(v)).collect();
    a.own_lips = vec![addr("198.19.200.1")];
    a.peers = vec![Peer::new("r1", addr("198.18.250.2"), 65000)];
    a
}

fn proto<'a>(protocols: &'a [ProtocolState], name: &str) -> &'a ProtocolState {
    protocols
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no protocol {name} in {protocols:#?}"))
}

/// Polls `show protocols all` until `ok` holds for it.
async fn wait_for(bird: &Bird, what: &str, ok: impl Fn(&[ProtocolState]) -> bool) {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < DEADLINE {
        match bird.show_protocols().await {
            Ok(p) if ok(&p) => return,
            other => last = Some(other),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not reached; last answer {last:#?}");
}

fn vip4_routes(p: &[ProtocolState]) -> Option<u32> {
    p.iter()
        .find(|p| p.name == "vip4")
        .map(|p| p.routes().imported)
}

#[tokio::test]
async fn apply_read_and_refuse_with_a_real_bird() {
    let mut lab = Lab::new();
    let bird = Arc::new(Bird::new(lab.path("bird.conf"), lab.path("bird.ctl")));

    // Before the daemon runs: the config is validated and written, the reload fails clearly.
    let first = announce(&[]);
    assert_eq!(
        bird.apply(&first).await,
        Err(BgpError::SocketMissing(lab.path("bird.ctl")))
    );
    assert_eq!(
        std::fs::read_to_string(bird.config_path()).unwrap(),
        render(&first).unwrap()
    );

    lab.start_bird();
    wait_for(&bird, "BIRD answers with the first config", |p| {
        vip4_routes(p) == Some(0)
    })
    .await;
    let protocols = bird.show_protocols().await.unwrap();
    let peer = proto(&protocols, "peer_r1");
    assert_eq!(peer.proto, "BGP");
    assert_eq!(peer.peer_name(), Some("r1"));
    assert_eq!(peer.neighbor, Some(addr("198.18.250.2")));
    assert_eq!(peer.neighbor_as, Some(65000));
    assert_eq!(peer.state, ProtoState::Start, "nobody answers: {peer:#?}");
    assert!(peer.bgp_state.is_some());
    assert_eq!(proto(&protocols, "own4").routes().imported, 1);
    assert_eq!(proto(&protocols, "device1").proto, "Device");

    // The file BIRD runs already is still loaded once (this handle has not loaded it yet).
    assert_eq!(bird.apply(&first).await, Ok(Applied::Reloaded));
    assert_eq!(bird.apply(&first).await, Ok(Applied::Unchanged));

    let one_vip = announce(&["198.19.255.1"]);
    assert_eq!(bird.apply(&one_vip).await, Ok(Applied::Reloaded));
    wait_for(&bird, "the VIP route", |p| vip4_routes(p) == Some(1)).await;

    // A config BIRD refuses: error with BIRD's message, old file kept, BIRD unchanged.
    let err = bird
        .apply_config("protocol static vip4 { ipv4; route nonsense; }\n")
        .await
        .unwrap_err();
    let BgpError::Invalid(msg) = &err else {
        panic!("expected Invalid, got {err:?}");
    };
    assert!(
        msg.contains("bird.conf.tmp"),
        "bird's message names the file: {msg}"
    );
    assert_eq!(
        std::fs::read_to_string(bird.config_path()).unwrap(),
        render(&one_vip).unwrap()
    );
    let leftovers: Vec<_> = std::fs::read_dir(lab.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    assert_eq!(vip4_routes(&bird.show_protocols().await.unwrap()), Some(1));

    // Routes live only while their device is up (`check link yes`).
    ip(&["-n", &lab.ns, "link", "set", "lo", "down"]);
    wait_for(&bird, "routes withdrawn with the device", |p| {
        vip4_routes(p) == Some(0) && proto(p, "own4").routes().imported == 0
    })
    .await;
    ip(&["-n", &lab.ns, "link", "set", "lo", "up"]);
    wait_for(&bird, "routes back with the device", |p| {
        vip4_routes(p) == Some(1)
    })
    .await;

    // A wrong socket: a path that does not exist, and a file nobody listens on.
    let nowhere = Bird::new(lab.path("other.conf"), lab.path("missing.ctl"));
    assert_eq!(
        nowhere.show_protocols().await,
        Err(BgpError::SocketMissing(lab.path("missing.ctl")))
    );
    std::fs::write(lab.path("plain.ctl"), "").unwrap();
    let plain = Bird::new(lab.path("other.conf"), lab.path("plain.ctl"));
    assert!(matches!(
        plain.show_protocols().await,
        Err(BgpError::Unreachable { .. })
    ));

    // A burst through the Applier ends with the newest announcement applied.
    let (stop_tx, stop) = watch::channel(false);
    let applier = Applier::spawn(bird.clone(), bgp::DEFAULT_INTERVAL, stop);
    let mut outcome = applier.outcome();
    let last = announce(&["198.19.255.1", "198.19.255.2", "2001:db8:100::1"]);
    for a in [announce(&[]), announce(&["198.19.255.9"]), last.clone()] {
        applier.set(a);
    }
    wait_for(&bird, "the burst's last announcement", |p| {
        vip4_routes(p) == Some(2) && proto(p, "vip6").routes().imported == 1
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(bird.config_path()).unwrap(),
        render(&last).unwrap()
    );
    let settled = outcome
        .wait_for(|o| matches!(o, Some(Ok(_))))
        .await
        .unwrap()
        .clone();
    assert!(matches!(settled, Some(Ok(_))));
    stop_tx.send_replace(true);
    applier.join().await;
}

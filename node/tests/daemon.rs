//! Runs the real `lbcluster` binary as a daemon and as the CLI that talks to it, and checks
//! `config check` on good and bad files. Each daemon runs in a network namespace of its own
//! (its TUN device, routes and sysctls stay there); the test reaches its metrics and plays its
//! backends from inside that namespace. Needs root.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;

fn lbcluster(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lbcluster"))
        .args(args)
        .output()
        .expect("lbcluster runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

const NODE: &str = r#"[node]
name = "n1"
local_addrs = ["198.19.200.1", "2001:db8:200::1"]
"#;

fn write_config(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("lbcluster.toml");
    std::fs::write(&path, body).unwrap();
    path
}

fn check(body: &str) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), body);
    let out = lbcluster(&["config", "check", path.to_str().unwrap()]);
    let err = stderr(&out).replace(path.to_str().unwrap(), "FILE");
    (
        out.status.code(),
        stdout(&out).replace(path.to_str().unwrap(), "FILE"),
        err,
    )
}

#[test]
fn test_config_check_accepts_a_good_file() {
    let body = format!(
        "{NODE}[admin]\nsocket = \"/tmp/x.sock\"\n[[service]]\nvip = \"198.18.100.1:80\"\nproto = \"tcp\"\n\
         health = {{ kind = \"http\", path = \"/\", expect_status = 200, interval_ms = 1000, timeout_ms = 500, rise = 2, fall = 3 }}\n\
         [[service.backend]]\naddr = \"198.18.3.10:8080\"\n[[service]]\nvip = \"[2001:db8:100::1]:53\"\nproto = \"udp\"\n\
         scheduler = \"wrr\"\ntimeouts = {{ udp = 30 }}\n[[service.backend]]\naddr = \"[2001:db8:3::10]:53\"\nweight = 0\n"
    );
    let (code, out, err) = check(&body);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "FILE: ok (node n1, 2 services, 2 backends)\n");
}

#[test]
fn test_config_check_explains_the_first_error() {
    let svc = "[[service]]\nvip = \"198.18.100.1:80\"\nproto = \"tcp\"\n";
    let cases = [
        (
            format!("{NODE}colour = \"blue\"\n"),
            "FILE:4:1: unknown field `colour`, expected one of `name`, `tun`, `workers`, \
             `local_addrs`, `local_ports`, `max_sessions_v4`, `max_sessions_v6`, `fastpath`, \
             `fastpath_devices`, `fastpath_sessions`",
        ),
        (
            format!("{NODE}{svc}{svc}"),
            "FILE:7:1: service[198.18.100.1:80/tcp]: listed twice (VIP, port and proto must be unique)",
        ),
        (
            "[node]\nname = \"n1\"\nlocal_addrs = [\"2001:db8:200::1\"]\n".to_owned() + svc,
            "FILE:4:1: service[198.18.100.1:80/tcp].vip: an IPv4 service needs an IPv4 address in node.local_addrs",
        ),
        (
            format!(
                "{NODE}{svc}[[service.backend]]\naddr = \"198.18.3.10:8080\"\nweight = 70000\n"
            ),
            "FILE:7:1: service[198.18.100.1:80/tcp].backend[198.18.3.10:8080].weight: 70000 is above the maximum weight of 65535",
        ),
    ];
    for (body, expected) in cases {
        let (code, out, err) = check(&body);
        assert_eq!(code, Some(1), "{body}");
        assert_eq!(out, "");
        assert_eq!(err, format!("lbcluster: error: {expected}\n"), "{body}");
    }
}

/// A network namespace of this test process, deleted when dropped.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "lbcd-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        for args in [
            &["netns", "add", &name][..],
            &["-n", &name, "link", "set", "lo", "up"],
        ] {
            let ok = Command::new("ip")
                .args(args)
                .status()
                .expect("ip runs")
                .success();
            assert!(ok, "ip {args:?} failed (these tests need root)");
        }
        Netns(name)
    }

    /// Runs `f` on a thread that has entered the namespace; sockets it creates live there.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns = File::open(format!("/var/run/netns/{}", self.0)).expect("namespace file");
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns on an open namespace fd; it switches only this thread,
                    // which ends when `f` returns.
                    let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .expect("thread in namespace")
        })
    }

    /// `lbcluster ARGS…` inside the namespace.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.0, env!("CARGO_BIN_EXE_lbcluster")])
            .args(args);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A daemon started from a config in its own temp dir and namespace; killed when dropped.
struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    metrics: SocketAddr,
    // Dropped after the child is killed (fields drop in order): the namespace goes last.
    netns: Netns,
}

impl Daemon {
    fn start(services: &str) -> Daemon {
        Daemon::start_in(Netns::new(), services)
    }

    fn start_in(netns: Netns, services: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let body = format!(
            "{NODE}[admin]\nsocket = \"{}\"\nmetrics = \"{metrics}\"\n{services}",
            dir.path().join("lbc.sock").display()
        );
        let config = write_config(dir.path(), &body);
        let child = netns
            .command(&["run", "--config", config.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let d = Daemon {
            child,
            dir,
            metrics,
            netns,
        };
        d.wait_until(|| d.socket().exists(), "the admin socket appears");
        d
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("lbc.sock")
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("lbcluster.toml")
    }

    fn cli(&self, args: &[&str]) -> Output {
        let mut all = args.to_vec();
        let socket = self.socket();
        all.extend(["--socket", socket.to_str().unwrap()]);
        lbcluster(&all)
    }

    fn wait_until(&self, mut done: impl FnMut() -> bool, what: &str) {
        let start = Instant::now();
        while !done() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "timed out waiting until {what}"
            );
            sleep(Duration::from_millis(20));
        }
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "daemon ignored SIGTERM"
            );
            sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

const SERVICE: &str = "[[service]]\nvip = \"198.18.100.1:80\"\nproto = \"tcp\"\n\
                       [[service.backend]]\naddr = \"198.18.3.10:8080\"\nweight = 3\n";

#[test]
fn test_daemon_answers_status_sessions_and_metrics_then_stops_on_sigterm() {
    let mut d = Daemon::start(SERVICE);
    let meta = std::fs::metadata(d.socket()).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600
    );

    let out = d.cli(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    for needle in [
        "node n1: config version 1",
        "all backends healthy",
        "TCP  198.18.100.1:80 mh none",
        "  -> 198.18.3.10:8080              FullNat 3      0          0         0         up",
        "198.19.200.1         TCP          0    64512",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }

    let out = d.cli(&["status", "-o", "json"]);
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["node"], "n1");
    assert_eq!(v["services"][0]["vip"], "198.18.100.1:80");
    assert_eq!(v["services"][0]["backends"][0]["weight"], 3);
    assert_eq!(v["services"][0]["backends"][0]["healthy"], true);
    assert_eq!(v["sessions"]["count"], 0);

    let out = d.cli(&["sessions", "--vip", "198.18.100.1:80"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("pro expire state"));
    let out = d.cli(&["sessions", "-o", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["sessions"], Value::Array(vec![]));

    let metrics = d.netns.run(|| http_get(d.metrics, "/metrics"));
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    for needle in [
        "lbcluster_backend_up{vip=\"198.18.100.1\",port=\"80\",proto=\"tcp\",backend=\"198.18.3.10:8080\"} 1",
        "lbcluster_backend_weight{vip=\"198.18.100.1\",port=\"80\",proto=\"tcp\",backend=\"198.18.3.10:8080\"} 3",
        "lbcluster_drops_total{reason=\"no_service\"} 0",
        "lbcluster_packets_forwarded_total{direction=\"inbound\"} 0",
        "lbcluster_local_ports_capacity{lip=\"198.19.200.1\",proto=\"tcp\"} 64512",
        "lbcluster_backend_packets_total{vip=\"198.18.100.1\",port=\"80\",proto=\"tcp\",backend=\"198.18.3.10:8080\",direction=\"in\"} 0",
        "lbcluster_service_bytes_total{vip=\"198.18.100.1\",port=\"80\",proto=\"tcp\",direction=\"out\"} 0",
        "lbcluster_io_packets_total{worker=\"0\",op=\"read\"} ",
        "lbcluster_sessions{family=\"ipv4\"} 0",
        "lbcluster_sessions_capacity{family=\"ipv6\"} 262144",
    ] {
        assert!(
            metrics.contains(needle),
            "missing {needle:?} in:\n{metrics}"
        );
    }

    let status = d.terminate();
    assert_eq!(status.code(), Some(0));
    assert!(!d.socket().exists(), "socket left behind");
}

/// A standalone node (no `[cluster]`) refuses the cluster's commands with a message that says
/// where its services come from; a command with a bad argument is a usage error.
#[test]
fn test_standalone_node_refuses_cluster_commands() {
    let d = Daemon::start(SERVICE);
    for args in [
        &["cluster", "init"][..],
        &["cluster", "step-down"],
        &["service", "add", "-t", "198.18.100.7:80"],
        &["service", "list"],
        &[
            "backend",
            "del",
            "-t",
            "198.18.100.1:80",
            "-r",
            "198.18.3.10:8080",
        ],
        &[
            "node",
            "add",
            "n2",
            "--addr",
            "198.18.52.2:7946",
            "--lip",
            "198.19.200.2",
        ],
        &["node", "remove", "n2"],
    ] {
        let out = d.cli(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("this node runs standalone"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    for args in [
        &["service", "add", "198.18.100.7:80"][..],
        &[
            "service",
            "add",
            "-t",
            "198.18.100.7:80",
            "-u",
            "198.18.100.7:53",
        ],
        &["service", "add", "-t", "198.18.100.7:80", "-s", "fastest"],
        &[
            "service",
            "add",
            "-t",
            "198.18.100.7:80",
            "--timeout",
            "forever=1",
        ],
        &[
            "node",
            "add",
            "N2!",
            "--addr",
            "198.18.52.2:7946",
            "--lip",
            "198.19.200.2",
        ],
        &["node", "add", "n2", "--addr", "198.18.52.2:7946"],
    ] {
        let out = d.cli(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn test_status_exits_3_without_a_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("none.sock");
    let out = lbcluster(&["status", "--socket", socket.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(stdout(&out), "");
    assert!(
        stderr(&out).contains("cannot reach the node on"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn test_second_daemon_on_the_same_socket_is_refused() {
    let d = Daemon::start(SERVICE);
    let out = d
        .netns
        .command(&["run", "--config", d.config().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!(
            "lbcluster: error: another lbcluster daemon is answering on {}; stop it first or choose another admin.socket",
            d.socket().display()
        )),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        d.cli(&["status"]).status.code(),
        Some(0),
        "first daemon still answers"
    );
}

#[test]
fn test_status_shows_a_stopped_backend_down_and_exits_1() {
    let netns = Netns::new();
    let backend = netns.run(|| TcpListener::bind("127.0.0.1:0").unwrap());
    let addr = backend.local_addr().unwrap();
    let d = Daemon::start_in(
        netns,
        &format!(
            "[[service]]\nvip = \"198.18.100.1:80\"\nproto = \"tcp\"\n\
         health = {{ kind = \"tcp\", interval_ms = 50, timeout_ms = 40, rise = 1, fall = 2 }}\n\
         [[service.backend]]\naddr = \"{addr}\"\n"
        ),
    );
    sleep(Duration::from_millis(200));
    assert_eq!(d.cli(&["status"]).status.code(), Some(0));
    drop(backend);
    d.wait_until(
        || d.cli(&["status"]).status.code() == Some(1),
        "status exits 1",
    );
    let out = d.cli(&["status"]);
    let text = stdout(&out);
    assert!(text.contains("DEGRADED: 1 backend(s) down"), "{text}");
    assert!(
        text.contains(&format!("  -> {addr:<29} FullNat 1")),
        "{text}"
    );
    assert!(
        text.trim_end().ends_with("DOWN") || text.contains(" DOWN\n"),
        "{text}"
    );
}

#[test]
fn test_second_daemon_on_the_same_tun_device_is_refused() {
    let d = Daemon::start(SERVICE);
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "{NODE}[admin]\nsocket = \"{}\"\n{SERVICE}",
        dir.path().join("other.sock").display()
    );
    let config = write_config(dir.path(), &body);
    let mut second = d
        .netns
        .command(&["run", "--config", config.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Refused at start: it must exit at once. One that runs on is ended (by its pid) and the
    // test fails, rather than waiting for it forever.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while second.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("the second daemon did not exit within 20 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = second.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("TUN device lbc0 already exists (another lbcluster running?)"),
        "{}",
        stderr(&out)
    );
    assert!(
        !dir.path().join("other.sock").exists(),
        "the refused daemon removed its socket"
    );
    assert_eq!(
        d.cli(&["status"]).status.code(),
        Some(0),
        "first daemon still answers"
    );
}

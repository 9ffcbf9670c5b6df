//! The lab itself: topology, reachability, routes moved by hand, and cleanup (also after a
//! failure and after an interrupted `lbcluster-lab up`). Needs root (network namespaces) and
//! ethtool; each test builds its own lab under a unique prefix.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;

use tests::lab::{HTTP_PORT, Lab, LabSpec, NODE_UPLINK_IF, TCP_ECHO_PORT, UDP_ECHO_PORT, alive};

const LAB_BACKEND: &str = env!("CARGO_BIN_EXE_lab-backend");

fn up(nodes: usize, backends: usize) -> Lab {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(str::to_owned));
    assert!(
        uid.as_deref().and_then(|l| l.split_whitespace().nth(1)) == Some("0"),
        "the lab tests need root (network namespaces)"
    );
    Lab::up(LabSpec { nodes, backends }).expect("lab up")
}

fn netns_list() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8(out.stdout).unwrap()
}

fn sock(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn assert_gone(prefix: &str, pids: &[u32]) {
    let list = netns_list();
    assert!(
        !list.contains(&format!("{prefix}-")),
        "namespaces left: {list}"
    );
    for &pid in pids {
        assert!(!alive(pid), "process {pid} survived the lab");
    }
    let dir = std::env::temp_dir().join("lbcluster-lab").join(prefix);
    assert!(!dir.exists(), "{} left", dir.display());
}

#[test]
fn topology_comes_up_and_client_and_nodes_reach_every_backend() {
    let lab = up(2, 2);
    let list = netns_list();
    for ns in lab.namespaces() {
        assert!(
            list.lines()
                .any(|l| l.split_whitespace().next() == Some(&*ns)),
            "{ns}: {list}"
        );
    }
    assert_eq!(lab.backend_addr(1).to_string(), "198.18.3.10");
    assert_eq!(lab.backend_addr6(2).to_string(), "2001:db8:3::11");
    assert_eq!(lab.node_uplink(2).to_string(), "198.18.52.2");
    assert_eq!(lab.node_uplink6(1).to_string(), "2001:db8:51::2");

    for j in 1..=2 {
        let want = format!("b{j}\n");
        // The client through the router, IPv4 and IPv6; no NAT on the way.
        assert_eq!(
            lab.http_get("client", sock(lab.backend_addr(j), HTTP_PORT), "/")
                .unwrap(),
            want
        );
        assert_eq!(
            lab.http_get("client", sock(lab.backend_addr6(j), HTTP_PORT), "/")
                .unwrap(),
            want
        );
        let seen = lab
            .http_get("client", sock(lab.backend_addr(j), HTTP_PORT), "/whoami")
            .unwrap();
        assert!(
            seen.starts_with(&format!("{}:", lab.client_addr())),
            "{seen}"
        );
        // Every node through its uplink.
        for k in 1..=2 {
            let b = sock(lab.backend_addr(j), HTTP_PORT);
            let seen = lab.http_get(&format!("n{k}"), b, "/whoami").unwrap();
            assert!(
                seen.starts_with(&format!("{}:", lab.node_uplink(k))),
                "{seen}"
            );
            let seen = lab.http_get(
                &format!("n{k}"),
                sock(lab.backend_addr6(j), HTTP_PORT),
                "/whoami",
            );
            assert!(
                seen.unwrap()
                    .starts_with(&format!("[{}]:", lab.node_uplink6(k)))
            );
        }
    }

    // Nodes route only the client and backend subnets (no route for the rest of the lab range),
    // with tx checksum offload off on the uplink.
    let routes = lab.exec("n1", &["ip", "route", "show"]).unwrap().stdout;
    let routes = String::from_utf8(routes).unwrap();
    assert!(!routes.contains("default"), "{routes}");
    assert!(
        lab.exec("n1", &["ip", "route", "get", "198.19.255.1"])
            .is_err()
    );
    assert!(
        lab.exec("n1", &["ip", "-6", "route", "get", "2001:db8:ff::1"])
            .is_err()
    );
    let offload = lab
        .exec("n1", &["ethtool", "-k", NODE_UPLINK_IF])
        .unwrap()
        .stdout;
    assert!(
        String::from_utf8(offload)
            .unwrap()
            .contains("tx-checksumming: off")
    );
    // The router has no way out of the lab.
    assert!(!lab.router_routes(false).unwrap().contains("default"));
    assert!(!lab.router_routes(true).unwrap().contains("default"));
}

#[test]
fn backends_answer_http_tcp_echo_and_udp_echo() {
    let lab = up(1, 1);
    for ip in [
        IpAddr::from(lab.backend_addr(1)),
        lab.backend_addr6(1).into(),
    ] {
        let body = lab
            .http_get("client", sock(ip, HTTP_PORT), "/bytes/100000")
            .unwrap();
        assert_eq!(body.len(), 100_000);
        assert_eq!(
            lab.tcp_echo("client", sock(ip, TCP_ECHO_PORT), "hello tcp")
                .unwrap(),
            "hello tcp"
        );
        assert_eq!(
            lab.udp_echo("client", sock(ip, UDP_ECHO_PORT), "hello udp")
                .unwrap(),
            "hello udp"
        );
        let err = lab
            .http_get("client", sock(ip, HTTP_PORT), "/missing")
            .unwrap_err();
        assert!(format!("{err:#}").contains("404"), "{err:#}");
    }
    // The backend logs each connection's peer.
    let log = lab.backend_processes()[0].log();
    assert!(
        log.contains(&format!("from {}:", lab.client_addr())),
        "{log}"
    );
}

/// A load started for ten minutes ends on SIGUSR1 as its time would end it: every stream
/// completes and closes cleanly, and the report comes out (the deployment test ends its load
/// when a playbook ends, a length not known in advance).
#[test]
fn a_load_ends_early_and_cleanly_on_sigusr1() {
    let lab = up(1, 1);
    let backend = IpAddr::from(lab.backend_addr(1));
    let load = tests::load::start(
        &lab,
        sock(backend, TCP_ECHO_PORT),
        sock(backend, HTTP_PORT),
        20,
        50,
        600,
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    load.signal("USR1").unwrap();
    let report = tests::load::report(&load, std::time::Duration::from_secs(15)).unwrap();
    let (streams, short) = (&report["streams"], &report["short"]);
    assert_eq!(streams["completed"], 20, "{streams}");
    assert!(streams["bytes_verified"].as_u64() > Some(0), "{streams}");
    let attempted = short["attempted"].as_u64().unwrap();
    assert!((50..=50 * 10).contains(&attempted), "{short}");
    assert_eq!(short["failed"], 0, "{short}");
}

#[test]
fn routes_to_nodes_are_installed_moved_and_removed_by_hand() {
    let lab = up(2, 1);
    let vip: IpAddr = "198.19.255.1".parse().unwrap();
    let vip6: IpAddr = "2001:db8:ff::1".parse().unwrap();
    let mut servers = Vec::new();
    for k in 1..=2 {
        let node = format!("n{k}");
        lab.exec(
            &node,
            &["ip", "addr", "add", "198.19.255.1/32", "dev", "lo"],
        )
        .unwrap();
        lab.exec(
            &node,
            &["ip", "addr", "add", "2001:db8:ff::1/128", "dev", "lo"],
        )
        .unwrap();
        servers.push(
            lab.spawn(&node, &[LAB_BACKEND, "serve", "--name", &node])
                .unwrap(),
        );
    }
    let wait_for = |addr: SocketAddr, want: &str| {
        // The servers in the nodes start asynchronously.
        for _ in 0..100 {
            if lab.http_get("client", addr, "/").is_ok_and(|b| b == want) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("{addr} never answered {want:?}");
    };
    for ip in [vip, vip6] {
        lab.route_to_node(ip, 1).unwrap();
        wait_for(sock(ip, HTTP_PORT), "n1\n");
        lab.route_to_node(ip, 2).unwrap();
        assert_eq!(
            lab.http_get("client", sock(ip, HTTP_PORT), "/").unwrap(),
            "n2\n"
        );
    }
    lab.route_to_nodes(vip, &[1, 2]).unwrap();
    let routes = lab.router_routes(false).unwrap();
    assert!(routes.contains("198.19.255.1 "), "{routes}");
    assert_eq!(routes.matches("nexthop via").count(), 2, "{routes}");
    // Layer-4 hashing: connections from different source ports reach both nodes.
    let mut names: Vec<String> = (0..20)
        .map(|_| lab.http_get("client", sock(vip, HTTP_PORT), "/").unwrap())
        .collect();
    names.sort();
    names.dedup();
    assert_eq!(names, ["n1\n", "n2\n"]);
    lab.unroute(vip).unwrap();
    assert!(lab.http_get("client", sock(vip, HTTP_PORT), "/").is_err());
    assert!(lab.route_to_node(vip, 3).is_err());

    // Spawned processes die with their handle.
    let pid = servers[0].pid();
    assert!(servers[0].is_running());
    drop(servers.remove(0));
    assert!(!alive(pid));
}

#[test]
fn nothing_remains_after_drop_or_down() {
    let lab = up(2, 2);
    let prefix = lab.prefix().to_owned();
    let node_process = lab.spawn("n1", &["sleep", "600"]).unwrap();
    let short = lab.spawn("client", &["sh", "-c", "echo done"]).unwrap();
    let status = short.wait_timeout(std::time::Duration::from_secs(5));
    assert!(status.is_some_and(|s| s.success()));
    assert_eq!(short.log(), "done\n");
    // A stopped (hung) process is killed as well.
    node_process.signal("STOP").unwrap();
    let mut pids: Vec<u32> = lab.backend_processes().iter().map(|p| p.pid()).collect();
    pids.push(node_process.pid());
    // The handle outlives the lab: the lab still kills the process.
    drop(lab);
    assert_gone(&prefix, &pids);
    assert!(!node_process.is_running());

    let mut lab = up(1, 1);
    let prefix = lab.prefix().to_owned();
    let pids: Vec<u32> = lab.backend_processes().iter().map(|p| p.pid()).collect();
    lab.down().unwrap();
    assert_gone(&prefix, &pids);
    lab.down().unwrap();
}

#[test]
fn a_failing_test_still_tears_its_lab_down() {
    let mut seen = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let lab = up(1, 1);
        seen = Some((lab.prefix().to_owned(), lab.backend_processes()[0].pid()));
        panic!("test failure inside the lab");
    }));
    assert!(result.is_err());
    let (prefix, pid) = seen.unwrap();
    assert_gone(&prefix, &[pid]);
}

#[test]
fn cli_up_status_and_down_of_a_detached_lab() {
    let bin = env!("CARGO_BIN_EXE_lbcluster-lab");
    let prefix = tests::lab::unique_prefix();
    let run = |args: &[&str]| {
        let out = Command::new(bin).args(args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{args:?}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let up = run(&["up", "--nodes", "1", "--backends", "1", "--prefix", &prefix]);
    assert!(
        up.contains(&format!("{prefix}-b1")) && up.contains("198.18.3.10"),
        "{up}"
    );
    let status = run(&["status", "--prefix", &prefix]);
    // The lab outlived the command that built it, backend process included.
    let b1 = status
        .lines()
        .find(|l| l.starts_with(&format!("{prefix}-b1 ")))
        .unwrap();
    let pid: u32 = b1.split(['[', ']']).nth(1).unwrap().trim().parse().unwrap();
    assert!(alive(pid));
    assert!(status.contains("198.18.51.2/24"), "{status}");
    assert!(Path::new(&std::env::temp_dir().join("lbcluster-lab").join(&prefix)).exists());
    let down = run(&["down", "--prefix", &prefix]);
    assert_eq!(down.lines().count(), 4, "{down}");
    assert_gone(&prefix, &[pid]);
    assert!(run(&["status", "--prefix", &prefix]).contains("no namespaces"));
    assert!(
        Command::new(bin)
            .args(["down", "--prefix", "Bad-Prefix"])
            .status()
            .unwrap()
            .code()
            == Some(1)
    );
}

//! End-to-end tests of the TUN data plane in network namespaces (they need root).
//!
//! Topology per test, all namespaces named `lbcio-<pid>-<n>-<role>`:
//! ```text
//!  client 198.18.1.2 ── c0|node|b0 ── backend 198.18.3.10
//!         2001:db8:1::2    lbc0         2001:db8:3::10
//! ```
//! The node namespace routes the VIPs (198.18.100.1, 2001:db8:100::1) and LIPs (198.19.200.1,
//! 2001:db8:200::1) into its TUN device `lbc0`; the client routes the VIPs to the node, the
//! backend routes the LIPs to the node. Checksum offload is off on the node's veths, so the
//! kernel completes partial checksums in software and a wrong partial sum fails the test.

use std::io::{Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket,
};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Result;
use dataplane::{
    BackendConfig, Engine, EngineConfig, Event, L4Proto, ServiceConfig, Snapshot, Timeouts,
    sched::{MaglevParams, SchedulerKind},
};

use super::kernel::{KernelState, Netns, ip, read_sysctl};
use super::{DataplaneHandle, DataplaneSpec, WorkerIoStats, start};

const TUN: &str = "lbc0";
const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const LIP4: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 1);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const BACKEND4: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1);
const LIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 1);
const BACKEND6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 0x10);
const TIMEOUT: Duration = Duration::from_secs(10);

/// Namespaces of one test, deleted on drop (also when the test panics). Deleting a namespace
/// deletes the veths in it.
struct Lab {
    prefix: String,
    namespaces: Vec<String>,
}

impl Lab {
    fn new() -> Lab {
        static N: AtomicUsize = AtomicUsize::new(0);
        Lab {
            prefix: format!(
                "lbcio-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ),
            namespaces: Vec::new(),
        }
    }

    fn netns(&mut self, role: &str) -> String {
        let name = format!("{}-{role}", self.prefix);
        ip(&["netns", "add", &name]).expect("ip netns add (tests need root)");
        self.namespaces.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"]).unwrap();
        name
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.drain(..).rev() {
            let _ = ip(&["netns", "del", &ns]);
        }
    }
}

/// The three-namespace topology.
struct Topo {
    node: String,
    client: String,
    backend: String,
    // Last: dropped after anything the test holds in the namespaces.
    _lab: Lab,
}

fn nsip(ns: &str, args: &str) {
    let mut a = vec!["-n", ns];
    a.extend(args.split_whitespace());
    ip(&a).unwrap();
}

fn topo() -> Topo {
    let mut lab = Lab::new();
    let node = lab.netns("node");
    let client = lab.netns("client");
    let backend = lab.netns("backend");
    nsip(
        &node,
        &format!("link add c0 type veth peer name n0 netns {client}"),
    );
    nsip(
        &node,
        &format!("link add b0 type veth peer name n0 netns {backend}"),
    );
    for (ns, dev, v4, v6) in [
        (&node, "c0", "198.18.1.1/24", "2001:db8:1::1/64"),
        (&node, "b0", "198.18.3.1/24", "2001:db8:3::1/64"),
        (&client, "n0", "198.18.1.2/24", "2001:db8:1::2/64"),
        (&backend, "n0", "198.18.3.10/24", "2001:db8:3::10/64"),
    ] {
        nsip(ns, &format!("addr add {v4} dev {dev}"));
        nsip(ns, &format!("addr add {v6} dev {dev} nodad"));
        nsip(ns, &format!("link set {dev} up"));
    }
    nsip(&client, "route add 198.18.100.0/24 via 198.18.1.1");
    nsip(&client, "-6 route add 2001:db8:100::/48 via 2001:db8:1::1");
    nsip(&backend, "route add 198.19.200.0/24 via 198.18.3.1");
    nsip(&backend, "-6 route add 2001:db8:200::/48 via 2001:db8:3::1");
    // TESTBED: veth hides checksum bugs unless the node's uplinks finish sums in software.
    for dev in ["c0", "b0"] {
        tx_checksum(&node, dev, false);
    }
    Topo {
        node,
        client,
        backend,
        _lab: lab,
    }
}

/// `ethtool -K DEV tx on|off` in namespace `ns`, through the ethtool ioctl (no ethtool needed).
fn tx_checksum(ns: &str, dev: &str, on: bool) {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_STXCSUM: u32 = 0x17;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    /// `struct ifreq` with `ifr_data`.
    #[repr(C)]
    struct IfReqData {
        name: [libc::c_char; libc::IFNAMSIZ],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }
    let dev = dev.to_owned();
    netns(ns)
        .run(move || {
            let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
            let mut value = EthtoolValue {
                cmd: ETHTOOL_STXCSUM,
                data: u32::from(on),
            };
            let mut req = IfReqData {
                name: [0; libc::IFNAMSIZ],
                data: &mut value,
                _pad: [0; 16],
            };
            for (d, s) in req.name.iter_mut().zip(dev.bytes()) {
                *d = s as libc::c_char;
            }
            // SAFETY: SIOCETHTOOL reads a `struct ifreq` whose `ifr_data` points to an
            // `ethtool_value`; both live across the call.
            let r =
                unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL, &mut req as *mut IfReqData) };
            anyhow::ensure!(
                r == 0,
                "ETHTOOL_STXCSUM on {dev}: {}",
                std::io::Error::last_os_error()
            );
            Ok(())
        })
        .unwrap();
}

fn netns(name: &str) -> Netns {
    Netns::open(&Path::new("/var/run/netns").join(name)).unwrap()
}

/// Runs `f` on a new thread inside namespace `ns`.
fn spawn_in<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    let ns = netns(ns);
    std::thread::spawn(move || {
        ns.enter().unwrap();
        f()
    })
}

fn engine() -> Arc<Engine> {
    let svc = |vip: SocketAddr, backend: SocketAddr, proto| ServiceConfig {
        vip,
        proto,
        scheduler: SchedulerKind::Maglev,
        timeouts: Timeouts::default(),
        // TOA grows every SYN by 8 (IPv4) or 20 (IPv6) bytes through the TUN.
        toa: proto == L4Proto::Tcp,
        conn_reuse: dataplane::ConnReuse::default(),
        syn_proxy: dataplane::SynProxy::default(),
        backends: vec![BackendConfig {
            addr: backend,
            weight: 1,
            healthy: true,
        }],
    };
    let v4 = |a: Ipv4Addr, p| SocketAddr::new(a.into(), p);
    let v6 = |a: Ipv6Addr, p| SocketAddr::new(a.into(), p);
    let services = [
        svc(v4(VIP4, 53), v4(BACKEND4, 53), L4Proto::Udp),
        svc(v4(VIP4, 5001), v4(BACKEND4, 5001), L4Proto::Tcp),
        svc(v6(VIP6, 5001), v6(BACKEND6, 5001), L4Proto::Tcp),
        svc(v4(VIP4, 5201), v4(BACKEND4, 5201), L4Proto::Tcp),
    ];
    let snapshot = Snapshot::new(1, &services, MaglevParams::default(), None).unwrap();
    Engine::new(
        EngineConfig {
            max_sessions_v4: 1024,
            max_sessions_v6: 1024,
            local_addrs: vec![LIP4.into(), LIP6.into()],
            ..Default::default()
        },
        snapshot,
    )
    .unwrap()
}

fn spec(queues: usize) -> DataplaneSpec {
    DataplaneSpec {
        tun_name: TUN.to_owned(),
        queues,
        routes: vec![
            VIP4.into(),
            LIP4.into(),
            VIP6.into(),
            LIP6.into(),
            VIP4.into(),
        ],
        // These tests are about the TUN path; the fast path has its own (tests/tests/fastpath.rs).
        fastpath: crate::config::FastPathMode::Off,
        fastpath_devices: None,
        fastpath_sessions: 1024,
    }
}

/// Starts the data plane inside namespace `ns` (from a thread that entered it) and hands the
/// handle back to the test thread, which stays in the host namespace.
fn start_in(ns: &str, spec: DataplaneSpec, engine: Arc<Engine>) -> Result<DataplaneHandle> {
    start_with_events(ns, spec, engine, None)
}

/// [`start_in`] with the workers' session events sent to `events`.
fn start_with_events(
    ns: &str,
    spec: DataplaneSpec,
    engine: Arc<Engine>,
    events: Option<super::EventSink>,
) -> Result<DataplaneHandle> {
    spawn_in(ns, move || start(&spec, engine, events))
        .join()
        .unwrap()
}

fn total(stats: &[WorkerIoStats]) -> WorkerIoStats {
    stats
        .iter()
        .fold(WorkerIoStats::default(), |a, w| WorkerIoStats {
            packets_read: a.packets_read + w.packets_read,
            bytes_read: a.bytes_read + w.bytes_read,
            gso_packets: a.gso_packets + w.gso_packets,
            packets_written: a.packets_written + w.packets_written,
            read_errors: a.read_errors + w.read_errors,
            write_errors: a.write_errors + w.write_errors,
            events_drained: a.events_drained + w.events_drained,
            events_dropped: a.events_dropped + w.events_dropped,
            progress: a.progress + w.progress,
        })
}

/// `ip -n NS ARGS` succeeds and prints something.
fn ip_shows(ns: &str, args: &str) -> bool {
    let mut a = vec!["-n", ns];
    a.extend(args.split_whitespace());
    Command::new("ip")
        .args(&a)
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.is_empty())
}

fn sysctls(ns: &str) -> Vec<String> {
    netns(ns)
        .run(|| {
            [
                "net.ipv4.ip_forward",
                "net.ipv6.conf.all.forwarding",
                "net.ipv4.conf.all.rp_filter",
            ]
            .iter()
            .map(|n| read_sysctl(n))
            .collect()
        })
        .unwrap()
}

#[test]
fn test_udp_through_tun_and_stop_cleans_up() {
    let t = topo();
    // Non-default values, to see them restored.
    netns(&t.node)
        .run(|| {
            std::fs::write("/proc/sys/net/ipv4/conf/all/rp_filter", "2")?;
            Ok(())
        })
        .unwrap();
    let before = sysctls(&t.node);
    assert_eq!(before, ["0", "0", "2"]);

    let engine = engine();
    let (events_tx, mut events_rx) = tokio::sync::mpsc::channel(16);
    let dp = start_with_events(&t.node, spec(2), engine.clone(), Some(events_tx)).unwrap();
    assert_eq!(sysctls(&t.node), ["1", "1", "0"]);
    assert!(ip_shows(&t.node, "link show lbc0 up"));
    assert!(ip_shows(&t.node, "route show 198.18.100.1 dev lbc0"));
    assert!(ip_shows(&t.node, "-6 route show 2001:db8:200::1 dev lbc0"));
    assert_eq!(dp.stats().workers.len(), 2);

    let (ready_tx, ready_rx) = mpsc::channel();
    let backend = spawn_in(&t.backend, move || {
        let s = UdpSocket::bind((BACKEND4, 53)).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        ready_tx.send(()).unwrap();
        let mut buf = [0u8; 1500];
        let (n, from) = s.recv_from(&mut buf).unwrap();
        let mut reply = b"pong:".to_vec();
        reply.extend_from_slice(&buf[..n]);
        s.send_to(&reply, from).unwrap();
        from
    });
    ready_rx.recv().unwrap();
    let client = spawn_in(&t.client, || {
        let s = UdpSocket::bind((CLIENT4, 0)).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.send_to(b"ping", (VIP4, 53)).unwrap();
        let mut buf = [0u8; 1500];
        let (n, from) = s.recv_from(&mut buf).unwrap();
        (buf[..n].to_vec(), from)
    });
    let seen_by_backend = backend.join().unwrap();
    let (reply, from) = client.join().unwrap();
    assert_eq!(
        seen_by_backend.ip(),
        IpAddr::from(LIP4),
        "source is the LIP"
    );
    assert_eq!(reply, b"pong:ping");
    assert_eq!(
        from,
        SocketAddr::new(VIP4.into(), 53),
        "answer comes from the VIP"
    );

    let counters = engine.counters();
    assert_eq!(counters.events(Event::ForwardedInbound), 1);
    assert_eq!(counters.events(Event::ForwardedOutbound), 1);
    // A worker counts a write after the syscall returns, maybe after the client got the answer,
    // and drains events at its next housekeeping round.
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        let io = total(&dp.stats().workers);
        if io.packets_written >= 2 && io.events_drained >= 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let io = total(&dp.stats().workers);
    assert!(io.packets_read >= 2 && io.packets_written >= 2, "{io:?}");
    assert_eq!(io.read_errors + io.write_errors, 0, "{io:?}");
    assert!(
        io.events_drained >= 1,
        "session created event drained: {io:?}"
    );
    // ... and handed to session sync's inbox.
    let event = events_rx.try_recv().expect("a session event");
    assert!(
        matches!(event, dataplane::SessionEvent::Created(r) if r.vip == SocketAddr::new(VIP4.into(), 53)),
        "{event:?}"
    );
    assert_eq!(io.events_dropped, 0);
    // Liveness advances while idle.
    let p = io.progress;
    std::thread::sleep(Duration::from_millis(50));
    assert!(total(&dp.stats().workers).progress > p);

    dp.stop().unwrap();
    assert!(!ip_shows(&t.node, "link show lbc0"), "device gone");
    assert!(!ip_shows(&t.node, "route show 198.18.100.1"), "route gone");
    assert!(
        !ip_shows(&t.node, "-6 route show 2001:db8:200::1"),
        "route gone"
    );
    assert_eq!(sysctls(&t.node), before, "sysctls restored");
}

#[test]
fn test_second_start_fails_while_running() {
    let t = topo();
    let before = sysctls(&t.node);
    let dp = start_in(&t.node, spec(1), engine()).unwrap();
    let err = start_in(&t.node, spec(1), engine()).unwrap_err();
    assert_eq!(
        format!("{err:#}"),
        "TUN device lbc0 already exists (another lbcluster running?)"
    );
    // The failed start did not disturb the running one.
    assert!(ip_shows(&t.node, "route show 198.18.100.1 dev lbc0"));
    drop(dp); // Drop cleans up like stop().
    assert!(!ip_shows(&t.node, "link show lbc0"));
    assert_eq!(sysctls(&t.node), before);
    // The name is free again.
    start_in(&t.node, spec(1), engine())
        .unwrap()
        .stop()
        .unwrap();
}

#[test]
fn test_failed_start_leaves_nothing_behind() {
    let t = topo();
    let before = sysctls(&t.node);
    // A route that cannot be added (it exists already, on another device).
    nsip(&t.node, "route add 198.18.100.1/32 dev c0");
    let err = start_in(&t.node, spec(1), engine()).unwrap_err();
    assert!(
        format!("{err:#}").contains("routing 198.18.100.1/32 into lbc0"),
        "{err:#}"
    );
    assert!(!ip_shows(&t.node, "link show lbc0"));
    assert_eq!(sysctls(&t.node), before);
    assert!(
        ip_shows(&t.node, "route show 198.18.100.1 dev c0"),
        "foreign route kept"
    );

    let bad = DataplaneSpec {
        tun_name: "a/b".to_owned(),
        ..spec(1)
    };
    let err = start_in(&t.node, bad, engine()).unwrap_err();
    assert!(
        format!("{err}").contains("invalid TUN device name"),
        "{err}"
    );
}

/// Host routes through `dev` in namespace `ns`, every table, both families, sorted.
fn host_routes(ns: &str, dev: &str) -> Vec<IpAddr> {
    let mut routes = Vec::new();
    for family in ["-4", "-6"] {
        let out = Command::new("ip")
            .args(["-n", ns, family, "route", "show", "table", "all"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            // A host route prints its destination without the prefix length.
            if let Some(dst) = words.first().and_then(|w| w.parse::<IpAddr>().ok())
                && words.windows(2).any(|w| w == ["dev", dev])
            {
                routes.push(dst);
            }
        }
    }
    routes.sort();
    routes
}

#[test]
fn test_set_routes_follows_the_config() {
    let t = topo();
    let (x, y, z): (IpAddr, IpAddr, IpAddr) = (VIP4.into(), LIP4.into(), VIP6.into());
    let started = DataplaneSpec {
        routes: vec![x],
        ..spec(1)
    };
    let mut dp = start_in(&t.node, started, engine()).unwrap();
    assert_eq!(host_routes(&t.node, TUN), [x]);

    // Called from the test thread, in the host namespace: the routes change in the node's.
    dp.set_routes(&[z, y, z]).unwrap();
    assert_eq!(host_routes(&t.node, TUN), [y, z]);
    // Nothing to do is no error.
    dp.set_routes(&[y, z]).unwrap();
    assert_eq!(host_routes(&t.node, TUN), [y, z]);

    dp.stop().unwrap();
    assert!(host_routes(&t.node, TUN).is_empty());
    for family in ["-4", "-6"] {
        assert!(
            !ip_shows(&t.node, &format!("{family} route show dev {TUN}")),
            "{family} routes remain"
        );
    }
}

/// The record of owned routes stays true through failures: checked on a device that outlives
/// the state, so that only `remove_routes` can take the routes away.
#[test]
fn test_set_routes_reports_failures_by_address_and_keeps_the_record() {
    let t = topo();
    nsip(&t.node, "link add d0 type veth peer name d1");
    nsip(&t.node, "link set d1 up");
    nsip(&t.node, "link set d0 up");
    let (a, b, c): (IpAddr, IpAddr, IpAddr) = (VIP4.into(), LIP4.into(), LIP6.into());
    let foreign = IpAddr::from(Ipv4Addr::new(198, 18, 100, 2));
    let mut st = spawn_in(&t.node, move || KernelState::apply("d0", &[a]))
        .join()
        .unwrap()
        .unwrap();

    // A route already through the device is taken as ours; one through another device is not
    // ours to take, and only that address fails.
    nsip(&t.node, "-6 route add 2001:db8:200::1/128 dev d0");
    nsip(&t.node, "route add 198.18.100.2/32 dev c0");
    let err = st.set_routes(&[c, foreign, b]).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("routing 198.18.100.2/32 into d0"), "{msg}");
    assert!(
        !msg.contains("198.19.200.1") && !msg.contains("2001:db8"),
        "{msg}"
    );
    assert_eq!(host_routes(&t.node, "d0"), [b, c]);
    assert!(ip_shows(&t.node, "route show 198.18.100.2 dev c0"));

    // A route deleted by hand is simply gone; the foreign one is still not ours.
    nsip(&t.node, "route del 198.19.200.1/32 dev d0");
    st.set_routes(&[c]).unwrap();
    assert_eq!(host_routes(&t.node, "d0"), [c]);

    st.remove_routes().unwrap();
    assert!(host_routes(&t.node, "d0").is_empty());
    assert!(
        ip_shows(&t.node, "route show 198.18.100.2 dev c0"),
        "foreign route kept"
    );
    st.restore_sysctls().unwrap();
}

/// A deterministic byte pattern that is not periodic in any small power of two.
fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Echo server: accepts one connection and echoes it; returns the peer address it saw.
fn echo_server(ns: &str, addr: SocketAddr) -> (JoinHandle<SocketAddr>, mpsc::Receiver<()>) {
    let (ready_tx, ready_rx) = mpsc::channel();
    let h = spawn_in(ns, move || {
        let l = TcpListener::bind(addr).unwrap();
        ready_tx.send(()).unwrap();
        let (mut s, peer) = l.accept().unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).unwrap();
        }
        s.shutdown(Shutdown::Write).unwrap();
        peer
    });
    (h, ready_rx)
}

/// Connects to `vip`, sends `data`, and returns what comes back until EOF.
fn echo_client(ns: &str, vip: SocketAddr, data: Arc<Vec<u8>>) -> JoinHandle<Vec<u8>> {
    spawn_in(ns, move || {
        let s = TcpStream::connect_timeout(&vip, TIMEOUT).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            w.write_all(&data).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        let mut back = Vec::new();
        (&s).read_to_end(&mut back).unwrap();
        writer.join().unwrap();
        back
    })
}

fn tcp_echo(t: &Topo, vip: SocketAddr, backend: SocketAddr, lip: IpAddr) {
    let (server, ready) = echo_server(&t.backend, backend);
    ready.recv().unwrap();
    let data = Arc::new(pattern(1 << 20));
    let back = echo_client(&t.client, vip, data.clone()).join().unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == *data, "echoed bytes differ");
    assert_eq!(server.join().unwrap().ip(), lip, "backend sees the LIP");
}

#[test]
fn test_tcp_echo_1mb_through_tun_with_offloads() {
    let t = topo();
    let engine = engine();
    let dp = start_in(&t.node, spec(2), engine.clone()).unwrap();
    tcp_echo(
        &t,
        SocketAddr::new(VIP4.into(), 5001),
        SocketAddr::new(BACKEND4.into(), 5001),
        LIP4.into(),
    );
    tcp_echo(
        &t,
        SocketAddr::new(VIP6.into(), 5001),
        SocketAddr::new(BACKEND6.into(), 5001),
        LIP6.into(),
    );
    let counters = engine.counters();
    assert_eq!(counters.events(Event::ToaInserted), 2, "TOA grew both SYNs");
    let io = total(&dp.stats().workers);
    assert!(
        io.gso_packets > 0,
        "the kernel handed over GSO segments: {io:?}"
    );
    assert_eq!(io.read_errors + io.write_errors, 0, "{io:?}");
    dp.stop().unwrap();
}

/// Throughput of one TCP stream client → VIP → backend through the TUN (needs iperf3), with
/// checksum offload off and on on the node's veths, one and two queues:
/// `cargo test -p node --release -- --ignored --nocapture tcp_throughput`.
#[test]
#[ignore = "measurement, needs iperf3"]
fn test_tcp_throughput_iperf3() {
    let t = topo();
    for tx in ["off", "on"] {
        for dev in ["c0", "b0"] {
            tx_checksum(&t.node, dev, tx == "on");
        }
        for queues in [1, 2] {
            let dp = start_in(&t.node, spec(queues), engine()).unwrap();
            let mut server = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &t.backend,
                    "iperf3",
                    "-s",
                    "-1",
                    "-B",
                    "198.18.3.10",
                ])
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(300));
            let started = Instant::now();
            let out = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &t.client,
                    "iperf3",
                    "-c",
                    "198.18.100.1",
                    "-t",
                    "4",
                ])
                .output()
                .unwrap();
            let _ = server.wait();
            let secs = started.elapsed().as_secs_f64();
            let io = total(&dp.stats().workers);
            dp.stop().unwrap();
            assert!(out.status.success());
            let stdout = String::from_utf8_lossy(&out.stdout);
            let receiver = stdout
                .lines()
                .find(|l| l.ends_with("receiver"))
                .unwrap_or("");
            println!(
                "tx {tx}, {queues} queue(s): {receiver}\n  {:.0} reads/s, {:.0} bytes per read, \
                 {} of {} reads GSO",
                io.packets_read as f64 / secs,
                io.bytes_read as f64 / io.packets_read.max(1) as f64,
                io.gso_packets,
                io.packets_read
            );
        }
    }
}

/// Drops CAP_NET_ADMIN from the calling thread's effective set (capabilities are per thread).
fn drop_net_admin() {
    const CAP_NET_ADMIN: u32 = 12;
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    // _LINUX_CAPABILITY_VERSION_3: two data words; pid 0 is the calling thread.
    let mut hdr = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capget writes one header and two data structs of exactly these layouts.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut hdr as *mut Header, data.as_mut_ptr()) };
    assert_eq!(r, 0, "capget");
    data[0].effective &= !(1 << CAP_NET_ADMIN);
    // SAFETY: capset reads one header and two data structs of exactly these layouts.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut hdr as *mut Header, data.as_ptr()) };
    assert_eq!(r, 0, "capset");
}

#[test]
fn test_start_without_cap_net_admin_fails_clearly() {
    let t = topo();
    let ns = netns(&t.node);
    let err = std::thread::spawn(move || {
        ns.enter().unwrap();
        drop_net_admin();
        start(&spec(1), engine(), None).unwrap_err()
    })
    .join()
    .unwrap();
    let msg = format!("{err:#}");
    assert!(
        msg.starts_with("creating TUN device lbc0 is not permitted: it needs CAP_NET_ADMIN"),
        "{msg}"
    );
    assert!(!ip_shows(&t.node, "link show lbc0"));
}

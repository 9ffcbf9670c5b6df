//! The lab topology (DESIGN §9), built from network namespaces on one machine.
//!
//! ```text
//!  client ──────┐                      ┌── uplink ── n1
//!  198.18.1.10  │ 198.18.1.1           │ 198.18.51.1 ↔ .2
//!               └──────── router ──────┼── uplink ── n2      (198.18.(50+k).0/24 per node)
//!         198.18.3.1 bridge `backends` │   ...
//!      ┌──────────┬──────────┐         └── ...
//!     b1 (.10)   b2 (.11)   ...          (198.18.3.(9+j), 2001:db8:3::(9+j))
//! ```
//!
//! * `client`: 198.18.1.10/24, 2001:db8:1::10/64, default routes via the router.
//! * `router`: forwarding on, L4 multipath hashing, one veth per node, a bridge for the backends;
//!   it only knows lab subnets plus the /32 and /128 routes the tests (or, later, BGP) install.
//! * `nK`: one-armed on its uplink, routes only to the client and backend subnets and to the other
//!   nodes' uplink addresses (not the whole lab range: the VIP would loop), tx checksum offload
//!   off on the uplink (veth hides checksum bugs otherwise).
//! * `bJ`: runs `lab-backend serve --name bJ` (HTTP 8080, TCP echo 9000, UDP echo 5353).
//!
//! Every namespace is named `<prefix>-<role>`; everything is removed by [`Lab::down`], by `Drop`,
//! or, after an interrupted run, by [`Lab::cleanup_stale`], including the file systems a test
//! mounts in the lab's directory ([`Lab::mount_tmpfs`]). Addresses come only from
//! 198.18.0.0/15 and 2001:db8::/32. Reverse path filtering is off in every lab namespace (a
//! load balancer's TUN device carries packets whose source is routed elsewhere).
//!
//! Needs root and the programs of [`PROGRAMS`] ([`crate::tools`] names their packages).

use std::ffi::CString;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

pub use crate::backend::{HTTP_PORT, TCP_ECHO_PORT, UDP_ECHO_PORT};

/// The most nodes a lab can have (node k uses 198.18.(50+k).0/24).
pub const MAX_NODES: usize = 200;
/// The most backends a lab can have (backend j is 198.18.3.(9+j)).
pub const MAX_BACKENDS: usize = 200;
/// The uplink interface's name inside every node namespace.
pub const NODE_UPLINK_IF: &str = "uplink";
/// The longest prefix accepted (namespace names stay short and readable).
pub const MAX_PREFIX_LEN: usize = 24;

/// The programs every lab runs: `ip` builds it, `sysctl` and `ethtool` set up its namespaces and
/// devices, `kill` signals and removes its processes. [`Lab::up`] checks them first.
pub const PROGRAMS: &[&str] = &["ip", "sysctl", "ethtool", "kill"];

/// Timeout of the client helpers ([`Lab::http_get`], [`Lab::tcp_echo`], [`Lab::udp_echo`]).
const CLIENT_TIMEOUT_MS: &str = "3000";

/// The router's addresses on the client and backend subnets.
const CLIENT_GW: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 1, 1));
const CLIENT_GW6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1));
const BACKEND_GW: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 1);
const BACKEND_GW6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 1);

/// What to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabSpec {
    /// Load-balancer node namespaces `n1..=nodes`.
    pub nodes: usize,
    /// Backend namespaces `b1..=backends`, each running `lab-backend`.
    pub backends: usize,
}

/// A process running inside a lab namespace. Killed (SIGKILL, by pid) when dropped, and when its
/// lab is torn down.
#[derive(Debug)]
pub struct LabProcess {
    child: Arc<Mutex<Child>>,
    pid: u32,
    log: PathBuf,
}

impl LabProcess {
    /// The process id (`ip netns exec` execs the command, so this is the command's pid).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The file holding the process's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The process's output so far.
    pub fn log(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn is_running(&self) -> bool {
        matches!(lock(&self.child).try_wait(), Ok(None))
    }

    /// Sends a signal by name (`TERM`, `STOP`, `CONT`, …) with `kill -s`.
    pub fn signal(&self, signal: &str) -> Result<()> {
        ensure!(self.is_running(), "process {} is not running", self.pid);
        run(Command::new("kill").args(["-s", signal, &self.pid.to_string()]))?;
        Ok(())
    }

    /// Kills the process (SIGKILL) and reaps it; does nothing if it has already exited.
    pub fn kill(&self) {
        kill_child(&self.child);
    }

    /// Waits up to `timeout` for the process to exit; its exit status if it did.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = lock(&self.child).try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for LabProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn lock(child: &Mutex<Child>) -> MutexGuard<'_, Child> {
    child.lock().unwrap_or_else(PoisonError::into_inner)
}

fn kill_child(child: &Mutex<Child>) {
    let mut child = lock(child);
    if matches!(child.try_wait(), Ok(None)) {
        // Errors: it exited between the two calls; wait() reaps it either way.
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A running lab. Removed by [`Lab::down`] or on drop.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    spec: LabSpec,
    dir: PathBuf,
    processes: Mutex<Vec<Arc<Mutex<Child>>>>,
    spawned: AtomicU32,
    backends: Vec<LabProcess>,
    down: bool,
}

/// A prefix unique on this machine for the life of this process: `lbc<pid>t<counter>`.
pub fn unique_prefix() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "lbc{}t{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn check_prefix(prefix: &str) -> Result<()> {
    ensure!(
        !prefix.is_empty()
            && prefix.len() <= MAX_PREFIX_LEN
            && prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "lab prefix {prefix:?} must be 1 to {MAX_PREFIX_LEN} lowercase letters or digits"
    );
    Ok(())
}

fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("{} has a NUL byte", path.display()))
}

/// Unmounts every file system mounted at or below `dir` (as this process's mount table shows
/// them), the innermost first.
fn unmount_all_under(dir: &Path) -> Result<()> {
    let Ok(dir) = fs::canonicalize(dir) else {
        return Ok(());
    };
    let table = fs::read_to_string("/proc/self/mountinfo").context("read /proc/self/mountinfo")?;
    let mut mounts: Vec<PathBuf> = table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|point| PathBuf::from(unescape_mount_point(point)))
        .filter(|point| point.starts_with(&dir))
        .collect();
    // Deepest first; a path mounted over twice is listed (and unmounted) twice.
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for point in mounts {
        let target = c_path(&point)?;
        // SAFETY: a NUL-terminated path that outlives the call.
        if unsafe { libc::umount2(target.as_ptr(), 0) } != 0 {
            let busy = std::io::Error::last_os_error();
            // Something still has it open: detach it now, the kernel frees it once unused.
            // SAFETY: as above.
            if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("unmount {} (first: {busy})", point.display()));
            }
        }
    }
    Ok(())
}

/// A mount point as `/proc/self/mountinfo` writes it: space, tab, newline and backslash as
/// three-digit octal escapes.
fn unescape_mount_point(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)))
            .map(|d| d.iter().fold(0u32, |n, b| n * 8 + u32::from(b - b'0')));
        match octal.and_then(|n| u8::try_from(n).ok()) {
            Some(b) => {
                out.push(b);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The lab's working directory (process logs): `$TMPDIR/lbcluster-lab/<prefix>`.
fn lab_dir(prefix: &str) -> PathBuf {
    std::env::temp_dir().join("lbcluster-lab").join(prefix)
}

/// Runs a command; its output, or an error carrying the command line and its stderr.
fn run(cmd: &mut Command) -> Result<Output> {
    let line = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {line}"))?;
    if !out.status.success() {
        bail!(
            "{line} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// `ip <args>`, the arguments split on whitespace (lab names and addresses have none).
fn ip(args: &str) -> Result<Output> {
    run(Command::new("ip").args(args.split_whitespace()))
}

/// The `lab-backend` binary: `$LBC_LAB_BACKEND`, else next to the running executable or one
/// directory up (integration tests run from `target/<profile>/deps`).
pub fn backend_binary() -> Result<PathBuf> {
    find_binary(
        "lab-backend",
        "LBC_LAB_BACKEND",
        "cargo build -p tests --bins",
    )
}

/// A binary of this workspace: `$env_var`, else next to the running executable or one directory
/// up (integration tests run from `target/<profile>/deps`).
pub fn find_binary(name: &str, env_var: &str, build_hint: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        return Ok(path.into());
    }
    let exe = std::env::current_exe()?;
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "{name} not found next to {} (build it: {build_hint}, or set {env_var})",
                exe.display()
            )
        })
}

/// Names of the namespaces that exist and belong to `prefix`.
fn namespaces_with_prefix(prefix: &str) -> Result<Vec<String>> {
    let list = ip("netns list")?;
    let start = format!("{prefix}-");
    Ok(String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| name.starts_with(&start))
        .map(str::to_owned)
        .collect())
}

/// An IPv6 address whose groups are written in decimal digits (valid hex for the lab's ranges).
fn v6(text: &str) -> Ipv6Addr {
    text.parse().expect("lab IPv6 addresses are valid")
}

/// Calls `check` every `poll` until it holds or `timeout` has passed; its value, or its last
/// error, naming `what`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    poll: Duration,
    mut check: impl FnMut() -> Result<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => bail!("{what}: not within {timeout:?}: {e:#}"),
            Err(_) => std::thread::sleep(poll),
        }
    }
}

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // "pid (comm) S ...": the state follows the last ')'.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            != Some("Z")
    })
}

/// The `ip` family flag and the host route (/32 or /128) for `addr`.
fn host_route(addr: IpAddr) -> (&'static str, String) {
    match addr {
        IpAddr::V4(a) => ("-4", format!("{a}/32")),
        IpAddr::V6(a) => ("-6", format!("{a}/128")),
    }
}

fn pids_in(ns: &str) -> Vec<u32> {
    ip(&format!("netns pids {ns}"))
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

impl Lab {
    /// Builds the topology with a fresh [`unique_prefix`] and starts the backends.
    pub fn up(spec: LabSpec) -> Result<Lab> {
        Self::up_with_prefix(spec, &unique_prefix())
    }

    /// Builds the topology under `prefix` (lowercase letters and digits). Everything created so
    /// far is removed again if a step fails.
    pub fn up_with_prefix(spec: LabSpec, prefix: &str) -> Result<Lab> {
        check_prefix(prefix)?;
        ensure!(
            (1..=MAX_NODES).contains(&spec.nodes),
            "nodes must be 1..={MAX_NODES}"
        );
        ensure!(
            (1..=MAX_BACKENDS).contains(&spec.backends),
            "backends must be 1..={MAX_BACKENDS}"
        );
        crate::tools::require(PROGRAMS)?;
        let backend_bin = backend_binary()?;
        ensure!(
            namespaces_with_prefix(prefix)?.is_empty(),
            "namespaces with prefix {prefix}- exist already (lbcluster-lab down --prefix {prefix})"
        );
        let dir = lab_dir(prefix);
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let mut lab = Lab {
            prefix: prefix.to_owned(),
            spec,
            dir,
            processes: Mutex::new(Vec::new()),
            spawned: AtomicU32::new(0),
            backends: Vec::new(),
            down: false,
        };
        // On error `lab` is dropped here, which removes whatever was built.
        lab.build(&backend_bin)?;
        Ok(lab)
    }

    fn roles(&self) -> Vec<String> {
        let mut roles = vec!["client".to_owned(), "router".to_owned()];
        roles.extend((1..=self.spec.nodes).map(|k| format!("n{k}")));
        roles.extend((1..=self.spec.backends).map(|j| format!("b{j}")));
        roles
    }

    fn build(&mut self, backend_bin: &Path) -> Result<()> {
        for role in self.roles() {
            ip(&format!("netns add {}", self.ns(&role)))?;
            self.ip(&role, "link set lo up")?;
            self.sysctl(
                &role,
                "net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 \
                 net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0",
            )?;
        }
        self.sysctl(
            "router",
            "net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 \
             net.ipv6.conf.default.forwarding=1 net.ipv4.fib_multipath_hash_policy=1 \
             net.ipv6.fib_multipath_hash_policy=1",
        )?;

        // client ↔ router; the default route leads to the router, which knows only the lab
        let (c4, c6) = (self.client_addr(), self.client_addr6());
        self.veth(
            "client",
            "eth0",
            "client",
            &[(c4.into(), 24, CLIENT_GW), (c6.into(), 64, CLIENT_GW6)],
        )?;
        self.ip("client", &format!("route add default via {CLIENT_GW}"))?;
        self.ip("client", &format!("-6 route add default via {CLIENT_GW6}"))?;

        // nodes: one-armed, routes to the client and backend subnets only
        for k in 1..=self.spec.nodes {
            let role = format!("n{k}");
            let (gw4, gw6) = (self.node_gateway(k), self.node_gateway6(k));
            let addrs = [
                (self.node_uplink(k).into(), 24, gw4.into()),
                (self.node_uplink6(k).into(), 64, gw6.into()),
            ];
            self.veth(&role, NODE_UPLINK_IF, &role, &addrs)?;
            for net in ["198.18.1.0/24", "198.18.3.0/24"] {
                self.ip(&role, &format!("route add {net} via {gw4}"))?;
            }
            for net in ["2001:db8:1::/64", "2001:db8:3::/64"] {
                self.ip(&role, &format!("-6 route add {net} via {gw6}"))?;
            }
            // The other nodes' uplinks: cluster traffic (Raft, session sync) between nodes.
            for j in (1..=self.spec.nodes).filter(|&j| j != k) {
                let (peer4, peer6) = (self.node_uplink(j), self.node_uplink6(j));
                self.ip(&role, &format!("route add {peer4}/32 via {gw4}"))?;
                self.ip(&role, &format!("-6 route add {peer6}/128 via {gw6}"))?;
            }
            self.exec(&role, &["ethtool", "-K", NODE_UPLINK_IF, "tx", "off"])?;
        }

        // backends: a bridge in the router, one veth per backend
        self.ip("router", "link add backends type bridge forward_delay 0")?;
        self.ip("router", &format!("addr add {BACKEND_GW}/24 dev backends"))?;
        self.ip(
            "router",
            &format!("addr add {BACKEND_GW6}/64 dev backends nodad"),
        )?;
        self.ip("router", "link set backends up")?;
        for j in 1..=self.spec.backends {
            let role = format!("b{j}");
            let ns = self.ns(&role);
            self.ip(
                "router",
                &format!("link add {role} type veth peer name eth0 netns {ns}"),
            )?;
            self.ip("router", &format!("link set {role} master backends up"))?;
            self.ip(
                &role,
                &format!("addr add {}/24 dev eth0", self.backend_addr(j)),
            )?;
            self.ip(
                &role,
                &format!("addr add {}/64 dev eth0 nodad", self.backend_addr6(j)),
            )?;
            self.ip(&role, "link set eth0 up")?;
            self.ip(&role, &format!("route add default via {BACKEND_GW}"))?;
            self.ip(&role, &format!("-6 route add default via {BACKEND_GW6}"))?;
        }
        for j in 1..=self.spec.backends {
            let role = format!("b{j}");
            let bin = backend_bin.to_string_lossy();
            let process = self.spawn_with(&role, &[&bin, "serve", "--name", &role], true)?;
            let stdout = lock(&process.child)
                .stdout
                .take()
                .context("backend stdout")?;
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line)?;
            ensure!(
                line.trim() == "ready",
                "backend {role} did not start: {}",
                process.log()
            );
            self.backends.push(process);
        }
        Ok(())
    }

    /// `ip -n <role's namespace> <args>` (arguments split on whitespace).
    fn ip(&self, role: &str, args: &str) -> Result<Output> {
        ip(&format!("-n {} {args}", self.ns(role)))
    }

    /// A veth pair from `role`'s `inner` interface to the router's `outer` interface, with
    /// (inner address, prefix length, router address) triples, both ends up.
    fn veth(
        &self,
        role: &str,
        inner: &str,
        outer: &str,
        addrs: &[(IpAddr, u8, IpAddr)],
    ) -> Result<()> {
        let ns = self.ns(role);
        self.ip(
            "router",
            &format!("link add {outer} type veth peer name {inner} netns {ns}"),
        )?;
        for (addr, len, router_addr) in addrs {
            self.ip(role, &format!("addr add {addr}/{len} dev {inner} nodad"))?;
            self.ip(
                "router",
                &format!("addr add {router_addr}/{len} dev {outer} nodad"),
            )?;
        }
        self.ip(role, &format!("link set {inner} up"))?;
        self.ip("router", &format!("link set {outer} up"))?;
        Ok(())
    }

    fn sysctl(&self, role: &str, settings: &str) -> Result<()> {
        let mut cmd = vec!["sysctl", "-qw"];
        cmd.extend(settings.split_whitespace());
        self.exec(role, &cmd)?;
        Ok(())
    }

    /// The prefix of every namespace of this lab.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// What was built.
    pub fn spec(&self) -> LabSpec {
        self.spec
    }

    /// The lab's working directory (process logs); removed with the lab.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The full namespace name of a role: `client`, `router`, `n1`…, `b1`….
    pub fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    /// All namespace names of this lab.
    pub fn namespaces(&self) -> Vec<String> {
        self.roles().iter().map(|r| self.ns(r)).collect()
    }

    /// Runs `cmd` in `role`'s namespace (`ip netns exec`) to completion; fails with its stderr.
    pub fn exec(&self, role: &str, cmd: &[&str]) -> Result<Output> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.ns(role)])
            .args(cmd))
    }

    /// Starts `cmd` in `role`'s namespace; stdout and stderr go to a log file in [`Lab::dir`].
    pub fn spawn(&self, role: &str, cmd: &[&str]) -> Result<LabProcess> {
        self.spawn_with(role, cmd, false)
    }

    /// Like [`Lab::spawn`], the child also getting each `(fd, number)` of `fds` as file
    /// descriptor `number` (Chromium's `--remote-debugging-pipe` talks on 3 and 4). The numbers
    /// must be below 10.
    pub fn spawn_with_fds(
        &self,
        role: &str,
        cmd: &[&str],
        fds: &[(&OwnedFd, RawFd)],
    ) -> Result<LabProcess> {
        // Copies at 10 or above first, so that no dup2 below overwrites a source not yet moved.
        let mut moves = Vec::new();
        for (fd, number) in fds {
            ensure!(
                (0..10).contains(number),
                "fd number {number} is not below 10"
            );
            let high = fd
                .try_clone()
                .and_then(|c| {
                    // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own returns a new one we own.
                    let raw = unsafe { libc::fcntl(c.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
                    if raw < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // SAFETY: `raw` was just returned by fcntl and nothing else owns it.
                    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
                })
                .context("duplicate a descriptor for a child")?;
            moves.push((high, *number));
        }
        let targets: Vec<(RawFd, RawFd)> = moves.iter().map(|(h, n)| (h.as_raw_fd(), *n)).collect();
        let mut command = Command::new("ip");
        // SAFETY: only dup2 runs between fork and exec, which is async-signal-safe; it clears
        // close-on-exec on the new descriptor, the copies (all at 10 or above) close at exec.
        unsafe {
            command.pre_exec(move || {
                for &(from, to) in &targets {
                    if libc::dup2(from, to) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let process = self.spawn_command(role, cmd, command, false);
        drop(moves);
        process
    }

    /// Like [`Lab::spawn`]; with `pipe_stdout` the child's stdout is a pipe for the caller.
    fn spawn_with(&self, role: &str, cmd: &[&str], pipe_stdout: bool) -> Result<LabProcess> {
        self.spawn_command(role, cmd, Command::new("ip"), pipe_stdout)
    }

    /// Starts `cmd` in `role`'s namespace through `command` (an `ip` command to add to).
    fn spawn_command(
        &self,
        role: &str,
        cmd: &[&str],
        mut command: Command,
        pipe_stdout: bool,
    ) -> Result<LabProcess> {
        let (program, args) = cmd.split_first().context("empty command")?;
        let n = self.spawned.fetch_add(1, Ordering::Relaxed);
        let name = Path::new(program)
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        let log = self.dir.join(format!("{role}-{n}-{name}.log"));
        let log_file =
            fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let stdout = if pipe_stdout {
            Stdio::piped()
        } else {
            log_file.try_clone()?.into()
        };
        let child = command
            .args(["netns", "exec", &self.ns(role), program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("spawn {cmd:?} in {}", self.ns(role)))?;
        let pid = child.id();
        let child = Arc::new(Mutex::new(child));
        self.processes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::clone(&child));
        Ok(LabProcess { child, pid, log })
    }

    /// Mounts a tmpfs of `size` bytes (rounded up to pages; mode 0700) on `path`, a directory
    /// inside [`Lab::dir`] that is created if missing. The lab unmounts it when it goes, also
    /// when a test fails. Processes see it if they start after this (each `ip netns exec` gets
    /// a copy of the mounts of its time).
    pub fn mount_tmpfs(&self, path: &Path, size: u64) -> Result<()> {
        ensure!(
            path.starts_with(&self.dir) && path != self.dir,
            "{} is not inside the lab's directory {}",
            path.display(),
            self.dir.display()
        );
        fs::create_dir_all(path).with_context(|| format!("create {}", path.display()))?;
        let target = c_path(path)?;
        let options = CString::new(format!("size={size},mode=0700"))?;
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                options.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mount a tmpfs on {}", path.display()));
        }
        Ok(())
    }

    /// The lab's backend processes (`lab-backend serve` in `b1..`).
    pub fn backend_processes(&self) -> &[LabProcess] {
        &self.backends
    }

    /// The client's address, 198.18.1.10.
    pub fn client_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 1, 10)
    }

    /// The client's IPv6 address, 2001:db8:1::10.
    pub fn client_addr6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10)
    }

    fn check_node(&self, k: usize) {
        assert!(
            (1..=self.spec.nodes).contains(&k),
            "node {k} is not in 1..={}",
            self.spec.nodes
        );
    }

    fn check_backend(&self, j: usize) {
        let n = self.spec.backends;
        assert!((1..=n).contains(&j), "backend {j} is not in 1..={n}");
    }

    /// Node k's uplink address, 198.18.(50+k).2 (on [`NODE_UPLINK_IF`]). Panics unless
    /// 1 ≤ k ≤ nodes.
    pub fn node_uplink(&self, k: usize) -> Ipv4Addr {
        self.check_node(k);
        Ipv4Addr::new(198, 18, 50 + k as u8, 2)
    }

    /// Node k's IPv6 uplink address, 2001:db8:(50+k)::2, written like the IPv4 one (node 1:
    /// 2001:db8:51::2).
    pub fn node_uplink6(&self, k: usize) -> Ipv6Addr {
        self.check_node(k);
        v6(&format!("2001:db8:{}::2", 50 + k))
    }

    /// The router's address on node k's link, 198.18.(50+k).1 (node k's gateway, BGP peer).
    pub fn node_gateway(&self, k: usize) -> Ipv4Addr {
        self.check_node(k);
        Ipv4Addr::new(198, 18, 50 + k as u8, 1)
    }

    /// The router's IPv6 address on node k's link, 2001:db8:(50+k)::1.
    pub fn node_gateway6(&self, k: usize) -> Ipv6Addr {
        self.check_node(k);
        v6(&format!("2001:db8:{}::1", 50 + k))
    }

    /// Backend j's address, 198.18.3.(9+j) (b1 = 198.18.3.10). Panics unless
    /// 1 ≤ j ≤ backends.
    pub fn backend_addr(&self, j: usize) -> Ipv4Addr {
        self.check_backend(j);
        Ipv4Addr::new(198, 18, 3, 9 + j as u8)
    }

    /// Backend j's IPv6 address, 2001:db8:3::(9+j), written like the IPv4 one (b1 =
    /// 2001:db8:3::10).
    pub fn backend_addr6(&self, j: usize) -> Ipv6Addr {
        self.check_backend(j);
        v6(&format!("2001:db8:3::{}", 9 + j))
    }

    /// Routes `addr` (/32 or /128) in the router to node k, replacing any route to it.
    pub fn route_to_node(&self, addr: IpAddr, node: usize) -> Result<()> {
        self.route_to_nodes(addr, &[node])
    }

    /// Routes `addr` in the router to all of `nodes` (an ECMP route when more than one, hashed
    /// on layer 4), replacing any route to it.
    pub fn route_to_nodes(&self, addr: IpAddr, nodes: &[usize]) -> Result<()> {
        ensure!(!nodes.is_empty(), "route {addr} to no node");
        ensure!(
            nodes.iter().all(|k| (1..=self.spec.nodes).contains(k)),
            "nodes {nodes:?} not all in 1..={}",
            self.spec.nodes
        );
        let (family, dst) = host_route(addr);
        let via: Vec<String> = nodes
            .iter()
            .map(|&k| match addr {
                IpAddr::V4(_) => format!("nexthop via {}", self.node_uplink(k)),
                IpAddr::V6(_) => format!("nexthop via {}", self.node_uplink6(k)),
            })
            .collect();
        let via = via.join(" ");
        // A single "nexthop via X" is a plain route via X.
        self.ip("router", &format!("{family} route replace {dst} {via}"))?;
        Ok(())
    }

    /// Removes the router's route to `addr` (installed by [`Lab::route_to_node`]).
    pub fn unroute(&self, addr: IpAddr) -> Result<()> {
        let (family, dst) = host_route(addr);
        self.ip("router", &format!("{family} route del {dst}"))?;
        Ok(())
    }

    /// Makes the router forward packets of at most `mtu4` (IPv4) and `mtu6` (IPv6, at least
    /// 1280) bytes towards the backends: larger ones with DF (all IPv6 ones) it answers with
    /// ICMP fragmentation needed / packet too big, as a router before a smaller-MTU link would.
    pub fn limit_backend_path_mtu(&self, mtu4: u32, mtu6: u32) -> Result<()> {
        for j in 1..=self.spec.backends {
            let (a4, a6) = (self.backend_addr(j), self.backend_addr6(j));
            self.limit_path_mtu("backends", a4.into(), mtu4)?;
            self.limit_path_mtu("backends", a6.into(), mtu6)?;
        }
        Ok(())
    }

    /// Like [`Lab::limit_backend_path_mtu`], towards the client.
    pub fn limit_client_path_mtu(&self, mtu4: u32, mtu6: u32) -> Result<()> {
        self.limit_path_mtu("client", self.client_addr().into(), mtu4)?;
        self.limit_path_mtu("client", self.client_addr6().into(), mtu6)
    }

    /// A host route in the router to `addr` on `dev` with a locked MTU. A route MTU, not a device
    /// MTU: a veth drops frames larger than its own MTU on receipt, so a lower MTU on the
    /// router's end would black-hole the far end's full-size frames instead of testing PMTU
    /// discovery; and the hosts must not learn the limit from their own link (their MSS would
    /// avoid it). Forwarding honours a locked route MTU for IPv4 and IPv6 alike.
    fn limit_path_mtu(&self, dev: &str, addr: IpAddr, mtu: u32) -> Result<()> {
        ensure!(
            mtu >= 576 && (addr.is_ipv4() || mtu >= 1280),
            "MTU {mtu} is too small for {addr}"
        );
        let (family, dst) = host_route(addr);
        self.ip(
            "router",
            &format!("{family} route replace {dst} dev {dev} mtu lock {mtu}"),
        )?;
        Ok(())
    }

    /// The router's IPv4 or IPv6 routing table (`ip route show`).
    pub fn router_routes(&self, v6: bool) -> Result<String> {
        let out = self.ip("router", if v6 { "-6 route show" } else { "-4 route show" })?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn client_tool(&self, role: &str, args: &[&str]) -> Result<Vec<u8>> {
        let bin = backend_binary()?;
        let bin = bin.to_string_lossy();
        let mut cmd = vec![&*bin, "--timeout-ms", CLIENT_TIMEOUT_MS];
        cmd.extend_from_slice(args);
        Ok(self.exec(role, &cmd)?.stdout)
    }

    /// `GET path` from `addr`, run inside `role`'s namespace; the body of a 200 answer.
    pub fn http_get(&self, role: &str, addr: SocketAddr, path: &str) -> Result<String> {
        String::from_utf8(self.http_get_bytes(role, addr, path)?).context("HTTP body is not UTF-8")
    }

    /// Like `http_get`, for bodies that are not text (`/bytes/N`).
    pub fn http_get_bytes(&self, role: &str, addr: SocketAddr, path: &str) -> Result<Vec<u8>> {
        self.client_tool(role, &["http-get", &addr.to_string(), path])
    }

    /// Sends `message` to a TCP echo server from `role`'s namespace; what came back.
    pub fn tcp_echo(&self, role: &str, addr: SocketAddr, message: &str) -> Result<String> {
        let echo = self.client_tool(role, &["tcp-echo", &addr.to_string(), message])?;
        String::from_utf8(echo).context("echo is not UTF-8")
    }

    /// Sends `bytes` bytes of [`crate::backend::pattern`] through a TCP echo server from `role`'s
    /// namespace; fails unless exactly they came back.
    pub fn tcp_echo_check(&self, role: &str, addr: SocketAddr, bytes: usize) -> Result<()> {
        self.client_tool(
            role,
            &["tcp-echo-check", &addr.to_string(), &bytes.to_string()],
        )?;
        Ok(())
    }

    /// [`Lab::tcp_echo_check`], then the connection is aborted with a RST.
    pub fn tcp_echo_reset(&self, role: &str, addr: SocketAddr, bytes: usize) -> Result<()> {
        self.client_tool(
            role,
            &["tcp-echo-reset", &addr.to_string(), &bytes.to_string()],
        )?;
        Ok(())
    }

    /// Sends `message` to a UDP echo server from `role`'s namespace; what came back.
    pub fn udp_echo(&self, role: &str, addr: SocketAddr, message: &str) -> Result<String> {
        let echo = self.client_tool(role, &["udp-echo", &addr.to_string(), message])?;
        String::from_utf8(echo).context("echo is not UTF-8")
    }

    /// A summary of what the lab created (namespaces, addresses, backend pids).
    pub fn describe(&self) -> String {
        let mut s = format!(
            "lab {} ({} nodes, {} backends)\n",
            self.prefix, self.spec.nodes, self.spec.backends
        );
        s += &format!(
            "  {:<24} {} {}\n",
            self.ns("client"),
            self.client_addr(),
            self.client_addr6()
        );
        s += &format!(
            "  {:<24} forwarding, bridge `backends` 198.18.3.1 2001:db8:3::1\n",
            self.ns("router")
        );
        for k in 1..=self.spec.nodes {
            s += &format!(
                "  {:<24} {NODE_UPLINK_IF} {} {} via {}\n",
                self.ns(&format!("n{k}")),
                self.node_uplink(k),
                self.node_uplink6(k),
                self.node_gateway(k)
            );
        }
        for (j, p) in (1..=self.spec.backends).zip(&self.backends) {
            s += &format!(
                "  {:<24} {} {} lab-backend pid {}\n",
                self.ns(&format!("b{j}")),
                self.backend_addr(j),
                self.backend_addr6(j),
                p.pid()
            );
        }
        s += &format!("  logs in {}\n", self.dir.display());
        s
    }

    /// Leaves the lab running after this value is gone (for `lbcluster-lab up`): nothing is
    /// killed or removed on drop; remove it later with [`Lab::cleanup_stale`].
    pub fn detach(mut self) {
        self.down = true;
        for process in self.backends.drain(..) {
            // Forget the child handles: the processes keep running, reparented on exit.
            std::mem::forget(process);
        }
        self.processes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Kills every process the lab started (by pid), then removes its namespaces (which removes
    /// their devices) and its directory. Idempotent.
    pub fn down(&mut self) -> Result<()> {
        if self.down {
            return Ok(());
        }
        self.down = true;
        for child in self
            .processes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            kill_child(&child);
        }
        self.backends.clear();
        Self::cleanup_stale(&self.prefix).map(drop)
    }

    /// Removes everything left under `prefix` by an interrupted run: kills the processes still
    /// in its namespaces (by pid, from `ip netns pids`), deletes the namespaces and the lab
    /// directory. Returns the namespaces removed.
    pub fn cleanup_stale(prefix: &str) -> Result<Vec<String>> {
        check_prefix(prefix)?;
        let namespaces = namespaces_with_prefix(prefix)?;
        let mut errors = Vec::new();
        for ns in &namespaces {
            let pids = pids_in(ns);
            for pid in &pids {
                if let Err(e) = run(Command::new("kill").args(["-KILL", &pid.to_string()])) {
                    errors.push(e.to_string());
                }
            }
            // Wait (briefly) until they are gone, so nothing outlives the lab.
            let deadline = Instant::now() + Duration::from_secs(2);
            while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if let Err(e) = ip(&format!("netns del {ns}")) {
                errors.push(e.to_string());
            }
        }
        let dir = lab_dir(prefix);
        // Unmounted after the processes are gone, which might still use them; before the
        // directory goes, which cannot be removed with a mount in it.
        if let Err(e) = unmount_all_under(&dir) {
            errors.push(format!("{e:#}"));
        }
        if dir.exists()
            && let Err(e) = fs::remove_dir_all(&dir)
        {
            errors.push(format!("remove {}: {e}", dir.display()));
        }
        ensure!(
            errors.is_empty(),
            "lab {prefix} cleanup: {}",
            errors.join("; ")
        );
        Ok(namespaces)
    }

    /// What exists under `prefix`: each namespace with its addresses and process ids.
    pub fn status(prefix: &str) -> Result<String> {
        check_prefix(prefix)?;
        let mut s = String::new();
        for ns in namespaces_with_prefix(prefix)? {
            let pids: Vec<String> = pids_in(&ns).iter().map(u32::to_string).collect();
            s += &format!("{ns}  pids: [{}]\n", pids.join(" "));
            let addrs = ip(&format!("-n {ns} -br addr show"))?;
            for line in String::from_utf8_lossy(&addrs.stdout).lines() {
                s += &format!("    {line}\n");
            }
        }
        Ok(s)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.down() {
            eprintln!("lab {}: {e:#}", self.prefix);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::unescape_mount_point;

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(unescape_mount_point("/tmp/lab/n3-raft"), "/tmp/lab/n3-raft");
        assert_eq!(unescape_mount_point("/tmp/a\\040b\\011c"), "/tmp/a b\tc");
        assert_eq!(unescape_mount_point("/tmp/a\\134b"), "/tmp/a\\b");
        // Not an escape: left as it is.
        assert_eq!(unescape_mount_point("/tmp/a\\9b\\"), "/tmp/a\\9b\\");
    }
}

//! The kernel state the TUN data plane needs: the device up, a host route into it for every VIP
//! and LIP, forwarding on and reverse-path filtering off. The routes follow the config
//! ([`KernelState::set_routes`]). Everything changed is recorded and put back on stop
//! ([`KernelState::remove_routes`], [`KernelState::restore_sysctls`]; also, best effort, on
//! drop).
//!
//! All of it happens in the network namespace the data plane was started in, whichever thread
//! later stops it: the namespace is kept as an fd and every change runs in a short-lived thread
//! that entered it (`setns` switches only the calling thread).

use std::fs;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail};

/// A network namespace, held open by an fd.
#[derive(Debug)]
pub(crate) struct Netns {
    fd: OwnedFd,
}

impl Netns {
    /// The namespace of the calling thread.
    pub(crate) fn current() -> Result<Netns> {
        Netns::open(Path::new("/proc/thread-self/ns/net"))
    }

    /// A namespace by path, e.g. `/var/run/netns/NAME` or `/proc/thread-self/ns/net`.
    pub(crate) fn open(path: &Path) -> Result<Netns> {
        let f = fs::File::open(path)
            .with_context(|| format!("opening network namespace {}", path.display()))?;
        Ok(Netns { fd: f.into() })
    }

    /// Moves the calling thread (only it) into this namespace.
    pub(crate) fn enter(&self) -> io::Result<()> {
        // SAFETY: setns on an fd we own; it changes only the calling thread's namespace and
        // touches no memory of ours.
        let r = unsafe { libc::setns(self.fd.as_raw_fd(), libc::CLONE_NEWNET) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Runs `f` on a thread inside this namespace and returns its result.
    pub(crate) fn run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter()
                    .context("entering the data plane's network namespace")?;
                f()
            })
            .join()
            .map_err(|_| anyhow!("kernel-state thread panicked"))?
        })
    }
}

/// Runs `ip ARGS`, failing with its stderr.
pub(crate) fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn host_route(addr: IpAddr) -> (&'static str, String) {
    match addr {
        IpAddr::V4(a) => ("-4", format!("{a}/32")),
        IpAddr::V6(a) => ("-6", format!("{a}/128")),
    }
}

/// Whether the host route to `addr` through `dev` is in the main table.
fn route_exists(addr: IpAddr, dev: &str) -> Result<bool> {
    let (family, prefix) = host_route(addr);
    let out = Command::new("ip")
        .args([family, "route", "show", "exact", &prefix, "dev", dev])
        .output()
        .context("running `ip` (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "`ip {family} route show exact {prefix} dev {dev}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(!out.stdout.is_empty())
}

/// Routes `addr` into `dev`. A route that is there already through `dev` is fine; one through
/// another device is an error, as at start: it belongs to someone else.
fn add_route(addr: IpAddr, dev: &str) -> Result<()> {
    let (family, prefix) = host_route(addr);
    ip(&[family, "route", "add", &prefix, "dev", dev])
        .or_else(|e| match route_exists(addr, dev) {
            Ok(true) => Ok(()),
            _ => Err(e),
        })
        .with_context(|| format!("routing {prefix} into {dev}"))
}

/// Deletes the route to `addr` through `dev`; one that is gone already is fine.
fn delete_route(addr: IpAddr, dev: &str) -> Result<()> {
    let (family, prefix) = host_route(addr);
    ip(&[family, "route", "del", &prefix, "dev", dev])
        .or_else(|e| match route_exists(addr, dev) {
            Ok(false) => Ok(()),
            _ => Err(e),
        })
        .with_context(|| format!("removing the route of {prefix} from {dev}"))
}

/// One error out of several, each with its context.
fn joined(mut errors: Vec<anyhow::Error>) -> Result<()> {
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        _ => {
            let all: Vec<String> = errors.iter().map(|e| format!("{e:#}")).collect();
            Err(anyhow!("{}", all.join("; ")))
        }
    }
}

fn sysctl_path(name: &str) -> String {
    format!("/proc/sys/{}", name.replace('.', "/"))
}

pub(crate) fn read_sysctl(name: &str) -> Result<String> {
    let v = fs::read_to_string(sysctl_path(name)).with_context(|| format!("reading {name}"))?;
    Ok(v.trim().to_owned())
}

fn write_sysctl(name: &str, value: &str) -> Result<()> {
    fs::write(sysctl_path(name), value).with_context(|| format!("setting {name}={value}"))
}

/// What the data plane changed in the kernel.
#[derive(Debug)]
pub(crate) struct KernelState {
    netns: Netns,
    dev: String,
    /// Routes into `dev` this state owns, to delete on stop.
    routes: Vec<IpAddr>,
    /// Sysctls changed, with their previous values, to put back on restore.
    sysctls: Vec<(String, String)>,
}

impl KernelState {
    /// Brings `dev` up, routes `routes` into it and sets the sysctls, in the calling thread's
    /// namespace. On error, whatever was done already is undone.
    pub(crate) fn apply(dev: &str, routes: &[IpAddr]) -> Result<KernelState> {
        let mut st = KernelState {
            netns: Netns::current()?,
            dev: dev.to_owned(),
            routes: Vec::new(),
            sysctls: Vec::new(),
        };
        for (name, value) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
        ] {
            let old = read_sysctl(name)?;
            write_sysctl(name, value)?;
            st.sysctls.push((name.to_owned(), old));
        }
        // The effective rp_filter is the larger of `all` and the device's; the device's own
        // setting vanishes with the device, so it is not restored.
        write_sysctl(&format!("net.ipv4.conf.{dev}.rp_filter"), "0")?;
        ip(&["link", "set", "dev", dev, "up"])?;
        let mut sorted = routes.to_vec();
        sorted.sort();
        sorted.dedup();
        for addr in sorted {
            add_route(addr, dev)?;
            st.routes.push(addr);
        }
        Ok(st)
    }

    /// Makes the routes into the device exactly `routes` (in any order, duplicates ignored):
    /// adds the missing ones, deletes the ones no longer wanted, in the namespace the data plane
    /// was started in. Every route is tried; the error names each address that failed, and the
    /// routes owned stay recorded as they really are, so a stop removes all of them.
    pub(crate) fn set_routes(&mut self, routes: &[IpAddr]) -> Result<()> {
        let mut wanted = routes.to_vec();
        wanted.sort();
        wanted.dedup();
        let (dev, owned) = (self.dev.as_str(), &mut self.routes);
        self.netns.run(move || {
            let mut errors = Vec::new();
            for &addr in &wanted {
                if owned.contains(&addr) {
                    continue;
                }
                match add_route(addr, dev) {
                    Ok(()) => owned.push(addr),
                    Err(e) => errors.push(e),
                }
            }
            let mut kept = Vec::with_capacity(owned.len());
            for addr in owned.drain(..) {
                if wanted.binary_search(&addr).is_ok() {
                    kept.push(addr);
                } else if let Err(e) = delete_route(addr, dev) {
                    errors.push(e);
                    kept.push(addr);
                }
            }
            *owned = kept;
            joined(errors)
        })
    }

    /// Deletes the routes added (the device's own removal would take them too, but a stop
    /// removes them first so traffic stops before the workers do).
    pub(crate) fn remove_routes(&mut self) -> Result<()> {
        let routes = std::mem::take(&mut self.routes);
        let dev = self.dev.clone();
        self.netns.run(move || {
            let mut first_err = None;
            for addr in routes {
                if let Err(e) = delete_route(addr, &dev) {
                    first_err.get_or_insert(e);
                }
            }
            first_err.map_or(Ok(()), Err)
        })
    }

    /// Puts the recorded sysctls back.
    pub(crate) fn restore_sysctls(&mut self) -> Result<()> {
        let sysctls = std::mem::take(&mut self.sysctls);
        self.netns.run(move || {
            let mut first_err = None;
            // In reverse, so a setting changed twice ends at its first value.
            for (name, old) in sysctls.iter().rev() {
                if let Err(e) = write_sysctl(name, old) {
                    first_err.get_or_insert(e);
                }
            }
            first_err.map_or(Ok(()), Err)
        })
    }
}

impl Drop for KernelState {
    fn drop(&mut self) {
        if !self.routes.is_empty()
            && let Err(e) = self.remove_routes()
        {
            eprintln!("lbcluster: removing the data plane's routes: {e:#}");
        }
        if !self.sysctls.is_empty()
            && let Err(e) = self.restore_sysctls()
        {
            eprintln!("lbcluster: restoring sysctls: {e:#}");
        }
    }
}

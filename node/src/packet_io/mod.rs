//! Packet I/O: feeds the Full-NAT engine from the kernel and back (DESIGN §1 "Data plane
//! layers").
//!
//! The kernel routes every VIP and LIP into a multi-queue TUN device (`kernel`), one worker
//! thread per queue reads a packet, lets its engine [`Worker`](dataplane::Worker) rewrite it in
//! place and writes it back, and the kernel forwards it on (`worker`). The TUN backend (`tun`)
//! runs with virtio-net headers and TSO/checksum offloads, so it moves 64 KB GSO segments and
//! passes the checksum state of each packet to the engine (`vnet`). Backends implement
//! [`PacketIo`], so a faster one (AF_XDP) slots in without touching the engine.

mod fastpath;
mod kernel;
mod tun;
mod vnet;
mod worker;

#[cfg(test)]
mod tests;

use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use dataplane::L4Checksum;

use fastpath::FastPath;
pub(crate) use fastpath::LiveTraffic;
use kernel::KernelState;
use worker::WorkerCounters;

use crate::config::FastPathMode;

/// What a backend knows about a packet it received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Received {
    /// Length of the packet (from the IP header on), after the backend's headroom.
    pub(crate) len: usize,
    pub(crate) csum: L4Checksum,
    /// A GSO super-packet (several MSS-sized segments the kernel splits on the way out).
    pub(crate) gso: bool,
}

/// One queue of a packet I/O backend, owned by one worker thread.
///
/// A buffer holds the backend's per-packet metadata in its first [`headroom`](Self::headroom)
/// bytes, then the IP packet, then spare room the engine may grow the packet into.
pub(crate) trait PacketIo: Send {
    /// Bytes in front of the packet in the buffers `recv` fills and `send` takes.
    fn headroom(&self) -> usize;

    /// Reads one packet into `buf`; `None` when none is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<Received>>;

    /// Sends the packet in `buf` as the engine left it, `len` bytes after the headroom, with
    /// the metadata `recv` put in front of it.
    fn send(&mut self, buf: &mut [u8], received: &Received, len: usize) -> io::Result<()>;

    /// Waits up to `timeout` for a packet; true when one may be waiting.
    fn wait_readable(&mut self, timeout: Duration) -> io::Result<bool>;
}

/// What the daemon asks the data plane to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DataplaneSpec {
    /// Name of the TUN device (BIRD announces routes `via` it).
    pub(crate) tun_name: String,
    /// Queues, one worker thread each; 0 means one per core.
    pub(crate) queues: usize,
    /// VIPs and LIPs: each gets a host route (/32, /128) into the device.
    pub(crate) routes: Vec<IpAddr>,
    pub(crate) fastpath: FastPathMode,
    /// `None`: every device that is up, but the loopback and the TUN device.
    pub(crate) fastpath_devices: Option<Vec<String>>,
    /// Sessions the fast path holds at most (its map has two entries a session).
    pub(crate) fastpath_sessions: u32,
}

/// Which path established flows take, and why, as `status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct FastPathStatus {
    pub(crate) mode: FastPathMode,
    /// The kernel fast path forwards established flows.
    pub(crate) running: bool,
    /// Why it does not run (`mode` off, or what the kernel refused).
    pub(crate) reason: Option<String>,
    pub(crate) devices: Vec<String>,
    pub(crate) sessions: fastpath::SessionCounters,
    pub(crate) program: fastpath::ProgramCounters,
}

/// Where packet workers send their session events: session sync's inbox.
pub(crate) type EventSink = tokio::sync::mpsc::Sender<dataplane::SessionEvent>;

/// Counters of one packet worker, as `lbcluster status` shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct WorkerIoStats {
    pub(crate) packets_read: u64,
    /// IP bytes read (without the backend's header).
    pub(crate) bytes_read: u64,
    /// Packets read that were GSO super-packets.
    pub(crate) gso_packets: u64,
    pub(crate) packets_written: u64,
    pub(crate) read_errors: u64,
    pub(crate) write_errors: u64,
    /// Session events drained from the engine.
    pub(crate) events_drained: u64,
    /// Of those, events session sync had no room for (or none, on a standalone node: 0).
    #[serde(default)]
    pub(crate) events_dropped: u64,
    /// Liveness: advances at least every 10 ms while the worker loop runs; a watchdog that sees
    /// it stand still knows the worker is stuck.
    pub(crate) progress: u64,
}

/// Counters of every worker, in queue order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct IoStats {
    pub(crate) workers: Vec<WorkerIoStats>,
}

/// The running data plane. [`stop`](Self::stop) takes it down; dropping it does the same, best
/// effort.
#[derive(Debug)]
pub(crate) struct DataplaneHandle {
    running: Running,
}

#[derive(Debug)]
struct Running {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    counters: Vec<Arc<WorkerCounters>>,
    kernel: Option<KernelState>,
    fastpath: Option<Arc<FastPath>>,
    fastpath_status: FastPathStatus,
}

impl Running {
    /// Detaches the fast path, removes the routes, stops and joins the workers (closing the
    /// last queue removes the device) and restores the sysctls. Idempotent; tries every step
    /// whatever fails.
    fn shutdown(&mut self) -> Result<()> {
        if let Some(f) = &self.fastpath {
            f.detach();
        }
        let mut errors = Vec::new();
        if let Some(k) = &mut self.kernel
            && let Err(e) = k.remove_routes()
        {
            errors.push(e);
        }
        self.stop.store(true, Ordering::Relaxed);
        for (i, t) in self.threads.drain(..).enumerate() {
            if t.join().is_err() {
                errors.push(anyhow!("packet worker {i} panicked"));
            }
        }
        if let Some(mut k) = self.kernel.take()
            && let Err(e) = k.restore_sysctls()
        {
            errors.push(e);
        }
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => {
                let all: Vec<String> = errors.iter().map(|e| format!("{e:#}")).collect();
                Err(anyhow!("stopping the data plane: {}", all.join("; ")))
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            eprintln!("lbcluster: stopping the data plane: {e:#}");
        }
    }
}

/// Creates the TUN device, starts one worker per queue and routes the VIPs and LIPs into the
/// device, in the calling thread's network namespace. On error nothing is left behind.
pub(crate) fn start(
    spec: &DataplaneSpec,
    engine: Arc<dataplane::Engine>,
    events: Option<EventSink>,
) -> Result<DataplaneHandle> {
    let queues = match spec.queues {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let tun_queues = tun::create(&spec.tun_name, queues)?;
    let mut running = Running {
        stop: Arc::new(AtomicBool::new(false)),
        threads: Vec::with_capacity(queues),
        counters: Vec::with_capacity(queues),
        kernel: None,
        fastpath: None,
        fastpath_status: FastPathStatus::default(),
    };
    for (i, q) in tun_queues.into_iter().enumerate() {
        let counters = Arc::new(WorkerCounters::default());
        let (stop, c, w) = (running.stop.clone(), counters.clone(), engine.worker());
        let events = events.clone();
        let t = std::thread::Builder::new()
            .name(format!("lbc-io-{i}"))
            .spawn(move || worker::run(q, w, tun::BUF_LEN, &stop, &c, events.as_ref()))
            .context("spawning a packet worker")?;
        running.threads.push(t);
        running.counters.push(counters);
    }
    running.kernel = Some(
        KernelState::apply(&spec.tun_name, &spec.routes)
            .with_context(|| format!("setting up routes and sysctls for {}", spec.tun_name))?,
    );
    let (fastpath, status) = start_fastpath(spec)?;
    if let Some(f) = &fastpath {
        // Set once per engine: the node starts its data plane once.
        engine.set_offload(f.clone());
    }
    running.fastpath = fastpath;
    running.fastpath_status = status;
    Ok(DataplaneHandle { running })
}

/// Starts the fast path as `spec.fastpath` says: `auto` runs without it (saying why) where
/// the kernel refuses it, `on` fails.
fn start_fastpath(spec: &DataplaneSpec) -> Result<(Option<Arc<FastPath>>, FastPathStatus)> {
    let mut status = FastPathStatus {
        mode: spec.fastpath,
        ..FastPathStatus::default()
    };
    if spec.fastpath == FastPathMode::Off {
        status.reason = Some("fastpath = \"off\" in the node's file".to_owned());
        return Ok((None, status));
    }
    let started = match &spec.fastpath_devices {
        Some(devices) => Ok(devices.clone()),
        None => fastpath::uplinks(&spec.tun_name),
    }
    .and_then(|devices| FastPath::start(&devices, spec.fastpath_sessions.saturating_mul(2)));
    match started {
        Ok(f) => {
            tracing::info!(devices = ?f.devices(), "kernel fast path on");
            status.running = true;
            status.devices = f.devices().to_vec();
            Ok((Some(Arc::new(f)), status))
        }
        Err(e) if spec.fastpath == FastPathMode::Auto => {
            tracing::warn!("kernel fast path off, every packet takes the TUN path: {e:#}");
            status.reason = Some(format!("{e:#}"));
            Ok((None, status))
        }
        Err(e) => Err(e.context("fastpath = \"on\"")),
    }
}

impl DataplaneHandle {
    /// Stops the data plane: routes removed, workers joined, the device gone (it is not
    /// persistent), sysctls as they were before [`start`].
    pub(crate) fn stop(mut self) -> Result<()> {
        self.running.shutdown()
    }

    /// Makes the host routes into the device exactly `routes` (the VIPs and LIPs of the config
    /// now): adds the missing ones, deletes the others, in the namespace the data plane was
    /// started in. On error the routes that could be changed are, the error names the others,
    /// and a stop still removes every route the data plane added.
    pub(crate) fn set_routes(&mut self, routes: &[IpAddr]) -> Result<()> {
        let kernel = self
            .running
            .kernel
            .as_mut()
            .ok_or_else(|| anyhow!("the data plane is stopped"))?;
        kernel
            .set_routes(routes)
            .context("updating the routes into the TUN device")
    }

    /// The fast path's state and counters.
    pub(crate) fn fastpath_status(&self) -> FastPathStatus {
        let mut status = self.running.fastpath_status.clone();
        if let Some(f) = &self.running.fastpath {
            status.sessions = f.sessions();
            status.program = f.counters();
        }
        status
    }

    /// What the fast path carries now, not yet in the engine's counters.
    pub(crate) fn fastpath_traffic(&self) -> LiveTraffic {
        self.running
            .fastpath
            .as_ref()
            .map(|f| f.live_traffic())
            .unwrap_or_default()
    }

    /// Per-worker counters.
    pub(crate) fn stats(&self) -> IoStats {
        IoStats {
            workers: self.running.counters.iter().map(|c| c.snapshot()).collect(),
        }
    }
}

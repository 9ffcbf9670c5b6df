//! One packet worker: an OS thread that owns one queue of a [`PacketIo`] backend and one engine
//! [`Worker`](dataplane::Worker), reads, processes and writes packets, and every
//! [`HOUSEKEEPING`] expires sessions; its session events go to session sync after every batch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use dataplane::{Packet, Verdict};

use super::{EventSink, PacketIo, WorkerIoStats};
use crate::clock::now;

/// How often a worker expires sessions and drains events; also the longest it sleeps in poll,
/// so a stop request is noticed within this time.
pub(super) const HOUSEKEEPING: Duration = Duration::from_millis(10);
/// Packets read and processed back to back before the worker looks at the clock again.
const BATCH: usize = 64;
/// Session slots examined per family and housekeeping round.
const EXPIRE_BUDGET: usize = 1024;
/// Pause after a read error so a persistently failing fd does not spin a core.
const ERROR_BACKOFF: Duration = Duration::from_millis(1);

/// A worker's counters, written by the worker only and read by anyone.
#[derive(Debug, Default)]
pub(super) struct WorkerCounters {
    packets_read: AtomicU64,
    bytes_read: AtomicU64,
    gso_packets: AtomicU64,
    packets_written: AtomicU64,
    read_errors: AtomicU64,
    write_errors: AtomicU64,
    events_drained: AtomicU64,
    events_dropped: AtomicU64,
    progress: AtomicU64,
}

impl WorkerCounters {
    pub(super) fn snapshot(&self) -> WorkerIoStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        WorkerIoStats {
            packets_read: get(&self.packets_read),
            bytes_read: get(&self.bytes_read),
            gso_packets: get(&self.gso_packets),
            packets_written: get(&self.packets_written),
            read_errors: get(&self.read_errors),
            write_errors: get(&self.write_errors),
            events_drained: get(&self.events_drained),
            events_dropped: get(&self.events_dropped),
            progress: get(&self.progress),
        }
    }
}

/// Only this worker writes its counters, so a load and a store (no locked RMW) suffice.
fn bump(c: &AtomicU64, by: u64) {
    c.store(
        c.load(Ordering::Relaxed).wrapping_add(by),
        Ordering::Relaxed,
    );
}

/// Hands the worker's session events to session sync (if it runs); a full channel drops them,
/// counted (the owner's next refresh repairs what a peer missed, removals included: its end
/// drops the copies of flows the owner no longer has).
fn forward_events(worker: &mut dataplane::Worker, sink: Option<&EventSink>, c: &WorkerCounters) {
    let (mut drained, mut dropped) = (0, 0);
    for event in worker.drain_events() {
        drained += 1;
        if let Some(sink) = sink
            && sink.try_send(event).is_err()
        {
            dropped += 1;
        }
    }
    if drained > 0 {
        bump(&c.events_drained, drained);
        bump(&c.events_dropped, dropped);
    }
}

/// The worker loop; returns when `stop` is set.
pub(super) fn run<P: PacketIo>(
    mut io: P,
    mut worker: dataplane::Worker,
    buf_len: usize,
    stop: &AtomicBool,
    counters: &Arc<WorkerCounters>,
    events: Option<&EventSink>,
) {
    let c = &**counters;
    let mut buf = vec![0u8; buf_len];
    let headroom = io.headroom();
    let mut next_housekeeping = now();
    while !stop.load(Ordering::Relaxed) {
        let t = now();
        if t >= next_housekeeping {
            worker.expire(t, EXPIRE_BUDGET);
            forward_events(&mut worker, events, c);
            next_housekeeping = t.saturating_add(HOUSEKEEPING);
        }
        // Liveness: advances at least once per HOUSEKEEPING while the loop runs.
        bump(&c.progress, 1);
        match io.wait_readable(next_housekeeping.saturating_duration_since(t)) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(_) => {
                bump(&c.read_errors, 1);
                std::thread::sleep(ERROR_BACKOFF);
                continue;
            }
        }
        let t = now();
        for _ in 0..BATCH {
            let rx = match io.recv(&mut buf) {
                Ok(Some(rx)) => rx,
                Ok(None) => break,
                Err(_) => {
                    bump(&c.read_errors, 1);
                    std::thread::sleep(ERROR_BACKOFF);
                    break;
                }
            };
            bump(&c.packets_read, 1);
            bump(&c.bytes_read, rx.len as u64);
            if rx.gso {
                bump(&c.gso_packets, 1);
            }
            let mut pkt = Packet::new(&mut buf[headroom..], rx.len, rx.csum);
            // A dropped packet is counted by the engine under its reason. A reply goes back
            // into the kernel like a forward: it routes the packet to whoever asked.
            if let Verdict::Forward(_) | Verdict::Reply = worker.process(t, &mut pkt) {
                let len = pkt.len();
                match io.send(&mut buf, &rx, len) {
                    Ok(()) => bump(&c.packets_written, 1),
                    Err(_) => bump(&c.write_errors, 1),
                }
            }
        }
        // New flows and state changes reach session sync within one batch.
        forward_events(&mut worker, events, c);
    }
}

//! Session sync in the node (DESIGN §2, §3): the engine's session events go to the
//! `sessionsync` driver, which replicates them to every other member over the node's QUIC
//! endpoint (ALPN `lbc-sync/3`, the same mutual TLS and membership check as Raft); what peers
//! send is installed in the engine as synced sessions, so a packet of a peer's flow, in either
//! direction, is forwarded here at once with the original backend and LIP:port.
//!
//! Connections: of two members, the one whose name sorts first dials, the other accepts, so a
//! pair has one connection. A dial gives up after [`DIAL_TIMEOUT`] (one started while the peer
//! is down would otherwise sit in QUIC handshake resends); a lost connection or a failed dial is
//! dialled again at the next [`REDIAL`] tick, which is the backoff. A table request the peer
//! drops (it did not know this node yet) is asked again by `sessionsync` itself
//! (`Config::bulk_retry`).
//!
//! Who owns a flow is the committed configuration's word: every node's LIPs go to
//! `sessionsync` ([`SyncHandle::set_lips`]), which decides with what authority a peer's record
//! is applied; the engine checks the record and refuses what it must. Refusals are counted by
//! reason.
//!
//! The epoch peers tell this node's runs apart by is a counter in the data directory
//! ([`EPOCH_FILE`]), one higher at every start and written durably before sync starts, so a
//! restart is never taken for stale whatever the clock says. A node without a counter yet
//! starts it at the wall clock in nanoseconds, which keeps it above the clock-based epochs of
//! earlier versions.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use consensus::ClusterConfig;
use dataplane::{Engine, InstallError, SessionEvent};
use parking_lot::Mutex;
use sessionsync::{Apply, SyncHandle};
use tokio::sync::{mpsc, watch};
use tracing::debug;

use crate::api::{SyncPeer, SyncStatus};
use crate::clock;
use crate::packet_io::EventSink;
use crate::quic::{self, PeerConnection};

/// Session events the packet workers may queue for sync before they drop (and count) them.
const INBOX: usize = 1 << 16;
/// How often the connections to peers are checked and lost ones dialled again.
const REDIAL: Duration = Duration::from_millis(500);
/// A node whose peers are not all reachable turns warm this long after its start once every
/// peer it reached has sent its table.
const COLD_GRACE: Duration = Duration::from_secs(5);
/// A dial that takes longer than this has failed: a handshake between members takes
/// milliseconds, and while a dial runs its peer is not dialled again.
const DIAL_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a stopping node waits for its peers to take its last session updates in.
const HANDOVER: Duration = Duration::from_secs(2);

/// The sync epoch's file in the data directory.
pub(crate) const EPOCH_FILE: &str = "sync-epoch";

/// What applying peers' updates to the engine did.
#[derive(Debug, Default)]
struct Applied {
    installed: AtomicU64,
    removed: AtomicU64,
    /// Copies dropped because their owner's complete table no longer had them.
    reconciled: AtomicU64,
    /// Updates the engine refused (a service this node does not have yet, a real server not in
    /// the configuration, a session this node owns, ...), by reason.
    refused: Mutex<BTreeMap<&'static str, u64>>,
}

impl Applied {
    fn refuse(&self, e: InstallError) {
        *self.refused.lock().entry(e.name()).or_default() += 1;
    }
}

/// Session sync of one node.
#[derive(Debug)]
pub(crate) struct NodeSync {
    handle: SyncHandle,
    applied: Arc<Applied>,
    epoch: u64,
    /// Peers a dial is running for.
    dialing: Arc<Mutex<HashSet<String>>>,
    started: Instant,
    /// The committed configuration lists this node, so the peer set is the real one.
    peers_known: AtomicBool,
    /// Latched by [`NodeSync::is_warm`].
    warm: AtomicBool,
}

impl NodeSync {
    /// Starts sync for node `me` over `engine`, its epoch counted in `data_dir`; returns it and
    /// the inbox the packet workers send their session events to.
    pub(crate) fn start(
        me: &str,
        engine: &Arc<Engine>,
        data_dir: &Path,
    ) -> Result<(Arc<NodeSync>, EventSink)> {
        let clock = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let epoch = next_epoch(data_dir, clock)?;
        let (tx, rx) = mpsc::channel::<SessionEvent>(INBOX);
        let applied = Arc::new(Applied::default());
        let source = {
            let engine = engine.clone();
            move || engine.sessions(clock::now())
        };
        let apply = {
            let engine = engine.clone();
            let applied = applied.clone();
            move |a: Apply| match a {
                Apply::Install(rec, authority) => {
                    match engine.install(clock::now(), &rec, authority) {
                        Ok(_) => {
                            applied.installed.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            applied.refuse(e);
                            debug!(client = %rec.client, vip = %rec.vip, "synced session refused: {e}");
                        }
                    }
                }
                Apply::Remove(rec) => match engine.remove(&rec) {
                    Ok(true) => {
                        applied.removed.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        applied.refuse(e);
                        debug!(client = %rec.client, vip = %rec.vip, "synced removal refused: {e}");
                    }
                },
                Apply::Reconcile { lips, mark } => {
                    let n = engine.reconcile(&lips, mark);
                    applied.reconciled.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        };
        let handle =
            SyncHandle::start(me, epoch, sessionsync::Config::default(), rx, source, apply)
                .context("starting session sync")?;
        let sync = Arc::new(NodeSync {
            handle,
            applied,
            epoch,
            dialing: Arc::default(),
            started: Instant::now(),
            peers_known: AtomicBool::new(false),
            warm: AtomicBool::new(false),
        });
        Ok((sync, tx))
    }

    /// Takes a connection a peer dialled.
    pub(crate) fn accept(&self, conn: PeerConnection) {
        self.handle.add_connection(&conn.peer, conn.connection);
    }

    /// Keeps the peer set equal to the other members of the committed configuration and the
    /// connections to them up, until `stop`.
    pub(crate) async fn follow(
        self: Arc<Self>,
        me: String,
        endpoint: Arc<quic::Endpoint>,
        mut configs: watch::Receiver<Arc<ClusterConfig>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(REDIAL);
        loop {
            let config = configs.borrow_and_update().clone();
            let peers: Vec<_> = config.nodes.values().filter(|n| n.name != me).collect();
            let names: Vec<&str> = peers.iter().map(|n| n.name.as_str()).collect();
            let lips: Vec<(String, Vec<IpAddr>)> = config
                .nodes
                .values()
                .map(|n| (n.name.clone(), n.lips.clone()))
                .collect();
            self.handle.set_lips(&lips);
            self.handle.set_peers(&names);
            if config.nodes.values().any(|n| n.name == me) {
                self.peers_known.store(true, Ordering::Relaxed);
            }
            let connected: HashSet<String> = self
                .handle
                .stats()
                .into_iter()
                .filter(|p| p.connected)
                .map(|p| p.peer)
                .collect();
            for peer in peers {
                if me.as_str() > peer.name.as_str()
                    || connected.contains(&peer.name)
                    || !self.dialing.lock().insert(peer.name.clone())
                {
                    continue;
                }
                let (sync, endpoint, name, addr) = (
                    self.clone(),
                    endpoint.clone(),
                    peer.name.clone(),
                    peer.quic_addr,
                );
                tokio::spawn(async move {
                    let dialled = tokio::time::timeout(
                        DIAL_TIMEOUT,
                        endpoint.connect(addr, &name, sessionsync::ALPN),
                    )
                    .await;
                    match dialled {
                        Ok(Ok(conn)) => sync.handle.add_connection(&name, conn.connection),
                        Ok(Err(e)) => debug!(peer = %name, "session sync dial failed: {e:#}"),
                        Err(_) => debug!(peer = %name, "session sync dial timed out"),
                    }
                    sync.dialing.lock().remove(&name);
                });
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                changed = configs.changed() => if changed.is_err() { break },
                _ = tick.tick() => {}
            }
        }
    }

    /// Ends sync for a node that stops, after its data plane has: the sessions it opened or
    /// changed last go to its peers, and it waits (at most [`HANDOVER`]) for them to take them
    /// in, so that a flow it accepted a moment before it stopped is carried on by the others
    /// (a rolling restart stops a node right after ECMP moved its flows away).
    pub(crate) async fn close(&self) {
        self.handle.close(HANDOVER).await;
    }

    /// Warm: the node has the tables of its peers. It turns warm once every peer's table has
    /// arrived, or, after [`COLD_GRACE`], once the table of every peer it could reach has (a
    /// member that is down must not keep the others cold); and it stays warm: a peer that goes
    /// and comes back is asked for its table again, but what the node holds stays valid.
    pub(crate) fn is_warm(&self) -> bool {
        if self.warm.load(Ordering::Relaxed) {
            return true;
        }
        // Until the node finds itself in the configuration it does not know its peers yet (a
        // restart restores the configuration from disk a moment after sync starts).
        if !self.peers_known.load(Ordering::Relaxed) {
            return false;
        }
        let warm = self.handle.is_warm()
            || (self.started.elapsed() >= COLD_GRACE
                && self
                    .handle
                    .stats()
                    .iter()
                    .all(|p| !p.connected || p.bulk_complete));
        if warm {
            self.warm.store(true, Ordering::Relaxed);
        }
        warm
    }

    /// Sync as `lbcluster status` shows it.
    pub(crate) fn status(&self) -> SyncStatus {
        let stats = self.handle.stats();
        // Refused by the engine, and by sync itself for the sender not owning the flow.
        let mut refused_by: BTreeMap<String, u64> = self
            .applied
            .refused
            .lock()
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect();
        for p in &stats {
            for (reason, n) in [
                ("unknown_lip", p.dropped.unknown_lip),
                ("not_owner", p.dropped.not_owner),
            ] {
                if n > 0 {
                    *refused_by.entry(reason.to_owned()).or_default() += n;
                }
            }
        }
        SyncStatus {
            warm: self.is_warm(),
            epoch: self.epoch,
            installed: self.applied.installed.load(Ordering::Relaxed),
            removed: self.applied.removed.load(Ordering::Relaxed),
            reconciled: self.applied.reconciled.load(Ordering::Relaxed),
            refused: refused_by.values().sum(),
            refused_by,
            peers: stats
                .into_iter()
                .map(|p| SyncPeer {
                    dropped: p.dropped.total(),
                    peer: p.peer,
                    connected: p.connected,
                    bulk_complete: p.bulk_complete,
                    sent: p.sent_entries,
                    received: p.received_entries,
                    queue_depth: p.queue_depth as u64,
                    resyncs: p.resyncs,
                    lag_last_us: duration_us(p.lag_last),
                    lag_max_us: duration_us(p.lag_max),
                })
                .collect(),
        }
    }
}

fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// This run's epoch: one more than the last run's, read from and written back to
/// [`EPOCH_FILE`] in `data_dir` (durably, before it is used); `clock_ns` starts a counter that
/// does not exist yet.
fn next_epoch(data_dir: &Path, clock_ns: u64) -> Result<u64> {
    let path = data_dir.join(EPOCH_FILE);
    let epoch = match std::fs::read_to_string(&path) {
        Ok(text) => {
            let last: u64 = text.trim().parse().with_context(|| {
                format!(
                    "{} does not hold a sync epoch ({text:?}); remove it to start the count \
                     afresh from the clock",
                    path.display()
                )
            })?;
            match last.checked_add(1) {
                Some(next) => next,
                None => bail!("{}: the sync epoch cannot grow past {last}", path.display()),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => clock_ns.max(1),
        Err(e) => {
            return Err(e).with_context(|| format!("reading the sync epoch {}", path.display()));
        }
    };
    write_durably(data_dir, EPOCH_FILE, format!("{epoch}\n").as_bytes())
        .with_context(|| format!("writing the sync epoch {}", path.display()))?;
    Ok(epoch)
}

/// Replaces `dir/name` with `contents` so that a crash leaves the old file or the new one:
/// written to a temporary file and synced, renamed over, and the directory synced so that the
/// rename itself is on disk.
fn write_durably(dir: &Path, name: &str, contents: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;

    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR_NS: u64 = 3_600_000_000_000;

    /// Each start's epoch is one above the last one's whatever the clock says: a clock set
    /// back an hour between two starts does not make the second one look stale.
    #[test]
    fn test_every_start_gets_a_higher_epoch_whatever_the_clock() {
        let dir = tempfile::tempdir().unwrap();
        let now = 1_700_000_000 * 1_000_000_000;
        let first = next_epoch(dir.path(), now).unwrap();
        assert_eq!(first, now, "a new counter starts at the clock");
        let second = next_epoch(dir.path(), now - HOUR_NS).unwrap();
        assert!(second > first, "{second} after {first}");
        let third = next_epoch(dir.path(), 0).unwrap();
        assert_eq!(third, second + 1);
        let on_disk = std::fs::read_to_string(dir.path().join(EPOCH_FILE)).unwrap();
        assert_eq!(on_disk.trim().parse::<u64>().unwrap(), third);
        assert!(!dir.path().join(format!("{EPOCH_FILE}.tmp")).exists());
    }

    /// A counter that cannot be read stops the start with a message naming the file.
    #[test]
    fn test_an_unreadable_epoch_is_an_error_not_a_restart_from_zero() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(EPOCH_FILE), "garbage").unwrap();
        let err = next_epoch(dir.path(), 5).unwrap_err();
        assert!(format!("{err:#}").contains(EPOCH_FILE), "{err:#}");
        std::fs::write(dir.path().join(EPOCH_FILE), u64::MAX.to_string()).unwrap();
        assert!(next_epoch(dir.path(), 5).is_err());
    }

    /// The engine caps a peer's remaining time at the grace session sync adds: the two agree.
    #[test]
    fn test_the_engines_sync_grace_is_session_syncs() {
        assert_eq!(
            dataplane::EngineConfig::default().sync_grace,
            sessionsync::Config::default().expiry_grace
        );
    }
}

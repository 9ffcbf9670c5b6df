//! Session sync in the node (DESIGN §2, §3): the engine's session events go to the
//! `sessionsync` driver, which replicates them to every other member over the node's QUIC
//! endpoint (ALPN `lbc-sync/1`, the same mutual TLS and membership check as Raft); what peers
//! send is installed in the engine as synced sessions, so a packet of a peer's flow, in either
//! direction, is forwarded here at once with the original backend and LIP:port.
//!
//! Connections: of two members, the one whose name sorts first dials, the other accepts, so a
//! pair has one connection. A dial gives up after [`DIAL_TIMEOUT`] (one started while the peer
//! is down would otherwise sit in QUIC handshake resends); a lost connection or a failed dial is
//! dialled again at the next [`REDIAL`] tick, which is the backoff. A table request the peer
//! drops (it did not know this node yet) is asked again by `sessionsync` itself
//! (`Config::bulk_retry`).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use consensus::ClusterConfig;
use dataplane::{Engine, SessionEvent};
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

/// What applying peers' updates to the engine did.
#[derive(Debug, Default)]
struct Applied {
    installed: AtomicU64,
    removed: AtomicU64,
    /// Updates the engine refused (a service this node does not have yet, a port conflict).
    refused: AtomicU64,
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
    /// Starts sync for node `me` over `engine`; returns it and the inbox the packet workers
    /// send their session events to.
    pub(crate) fn start(me: &str, engine: &Arc<Engine>) -> Result<(Arc<NodeSync>, EventSink)> {
        // Higher with every start, so peers reject what an earlier run of this node sent.
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
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
                Apply::Install(rec) => match engine.install(
                    clock::now(),
                    &rec,
                    dataplane::Authority::Owner { mark: 0 },
                ) {
                    Ok(_) => {
                        applied.installed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        applied.refused.fetch_add(1, Ordering::Relaxed);
                        debug!(client = %rec.client, vip = %rec.vip, "synced session refused: {e}");
                    }
                },
                Apply::Remove(rec) => {
                    if engine.remove(&rec) == Ok(true) {
                        applied.removed.fetch_add(1, Ordering::Relaxed);
                    }
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
        self.handle.shutdown();
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
        SyncStatus {
            warm: self.is_warm(),
            epoch: self.epoch,
            installed: self.applied.installed.load(Ordering::Relaxed),
            removed: self.applied.removed.load(Ordering::Relaxed),
            refused: self.applied.refused.load(Ordering::Relaxed),
            peers: self
                .handle
                .stats()
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

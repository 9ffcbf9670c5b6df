//! Runs the protocol core for one node over QUIC connections the node provides.
//!
//! The node owns the endpoint, TLS and the ALPN [`ALPN`]; it hands over one connection per peer
//! (dialled or accepted, after it has checked the peer's identity) with
//! [`SyncHandle::add_connection`], and keeps the peer set current with
//! [`SyncHandle::set_peers`]. Each side sends on one unidirectional stream per connection: a
//! sequence of frames, each a 4-byte big-endian length and a [`codec`](crate::codec) frame. A
//! length over [`MAX_FRAME`] is counted and ends the stream before anything is allocated.
//!
//! All protocol decisions are the core's; this module moves frames, events and timeouts. The
//! core's timers are honoured whoever sets them: the main loop sleeps until the core's next
//! timeout, and every call that changes the core from elsewhere (a connection added, the peer
//! set, a frame sent or received) wakes it if that timeout moved earlier. A table request sent
//! from a link's task, for one, starts the core's re-request clock: were the loop not woken, an
//! idle node would sleep through it until its next refresh.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use dataplane::{SessionEvent, SessionRecord};
use quinn::{Connection, VarInt};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::codec::MAX_FRAME;
use crate::core::{Apply, Config, ConfigError, Core, Output, PeerStats};

/// The ALPN of session-sync connections.
pub const ALPN: &[u8] = b"lbc-sync/1";

/// Application close code: the peer left the peer set, or sync shut down.
const CLOSE_GONE: VarInt = VarInt::from_u32(1);
/// Stream stop code: a frame over its length cap.
const STOP_TOO_LARGE: VarInt = VarInt::from_u32(2);

/// Events handled per lock of the core before the transport gets a turn.
const EVENT_BURST: usize = 4096;

/// Where bulk sync and refresh read the node's sessions: every session it holds, owned and
/// synced (`Engine::sessions(now)` as it is); the core keeps the ones the node speaks for.
pub trait SessionSource: Send + Sync + 'static {
    fn sessions(&self) -> Vec<SessionRecord>;
}

impl<F: Fn() -> Vec<SessionRecord> + Send + Sync + 'static> SessionSource for F {
    fn sessions(&self) -> Vec<SessionRecord> {
        self()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

type ApplyFn = dyn Fn(Apply) + Send + Sync;

/// The tasks serving one peer's connection.
#[derive(Debug)]
struct Link {
    generation: u64,
    connection: Connection,
    wake: Arc<Notify>,
    tasks: [JoinHandle<()>; 2],
}

impl Link {
    fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        self.connection
            .close(CLOSE_GONE, b"session sync: peer gone");
    }
}

struct Shared {
    core: Mutex<Core>,
    /// Wakes the main loop: the core's next timeout moved earlier than it sleeps until.
    timeout_moved: Notify,
    /// Held while outputs are taken and applied, so updates reach the engine in order.
    applying: Mutex<()>,
    apply: Box<ApplyFn>,
    source: Box<dyn SessionSource>,
    links: Mutex<HashMap<String, Link>>,
    next_generation: Mutex<u64>,
    shutdown: watch::Receiver<bool>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("core", &self.core)
            .field("links", &self.links)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Runs `f` on the core and wakes the main loop if `f` moved the core's next timeout
    /// earlier. The loop sleeps until the timeout as it was when it last looked, and every change
    /// to the core made outside the loop comes through here, so no timer is slept through (a
    /// wake before the loop waits is kept by the `Notify`; the loop's own calls cost it at most
    /// one more turn).
    fn with_core<R>(&self, f: impl FnOnce(&mut Core) -> R) -> R {
        let mut core = lock(&self.core);
        let before = core.poll_timeout();
        let out = f(&mut core);
        if core.poll_timeout() < before {
            self.timeout_moved.notify_one();
        }
        out
    }

    /// Applies what the core has for the node and answers its table requests.
    fn run_outputs(&self) {
        let _order = lock(&self.applying);
        loop {
            let mut applies = Vec::new();
            let mut table = false;
            self.with_core(|core| {
                let now = Instant::now();
                while applies.len() < EVENT_BURST {
                    match core.poll_output(now) {
                        Some(Output::Apply(a)) => applies.push(a),
                        Some(Output::TableWanted) => table = true,
                        None => break,
                    }
                }
            });
            if applies.is_empty() && !table {
                return;
            }
            for a in applies {
                (self.apply)(a);
            }
            if table {
                let sessions = self.source.sessions();
                self.with_core(|core| core.handle_table(sessions));
                self.wake_writers();
            }
        }
    }

    fn wake_writers(&self) {
        for link in lock(&self.links).values() {
            link.wake.notify_one();
        }
    }

    /// The link of `peer` ended: if it is still the current one, the peer is disconnected.
    fn link_ended(&self, peer: &str, generation: u64) {
        let mut links = lock(&self.links);
        if links.get(peer).is_some_and(|l| l.generation == generation) {
            links.remove(peer);
            self.with_core(|core| core.peer_disconnected(peer));
        }
    }
}

/// Session sync of one node, running on the current tokio runtime.
#[derive(Debug)]
pub struct SyncHandle {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    main: JoinHandle<()>,
}

impl SyncHandle {
    /// Starts sync for node `me` in incarnation `epoch` (higher on every restart, e.g. the
    /// wall clock in nanoseconds at start). `events` carries the data plane's session events;
    /// `source` lists the node's sessions for bulk sync and refresh; `apply` installs into or
    /// removes from the node's engine what peers send (it must not block for long).
    pub fn start(
        me: &str,
        epoch: u64,
        config: Config,
        events: mpsc::Receiver<SessionEvent>,
        source: impl SessionSource,
        apply: impl Fn(Apply) + Send + Sync + 'static,
    ) -> Result<SyncHandle, ConfigError> {
        let core = Core::new(me, epoch, config, Instant::now())?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            core: Mutex::new(core),
            timeout_moved: Notify::new(),
            applying: Mutex::new(()),
            apply: Box::new(apply),
            source: Box::new(source),
            links: Mutex::new(HashMap::new()),
            next_generation: Mutex::new(0),
            shutdown: shutdown_rx,
        });
        let main = tokio::spawn(
            run_main(shared.clone(), events)
                .instrument(tracing::info_span!("session_sync", node = %me)),
        );
        Ok(SyncHandle {
            shared,
            shutdown,
            main,
        })
    }

    /// The peer set (node names; this node's own name is ignored). Connections of peers that
    /// left are closed; a connection that arrived before its peer joined the set counts from
    /// now.
    pub fn set_peers<S: AsRef<str>>(&self, names: &[S]) {
        let mut links = lock(&self.shared.links);
        self.shared.with_core(|core| {
            let known: Vec<String> = core.stats().into_iter().map(|p| p.peer).collect();
            core.set_peers(names);
            // A connection accepted before its peer was in the set (the peer learnt of this
            // node first) is this peer's transport now.
            for name in names.iter().map(AsRef::as_ref) {
                if links.contains_key(name) && !known.iter().any(|k| k == name) {
                    core.peer_connected(name);
                }
            }
        });
        let gone: Vec<String> = links
            .keys()
            .filter(|k| !names.iter().any(|n| n.as_ref() == k.as_str()))
            .cloned()
            .collect();
        for name in gone {
            if let Some(link) = links.remove(&name) {
                link.stop();
            }
        }
        drop(links);
        self.shared.wake_writers();
    }

    /// A connection to `peer` (authenticated by the node, ALPN [`ALPN`]); replaces the previous
    /// one. The peer must be in the peer set. Its table is asked for at once.
    pub fn add_connection(&self, peer: &str, connection: Connection) {
        let generation = {
            let mut g = lock(&self.shared.next_generation);
            *g += 1;
            *g
        };
        let mut links = lock(&self.shared.links);
        if let Some(old) = links.remove(peer) {
            old.stop();
        }
        self.shared.with_core(|core| {
            core.peer_disconnected(peer);
            core.peer_connected(peer);
        });
        let wake = Arc::new(Notify::new());
        let span = tracing::info_span!("session_sync_peer", peer = %peer);
        let writer = tokio::spawn(
            write_link(
                self.shared.clone(),
                peer.to_owned(),
                connection.clone(),
                wake.clone(),
                generation,
            )
            .instrument(span.clone()),
        );
        let reader = tokio::spawn(
            read_link(self.shared.clone(), peer.to_owned(), connection.clone()).instrument(span),
        );
        wake.notify_one();
        links.insert(
            peer.to_owned(),
            Link {
                generation,
                connection,
                wake,
                tasks: [writer, reader],
            },
        );
    }

    /// Every current peer's table has arrived since it connected (a node without peers is).
    pub fn is_warm(&self) -> bool {
        // Applies taken from the core are applied under this lock: wait for them, so warm
        // means the tables are in the engine.
        let _applied = lock(&self.shared.applying);
        lock(&self.shared.core).is_warm()
    }

    pub fn stats(&self) -> Vec<PeerStats> {
        lock(&self.shared.core).stats()
    }

    /// Frames dropped because their sender was not in the peer set.
    pub fn foreign_frames(&self) -> u64 {
        lock(&self.shared.core).foreign_frames()
    }

    /// Stops every task and closes the connections.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
        self.main.abort();
        for (_, link) in lock(&self.shared.links).drain() {
            link.stop();
        }
    }
}

impl Drop for SyncHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Feeds events and timeouts to the core and acts on its outputs.
async fn run_main(shared: Arc<Shared>, mut events: mpsc::Receiver<SessionEvent>) {
    let mut shutdown = shared.shutdown.clone();
    let mut events_open = true;
    loop {
        let deadline = lock(&shared.core).poll_timeout();
        tokio::select! {
            _ = shutdown.changed() => return,
            // The deadline is out of date; nothing else is.
            _ = shared.timeout_moved.notified() => continue,
            event = events.recv(), if events_open => match event {
                Some(event) => {
                    let mut core = lock(&shared.core);
                    let now = Instant::now();
                    core.handle_event(now, event);
                    for _ in 1..EVENT_BURST {
                        match events.try_recv() {
                            Ok(event) => core.handle_event(now, event),
                            Err(_) => break,
                        }
                    }
                }
                None => events_open = false,
            },
            _ = tokio::time::sleep_until(deadline.into()) => {
                lock(&shared.core).handle_timeout(Instant::now());
            }
        }
        shared.run_outputs();
        shared.wake_writers();
    }
}

/// Sends the core's frames for `peer` on one unidirectional stream.
async fn write_link(
    shared: Arc<Shared>,
    peer: String,
    connection: Connection,
    wake: Arc<Notify>,
    generation: u64,
) {
    let mut shutdown = shared.shutdown.clone();
    match write_frames(&shared, &peer, &connection, &wake, &mut shutdown).await {
        Ok(()) => {}
        Err(e) => tracing::info!(error = %e, "session sync link down"),
    }
    shared.link_ended(&peer, generation);
}

#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("cannot open a stream: {0}")]
    Open(#[from] quinn::ConnectionError),
    #[error("cannot write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("cannot read: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("connection closed")]
    Closed,
}

async fn write_frames(
    shared: &Shared,
    peer: &str,
    connection: &Connection,
    wake: &Notify,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), LinkError> {
    let mut send = connection.open_uni().await?;
    loop {
        loop {
            let frame = shared.with_core(|core| {
                core.set_rtt(peer, connection.rtt());
                core.poll_transmit(Instant::now(), peer)
            });
            let Some(frame) = frame else { break };
            let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
            send.write_all(&len.to_be_bytes()).await?;
            send.write_all(&frame).await?;
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = connection.closed() => return Err(LinkError::Closed),
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

/// Reads the frames `peer` sends, on every unidirectional stream it opens, one at a time.
async fn read_link(shared: Arc<Shared>, peer: String, connection: Connection) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let recv = tokio::select! {
            r = connection.accept_uni() => r,
            _ = shutdown.changed() => return,
        };
        let Ok(mut recv) = recv else { return };
        if let Err(e) = read_frames(&shared, &peer, &mut recv).await {
            tracing::debug!(error = %e, "session sync stream ended");
        }
    }
}

async fn read_frames(
    shared: &Shared,
    peer: &str,
    recv: &mut quinn::RecvStream,
) -> Result<(), LinkError> {
    loop {
        let mut len = [0u8; 4];
        recv.read_exact(&mut len).await?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME {
            shared.with_core(|core| core.handle_oversized(peer));
            let _ = recv.stop(STOP_TOO_LARGE);
            return Ok(());
        }
        let mut frame = vec![0; len];
        recv.read_exact(&mut frame).await?;
        shared.with_core(|core| core.handle_frame(Instant::now(), peer, &frame));
        shared.run_outputs();
        shared.wake_writers();
    }
}

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
//!
//! The core's outputs — updates applied to the engine, and the copies of the node's whole table
//! that bulk sync and refresh read (up to millions of sessions) — are carried out on one
//! dedicated thread, never on the async workers, in the order the core hands them out. The
//! core rate-limits the table copies (`Config::table_interval`).
//!
//! A node that stops hands over what it has before it goes ([`SyncHandle::close`]): the last
//! events of its stopped data plane are taken from the inbox, every batch is flushed, each link
//! writes what is queued for its peer and finishes its stream. A stream that ends cleanly at a
//! frame boundary is a peer saying it sent everything: the receiver, having handed every frame
//! to its core, closes the connection, and that close is what the stopping node waits for. A
//! flow the node opened a moment before it stopped is then on its peers, who carry it on.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use dataplane::{SessionEvent, SessionRecord};
use quinn::{Connection, VarInt};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::codec::MAX_FRAME;
use crate::core::{Apply, Config, ConfigError, Core, Output, PeerStats};

/// The ALPN of session-sync connections. The number is the wire version's ([`codec`]'s): nodes
/// that cannot read each other's frames do not connect (the handshake fails with an ALPN
/// error both sides log) instead of dropping every frame.
pub const ALPN: &[u8] = b"lbc-sync/3";

/// Application close code: the peer left the peer set, or sync shut down.
const CLOSE_GONE: VarInt = VarInt::from_u32(1);
/// Stream stop code: a frame over its length cap.
const STOP_TOO_LARGE: VarInt = VarInt::from_u32(2);

/// Events handled per lock of the core before the transport gets a turn.
const EVENT_BURST: usize = 4096;

/// Where bulk sync and refresh read the node's sessions: every session it holds, owned and
/// synced (`Engine::sessions(now)` as it is); the core picks what each stream carries. Called
/// on the driver's output thread.
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
    /// Wakes the output thread: the core may have outputs.
    outputs_due: Mutex<bool>,
    outputs_wake: Condvar,
    /// Outputs taken from the core and not carried out yet; changed up only under the core's
    /// lock, so the core and this together say whether everything received is applied.
    in_flight: AtomicUsize,
    stopping: AtomicBool,
    apply: Box<ApplyFn>,
    source: Box<dyn SessionSource>,
    links: Mutex<HashMap<String, Link>>,
    next_generation: Mutex<u64>,
    shutdown: watch::Receiver<bool>,
    closing: watch::Receiver<bool>,
    /// Closing, and the core has every event of the inbox and has flushed: a link that has
    /// written everything queued for its peer finishes its stream.
    handed_over: AtomicBool,
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

    /// Tells the output thread that the core may have outputs.
    fn outputs_due(&self) {
        *lock(&self.outputs_due) = true;
        self.outputs_wake.notify_one();
    }

    /// The output thread: carries out what the core hands out, in order, until sync stops.
    fn run_output_thread(&self) {
        loop {
            {
                let mut due = lock(&self.outputs_due);
                while !*due && !self.stopping.load(Ordering::Acquire) {
                    due = self
                        .outputs_wake
                        .wait(due)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                *due = false;
            }
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            self.run_outputs();
        }
    }

    /// Applies what the core has for the node and answers its table requests.
    fn run_outputs(&self) {
        loop {
            let mut outputs = Vec::new();
            self.with_core(|core| {
                let now = Instant::now();
                while outputs.len() < EVENT_BURST {
                    match core.poll_output(now) {
                        Some(o) => outputs.push(o),
                        None => break,
                    }
                }
                self.in_flight.fetch_add(outputs.len(), Ordering::AcqRel);
            });
            if outputs.is_empty() {
                return;
            }
            for output in outputs {
                match output {
                    Output::Apply(a) => (self.apply)(a),
                    Output::TableWanted => {
                        let sessions = self.source.sessions();
                        self.with_core(|core| core.handle_table(sessions));
                    }
                }
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
            }
            self.wake_writers();
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

/// Why sync did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot start the session-sync output thread: {0}")]
    Thread(std::io::Error),
}

/// Session sync of one node, running on the current tokio runtime.
#[derive(Debug)]
pub struct SyncHandle {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    closing: watch::Sender<bool>,
    main: JoinHandle<()>,
}

impl SyncHandle {
    /// Starts sync for node `me` in incarnation `epoch` (higher on every restart: the node keeps
    /// a counter on disk). `events` carries the data plane's session events; `source` lists the
    /// node's sessions for bulk sync and refresh; `apply` carries out in the node's engine what
    /// peers send. Both run on the driver's output thread.
    pub fn start(
        me: &str,
        epoch: u64,
        config: Config,
        events: mpsc::Receiver<SessionEvent>,
        source: impl SessionSource,
        apply: impl Fn(Apply) + Send + Sync + 'static,
    ) -> Result<SyncHandle, StartError> {
        let core = Core::new(me, epoch, config, Instant::now())?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (closing, closing_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            core: Mutex::new(core),
            timeout_moved: Notify::new(),
            outputs_due: Mutex::new(false),
            outputs_wake: Condvar::new(),
            in_flight: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            apply: Box::new(apply),
            source: Box::new(source),
            links: Mutex::new(HashMap::new()),
            next_generation: Mutex::new(0),
            shutdown: shutdown_rx,
            closing: closing_rx,
            handed_over: AtomicBool::new(false),
        });
        let span = tracing::info_span!("session_sync", node = %me);
        {
            let shared = shared.clone();
            let span = span.clone();
            std::thread::Builder::new()
                .name("session-sync".to_owned())
                .spawn(move || span.in_scope(|| shared.run_output_thread()))
                .map_err(StartError::Thread)?;
        }
        let main = tokio::spawn(run_main(shared.clone(), events).instrument(span));
        Ok(SyncHandle {
            shared,
            shutdown,
            closing,
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

    /// The LIPs of every node of the configuration, this one included: who owns each flow
    /// (`Core::set_lips`).
    pub fn set_lips(&self, nodes: &[(String, Vec<IpAddr>)]) {
        self.shared.with_core(|core| core.set_lips(nodes));
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

    /// Every current peer's table has arrived since it connected, and is in the engine (a node
    /// without peers is warm).
    pub fn is_warm(&self) -> bool {
        let core = lock(&self.shared.core);
        core.is_warm() && self.shared.in_flight.load(Ordering::Acquire) == 0
    }

    pub fn stats(&self) -> Vec<PeerStats> {
        lock(&self.shared.core).stats()
    }

    /// Frames dropped because their sender was not in the peer set.
    pub fn foreign_frames(&self) -> u64 {
        lock(&self.shared.core).foreign_frames()
    }

    /// Hands everything to the peers before stopping: the events in the inbox now (call this
    /// once the data plane has stopped, so that they are its last), then every update not sent
    /// yet; waits until every connected peer has taken all of it in (it closes the connection
    /// once it has read this node's stream to its end), for at most `grace`; then stops as
    /// [`SyncHandle::shutdown`].
    pub async fn close(&self, grace: Duration) {
        let connections: Vec<Connection> = lock(&self.shared.links)
            .values()
            .map(|l| l.connection.clone())
            .collect();
        let _ = self.closing.send(true);
        let handed_over = async {
            for c in &connections {
                c.closed().await;
            }
        };
        if tokio::time::timeout(grace, handed_over).await.is_err() {
            tracing::warn!(
                "session sync: not every peer confirmed the last updates within {grace:?}; \
                 stopping anyway (they repair what they miss from the next table)"
            );
        }
        self.shutdown();
    }

    /// Stops every task and the output thread (after what it is doing) and closes the
    /// connections.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.outputs_due();
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
    let mut closing = shared.closing.clone();
    let mut events_open = true;
    loop {
        let deadline = lock(&shared.core).poll_timeout();
        let handed_over = shared.handed_over.load(Ordering::Acquire);
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = closing.wait_for(|c| *c), if !handed_over => {
                let mut core = lock(&shared.core);
                let now = Instant::now();
                while let Ok(event) = events.try_recv() {
                    core.handle_event(now, event);
                }
                core.flush_all();
                shared.handed_over.store(true, Ordering::Release);
            }
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
        if lock(&shared.core).output_ready(Instant::now()) {
            shared.outputs_due();
        }
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
        // Read before the frames are: once it is set, the core already has everything.
        let last = shared.handed_over.load(Ordering::Acquire);
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
        if last {
            // The peer closes the connection once it has read this to the end.
            send.finish().map_err(|_| LinkError::Closed)?;
            return Ok(());
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
        match read_frames(&shared, &peer, &mut recv).await {
            Ok(StreamEnd::Finished) => {
                // The peer is leaving and everything it sent is in the core: it may go.
                connection.close(CLOSE_GONE, b"session sync: everything received");
                return;
            }
            Ok(StreamEnd::TooLarge) => {}
            Err(e) => tracing::debug!(error = %e, "session sync stream ended"),
        }
    }
}

/// How a peer's stream ended without an error.
enum StreamEnd {
    /// Finished by the peer after a whole frame: it sent all it had.
    Finished,
    /// Stopped here: a frame over its length cap.
    TooLarge,
}

async fn read_frames(
    shared: &Shared,
    peer: &str,
    recv: &mut quinn::RecvStream,
) -> Result<StreamEnd, LinkError> {
    loop {
        let mut len = [0u8; 4];
        match recv.read_exact(&mut len).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(StreamEnd::Finished),
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME {
            shared.with_core(|core| core.handle_oversized(peer));
            let _ = recv.stop(STOP_TOO_LARGE);
            return Ok(StreamEnd::TooLarge);
        }
        let mut frame = vec![0; len];
        recv.read_exact(&mut frame).await?;
        let ready = shared.with_core(|core| {
            let now = Instant::now();
            core.handle_frame(now, peer, &frame);
            core.output_ready(now)
        });
        if ready {
            shared.outputs_due();
        }
        shared.wake_writers();
    }
}

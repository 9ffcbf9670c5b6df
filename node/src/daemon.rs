//! `lbcluster run`: the node daemon. It checks the config before it binds or changes anything,
//! then starts the engine, the admin API, the metrics listener and the health checks, and runs
//! until SIGTERM or SIGINT. A standalone node runs its file's services and reloads them on
//! SIGHUP; a cluster member (`[cluster]`) binds its QUIC endpoint, starts Raft, and runs every
//! configuration the cluster commits.
//!
//! A cluster member whose Raft stops on its own (a log, vote or snapshot write or fsync failed,
//! e.g. a full disk; or the Raft core panicked) fails loudly: openraft then refuses every
//! request for good, so the node would forward on a configuration that can no longer change.
//! It logs why, shuts down as on SIGTERM (removing the TUN device, which withdraws every route
//! BIRD has via it at once), tells BIRD to announce nothing, and exits 1, so that its
//! supervisor (systemd `Restart=on-failure`) restarts it on a fresh Raft core.

use std::hash::{BuildHasher, Hasher};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use dataplane::{Engine, EngineConfig, Snapshot};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument, error, info, info_span, warn};

use consensus::{ClusterConfig, Member, NodeId};
use openraft::RaftMetrics;

use crate::admin::{Admin, ClusterAdmin};
use crate::announce::Announcer;
use crate::cluster::{self, ClusterNode};
use crate::history::{self, Observations};
use crate::packet_io::{self, DataplaneSpec};
use crate::source::{ConfigFileSource, Reloaded};
use crate::state::NodeState;
use crate::{admin, clock, config, health, metrics};

/// How long tasks get to finish after the shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Runs the daemon until it is told to stop.
pub(crate) fn run(config_path: &Path) -> Result<()> {
    let config = config::load(config_path, 1)?;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lbcluster-ctl")
        .build()
        .context("starting the async runtime")?
        .block_on(serve(config_path.to_owned(), config))
}

/// Resolves once the shutdown signal is given (or its sender is gone).
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn serve(config_path: PathBuf, config: config::Config) -> Result<()> {
    clock::now();
    let AdminSocket {
        path: socket_path,
        listener: socket_listener,
        file: socket_file,
    } = AdminSocket::bind(&config.admin.socket).await?;
    let metrics_listener = match config.admin.metrics {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics listener on {addr}"))?,
        ),
        None => None,
    };
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT")?;
    let mut hangup = signal(SignalKind::hangup()).context("installing SIGHUP")?;

    let engine = Engine::new(
        EngineConfig {
            max_sessions_v4: config.node.max_sessions_v4,
            max_sessions_v6: config.node.max_sessions_v6,
            table_seed: random_seed(),
            // SipHash keys from the OS's randomness (RandomState's), per node.
            cookie_key: [random_seed(), random_seed()],
            local_addrs: config.node.local_addrs.clone(),
            local_ports: config.node.local_ports.clone(),
            ..EngineConfig::default()
        },
        Snapshot::empty(),
    )
    .context("starting the engine")?;
    let node_name = config.node.name.clone();
    let file_lips = config.node.local_addrs.clone();
    // A cluster member runs the committed configuration; a standalone node its file.
    let mut events = None;
    let mut mode = match &config.cluster {
        Some(settings) => {
            let announcer = config
                .bgp
                .clone()
                .map(|b| Announcer::new(b, config.node.tun.clone()));
            let (member, configs, sink) =
                ClusterNode::start(&node_name, settings, &engine, announcer.clone()).await?;
            events = Some(sink);
            let admin = ClusterAdmin {
                cluster: member.cluster.clone(),
                sync: member.sync.clone(),
                announcer,
                endpoint: member.endpoint.clone(),
                serve_counters: member.serve_counters.clone(),
                me: cluster::self_node(&node_name, settings, &file_lips),
                bootstrap: cluster::bootstrap_commands(&config.services)?,
            };
            Mode::Cluster {
                member,
                configs,
                admin: Arc::new(admin),
                services: watch::Sender::new(Arc::new(config::ServiceSet {
                    version: 0,
                    maglev: config.services.maglev,
                    services: Vec::new(),
                })),
            }
        }
        None => Mode::Standalone(Box::new(ConfigFileSource::new(config_path, config.clone()))),
    };
    let (initial, routes) = match &mode {
        Mode::Standalone(source) => (
            source.subscribe().borrow().clone(),
            dataplane_routes(&config),
        ),
        Mode::Cluster {
            configs, services, ..
        } => {
            let committed = configs.borrow().clone();
            let lips = cluster::local_addrs(&committed, consensus::node_id(&node_name), &file_lips);
            engine
                .set_local_addrs(&lips)
                .context("the cluster's local addresses for this node")?;
            services.send_replace(Arc::new(cluster::service_set(&committed)));
            (
                services.borrow().clone(),
                cluster::routes(&committed, &lips),
            )
        }
    };
    let dataplane_spec = DataplaneSpec {
        tun_name: config.node.tun.clone(),
        queues: config.node.workers,
        routes,
        fastpath: config.node.fastpath,
        fastpath_devices: config.node.fastpath_devices.clone(),
        fastpath_sessions: config.node.fastpath_sessions,
    };
    let state = Arc::new(NodeState::new(node_name.clone(), engine, initial)?);
    if let Mode::Cluster { admin, .. } = &mode
        && let Some(announcer) = &admin.announcer
    {
        announcer.withdraw_all().await;
    }

    let dataplane = tokio::task::block_in_place(|| {
        packet_io::start(&dataplane_spec, state.engine().clone(), events)
    })
    .context("starting packet I/O")?;
    state.set_dataplane(dataplane);

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let admin = Admin {
        node: state.clone(),
        cluster: match &mode {
            Mode::Cluster { admin, .. } => Some(admin.clone()),
            Mode::Standalone(_) => None,
        },
    };
    {
        let admin = admin.clone();
        let stop = stopped(stop_rx.clone());
        tasks.spawn(
            async move {
                if let Err(e) = admin::serve(socket_listener, admin, stop).await {
                    error!("admin API failed: {e}");
                }
            }
            .instrument(info_span!("admin", socket = %socket_path.display())),
        );
    }
    if let Some(listener) = metrics_listener {
        let admin = admin.clone();
        let stop = stopped(stop_rx.clone());
        let addr = listener.local_addr().context("metrics listener address")?;
        // The status page's history is kept only where the page is served.
        let observations = Arc::new(Observations::default());
        tasks.spawn(
            history::run(
                admin.clone(),
                observations.clone(),
                stopped(stop_rx.clone()),
            )
            .instrument(info_span!("history")),
        );
        tasks.spawn(
            async move {
                if let Err(e) = metrics::serve(listener, admin, observations, stop).await {
                    error!("metrics listener failed: {e}");
                }
            }
            .instrument(info_span!("metrics", %addr)),
        );
    }
    let services = match &mode {
        Mode::Standalone(source) => source.subscribe(),
        Mode::Cluster {
            configs,
            services,
            member,
            admin: cluster_admin,
        } => {
            tasks.spawn(
                member
                    .sync
                    .clone()
                    .follow(
                        state.name().to_owned(),
                        member.endpoint.clone(),
                        configs.clone(),
                        stop_rx.clone(),
                    )
                    .instrument(info_span!("sync")),
            );
            if let Some(announcer) = &cluster_admin.announcer {
                tasks.spawn(announcer.clone().run(
                    state.clone(),
                    member.sync.clone(),
                    configs.clone(),
                    stop_rx.clone(),
                ));
            }
            tasks.spawn(
                follow_cluster(
                    state.clone(),
                    configs.clone(),
                    services.clone(),
                    file_lips,
                    stop_rx.clone(),
                )
                .instrument(info_span!("cluster")),
            );
            services.subscribe()
        }
    };
    {
        let state = state.clone();
        let stop = stop_rx.clone();
        tasks.spawn(supervise_health(state, services, stop).instrument(info_span!("health")));
    }
    info!(node = state.name(), "lbcluster running");

    let raft_metrics = match &mode {
        Mode::Cluster { member, .. } => Some(member.cluster.raft().metrics()),
        Mode::Standalone(_) => None,
    };
    let raft_stopped = async move {
        match raft_metrics {
            Some(metrics) => raft_stopped(metrics).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(raft_stopped);
    let mut failure = None;
    loop {
        tokio::select! {
            _ = terminate.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = interrupt.recv() => { info!("SIGINT: shutting down"); break; }
            reason = &mut raft_stopped => {
                let data_dir = config.cluster.as_ref().map(|c| c.data_dir.display());
                error!(
                    "raft stopped: {reason}. This node can take no configuration change any \
                     more: withdrawing its routes and exiting 1, for its supervisor to restart \
                     it. If the error is the storage's, make room on or repair the disk of {}",
                    data_dir.map_or_else(String::new, |d| d.to_string())
                );
                failure = Some(reason);
                break;
            }
            _ = hangup.recv() => match &mut mode {
                Mode::Standalone(source) => match source.reload() {
                    Ok(Reloaded::Unchanged) => info!("SIGHUP: services unchanged"),
                    Ok(Reloaded::Services { version }) => {
                        info!(version, "SIGHUP: services reloaded");
                    }
                    Err(e) => warn!("SIGHUP: reload refused: {e:#}"),
                },
                Mode::Cluster { .. } => warn!(
                    "SIGHUP: nothing to reload: a cluster member's services come from the \
                     cluster configuration (`lbcluster service …`); the file's only bootstrap \
                     `cluster init`"
                ),
            },
        }
    }
    stop_tx.send_replace(true);
    // The data plane first: then no session changes any more, its last events are in sync's
    // inbox, and the routes through the device are gone (BIRD withdraws them with it) before
    // sync hands those sessions to the peers and the node leaves the cluster.
    if let Some(dataplane) = state.take_dataplane()
        && let Err(e) = tokio::task::block_in_place(|| dataplane.stop())
    {
        error!("stopping packet I/O: {e:#}");
    }
    let mut announcer = None;
    if let Mode::Cluster { member, admin, .. } = mode {
        announcer.clone_from(&admin.announcer);
        member.shutdown().await;
    }
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!("tasks still running after {SHUTDOWN_GRACE:?}; stopping anyway");
        tasks.shutdown().await;
    }
    if let Some(reason) = failure {
        // The TUN device is gone, so BIRD has withdrawn every route via it; an empty config
        // keeps it so if the device comes back before this node is warm again. The announcer's
        // task has ended, so nothing applies another announcement after this one.
        if let Some(announcer) = announcer {
            announcer.withdraw_all().await;
        }
        drop(socket_file);
        return Err(anyhow!("raft stopped: {reason}"));
    }
    drop(socket_file);
    info!("stopped");
    Ok(())
}

/// Resolves, with the reason, once the node's Raft core has stopped by itself: only shutting
/// down stops it otherwise, and that happens after this is no longer awaited.
async fn raft_stopped(mut metrics: watch::Receiver<RaftMetrics<NodeId, Member>>) -> String {
    loop {
        if let Err(fatal) = &metrics.borrow_and_update().running_state {
            return fatal.to_string();
        }
        // The sender goes with the core's task, also when it panics.
        if metrics.changed().await.is_err() {
            return "the raft core ended without a report".to_owned();
        }
    }
}

/// How the node gets its services.
enum Mode {
    /// From its config file, reloaded on SIGHUP.
    Standalone(Box<ConfigFileSource>),
    /// From the cluster's committed configuration.
    Cluster {
        member: ClusterNode,
        configs: watch::Receiver<Arc<ClusterConfig>>,
        admin: Arc<ClusterAdmin>,
        /// The service set of the latest committed configuration, for the health supervisor.
        services: watch::Sender<Arc<config::ServiceSet>>,
    },
}

/// Applies every committed configuration: the node's local addresses and routes first (a new
/// service's flows need them), then its service set.
async fn follow_cluster(
    state: Arc<NodeState>,
    mut configs: watch::Receiver<Arc<ClusterConfig>>,
    services: watch::Sender<Arc<config::ServiceSet>>,
    file_lips: Vec<std::net::IpAddr>,
    stop: watch::Receiver<bool>,
) {
    let me = consensus::node_id(state.name());
    let stop = stopped(stop);
    tokio::pin!(stop);
    loop {
        let committed = configs.borrow_and_update().clone();
        let lips = cluster::local_addrs(&committed, me, &file_lips);
        if let Err(e) = state.engine().set_local_addrs(&lips) {
            error!(
                version = committed.version,
                "local addresses not applied: {e}"
            );
        }
        if let Err(e) = state.set_routes(&cluster::routes(&committed, &lips)) {
            error!(version = committed.version, "routes not applied: {e:#}");
        }
        services.send_replace(Arc::new(cluster::service_set(&committed)));
        tokio::select! {
            () = &mut stop => break,
            changed = configs.changed() => if changed.is_err() { break },
        }
    }
}

/// Keeps one health checker per checked backend of the current service set: a new set rebuilds
/// the snapshot (backends that stay keep their health) and updates the checkers (a backend whose
/// check stays keeps its checker).
async fn supervise_health(
    state: Arc<NodeState>,
    mut services: watch::Receiver<Arc<config::ServiceSet>>,
    stop: watch::Receiver<bool>,
) {
    let mut checkers = health::Checkers::default();
    checkers.update(&state.service_set(), &state);
    let stop = stopped(stop);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            changed = services.changed() => {
                if changed.is_err() {
                    break;
                }
                let set = services.borrow_and_update().clone();
                if let Err(e) = state.set_services(set.clone()) {
                    error!("service set {} not applied: {e:#}", set.version);
                }
                checkers.update(&state.service_set(), &state);
            }
        }
    }
    checkers.shutdown().await;
}

/// Host routes into the TUN device: every LIP and every VIP of the configured services.
// Services added by a SIGHUP reload get no route until restart; the replicated config (Raft
// issue) applies routes with every change.
fn dataplane_routes(config: &config::Config) -> Vec<std::net::IpAddr> {
    let mut routes = config.node.local_addrs.clone();
    routes.extend(config.services.services.iter().map(|s| s.config.vip.ip()));
    routes.sort();
    routes.dedup();
    routes
}

/// A per-process random seed, from the standard library's randomly keyed hasher.
fn random_seed() -> u64 {
    std::hash::RandomState::new().build_hasher().finish()
}

/// The admin socket, bound and owned by this daemon.
#[derive(Debug)]
struct AdminSocket {
    path: PathBuf,
    listener: UnixListener,
    file: SocketFile,
}

/// Removes the socket file when dropped, whatever ends the daemon.
#[derive(Debug)]
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            warn!("removing {}: {e}", self.0.display());
        }
    }
}

impl AdminSocket {
    /// Binds the socket with mode 0600. A stale socket file is removed; a socket another daemon
    /// answers on, or a file that is not a socket, is an error.
    async fn bind(path: &Path) -> Result<AdminSocket> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                bail!(
                    "{} exists and is not a socket; remove it or choose another admin.socket",
                    path.display()
                )
            }
            Ok(_) => {
                if UnixStream::connect(path).await.is_ok() {
                    bail!(
                        "another lbcluster daemon is answering on {}; stop it first or choose another admin.socket",
                        path.display()
                    );
                }
                std::fs::remove_file(path)
                    .with_context(|| format!("removing the stale socket {}", path.display()))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the socket directory {}", dir.display()))?;
        }
        // Bound under a temporary name and renamed once its mode is 0600, so that nobody can
        // connect while it still has the umask's mode.
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp)
            .with_context(|| format!("binding the admin socket {}", tmp.display()))?;
        // Until the rename, the guard removes the temporary name on any error.
        let mut file = SocketFile(tmp.clone());
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("setting the mode of {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("moving the admin socket to {}", path.display()))?;
        file.0 = path.to_owned();
        Ok(AdminSocket {
            path: path.to_owned(),
            listener,
            file,
        })
    }
}

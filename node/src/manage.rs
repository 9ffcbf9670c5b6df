//! The cluster management commands of the CLI — `cluster init`, `node add|remove`,
//! `service add|edit|del|list`, `backend add|edit|del` — with ipvsadm's short flags where they
//! fit (`-t`/`-u` service, `-s` scheduler, `-r` real server, `-w` weight). Each builds a
//! configuration command and sends it to the local node's admin API, which forwards it to the
//! leader when it has to.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use consensus::config::{
    Backend, ClusterConfig, Command, ConnReuse, HealthCheck, Probe, Proto, Scheduler, Service,
    ServiceKey, ServiceSettings, SynProxy, Timeouts,
};

use crate::api::{
    CLUSTER_INIT_PATH, COMMANDS_PATH, CONFIG_PATH, JOIN_TOKEN_PATH, JoinTokenAnswer, NODES_PATH,
    NodeSpec, STEP_DOWN_PATH, SteppedDown, Written,
};
use crate::{Output, SocketArg, client, render};

#[derive(Debug, Subcommand)]
pub(crate) enum ClusterCommand {
    /// Start a new cluster on this node: it becomes the only member, with its [cluster] address,
    /// its local addresses and its file's Maglev settings and services.
    Init(SocketArg),
    /// Hand this node's Raft leadership to another voter before restarting it (nothing to do
    /// when it does not lead); writes pause for about one election timeout.
    StepDown(SocketArg),
    /// Print the cluster's join token: a node is added only once its `[cluster]
    /// join_token_file` holds it (it answers no other cluster). Keep it secret, like the CA key.
    JoinToken(SocketArg),
}

#[derive(Debug, Subcommand)]
pub(crate) enum NodeCommand {
    /// Add a node: it joins as a learner, catches up, then becomes a voter (one command). Its
    /// `[cluster] join_token_file` must hold the cluster's join token first.
    Add(NodeAddArgs),
    /// Remove a node (the leader included) from the cluster: every member closes its
    /// connections and refuses it from the moment it applies the removal.
    Remove(NodeRemoveArgs),
}

#[derive(Debug, Args)]
pub(crate) struct NodeAddArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// The node's name, as in its certificate.
    #[arg(value_parser = crate::parse_node_name)]
    name: String,
    /// The node's QUIC address ([cluster] listen in its config).
    #[arg(long, value_name = "ADDR:PORT")]
    addr: SocketAddr,
    /// A local address (LIP) the node owns; repeat for more.
    #[arg(long = "lip", value_name = "ADDR", required = true)]
    lips: Vec<IpAddr>,
}

#[derive(Debug, Args)]
pub(crate) struct DrainArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// The node's name.
    name: String,
}

#[derive(Debug, Args)]
pub(crate) struct NodeRemoveArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// The node's name.
    name: String,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ServiceCommand {
    /// Add a virtual service (no backends yet).
    Add(ServiceAddArgs),
    /// Change a service's settings; what is not given stays as it is.
    Edit(ServiceAddArgs),
    /// Delete a service and its backends; their sessions end naturally.
    Del(ServiceDelArgs),
    /// List the services and backends of the cluster configuration (a linearizable read).
    List(ServiceListArgs),
}

/// The service a command is about: `-t VIP:PORT` or `-u VIP:PORT`.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub(crate) struct ServiceArg {
    /// A TCP service.
    #[arg(short = 't', long = "tcp-service", value_name = "VIP:PORT")]
    tcp: Option<SocketAddr>,
    /// A UDP service.
    #[arg(short = 'u', long = "udp-service", value_name = "VIP:PORT")]
    udp: Option<SocketAddr>,
}

impl ServiceArg {
    fn key(&self) -> ServiceKey {
        match (self.tcp, self.udp) {
            (Some(vip), _) => ServiceKey {
                vip,
                proto: Proto::Tcp,
            },
            // clap's group makes exactly one of them present.
            (None, udp) => ServiceKey {
                vip: udp.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
                proto: Proto::Udp,
            },
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct ServiceAddArgs {
    #[command(flatten)]
    socket: SocketArg,
    #[command(flatten)]
    service: ServiceArg,
    /// Scheduler: mh (Maglev, the default), wrr, wlc, rr or sh.
    #[arg(short = 's', long, value_parser = parse_scheduler)]
    scheduler: Option<Scheduler>,
    /// Insert the client address as a TOA option into SYNs sent to the backends.
    #[arg(long, conflicts_with = "no_toa")]
    toa: bool,
    /// Stop inserting TOA options.
    #[arg(long)]
    no_toa: bool,
    /// A client's SYN on the port of a session in TIME_WAIT or CLOSE: reschedule (end the old
    /// session and schedule the SYN afresh, IPVS's conn_reuse_mode 1, the default) or keep
    /// (continue the old session to its backend, conn_reuse_mode 0).
    #[arg(long, value_parser = parse_conn_reuse)]
    conn_reuse: Option<ConnReuse>,
    /// Answer the service's SYNs with SYN cookies: off, on, or auto (the default: while the
    /// node's half-open flows pass a threshold).
    #[arg(long, value_parser = parse_syn_proxy)]
    syn_proxy: Option<SynProxy>,
    /// An idle timeout in seconds, STATE=SECS: established, syn_sent, syn_recv, fin_wait,
    /// time_wait, close, close_wait, last_ack or udp. Repeat for more.
    #[arg(long = "timeout", value_name = "STATE=SECS", value_parser = parse_timeout)]
    timeouts: Vec<(String, u32)>,
    /// Health check of the backends: none, tcp (connect) or http (GET).
    #[arg(long, value_parser = ["none", "tcp", "http"])]
    check: Option<String>,
    /// Path of the HTTP check [default: /].
    #[arg(long)]
    check_path: Option<String>,
    /// Status the HTTP check expects [default: 200].
    #[arg(long)]
    check_status: Option<u16>,
    /// Milliseconds between checks [default: 2000].
    #[arg(long)]
    check_interval_ms: Option<u32>,
    /// Milliseconds a check may take [default: 1000].
    #[arg(long)]
    check_timeout_ms: Option<u32>,
    /// Successes in a row that bring a backend up [default: 2].
    #[arg(long)]
    check_rise: Option<u32>,
    /// Failures in a row that take a backend down [default: 3].
    #[arg(long)]
    check_fall: Option<u32>,
}

#[derive(Debug, Args)]
pub(crate) struct ServiceDelArgs {
    #[command(flatten)]
    socket: SocketArg,
    #[command(flatten)]
    service: ServiceArg,
}

#[derive(Debug, Args)]
pub(crate) struct ServiceListArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Debug, Subcommand)]
pub(crate) enum BackendCommand {
    /// Add a backend (real server) to a service.
    Add(BackendArgs),
    /// Change a backend's weight.
    Edit(BackendArgs),
    /// Remove a backend; its sessions end naturally.
    Del(BackendDelArgs),
}

#[derive(Debug, Args)]
pub(crate) struct BackendArgs {
    #[command(flatten)]
    socket: SocketArg,
    #[command(flatten)]
    service: ServiceArg,
    /// The backend.
    #[arg(short = 'r', long = "real-server", value_name = "ADDR:PORT")]
    real_server: SocketAddr,
    /// Weight, 0 to 65535; 0 takes no new flows but keeps the sessions.
    #[arg(short = 'w', long, default_value_t = 1)]
    weight: u32,
}

#[derive(Debug, Args)]
pub(crate) struct BackendDelArgs {
    #[command(flatten)]
    socket: SocketArg,
    #[command(flatten)]
    service: ServiceArg,
    /// The backend.
    #[arg(short = 'r', long = "real-server", value_name = "ADDR:PORT")]
    real_server: SocketAddr,
}

fn parse_scheduler(s: &str) -> Result<Scheduler, String> {
    Ok(match s {
        "mh" | "maglev" => Scheduler::Maglev,
        "wrr" => Scheduler::Wrr,
        "wlc" => Scheduler::Wlc,
        "rr" => Scheduler::Rr,
        "sh" => Scheduler::Sh,
        _ => return Err(format!("{s:?} is not a scheduler (mh, wrr, wlc, rr, sh)")),
    })
}

fn parse_conn_reuse(s: &str) -> Result<ConnReuse, String> {
    Ok(match s {
        "reschedule" => ConnReuse::Reschedule,
        "keep" => ConnReuse::Keep,
        _ => return Err(format!("{s:?} is not reschedule or keep")),
    })
}

fn parse_syn_proxy(s: &str) -> Result<SynProxy, String> {
    Ok(match s {
        "off" => SynProxy::Off,
        "on" => SynProxy::On,
        "auto" => SynProxy::Auto,
        _ => return Err(format!("{s:?} is not off, on or auto")),
    })
}

fn parse_timeout(s: &str) -> Result<(String, u32), String> {
    let (state, secs) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not STATE=SECS"))?;
    let secs = secs
        .parse()
        .map_err(|_| format!("{secs:?} is not a number of seconds"))?;
    if timeout_slot(&mut Timeouts::default(), state).is_none() {
        return Err(format!(
            "{state:?} is not a timeout: established, syn_sent, syn_recv, fin_wait, time_wait, \
             close, close_wait, last_ack, udp"
        ));
    }
    Ok((state.to_owned(), secs))
}

fn timeout_slot<'a>(t: &'a mut Timeouts, state: &str) -> Option<&'a mut u32> {
    Some(match state {
        "established" => &mut t.established,
        "syn_sent" => &mut t.syn_sent,
        "syn_recv" => &mut t.syn_recv,
        "fin_wait" => &mut t.fin_wait,
        "time_wait" => &mut t.time_wait,
        "close" => &mut t.close,
        "close_wait" => &mut t.close_wait,
        "last_ack" => &mut t.last_ack,
        "udp" => &mut t.udp,
        _ => return None,
    })
}

const DEFAULT_PROBE: Probe = Probe {
    interval_ms: 2000,
    timeout_ms: 1000,
    rise: 2,
    fall: 3,
};

impl ServiceAddArgs {
    /// `base` with the options given on the command line applied.
    fn settings(&self, mut base: ServiceSettings) -> Result<ServiceSettings> {
        if let Some(s) = self.scheduler {
            base.scheduler = s;
        }
        if self.toa {
            base.toa = true;
        }
        if self.no_toa {
            base.toa = false;
        }
        if let Some(c) = self.conn_reuse {
            base.conn_reuse = c;
        }
        if let Some(p) = self.syn_proxy {
            base.syn_proxy = p;
        }
        for (state, secs) in &self.timeouts {
            if let Some(slot) = timeout_slot(&mut base.timeouts, state) {
                *slot = *secs;
            }
        }
        let (mut probe, mut path, mut status) = match &base.health {
            HealthCheck::None => (DEFAULT_PROBE, "/".to_owned(), 200),
            HealthCheck::Tcp(p) => (*p, "/".to_owned(), 200),
            HealthCheck::Http {
                probe,
                path,
                expect_status,
            } => (*probe, path.clone(), *expect_status),
        };
        let kind = match (&self.check, &base.health) {
            (Some(kind), _) => kind.as_str(),
            (None, HealthCheck::None) => "none",
            (None, HealthCheck::Tcp(_)) => "tcp",
            (None, HealthCheck::Http { .. }) => "http",
        };
        let probe_given = self.check_interval_ms.is_some()
            || self.check_timeout_ms.is_some()
            || self.check_rise.is_some()
            || self.check_fall.is_some();
        let http_given = self.check_path.is_some() || self.check_status.is_some();
        if kind == "none" && (probe_given || http_given) {
            bail!("--check-* options need a health check: give --check tcp or --check http");
        }
        if kind == "tcp" && http_given {
            bail!("--check-path and --check-status apply only to --check http");
        }
        probe.interval_ms = self.check_interval_ms.unwrap_or(probe.interval_ms);
        probe.timeout_ms = self.check_timeout_ms.unwrap_or(probe.timeout_ms);
        probe.rise = self.check_rise.unwrap_or(probe.rise);
        probe.fall = self.check_fall.unwrap_or(probe.fall);
        if let Some(p) = &self.check_path {
            path.clone_from(p);
        }
        status = self.check_status.unwrap_or(status);
        base.health = match kind {
            "tcp" => HealthCheck::Tcp(probe),
            "http" => HealthCheck::Http {
                probe,
                path,
                expect_status: status,
            },
            _ => HealthCheck::None,
        };
        Ok(base)
    }
}

/// Sends a configuration command; prints what it did and the version it made.
fn commit(socket: &Path, command: &Command, what: &str) -> Result<()> {
    let written: Written = client::post(socket, COMMANDS_PATH, command)?;
    crate::write_stdout(&format!(
        "{what} (configuration version {})\n",
        written.version
    ))
}

fn read_config(socket: &Path) -> Result<ClusterConfig> {
    Ok(client::get(socket, CONFIG_PATH)?)
}

pub(crate) fn cluster(cmd: ClusterCommand) -> Result<()> {
    match cmd {
        ClusterCommand::Init(socket) => {
            let written: Written = client::post(&socket.socket, CLUSTER_INIT_PATH, &())?;
            crate::write_stdout(&format!(
                "initialized a new cluster with this node as its first member (configuration version {})\n",
                written.version
            ))
        }
        ClusterCommand::JoinToken(socket) => {
            let answer: JoinTokenAnswer = client::get(&socket.socket, JOIN_TOKEN_PATH)?;
            crate::write_stdout(&format!("{}\n", answer.token))
        }
        ClusterCommand::StepDown(socket) => {
            let answer: SteppedDown = client::post(&socket.socket, STEP_DOWN_PATH, &())?;
            let leader = answer.leader.as_deref().unwrap_or("unknown");
            crate::write_stdout(&if answer.moved {
                format!("leadership moved: the leader is now {leader}\n")
            } else {
                format!("this node does not lead (the leader is {leader}): nothing to do\n")
            })
        }
    }
}

pub(crate) fn node(cmd: NodeCommand) -> Result<()> {
    match cmd {
        NodeCommand::Add(args) => {
            let spec = NodeSpec {
                name: args.name.clone(),
                addr: args.addr,
                lips: args.lips,
            };
            let written: Written = client::post(&args.socket.socket, NODES_PATH, &spec)?;
            crate::write_stdout(&format!(
                "added node {} at {} as a voter (configuration version {})\n",
                args.name, args.addr, written.version
            ))
        }
        NodeCommand::Remove(args) => {
            let written: Written =
                client::delete(&args.socket.socket, &format!("{NODES_PATH}/{}", args.name))?;
            crate::write_stdout(&format!(
                "removed node {} (configuration version {})\n",
                args.name, written.version
            ))
        }
    }
}

/// `drain NODE` (`drained`) or `undrain NODE`: the node's VIPs are withdrawn (after a moment
/// with the graceful-shutdown community) or announced again; the state is replicated, so it
/// survives restarts.
pub(crate) fn drain(args: DrainArgs, drained: bool) -> Result<()> {
    let config = read_config(&args.socket.socket)?;
    let Some(node) = config.nodes.values().find(|n| n.name == args.name) else {
        bail!("no node named {:?} in the cluster", args.name);
    };
    let what = if drained {
        format!("draining node {}: its VIPs are withdrawn", args.name)
    } else {
        format!("undrained node {}: its VIPs are announced again", args.name)
    };
    commit(
        &args.socket.socket,
        &Command::SetDrain {
            id: node.id,
            drained,
        },
        &what,
    )
}

pub(crate) fn service(cmd: ServiceCommand) -> Result<()> {
    match cmd {
        ServiceCommand::Add(args) => {
            let key = args.service.key();
            let settings = args.settings(ServiceSettings {
                scheduler: Scheduler::default(),
                timeouts: Timeouts::default(),
                toa: false,
                conn_reuse: Default::default(),
                syn_proxy: Default::default(),
                health: HealthCheck::None,
            })?;
            let command = Command::AddService(Service {
                key,
                settings,
                backends: Vec::new(),
            });
            commit(
                &args.socket.socket,
                &command,
                &format!("added service {key}"),
            )
        }
        ServiceCommand::Edit(args) => {
            let key = args.service.key();
            let config = read_config(&args.socket.socket)?;
            let Ok(current) = config.service(&key) else {
                bail!("no service {key}");
            };
            let settings = args.settings(current.settings.clone())?;
            let command = Command::EditService { key, settings };
            commit(
                &args.socket.socket,
                &command,
                &format!("changed service {key}"),
            )
        }
        ServiceCommand::Del(args) => {
            let key = args.service.key();
            commit(
                &args.socket.socket,
                &Command::DelService { key },
                &format!("deleted service {key}"),
            )
        }
        ServiceCommand::List(args) => {
            let config = read_config(&args.socket.socket)?;
            let out = match args.output {
                Output::Text => render::services_text(&config),
                Output::Json => render::json(&config.services)?,
            };
            crate::write_stdout(&out)
        }
    }
}

pub(crate) fn backend(cmd: BackendCommand) -> Result<()> {
    let (args, add) = match cmd {
        BackendCommand::Add(args) => (args, true),
        BackendCommand::Edit(args) => (args, false),
        BackendCommand::Del(args) => {
            let service = args.service.key();
            return commit(
                &args.socket.socket,
                &Command::DelBackend {
                    service,
                    addr: args.real_server,
                },
                &format!("deleted backend {} from {service}", args.real_server),
            );
        }
    };
    let service = args.service.key();
    let backend = Backend {
        addr: args.real_server,
        weight: args.weight,
    };
    let (command, what) = if add {
        (
            Command::AddBackend { service, backend },
            format!("added backend {} to {service}", backend.addr),
        )
    } else {
        (
            Command::EditBackend { service, backend },
            format!(
                "set the weight of backend {} of {service} to {}",
                backend.addr, backend.weight
            ),
        )
    };
    commit(&args.socket.socket, &command, &what)
}

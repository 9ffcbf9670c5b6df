//! The `lbcluster` binary: the node daemon (`run`), the operator commands that talk to it over
//! its admin API (`status`, `sessions`, and the cluster's `cluster`, `node`, `service` and
//! `backend` commands), `config check`, `tls` (the cluster CA and node certificates), and
//! `replay`, which runs the Full-NAT engine over a built-in packet trace.
//!
//! Exit codes: 0 success; 1 failure (for `status`: degraded — a node unreachable or a backend
//! down); 2 usage error (for `status`: critical — the cluster has no quorum); 3 the node cannot
//! be reached.

mod admin;
mod announce;
mod api;
mod client;
mod clock;
mod cluster;
mod config;
mod daemon;
mod health;
mod history;
mod manage;
mod metrics;
mod packet_io;
mod page;
mod quic;
mod render;
mod replay;
mod source;
mod state;
mod sync;
mod tls;

use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::api::{Health, NodeStatus, SESSIONS_PATH, STATUS_PATH, SessionList};
use crate::client::ClientError;

/// A node is unreachable or a backend is down (`status`).
const EXIT_DEGRADED: u8 = 1;
/// The cluster has no quorum (`status`).
const EXIT_CRITICAL: u8 = 2;
/// The node cannot be reached or did not answer.
const EXIT_UNREACHABLE: u8 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "lbcluster",
    version,
    about = "A Full-NAT Layer-4 load balancer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node daemon until SIGTERM or SIGINT; SIGHUP reloads the services.
    Run(RunArgs),
    /// Show the cluster's nodes (name, address, reachable, Raft role, term, commit and applied
    /// index, config version), then this node's services, backend health, sessions and drops.
    /// Exits 0 when healthy, 1 when degraded (a node unreachable, or a backend down), 2 when
    /// the cluster has no quorum, 3 when the node cannot be reached.
    Status(StatusArgs),
    /// List the node's sessions like `ipvsadm -Lnc`, with the local address (LIP) column.
    Sessions(SessionsArgs),
    /// Start a cluster, hand its leadership over, or print its join token.
    #[command(subcommand)]
    Cluster(manage::ClusterCommand),
    /// Add or remove cluster nodes.
    #[command(subcommand)]
    Node(manage::NodeCommand),
    /// Add, change, delete or list the cluster's virtual services.
    #[command(subcommand)]
    Service(manage::ServiceCommand),
    /// Add, change or delete a service's backends.
    #[command(subcommand)]
    Backend(manage::BackendCommand),
    /// Drain a node: announce its VIPs with the graceful-shutdown community (65535:0), wait,
    /// then withdraw them; its established flows carry on through the other nodes.
    Drain(manage::DrainArgs),
    /// Undo `drain`: the node announces its VIPs again.
    Undrain(manage::DrainArgs),
    /// Work with config files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Replay a generated packet trace through the Full-NAT engine and print its counters,
    /// per-backend connections, local port usage and sessions.
    Replay(ReplayArgs),
    /// Create the cluster CA and node certificates for the nodes' mutual-TLS QUIC endpoint.
    #[command(subcommand)]
    Tls(TlsCommand),
}

#[derive(Debug, Subcommand)]
enum TlsCommand {
    /// The cluster certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Node certificates.
    #[command(subcommand)]
    Cert(CertCommand),
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create a cluster CA: DIR/ca.pem and DIR/ca.key (mode 0600).
    Create(CaCreateArgs),
}

#[derive(Debug, Args)]
struct CaCreateArgs {
    /// The directory for ca.pem and ca.key (created with mode 0700 if missing).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// The CA's common name.
    #[arg(long, default_value = "lbcluster cluster CA")]
    name: String,
    /// Validity in days.
    #[arg(long, default_value_t = 3650, value_parser = clap::value_parser!(u32).range(1..=36_500))]
    days: u32,
    /// Replace existing ca.pem and ca.key (every node certificate signed by the old CA stops
    /// being trusted).
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Create a node certificate signed by the cluster CA: NAME.pem and NAME.key (mode 0600),
    /// for both ends of mutual TLS, naming the node (DNS SAN and CN) and its addresses (IP SANs).
    Create(CertCreateArgs),
    /// Check a node's certificate and key against the cluster CA: load them as the daemon does
    /// and complete a mutual-TLS QUIC handshake with itself on loopback on every protocol.
    Check(CertCheckArgs),
}

#[derive(Debug, Args)]
struct CertCheckArgs {
    /// The directory holding the cluster CA certificate (ca.pem).
    #[arg(long, value_name = "DIR")]
    ca_dir: PathBuf,
    /// The node whose NAME.pem and NAME.key to check.
    #[arg(long, value_name = "NAME", value_parser = parse_node_name)]
    node: String,
    /// The directory holding NAME.pem and NAME.key [default: the CA directory].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct CertCreateArgs {
    /// The directory holding the cluster CA (ca.pem, ca.key).
    #[arg(long, value_name = "DIR")]
    ca_dir: PathBuf,
    /// The node's name, its identity in the cluster (a lowercase DNS name).
    #[arg(long, value_name = "NAME", value_parser = parse_node_name)]
    node: String,
    /// The node's IP addresses (one or more; repeat --ip or list them after it).
    #[arg(long = "ip", value_name = "ADDR", required = true, num_args = 1..)]
    ips: Vec<IpAddr>,
    /// Where to write NAME.pem and NAME.key [default: the CA directory].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Validity in days (never past the CA's own expiry).
    #[arg(long, default_value_t = 825, value_parser = clap::value_parser!(u32).range(1..=36_500))]
    days: u32,
    /// Replace existing NAME.pem and NAME.key.
    #[arg(long)]
    force: bool,
}

fn parse_node_name(s: &str) -> Result<String, String> {
    tls::validate_node_name(s).map(|()| s.to_owned())
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The node's config file (TOML).
    #[arg(long, short = 'c')]
    config: PathBuf,
}

#[derive(Debug, Args)]
struct SocketArg {
    /// The node's admin socket.
    #[arg(long, default_value = config::DEFAULT_SOCKET)]
    socket: PathBuf,
}

#[derive(Debug, Args)]
struct StatusArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// Only this node's own view of the cluster: no linearizable read, no peer reports.
    #[arg(long)]
    local: bool,
    /// `bgp`: every node's BGP sessions (peer, ASN, state, since, BFD, routes exported) and
    /// announcements instead of the overview.
    #[arg(value_enum)]
    view: Option<StatusView>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Debug, Args)]
struct SessionsArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// Only the sessions of this VIP and port.
    #[arg(long, value_name = "ADDR:PORT")]
    vip: Option<SocketAddr>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Check a config file; explain the first error and exit 1 if it has one.
    Check {
        /// The config file (TOML).
        file: PathBuf,
    },
}

#[derive(Debug, Args)]
struct ReplayArgs {
    /// Client flows to generate (TCP and UDP, IPv4 and IPv6).
    // Capped so that the IPv4 TCP flows never run out of local ports on the single LIP.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=50_000))]
    flows: u32,
    /// Seed of the generated client addresses, ports and payload sizes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StatusView {
    Bgp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lbcluster: error: {e:#}");
            let unreachable = matches!(
                e.downcast_ref::<ClientError>(),
                Some(ClientError::Unreachable(_) | ClientError::Failed(_))
            );
            ExitCode::from(if unreachable { EXIT_UNREACHABLE } else { 1 })
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run(args) => {
            daemon::run(&args.config)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status(args) => {
            let path = if args.local {
                format!("{STATUS_PATH}?local=true")
            } else {
                STATUS_PATH.to_owned()
            };
            let status: NodeStatus = client::get(&args.socket.socket, &path)?;
            let out = match (args.output, args.view) {
                (Output::Text, None) => render::status_text(&status),
                (Output::Text, Some(StatusView::Bgp)) => render::bgp_text(&status),
                (Output::Json, _) => render::json(&status)?,
            };
            write_stdout(&out)?;
            Ok(match status.health() {
                Health::Critical => ExitCode::from(EXIT_CRITICAL),
                Health::Degraded => ExitCode::from(EXIT_DEGRADED),
                Health::Healthy => ExitCode::SUCCESS,
            })
        }
        Command::Cluster(cmd) => manage::cluster(cmd).map(|()| ExitCode::SUCCESS),
        Command::Node(cmd) => manage::node(cmd).map(|()| ExitCode::SUCCESS),
        Command::Service(cmd) => manage::service(cmd).map(|()| ExitCode::SUCCESS),
        Command::Backend(cmd) => manage::backend(cmd).map(|()| ExitCode::SUCCESS),
        Command::Drain(args) => manage::drain(args, true).map(|()| ExitCode::SUCCESS),
        Command::Undrain(args) => manage::drain(args, false).map(|()| ExitCode::SUCCESS),
        Command::Sessions(args) => {
            let path = match args.vip {
                Some(vip) => format!("{SESSIONS_PATH}?vip={vip}"),
                None => SESSIONS_PATH.to_owned(),
            };
            let list: SessionList = client::get(&args.socket.socket, &path)?;
            let out = match args.output {
                Output::Text => render::sessions_text(&list),
                Output::Json => render::json(&list)?,
            };
            write_stdout(&out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(ConfigCommand::Check { file }) => {
            let config = config::load(&file, 1)?;
            let backends: usize = config
                .services
                .services
                .iter()
                .map(|s| s.config.backends.len())
                .sum();
            write_stdout(&format!(
                "{}: ok (node {}, {} services, {} backends)\n",
                file.display(),
                config.node.name,
                config.services.services.len(),
                backends
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Replay(args) => {
            let report = replay::run(replay::Params {
                flows: args.flows,
                seed: args.seed,
            })
            .context("replay failed")?;
            let out = match args.output {
                Output::Text => render::text(&report),
                Output::Json => render::json(&report)?,
            };
            write_stdout(&out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Tls(TlsCommand::Ca(CaCommand::Create(args))) => {
            let written = tls::create_ca(&args.dir, &args.name, args.days, args.force)?;
            write_stdout(&format!(
                "created cluster CA {:?}: {} (key {}), valid until {}\n",
                args.name,
                written.cert.display(),
                written.key.display(),
                written.not_after.date()
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Tls(TlsCommand::Cert(CertCommand::Create(args))) => {
            let out = args.out.as_deref().unwrap_or(&args.ca_dir);
            let written = tls::create_node_cert(
                &args.ca_dir,
                &args.node,
                &args.ips,
                out,
                args.days,
                args.force,
            )?;
            let ips: Vec<String> = args.ips.iter().map(ToString::to_string).collect();
            write_stdout(&format!(
                "created certificate for node {} ({}): {} (key {}), valid until {}\n",
                args.node,
                ips.join(", "),
                written.cert.display(),
                written.key.display(),
                written.not_after.date()
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Tls(TlsCommand::Cert(CertCommand::Check(args))) => {
            let dir = args.dir.as_deref().unwrap_or(&args.ca_dir);
            let cert = dir.join(format!("{}.pem", args.node));
            let identity = quic::NodeTls::load(
                &args.ca_dir.join(tls::CA_CERT_FILE),
                &cert,
                &dir.join(format!("{}.key", args.node)),
            )?;
            if identity.name() != args.node {
                anyhow::bail!(
                    "{} is a certificate for node {}, not {}",
                    cert.display(),
                    identity.name(),
                    args.node
                );
            }
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(quic::self_check(&identity))
                .with_context(|| format!("{} fails the mutual-TLS check", cert.display()))?;
            let alpns: Vec<_> = quic::ALPNS
                .iter()
                .map(|a| String::from_utf8_lossy(a))
                .collect();
            write_stdout(&format!(
                "{}: ok: node {}, signed by the cluster CA, completes a mutual-TLS QUIC handshake ({})\n",
                cert.display(),
                args.node,
                alpns.join(", ")
            ))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Writes the whole output; a reader that went away (`| head`) is not an error.
fn write_stdout(s: &str) -> Result<()> {
    let mut out = io::stdout().lock();
    match out.write_all(s.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing to stdout"),
    }
}

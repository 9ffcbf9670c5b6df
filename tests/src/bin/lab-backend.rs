//! `lab-backend`: the real server the lab runs in every backend namespace, and its clients.
//!
//! * `lab-backend serve --name b1` — HTTP on 8080, TCP echo on 9000, UDP echo on 5353, on `::`
//!   (IPv4 and IPv6); prints `ready` on stdout once every socket is bound, logs each TCP
//!   connection's peer to stderr.
//! * `lab-backend http-get ADDR PATH` — prints the body of a 200 answer (fails otherwise).
//! * `lab-backend tcp-echo ADDR MESSAGE`, `lab-backend udp-echo ADDR MESSAGE` — print the echo.
//! * `lab-backend tcp-echo-check ADDR BYTES` — sends BYTES bytes of a pattern through a TCP echo
//!   server, fails unless exactly they come back.
//! * `lab-backend streams ADDR --conns N --seconds S [--interval-ms I]` — N long-lived
//!   connections through a TCP echo server with content checks for S seconds; prints a JSON
//!   report (resets, content errors, stalls, bytes verified) and fails unless all completed.
//! * `lab-backend load --streams-to ADDR --conns N --http-to ADDR --rate R --seconds S` — the
//!   streams above plus R new short HTTP connections per second; prints a JSON report.
//!
//! `load` and `streams` end early, as if their time were up, on SIGUSR1.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use tests::backend::{self, Backend};
use tests::{load, streams};

#[derive(Debug, Parser)]
#[command(about = "The lab's backend server and its clients")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Client timeout in milliseconds.
    #[arg(long, global = true, default_value_t = 3000)]
    timeout_ms: u64,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve HTTP (8080), TCP echo (9000) and UDP echo (5353) on all addresses.
    Serve {
        /// The name `GET /` answers with.
        #[arg(long)]
        name: String,
    },
    /// GET a path and print the body.
    HttpGet { addr: SocketAddr, path: String },
    /// Send a message to a TCP echo server and print the answer.
    TcpEcho { addr: SocketAddr, message: String },
    /// Send BYTES bytes of a pattern through a TCP echo server; fail unless they come back.
    TcpEchoCheck { addr: SocketAddr, bytes: usize },
    /// Like tcp-echo-check, then abort the connection with a RST instead of closing it.
    TcpEchoReset { addr: SocketAddr, bytes: usize },
    /// Send a message to a UDP echo server and print the answer.
    UdpEcho { addr: SocketAddr, message: String },
    /// Long-lived streams and new short HTTP connections at a rate; print a JSON report.
    Load {
        #[arg(long)]
        streams_to: SocketAddr,
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=2000))]
        conns: u32,
        #[arg(long)]
        http_to: SocketAddr,
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=5000))]
        rate: u32,
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
        seconds: u64,
    },
    /// New short HTTP connections (`GET /`) at a rate; print every one as JSON (`each`).
    Short {
        addr: SocketAddr,
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=5000))]
        rate: u32,
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
        seconds: u64,
    },
    /// Send TCP SYNs from spoofed lab addresses (198.18.1.100-249) to ADDR as fast as one raw
    /// socket can, for SECONDS or MAX_PACKETS; print what was sent as JSON. IPv4 lab
    /// addresses only.
    SynFlood {
        addr: std::net::SocketAddrV4,
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=120))]
        seconds: u64,
        #[arg(long, default_value_t = 10_000_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
        max_packets: u64,
    },
    /// Keep long-lived connections through a TCP echo server, checking every byte; print a
    /// JSON report.
    Streams {
        addr: SocketAddr,
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=2000))]
        conns: u32,
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
        seconds: u64,
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        interval_ms: u64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let timeout = Duration::from_millis(cli.timeout_ms);
    let output = match cli.command {
        Command::Serve { name } => {
            Backend::bind_default(&name)?.start();
            println!("ready");
            std::io::stdout().flush()?;
            loop {
                std::thread::park();
            }
        }
        Command::HttpGet { addr, path } => backend::http_get(addr, &path, timeout)?,
        Command::TcpEcho { addr, message } => backend::tcp_echo(addr, message.as_bytes(), timeout)?,
        Command::TcpEchoCheck { addr, bytes } => {
            backend::tcp_echo_check(addr, bytes, timeout)?;
            format!("{bytes} bytes echoed intact\n").into_bytes()
        }
        Command::TcpEchoReset { addr, bytes } => {
            backend::tcp_echo_reset(addr, bytes, timeout)?;
            format!("{bytes} bytes echoed intact, then reset\n").into_bytes()
        }
        Command::UdpEcho { addr, message } => backend::udp_echo(addr, message.as_bytes(), timeout)?,
        Command::Load {
            streams_to,
            conns,
            http_to,
            rate,
            seconds,
        } => {
            streams::stop_on_sigusr1()?;
            let report = load::run(load::LoadSpec {
                streams_target: streams_to,
                streams: conns as usize,
                http_target: http_to,
                rate,
                duration: Duration::from_secs(seconds),
            });
            println!("{report}");
            Vec::new()
        }
        Command::Short {
            addr,
            rate,
            seconds,
        } => {
            let each = load::short_connections(addr, rate, Duration::from_secs(seconds));
            println!("{}", serde_json::json!({ "each": each }));
            Vec::new()
        }
        Command::SynFlood {
            addr,
            seconds,
            max_packets,
        } => {
            let (sent, took) = tests::flood::syn_flood(addr, seconds, max_packets)?;
            println!(
                "{}",
                serde_json::json!({
                    "packets": sent,
                    "seconds": took.as_secs_f64(),
                    "pps": sent as f64 / took.as_secs_f64().max(1e-9),
                })
            );
            Vec::new()
        }
        Command::Streams {
            addr,
            conns,
            seconds,
            interval_ms,
        } => {
            streams::stop_on_sigusr1()?;
            let reports = streams::run(
                addr,
                conns as usize,
                Duration::from_secs(seconds),
                Duration::from_millis(interval_ms),
            );
            let summary = streams::to_json(&reports);
            println!("{summary}");
            anyhow::ensure!(
                summary["completed"] == conns,
                "not every connection completed"
            );
            Vec::new()
        }
    };
    std::io::stdout().write_all(&output)?;
    Ok(())
}

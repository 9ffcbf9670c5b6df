//! The `lbcluster` binary. Until the node daemon lands it has one command, `replay`, which runs
//! the Full-NAT engine over a built-in packet trace and prints what the engine did.

#[path = "io/mod.rs"]
mod packet_io; // `io` would clash with `use std::io`.
mod render;
mod replay;

use std::io::{self, Write};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

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
    /// Replay a generated packet trace through the Full-NAT engine and print its counters,
    /// per-backend connections, local port usage and sessions.
    Replay(ReplayArgs),
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
enum Output {
    Text,
    Json,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbcluster: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
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
            write_stdout(&out)
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

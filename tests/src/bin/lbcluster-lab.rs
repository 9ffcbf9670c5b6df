//! `lbcluster-lab`: builds, shows and removes a lab topology (DESIGN §9) from the shell.
//!
//! * `lbcluster-lab up [--nodes N] [--backends M] [--prefix P]` — builds it, starts the
//!   backends, prints what it created, and leaves it running.
//! * `lbcluster-lab status --prefix P` — the namespaces, their addresses and processes.
//! * `lbcluster-lab down --prefix P` — kills the lab's processes and removes its namespaces.
//!
//! Needs root and the Debian packages `iproute2`, `ethtool` and `procps`; `lab-backend` must be
//! built next to this binary (`cargo build -p tests --bins`).

use anyhow::Result;
use clap::{Parser, Subcommand};
use tests::lab::{Lab, LabSpec, unique_prefix};

#[derive(Debug, Parser)]
#[command(about = "Build, show and remove lbcluster lab topologies (network namespaces)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build a lab and leave it running.
    Up {
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        #[arg(long, default_value_t = 2)]
        backends: usize,
        /// Namespace prefix (lowercase letters and digits); a unique one by default.
        #[arg(long)]
        prefix: Option<String>,
    },
    /// Remove everything a lab created.
    Down {
        #[arg(long)]
        prefix: String,
    },
    /// Show a lab's namespaces, addresses and processes.
    Status {
        #[arg(long)]
        prefix: String,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Up {
            nodes,
            backends,
            prefix,
        } => {
            let prefix = prefix.unwrap_or_else(unique_prefix);
            let lab = Lab::up_with_prefix(LabSpec { nodes, backends }, &prefix)?;
            print!("{}", lab.describe());
            println!("enter a namespace: ip netns exec {} bash", lab.ns("client"));
            println!("remove it:         lbcluster-lab down --prefix {prefix}");
            lab.detach();
        }
        Command::Down { prefix } => {
            let removed = Lab::cleanup_stale(&prefix)?;
            if removed.is_empty() {
                println!("no namespaces with prefix {prefix}-");
            }
            for ns in removed {
                println!("removed {ns}");
            }
        }
        Command::Status { prefix } => {
            let status = Lab::status(&prefix)?;
            if status.is_empty() {
                println!("no namespaces with prefix {prefix}-");
            }
            print!("{status}");
        }
    }
    Ok(())
}

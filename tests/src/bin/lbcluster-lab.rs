//! `lbcluster-lab`: builds, shows and removes a lab topology (DESIGN §9) from the shell.
//!
//! * `lbcluster-lab up [--nodes N] [--backends M] [--prefix P]` — builds it, starts the
//!   backends, prints what it created, and leaves it running.
//! * `lbcluster-lab status --prefix P` — the namespaces, their addresses and processes.
//! * `lbcluster-lab down --prefix P` — kills the lab's processes and removes its namespaces.
//! * `lbcluster-lab demo [--requests N]` — the README's main job: a lab with one lbcluster node
//!   in front of two backends, real HTTP and UDP traffic from the client through the VIPs, then
//!   `lbcluster status` and `lbcluster sessions`; everything is removed at the end.
//!
//! Needs root and the Debian packages `iproute2`, `ethtool` and `procps`; `lab-backend` must be
//! built next to this binary (`cargo build -p tests --bins`).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use anyhow::Result;
use clap::{Parser, Subcommand};
use tests::lab::{Lab, LabSpec, unique_prefix};
use tests::site::{Site, VIP, VIP6};

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
    /// Run a node in a lab, send traffic through its VIPs, show `lbcluster status`, clean up.
    Demo {
        /// HTTP requests to send through each VIP.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        requests: u32,
        /// Scheduler of the TCP services.
        #[arg(long, default_value = "maglev")]
        scheduler: String,
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
        Command::Demo {
            requests,
            scheduler,
        } => demo(requests, &scheduler)?,
    }
    Ok(())
}

fn demo(requests: u32, scheduler: &str) -> Result<()> {
    println!("== building the lab: client, router, node n1 running lbcluster, backends b1 and b2");
    let site = Site::start(scheduler)?;
    print!("{}", site.lab.describe());
    for vip in [IpAddr::V4(VIP), IpAddr::V6(VIP6)] {
        println!("\n== {requests} HTTP requests from the client to {vip}:80");
        let mut answers: BTreeMap<String, u32> = BTreeMap::new();
        for _ in 0..requests {
            let who = site.get(vip, "/")?.trim().to_owned();
            *answers.entry(who).or_default() += 1;
        }
        for (backend, n) in &answers {
            println!("   {backend} answered {n}");
        }
        println!(
            "   the backend saw the request from {}",
            site.get(vip, "/whoami")?.trim().replace('\n', ", ")
        );
    }
    println!("\n== UDP through {VIP}:53");
    let echo = site
        .lab
        .udp_echo("client", SocketAddr::new(VIP.into(), 53), "hello")?;
    println!("   sent hello, got {echo}");
    println!("\n== lbcluster status");
    let status = site.status(false)?;
    print!("{}", String::from_utf8_lossy(&status.stdout));
    eprint!("{}", String::from_utf8_lossy(&status.stderr));
    println!("\n== lbcluster sessions");
    print!("{}", site.sessions()?);
    println!("\n== removing the lab");
    Ok(())
}

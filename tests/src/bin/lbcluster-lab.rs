//! `lbcluster-lab`: builds, shows and removes a lab topology (DESIGN §9) from the shell.
//!
//! * `lbcluster-lab up [--nodes N] [--backends M] [--prefix P]` — builds it, starts the
//!   backends, prints what it created, and leaves it running.
//! * `lbcluster-lab status --prefix P` — the namespaces, their addresses and processes.
//! * `lbcluster-lab down --prefix P` — kills the lab's processes and removes its namespaces.
//! * `lbcluster-lab demo [--requests N] [--scheduler S]` — the README's main job: a lab with a
//!   three-node lbcluster cluster in front of two backends, configured with `lbcluster`
//!   commands through every node, real HTTP and UDP traffic from the client through the VIP,
//!   then `lbcluster service list`, `status` and `sessions`; everything is removed at the end.
//!
//! * `lbcluster-lab scenario hard-failure|restart-after-failure|scale-out|drain-and-remove|rolling-restart`
//!   — one failover scenario under load, its timeline and figures.
//!
//! Needs root and the lab's Debian packages (`scripts/packages`, set `lab`, which `scripts/demo`
//! installs); `lab-backend` must be built next to this binary (`cargo build -p tests --bins`).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::time::Duration;

use tests::bgp::BgpOptions;
use tests::cluster::{ClusterOptions, ClusterSite};
use tests::lab::{Lab, LabSpec, unique_prefix};
use tests::scenarios::{self, Scenario};
use tests::site::VIP;

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
    /// Run a failover scenario under load (500 streams, 500 new connections/s) in a lab of
    /// its own and print what happened and the load's figures.
    Scenario {
        #[arg(value_enum)]
        name: Scenario,
    },
    /// The SYN-flood benchmark: one node (50,000 sessions), legitimate clients at RATE new
    /// connections/s before, during and after a flood of spoofed SYNs; prints the report.
    Flood {
        /// `syn_proxy` of the flooded service: off, on or auto.
        #[arg(long, default_value = "auto", value_parser = ["off", "on", "auto"])]
        syn_proxy: String,
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=120))]
        flood_seconds: u64,
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
        rate: u32,
    },
    /// Run a three-node cluster in a lab, configure it, send traffic through its VIP, show
    /// `lbcluster status`, clean up.
    Demo {
        /// HTTP requests to send through each VIP.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        requests: u32,
        /// Scheduler of the TCP service (mh, wrr, wlc, rr, sh).
        #[arg(long, default_value = "mh")]
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
        Command::Scenario { name } => {
            println!("== scenario {name:?}: building the lab, starting the load");
            let report = scenarios::run(name)?;
            for line in &report.timeline {
                println!("   {line}");
            }
            println!("   {}", report.summary());
            println!(
                "{}",
                serde_json::to_string_pretty(&report.load["short"]["failures"])?
            );
        }
        Command::Demo {
            requests,
            scheduler,
        } => demo(requests, &scheduler)?,
        Command::Flood {
            syn_proxy,
            flood_seconds,
            rate,
        } => {
            let syn_proxy = match syn_proxy.as_str() {
                "off" => "off",
                "on" => "on",
                _ => "auto",
            };
            let report = tests::flood::run(tests::flood::FloodSpec {
                syn_proxy,
                before: Duration::from_secs(10),
                flood: Duration::from_secs(flood_seconds),
                after: Duration::from_secs(15),
                rate,
                max_packets: 100_000_000,
            })?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
    }
    Ok(())
}

fn demo(requests: u32, scheduler: &str) -> Result<()> {
    println!(
        "== building the lab: client, router (BIRD, ECMP), nodes n1-n3 (lbcluster + BIRD, BFD), \
         backends b1 and b2; a cluster CA and node certificates (`lbcluster tls`); `lbcluster \
         cluster init` on n1 (its file's service {VIP}:80), `lbcluster cluster join-token` into \
         the token files of n2 and n3, `lbcluster node add` n2 and n3"
    );
    let site = ClusterSite::start_with(ClusterOptions {
        nodes: 3,
        members: 3,
        backends: 2,
        bgp: Some(BgpOptions { bfd: true }),
    })?;
    print!("{}", site.lab.describe());
    println!("\n== waiting for the router's BGP route to the VIP over all three nodes");
    let took = site
        .lab
        .wait_next_hops(IpAddr::V4(VIP), &[1, 2, 3], Duration::from_secs(30))?;
    let hops: Vec<String> = site
        .lab
        .router_next_hops(IpAddr::V4(VIP))?
        .iter()
        .map(ToString::to_string)
        .collect();
    println!("   after {took:?}: {VIP} via {}", hops.join(", "));
    let vip80 = format!("{VIP}:80");
    let vip53 = format!("{VIP}:53");
    let mut changes: Vec<Vec<String>> = vec![
        vec![
            "service".into(),
            "edit".into(),
            "-t".into(),
            vip80.clone(),
            "-s".into(),
            scheduler.into(),
        ],
        vec![
            "service".into(),
            "add".into(),
            "-u".into(),
            vip53.clone(),
            "-s".into(),
            "rr".into(),
        ],
    ];
    for j in 1..=2 {
        let backend = format!("{}:5353", site.lab.backend_addr(j));
        changes.push(vec![
            "backend".into(),
            "add".into(),
            "-u".into(),
            vip53.clone(),
            "-r".into(),
            backend,
        ]);
    }
    for (i, change) in changes.iter().enumerate() {
        // Through every node in turn: followers forward to the leader.
        let k = i % 3 + 1;
        let args: Vec<&str> = change.iter().map(String::as_str).collect();
        println!("\n== on n{k}: lbcluster {}", args.join(" "));
        print!("   {}", site.cli(k, &args)?.ok()?);
    }
    println!("\n== {requests} HTTP requests from the client to {vip80} (ECMP over n1-n3)");
    let mut answers: BTreeMap<String, u32> = BTreeMap::new();
    let addr = SocketAddr::new(IpAddr::V4(VIP), 80);
    for _ in 0..requests {
        let who = site.lab.http_get("client", addr, "/")?.trim().to_owned();
        *answers.entry(who).or_default() += 1;
    }
    for (backend, n) in &answers {
        println!("   {backend} answered {n}");
    }
    println!(
        "   the backend saw the request from {}",
        site.lab
            .http_get("client", addr, "/whoami")?
            .trim()
            .replace('\n', ", ")
    );
    println!("\n== UDP through {vip53}");
    let echo = site
        .lab
        .udp_echo("client", SocketAddr::new(VIP.into(), 53), "hello")?;
    println!("   sent hello, got {echo}");
    println!("\n== lbcluster service list (on n3)");
    print!("{}", site.cli(3, &["service", "list"])?.ok()?);
    println!("\n== lbcluster status (on n1)");
    let status = site.cli(1, &["status"])?;
    print!("{}", status.stdout);
    eprint!("{}", status.stderr);
    println!("\n== lbcluster status bgp (on n2)");
    print!("{}", site.cli(2, &["status", "bgp"])?.ok()?);
    println!("\n== lbcluster sessions (on n1)");
    print!("{}", site.cli(1, &["sessions"])?.ok()?);
    println!("\n== removing the lab");
    Ok(())
}

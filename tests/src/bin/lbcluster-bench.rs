//! `lbcluster-bench`: the lab benchmark. Builds a lab (client → router → n1 → router → b1),
//! measures TCP throughput (iperf3) and the small-packet UDP rate through kernel routing,
//! nftables Full-NAT, HAProxy and lbcluster on n1, prints the figures and their ratios, and
//! removes the lab. See `tests::bench`.
//!
//! `lbcluster-bench [--seconds S | --quick] [--uplink-tx-offload]`. Needs root; installs the
//! Debian packages of the programs it runs with apt-get when missing (`tests::bench::PROGRAMS`);
//! `lbcluster` and `lab-backend` must be built next to it (`cargo build --release -p node -p
//! tests`).

use anyhow::Result;
use clap::Parser;
use tests::bench::{Bench, Cli, install_missing, render, run_helper};

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(helper) = &cli.command {
        return run_helper(helper);
    }
    install_missing()?;
    let bench = Bench::start(cli.seconds(), cli.uplink_tx_offload)?;
    print!("{}", render(&bench.run()));
    Ok(())
}

//! The lab: network-namespace topologies for end-to-end tests and the demo (DESIGN §9).
//!
//! * [`lab`] builds and removes the topology (client, router, N one-armed nodes, M backends
//!   behind the router) and runs processes inside it.
//! * [`bgp`] runs BIRD in the router and the nodes: BGP with ECMP, optionally BFD.
//! * [`site`] is the lab with a running lbcluster node in front of two backends.
//! * [`observe`] runs Prometheus and headless Chromium against a cluster site.
//! * [`backend`] is the real server the lab runs in every backend namespace (HTTP on 8080, TCP
//!   echo on 9000, UDP echo on 5353) and the matching clients; the `lab-backend` binary wraps it.
//!
//! Binaries: `lbcluster-lab` (`up`, `down`, `status`) and `lab-backend` (`serve`, `http-get`,
//! `tcp-echo`, `tcp-echo-check`, `udp-echo`).
//!
//! Needs root and the programs of [`tools::TOOLS`], each from its Debian package
//! (`scripts/packages`; `scripts/demo` and `scripts/test` install them).

pub mod backend;
pub mod bench;
pub mod bgp;
pub mod cluster;
pub mod deploy;
pub mod flood;
pub mod lab;
pub mod load;
pub mod observe;
pub mod scenarios;
pub mod site;
pub mod streams;
pub mod tools;

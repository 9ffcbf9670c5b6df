//! The lab's routing layer with real BIRD and no lbcluster: each node's BIRD announces the VIPs
//! from a static protocol (a config written here, in the TESTBED style); the router's BIRD
//! turns them into one multipath kernel route, and drops a node's next hop when its BIRD dies
//! or, with BFD, when its link goes silently dead. Needs root and bird2; times are printed,
//! only generous bounds are asserted.

use std::net::IpAddr;
use std::time::Duration;

use tests::bgp::{BFD_INTERVAL_MS, BFD_MULTIPLIER, Bgp, BgpOptions, HOLD_SECS, KEEPALIVE_SECS};
use tests::lab::{Lab, LabSpec, NODE_UPLINK_IF};
use tests::site::{VIP, VIP6};

const NODES: usize = 3;
/// Sessions come up within a few seconds (connect retry 1 s).
const ESTABLISHED: Duration = Duration::from_secs(15);
/// Routes follow an Established session or a closed one within milliseconds.
const ROUTES: Duration = Duration::from_secs(5);

/// Node k's BIRD config: the VIPs as blackhole routes in a static protocol, exported to the
/// router over one IPv4 session with ipv4 and ipv6 channels.
fn node_config(lab: &Lab, k: usize, bfd: bool) -> String {
    let (uplink, gateway) = (lab.node_uplink(k), lab.node_gateway(k));
    let bfd_protocol = if bfd {
        format!(
            "protocol bfd {{ interface \"{NODE_UPLINK_IF}\" {{ min rx interval {BFD_INTERVAL_MS} ms; \
             min tx interval {BFD_INTERVAL_MS} ms; multiplier {BFD_MULTIPLIER}; }}; }}\n"
        )
    } else {
        String::new()
    };
    format!(
        r#"router id {uplink};
log stderr all;
protocol device {{ }}
protocol static vip4 {{ ipv4; route {VIP}/32 blackhole; }}
protocol static vip6 {{ ipv6; route {VIP6}/128 blackhole; }}
{bfd_protocol}protocol bgp upstream {{
  local {uplink} as 65100; neighbor {gateway} as 65000;
  hold time {HOLD_SECS}; keepalive time {KEEPALIVE_SECS};
  start delay time 1; connect retry time 1; error wait time 1, 3;
  ipv4 {{ import none; export where proto = "vip4"; }};
  ipv6 {{ import none; export where proto = "vip6"; }};
  bfd {bfd_on};
}}
"#,
        bfd_on = if bfd { "on" } else { "off" },
    )
}

/// A lab of three nodes and one backend, every node's BIRD announcing the VIPs, all sessions
/// Established and the VIPs routed over all three nodes.
fn up(bfd: bool) -> (Lab, Bgp) {
    let lab = Lab::up(LabSpec {
        nodes: NODES,
        backends: 1,
    })
    .expect("lab up");
    for k in 1..=NODES {
        std::fs::write(lab.node_bird_config(k), node_config(&lab, k, bfd)).unwrap();
    }
    let bgp = Bgp::start(&lab, BgpOptions { bfd }).expect("BIRD up");
    let took = lab
        .wait_bgp_established(ESTABLISHED)
        .unwrap_or_else(|e| panic!("{e:#}\n--- router BIRD:\n{}", bgp.router_log()));
    println!("all {NODES} sessions Established after {took:?}");
    for vip in [IpAddr::V4(VIP), IpAddr::V6(VIP6)] {
        let took = lab
            .wait_next_hops(vip, &[1, 2, 3], ROUTES)
            .unwrap_or_else(|e| panic!("{e:#}\n{}", lab.router_routes(vip.is_ipv6()).unwrap()));
        println!("{vip}: 3 next hops {took:?} later");
    }
    (lab, bgp)
}

/// The router learns the VIPs from every node and installs one route with three next hops;
/// killing a node's BIRD removes its next hop (the TCP session closes), and a new BIRD brings
/// it back.
#[test]
fn bird_kill_removes_the_next_hop() {
    let (lab, mut bgp) = up(false);
    assert!(
        lab.router_birdc(&["show", "route", "count"])
            .unwrap()
            .contains("6 of 6 routes"),
        "{}",
        lab.router_birdc(&["show", "route"]).unwrap()
    );

    bgp.kill_node_bird(2);
    for vip in [IpAddr::V4(VIP), IpAddr::V6(VIP6)] {
        let took = lab.wait_next_hops(vip, &[1, 3], ROUTES).unwrap();
        println!("{vip}: n2's BIRD killed, its next hop gone after {took:?}");
    }

    bgp.start_node_bird(&lab, 2).unwrap();
    for vip in [IpAddr::V4(VIP), IpAddr::V6(VIP6)] {
        let took = lab
            .wait_next_hops(vip, &[1, 2, 3], ESTABLISHED)
            .unwrap_or_else(|e| panic!("{e:#}\n--- n2 BIRD:\n{}", bgp.node_log(2)));
        println!("{vip}: n2's BIRD restarted, its next hop back after {took:?}");
    }
}

/// With BFD 100 ms × 3, a node whose BGP and BFD traffic is silently dropped leaves the VIP's
/// next hops well before the 3 s hold timer would expire.
#[test]
fn bfd_removes_a_silent_node() {
    let (lab, bgp) = up(true);
    assert!(
        lab.router_birdc(&["show", "bfd", "sessions"])
            .unwrap()
            .matches("Up")
            .count()
            >= NODES,
        "{}",
        lab.router_birdc(&["show", "bfd", "sessions"]).unwrap()
    );
    // Drop everything on n3's uplink both ways: BGP (TCP 179) and BFD (UDP 3784) go silent.
    let rules = format!(
        "table inet lbc_silent {{\n\
           chain input {{ type filter hook input priority 0; iifname \"{NODE_UPLINK_IF}\" drop; }}\n\
           chain output {{ type filter hook output priority 0; oifname \"{NODE_UPLINK_IF}\" drop; }}\n\
         }}\n"
    );
    let path = lab.dir().join("n3-silent.nft");
    std::fs::write(&path, rules).unwrap();
    lab.exec("n3", &["nft", "-f", &path.to_string_lossy()])
        .unwrap();
    let took = lab
        .wait_next_hops(IpAddr::V4(VIP), &[1, 2], Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("{e:#}\n--- router BIRD:\n{}", bgp.router_log()));
    println!(
        "{VIP}: n3 silent, its next hop gone after {took:?} (BFD {BFD_INTERVAL_MS} ms × {BFD_MULTIPLIER})"
    );
    lab.wait_next_hops(IpAddr::V6(VIP6), &[1, 2], ROUTES)
        .unwrap();
}

//! `show protocols all` parsing: BIRD 2.0.12 output captured from the namespace test's setup,
//! BIRD 3 and `birdc -v` output written after BIRD's own format strings, and arbitrary input.

use std::net::IpAddr;

use bgp::{ProtoState, ProtocolState, RouteCounts, parse_show_protocols};
use proptest::prelude::*;

const BIRD2: &str = include_str!("fixtures/bird2_show_protocols_all.txt");
const BIRD3: &str = include_str!("fixtures/bird3_show_protocols_all.txt");
const BIRDC_V: &str = include_str!("fixtures/birdc_v_show_protocols.txt");

fn find<'a>(ps: &'a [ProtocolState], name: &str) -> &'a ProtocolState {
    ps.iter().find(|p| p.name == name).unwrap()
}

fn counts(imported: u32, exported: u32, preferred: u32) -> RouteCounts {
    RouteCounts {
        imported,
        exported,
        preferred,
    }
}

#[test]
fn bird2_output() {
    let ps = parse_show_protocols(BIRD2);
    let names: Vec<_> = ps.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "device1", "vip4", "vip6", "own4", "own6", "backup4", "backup6", "lbc_bfd", "peer_r1"
        ]
    );

    let vip4 = find(&ps, "vip4");
    assert_eq!(vip4.proto, "Static");
    assert_eq!(vip4.table, "master4");
    assert_eq!(vip4.state, ProtoState::Up);
    assert_eq!(vip4.since, "02:36:46.360");
    assert_eq!(vip4.info, "");
    assert_eq!(vip4.channels.len(), 1);
    assert_eq!(vip4.channels[0].name, "ipv4");
    assert_eq!(vip4.channels[0].state, "UP");
    assert_eq!(vip4.channels[0].table, "master4");
    assert_eq!(vip4.routes(), counts(1, 0, 1));
    assert_eq!(find(&ps, "vip6").routes(), counts(0, 0, 0));

    assert_eq!(find(&ps, "lbc_bfd").bfd, Some(true));

    let peer = find(&ps, "peer_r1");
    assert_eq!(peer.proto, "BGP");
    assert_eq!(peer.table, "---");
    assert_eq!(peer.state, ProtoState::Start);
    assert_eq!(peer.info, "Idle");
    assert_eq!(peer.bgp_state.as_deref(), Some("Idle"));
    assert_eq!(peer.neighbor, Some("198.18.250.2".parse().unwrap()));
    assert_eq!(peer.neighbor_as, Some(65000));
    assert_eq!(peer.peer_name(), Some("r1"));
    assert!(!peer.is_established());
    assert_eq!(peer.bfd, None);
    assert_eq!(peer.channels[0].state, "DOWN");
    assert_eq!(peer.routes(), counts(0, 0, 0));
}

#[test]
fn bird3_output() {
    let ps = parse_show_protocols(BIRD3);
    assert_eq!(ps.len(), 5);

    let vip4 = find(&ps, "vip4");
    assert_eq!(vip4.since, "2025-03-14 09:12:01");
    assert_eq!(vip4.routes(), counts(2, 0, 2));
    assert_eq!(vip4.channels[0].table, "master4");

    let up = find(&ps, "peer_r1");
    assert!(up.is_established());
    assert_eq!(up.info, "Established");
    assert_eq!(up.bgp_state.as_deref(), Some("Established"));
    assert_eq!(up.routes(), counts(0, 3, 0));
    assert_eq!(up.last_error, None);

    let down = find(&ps, "peer_r1v6");
    assert_eq!(down.state, ProtoState::Start);
    assert_eq!(down.info, "Active        BFD session down");
    assert_eq!(down.neighbor, Some("fe80::1".parse::<IpAddr>().unwrap()));
    assert_eq!(down.last_error.as_deref(), Some("BFD session down"));
    assert_eq!(down.bfd, Some(false));
    assert_eq!(down.channels[0].state, "DOWN");
}

#[test]
fn numbered_reply_lines() {
    let ps = parse_show_protocols(BIRDC_V);
    let names: Vec<_> = ps.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["device1", "vip6", "peer_r1"]);
    assert_eq!(find(&ps, "vip6").routes(), counts(1, 0, 1));
    let peer = find(&ps, "peer_r1");
    assert_eq!(peer.state, ProtoState::Down);
    assert_eq!(peer.info, "");
    assert_eq!(peer.neighbor, Some("2001:db8:2::1".parse().unwrap()));
    assert_eq!(peer.neighbor_as, Some(4_200_000_000));
}

#[test]
fn unknown_and_garbled_lines_are_skipped() {
    let text = [
        "BIRD 9.9 ready.",
        "weird    Proto    t    newstate",
        "  Routes:         x imported, 7 exported, -1 preferred, 3 banana",
        "  Neighbor AS:    not-a-number",
        "  Neighbor address: nonsense",
        "☃ Proto t up",
        "  Channel",
    ]
    .join("\n");
    let ps = parse_show_protocols(&text);
    assert_eq!(ps.len(), 1);
    let p = &ps[0];
    assert_eq!(p.state, ProtoState::Other("newstate".into()));
    assert_eq!(p.since, "");
    assert_eq!(p.routes(), counts(0, 7, 0));
    assert_eq!(p.neighbor, None);
    assert_eq!(p.neighbor_as, None);
    assert_eq!(parse_show_protocols(""), []);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        let _ = parse_show_protocols(&text);
    }

    /// Real output cut at any byte and mixed with noise still parses without a panic.
    #[test]
    fn mangled_real_output_never_panics(
        cut in 0usize..BIRD3.len(),
        noise in "[ -~\\n\\t:%,0-9]{0,200}",
    ) {
        let mut text = String::from_utf8_lossy(&BIRD3.as_bytes()[..cut]).into_owned();
        text.push_str(&noise);
        text.push_str(BIRD2);
        let ps = parse_show_protocols(&text);
        prop_assert!(ps.iter().any(|p| p.name == "peer_r1"));
    }
}

//! Rendering: golden files for the shapes the node produces, every rendered config parsed by the
//! real `bird -p` (parse only: starts no protocol, touches no network), and the refusals.
//!
//! `UPDATE_GOLDEN=1 cargo test -p bgp --test render` rewrites the golden files.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Command;

use bgp::{Announce, Bfd, BgpError, Peer, render};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn base() -> Announce {
    Announce::new(Ipv4Addr::new(198, 18, 0, 11), 65100, "lbc0")
}

fn upstream() -> Peer {
    let mut p = Peer::new("r1", ip("198.18.2.1"), 65000);
    p.local_addr = Some(ip("198.18.2.2"));
    p
}

/// The cases checked against golden files and by `bird -p`.
fn cases() -> Vec<(&'static str, Announce)> {
    let empty = Announce {
        peers: vec![upstream()],
        ..base()
    };
    let dual = Announce {
        vips: vec![
            ip("198.19.255.1"),
            ip("2001:db8:100::1"),
            ip("198.19.255.2"),
        ],
        own_lips: vec![ip("198.19.200.1"), ip("2001:db8:200::1")],
        backup_lips: vec![
            ip("198.19.200.3"),
            ip("198.19.200.2"),
            ip("2001:db8:200::2"),
        ],
        peers: vec![upstream(), {
            let mut p = Peer::new("r1v6", ip("2001:db8:2::1"), 65000);
            p.local_addr = Some(ip("2001:db8:2::2"));
            p
        }],
        ..base()
    };
    let bfd = Announce {
        vips: vec![ip("198.19.255.1")],
        peers: vec![Peer {
            bfd: Some(Bfd {
                interval_ms: 100,
                multiplier: 3,
            }),
            hold_secs: 9,
            keepalive_secs: 3,
            ..upstream()
        }],
        ..base()
    };
    let drain = Announce {
        vips: vec![ip("198.19.255.1")],
        own_lips: vec![ip("198.19.200.1")],
        graceful_shutdown: true,
        communities: vec![(65100, 42)],
        med: Some(50),
        backup_prepend: 1,
        peers: vec![upstream()],
        ..base()
    };
    let password = Announce {
        vips: vec![ip("198.19.255.1")],
        peers: vec![Peer {
            password: Some("s3cret 'with' spaces".into()),
            ..upstream()
        }],
        ..base()
    };
    vec![
        ("no_routes", empty),
        ("dual_stack", dual),
        ("bfd", bfd),
        ("graceful_shutdown", drain),
        ("password", password),
        ("no_peers", base()),
    ]
}

fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.conf"))
}

#[test]
fn rendered_configs_match_golden_files() {
    for (name, announce) in cases() {
        let text = render(&announce).unwrap();
        let path = golden_path(name);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, &text).unwrap();
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
        assert_eq!(
            text,
            want,
            "{name}: rendered config differs from {}",
            path.display()
        );
    }
}

#[test]
fn bird_parses_every_rendered_config() {
    let dir = tempfile::tempdir().unwrap();
    for (name, announce) in cases() {
        let path = dir.path().join(format!("{name}.conf"));
        std::fs::write(&path, render(&announce).unwrap()).unwrap();
        let out = Command::new("bird")
            .arg("-p")
            .arg("-c")
            .arg(&path)
            .output()
            .expect("`bird` not found: install BIRD 2 (scripts/test does)");
        assert!(
            out.status.success(),
            "{name}: bird -p refused the config: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn rendering_is_independent_of_input_order_and_duplicates() {
    let mut a = base();
    a.vips = vec![ip("198.19.255.2"), ip("198.19.255.1"), ip("198.19.255.2")];
    let mut b = base();
    b.vips = vec![ip("198.19.255.1"), ip("198.19.255.2")];
    assert_eq!(render(&a).unwrap(), render(&b).unwrap());
}

#[test]
fn withdrawing_all_vips_keeps_empty_vip_protocols() {
    let text = render(&cases()[0].1).unwrap();
    assert!(text.contains("protocol static vip4 {\n  ipv4;\n  check link yes;\n}"));
    assert!(text.contains("protocol static vip6 {\n  ipv6;\n  check link yes;\n}"));
    assert!(!text.contains("route "));
}

#[test]
fn each_route_goes_via_the_device_with_link_check() {
    let text = render(&cases()[1].1).unwrap();
    assert!(text.contains("route 198.19.255.1/32 via \"lbc0\";"));
    assert!(text.contains("route 2001:db8:100::1/128 via \"lbc0\";"));
    assert_eq!(text.matches("check link yes;").count(), 6);
    assert_eq!(text.matches("bgp_path.prepend(65100);").count(), 3);
}

fn refused(a: &Announce) -> String {
    match render(a) {
        Err(BgpError::InvalidAnnounce(msg)) => msg,
        other => panic!("expected InvalidAnnounce, got {other:?}"),
    }
}

#[test]
fn strings_that_could_inject_config_are_refused() {
    for name in ["", "r-1", "r1; }", "r 1", "é", &"x".repeat(60)] {
        let mut a = base();
        a.peers = vec![Peer::new(name, ip("198.18.2.1"), 65000)];
        assert!(refused(&a).contains("peer name"), "{name:?}");
    }
    for dev in ["", "lbc0\"; }", "a/b", "sixteen-chars-xx"] {
        let mut a = base();
        a.device = dev.into();
        assert!(refused(&a).contains("device"), "{dev:?}");
    }
    for pw in ["", "a\"b", "a\\b", "line\nbreak", "ü", &"p".repeat(81)] {
        let mut a = base();
        a.peers = vec![Peer {
            password: Some(pw.into()),
            ..upstream()
        }];
        let msg = refused(&a);
        assert!(msg.contains("password"), "{pw:?}");
        assert!(
            pw.is_empty() || !msg.contains(pw),
            "the password leaks into {msg:?}"
        );
    }
}

#[test]
fn numbers_and_addresses_bird_would_refuse_are_refused() {
    let mut a = base();
    a.router_id = Ipv4Addr::UNSPECIFIED;
    assert!(refused(&a).contains("router id"));

    let mut a = base();
    a.local_as = 0;
    assert!(refused(&a).contains("local AS"));

    for n in [0, 17] {
        let mut a = base();
        a.backup_prepend = n;
        assert!(refused(&a).contains("prepend"));
    }

    let mut a = base();
    a.vips = vec![ip("224.0.0.1")];
    assert!(refused(&a).contains("unicast"));

    let mut a = base();
    a.own_lips = vec![ip("198.19.200.1")];
    a.backup_lips = vec![ip("198.19.200.1")];
    assert!(refused(&a).contains("both"));

    for (hold, keepalive) in [(2, 1), (3, 0), (3, 4)] {
        let mut a = base();
        a.peers = vec![Peer {
            hold_secs: hold,
            keepalive_secs: keepalive,
            ..upstream()
        }];
        assert!(refused(&a).contains("time"), "{hold}/{keepalive}");
    }

    let mut a = base();
    a.peers = vec![Peer {
        local_addr: Some(ip("2001:db8:2::2")),
        ..upstream()
    }];
    assert!(refused(&a).contains("family"));

    let mut a = base();
    a.peers = vec![upstream(), upstream()];
    assert!(refused(&a).contains("two peers"));

    let mut a = base();
    a.peers = vec![Peer {
        bfd: Some(Bfd {
            interval_ms: 0,
            multiplier: 3,
        }),
        ..upstream()
    }];
    assert!(refused(&a).contains("BFD"));
}

//! Runs the real `lbcluster tls` commands: a cluster CA and node certificates, their file modes,
//! overwrite protection, clear errors, and `tls cert check` (a loopback mutual-TLS QUIC
//! handshake with the files, as the daemon loads them).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn lbcluster(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lbcluster"))
        .args(args)
        .output()
        .expect("lbcluster runs")
}

#[track_caller]
fn ok(args: &[&str]) -> String {
    let out = lbcluster(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail with `code`; returns its stderr.
#[track_caller]
fn fails(args: &[&str], code: i32) -> String {
    let out = lbcluster(args);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
    stderr
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn test_ca_and_node_certs() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    let certs = tmp.path().join("certs");

    let out = ok(&["tls", "ca", "create", "--dir", s(&ca), "--name", "lab CA"]);
    assert!(out.contains("created cluster CA \"lab CA\""), "{out}");
    assert_eq!(mode(&ca.join("ca.key")), 0o600);
    assert_eq!(mode(&ca), 0o700);
    assert!(
        fs::read_to_string(ca.join("ca.pem"))
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );

    for (node, ips) in [
        ("n1", ["198.18.1.1", "2001:db8:1::1"]),
        ("n2", ["198.18.1.2", "2001:db8:1::2"]),
    ] {
        let out = ok(&[
            "tls",
            "cert",
            "create",
            "--ca-dir",
            s(&ca),
            "--node",
            node,
            "--ip",
            ips[0],
            ips[1],
            "--out",
            s(&certs),
        ]);
        assert!(
            out.contains(&format!("node {node} ({}, {})", ips[0], ips[1])),
            "{out}"
        );
        assert_eq!(mode(&certs.join(format!("{node}.key"))), 0o600);
        let out = ok(&[
            "tls",
            "cert",
            "check",
            "--ca-dir",
            s(&ca),
            "--node",
            node,
            "--dir",
            s(&certs),
        ]);
        assert!(out.contains("ok"), "{out}");
    }
    // Without --out the files go next to the CA; repeating --ip works too.
    ok(&[
        "tls",
        "cert",
        "create",
        "--ca-dir",
        s(&ca),
        "--node",
        "n3",
        "--ip",
        "198.18.1.3",
        "--ip",
        "198.18.1.33",
    ]);
    assert_eq!(mode(&ca.join("n3.key")), 0o600);
    ok(&["tls", "cert", "check", "--ca-dir", s(&ca), "--node", "n3"]);
}

#[test]
fn test_existing_files_are_not_overwritten_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path();
    ok(&["tls", "ca", "create", "--dir", s(ca)]);
    let ca_pem = fs::read(ca.join("ca.pem")).unwrap();
    let err = fails(&["tls", "ca", "create", "--dir", s(ca)], 1);
    assert!(
        err.contains("refusing to overwrite") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(fs::read(ca.join("ca.pem")).unwrap(), ca_pem);

    let create = [
        "tls",
        "cert",
        "create",
        "--ca-dir",
        s(ca),
        "--node",
        "n1",
        "--ip",
        "198.18.1.1",
    ];
    ok(&create);
    let cert = fs::read(ca.join("n1.pem")).unwrap();
    let err = fails(&create, 1);
    assert!(err.contains("n1.pem") && err.contains("n1.key"), "{err}");
    assert_eq!(fs::read(ca.join("n1.pem")).unwrap(), cert);

    // --force replaces, and a replaced key that had been opened up is 0600 again.
    fs::set_permissions(ca.join("n1.key"), fs::Permissions::from_mode(0o644)).unwrap();
    ok(&[&create[..], &["--force"]].concat());
    assert_ne!(fs::read(ca.join("n1.pem")).unwrap(), cert);
    assert_eq!(mode(&ca.join("n1.key")), 0o600);

    // A new CA (--force) no longer trusts the node certificate signed by the old one.
    ok(&["tls", "ca", "create", "--dir", s(ca), "--force"]);
    assert_ne!(fs::read(ca.join("ca.pem")).unwrap(), ca_pem);
    assert_eq!(mode(&ca.join("ca.key")), 0o600);
    let err = fails(
        &["tls", "cert", "check", "--ca-dir", s(ca), "--node", "n1"],
        1,
    );
    assert!(err.contains("fails the mutual-TLS check"), "{err}");
}

#[test]
fn test_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path();
    let missing = ca.join("nowhere");
    let err = fails(
        &[
            "tls",
            "cert",
            "create",
            "--ca-dir",
            s(&missing),
            "--node",
            "n1",
            "--ip",
            "198.18.1.1",
        ],
        1,
    );
    assert!(
        err.contains("no cluster CA in") && err.contains("tls ca create"),
        "{err}"
    );

    ok(&["tls", "ca", "create", "--dir", s(ca)]);
    let cert = |node: &str, ip: &str| {
        fails(
            &[
                "tls",
                "cert",
                "create",
                "--ca-dir",
                s(ca),
                "--node",
                node,
                "--ip",
                ip,
            ],
            2,
        )
    };
    let err = cert("n1", "198.18.1");
    assert!(err.contains("invalid value '198.18.1' for '--ip"), "{err}");
    let err = cert("Node_1", "198.18.1.1");
    assert!(err.contains("is not a valid node name"), "{err}");
    let err = cert("198.18.1.1", "198.18.1.1");
    assert!(err.contains("is an IP address"), "{err}");
    let err = cert("ca", "198.18.1.1");
    assert!(err.contains("taken by the cluster CA"), "{err}");
    let err = fails(
        &["tls", "cert", "create", "--ca-dir", s(ca), "--node", "n1"],
        2,
    );
    assert!(err.contains("--ip"), "{err}");
    assert!(!ca.join("n1.pem").exists() && !ca.join("Node_1.key").exists());

    let err = fails(
        &["tls", "cert", "check", "--ca-dir", s(ca), "--node", "n9"],
        1,
    );
    assert!(err.contains("n9.pem"), "{err}");
    // A certificate file that names another node.
    ok(&[
        "tls",
        "cert",
        "create",
        "--ca-dir",
        s(ca),
        "--node",
        "n1",
        "--ip",
        "198.18.1.1",
    ]);
    fs::copy(ca.join("n1.pem"), ca.join("n2.pem")).unwrap();
    fs::copy(ca.join("n1.key"), ca.join("n2.key")).unwrap();
    let err = fails(
        &["tls", "cert", "check", "--ca-dir", s(ca), "--node", "n2"],
        1,
    );
    assert!(err.contains("certificate for node n1, not n2"), "{err}");
}

//! Apply and error paths without a daemon: stand-in `bird`/`birdc` scripts record what they are
//! asked, a silent socket plays a hung daemon. Needs no root and no network.

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bgp::{Announce, Applied, Applier, BgpError, Bird, Peer, render};
use tokio::sync::watch;

fn announce(vips: usize) -> Announce {
    let mut a = Announce::new(Ipv4Addr::new(198, 18, 0, 11), 65100, "lbc0");
    a.vips = (0..vips)
        .map(|i| IpAddr::from([198, 19, 255, u8::try_from(i % 250).unwrap() + 1]))
        .collect();
    a
}

/// A script that appends its arguments to `log` and prints `reply`.
fn script(dir: &Path, name: &str, reply: &str, exit: i32) -> PathBuf {
    let path = dir.join(name);
    let log = dir.join(format!("{name}.log"));
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\necho \"$*\" >> '{}'\nprintf '%s\\n' '{reply}'\nexit {exit}\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn calls(dir: &Path, name: &str) -> Vec<String> {
    std::fs::read_to_string(dir.join(format!("{name}.log")))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

struct Fake {
    dir: tempfile::TempDir,
    bird: Bird,
}

fn fake(bird_reply: &str, bird_exit: i32) -> Fake {
    let dir = tempfile::tempdir().unwrap();
    let bird_bin = script(dir.path(), "bird", bird_reply, bird_exit);
    let birdc_bin = script(
        dir.path(),
        "birdc",
        "Reading configuration\nReconfigured",
        0,
    );
    std::fs::write(dir.path().join("bird.ctl"), "").unwrap();
    let bird = Bird::new(dir.path().join("bird.conf"), dir.path().join("bird.ctl"))
        .with_binaries(bird_bin, birdc_bin);
    Fake { dir, bird }
}

#[tokio::test]
async fn validates_renames_and_reloads_once_per_change() {
    let f = fake("", 0);
    let a = announce(1);
    assert_eq!(f.bird.apply(&a).await, Ok(Applied::Reloaded));
    assert_eq!(f.bird.apply(&a).await, Ok(Applied::Unchanged));
    assert_eq!(
        std::fs::read_to_string(f.bird.config_path()).unwrap(),
        render(&a).unwrap()
    );
    let validated = calls(f.dir.path(), "bird");
    assert_eq!(validated.len(), 1);
    assert!(validated[0].starts_with("-p -c "), "{validated:?}");
    assert!(
        validated[0].contains("bird.conf.tmp-"),
        "validated beside the config"
    );
    assert_eq!(
        calls(f.dir.path(), "birdc"),
        [format!("-s {} configure", f.bird.socket_path().display())]
    );
    // A new file holds passwords: not world-readable.
    let mode = std::fs::metadata(f.bird.config_path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o007, 0);
}

const PASSWORD: &str = "s3cret-md5";

/// An announcement whose config holds a peer's password.
fn announce_with_password(vips: usize) -> Announce {
    let mut a = announce(vips);
    let mut peer = Peer::new("router", IpAddr::V4(Ipv4Addr::new(198, 18, 51, 1)), 65000);
    peer.password = Some(PASSWORD.into());
    a.peers.push(peer);
    a
}

/// A stand-in `bird` that, when it validates a file holding [`PASSWORD`], records that file's
/// mode, owner and group (`stat -c '%a %u:%g'`) in `validated.log`: the temporary file, while
/// the password is in it and before it is renamed.
fn recording_fake() -> Fake {
    let f = fake("", 0);
    let log = f.dir.path().join("validated.log");
    let path = f.dir.path().join("bird");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh
if grep -q 'password \"{PASSWORD}\"' \"$3\"; then stat -c '%a %u:%g' \"$3\" >> '{}'; fi
",
            log.display()
        ),
    )
    .unwrap();
    f
}

/// What [`recording_fake`]'s `bird` recorded: one `MODE UID:GID` per file it validated.
fn validated(f: &Fake) -> Vec<String> {
    calls(f.dir.path(), "validated")
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[tokio::test]
async fn a_new_config_holds_the_password_in_mode_0600_from_its_creation_on() {
    let f = recording_fake();
    let me = std::fs::metadata(f.dir.path()).unwrap();
    f.bird.apply(&announce_with_password(1)).await.unwrap();
    assert_eq!(
        validated(&f),
        [format!("600 {}:{}", me.uid(), me.gid())],
        "the temporary file"
    );
    assert_eq!(mode(f.bird.config_path()), 0o600);
    assert!(
        std::fs::read_to_string(f.bird.config_path())
            .unwrap()
            .contains(PASSWORD)
    );
}

#[tokio::test]
async fn a_rewrite_never_widens_the_mode_and_keeps_only_group_read() {
    // The old file's mode, and what the password may be in: 0600, or 0640 where the old file
    // let its group read (BIRD running as its own user).
    for (old, want) in [
        (0o644, 0o640),
        (0o666, 0o640),
        (0o660, 0o640),
        (0o640, 0o640),
        (0o604, 0o600),
        (0o600, 0o600),
        (0o400, 0o600),
    ] {
        let f = recording_fake();
        std::fs::write(f.bird.config_path(), "old\n").unwrap();
        std::fs::set_permissions(f.bird.config_path(), PermissionsExt::from_mode(old)).unwrap();
        f.bird.apply(&announce_with_password(1)).await.unwrap();
        // Rewritten again: the mode stays.
        f.bird.apply(&announce_with_password(2)).await.unwrap();
        let modes: Vec<String> = validated(&f)
            .iter()
            .map(|l| l.split(' ').next().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(
            modes,
            [format!("{want:o}"), format!("{want:o}")],
            "old {old:o}"
        );
        assert_eq!(mode(f.bird.config_path()), want, "old {old:o}");
    }
}

#[tokio::test]
async fn a_rewrite_keeps_the_owner_and_group_of_the_config() {
    let f = recording_fake();
    std::fs::write(f.bird.config_path(), "old\n").unwrap();
    std::fs::set_permissions(f.bird.config_path(), PermissionsExt::from_mode(0o640)).unwrap();
    if std::fs::metadata(f.bird.config_path()).unwrap().uid() != 0 {
        eprintln!("not root: a file cannot be given to another owner, nothing to check");
        return;
    }
    // BIRD's own user and group, as a distribution's package makes them.
    let (uid, gid) = (4321, 4322);
    std::os::unix::fs::chown(f.bird.config_path(), Some(uid), Some(gid)).unwrap();
    f.bird.apply(&announce_with_password(1)).await.unwrap();
    assert_eq!(
        validated(&f),
        [format!("640 {uid}:{gid}")],
        "the temporary file"
    );
    let meta = std::fs::metadata(f.bird.config_path()).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), mode(f.bird.config_path())),
        (uid, gid, 0o640)
    );
}

#[tokio::test]
async fn a_refused_config_keeps_the_old_file_and_quotes_bird() {
    let f = fake(
        "bird: /x/bird.conf.tmp:3:1 syntax error, unexpected CF_SYM_UNDEFINED",
        1,
    );
    std::fs::write(f.bird.config_path(), "old\n").unwrap();
    let err = f.bird.apply(&announce(1)).await.unwrap_err();
    assert_eq!(
        err,
        BgpError::Invalid(
            "bird: /x/bird.conf.tmp:3:1 syntax error, unexpected CF_SYM_UNDEFINED".into()
        )
    );
    assert!(!err.is_transient());
    assert_eq!(
        std::fs::read_to_string(f.bird.config_path()).unwrap(),
        "old\n"
    );
    assert!(calls(f.dir.path(), "birdc").is_empty(), "no reload");
    let names: Vec<_> = std::fs::read_dir(f.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.contains(".tmp-")), "{names:?}");
}

#[tokio::test]
async fn an_invalid_announce_touches_nothing() {
    let f = fake("", 0);
    let mut a = announce(0);
    a.device = "lbc0\"; }".into();
    assert!(matches!(
        f.bird.apply(&a).await,
        Err(BgpError::InvalidAnnounce(_))
    ));
    assert!(!f.bird.config_path().exists());
    assert!(calls(f.dir.path(), "bird").is_empty());
}

#[tokio::test]
async fn a_refused_reload_is_an_error_and_is_tried_again() {
    let f = fake("", 0);
    let birdc = script(
        f.dir.path(),
        "birdc-busy",
        "Reconfiguration ignored, shutting down",
        0,
    );
    let bird = Bird::new(f.bird.config_path(), f.bird.socket_path())
        .with_binaries(f.dir.path().join("bird"), birdc);
    let a = announce(1);
    let err = bird.apply(&a).await.unwrap_err();
    assert!(
        matches!(err, BgpError::Reconfigure(ref m) if m.contains("ignored")),
        "{err:?}"
    );
    assert!(err.is_transient());
    // Not loaded, so the same announcement is reloaded again rather than reported unchanged.
    assert!(bird.apply(&a).await.is_err());
    assert_eq!(calls(f.dir.path(), "birdc-busy").len(), 2);
}

#[tokio::test]
async fn missing_binaries_are_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bird.ctl"), "").unwrap();
    let bird = Bird::new(dir.path().join("bird.conf"), dir.path().join("bird.ctl"))
        .with_binaries("/nonexistent/bird", "/nonexistent/birdc");
    assert_eq!(
        bird.apply(&announce(0)).await,
        Err(BgpError::BirdMissing("/nonexistent/bird".into()))
    );
    assert!(!bird.config_path().exists());
    assert_eq!(
        bird.show_protocols().await,
        Err(BgpError::BirdcMissing("/nonexistent/birdc".into()))
    );
}

#[tokio::test]
async fn a_daemon_that_does_not_answer_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("silent.ctl");
    // Accepts connections (the kernel's backlog) but never greets: a hung BIRD.
    let _listener = UnixListener::bind(&sock).unwrap();
    let bird =
        Bird::new(dir.path().join("bird.conf"), &sock).with_timeout(Duration::from_millis(300));
    let err = bird.show_protocols().await.unwrap_err();
    assert!(
        matches!(err, BgpError::Timeout { ref command, .. } if command.ends_with("silent.ctl show protocols all")),
        "{err:?}"
    );
    assert!(err.to_string().contains("hung"));
}

#[tokio::test]
async fn the_applier_coalesces_a_burst_into_the_newest() {
    let f = fake("", 0);
    let bird = Arc::new(f.bird);
    let (_stop_tx, stop) = watch::channel(false);
    let applier = Applier::spawn(bird.clone(), Duration::from_millis(50), stop);
    let mut outcome = applier.outcome();
    // The single-threaded test runtime runs the task only once this test awaits: it finds the
    // whole burst already replaced by its last value.
    for n in 1..=100 {
        applier.set(announce(n));
    }
    outcome
        .wait_for(|o| matches!(o, Some(Ok(Applied::Reloaded))))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(bird.config_path()).unwrap(),
        render(&announce(100)).unwrap()
    );
    assert_eq!(calls(f.dir.path(), "birdc").len(), 1);
}

#[tokio::test]
async fn the_applier_retries_until_bird_is_back_and_stops_on_signal() {
    let f = fake("", 0);
    std::fs::remove_file(f.bird.socket_path()).unwrap();
    let bird = Arc::new(f.bird);
    let (stop_tx, stop) = watch::channel(false);
    let applier = Applier::spawn(bird.clone(), Duration::from_millis(50), stop);
    let mut outcome = applier.outcome();
    applier.set(announce(2));
    outcome
        .wait_for(|o| matches!(o, Some(Err(BgpError::SocketMissing(_)))))
        .await
        .unwrap();
    std::fs::write(bird.socket_path(), "").unwrap();
    outcome
        .wait_for(|o| matches!(o, Some(Ok(Applied::Reloaded))))
        .await
        .unwrap();
    stop_tx.send_replace(true);
    applier.join().await;
}

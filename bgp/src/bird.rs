//! Control of one BIRD daemon: write a validated config atomically and make BIRD load it, read
//! its protocols. Every process runs with a timeout and is killed when it passes.
//!
//! The config holds the peers' TCP-MD5 passwords, so it is private from the moment it exists:
//!
//! * The new config is written to a temporary file beside it that is *created* with its final
//!   mode and given its final owner while still empty; nothing is chmod'ed after the password
//!   is in. The mode is 0600, plus group read where the file it replaces had group read (a BIRD
//!   that runs as its own user, e.g. Debian's `bird -u bird -g bird` with `root:bird 0640`,
//!   keeps reading it); never anything for others, whatever the old file had. The owner and
//!   group are the old file's, for the same reason.
//! * The rename over the config is followed by an fsync of the directory, so that after a
//!   crash the directory holds the new config (the one BIRD was told to load), not the old.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::{Announce, BgpError, ProtocolState, parse_show_protocols, render};

/// How long `bird -p` and `birdc` may take by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Mode of the config file: it holds the TCP-MD5 passwords.
const CONFIG_MODE: u32 = 0o600;
/// What of an existing config's mode a rewrite keeps on top of [`CONFIG_MODE`]: group read.
const KEPT_MODE: u32 = 0o040;

/// What [`Bird::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The config is what BIRD already loaded from us: nothing written, no reload.
    Unchanged,
    /// The new config was written and BIRD reconfigured.
    Reloaded,
}

/// One BIRD daemon, started (by systemd or the lab) as `bird -c CONFIG -s SOCKET`.
#[derive(Debug)]
pub struct Bird {
    config_path: PathBuf,
    socket_path: PathBuf,
    bird_bin: PathBuf,
    birdc_bin: PathBuf,
    timeout: Duration,
    /// The config text BIRD last reconfigured to through this handle. Compared with this rather
    /// than with the file, so a config written while the daemon was away is loaded once it is
    /// back.
    loaded: Mutex<Option<String>>,
}

impl Bird {
    /// BIRD with its config file and control socket; `bird` and `birdc` from `PATH`.
    pub fn new(config_path: impl Into<PathBuf>, socket_path: impl Into<PathBuf>) -> Bird {
        Bird {
            config_path: config_path.into(),
            socket_path: socket_path.into(),
            bird_bin: PathBuf::from("bird"),
            birdc_bin: PathBuf::from("birdc"),
            timeout: DEFAULT_TIMEOUT,
            loaded: Mutex::new(None),
        }
    }

    /// Uses these `bird` and `birdc` binaries.
    pub fn with_binaries(mut self, bird: impl Into<PathBuf>, birdc: impl Into<PathBuf>) -> Bird {
        self.bird_bin = bird.into();
        self.birdc_bin = birdc.into();
        self
    }

    /// Limits each `bird -p` and `birdc` run to `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Bird {
        self.timeout = timeout;
        self
    }

    /// The config file BIRD runs.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// BIRD's control socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Renders `announce` and applies it with [`Bird::apply_config`].
    pub async fn apply(&self, announce: &Announce) -> Result<Applied, BgpError> {
        let config = render(announce)?;
        self.apply_config(&config).await
    }

    /// Applies a complete config text: unless BIRD already runs it, writes it to a temporary
    /// file beside the config, validates it with `bird -p`, renames it over the config and runs
    /// `birdc configure`. A config BIRD rejects leaves the old file in place. When the daemon
    /// cannot be reached the new file stays in place (BIRD loads it when it starts) and the
    /// next apply reloads it.
    pub async fn apply_config(&self, config: &str) -> Result<Applied, BgpError> {
        if self.loaded().as_deref() == Some(config) {
            return Ok(Applied::Unchanged);
        }
        let temp = self.temp_path();
        let result = self.validate_and_install(&temp, config).await;
        if result.is_err() {
            // Already renamed on success; on failure the temp file must not pile up.
            let _ = tokio::fs::remove_file(&temp).await;
        }
        result?;
        let reply = self.birdc(&["configure"]).await?;
        // BIRD answers `Reconfigured`, or `Reconfiguration in progress` while it still shuts
        // down changed protocols, or queues the config behind a running reconfiguration.
        if !reply.contains("Reconfigur") || reply.contains("ignored") {
            return Err(BgpError::Reconfigure(reply.trim().to_string()));
        }
        *self.loaded.lock().unwrap_or_else(|e| e.into_inner()) = Some(config.to_string());
        Ok(Applied::Reloaded)
    }

    /// The state of every protocol (`birdc show protocols all`).
    pub async fn show_protocols(&self) -> Result<Vec<ProtocolState>, BgpError> {
        let reply = self.birdc(&["show", "protocols", "all"]).await?;
        Ok(parse_show_protocols(&reply))
    }

    fn loaded(&self) -> Option<String> {
        self.loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn temp_path(&self) -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let mut name = self
            .config_path
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_else(|| "bird.conf".into());
        name.push(format!(
            ".tmp-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        self.config_path.with_file_name(name)
    }

    async fn validate_and_install(&self, temp: &Path, config: &str) -> Result<(), BgpError> {
        let old = tokio::fs::metadata(&self.config_path).await.ok();
        let mode = CONFIG_MODE | old.as_ref().map_or(0, |m| m.mode() & KEPT_MODE);
        let at = |what: &str| format!("{what} {}", temp.display());
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(temp)
            .await
            .map_err(|e| BgpError::io(at("creating"), &e))?;
        if let Some(old) = &old {
            let new = file
                .metadata()
                .await
                .map_err(|e| BgpError::io(at("reading the owner of"), &e))?;
            if (new.uid(), new.gid()) != (old.uid(), old.gid()) {
                std::os::unix::fs::fchown(&file, Some(old.uid()), Some(old.gid())).map_err(
                    |e| {
                        BgpError::io(
                            format!(
                                "giving {} the owner of {} ({}:{})",
                                temp.display(),
                                self.config_path.display(),
                                old.uid(),
                                old.gid()
                            ),
                            &e,
                        )
                    },
                )?;
            }
        }
        file.write_all(config.as_bytes())
            .await
            .map_err(|e| BgpError::io(at("writing"), &e))?;
        file.sync_all()
            .await
            .map_err(|e| BgpError::io(at("syncing"), &e))?;
        drop(file);

        let mut cmd = Command::new(&self.bird_bin);
        cmd.arg("-p").arg("-c").arg(temp);
        let out = self
            .run(cmd, "bird -p", || {
                BgpError::BirdMissing(self.bird_bin.clone())
            })
            .await?;
        if !out.status.success() {
            let text = output_text(&out);
            return Err(BgpError::Invalid(text.trim().to_string()));
        }
        tokio::fs::rename(temp, &self.config_path)
            .await
            .map_err(|e| {
                BgpError::io(
                    format!(
                        "renaming {} to {}",
                        temp.display(),
                        self.config_path.display()
                    ),
                    &e,
                )
            })?;
        let dir = match self.config_path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let synced = match tokio::fs::File::open(dir).await {
            Ok(dir) => dir.sync_all().await,
            Err(e) => Err(e),
        };
        synced.map_err(|e| BgpError::io(format!("syncing the directory {}", dir.display()), &e))
    }

    /// Runs `birdc -s SOCKET ARGS…` and returns what it printed.
    async fn birdc(&self, args: &[&str]) -> Result<String, BgpError> {
        if !self.socket_path.exists() {
            return Err(BgpError::SocketMissing(self.socket_path.clone()));
        }
        let mut cmd = Command::new(&self.birdc_bin);
        cmd.arg("-s").arg(&self.socket_path).args(args);
        let command = args.join(" ");
        let what = format!(
            "{} -s {} {command}",
            self.birdc_bin.display(),
            self.socket_path.display()
        );
        let out = self
            .run(cmd, &what, || {
                BgpError::BirdcMissing(self.birdc_bin.clone())
            })
            .await?;
        let text = output_text(&out);
        if text.contains("Unable to connect to server control socket") {
            // The socket vanished between the check and the connect, or nobody listens on it.
            if !self.socket_path.exists() {
                return Err(BgpError::SocketMissing(self.socket_path.clone()));
            }
            return Err(BgpError::Unreachable {
                socket: self.socket_path.clone(),
                message: text.trim().to_string(),
            });
        }
        if !out.status.success() {
            return Err(BgpError::Unexpected(format!(
                "birdc {command} exited with {}: {}",
                out.status,
                text.trim()
            )));
        }
        Ok(text)
    }

    async fn run(
        &self,
        mut cmd: Command,
        what: &str,
        missing: impl FnOnce() -> BgpError,
    ) -> Result<std::process::Output, BgpError> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(missing()),
            Err(e) => return Err(BgpError::io(format!("starting {what}"), &e)),
        };
        match tokio::time::timeout(self.timeout, child.wait_with_output()).await {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(e)) => Err(BgpError::io(format!("waiting for {what}"), &e)),
            // Dropping the future drops the child, which kills it (kill_on_drop).
            Err(_) => Err(BgpError::Timeout {
                command: what.to_string(),
                timeout_ms: u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX),
            }),
        }
    }
}

fn output_text(out: &std::process::Output) -> String {
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    text
}

//! The one error type of the crate. Every variant says who failed and what to do; the node shows
//! it in `status`, so it is `Clone` and carries text rather than `io::Error`.

use std::path::PathBuf;

/// What went wrong while rendering, applying or reading BIRD's state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BgpError {
    /// The announcement cannot be rendered: a name, address or number BIRD would refuse or
    /// misread. Nothing was written.
    #[error("invalid BGP announcement: {0}")]
    InvalidAnnounce(String),
    /// The `bird` binary (used to validate configs) is not there: install BIRD 2.
    #[error("BIRD binary {0} not found: install BIRD 2 (Debian package bird2)")]
    BirdMissing(PathBuf),
    /// The `birdc` binary is not there: install BIRD 2.
    #[error("birdc binary {0} not found: install BIRD 2 (Debian package bird2)")]
    BirdcMissing(PathBuf),
    /// BIRD's control socket does not exist: the daemon is not running, or it was started with
    /// another `-s` path.
    #[error("BIRD control socket {0} does not exist: is BIRD running with `-s {0}`?")]
    SocketMissing(PathBuf),
    /// The socket exists but nobody accepts on it (stale socket of a dead daemon, or not a
    /// socket at all).
    #[error("BIRD does not accept connections on {socket}: {message}")]
    Unreachable {
        /// The control socket asked.
        socket: PathBuf,
        /// What birdc said.
        message: String,
    },
    /// `birdc` (or `bird -p`) did not finish in time: the daemon is hung or overloaded.
    #[error("`{command}` did not finish within {timeout_ms} ms: BIRD is hung or overloaded")]
    Timeout {
        /// The command line that was killed.
        command: String,
        /// The limit that passed.
        timeout_ms: u64,
    },
    /// `bird -p` refused the rendered config; the previous config file is kept.
    #[error("BIRD rejected the new config (previous config kept): {0}")]
    Invalid(String),
    /// The daemon refused `configure` (the file on disk is new, BIRD still runs the old one).
    #[error("BIRD did not reconfigure: {0}")]
    Reconfigure(String),
    /// birdc ran but its output is not what the command produces.
    #[error("unexpected birdc output: {0}")]
    Unexpected(String),
    /// Reading or writing a file, or starting a process, failed.
    #[error("{context}: {message}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The operating system's error.
        message: String,
    },
}

impl BgpError {
    /// Whether trying again later may succeed without a change of the announcement (the daemon
    /// may come back); a rejected config or a missing binary will not fix itself.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            BgpError::SocketMissing(_)
                | BgpError::Unreachable { .. }
                | BgpError::Timeout { .. }
                | BgpError::Reconfigure(_)
                | BgpError::Io { .. }
        )
    }

    pub(crate) fn io(context: impl Into<String>, err: &std::io::Error) -> BgpError {
        BgpError::Io {
            context: context.into(),
            message: err.to_string(),
        }
    }
}

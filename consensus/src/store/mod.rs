//! Durable storage for the configuration cluster, in one directory:
//!
//! * `log` — the Raft log, append-only: one framed record (see [`record`]) per append, plus
//!   `Truncate` markers that cancel a suffix. Every append is fsync'd before it is acknowledged.
//!   A damaged last record is a torn write and is cut off on open; a damaged record with an
//!   intact one after it is corruption and stops the node ([`StoreError::Corrupt`]).
//!   A purge rewrites the file (a `Purge` marker and the surviving entries) to `log.tmp` and
//!   renames it over `log`, which is also how the file stays bounded.
//! * `vote` — the last vote, one framed record, replaced atomically.
//! * `snapshot` — the last snapshot (its metadata and the whole configuration), replaced
//!   atomically. The state machine itself lives in memory and is rebuilt from the snapshot plus
//!   the committed log entries openraft re-applies after a restart.
//!
//! "Atomically" is: write `<name>.tmp`, fsync it, rename it over `<name>`, fsync the directory.
//!
//! The files are written with blocking calls from the async trait methods. The configuration log
//! sees a handful of small writes per operator action, so a thread pool hop per write would cost
//! more than the write.

mod log;
mod record;
mod state_machine;

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub use log::{LogReader, LogStore};
pub use state_machine::{ConfigStateMachine, SnapshotBuilder};

/// A storage file could not be opened or read back.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// A record whose checksum matches but whose contents do not decode: not a torn write but a
    /// file from another version or a bug. Refusing to start is safer than guessing.
    #[error("{}: the record at byte {offset} does not decode: {source}", path.display())]
    Decode {
        path: PathBuf,
        offset: usize,
        source: rmp_serde::decode::Error,
    },
    /// The log has a damaged record with an intact one after it: not an interrupted write (that
    /// damages only the last record) but corruption of entries this node acknowledged. Cutting
    /// the log there would lose them, so the node refuses to start and leaves the file as it is.
    #[error(
        "{}: the record at byte {offset} is damaged (checksum or length mismatch) but an intact \
         record follows at byte {intact}: this is corruption of acknowledged entries, not an \
         interrupted write, and the log is left untouched. Keep a copy of the file for \
         diagnosis; then restore this node's data directory from a backup, or remove the node \
         from the cluster (`lbcluster node remove` on another member), empty its data directory \
         and add it again (`lbcluster node add`), which copies the log from the leader",
        path.display()
    )]
    Corrupt {
        path: PathBuf,
        offset: usize,
        intact: usize,
    },
    /// A file that is only ever replaced atomically is damaged.
    #[error("{}: damaged (checksum or length mismatch)", path.display())]
    Damaged { path: PathBuf },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Replaces `dir/name` with `bytes` so that a crash leaves either the old or the new contents.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// Makes the directory's entries (a created or renamed file) durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads a whole file; a missing file reads as `None`.
fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(path)(e)),
    }
}

/// Reads a file written by [`write_atomic`] holding exactly one record.
fn read_single<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    let Some(bytes) = read_optional(path)? else {
        return Ok(None);
    };
    let mut records = record::Records::new(&bytes);
    let payload = records.next();
    match payload {
        Some(payload) if records.valid_len() == bytes.len() => rmp_serde::from_slice(payload)
            .map(Some)
            .map_err(|source| StoreError::Decode {
                path: path.to_owned(),
                offset: 0,
                source,
            }),
        _ => Err(StoreError::Damaged {
            path: path.to_owned(),
        }),
    }
}

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
//! The configuration holds the cluster's secret (the join token), so every file here is the
//! owner's alone (0600) from its creation on, a file left wider by an earlier version is
//! narrowed when it is opened, and a directory the store creates is 0700.
//!
//! The files are written with blocking calls from the async trait methods. The configuration log
//! sees a handful of small writes per operator action, so a thread pool hop per write would cost
//! more than the write.

mod log;
mod record;
mod state_machine;

use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
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

/// The mode of every file of the store: it holds the cluster's secret.
const FILE_MODE: u32 = 0o600;

/// Creates the store's directory (0700) if it is not there.
fn create_dir(dir: &Path) -> Result<(), StoreError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_error(dir))
}

/// Opens `path` with `options`, created 0600, and narrows it to 0600 if it was wider.
fn open_private(path: &Path, options: &mut OpenOptions) -> io::Result<File> {
    let file = options.mode(FILE_MODE).open(path)?;
    if file.metadata()?.permissions().mode() & 0o077 != 0 {
        file.set_permissions(Permissions::from_mode(FILE_MODE))?;
    }
    Ok(file)
}

/// Replaces `dir/name` with `bytes` so that a crash leaves either the old or the new contents.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut file = open_private(
        &tmp,
        OpenOptions::new().write(true).create(true).truncate(true),
    )?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// Makes the directory's entries (a created or renamed file) durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads a whole file (narrowed to 0600 first if it was wider); a missing file reads as `None`.
fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    let read = || -> io::Result<Vec<u8>> {
        let mut bytes = Vec::new();
        open_private(path, OpenOptions::new().read(true))?.read_to_end(&mut bytes)?;
        Ok(bytes)
    };
    match read() {
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

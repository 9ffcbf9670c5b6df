//! The Raft log and vote: [`LogStore`] writes, [`LogReader`]s read the in-memory copy.
//!
//! * Every write to the log file is exactly one record (an append's entries travel together in
//!   one `Entries` record), synced before the write is acknowledged and before the next one
//!   starts. That is what lets [`LogStore::open`] tell an interrupted write from corruption
//!   (see [`record`](super::record)).
//! * On open, a damaged last record (a torn tail: a write that never completed, so was never
//!   acknowledged) is cut off the file with a warning. A damaged record with an intact one
//!   after it is corruption of acknowledged entries: the store refuses to open and leaves the
//!   file as it is, since cutting there would silently drop what this node promised to keep.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::record::{self, Records, Tail};
use super::{
    StoreError, create_dir, io_error, open_private, read_optional, read_single, sync_dir,
    write_atomic,
};
use crate::{NodeId, TypeConfig};

type Entry = openraft::Entry<TypeConfig>;

const LOG_FILE: &str = "log";
const VOTE_FILE: &str = "vote";

/// One record of the log file. Replaying the records in order rebuilds the log.
#[derive(Debug, Serialize, Deserialize)]
enum LogRecord<E> {
    /// One entry: what versions before `Entries` wrote, one record per entry of an append. Still
    /// read, so that a node upgraded in place opens its log.
    Entry(E),
    /// The entries of one append (or, in a rewritten file, every entry that survived a purge).
    Entries(Vec<E>),
    /// Entries from `since` on are gone.
    Truncate { since: u64 },
    /// Entries up to and including `upto` are gone; `upto` is the last purged log id.
    Purge { upto: LogId<NodeId> },
}

/// The log as readers see it: every entry that is on disk, in memory.
#[derive(Debug, Default)]
struct Log {
    entries: BTreeMap<u64, Entry>,
    last_purged: Option<LogId<NodeId>>,
    /// The last committed log id openraft reported; kept in memory only (after a restart
    /// openraft learns it again from the leader).
    committed: Option<LogId<NodeId>>,
}

impl Log {
    fn replay(&mut self, record: LogRecord<Entry>) {
        match record {
            LogRecord::Entry(entry) => {
                self.entries.insert(entry.log_id.index, entry);
            }
            LogRecord::Entries(entries) => {
                for entry in entries {
                    self.entries.insert(entry.log_id.index, entry);
                }
            }
            LogRecord::Truncate { since } => self.truncate(since),
            LogRecord::Purge { upto } => self.purge(upto),
        }
    }

    fn truncate(&mut self, since: u64) {
        self.entries.split_off(&since);
    }

    fn purge(&mut self, upto: LogId<NodeId>) {
        self.entries = self.entries.split_off(&(upto.index + 1));
        self.last_purged = Some(upto);
    }
}

/// The durable Raft log and vote of one node.
#[derive(Debug)]
pub struct LogStore {
    dir: PathBuf,
    file: File,
    /// Length of the intact records in `file`; a failed write is cut back to it.
    len: u64,
    vote: Option<Vote<NodeId>>,
    log: Arc<Mutex<Log>>,
}

/// Reads the log while the [`LogStore`] keeps writing it.
#[derive(Debug, Clone)]
pub struct LogReader {
    log: Arc<Mutex<Log>>,
}

impl LogStore {
    /// Opens (or creates) the log and vote in `dir`.
    ///
    /// A damaged record at the end of the log — a write that never completed, so was never
    /// acknowledged — is dropped and cut off the file, with a warning. A damaged record followed
    /// by an intact one is [`StoreError::Corrupt`], and the file is not touched.
    pub fn open(dir: &Path) -> Result<LogStore, StoreError> {
        create_dir(dir)?;
        let path = dir.join(LOG_FILE);
        let bytes = read_optional(&path)?.unwrap_or_default();
        let mut log = Log::default();
        let mut records = Records::new(&bytes);
        while let Some(payload) = records.next() {
            let offset = records.valid_len() - payload.len();
            let record = rmp_serde::from_slice(payload).map_err(|source| StoreError::Decode {
                path: path.clone(),
                offset,
                source,
            })?;
            log.replay(record);
        }
        let len = match records.tail() {
            Tail::Clean => bytes.len(),
            Tail::Torn { offset } => offset,
            Tail::Corrupt { offset, intact } => {
                return Err(StoreError::Corrupt {
                    path,
                    offset,
                    intact,
                });
            }
        };
        let file = open_private(&path, OpenOptions::new().create(true).append(true))
            .map_err(io_error(&path))?;
        if len < bytes.len() {
            tracing::warn!(
                path = %path.display(),
                offset = len,
                dropped_bytes = bytes.len() - len,
                "dropping a torn record at the end of the raft log (a write that never completed)"
            );
            file.set_len(len as u64).map_err(io_error(&path))?;
            file.sync_all().map_err(io_error(&path))?;
        }
        sync_dir(dir).map_err(io_error(dir))?;
        let vote = read_single(&dir.join(VOTE_FILE))?;
        Ok(LogStore {
            dir: dir.to_owned(),
            file,
            len: len as u64,
            vote,
            log: Arc::new(Mutex::new(log)),
        })
    }

    /// Appends records to the log file and fsyncs it; on failure the file is cut back so that a
    /// later append does not land behind a partial record.
    fn write_durably(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self
            .file
            .write_all(bytes)
            .and_then(|()| self.file.sync_data())
        {
            Ok(()) => {
                self.len += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Best effort: the original error is the one to report.
                let _ = self.file.set_len(self.len);
                Err(e)
            }
        }
    }

    /// A reader of the log as this store writes it.
    pub fn reader(&self) -> LogReader {
        LogReader {
            log: self.log.clone(),
        }
    }
}

fn write_logs_error(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_logs(&e).into()
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError<NodeId>> {
        let log = self.log.lock();
        Ok(log.entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError<NodeId>> {
        self.reader().try_get_log_entries(range).await
    }
}

impl Log {
    /// The id of the last entry on disk, or of the last purged one when none is left.
    fn last_log_id(&self) -> Option<LogId<NodeId>> {
        self.entries
            .last_key_value()
            .map(|(_, e)| e.log_id)
            .or(self.last_purged)
    }
}

impl LogReader {
    /// The last log id this node knows to be committed, `None` before the first commit seen
    /// since it started.
    pub fn committed(&self) -> Option<LogId<NodeId>> {
        self.log.lock().committed
    }

    /// The id of the last entry in the log (what a vote request compares), `None` for an empty
    /// log.
    pub fn last_log_id(&self) -> Option<LogId<NodeId>> {
        self.log.lock().last_log_id()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let log = self.log.lock();
        let last_log_id = log.last_log_id();
        Ok(LogState {
            last_purged_log_id: log.last_purged,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> LogReader {
        self.reader()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut bytes = Vec::new();
        record::encode(vote, &mut bytes).map_err(|e| StorageIOError::write_vote(&e))?;
        write_atomic(&self.dir, VOTE_FILE, &bytes).map_err(|e| StorageIOError::write_vote(&e))?;
        self.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.vote)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let mut bytes = Vec::new();
        record::encode(&LogRecord::Entries(entries.iter().collect()), &mut bytes)
            .map_err(write_logs_error)?;
        self.write_durably(&bytes).map_err(write_logs_error)?;
        let mut log = self.log.lock();
        for entry in entries {
            log.entries.insert(entry.log_id.index, entry);
        }
        drop(log);
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        self.log.lock().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.log.lock().committed)
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let since = log_id.index;
        let mut bytes = Vec::new();
        record::encode(&LogRecord::<Entry>::Truncate { since }, &mut bytes)
            .map_err(write_logs_error)?;
        self.write_durably(&bytes).map_err(write_logs_error)?;
        self.log.lock().truncate(since);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        // Rewrite the file without the purged entries; the rename makes the switch atomic.
        let mut bytes = Vec::new();
        record::encode(&LogRecord::<Entry>::Purge { upto: log_id }, &mut bytes)
            .map_err(write_logs_error)?;
        {
            let log = self.log.lock();
            let kept: Vec<&Entry> = log
                .entries
                .range(log_id.index + 1..)
                .map(|(_, e)| e)
                .collect();
            if !kept.is_empty() {
                record::encode(&LogRecord::Entries(kept), &mut bytes).map_err(write_logs_error)?;
            }
        }
        write_atomic(&self.dir, LOG_FILE, &bytes).map_err(write_logs_error)?;
        let path = self.dir.join(LOG_FILE);
        self.file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(write_logs_error)?;
        self.len = bytes.len() as u64;
        self.log.lock().purge(log_id);
        Ok(())
    }
}

//! The storage keeps what it acknowledged across a reopen, and only that.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::Path;

use consensus::config::{Backend, Proto, Scheduler, Service, ServiceKey, ServiceSettings};
use consensus::{
    Applied, ClusterConfig, Command, ConfigError, ConfigStateMachine, LogStore, Member, NodeId,
    StoreError, TypeConfig,
};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::{
    CommittedLeaderId, Entry, EntryPayload, LogId, Membership, RaftLogReader, RaftSnapshotBuilder,
    Vote,
};
use tempfile::TempDir;

fn log_id(term: u64, index: u64) -> LogId<NodeId> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn service_key() -> ServiceKey {
    ServiceKey {
        vip: "198.18.0.1:80".parse().unwrap(),
        proto: Proto::Tcp,
    }
}

fn add_service() -> Command {
    Command::AddService(Service {
        key: service_key(),
        settings: ServiceSettings {
            scheduler: Scheduler::Maglev,
            timeouts: Default::default(),
            toa: true,
            conn_reuse: Default::default(),
            syn_proxy: Default::default(),
            health: Default::default(),
        },
        backends: vec![Backend {
            addr: "10.1.0.1:8080".parse().unwrap(),
            weight: 10,
        }],
    })
}

/// Entry `index` of term `term`: a membership entry at 1, config commands after.
fn entry(term: u64, index: u64) -> Entry<TypeConfig> {
    let payload = match index {
        1 => {
            let member = Member {
                name: "n1".into(),
                quic_addr: "10.0.0.1:7000".parse().unwrap(),
            };
            EntryPayload::Membership(Membership::new(
                vec![[1].into()],
                BTreeMap::from([(1, member)]),
            ))
        }
        2 => EntryPayload::Blank,
        _ => EntryPayload::Normal(Command::AddBackend {
            service: service_key(),
            backend: Backend {
                addr: format!("10.1.1.{index}:8080").parse().unwrap(),
                weight: index as u32,
            },
        }),
    };
    Entry {
        log_id: log_id(term, index),
        payload,
    }
}

async fn append_each(store: &mut LogStore, term: u64, indexes: impl IntoIterator<Item = u64>) {
    for index in indexes {
        store.blocking_append([entry(term, index)]).await.unwrap();
    }
}

/// The log ids present, and the last purged one.
async fn contents(dir: &Path) -> (Vec<LogId<NodeId>>, Option<LogId<NodeId>>) {
    let mut store = LogStore::open(dir).unwrap();
    let state = store.get_log_state().await.unwrap();
    let entries = store.try_get_log_entries(..).await.unwrap();
    let ids = entries.iter().map(|e| e.log_id).collect::<Vec<_>>();
    assert_eq!(
        state.last_log_id,
        ids.last().copied().or(state.last_purged_log_id)
    );
    (ids, state.last_purged_log_id)
}

fn ids(term: u64, indexes: impl IntoIterator<Item = u64>) -> Vec<LogId<NodeId>> {
    indexes.into_iter().map(|i| log_id(term, i)).collect()
}

#[tokio::test]
async fn test_entries_and_vote_survive_reopen() {
    let dir = TempDir::new().unwrap();
    let vote = Vote::new_committed(3, 2);
    {
        let mut store = LogStore::open(dir.path()).unwrap();
        assert_eq!(store.read_vote().await.unwrap(), None);
        append_each(&mut store, 1, 1..=3).await;
        store
            .blocking_append((4..=6).map(|i| entry(1, i)))
            .await
            .unwrap();
        store.save_vote(&vote).await.unwrap();
    }
    let mut store = LogStore::open(dir.path()).unwrap();
    assert_eq!(store.read_vote().await.unwrap(), Some(vote));
    let entries = store.try_get_log_entries(..).await.unwrap();
    let expected: Vec<_> = (1..=6).map(|i| entry(1, i)).collect();
    assert_eq!(format!("{entries:?}"), format!("{expected:?}"));
}

#[tokio::test]
async fn test_truncate_and_purge_survive_reopen() {
    let dir = TempDir::new().unwrap();
    {
        let mut store = LogStore::open(dir.path()).unwrap();
        append_each(&mut store, 1, 1..=10).await;
        store.truncate(log_id(1, 8)).await.unwrap();
        store.purge(log_id(1, 3)).await.unwrap();
        append_each(&mut store, 2, 8..=9).await;
    }
    let mut expected = ids(1, 4..=7);
    expected.extend(ids(2, 8..=9));
    assert_eq!(contents(dir.path()).await, (expected, Some(log_id(1, 3))));

    // Purging everything leaves the purged id as the last log id.
    {
        let mut store = LogStore::open(dir.path()).unwrap();
        store.purge(log_id(2, 9)).await.unwrap();
    }
    assert_eq!(contents(dir.path()).await, (vec![], Some(log_id(2, 9))));
}

fn log_file_len(dir: &Path) -> u64 {
    std::fs::metadata(dir.join("log")).unwrap().len()
}

#[tokio::test]
async fn test_torn_tail_record_is_dropped() {
    let dir = TempDir::new().unwrap();
    let mut store = LogStore::open(dir.path()).unwrap();
    append_each(&mut store, 1, 1..=3).await;
    let two_records = {
        let len = log_file_len(dir.path());
        append_each(&mut store, 1, [4]).await;
        len
    };
    drop(store);
    // A crash in the middle of writing record 4.
    let file = OpenOptions::new()
        .write(true)
        .open(dir.path().join("log"))
        .unwrap();
    file.set_len(log_file_len(dir.path()) - 3).unwrap();
    drop(file);

    assert_eq!(contents(dir.path()).await, (ids(1, 1..=3), None));
    assert_eq!(
        log_file_len(dir.path()),
        two_records,
        "the torn bytes are cut off the file"
    );

    // Appending after recovery continues from a clean end.
    {
        let mut store = LogStore::open(dir.path()).unwrap();
        append_each(&mut store, 2, 4..=5).await;
    }
    let mut expected = ids(1, 1..=3);
    expected.extend(ids(2, 4..=5));
    assert_eq!(contents(dir.path()).await, (expected, None));
}

#[tokio::test]
async fn test_corrupted_tail_record_is_dropped() {
    let dir = TempDir::new().unwrap();
    {
        let mut store = LogStore::open(dir.path()).unwrap();
        append_each(&mut store, 1, 1..=4).await;
    }
    let path = dir.path().join("log");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();

    assert_eq!(contents(dir.path()).await, (ids(1, 1..=3), None));
}

#[tokio::test]
async fn test_torn_multi_entry_append_is_dropped_whole() {
    let dir = TempDir::new().unwrap();
    let before = {
        let mut store = LogStore::open(dir.path()).unwrap();
        append_each(&mut store, 1, 1..=2).await;
        let len = log_file_len(dir.path());
        store
            .blocking_append((3..=5).map(|i| entry(1, i)))
            .await
            .unwrap();
        len
    };
    // A crash while the three-entry append was written: whatever part of it reached the disk,
    // none of it was acknowledged.
    let whole = std::fs::read(dir.path().join("log")).unwrap();
    for cut in before as usize + 1..whole.len() {
        std::fs::write(dir.path().join("log"), &whole[..cut]).unwrap();
        assert_eq!(
            contents(dir.path()).await,
            (ids(1, 1..=2), None),
            "cut at {cut}"
        );
        assert_eq!(log_file_len(dir.path()), before, "cut at {cut}");
    }
}

/// A log of entries 1..=4, one append each; returns the byte offset where each append began.
async fn four_appends(dir: &Path) -> Vec<u64> {
    let mut store = LogStore::open(dir).unwrap();
    let mut starts = Vec::new();
    for index in 1..=4 {
        starts.push(log_file_len(dir));
        append_each(&mut store, 1, [index]).await;
    }
    starts
}

#[tokio::test]
async fn test_corrupted_middle_record_refuses_to_open() {
    const HEADER_LEN: usize = 8;
    for damage in ["payload", "checksum", "length", "zeroed"] {
        let dir = TempDir::new().unwrap();
        let starts = four_appends(dir.path()).await;
        let path = dir.path().join("log");
        let mut bytes = std::fs::read(&path).unwrap();
        let second = starts[1] as usize;
        match damage {
            "payload" => bytes[second + HEADER_LEN + 3] ^= 0x10,
            "checksum" => bytes[second + 5] ^= 0x01,
            "length" => bytes[second + 1] ^= 0x01,
            _ => bytes[second..starts[2] as usize].fill(0),
        }
        std::fs::write(&path, &bytes).unwrap();

        let err = LogStore::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, StoreError::Corrupt { offset, intact, .. }
                if offset == second && intact == starts[2] as usize),
            "{damage}: {err:?}"
        );
        let message = err.to_string();
        assert!(
            message.starts_with(&format!(
                "{}: the record at byte {second} is damaged",
                path.display()
            )) && message.contains("lbcluster node remove"),
            "{damage}: {message}"
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "{damage}: the log is left untouched"
        );
        // Refusing is not a one-off: the file still says the same thing the next time.
        assert!(matches!(
            LogStore::open(dir.path()),
            Err(StoreError::Corrupt { .. })
        ));
    }
}

#[tokio::test]
async fn test_log_written_one_record_per_entry_still_opens() {
    // The framing versions before `Entries` wrote: one `Entry` record per entry.
    #[derive(serde::Serialize)]
    enum OldRecord<'a> {
        Entry(&'a Entry<TypeConfig>),
    }
    let dir = TempDir::new().unwrap();
    let mut bytes = Vec::new();
    for index in 1..=3 {
        let payload = rmp_serde::to_vec_named(&OldRecord::Entry(&entry(1, index))).unwrap();
        bytes.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        bytes.extend_from_slice(&payload);
    }
    std::fs::write(dir.path().join("log"), &bytes).unwrap();
    assert_eq!(contents(dir.path()).await, (ids(1, 1..=3), None));
    {
        let mut store = LogStore::open(dir.path()).unwrap();
        append_each(&mut store, 1, 4..=5).await;
    }
    assert_eq!(contents(dir.path()).await, (ids(1, 1..=5), None));
}

#[tokio::test]
async fn test_damaged_vote_file_is_an_error() {
    let dir = TempDir::new().unwrap();
    {
        let mut store = LogStore::open(dir.path()).unwrap();
        store.save_vote(&Vote::new(1, 1)).await.unwrap();
    }
    let path = dir.path().join("vote");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(bytes.len() - 1);
    std::fs::write(&path, &bytes).unwrap();
    let err = LogStore::open(dir.path()).unwrap_err();
    assert!(
        err.to_string()
            .ends_with("vote: damaged (checksum or length mismatch)"),
        "{err}"
    );
}

fn normal(index: u64, command: Command) -> Entry<TypeConfig> {
    Entry {
        log_id: log_id(1, index),
        payload: EntryPayload::Normal(command),
    }
}

#[tokio::test]
async fn test_rejected_command_is_the_applied_result() {
    let dir = TempDir::new().unwrap();
    let mut sm = ConfigStateMachine::open(dir.path()).unwrap();
    let replies = sm
        .apply([
            entry(1, 1),
            entry(1, 2),
            normal(3, add_service()),
            normal(4, add_service()),
        ])
        .await
        .unwrap();
    let twice = ConfigError::DuplicateService { key: service_key() };
    assert_eq!(
        replies,
        [
            Applied {
                version: 0,
                result: Ok(())
            },
            Applied {
                version: 0,
                result: Ok(())
            },
            Applied {
                version: 1,
                result: Ok(())
            },
            Applied {
                version: 1,
                result: Err(twice)
            },
        ]
    );
    assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(1, 4)));
    assert_eq!(sm.config().version, 1);
}

#[tokio::test]
async fn test_snapshot_round_trip() {
    let leader_dir = TempDir::new().unwrap();
    let follower_dir = TempDir::new().unwrap();
    let mut sm = ConfigStateMachine::open(leader_dir.path()).unwrap();
    let applied = sm.subscribe();
    sm.apply([
        entry(1, 1),
        normal(2, add_service()),
        entry(1, 3),
        entry(1, 4),
    ])
    .await
    .unwrap();
    let config: ClusterConfig = (*sm.config()).clone();
    assert_eq!(config.version, 3);
    assert_eq!(**applied.borrow(), config);
    let built = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    let state = sm.applied_state().await.unwrap();
    drop(sm);

    // Reopened: the state machine is the snapshot.
    let mut sm = ConfigStateMachine::open(leader_dir.path()).unwrap();
    assert_eq!(*sm.config(), config);
    assert_eq!(sm.applied_state().await.unwrap(), state);
    let current = sm
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("a snapshot");
    assert_eq!(current.meta, built.meta);

    // Installed on another node: replaces its state machine, which it keeps across a reopen.
    let mut follower = ConfigStateMachine::open(follower_dir.path()).unwrap();
    let follower_applied = follower.subscribe();
    follower
        .apply([normal(1, Command::DelService { key: service_key() })])
        .await
        .unwrap();
    let mut data = follower.begin_receiving_snapshot().await.unwrap();
    *data = *current.snapshot;
    follower
        .install_snapshot(&current.meta, data)
        .await
        .unwrap();
    assert_eq!(*follower.config(), config);
    assert_eq!(**follower_applied.borrow(), config);
    assert_eq!(follower.applied_state().await.unwrap(), state);
    drop(follower);
    let mut follower = ConfigStateMachine::open(follower_dir.path()).unwrap();
    assert_eq!(*follower.config(), config);
    assert_eq!(
        follower.get_current_snapshot().await.unwrap().unwrap().meta,
        built.meta
    );
}

/// The store holds the cluster's secret: every file it writes is the owner's alone whatever
/// the umask, and files an earlier version left readable by others are narrowed on open.
#[tokio::test]
async fn test_every_file_is_private_from_its_creation_on() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let root = TempDir::new().unwrap();
    let dir = root.path().join("raft");
    {
        let mut store = LogStore::open(&dir).unwrap();
        append_each(&mut store, 1, 1..=3).await;
        store.save_vote(&Vote::new_committed(1, 1)).await.unwrap();
        store.purge(log_id(1, 2)).await.unwrap();
        let mut sm = ConfigStateMachine::open(&dir).unwrap();
        sm.apply([normal(1, add_service())]).await.unwrap();
        let mut builder = sm.get_snapshot_builder().await;
        builder.build_snapshot().await.unwrap();
    }
    assert_eq!(mode(&dir), 0o700);
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    for name in ["log", "vote", "snapshot"] {
        assert!(files.contains(&dir.join(name)), "{name} missing: {files:?}");
    }
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    for f in &files {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let _store = LogStore::open(&dir).unwrap();
    let _sm = ConfigStateMachine::open(&dir).unwrap();
    for f in &files {
        assert_eq!(mode(f), 0o600, "{} not narrowed on open", f.display());
    }
}

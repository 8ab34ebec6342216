//! Issue 11: the stream index holds one entry per append (the append's last version and its
//! position), not one per event. An append's events sit at consecutive positions, so reads,
//! stream heads and the audit derive the versions in between. An index with an entry per
//! event (written before this change) is the special case of one-event appends and reads the
//! same.

use saga_storage::audit::AuditLog;
use saga_storage::{
    AppendRequest, EventLog, ExpectedVersion, LogConfig, NewEvent, StorageError, StreamVersion,
};

fn event(stream: &str, n: u64) -> NewEvent {
    NewEvent::encode(format!("{stream}-event"), &n).expect("encodes")
}

/// Appends versions `from..=to` to stream `s`; returns their positions.
async fn append_s(log: &EventLog, from: u64, to: u64) -> Vec<u64> {
    let appended = log
        .append(AppendRequest::new("s", ExpectedVersion::Any).events((from..=to).map(|n| event("s", n))))
        .await
        .expect("appends");
    assert_eq!(appended.stream_version.get(), to);
    (appended.first_position.get()..=appended.last_position.get()).collect()
}

/// Stream `s` gets versions 1-3 in one append, 4 alone, 5-6 in one append, and 7-8 in an
/// `append_all` with stream `t`; `t`'s appends sit between them, so `s`'s positions have gaps.
/// Returns the position of every version of `s` (index 0 is version 1).
async fn write(dir: &std::path::Path) -> Vec<u64> {
    let log = EventLog::open(LogConfig::new(dir)).expect("opens");
    let mut positions = Vec::new();
    positions.extend(append_s(&log, 1, 3).await);
    log.append(AppendRequest::new("t", ExpectedVersion::Any).events([event("t", 1), event("t", 2)]))
        .await
        .expect("appends");
    positions.extend(append_s(&log, 4, 4).await);
    positions.extend(append_s(&log, 5, 6).await);
    log.append(AppendRequest::new("t", ExpectedVersion::Any).event(event("t", 3)))
        .await
        .expect("appends");
    let both = log
        .append_all(vec![
            AppendRequest::new("t", ExpectedVersion::Any).event(event("t", 4)),
            AppendRequest::new("s", ExpectedVersion::Any).events([event("s", 7), event("s", 8)]),
        ])
        .await
        .expect("appends");
    positions.extend(both[1].first_position.get()..=both[1].last_position.get());
    assert_eq!(positions.len(), 8);
    positions
}

/// The versions of `stream` in the index, with the position each entry names.
fn index_entries(dir: &std::path::Path, stream: &str) -> Vec<(u64, u64)> {
    let db = sled::open(dir).expect("opens sled");
    let streams = db.open_tree("streams").unwrap();
    let mut prefix = stream.as_bytes().to_vec();
    prefix.push(0);
    streams
        .scan_prefix(&prefix)
        .map(|entry| {
            let (key, value) = entry.unwrap();
            (
                u64::from_be_bytes(key[key.len() - 8..].try_into().unwrap()),
                u64::from_be_bytes(value.as_ref().try_into().unwrap()),
            )
        })
        .collect()
}

/// Sets (or, with `None`, removes) the index entry of `stream` at `version`.
fn set_index_entry(dir: &std::path::Path, stream: &str, version: u64, position: Option<u64>) {
    let db = sled::open(dir).expect("opens sled");
    let streams = db.open_tree("streams").unwrap();
    let mut key = stream.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&version.to_be_bytes());
    match position {
        Some(position) => streams.insert(key, position.to_be_bytes().to_vec()).unwrap(),
        None => streams.remove(key).unwrap(),
    };
    db.flush().unwrap();
}

/// Every read of `s` from each version with each limit, on a log opened cold (nothing cached),
/// gives exactly the expected versions at the expected positions; the head is version 8 and
/// the next append continues the stream and its hash chain.
async fn assert_reads(dir: &std::path::Path, positions: &[u64]) {
    let log = EventLog::open(LogConfig::new(dir)).expect("opens");
    assert_eq!(log.stream_version("s").await.unwrap().get(), 8);
    for from in 1..=9u64 {
        for max in 1..=9usize {
            let records = log
                .read_stream("s", StreamVersion::new(from), max)
                .await
                .unwrap_or_else(|e| panic!("read from v{from}, max {max}: {e}"));
            let got: Vec<(u64, u64, u64)> = records
                .iter()
                .map(|r| (r.version().get(), r.position().get(), r.decode::<u64>().unwrap()))
                .collect();
            let want: Vec<(u64, u64, u64)> = (from..=8)
                .take(max)
                .map(|v| (v, positions[v as usize - 1], v))
                .collect();
            assert_eq!(got, want, "read from v{from}, max {max}");
        }
    }
    let appended = log
        .append(AppendRequest::new("s", ExpectedVersion::Exact(StreamVersion::new(8))).event(event("s", 9)))
        .await
        .expect("the head is version 8");
    assert_eq!(appended.stream_version.get(), 9);
    drop(log);
    let report = AuditLog::open(dir).unwrap().verify(None).unwrap();
    assert!(report.findings.is_empty(), "{:?}", report.findings);
}

#[tokio::test]
async fn an_append_of_several_events_makes_one_index_entry_naming_its_last_version() {
    let dir = tempfile::tempdir().unwrap();
    let positions = write(dir.path()).await;
    assert_eq!(
        index_entries(dir.path(), "s"),
        vec![
            (3, positions[2]),
            (4, positions[3]),
            (6, positions[5]),
            (8, positions[7])
        ]
    );
    assert_eq!(index_entries(dir.path(), "t").len(), 3, "t: three appends");
    assert_reads(dir.path(), &positions).await;
}

#[tokio::test]
async fn a_dense_index_written_before_reads_and_verifies_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let positions = write(dir.path()).await;
    // What the log wrote before: an entry for every version.
    for (i, position) in positions.iter().enumerate() {
        set_index_entry(dir.path(), "s", i as u64 + 1, Some(*position));
    }
    assert_eq!(index_entries(dir.path(), "s").len(), 8);
    assert_reads(dir.path(), &positions).await;
}

#[tokio::test]
async fn an_index_entry_naming_the_wrong_position_is_an_error_naming_a_position() {
    let dir = tempfile::tempdir().unwrap();
    let positions = write(dir.path()).await;
    // The entry of versions 1-3 names version 4's position: the run it implies (positions
    // p4-2..=p4) holds t's records and s v4.
    set_index_entry(dir.path(), "s", 3, Some(positions[3]));
    let log = EventLog::open(LogConfig::new(dir.path())).expect("opens");
    match log.read_stream("s", StreamVersion::NONE, 100).await {
        Err(StorageError::Corrupt { position, reason }) => assert!(
            positions[3] - 2 <= position && position <= positions[3],
            "{position}: {reason}"
        ),
        other => panic!("expected a corrupt index, got {other:?}"),
    }
    drop(log);
    let report = AuditLog::open(dir.path()).unwrap().verify(None).unwrap();
    assert!(
        report
            .findings
            .iter()
            .any(|f| f.position.is_some_and(|p| positions[..3].contains(&p))
                && f.what.contains("stream index")),
        "{:?}",
        report.findings
    );
}

#[tokio::test]
async fn an_index_entry_without_its_record_is_named_by_the_audit() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path()).await;
    set_index_entry(dir.path(), "u", 1, Some(2));
    let report = AuditLog::open(dir.path()).unwrap().verify(None).unwrap();
    assert!(
        report.findings.iter().any(|f| f.what.contains("stream index")),
        "{:?}",
        report.findings
    );
}

#[tokio::test]
async fn a_read_past_a_missing_entry_of_a_non_contiguous_run_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let positions = write(dir.path()).await;
    // Without the entry of versions 5-6, versions 5-8 would be read as one run ending at v8's
    // position; append_all put t v4 between them.
    set_index_entry(dir.path(), "s", 6, None);
    let log = EventLog::open(LogConfig::new(dir.path())).expect("opens");
    match log.read_stream("s", StreamVersion::new(5), 100).await {
        Err(StorageError::Corrupt { position, .. }) => {
            assert!(position < positions[7], "{position}")
        }
        other => panic!("expected a corrupt index, got {other:?}"),
    }
}

#[tokio::test]
async fn a_read_that_ends_with_a_run_does_not_touch_the_entry_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let positions = write(dir.path()).await;
    // The entry of versions 7-8 names a position that cannot hold them.
    set_index_entry(dir.path(), "s", 8, Some(1));
    let log = EventLog::open(LogConfig::new(dir.path())).expect("opens");
    let records = log
        .read_stream("s", StreamVersion::new(5), 2)
        .await
        .expect("versions 5 and 6 need no later entry");
    let got: Vec<u64> = records.iter().map(|r| r.position().get()).collect();
    assert_eq!(got, positions[4..6]);
    assert!(matches!(
        log.read_stream("s", StreamVersion::new(5), 3).await,
        Err(StorageError::Corrupt { .. })
    ));
}

#[tokio::test]
async fn a_name_that_extends_a_streams_key_reads_nothing_of_that_stream() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path()).await;
    let log = EventLog::open(LogConfig::new(dir.path())).expect("opens");
    // "s" ++ 0x00 ++ 7 bytes sorts among s's index keys; it is no stream's name (appends refuse
    // NUL), and reads of it find nothing.
    let name = "s\0\0\0\0\0\0\0";
    for from in [1, 5, 9] {
        let records = log
            .read_stream(name, StreamVersion::new(from), 10)
            .await
            .expect("reads");
        assert!(records.is_empty(), "from v{from}: {records:?}");
    }
    assert_eq!(log.stream_version(name).await.unwrap(), StreamVersion::NONE);
}

#[tokio::test]
async fn a_malformed_index_value_is_a_finding_of_the_audit_not_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let positions = write(dir.path()).await;
    {
        let db = sled::open(dir.path()).unwrap();
        let mut key = b"s\0".to_vec();
        key.extend_from_slice(&4u64.to_be_bytes());
        db.open_tree("streams").unwrap().insert(key, &b"bad"[..]).unwrap();
        db.flush().unwrap();
    }
    let report = AuditLog::open(dir.path()).unwrap().verify(None).unwrap();
    assert!(
        report
            .findings
            .iter()
            .any(|f| f.position == Some(positions[3]) && f.what.contains("stream index")),
        "{:?}",
        report.findings
    );
    assert_eq!(report.records, 12, "the audit read the whole log");
}

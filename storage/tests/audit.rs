//! Issue 9: `audit::AuditLog::verify` finds tampering and broken projections, and is clean on
//! an honest log.

use std::sync::Arc;

use saga_storage::Position;
use saga_storage::audit::AuditLog;
use saga_storage::record_format::{self, RecordFields};
use saga_storage::{
    AppendRequest, EventLog, EventView, ExpectedVersion, LogConfig, NewEvent, ProjectError, ProjectionTx,
    Projector,
};

/// Counts events per stream in `count/<stream>`.
struct Counter;

impl Projector for Counter {
    fn project(&self, event: &EventView<'_>, tx: &mut ProjectionTx<'_>) -> Result<(), ProjectError> {
        let key = format!("count/{}", event.stream);
        let n = tx
            .get(&key)?
            .map_or(0, |v| u64::from_be_bytes(v.as_ref().try_into().unwrap()));
        tx.insert(key, (n + 1).to_be_bytes().to_vec())?;
        Ok(())
    }
}

async fn write_log(dir: &std::path::Path) {
    let log = EventLog::open_with(LogConfig::new(dir), Some(Arc::new(Counter))).expect("opens");
    for stream in ["a", "b"] {
        for i in 0..3u64 {
            log.append(
                AppendRequest::new(stream, ExpectedVersion::Any).event(NewEvent::encode("E", &i).unwrap()),
            )
            .await
            .expect("appends");
        }
    }
}

/// Rewrites the record at `position` with another payload and a recomputed checksum, as a
/// forger who knows the format would.
fn forge(dir: &std::path::Path, position: u64, payload: &[u8]) {
    let db = sled::open(dir).expect("opens sled");
    let events = db.open_tree("events").unwrap();
    let old = {
        let audit_record = events.get(position.to_be_bytes()).unwrap().expect("record");
        audit_record.to_vec()
    };
    drop(events);
    drop(db);
    let audit = AuditLog::open(dir).expect("opens");
    let record = audit
        .records(Position::new(position))
        .next()
        .expect("a record")
        .expect("verifies before forging");
    let (bytes, _) = record_format::encode(&RecordFields {
        position,
        version: record.version().get(),
        timestamp_us: record.timestamp_us(),
        prev_checksum: record.prev_checksum(),
        stream: record.stream(),
        event_type: record.event_type(),
        payload,
    });
    assert_ne!(bytes, old);
    drop(record);
    drop(audit);
    let db = sled::open(dir).expect("opens sled");
    db.open_tree("events")
        .unwrap()
        .insert(position.to_be_bytes(), bytes)
        .unwrap();
    db.flush().unwrap();
}

#[tokio::test]
async fn an_honest_log_verifies_clean_with_its_projections() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path()).await;
    let report = AuditLog::open(dir.path())
        .unwrap()
        .verify(Some(&Counter))
        .unwrap();
    assert!(report.findings.is_empty(), "{:?}", report.findings);
    assert_eq!(
        (report.records, report.streams, report.projection_keys),
        (6, 2, 2)
    );
}

#[tokio::test]
async fn a_forged_record_with_a_recomputed_checksum_is_caught_by_the_hash_chain() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path()).await;
    // Stream a is positions 1..=3: forge its middle record.
    forge(dir.path(), 2, &saga_storage::codec::encode(&99u64).unwrap());
    let audit = AuditLog::open(dir.path()).unwrap();
    // The forged record passes its own checksum ...
    audit
        .records(Position::new(2))
        .next()
        .unwrap()
        .expect("its own checksum is consistent");
    // ... but the next record of its stream names the original's checksum.
    let report = audit.verify(Some(&Counter)).unwrap();
    let first = report.findings.first().expect("a finding");
    assert_eq!(first.position, Some(3), "{:?}", report.findings);
    assert!(
        first.what.contains("hash chain of stream \"a\" broken"),
        "{first}"
    );
}

#[tokio::test]
async fn a_projection_that_disagrees_with_the_replay_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path()).await;
    {
        let db = sled::open(dir.path()).unwrap();
        db.open_tree("projections")
            .unwrap()
            .insert("count/b", 7u64.to_be_bytes().to_vec())
            .unwrap();
        db.flush().unwrap();
    }
    let report = AuditLog::open(dir.path())
        .unwrap()
        .verify(Some(&Counter))
        .unwrap();
    assert_eq!(report.findings.len(), 1, "{:?}", report.findings);
    assert!(
        report.findings[0].what.contains("projection count/b"),
        "{}",
        report.findings[0]
    );
}

#[test]
fn a_directory_without_a_log_is_refused_not_created() {
    let dir = tempfile::tempdir().unwrap();
    assert!(AuditLog::open(dir.path()).is_err());
    assert!(!dir.path().join("db").exists());
}

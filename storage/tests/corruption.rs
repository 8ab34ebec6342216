//! A damaged record is reported as `Corrupt { position }` by every read path: never a panic,
//! never silently skipped.

use saga_storage::{AppendRequest, EventLog, ExpectedVersion, LogConfig, NewEvent, StorageError};
use saga_storage::{Position, StreamVersion};

async fn write_log(dir: &std::path::Path, n: u64) {
    let log = EventLog::open(LogConfig::new(dir)).expect("opens");
    for i in 0..n {
        log.append(
            AppendRequest::new(format!("s{}", i % 2), ExpectedVersion::Any)
                .event(NewEvent::encode("Noted", &format!("event number {i}")).expect("encodes")),
        )
        .await
        .expect("appends");
    }
}

/// Opens the database with sled directly. Like `EventLog::open`, it waits briefly for the file
/// lock, which sled's I/O threads may hold for a moment after the log was dropped.
fn open_sled(dir: &std::path::Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match sled::open(dir) {
            Ok(db) => return db,
            Err(e)
                if std::time::Instant::now() < deadline
                    && e.to_string().contains("could not acquire lock") =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(e) => panic!("opens sled: {e}"),
        }
    }
}

/// Changes the stored bytes of the record at `position` with sled directly, as a disk error
/// or a stray write would.
fn damage(dir: &std::path::Path, position: u64, f: impl FnOnce(&mut Vec<u8>)) {
    let db = open_sled(dir);
    let events = db.open_tree("events").expect("tree");
    let mut bytes = events
        .get(position.to_be_bytes())
        .expect("reads")
        .expect("present")
        .to_vec();
    f(&mut bytes);
    events.insert(position.to_be_bytes(), bytes).expect("writes");
    db.flush().expect("flushes");
}

fn assert_corrupt_at<T: std::fmt::Debug>(result: Result<T, StorageError>, position: u64) {
    match result {
        Err(StorageError::Corrupt { position: p, reason }) => {
            assert_eq!(p, position, "names the damaged position ({reason})")
        }
        other => panic!("expected Corrupt at {position}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_is_corrupt_at_its_position_on_every_read_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), 10).await;
    // Position 5 is the third event of stream s0 (positions 1, 3, 5, ...).
    damage(dir.path(), 5, |bytes| {
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
    });
    let log = EventLog::open(LogConfig::new(dir.path())).expect("reopens: damage is found on read");
    assert_corrupt_at(log.read_all(Position::new(1), 100), 5);
    assert!(
        log.read_all(Position::new(1), 4).is_ok(),
        "records before the damage still read"
    );
    assert!(
        log.read_all(Position::new(6), 100).is_ok(),
        "records after the damage still read"
    );
    assert_corrupt_at(log.read_stream("s0", StreamVersion::new(1), 100).await, 5);
    assert!(
        log.read_stream("s1", StreamVersion::new(1), 100).await.is_ok(),
        "other streams are unaffected"
    );
    let mut sub = log.subscribe(Position::new(1));
    let mut delivered = 0;
    let err = loop {
        match sub.next().await {
            Ok(_) => delivered += 1,
            Err(e) => break e,
        }
    };
    assert_eq!(
        delivered, 0,
        "the chunk holding the damaged record is refused whole"
    );
    assert_corrupt_at::<()>(Err(err), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_or_misplaced_records_are_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), 6).await;
    damage(dir.path(), 2, |bytes| bytes.truncate(bytes.len() - 3));
    // Position 4 gets a valid record copied from position 6: checksum fine, wrong place.
    {
        let db = open_sled(dir.path());
        let events = db.open_tree("events").expect("tree");
        let six = events.get(6u64.to_be_bytes()).expect("reads").expect("present");
        events.insert(4u64.to_be_bytes(), six).expect("writes");
        db.flush().expect("flushes");
    }
    let log = EventLog::open(LogConfig::new(dir.path())).expect("reopens");
    assert_corrupt_at(log.read_all(Position::new(1), 100), 2);
    assert_corrupt_at(log.read_all(Position::new(3), 100), 4);
    assert_corrupt_at(log.read_stream("s1", StreamVersion::new(1), 100).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_that_does_not_decode_is_corrupt_at_its_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = EventLog::open(LogConfig::new(dir.path())).expect("opens");
    log.append(AppendRequest::new("s", ExpectedVersion::Any).event(NewEvent::new("Raw", vec![0xFF; 3])))
        .await
        .expect("appends");
    let records = log
        .read_all(Position::new(1), 10)
        .expect("reads: the envelope is fine");
    assert_corrupt_at(records[0].decode::<String>(), 1);
}

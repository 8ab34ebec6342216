//! Opening a data dir: sled's lock, and the durable mark's check that no acknowledged tail
//! was lost (see `mark`), with the operator's way to accept a loss.

use super::*;

/// The log's own stream: records the log writes about itself (an accepted lost tail). Not
/// seen by projectors.
pub const LOG_STREAM: &str = "$log";

/// The event type of the record an accepted lost tail leaves.
pub const LOST_TAIL_ACCEPTED: &str = "LostTailAccepted";

/// The payload of a `LostTailAccepted` record in [`LOG_STREAM`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct LostTailAccepted {
    /// What the log refused to open with (the `LostTail` or `MarkDisagrees` error's text).
    pub refusal: String,
    /// The mark's position (0 if the mark was unreadable).
    pub mark_position: u64,
    /// The log's last position at open, before this record.
    pub found_position: u64,
}

/// How long `open` waits for sled's file lock. After the last handle of a database is dropped,
/// sled's I/O threads can hold the file for a moment, so an immediate reopen in the same
/// process (tests, the embedded queue's restart) can find it locked. Another process holding it
/// for longer still gets the error.
pub(super) const LOCK_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(2);

pub(crate) fn open_sled(config: &sled::Config, path: &Path) -> Result<sled::Db, StorageError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT_MAX;
    loop {
        match config.open() {
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                if std::time::Instant::now() >= deadline {
                    return Err(StorageError::Locked {
                        path: path.to_owned(),
                    });
                }
                // Poll for the lock's release; bounded by LOCK_WAIT_MAX.
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            result => return Ok(result?),
        }
    }
}

/// The checksum of the record at `position` (0 for position 0).
pub(super) fn checksum_at(events: &sled::Tree, position: u64) -> Result<Option<u64>, StorageError> {
    if position == 0 {
        return Ok(Some(0));
    }
    match events.get(position.to_be_bytes())? {
        Some(bytes) => Ok(Some(Record::verify(position, bytes)?.checksum())),
        None => Ok(None),
    }
}

/// Compares the log with its durable mark (see `mark`): `Ok` with the mark to continue from
/// when they agree, the refusal when the log lost acknowledged records.
pub(crate) fn check_mark(path: &Path, events: &sled::Tree, last_position: u64) -> Result<Mark, StorageError> {
    let here = || -> Result<Mark, StorageError> {
        Ok(Mark {
            position: last_position,
            checksum: checksum_at(events, last_position)?.unwrap_or(0),
            recent: Vec::new(),
        })
    };
    match mark::read(path)? {
        // A new data dir, or one from before marks: start one from what is there.
        Found::Missing => here(),
        Found::Unreadable => Err(StorageError::MarkDisagrees {
            path: path.to_owned(),
            reason: format!("its mark file {} is unreadable", mark::path(path).display()),
        }),
        Found::Mark(found) if found.position > last_position => {
            let (streams, incomplete) = found.streams_after(last_position);
            Err(StorageError::LostTail {
                path: path.to_owned(),
                mark_position: found.position,
                found_position: last_position,
                streams,
                streams_complete: !incomplete,
            })
        }
        Found::Mark(found) => match checksum_at(events, found.position)? {
            Some(sum) if sum == found.checksum => Ok(Mark {
                position: last_position,
                checksum: checksum_at(events, last_position)?.unwrap_or(0),
                recent: found.recent,
            }),
            other => Err(StorageError::MarkDisagrees {
                path: path.to_owned(),
                reason: format!(
                    "the record at position {} has checksum {:?}, the mark names {:#018x}",
                    found.position,
                    other.map(|s| format!("{s:#018x}")),
                    found.checksum
                ),
            }),
        },
    }
}

/// Writes a `LostTailAccepted` record to [`LOG_STREAM`] at the end of the log and flushes it,
/// before the writer starts (projectors do not see this stream). Returns the new last position.
pub(super) fn record_lost_tail(
    trees: &Trees,
    refusal: &StorageError,
    last_position: u64,
) -> Result<u64, StorageError> {
    let mark_position = match refusal {
        StorageError::LostTail { mark_position, .. } => *mark_position,
        _ => 0,
    };
    let payload = codec::encode(&LostTailAccepted {
        refusal: refusal.to_string(),
        mark_position,
        found_position: last_position,
    })?;
    let (version, prev_checksum) = load_head(trees, LOG_STREAM)?;
    let position = last_position + 1;
    let (bytes, _) = record_format::encode(&RecordFields {
        position,
        version: version + 1,
        timestamp_us: now_us(),
        prev_checksum,
        stream: LOG_STREAM,
        event_type: LOST_TAIL_ACCEPTED,
        payload: &payload,
    });
    (&trees.events, &trees.streams)
        .transaction(|(events, streams)| {
            events.insert(&position.to_be_bytes(), bytes.as_slice())?;
            streams.insert(stream_key(LOG_STREAM, version + 1), &position.to_be_bytes())?;
            Ok::<_, ConflictableTransactionError<()>>(())
        })
        .map_err(|e| match e {
            TransactionError::Storage(e) => StorageError::Sled(e),
            TransactionError::Abort(()) => unreachable!("the closure never aborts"),
        })?;
    trees.db.flush()?;
    tracing::warn!(%refusal, position, "lost tail accepted by the operator; recorded in {LOG_STREAM}");
    Ok(position)
}

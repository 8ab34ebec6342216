//! Errors of the event log, as variants a caller can act on.

use std::path::PathBuf;

use crate::codec::CodecError;
use crate::log::ExpectedVersion;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Optimistic concurrency: the stream is not at the expected version. Nothing was written.
    /// Re-read the stream, decide again, retry.
    #[error("version conflict on stream {stream:?}: expected {expected:?}, found version {actual}")]
    VersionConflict {
        stream: String,
        expected: ExpectedVersion,
        actual: crate::StreamVersion,
    },
    /// The record at this global position failed verification. Never skipped, never a panic.
    #[error("corrupt record at position {position}: {reason}")]
    Corrupt { position: u64, reason: String },
    /// An index entry (stream index, stream head, outbox) failed verification.
    #[error("corrupt {tree} entry {key:?}: {reason}")]
    CorruptIndex {
        tree: &'static str,
        key: Vec<u8>,
        reason: String,
    },
    /// The caller's request is malformed (the field is named). Nothing was written.
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// The projector could not apply an event of this append (`ProjectError::Invalid`: its
    /// payload does not decode, say). Nothing of this append was written.
    #[error("projection refused event {event_type:?} of stream {stream:?}: {reason}")]
    Projection {
        stream: String,
        event_type: String,
        reason: String,
    },
    /// A rule of the projector refused an event of this append (`ProjectError::Refused`).
    /// Nothing of this append was written. [`StorageError::refusal`] gives the projector's
    /// typed reason back.
    #[error("event {event_type:?} of stream {stream:?} refused: {refusal}")]
    Refused {
        stream: String,
        event_type: String,
        refusal: crate::projection::Refusal,
    },
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// sled reported an I/O or storage error.
    #[error("storage: {0}")]
    Sled(#[from] sled::Error),
    /// The flush after this append failed: the append may or may not survive a crash. The log
    /// refuses further writes (see `Failed`).
    #[error("flush failed, outcome of this write unknown: {0}")]
    FlushFailed(String),
    /// An earlier storage failure stopped the writer; reopen the log to recover.
    #[error("the log stopped after an earlier storage failure: {0}")]
    Failed(String),
    /// The log was closed.
    #[error("the log is closed")]
    Closed,
    /// Another process holds the data dir (sled's file lock). Nothing was opened.
    #[error(
        "the data dir {} is held by another process (sled's lock): stop that process or use \
         another data dir",
        path.display()
    )]
    Locked { path: PathBuf },
    /// The log ends before its durable mark: records that were acknowledged are gone (see
    /// `mark`). The log refuses to serve unless opened with `accept_lost_tail`.
    #[error(
        "the log at {} lost acknowledged records: its durable mark says position {mark_position} \
         was durable, the log ends at position {found_position} (positions {}..={mark_position} \
         missing; streams written there: {}{}). Refusing to serve; start with \
         --accept-lost-tail to accept the loss (recorded in the log as an event)",
        path.display(),
        found_position + 1,
        if streams.is_empty() { "unknown".to_owned() } else { streams.join(", ") },
        if *streams_complete { "" } else { " and possibly older ones" }
    )]
    LostTail {
        path: PathBuf,
        mark_position: u64,
        found_position: u64,
        /// Streams of the missing records, as far as the mark names them.
        streams: Vec<String>,
        /// Whether `streams` names every stream of the missing records.
        streams_complete: bool,
    },
    /// The record at the durable mark's position is not the one the mark names, or the mark
    /// cannot be read: the log and its mark disagree. Refused like `LostTail`.
    #[error(
        "the log at {} disagrees with its durable mark: {reason}. Refusing to serve; start with \
         --accept-lost-tail to accept the log as it is (recorded in the log as an event)",
        path.display()
    )]
    MarkDisagrees { path: PathBuf, reason: String },
}

impl StorageError {
    /// The projector's refusal of this append, if it is one of type `R`.
    pub fn refusal<R: std::error::Error + 'static>(&self) -> Option<&R> {
        match self {
            StorageError::Refused { refusal, .. } => refusal.downcast_ref::<R>(),
            _ => None,
        }
    }
}

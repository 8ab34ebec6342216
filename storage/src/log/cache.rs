//! Streams written since the log was opened, kept whole in memory, so that reading one of them
//! costs no sled lookups. The orchestrator reads a saga's stream on every pass of its driver
//! and on every WatchSaga update; before this cache those reads (a range of the `streams`
//! index and a `get` of each record) cost about as much CPU as the appends themselves.
//!
//! # Invariant
//! An entry holds **every** record of its stream, from version 1, exactly as committed. The
//! writer (the only writer) creates an entry only with a stream's first record (version 1),
//! extends it only with the next version, and does both right after the transaction commits,
//! before the batch goes to the flusher. A stream whose entry is evicted (or grew past
//! [`STREAM_RECORDS_MAX`], or got a record larger than [`RECORD_BYTES_MAX`]) is never cached
//! again: its next append does not start at version 1. Memory is bounded by [`BYTES_MAX`].
//! So a stream either has a complete entry or none, and `None` sends the reader to sled.
//!
//! Readers see the cache as they would see sled: a batch at once (the writer applies it under
//! one lock), possibly committed but not yet flushed, so `read_stream` waits for the flush
//! after reading from either (see `EventLog::wait_durable_read`). A reader racing the writer sees the stream as it was just
//! before the commit, as a sled read racing it would.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use super::record::Record;

/// Most bytes of records the cache holds (about a thousand sagas of the orchestrator); past it
/// whole streams are evicted, oldest entry first.
pub(super) const BYTES_MAX: usize = 4 << 20;
/// Largest record kept: a stream with a larger one loses its entry (payloads may be up to
/// 1 MiB; a saga's events are a few hundred bytes).
pub(super) const RECORD_BYTES_MAX: usize = 4 << 10;
/// Most records of one stream kept; a stream growing past it loses its entry (a saga has about
/// a dozen).
pub(super) const STREAM_RECORDS_MAX: usize = 256;

#[derive(Default)]
pub(super) struct StreamCache {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    streams: HashMap<String, Vec<Record>>,
    /// Streams in the order their entries were created (may name entries dropped since; each
    /// name at most once, since an entry is only ever created at version 1).
    order: VecDeque<String>,
    bytes: usize,
}

fn bytes_of(records: &[Record]) -> usize {
    records.iter().map(|r| r.as_bytes().len()).sum()
}

impl StreamCache {
    /// Records `from..` (at most `max`) of `stream`, or `None` when the stream has no entry.
    /// `from` is a version (1 is the first record).
    pub(super) fn read(&self, stream: &str, from: u64, max: usize) -> Option<Vec<Record>> {
        let inner = self.inner.lock().expect("stream cache lock");
        let records = inner.streams.get(stream)?;
        let start = (from.max(1) - 1).min(records.len() as u64) as usize;
        let end = start.saturating_add(max).min(records.len());
        Some(records[start..end].to_vec())
    }

    /// The stream's version (its record count), or `None` when it has no entry.
    pub(super) fn version(&self, stream: &str) -> Option<u64> {
        let inner = self.inner.lock().expect("stream cache lock");
        inner.streams.get(stream).map(|records| records.len() as u64)
    }

    /// Takes the records one committed batch wrote: per append, in commit order, its stream
    /// and its records (consecutive versions). Applied under one lock, so a reader sees the
    /// whole batch or none of it.
    pub(super) fn appended(&self, appends: Vec<(&str, Vec<Record>)>) {
        let mut inner = self.inner.lock().expect("stream cache lock");
        let inner = &mut *inner;
        for (stream, records) in appends {
            let Some(first) = records.first() else {
                continue;
            };
            let first_version = first.version().get();
            let keep = records.iter().all(|r| r.as_bytes().len() <= RECORD_BYTES_MAX);
            match inner.streams.get_mut(stream) {
                Some(entry)
                    if keep
                        && entry.len() as u64 + 1 == first_version
                        && entry.len() + records.len() <= STREAM_RECORDS_MAX =>
                {
                    inner.bytes += bytes_of(&records);
                    entry.extend(records);
                }
                Some(_) => {
                    // Too long, a record too large, or not the next version (the writer's
                    // head of the stream was re-read after a failure): from now on the stream
                    // is read from sled.
                    let dropped = inner.streams.remove(stream).expect("present");
                    inner.bytes -= bytes_of(&dropped);
                }
                None if keep && first_version == 1 && records.len() <= STREAM_RECORDS_MAX => {
                    inner.bytes += bytes_of(&records);
                    inner.streams.insert(stream.to_owned(), records);
                    inner.order.push_back(stream.to_owned());
                }
                None => {}
            }
        }
        while inner.bytes > BYTES_MAX {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            if let Some(dropped) = inner.streams.remove(&oldest) {
                inner.bytes -= bytes_of(&dropped);
            }
        }
        // Names of entries dropped (too long, too large) stay in `order` until they reach its
        // front; keep the queue from growing past the entries it can name.
        if inner.order.len() > 2 * inner.streams.len() + 1024 {
            let streams = &inner.streams;
            inner.order.retain(|name| streams.contains_key(name));
        }
    }
}

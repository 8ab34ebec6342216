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
//! again: its next append does not start at version 1. Memory is bounded by [`BYTES_MAX`],
//! counted as the heap memory the entries hold (see [`entry_cost`], [`record_cost`]), not only the records' bytes:
//! most streams of a participant have one or two records of a few hundred bytes, and the keys,
//! the `Record` structs and the allocations' headers came to more than the bytes themselves.
//! So a stream either has a complete entry or none, and `None` sends the reader to sled.
//!
//! Readers see the cache as they would see sled: a batch at once (the writer applies it under
//! one lock), possibly committed but not yet flushed, so `read_stream` waits for the flush
//! after reading from either (see `EventLog::wait_durable_read`). A reader racing the writer sees the stream as it was just
//! before the commit, as a sled read racing it would.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use super::record::Record;

/// Most bytes of memory the cache's entries hold; past it whole streams are evicted, oldest
/// entry first. A saga's stream in the orchestrator holds 2-4 KB with its overheads, so this is
/// a few hundred sagas, more than it has in flight at 128 (a miss only costs a sled read). 4 MiB
/// (with 16,384 writer heads) cost about 30 MB more summed peak RSS over the five processes,
/// more than the bytes themselves, and saved no CPU the pairs could show (BENCHMARKS.md,
/// "Issue 11, 2026-12-03 (fifth session)").
pub(super) const BYTES_MAX: usize = 1 << 20;
/// What the allocator adds to each allocation (its header and rounding), about.
const ALLOCATION_OVERHEAD: usize = 16;
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

/// The heap memory an entry holds apart from its records' bytes, about: its name twice (the
/// map's key and the eviction queue's copy) with the map's and the queue's slots, and its
/// `Vec` of records (`capacity` slots).
fn entry_cost(stream: &str, capacity: usize) -> usize {
    2 * (stream.len() + ALLOCATION_OVERHEAD)
        + std::mem::size_of::<(String, Vec<Record>)>()
        + std::mem::size_of::<String>()
        + capacity * std::mem::size_of::<Record>()
        + ALLOCATION_OVERHEAD
}

/// The heap memory of a record's shared bytes, about: an `Arc<[u8]>` inside sled's `IVec`,
/// two counters before the bytes.
fn record_cost(record: &Record) -> usize {
    record.as_bytes().len() + 2 * std::mem::size_of::<usize>() + ALLOCATION_OVERHEAD
}

/// The heap memory an entry holds, about.
fn cost_of(stream: &str, records: &Vec<Record>) -> usize {
    entry_cost(stream, records.capacity()) + records.iter().map(record_cost).sum::<usize>()
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
                    let capacity = entry.capacity();
                    inner.bytes += records.iter().map(record_cost).sum::<usize>();
                    entry.extend(records);
                    inner.bytes =
                        inner.bytes - entry_cost(stream, capacity) + entry_cost(stream, entry.capacity());
                }
                Some(_) => {
                    // Too long, a record too large, or not the next version (the writer's
                    // head of the stream was re-read after a failure): from now on the stream
                    // is read from sled.
                    let dropped = inner.streams.remove(stream).expect("present");
                    inner.bytes -= cost_of(stream, &dropped);
                }
                None if keep && first_version == 1 && records.len() <= STREAM_RECORDS_MAX => {
                    inner.bytes += cost_of(stream, &records);
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
                inner.bytes -= cost_of(&oldest, &dropped);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record_format::{self, RecordFields};

    fn record(stream: &str, version: u64, payload_len: usize) -> Record {
        let (bytes, _) = record_format::encode(&RecordFields {
            position: version,
            version,
            timestamp_us: 0,
            prev_checksum: 0,
            stream,
            event_type: "StepSucceeded",
            payload: &vec![7; payload_len],
        });
        Record::verify(version, bytes.into()).expect("a record just encoded verifies")
    }

    /// The heap memory the entries hold, without the allocator's overhead: a lower bound.
    fn held(cache: &StreamCache) -> usize {
        let inner = cache.inner.lock().expect("stream cache lock");
        let entries: usize = inner
            .streams
            .iter()
            .map(|(name, records)| {
                name.capacity()
                    + records.capacity() * std::mem::size_of::<Record>()
                    + records.iter().map(|r| r.as_bytes().len()).sum::<usize>()
            })
            .sum();
        let queue: usize = inner.order.iter().map(String::capacity).sum();
        entries + queue
    }

    /// A participant's streams: one or two small records each (a step's outcome, an order),
    /// under names about as long as the records. The bound holds for the memory they take,
    /// not only for the records' bytes.
    #[test]
    fn many_small_streams_stay_within_the_memory_bound() {
        let cache = StreamCache::default();
        for saga in 0..40_000 {
            let stream = format!("step/{saga:036}/create_order");
            let first = record(&stream, 1, 60);
            let second = record(&stream, 2, 60);
            cache.appended(vec![(stream.as_str(), vec![first])]);
            cache.appended(vec![(stream.as_str(), vec![second])]);
        }
        let inner_len = cache.inner.lock().expect("stream cache lock").streams.len();
        // Such an entry takes about 1.2 KB with its overheads: the cache keeps about half the
        // streams its bound allows for, not a handful.
        assert!(
            inner_len > BYTES_MAX / 2048,
            "the cache still holds recent streams ({inner_len})"
        );
        let held = held(&cache);
        assert!(
            held <= BYTES_MAX,
            "the entries hold {held} bytes, more than the bound of {BYTES_MAX}"
        );
    }
}

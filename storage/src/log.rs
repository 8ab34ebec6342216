//! The event log: append with optimistic concurrency and group commit, reads, subscriptions.
//!
//! # Design
//!
//! One writer thread owns every write to the database. Callers hand it jobs through a bounded
//! queue (`queue_len_max`); it takes every job waiting (up to `batch_len_max`) and applies them
//! in **one sled transaction** (version checks, records, stream index, projections,
//! outbox). A second thread, the flusher, then calls **one flush** for every batch committed
//! so far and only then answers their callers. The writer does not wait for the flush: it
//! commits the next batch while the previous one is being flushed (pipelined group commit).
//! No tuning knob: a lone writer pays one flush per append, 64 writers share a few.
//!
//! Because one thread assigns positions inside the transaction, positions are gap-free and in
//! commit order, and version checks need no optimistic retry loop between writers: a stale
//! expected version is decided once, as a `VersionConflict`.
//!
//! Readers never see what is not durable yet: reads of the log stop at the durable position,
//! and reads that may see committed-but-unflushed state (stream reads, projections, outbox)
//! wait for the flush that covers what they read before they return. A crash therefore never
//! takes back something a reader was shown.
//!
//! # Trees
//!
//! - `events`: position (u64 BE) -> record (see `record_format`).
//! - `streams`: stream ++ 0x00 ++ version (u64 BE) -> position (u64 BE).
//! - Stream heads (version and checksum of the last record, for version checks and the hash
//!   chain) are not stored: the writer, the only writer, keeps them in a bounded cache and
//!   derives a missing one from the stream index and the stream's last record. That saves a
//!   read and a write per append (the writer's CPU is the limit at high concurrency).
//! - `outbox`: see `outbox`. `projections`: see `projection`.
//!
//! # Back-of-the-envelope
//!
//! A flush (fsync) of sled's log costs 0.1-1 ms here; encoding a 200-byte record and its index
//! entries is about a microsecond. So one writer is bounded by the flush (~4,000-5,000
//! appends/s), and with N writers each flush carries about N appends: throughput grows with
//! concurrency until the transaction's CPU cost (a few microseconds per event) dominates,
//! around 10^5 events/s on one core. BENCHMARKS.md checks this.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::IVec;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use tokio::sync::{mpsc, oneshot, watch};

use crate::codec;
use crate::error::StorageError;
use crate::gate::{GatePoint, GateVerdict, WriterGate};
use crate::mark::{self, Found, Mark, MarkWriter, RecentAppend};
use crate::outbox::{OUTBOX_PER_APPEND_MAX, OutboxEntry, OutboxId, OutboxMessage};
use crate::projection::{EventView, ProjectError, ProjectionTx, Projector};
use crate::record_format::{self, Layout, RecordFields};

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

/// Most events in one append.
pub const EVENTS_PER_APPEND_MAX: usize = 1024;
/// Most records returned by one read call.
pub const READ_LEN_MAX: usize = 10_000;

/// Whether an append waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Every append returns only after an fsync covered it. The only setting for production.
    Fsync,
    /// **Benchmarks only**: appends return after the transaction, without a flush; a crash can
    /// lose acknowledged events. Figures measured with it must be labelled `fsync=off`.
    NoFsyncBenchmarkOnly,
}

/// How to open a log. Every field is explicit; [`LogConfig::new`] gives the production values.
#[derive(Debug, Clone)]
pub struct LogConfig {
    pub path: PathBuf,
    pub durability: Durability,
    /// sled's page cache, in bytes.
    pub cache_capacity_bytes: u64,
    /// Most jobs the writer commits in one transaction and one flush.
    pub batch_len_max: usize,
    /// Most jobs waiting for the writer; further appends wait (back-pressure).
    pub queue_len_max: usize,
    /// Test hook: holds the writer at a named point (see `gate`). `None` in production.
    pub gate: Option<Arc<WriterGate>>,
    /// Open a log that lost acknowledged records (it ends before its durable mark, see
    /// `mark`) instead of refusing it, and record that decision as a `LostTailAccepted` event
    /// in stream [`LOG_STREAM`]. An operator's decision, never a default.
    pub accept_lost_tail: bool,
}

impl LogConfig {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        LogConfig {
            path: path.into(),
            durability: Durability::Fsync,
            cache_capacity_bytes: 64 * 1024 * 1024,
            batch_len_max: 512,
            queue_len_max: 8192,
            gate: None,
            accept_lost_tail: false,
        }
    }
}

/// What the writer expects a stream's version to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Append whatever the version is.
    Any,
    /// The stream must not exist yet (version 0).
    NoStream,
    /// The stream must be at exactly this version (its number of events; 0 = no stream).
    Exact(u64),
}

impl ExpectedVersion {
    fn admits(self, actual: u64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => actual == 0,
            ExpectedVersion::Exact(v) => actual == v,
        }
    }
}

/// An event to append: its type and its payload, already encoded (see [`NewEvent::encode`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub event_type: String,
    pub payload: Vec<u8>,
}

impl NewEvent {
    pub fn new(event_type: impl Into<String>, payload: Vec<u8>) -> Self {
        NewEvent {
            event_type: event_type.into(),
            payload,
        }
    }

    /// Encodes `value` with the project's codec.
    pub fn encode<T: Serialize + ?Sized>(
        event_type: impl Into<String>,
        value: &T,
    ) -> Result<Self, StorageError> {
        Ok(NewEvent::new(event_type, codec::encode(value)?))
    }
}

/// One atomic append: events to one stream, and outbox messages decided by them.
#[derive(Debug, Clone)]
pub struct AppendRequest {
    pub stream: String,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
    pub outbox: Vec<OutboxMessage>,
}

impl AppendRequest {
    pub fn new(stream: impl Into<String>, expected: ExpectedVersion) -> Self {
        AppendRequest {
            stream: stream.into(),
            expected,
            events: Vec::new(),
            outbox: Vec::new(),
        }
    }

    pub fn event(mut self, event: NewEvent) -> Self {
        self.events.push(event);
        self
    }

    pub fn events(mut self, events: impl IntoIterator<Item = NewEvent>) -> Self {
        self.events.extend(events);
        self
    }

    pub fn outbox(mut self, message: OutboxMessage) -> Self {
        self.outbox.push(message);
        self
    }

    fn validate(&self) -> Result<(), StorageError> {
        if self.events.is_empty() || self.events.len() > EVENTS_PER_APPEND_MAX {
            return Err(StorageError::Invalid {
                field: "events",
                reason: format!("must hold 1..={EVENTS_PER_APPEND_MAX} events"),
            });
        }
        if self.outbox.len() > OUTBOX_PER_APPEND_MAX {
            return Err(StorageError::Invalid {
                field: "outbox",
                reason: format!("at most {OUTBOX_PER_APPEND_MAX} messages"),
            });
        }
        for event in &self.events {
            record_format::validate_names(&self.stream, &event.event_type)?;
            if event.payload.len() > record_format::PAYLOAD_LEN_MAX {
                return Err(StorageError::Invalid {
                    field: "payload",
                    reason: format!("at most {} bytes", record_format::PAYLOAD_LEN_MAX),
                });
            }
        }
        Ok(())
    }
}

/// Where an append landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The stream's version after the append (the version of its last event).
    pub stream_version: u64,
    /// Global positions of the append's first and last events.
    pub first_position: u64,
    pub last_position: u64,
}

/// A stored record, verified when read. Holds the stored bytes; accessors borrow from them.
#[derive(Clone)]
pub struct Record {
    bytes: IVec,
    layout: Layout,
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("position", &self.position())
            .field("stream", &self.stream())
            .field("version", &self.version())
            .field("event_type", &self.event_type())
            .field("payload_len", &self.payload().len())
            .finish()
    }
}

impl Record {
    /// Verifies `bytes` read from `position`: checksum, layout, and that the record says it is
    /// the record at that position.
    pub(crate) fn verify(position: u64, bytes: IVec) -> Result<Record, StorageError> {
        let layout = record_format::decode(&bytes).map_err(|e| StorageError::Corrupt {
            position,
            reason: e.to_string(),
        })?;
        if layout.position != position {
            return Err(StorageError::Corrupt {
                position,
                reason: format!("record says it is at position {}", layout.position),
            });
        }
        Ok(Record { bytes, layout })
    }

    fn str_at(&self, (start, end): (usize, usize)) -> &str {
        std::str::from_utf8(&self.bytes[start..end]).expect("validated as UTF-8 by record_format::decode")
    }

    pub fn position(&self) -> u64 {
        self.layout.position
    }
    pub fn version(&self) -> u64 {
        self.layout.version
    }
    pub fn stream(&self) -> &str {
        self.str_at(self.layout.stream)
    }
    pub fn event_type(&self) -> &str {
        self.str_at(self.layout.event_type)
    }
    pub fn timestamp_us(&self) -> i64 {
        self.layout.timestamp_us
    }
    pub fn payload(&self) -> &[u8] {
        &self.bytes[self.layout.payload.0..self.layout.payload.1]
    }
    /// This record's checksum; the next record of the stream stores it as `prev_checksum`.
    pub fn checksum(&self) -> u64 {
        self.layout.checksum
    }
    pub fn prev_checksum(&self) -> u64 {
        self.layout.prev_checksum
    }
    /// The record exactly as stored.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
    /// Decodes the payload with the project's codec.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, StorageError> {
        codec::decode(self.payload()).map_err(|e| StorageError::Corrupt {
            position: self.position(),
            reason: format!("payload of {}: {e}", self.event_type()),
        })
    }
}

/// Counters for benchmarks and diagnostics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    pub batches: u64,
    pub flushes: u64,
    pub appends: u64,
    pub events: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Durable {
    /// Batches committed and covered by a flush.
    seq: u64,
    /// Highest durable global position (0 = empty log).
    position: u64,
    /// The writer stopped after a storage failure.
    failed: bool,
}

#[derive(Clone)]
struct Trees {
    db: sled::Db,
    events: sled::Tree,
    streams: sled::Tree,
    outbox: sled::Tree,
    projections: sled::Tree,
}

struct Shared {
    trees: Trees,
    durable: watch::Receiver<Durable>,
    /// Batches committed (maybe not yet flushed).
    committed_seq: AtomicU64,
    batches: AtomicU64,
    flushes: AtomicU64,
    appends: AtomicU64,
    events: AtomicU64,
}

enum Job {
    Append {
        request: AppendRequest,
        outbox: Vec<Vec<u8>>,
        reply: oneshot::Sender<Result<Appended, StorageError>>,
    },
    AckOutbox {
        ids: Vec<OutboxId>,
        reply: oneshot::Sender<Result<(), StorageError>>,
    },
}

/// Stops the writer when the last handle to the log goes away, and waits for it, so that the
/// database is released (and can be reopened) once every `EventLog` clone is dropped.
struct WriterHandle {
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        // Runs when the last `EventLog` clone is dropped; its job sender was dropped just
        // before (field order), so the writer sees the queue closed and exits.
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            // The writer finishes its current batch and exits; a panic there was already
            // reported by the panic hook.
            let _ = thread.join();
        }
    }
}

/// A durable, append-only event log on sled. Cheap to clone; all clones share one writer.
#[derive(Clone)]
pub struct EventLog {
    // Field order matters: fields drop in declaration order, and the writer thread exits only
    // once every job sender is gone, so `jobs` must drop before `_writer` joins the thread.
    jobs: mpsc::Sender<Job>,
    shared: Arc<Shared>,
    _writer: Arc<WriterHandle>,
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

pub(crate) fn stream_key(stream: &str, version: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(stream.len() + 9);
    key.extend_from_slice(stream.as_bytes());
    key.push(0);
    key.extend_from_slice(&version.to_be_bytes());
    key
}

pub(crate) fn decode_position(tree: &'static str, key: &[u8], value: &[u8]) -> Result<u64, StorageError> {
    let bytes: [u8; 8] = value.try_into().map_err(|_| StorageError::CorruptIndex {
        tree,
        key: key.to_vec(),
        reason: format!("value of {} bytes, expected 8", value.len()),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

/// The stream's last (version, position) from the stream index, if it has any event.
fn last_version(streams: &sled::Tree, stream: &str) -> Result<Option<(u64, u64)>, StorageError> {
    let Some(entry) = streams
        .range(stream_key(stream, 1)..=stream_key(stream, u64::MAX))
        .next_back()
    else {
        return Ok(None);
    };
    let (key, value) = entry?;
    let position = decode_position("streams", &key, &value)?;
    let version_bytes: [u8; 8] = key[key.len() - 8..]
        .try_into()
        .expect("stream keys end in 8 bytes");
    Ok(Some((u64::from_be_bytes(version_bytes), position)))
}

/// A stream's head: its version and the checksum of its last record (0, 0 for a new stream),
/// from committed data.
fn load_head(trees: &Trees, stream: &str) -> Result<(u64, u64), StorageError> {
    let Some((version, position)) = last_version(&trees.streams, stream)? else {
        return Ok((0, 0));
    };
    let bytes = trees
        .events
        .get(position.to_be_bytes())?
        .ok_or_else(|| StorageError::Corrupt {
            position,
            reason: "indexed record is missing".into(),
        })?;
    let record = Record::verify(position, bytes)?;
    if record.version() != version || record.stream() != stream {
        return Err(StorageError::Corrupt {
            position,
            reason: format!("index says {stream:?} v{version}, record disagrees"),
        });
    }
    Ok((version, record.checksum()))
}

/// How long `open` waits for sled's file lock. After the last handle of a database is dropped,
/// sled's I/O threads can hold the file for a moment, so an immediate reopen in the same
/// process (tests, the embedded queue's restart) can find it locked. Another process holding it
/// for longer still gets the error.
const LOCK_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(2);

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
fn checksum_at(events: &sled::Tree, position: u64) -> Result<Option<u64>, StorageError> {
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
fn record_lost_tail(trees: &Trees, refusal: &StorageError, last_position: u64) -> Result<u64, StorageError> {
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

/// Most stream heads the writer caches; past it the cache is emptied (heads are re-derived on
/// demand), so memory stays bounded however many streams exist.
const HEAD_CACHE_LEN_MAX: usize = 100_000;

impl EventLog {
    /// Opens (or creates) the log at `config.path` without projections.
    pub fn open(config: LogConfig) -> Result<EventLog, StorageError> {
        Self::open_with(config, None)
    }

    /// Opens (or creates) the log, keeping `projector`'s read models in every append's
    /// transaction. Recovery is sled's own: after a crash the log holds exactly the
    /// transactions that were complete on disk, and nothing of a torn one.
    pub fn open_with(
        config: LogConfig,
        projector: Option<Arc<dyn Projector>>,
    ) -> Result<EventLog, StorageError> {
        if config.batch_len_max == 0 || config.queue_len_max == 0 {
            return Err(StorageError::Invalid {
                field: "config",
                reason: "batch_len_max and queue_len_max must be positive".into(),
            });
        }
        let sled_config = sled::Config::new()
            .path(&config.path)
            .cache_capacity(config.cache_capacity_bytes)
            .mode(sled::Mode::HighThroughput)
            // We flush ourselves, once per batch; sled's timer would only add flushes.
            .flush_every_ms(None);
        let db = open_sled(&sled_config, &config.path)?;
        let trees = Trees {
            events: db.open_tree("events")?,
            streams: db.open_tree("streams")?,
            outbox: db.open_tree("outbox")?,
            projections: db.open_tree("projections")?,
            db,
        };
        let mut last_position = match trees.events.last()? {
            Some((key, _)) => decode_position("events", &key, &key)?,
            None => 0,
        };
        let start_mark = match check_mark(&config.path, &trees.events, last_position) {
            Ok(mark) => mark,
            Err(refusal @ (StorageError::LostTail { .. } | StorageError::MarkDisagrees { .. }))
                if config.accept_lost_tail =>
            {
                last_position = record_lost_tail(&trees, &refusal, last_position)?;
                Mark {
                    position: last_position,
                    checksum: checksum_at(&trees.events, last_position)?.unwrap_or(0),
                    recent: Vec::new(),
                }
            }
            Err(refusal) => return Err(refusal),
        };
        // Only a log whose appends are flushed keeps a mark: without fsync the mark could run
        // ahead of what a crash keeps.
        let mark_writer = match config.durability {
            Durability::Fsync => Some(MarkWriter::open(&config.path, &start_mark)?),
            Durability::NoFsyncBenchmarkOnly => None,
        };
        let (durable_tx, durable_rx) = watch::channel(Durable {
            seq: 0,
            position: last_position,
            failed: false,
        });
        let shared = Arc::new(Shared {
            trees: trees.clone(),
            durable: durable_rx,
            committed_seq: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            appends: AtomicU64::new(0),
            events: AtomicU64::new(0),
        });
        let (jobs_tx, jobs_rx) = mpsc::channel(config.queue_len_max);
        let writer = Writer {
            trees,
            projector,
            shared: Arc::clone(&shared),
            durable: durable_tx,
            durability: config.durability,
            batch_len_max: config.batch_len_max,
            next_position: last_position + 1,
            last_checksum: start_mark.checksum,
            seq: 0,
            heads: HashMap::new(),
            gate: config.gate.clone(),
            mark: mark_writer,
        };
        let thread = std::thread::Builder::new()
            .name("saga-log-writer".into())
            .spawn(move || writer.run(jobs_rx))
            .map_err(|e| StorageError::Failed(format!("spawn writer thread: {e}")))?;
        Ok(EventLog {
            jobs: jobs_tx,
            shared,
            _writer: Arc::new(WriterHandle {
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// Appends `request.events` to `request.stream` and writes `request.outbox`, atomically.
    ///
    /// **Durability**: returns `Ok` only after the events, their index entries, projections
    /// and outbox entries are flushed to disk (fsync), under [`Durability::Fsync`]. Concurrent
    /// appends share one flush. An `Err` other than `FlushFailed` means nothing was written.
    ///
    /// **Concurrency**: if the stream is not at `request.expected`, nothing is written and the
    /// result is `VersionConflict` with the actual version.
    pub async fn append(&self, request: AppendRequest) -> Result<Appended, StorageError> {
        request.validate()?;
        let outbox = request
            .outbox
            .iter()
            .map(codec::encode)
            .collect::<Result<Vec<_>, _>>()?;
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job::Append {
                request,
                outbox,
                reply,
            })
            .await
            .map_err(|_| StorageError::Closed)?;
        answer.await.map_err(|_| StorageError::Closed)?
    }

    /// The stream's current version (0 if it does not exist), as durable.
    pub async fn stream_version(&self, stream: &str) -> Result<u64, StorageError> {
        let version = last_version(&self.shared.trees.streams, stream)?.map_or(0, |(version, _)| version);
        self.wait_durable_read().await?;
        Ok(version)
    }

    /// Up to `max` records of `stream` from `from_version` (1-based), in order. Verifies each
    /// record and the hash chain between consecutive records.
    pub async fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        max: usize,
    ) -> Result<Vec<Record>, StorageError> {
        let max = max.min(READ_LEN_MAX);
        let from_version = from_version.max(1);
        let trees = &self.shared.trees;
        let start = stream_key(stream, from_version);
        let end = stream_key(stream, u64::MAX);
        let mut records: Vec<Record> = Vec::new();
        let mut prev_checksum = None;
        if from_version > 1 {
            // The record before the range anchors the chain check of the first one.
            if let Some(value) = trees.streams.get(stream_key(stream, from_version - 1))? {
                let position = decode_position("streams", &start, &value)?;
                prev_checksum = Some(self.record_at(position)?.checksum());
            }
        } else {
            prev_checksum = Some(0);
        }
        for entry in trees.streams.range(start..=end).take(max) {
            let (key, value) = entry?;
            let position = decode_position("streams", &key, &value)?;
            let record = self.record_at(position)?;
            let expected_version = from_version + records.len() as u64;
            if record.stream() != stream || record.version() != expected_version {
                return Err(StorageError::Corrupt {
                    position,
                    reason: format!(
                        "index says {stream:?} v{expected_version}, record says {:?} v{}",
                        record.stream(),
                        record.version()
                    ),
                });
            }
            if let Some(prev) = prev_checksum
                && record.prev_checksum() != prev
            {
                return Err(StorageError::Corrupt {
                    position,
                    reason: "hash chain broken: prev_checksum does not match the previous record".into(),
                });
            }
            prev_checksum = Some(record.checksum());
            records.push(record);
        }
        self.wait_durable_read().await?;
        Ok(records)
    }

    /// Up to `max` durable records of the whole log from global position `from` (1-based).
    pub fn read_all(&self, from: u64, max: usize) -> Result<Vec<Record>, StorageError> {
        let durable = self.shared.durable.borrow().position;
        read_range(
            &self.shared.trees.events,
            from.max(1),
            durable,
            max.min(READ_LEN_MAX),
        )
    }

    /// The highest durable global position (0 for an empty log).
    pub fn durable_position(&self) -> u64 {
        self.shared.durable.borrow().position
    }

    /// A live tail of the log from global position `from`: first the records already durable,
    /// then each new one as it becomes durable. Every position is delivered exactly once, in
    /// order: catch-up and live reads are the same read of the `events` tree, bounded by the
    /// durable position, so there is no hand-over where a record could be skipped or repeated.
    pub fn subscribe(&self, from: u64) -> Subscription {
        Subscription {
            events: self.shared.trees.events.clone(),
            durable: self.shared.durable.clone(),
            next: from.max(1),
            buffer: std::collections::VecDeque::new(),
        }
    }

    /// Reads a projection value (written by the projector in an append's transaction). Waits
    /// until what it read is durable.
    pub async fn projection_get(&self, key: impl AsRef<[u8]>) -> Result<Option<IVec>, StorageError> {
        let value = self.shared.trees.projections.get(key)?;
        self.wait_durable_read().await?;
        Ok(value)
    }

    /// Up to `max` projection entries whose key starts with `prefix`, in key order, from
    /// `after` (exclusive) when given. Waits until what it read is durable.
    pub async fn projection_scan_prefix(
        &self,
        prefix: impl AsRef<[u8]>,
        after: Option<&[u8]>,
        max: usize,
    ) -> Result<Vec<(IVec, IVec)>, StorageError> {
        let max = max.min(READ_LEN_MAX);
        let prefix = prefix.as_ref();
        // Seek straight to the first key after `after` (the smallest key above it is `after`
        // followed by a zero byte): paging costs the page, not everything before it.
        let start = match after {
            Some(after) if after >= prefix => {
                let mut start = after.to_vec();
                start.push(0);
                start
            }
            _ => prefix.to_vec(),
        };
        let mut out = Vec::new();
        for entry in self.shared.trees.projections.range(start..) {
            let (key, value) = entry?;
            if !key.starts_with(prefix) || out.len() >= max {
                break;
            }
            out.push((key, value));
        }
        self.wait_durable_read().await?;
        Ok(out)
    }

    /// Up to `max` outbox entries not yet acknowledged, oldest first. Only entries whose
    /// deciding events are durable are listed.
    pub fn outbox_pending(&self, max: usize) -> Result<Vec<OutboxEntry>, StorageError> {
        let durable = self.shared.durable.borrow().position;
        let mut out = Vec::new();
        for entry in self.shared.trees.outbox.iter() {
            let (key, value) = entry?;
            let id = OutboxId::from_key(&key).ok_or_else(|| StorageError::CorruptIndex {
                tree: "outbox",
                key: key.to_vec(),
                reason: "key is not 10 bytes".into(),
            })?;
            if id.position > durable || out.len() >= max.min(READ_LEN_MAX) {
                break;
            }
            let message = codec::decode(&value).map_err(|e| StorageError::CorruptIndex {
                tree: "outbox",
                key: key.to_vec(),
                reason: e.to_string(),
            })?;
            out.push(OutboxEntry { id, message });
        }
        Ok(out)
    }

    /// Deletes acknowledged outbox entries. Returns once the deletion is committed; it becomes
    /// durable with the next flush (a deletion lost in a crash only means a harmless resend).
    pub async fn outbox_ack(&self, ids: Vec<OutboxId>) -> Result<(), StorageError> {
        if ids.is_empty() {
            return Ok(());
        }
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job::AckOutbox { ids, reply })
            .await
            .map_err(|_| StorageError::Closed)?;
        answer.await.map_err(|_| StorageError::Closed)?
    }

    /// Waits until the durable position is at least `position` (or the log fails).
    pub async fn wait_durable_position(&self, position: u64) -> Result<(), StorageError> {
        let mut durable = self.shared.durable.clone();
        let seen = durable
            .wait_for(|d| d.position >= position || d.failed)
            .await
            .map_err(|_| StorageError::Closed)?;
        if seen.failed {
            return Err(StorageError::Failed("writer stopped".into()));
        }
        Ok(())
    }

    /// Counters since open.
    pub fn stats(&self) -> LogStats {
        LogStats {
            batches: self.shared.batches.load(Ordering::Relaxed),
            flushes: self.shared.flushes.load(Ordering::Relaxed),
            appends: self.shared.appends.load(Ordering::Relaxed),
            events: self.shared.events.load(Ordering::Relaxed),
        }
    }

    fn record_at(&self, position: u64) -> Result<Record, StorageError> {
        match self.shared.trees.events.get(position.to_be_bytes())? {
            Some(bytes) => Record::verify(position, bytes),
            None => Err(StorageError::Corrupt {
                position,
                reason: "indexed record is missing".into(),
            }),
        }
    }

    /// Waits until everything committed before this call is durable: called after a read that
    /// may have seen committed-but-unflushed state, so that the reader is never shown
    /// something a crash could take back.
    async fn wait_durable_read(&self) -> Result<(), StorageError> {
        let committed = self.shared.committed_seq.load(Ordering::Acquire);
        let mut durable = self.shared.durable.clone();
        let seen = durable
            .wait_for(|d| d.seq >= committed || d.failed)
            .await
            .map_err(|_| StorageError::Closed)?;
        if seen.failed && seen.seq < committed {
            return Err(StorageError::Failed(
                "writer stopped before the read became durable".into(),
            ));
        }
        Ok(())
    }
}

/// Records `from..=to` (at most `max`), verified.
fn read_range(events: &sled::Tree, from: u64, to: u64, max: usize) -> Result<Vec<Record>, StorageError> {
    let mut out = Vec::new();
    if from > to {
        return Ok(out);
    }
    for (expected, entry) in (from..).zip(events.range(from.to_be_bytes()..=to.to_be_bytes()).take(max)) {
        let (key, value) = entry?;
        let position = decode_position("events", &key, &key)?;
        if position != expected {
            return Err(StorageError::Corrupt {
                position: expected,
                reason: "record missing from the log".into(),
            });
        }
        out.push(Record::verify(position, value)?);
    }
    if out.is_empty() {
        return Err(StorageError::Corrupt {
            position: from,
            reason: "durable record missing from the log".into(),
        });
    }
    Ok(out)
}

/// A live tail of the log; see [`EventLog::subscribe`].
pub struct Subscription {
    events: sled::Tree,
    durable: watch::Receiver<Durable>,
    next: u64,
    buffer: std::collections::VecDeque<Record>,
}

/// Records a subscription reads from the tree at a time.
const SUBSCRIPTION_CHUNK_LEN: usize = 512;

impl Subscription {
    /// The next record, waiting until one is durable. `Err(Closed)` once the log is closed
    /// and everything durable was delivered.
    pub async fn next(&mut self) -> Result<Record, StorageError> {
        loop {
            if let Some(record) = self.buffer.pop_front() {
                return Ok(record);
            }
            let durable = *self.durable.borrow_and_update();
            if durable.position >= self.next {
                let records = read_range(&self.events, self.next, durable.position, SUBSCRIPTION_CHUNK_LEN)?;
                self.next += records.len() as u64;
                self.buffer.extend(records);
                continue;
            }
            if durable.failed {
                return Err(StorageError::Failed("writer stopped".into()));
            }
            self.durable.changed().await.map_err(|_| StorageError::Closed)?;
        }
    }

    /// The position of the next record this subscription will deliver.
    pub fn next_position(&self) -> u64 {
        self.next - self.buffer.len() as u64
    }
}

/// A job's outcome inside the transaction, before the flush decides whether it stands.
enum Outcome {
    Appended(Appended),
    Acked,
    Failed(StorageError),
}

/// A storage error in one of a batch's transactions; `committed`: the jobs of the batch's
/// earlier transactions, which are in sled.
struct CommitFailed {
    error: sled::Error,
    committed: Vec<usize>,
}

/// Why a transaction attempt was aborted: one job must be left out of the batch.
struct LeaveOut {
    index: usize,
    error: StorageError,
}

struct Writer {
    trees: Trees,
    projector: Option<Arc<dyn Projector>>,
    shared: Arc<Shared>,
    durable: watch::Sender<Durable>,
    durability: Durability,
    batch_len_max: usize,
    next_position: u64,
    /// The checksum of the record at `next_position - 1` (0 for an empty log).
    last_checksum: u64,
    seq: u64,
    /// stream -> (version, checksum of its last record), for committed data only.
    heads: HashMap<String, (u64, u64)>,
    gate: Option<Arc<WriterGate>>,
    /// Handed to the flusher when it starts.
    mark: Option<MarkWriter>,
}

/// A committed batch on its way to the flusher.
struct Committed {
    seq: u64,
    /// Highest position written by this batch or any before it.
    position: u64,
    /// The batch wrote events, so its answer must wait for a flush.
    needs_flush: bool,
    /// The checksum of the record at `position`.
    checksum: u64,
    /// The batch's last appends (for the durable mark), oldest first.
    appends: Vec<RecentAppend>,
    jobs: Vec<(Job, Outcome)>,
}

/// Committed batches that may wait for the flusher; the writer blocks beyond this
/// (back-pressure instead of an unbounded queue).
const FLUSH_QUEUE_LEN_MAX: usize = 64;

impl Writer {
    /// The writer thread: commits batches and hands them to the flusher thread, so that the
    /// next batch is committed while the previous one is being flushed (pipelined group commit).
    fn run(mut self, mut jobs: mpsc::Receiver<Job>) {
        let (to_flusher, from_writer) = std::sync::mpsc::sync_channel::<Committed>(FLUSH_QUEUE_LEN_MAX);
        let flusher = Flusher {
            db: self.trees.db.clone(),
            shared: Arc::clone(&self.shared),
            durable: self.durable.clone(),
            durability: self.durability,
            failure: None,
            mark: self.mark.take(),
        };
        let flusher = std::thread::Builder::new()
            .name("saga-log-flusher".into())
            .spawn(move || flusher.run(from_writer))
            .expect("spawn the flusher thread");
        let mut batch = Vec::with_capacity(self.batch_len_max);
        while let Some(job) = jobs.blocking_recv() {
            batch.push(job);
            while batch.len() < self.batch_len_max {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            if let Some(committed) = self.process(&mut batch)
                && let Err(unsent) = to_flusher.send(committed)
            {
                // The flusher is gone (it panicked): nothing can become durable any more.
                for (job, _) in unsent.0.jobs {
                    reply(
                        job,
                        Outcome::Failed(StorageError::Failed("flusher stopped".into())),
                    );
                }
            }
        }
        drop(to_flusher);
        let _ = flusher.join();
    }

    /// Commits one batch. Returns it for the flusher, or `None` when it was answered already.
    fn process(&mut self, batch: &mut Vec<Job>) -> Option<Committed> {
        if self.durable.borrow().failed {
            for job in batch.drain(..) {
                reply(
                    job,
                    Outcome::Failed(StorageError::Failed("an earlier flush failed".into())),
                );
            }
            return None;
        }
        if let Some(gate) = &self.gate
            && gate.pass(GatePoint::BeforeCommit) == GateVerdict::Fail
        {
            // A simulated crash: the batch never reaches sled, and nothing after it may.
            self.durable.send_modify(|d| d.failed = true);
            for job in batch.drain(..) {
                reply(
                    job,
                    Outcome::Failed(StorageError::Failed("crash simulated by the writer gate".into())),
                );
            }
            return None;
        }
        let timestamp_us = now_us();
        // Raise the bar before the data becomes visible: a reader that sees anything of this
        // batch (sled shows a transaction's writes as soon as it commits) loads a committed
        // sequence that includes it, so it waits for the flush that covers it.
        self.shared.committed_seq.store(self.seq + 1, Ordering::Release);
        let (outcomes, next_position, last_checksum) = match self.commit(batch, timestamp_us) {
            Ok(committed) => committed,
            Err(CommitFailed { error, committed }) => {
                // A storage error inside a transaction: the database is no longer trusted.
                // Jobs of an earlier transaction of this batch (before a refused job) are in
                // sled but will never be flushed by us: their outcome is unknown, not "nothing
                // written"; the others were not written.
                tracing::error!(%error, "event log transaction failed; refusing further writes");
                self.durable.send_modify(|d| d.failed = true);
                for (index, job) in batch.drain(..).enumerate() {
                    let failure = if committed.contains(&index) {
                        StorageError::FlushFailed(format!(
                            "committed, then a later transaction of its batch failed: {error}"
                        ))
                    } else {
                        StorageError::Sled(error.clone())
                    };
                    reply(job, Outcome::Failed(failure));
                }
                return None;
            }
        };
        if let Some(gate) = &self.gate {
            gate.pass(GatePoint::AfterCommit);
        }
        self.seq += 1;
        self.shared.batches.fetch_add(1, Ordering::Relaxed);
        let needs_flush = next_position != self.next_position;
        self.next_position = next_position;
        let mut appends = Vec::new();
        for (job, outcome) in batch.iter().zip(&outcomes).rev() {
            if appends.len() == mark::RECENT_LEN_MAX {
                break;
            }
            if let (Job::Append { request, .. }, Outcome::Appended(appended)) = (job, outcome) {
                appends.push(RecentAppend {
                    first_position: appended.first_position,
                    last_position: appended.last_position,
                    stream: request.stream.clone(),
                });
            }
        }
        appends.sort_by_key(|a| a.first_position);
        Some(Committed {
            seq: self.seq,
            position: next_position - 1,
            needs_flush,
            checksum: last_checksum,
            appends,
            jobs: batch.drain(..).zip(outcomes).collect(),
        })
    }

    /// Applies the batch in as few transactions as possible. A job a projector refuses is
    /// left out: the jobs before it (which passed the projector in the same order) are
    /// committed in one transaction, and the rest of the batch goes on in the next. So each
    /// job runs through the projector at most twice, however many are refused (participants'
    /// guards refuse often: out of stock, insufficient balance).
    /// Returns the outcomes, the next position and the checksum of the last record written
    /// (`last_checksum`, unchanged when the batch wrote none).
    fn commit(&mut self, batch: &[Job], timestamp_us: i64) -> Result<(Vec<Outcome>, u64, u64), CommitFailed> {
        let mut left_out: HashMap<usize, StorageError> = HashMap::new();
        // Heads of streams not in the cache, loaded before the transaction: sled's concurrency
        // control is one process-wide fair RwLock, and a plain read inside a transaction
        // closure can deadlock against another thread's commit waiting for the write lock.
        let mut loaded: HashMap<&str, (u64, u64)> = HashMap::new();
        for (index, job) in batch.iter().enumerate() {
            if let Job::Append { request, .. } = job {
                let stream = request.stream.as_str();
                if self.heads.contains_key(stream) || loaded.contains_key(stream) {
                    continue;
                }
                match load_head(&self.trees, stream) {
                    Ok(head) => {
                        loaded.insert(stream, head);
                    }
                    Err(error) => {
                        left_out.insert(index, error);
                    }
                }
            }
        }
        let mut outcomes: Vec<Option<Outcome>> = batch.iter().map(|_| None).collect();
        // Heads written by the committed segments of this batch (merged into the cache at
        // the end, so that the cache's bound never drops a head a later segment needs).
        let mut batch_heads: HashMap<&str, (u64, u64)> = HashMap::new();
        let mut position = self.next_position;
        let (mut start, mut end) = (0, batch.len());
        while start < batch.len() {
            let heads = Heads {
                batch: &batch_heads,
                cache: &self.heads,
                loaded: &loaded,
            };
            let segment = self
                .transact(batch, start..end, &left_out, &heads, position, timestamp_us)
                .map_err(|error| CommitFailed {
                    error,
                    committed: (0..batch.len())
                        .filter(|&i| matches!(outcomes[i], Some(Outcome::Appended(_) | Outcome::Acked)))
                        .collect(),
                })?;
            match segment {
                Ok(segment) => {
                    for (index, outcome) in segment.outcomes {
                        outcomes[index] = Some(outcome);
                    }
                    batch_heads.extend(segment.heads);
                    position = segment.next_position;
                    (start, end) = (end, batch.len());
                }
                Err(LeaveOut { index, error }) => {
                    assert!(left_out.insert(index, error).is_none(), "a job is left out once");
                    if index > start {
                        // Commit what precedes the refused job; the rest goes on after it.
                        end = index;
                    } else {
                        (start, end) = (index + 1, batch.len());
                    }
                }
            }
        }
        // The last record written is the last record of the stream of the batch's last append.
        let last_stream = batch
            .iter()
            .zip(&outcomes)
            .rev()
            .find_map(|(job, outcome)| match (job, outcome) {
                (Job::Append { request, .. }, Some(Outcome::Appended(_))) => Some(request.stream.as_str()),
                _ => None,
            });
        if let Some(stream) = last_stream {
            self.last_checksum = batch_heads.get(stream).expect("appended streams have a head").1;
        }
        if self.heads.len() + batch_heads.len() > HEAD_CACHE_LEN_MAX {
            self.heads.clear();
        }
        for (stream, head) in batch_heads {
            self.heads.insert(stream.to_owned(), head);
        }
        let outcomes = outcomes
            .into_iter()
            .enumerate()
            .map(|(index, outcome)| match outcome {
                Some(outcome) => outcome,
                None => Outcome::Failed(
                    left_out
                        .remove(&index)
                        .expect("a job without outcome was left out with an error"),
                ),
            })
            .collect();
        Ok((outcomes, position, self.last_checksum))
    }

    /// One transaction over the jobs `range` of `batch` (minus those left out), from global
    /// position `position`. `Err(LeaveOut)` when the projector refused a job: nothing of this
    /// transaction was written.
    fn transact<'b>(
        &self,
        batch: &'b [Job],
        range: std::ops::Range<usize>,
        left_out: &HashMap<usize, StorageError>,
        heads: &Heads<'_, 'b>,
        position: u64,
        timestamp_us: i64,
    ) -> Result<Result<Segment<'b>, LeaveOut>, sled::Error> {
        let t = &self.trees;
        let result = (&t.events, &t.streams, &t.outbox, &t.projections).transaction(
            |(events, streams, outbox, projections)| {
                // Heads written by this attempt.
                let mut new_heads: HashMap<&'b str, (u64, u64)> = HashMap::new();
                let mut position = position;
                let mut outcomes = Vec::with_capacity(range.len());
                for index in range.clone() {
                    if left_out.contains_key(&index) {
                        continue;
                    }
                    let job = &batch[index];
                    let (request, encoded_outbox) = match job {
                        Job::AckOutbox { ids, .. } => {
                            for id in ids {
                                outbox.remove(&id.to_key())?;
                            }
                            outcomes.push((index, Outcome::Acked));
                            continue;
                        }
                        Job::Append { request, outbox, .. } => (request, outbox),
                    };
                    let stream = request.stream.as_str();
                    let head = new_heads.get(stream).copied().or_else(|| heads.get(stream));
                    let Some((mut version, mut prev_checksum)) = head else {
                        // Loading this stream's head failed for an earlier job of the batch
                        // (that job carries the error).
                        outcomes.push((
                            index,
                            Outcome::Failed(StorageError::Failed(format!(
                                "the head of stream {stream:?} could not be read"
                            ))),
                        ));
                        continue;
                    };
                    if !request.expected.admits(version) {
                        outcomes.push((
                            index,
                            Outcome::Failed(StorageError::VersionConflict {
                                stream: stream.to_owned(),
                                expected: request.expected,
                                actual: version,
                            }),
                        ));
                        continue;
                    }
                    let first_position = position;
                    for event in &request.events {
                        version += 1;
                        let (bytes, checksum) = record_format::encode(&RecordFields {
                            position,
                            version,
                            timestamp_us,
                            prev_checksum,
                            stream,
                            event_type: &event.event_type,
                            payload: &event.payload,
                        });
                        if let Some(projector) = &self.projector {
                            let view = EventView {
                                position,
                                stream,
                                version,
                                event_type: &event.event_type,
                                timestamp_us,
                                payload: &event.payload,
                            };
                            let mut tx = ProjectionTx { tree: projections };
                            match projector.project(&view, &mut tx) {
                                Ok(()) => {}
                                Err(ProjectError::Tx(error)) => return Err(error.into()),
                                Err(ProjectError::Refused(reason)) => {
                                    return Err(ConflictableTransactionError::Abort(LeaveOut {
                                        index,
                                        error: StorageError::Projection {
                                            stream: stream.to_owned(),
                                            event_type: event.event_type.clone(),
                                            reason,
                                        },
                                    }));
                                }
                            }
                        }
                        events.insert(&position.to_be_bytes(), bytes)?;
                        streams.insert(stream_key(stream, version), &position.to_be_bytes())?;
                        prev_checksum = checksum;
                        position += 1;
                    }
                    new_heads.insert(stream, (version, prev_checksum));
                    for (i, body) in encoded_outbox.iter().enumerate() {
                        let id = OutboxId {
                            position: first_position,
                            index: i as u16,
                        };
                        outbox.insert(&id.to_key(), body.as_slice())?;
                    }
                    outcomes.push((
                        index,
                        Outcome::Appended(Appended {
                            stream_version: version,
                            first_position,
                            last_position: position - 1,
                        }),
                    ));
                }
                Ok(Segment {
                    outcomes,
                    next_position: position,
                    heads: new_heads,
                })
            },
        );
        match result {
            Ok(segment) => Ok(Ok(segment)),
            Err(TransactionError::Abort(leave_out)) => Ok(Err(leave_out)),
            Err(TransactionError::Storage(error)) => Err(error),
        }
    }
}

/// Where the writer finds a stream's head during a batch: written by an earlier segment of
/// the batch, cached, or loaded before the batch.
struct Heads<'a, 'b> {
    batch: &'a HashMap<&'b str, (u64, u64)>,
    cache: &'a HashMap<String, (u64, u64)>,
    loaded: &'a HashMap<&'b str, (u64, u64)>,
}

impl Heads<'_, '_> {
    fn get(&self, stream: &str) -> Option<(u64, u64)> {
        self.batch
            .get(stream)
            .or_else(|| self.cache.get(stream))
            .or_else(|| self.loaded.get(stream))
            .copied()
    }
}

/// What one committed transaction of a batch produced.
struct Segment<'b> {
    outcomes: Vec<(usize, Outcome)>,
    next_position: u64,
    heads: HashMap<&'b str, (u64, u64)>,
}

/// The flusher thread: makes committed batches durable, in commit order, then answers them.
struct Flusher {
    db: sled::Db,
    shared: Arc<Shared>,
    durable: watch::Sender<Durable>,
    durability: Durability,
    failure: Option<String>,
    /// The durable mark, written after each flush that made records durable (`None` without
    /// fsync: see `mark`).
    mark: Option<MarkWriter>,
}

impl Flusher {
    fn run(mut self, committed: std::sync::mpsc::Receiver<Committed>) {
        let mut ready = Vec::new();
        while let Ok(first) = committed.recv() {
            ready.push(first);
            // Every batch committed by now is covered by the flush below: take them all.
            while let Ok(more) = committed.try_recv() {
                ready.push(more);
            }
            self.finish(&mut ready);
        }
        // Sled flushes on drop as well; this makes committed outbox deletions durable on a
        // clean close.
        let _ = self.db.flush();
    }

    fn finish(&mut self, ready: &mut Vec<Committed>) {
        if self.failure.is_none()
            && self.durability == Durability::Fsync
            && ready.iter().any(|c| c.needs_flush)
        {
            // Each of these batches' transactions completed before this call: the flush covers them.
            match self.db.flush() {
                Ok(_) => {
                    self.shared.flushes.fetch_add(1, Ordering::Relaxed);
                }
                Err(error) => {
                    let reason = format!("flush failed: {error}");
                    tracing::error!(%reason, "event log stops accepting writes");
                    self.failure = Some(reason);
                    self.durable.send_modify(|d| d.failed = true);
                }
            }
        }
        if let Some(reason) = &self.failure {
            for batch in ready.drain(..) {
                for (job, _) in batch.jobs {
                    reply(job, Outcome::Failed(StorageError::FlushFailed(reason.clone())));
                }
            }
            return;
        }
        let last = ready.last().expect("finish is called with at least one batch");
        let (seq, position, checksum) = (last.seq, last.position, last.checksum);
        let wrote_records = ready.iter().any(|c| c.needs_flush);
        let appends: Vec<RecentAppend> = match (&self.mark, wrote_records) {
            (Some(_), true) => ready.iter().flat_map(|c| c.appends.iter().cloned()).collect(),
            _ => Vec::new(),
        };
        self.durable.send_replace(Durable {
            seq,
            position,
            failed: false,
        });
        for batch in ready.drain(..) {
            for (job, outcome) in batch.jobs {
                if let Outcome::Appended(appended) = &outcome {
                    self.shared.appends.fetch_add(1, Ordering::Relaxed);
                    self.shared.events.fetch_add(
                        appended.last_position - appended.first_position + 1,
                        Ordering::Relaxed,
                    );
                }
                reply(job, outcome);
            }
        }
        // The durable mark, after the answers (it is off their latency): a kill between the
        // answers and this write leaves the mark one flush behind, which `mark` allows for.
        if let Some(mark) = &mut self.mark
            && wrote_records
            && let Err(error) = mark.write(position, checksum, &appends)
        {
            // The records are durable; only the evidence of how far is not. The log must not
            // go on without its mark.
            tracing::error!(%error, "durable mark not written; the log stops accepting writes");
            self.failure = Some(error.to_string());
            self.durable.send_modify(|d| d.failed = true);
        }
    }
}

fn reply(job: Job, outcome: Outcome) {
    // A caller that stopped waiting (dropped future) is not an error of the log.
    match (job, outcome) {
        (Job::Append { reply, .. }, Outcome::Appended(appended)) => {
            let _ = reply.send(Ok(appended));
        }
        (Job::Append { reply, .. }, Outcome::Failed(error)) => {
            let _ = reply.send(Err(error));
        }
        (Job::AckOutbox { reply, .. }, Outcome::Acked) => {
            let _ = reply.send(Ok(()));
        }
        (Job::AckOutbox { reply, .. }, Outcome::Failed(error)) => {
            let _ = reply.send(Err(error));
        }
        (Job::Append { .. }, Outcome::Acked) | (Job::AckOutbox { .. }, Outcome::Appended(_)) => {
            unreachable!("outcomes are produced per job kind")
        }
    }
}

/// Opens a log at `path` with production settings. Shorthand for tests and tools.
pub fn open_path(path: &Path) -> Result<EventLog, StorageError> {
    EventLog::open(LogConfig::new(path))
}

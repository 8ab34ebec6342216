//! The event log: append with optimistic concurrency and group commit, reads, subscriptions.
//!
//! This file is the facade: [`EventLog`] and its configuration. Each part lives in its own file
//! under `log/`:
//! - `request`: what an append asks for ([`AppendRequest`], [`ExpectedVersion`],
//!   [`NewEvent`]), its validation, and its answer ([`Appended`]);
//! - `record`: a stored [`Record`] as readers get it, verified when read;
//! - `keys`: the `events` and `streams` tree keys, and a stream's head;
//! - `open`: sled's lock and the durable mark's lost-tail check at open ([`LOG_STREAM`]);
//! - `writer`: the writer thread (batches, transactions, refusals);
//! - `flusher`: the flusher thread (fsync, answers, the durable mark);
//! - `reads`: whole-log reads and live [`Subscription`]s.
//!
//! # Design
//!
//! One writer thread owns every write to the database. Callers hand it jobs through a bounded
//! queue (`queue_len_max`); it takes every job waiting (up to `batch_len_max`) and applies them
//! in **one sled transaction** (version checks, records, stream index, projections,
//! outbox). A second thread, the flusher, then calls **one flush** for every batch committed
//! so far and only then answers their callers. The writer does not wait for the flush: it
//! commits the next batch while the previous one is being flushed (pipelined group commit).
//! When nothing else is queued and the flusher holds no batch, the writer flushes the batch
//! itself (the same steps, under the same lock, so batches still finish in commit order): a
//! lone writer saves the hand-off to the flusher thread (storage bench, 1 writer: p50 -9%).
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
//! - `streams`: stream ++ 0x00 ++ version (u64 BE) -> position (u64 BE), one entry per append:
//!   its last event's version and position. An append's events are at consecutive positions,
//!   so the entry covers the versions after the previous entry's (see `keys::covering`); a
//!   log written before this had an entry per event, which is the case of one-event appends
//!   and reads the same. The writer's cost is per insert (a leaf copy and a tree descent in
//!   sled), and a completed saga appends 12 events in 3 appends in the orchestrator.
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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::IVec;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use tokio::sync::{mpsc, oneshot, watch};

use crate::codec;
use crate::error::StorageError;
use crate::gate::{GatePoint, GateVerdict, WriterGate};
use crate::mark::{self, Found, Mark, MarkWriter, RecentAppend};
use crate::outbox::{OUTBOX_PER_APPEND_MAX, OutboxEntry, OutboxId, OutboxMessage};
use crate::position::{Position, StreamVersion};
use crate::projection::{EventView, ProjectError, ProjectionTx, Projector};

mod cache;
mod flusher;
mod keys;
mod open;
mod reads;
mod record;
mod request;
mod writer;

pub(crate) use keys::{covering, decode_position, stream_key};
pub use open::{LOG_STREAM, LOST_TAIL_ACCEPTED, LostTailAccepted};
pub(crate) use open::{check_mark, open_sled};
pub use reads::Subscription;
pub use record::Record;
pub use request::{
    AppendRequest, Appended, EVENTS_PER_APPEND_MAX, ExpectedVersion, NewEvent, STREAMS_PER_APPEND_MAX,
};
#[allow(
    unused_imports,
    reason = "the submodules see each other through `use super::*`"
)]
use {flusher::*, keys::*, open::*, reads::*, record::*, request::*, writer::*};

use crate::record_format::{self, Layout, RecordFields};

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
    /// Test hook: holds the flusher before a flush ([`GatePoint::BeforeFlush`]). `None` in
    /// production.
    pub flush_gate: Option<Arc<WriterGate>>,
    /// Open a log that lost acknowledged records (it ends before its durable mark, see
    /// `mark`) instead of refusing it, and record that decision as a `LostTailAccepted` event
    /// in stream [`LOG_STREAM`]. An operator's decision, never a default.
    pub accept_lost_tail: bool,
}

impl LogConfig {
    /// sled's page cache by default, in MiB. The log's reads are of recent records (the
    /// stream cache holds those) and of the right edge of its trees, so a small cache loses
    /// nothing measurable; sled's accounting undercounts what it holds, so a larger one costs
    /// far more than it says (BENCHMARKS.md: after 20,000 sagas the orchestrator held 220 MiB
    /// with 64 MiB here, 82 MiB with 8; the five processes 414 MB with 8 and 320 MB with 1,
    /// and 1 was not slower at 1 or 32 in flight).
    pub const CACHE_MB_DEFAULT: u64 = 1;

    pub fn new(path: impl Into<PathBuf>) -> Self {
        LogConfig {
            path: path.into(),
            durability: Durability::Fsync,
            cache_capacity_bytes: Self::CACHE_MB_DEFAULT * 1024 * 1024,
            batch_len_max: 512,
            queue_len_max: 8192,
            gate: None,
            flush_gate: None,
            accept_lost_tail: false,
        }
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
    cache: cache::StreamCache,
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

use crate::clock::now_unix_us as now_us;

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
        // sled asserts at least this much (its LRU); a smaller cache (`--cache-mb 0`) is the
        // caller's error, named, not a panic inside sled.
        const CACHE_CAPACITY_MIN: u64 = 256;
        if config.cache_capacity_bytes < CACHE_CAPACITY_MIN {
            return Err(StorageError::Invalid {
                field: "cache_capacity_bytes",
                reason: format!(
                    "{} bytes: sled's cache needs at least {CACHE_CAPACITY_MIN}",
                    config.cache_capacity_bytes
                ),
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
            cache: cache::StreamCache::default(),
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
            flush_gate: config.flush_gate.clone(),
            mark: mark_writer,
            written: Vec::new(),
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
        let appended = self.send_append(vec![request]).await?;
        Ok(appended[0])
    }

    /// Appends to several streams **atomically**: every request is written, or none is. Each
    /// request is checked as in [`EventLog::append`] (its expected version, its events through
    /// the projector); a conflict or refusal of any of them leaves all of them out. One flush
    /// covers them all. Returns where each landed, in the order given (positions follow that
    /// order). At most [`STREAMS_PER_APPEND_MAX`] requests, each to another stream.
    ///
    /// What it is for: a decision and its bookkeeping in other streams that must never be
    /// seen apart (a participant's undo and its consumer log's success, with the
    /// acknowledgement in the outbox), in one durable wait instead of two.
    pub async fn append_all(&self, requests: Vec<AppendRequest>) -> Result<Vec<Appended>, StorageError> {
        request::validate_all(&requests)?;
        self.send_append(requests).await
    }

    /// Hands validated requests to the writer as one job and waits for their flush.
    async fn send_append(&self, requests: Vec<AppendRequest>) -> Result<Vec<Appended>, StorageError> {
        let parts = requests
            .into_iter()
            .map(|request| {
                let outbox = request
                    .outbox
                    .iter()
                    .map(codec::encode)
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Part { request, outbox })
            })
            .collect::<Result<Vec<_>, StorageError>>()?;
        let (reply, answer) = oneshot::channel();
        let began = std::time::Instant::now();
        self.jobs
            .send(Job::Append { parts, reply })
            .await
            .map_err(|_| StorageError::Closed)?;
        let appended = answer.await.map_err(|_| StorageError::Closed)?;
        if appended.is_ok() {
            // Durable appends only: a refusal or a failure is not an append's latency.
            metrics::histogram!(crate::metric::LOG_APPEND_SECONDS).record(began.elapsed().as_secs_f64());
        }
        appended
    }

    /// The stream's current version (`NONE` if it does not exist), as durable.
    pub async fn stream_version(&self, stream: &str) -> Result<StreamVersion, StorageError> {
        let version = match self.shared.cache.version(stream) {
            Some(version) => version,
            None => last_version(&self.shared.trees.streams, stream)?.map_or(0, |(version, _)| version),
        };
        self.wait_durable_read().await?;
        Ok(StreamVersion::new(version))
    }

    /// Up to `max` records of `stream` from `from` (`NONE` reads from the first), in order.
    /// Verifies each record and the hash chain between consecutive records.
    pub async fn read_stream(
        &self,
        stream: &str,
        from: StreamVersion,
        max: usize,
    ) -> Result<Vec<Record>, StorageError> {
        let max = max.min(READ_LEN_MAX);
        let from_version = from.or_first().get();
        if let Some(records) = self.shared.cache.read(stream, from_version, max) {
            // Written by this process's writer since open: complete and as committed (see
            // `cache`); the wait below is the same as for a read of sled.
            self.wait_durable_read().await?;
            return Ok(records);
        }
        let trees = &self.shared.trees;
        let mut records: Vec<Record> = Vec::new();
        let mut prev_checksum = None;
        if from_version > 1 {
            // The record before the range anchors the chain check of the first one.
            if let Some(entry) = covering(&trees.streams, stream, from_version - 1)? {
                let position = entry.position_of(stream, from_version - 1)?;
                prev_checksum = Some(
                    self.stream_record_at(position, stream, from_version - 1)?
                        .checksum(),
                );
            }
        } else {
            prev_checksum = Some(0);
        }
        let mut version = from_version;
        let mut entries = entries_from(&trees.streams, stream, from_version);
        while records.len() < max {
            let Some(entry) = entries.next().transpose()? else {
                break;
            };
            // The versions from `version` to the entry's last are at consecutive positions.
            for position in entry.position_of(stream, version)?..=entry.last_position {
                if records.len() == max {
                    break;
                }
                let record = self.stream_record_at(position, stream, version)?;
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
                version += 1;
            }
        }
        self.wait_durable_read().await?;
        Ok(records)
    }

    /// Up to `max` durable records of the whole log from global position `from` (`NONE`
    /// reads from the first).
    pub fn read_all(&self, from: Position, max: usize) -> Result<Vec<Record>, StorageError> {
        let durable = self.shared.durable.borrow().position;
        read_range(
            &self.shared.trees.events,
            from.or_first().get(),
            durable,
            max.min(READ_LEN_MAX),
        )
    }

    /// The highest durable global position (`NONE` for an empty log).
    pub fn durable_position(&self) -> Position {
        Position::new(self.shared.durable.borrow().position)
    }

    /// A live tail of the log from global position `from`: first the records already durable,
    /// then each new one as it becomes durable. Every position is delivered exactly once, in
    /// order: catch-up and live reads are the same read of the `events` tree, bounded by the
    /// durable position, so there is no hand-over where a record could be skipped or repeated.
    pub fn subscribe(&self, from: Position) -> Subscription {
        Subscription {
            events: self.shared.trees.events.clone(),
            durable: self.shared.durable.clone(),
            next: from.or_first().get(),
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
    pub async fn wait_durable_position(&self, position: Position) -> Result<(), StorageError> {
        let mut durable = self.shared.durable.clone();
        let seen = durable
            .wait_for(|d| d.position >= position.get() || d.failed)
            .await
            .map_err(|_| StorageError::Closed)?;
        if seen.failed {
            return Err(StorageError::Failed("writer stopped".into()));
        }
        Ok(())
    }

    /// Whether the writer stopped after a storage failure: no append succeeds any more until
    /// the process reopens the log (restarts).
    pub fn is_failed(&self) -> bool {
        self.shared.durable.borrow().failed
    }

    /// A future that completes once the writer has stopped after a storage failure
    /// ([`EventLog::is_failed`]), with `true`, or once the log has closed without failing, with
    /// `false`. It holds no handle to the log, so it does not keep the log open.
    pub fn failure(&self) -> impl std::future::Future<Output = bool> + Send + 'static {
        let mut durable = self.shared.durable.clone();
        async move { durable.wait_for(|d| d.failed).await.is_ok() }
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

    /// The record at `position`, which the stream index says is `stream` at `version`.
    fn stream_record_at(&self, position: u64, stream: &str, version: u64) -> Result<Record, StorageError> {
        let record = self.record_at(position)?;
        if record.stream() != stream || record.version().get() != version {
            return Err(StorageError::Corrupt {
                position,
                reason: format!(
                    "index says {stream:?} v{version}, record says {:?} v{}",
                    record.stream(),
                    record.version()
                ),
            });
        }
        Ok(record)
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

/// Opens a log at `path` with production settings. Shorthand for tests and tools.
pub fn open_path(path: &Path) -> Result<EventLog, StorageError> {
    EventLog::open(LogConfig::new(path))
}

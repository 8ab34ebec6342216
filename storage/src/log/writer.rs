//! The writer thread: commits queued jobs in as few sled transactions as possible and hands
//! them to the flusher (see the module doc of `log` for the design).

use super::*;

/// One stream's share of an append job: the request and its outbox messages, encoded.
pub(super) struct Part {
    pub(super) request: AppendRequest,
    pub(super) outbox: Vec<Vec<u8>>,
}

pub(super) enum Job {
    /// Appends to one stream per part, all or none (`EventLog::append_all`; a plain append is
    /// one part).
    Append {
        parts: Vec<Part>,
        reply: oneshot::Sender<Result<Vec<Appended>, StorageError>>,
    },
    AckOutbox {
        ids: Vec<OutboxId>,
        reply: oneshot::Sender<Result<(), StorageError>>,
    },
}

/// A stream's head: the version and the checksum of its last record.
pub(super) type Head = (u64, u64);

/// Jobs left out of a batch, with the error each is answered.
pub(super) type LeftOut = HashMap<usize, StorageError>;

/// Most stream heads the writer caches; past it the cache is emptied (heads are re-derived on
/// demand, one sled read per stream), so memory stays bounded however many streams exist. An
/// entry takes about 100 bytes with its name; a participant makes two or three new streams per
/// saga, so this is a few seconds of sagas at today's rates (about 1.5 s at 1,000 sagas/s), far
/// more than are in flight, and about 0.5 MB. 100,000 held 10 MB in a participant after 20,000
/// sagas; 16,384 with a 4 MiB stream cache cost the five processes about 30 MB more summed
/// peak RSS than 4,096 with 1 MiB, at no CPU cost the pairs could show (BENCHMARKS.md).
pub(super) const HEAD_CACHE_LEN_MAX: usize = 4_096;

/// A job's outcome inside the transaction, before the flush decides whether it stands.
pub(super) enum Outcome {
    /// Where each part of an append landed, in the job's order.
    Appended(Vec<Appended>),
    Acked,
    Failed(StorageError),
}

/// A storage error in one of a batch's transactions; `committed`: the jobs of the batch's
/// earlier transactions, which are in sled.
pub(super) struct CommitFailed {
    pub(super) error: sled::Error,
    pub(super) committed: Vec<usize>,
}

/// Why a transaction attempt was aborted: one job must be left out of the batch.
pub(super) struct LeaveOut {
    pub(super) index: usize,
    pub(super) error: StorageError,
}

pub(super) struct Writer {
    pub(super) trees: Trees,
    pub(super) projector: Option<Arc<dyn Projector>>,
    pub(super) shared: Arc<Shared>,
    pub(super) durable: watch::Sender<Durable>,
    pub(super) durability: Durability,
    pub(super) batch_len_max: usize,
    pub(super) next_position: u64,
    /// The checksum of the record at `next_position - 1` (0 for an empty log).
    pub(super) last_checksum: u64,
    pub(super) seq: u64,
    /// stream -> (version, checksum of its last record), for committed data only.
    pub(super) heads: HashMap<String, Head>,
    pub(super) gate: Option<Arc<WriterGate>>,
    /// Handed to the flusher when it starts (see `gate`).
    pub(super) flush_gate: Option<Arc<WriterGate>>,
    /// Handed to the flusher when it starts.
    pub(super) mark: Option<MarkWriter>,
    /// Records written by the batch being committed, by job and part index (see
    /// `cache_written`).
    pub(super) written: Vec<(usize, usize, Vec<IVec>)>,
}

/// Sets the log's `failed` flag when the thread holding it unwinds from a panic.
struct FailOnPanic(watch::Sender<Durable>);

impl Drop for FailOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.send_modify(|d| d.failed = true);
        }
    }
}

/// A committed batch on its way to the flusher.
pub(super) struct Committed {
    pub(super) seq: u64,
    /// Highest position written by this batch or any before it.
    pub(super) position: u64,
    /// The batch wrote events, so its answer must wait for a flush.
    pub(super) needs_flush: bool,
    /// The checksum of the record at `position`.
    pub(super) checksum: u64,
    /// The batch's last appends (for the durable mark), oldest first.
    pub(super) appends: Vec<RecentAppend>,
    pub(super) jobs: Vec<(Job, Outcome)>,
}

/// Committed batches that may wait for the flusher; the writer blocks beyond this
/// (back-pressure instead of an unbounded queue).
pub(super) const FLUSH_QUEUE_LEN_MAX: usize = 64;

impl Writer {
    /// The writer thread: commits batches and hands them to the flusher thread, so that the
    /// next batch is committed while the previous one is being flushed (pipelined group commit).
    pub(super) fn run(mut self, mut jobs: mpsc::Receiver<Job>) {
        // A panic of this thread (in a commit, or in a flush it runs itself) stops the log
        // visibly: `failed` is set, so health checks and `EventLog::failure` report it, as for
        // a panic of the flusher thread.
        let _stops_on_panic = FailOnPanic(self.durable.clone());
        let (to_flusher, from_writer) = std::sync::mpsc::sync_channel::<Committed>(FLUSH_QUEUE_LEN_MAX);
        // Tests that hold the flusher (`gate`) keep every flush on the flusher thread.
        let inline_allowed = self.flush_gate.is_none();
        let flusher = Arc::new(Mutex::new(Flusher {
            db: self.trees.db.clone(),
            shared: Arc::clone(&self.shared),
            durable: self.durable.clone(),
            durability: self.durability,
            failure: None,
            mark: self.mark.take(),
            gate: self.flush_gate.take(),
        }));
        // Batches handed to the flusher thread and not finished yet. Zero means the flusher
        // thread holds nothing: a batch finished here now is finished after every earlier one.
        let queued = Arc::new(AtomicUsize::new(0));
        let flusher_thread = {
            let (flusher, queued) = (Arc::clone(&flusher), Arc::clone(&queued));
            std::thread::Builder::new()
                .name("saga-log-flusher".into())
                .spawn(move || Flusher::run(&flusher, &queued, from_writer))
                .expect("spawn the flusher thread")
        };
        let mut batch = Vec::with_capacity(self.batch_len_max);
        while let Some(job) = jobs.blocking_recv() {
            batch.push(job);
            while batch.len() < self.batch_len_max {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            let Some(committed) = self.process(&mut batch) else {
                continue;
            };
            // Nothing else waits to be committed and the flusher thread is idle: flush here,
            // saving the hand-off (concurrency 1). Otherwise the flusher thread flushes while
            // the next batch is committed (pipelined group commit).
            if inline_allowed
                && jobs.is_empty()
                && queued.load(Ordering::Acquire) == 0
                && let Ok(mut flusher) = flusher.lock()
            {
                flusher.finish(&mut vec![committed]);
                continue;
            }
            queued.fetch_add(1, Ordering::AcqRel);
            if let Err(unsent) = to_flusher.send(committed) {
                // The flusher is gone (it panicked): nothing can become durable any more. These
                // jobs were committed, so their outcome is unknown to their callers (FlushFailed,
                // not Failed), and the log stops: later batches are refused, readers fail.
                self.durable.send_modify(|d| d.failed = true);
                for (job, _) in unsent.0.jobs {
                    reply(
                        job,
                        Outcome::Failed(StorageError::FlushFailed("flusher stopped".into())),
                    );
                }
            }
        }
        drop(to_flusher);
        let _ = flusher_thread.join();
        // Sled flushes on drop as well; this makes committed outbox deletions durable on a
        // clean close.
        let _ = self.trees.db.flush();
    }

    /// Commits one batch. Returns it for the flusher, or `None` when it was answered already.
    pub(super) fn process(&mut self, batch: &mut Vec<Job>) -> Option<Committed> {
        if self.durable.borrow().failed {
            refuse_all(batch, "an earlier flush failed");
            return None;
        }
        if let Some(gate) = &self.gate
            && gate.pass(GatePoint::BeforeCommit) == GateVerdict::Fail
        {
            // A simulated crash: the batch never reaches sled, and nothing after it may.
            self.durable.send_modify(|d| d.failed = true);
            refuse_all(batch, "crash simulated by the writer gate");
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
        self.cache_written(batch);
        if let Some(gate) = &self.gate {
            gate.pass(GatePoint::AfterCommit);
        }
        self.seq += 1;
        self.shared.batches.fetch_add(1, Ordering::Relaxed);
        let needs_flush = next_position != self.next_position;
        self.next_position = next_position;
        let appends = recent_appends(batch, &outcomes);
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
    pub(super) fn commit(
        &mut self,
        batch: &[Job],
        timestamp_us: i64,
    ) -> Result<(Vec<Outcome>, u64, u64), CommitFailed> {
        self.written.clear();
        let (loaded, mut left_out) = self.load_missing_heads(batch);
        let mut outcomes: Vec<Option<Outcome>> = batch.iter().map(|_| None).collect();
        // Heads written by the committed segments of this batch (merged into the cache at
        // the end, so that the cache's bound never drops a head a later segment needs).
        let mut batch_heads: HashMap<&str, Head> = HashMap::new();
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
                    self.written.extend(segment.written);
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
        self.remember_heads(batch, &outcomes, batch_heads);
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

    /// Hands the records the batch committed to the stream cache (see `cache`), before the
    /// batch goes to the flusher, so that a caller answered after the flush reads its own
    /// append from the cache.
    fn cache_written(&mut self, batch: &[Job]) {
        let mut appends = Vec::with_capacity(self.written.len());
        for (index, part, bytes) in self.written.drain(..) {
            let Job::Append { parts, .. } = &batch[index] else {
                unreachable!("only appends write records")
            };
            let request = &parts[part].request;
            let mut records = Vec::with_capacity(bytes.len());
            for bytes in bytes {
                let layout = record_format::decode(&bytes).expect("the writer's own encoding decodes");
                records.push(Record { bytes, layout });
            }
            appends.push((request.stream.as_str(), records));
        }
        // One batch at once: a reader sees all of it or none of it, as it would in sled.
        self.shared.cache.appended(appends);
    }

    /// Loads the heads of the batch's streams that are not cached, before any transaction:
    /// sled's concurrency control is a fair RwLock (one per database since the vendored change,
    /// vendor/sled/PATCHES.md item 4; one for the whole process before), which the transaction
    /// holds for writing, so a plain read inside the closure can deadlock. A job whose head
    /// cannot be read is left out with the error.
    fn load_missing_heads<'b>(&self, batch: &'b [Job]) -> (HashMap<&'b str, Head>, LeftOut) {
        let mut loaded = HashMap::new();
        let mut left_out = HashMap::new();
        for (index, job) in batch.iter().enumerate() {
            let Job::Append { parts, .. } = job else {
                continue;
            };
            for part in parts {
                let stream = part.request.stream.as_str();
                if self.heads.contains_key(stream) || loaded.contains_key(stream) {
                    continue;
                }
                match load_head(&self.trees, stream) {
                    Ok(head) => {
                        loaded.insert(stream, head);
                    }
                    Err(error) => {
                        left_out.insert(index, error);
                        break;
                    }
                }
            }
        }
        (loaded, left_out)
    }

    /// Takes the heads the batch wrote into the cache (emptied first past its bound), and the
    /// checksum of the batch's last record: the last record of the stream of its last append.
    fn remember_heads<'b>(
        &mut self,
        batch: &'b [Job],
        outcomes: &[Option<Outcome>],
        batch_heads: HashMap<&'b str, Head>,
    ) {
        let last_stream = batch
            .iter()
            .zip(outcomes)
            .rev()
            .find_map(|(job, outcome)| match (job, outcome) {
                (Job::Append { parts, .. }, Some(Outcome::Appended(_))) => {
                    parts.last().map(|part| part.request.stream.as_str())
                }
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
    }

    /// One transaction over the jobs `range` of `batch` (minus those left out), from global
    /// position `position`. `Err(LeaveOut)` when the projector refused a job: nothing of this
    /// transaction was written.
    pub(super) fn transact<'b>(
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
                let tx = TxTrees {
                    events,
                    streams,
                    outbox,
                    projections,
                };
                // Heads written by this attempt.
                let mut new_heads: HashMap<&'b str, Head> = HashMap::new();
                let mut position = position;
                let mut outcomes = Vec::with_capacity(range.len());
                let mut written = Vec::with_capacity(range.len());
                for index in range.clone() {
                    if left_out.contains_key(&index) {
                        continue;
                    }
                    let job = &batch[index];
                    let parts = match job {
                        Job::AckOutbox { ids, .. } => {
                            for id in ids {
                                tx.outbox.remove_blind(&id.to_key());
                            }
                            outcomes.push((index, Outcome::Acked));
                            continue;
                        }
                        Job::Append { parts, .. } => parts,
                    };
                    // Every part's version is checked before anything of the job is written:
                    // a job is written whole or not at all.
                    let mut job_heads = Vec::with_capacity(parts.len());
                    let mut refused = None;
                    for part in parts {
                        let stream = part.request.stream.as_str();
                        let head = new_heads.get(stream).copied().or_else(|| heads.get(stream));
                        let Some(head) = head else {
                            // Not expected: a job whose head could not be loaded is left out
                            // before the transaction; answered as a failure, never a panic.
                            refused = Some(StorageError::Failed(format!(
                                "the head of stream {stream:?} could not be read"
                            )));
                            break;
                        };
                        if !part.request.expected.admits(head.0) {
                            refused = Some(StorageError::VersionConflict {
                                stream: stream.to_owned(),
                                expected: part.request.expected,
                                actual: StreamVersion::new(head.0),
                            });
                            break;
                        }
                        job_heads.push(head);
                    }
                    if let Some(error) = refused {
                        outcomes.push((index, Outcome::Failed(error)));
                        continue;
                    }
                    let mut appended = Vec::with_capacity(parts.len());
                    for (part_index, (part, head)) in parts.iter().zip(job_heads).enumerate() {
                        let append = AppendAt {
                            index,
                            request: &part.request,
                            encoded_outbox: &part.outbox,
                            head,
                            position,
                            timestamp_us,
                        };
                        let (landed, new_head, records) = self.write_append(&tx, append)?;
                        position = landed.last_position.next().get();
                        new_heads.insert(part.request.stream.as_str(), new_head);
                        appended.push(landed);
                        written.push((index, part_index, records));
                    }
                    outcomes.push((index, Outcome::Appended(appended)));
                }
                Ok(Segment {
                    outcomes,
                    next_position: position,
                    heads: new_heads,
                    written,
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

/// The trees of one transaction.
pub(super) struct TxTrees<'t> {
    pub(super) events: &'t TransactionalTree,
    pub(super) streams: &'t TransactionalTree,
    pub(super) outbox: &'t TransactionalTree,
    pub(super) projections: &'t TransactionalTree,
}

/// One append to write inside a transaction: where its stream stands (`head`: version and
/// checksum of its last record) and where the log stands (`position`: the next position).
pub(super) struct AppendAt<'b> {
    pub(super) index: usize,
    pub(super) request: &'b AppendRequest,
    pub(super) encoded_outbox: &'b [Vec<u8>],
    pub(super) head: Head,
    pub(super) position: u64,
    pub(super) timestamp_us: i64,
}

type TxResult<T> = Result<T, ConflictableTransactionError<LeaveOut>>;

impl Writer {
    /// Writes one append's records (each through the projector first), its stream index
    /// entry and its outbox messages (keyed by its first position). Returns what was
    /// appended and the stream's new head; a projector's refusal aborts the transaction with
    /// the job to leave out.
    fn write_append(&self, tx: &TxTrees<'_>, append: AppendAt<'_>) -> TxResult<(Appended, Head, Vec<IVec>)> {
        let stream = append.request.stream.as_str();
        let mut written = Vec::with_capacity(append.request.events.len());
        let (mut version, mut prev_checksum) = append.head;
        let mut position = append.position;
        for event in &append.request.events {
            version += 1;
            let (bytes, checksum) = record_format::encode(&RecordFields {
                position,
                version,
                timestamp_us: append.timestamp_us,
                prev_checksum,
                stream,
                event_type: &event.event_type,
                payload: &event.payload,
            });
            let view = EventView {
                position: Position::new(position),
                stream,
                version: StreamVersion::new(version),
                event_type: &event.event_type,
                timestamp_us: append.timestamp_us,
                payload: &event.payload,
            };
            self.project(tx, append.index, &view)?;
            let bytes = IVec::from(bytes);
            // Blind writes (vendor/sled/PATCHES.md item 5): nothing here reads what a write
            // replaces, and sled's `insert` would descend the tree for it.
            tx.events.insert_blind(&position.to_be_bytes(), bytes.clone());
            written.push(bytes);
            prev_checksum = checksum;
            position += 1;
        }
        // One index entry per append, for its last event: the append's events are at
        // consecutive positions, so readers derive the others from it (see `keys`).
        if !append.request.events.is_empty() {
            tx.streams
                .insert_blind(stream_key(stream, version), &(position - 1).to_be_bytes());
        }
        for (i, body) in append.encoded_outbox.iter().enumerate() {
            let id = OutboxId {
                position: append.position,
                index: i as u16,
            };
            tx.outbox.insert_blind(&id.to_key(), body.as_slice());
        }
        let appended = Appended {
            stream_version: StreamVersion::new(version),
            first_position: Position::new(append.position),
            last_position: Position::new(position - 1),
        };
        Ok((appended, (version, prev_checksum), written))
    }

    /// Runs the projector on one event inside the transaction; a refusal leaves job `index`
    /// out of the batch, with the error its caller gets.
    fn project(&self, tx: &TxTrees<'_>, index: usize, view: &EventView<'_>) -> TxResult<()> {
        let Some(projector) = &self.projector else {
            return Ok(());
        };
        let mut ptx = ProjectionTx { tree: tx.projections };
        let leave_out = |error| ConflictableTransactionError::Abort(LeaveOut { index, error });
        match projector.project(view, &mut ptx) {
            Ok(()) => Ok(()),
            Err(ProjectError::Tx(error)) => Err(error.into()),
            Err(ProjectError::Refused(refusal)) => Err(leave_out(StorageError::Refused {
                stream: view.stream.to_owned(),
                event_type: view.event_type.to_owned(),
                refusal,
            })),
            Err(ProjectError::Invalid(reason)) => Err(leave_out(StorageError::Projection {
                stream: view.stream.to_owned(),
                event_type: view.event_type.to_owned(),
                reason,
            })),
        }
    }
}

/// Answers every job of `batch` with `StorageError::Failed(why)`.
fn refuse_all(batch: &mut Vec<Job>, why: &str) {
    for job in batch.drain(..) {
        reply(job, Outcome::Failed(StorageError::Failed(why.into())));
    }
}

/// The batch's last appends (at most `mark::RECENT_LEN_MAX`), oldest first, for the mark.
fn recent_appends(batch: &[Job], outcomes: &[Outcome]) -> Vec<RecentAppend> {
    let mut appends = Vec::new();
    for (job, outcome) in batch.iter().zip(outcomes).rev() {
        if appends.len() == mark::RECENT_LEN_MAX {
            break;
        }
        if let (Job::Append { parts, .. }, Outcome::Appended(appended)) = (job, outcome) {
            for (part, appended) in parts.iter().zip(appended).rev() {
                if appends.len() == mark::RECENT_LEN_MAX {
                    break;
                }
                appends.push(RecentAppend {
                    first_position: appended.first_position.get(),
                    last_position: appended.last_position.get(),
                    stream: part.request.stream.clone(),
                });
            }
        }
    }
    appends.sort_by_key(|a| a.first_position);
    appends
}

/// Where the writer finds a stream's head during a batch: written by an earlier segment of
/// the batch, cached, or loaded before the batch.
pub(super) struct Heads<'a, 'b> {
    pub(super) batch: &'a HashMap<&'b str, Head>,
    pub(super) cache: &'a HashMap<String, Head>,
    pub(super) loaded: &'a HashMap<&'b str, Head>,
}

impl Heads<'_, '_> {
    pub(super) fn get(&self, stream: &str) -> Option<Head> {
        self.batch
            .get(stream)
            .or_else(|| self.cache.get(stream))
            .or_else(|| self.loaded.get(stream))
            .copied()
    }
}

/// What one committed transaction of a batch produced.
pub(super) struct Segment<'b> {
    pub(super) outcomes: Vec<(usize, Outcome)>,
    pub(super) next_position: u64,
    pub(super) heads: HashMap<&'b str, Head>,
    /// The records each append of the segment wrote, by job and part index (for the stream
    /// cache).
    pub(super) written: Vec<(usize, usize, Vec<IVec>)>,
}

pub(super) fn reply(job: Job, outcome: Outcome) {
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

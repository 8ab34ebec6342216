//! The flusher: makes committed batches durable, in commit order, answers them, and writes the
//! durable mark. Its steps run on the flusher thread, or on the writer thread when nothing else
//! is queued and the flusher thread holds no batch (see `Writer::run`).

use super::*;

/// The flusher: makes committed batches durable, in commit order, then answers them.
pub(super) struct Flusher {
    pub(super) db: sled::Db,
    pub(super) shared: Arc<Shared>,
    pub(super) durable: watch::Sender<Durable>,
    pub(super) durability: Durability,
    pub(super) failure: Option<String>,
    /// The durable mark, written after each flush that made records durable (`None` without
    /// fsync: see `mark`).
    pub(super) mark: Option<MarkWriter>,
    /// Test hook (see `gate`): holds committed batches before their flush.
    pub(super) gate: Option<Arc<WriterGate>>,
}

impl Flusher {
    /// The flusher thread's loop. The writer finishes a batch itself (under the same lock)
    /// only when `queued` is zero, so batches are finished in commit order either way.
    pub(super) fn run(
        this: &Mutex<Flusher>,
        queued: &AtomicUsize,
        committed: std::sync::mpsc::Receiver<Committed>,
    ) {
        let mut ready = Vec::new();
        while let Ok(first) = committed.recv() {
            ready.push(first);
            // Every batch committed by now is covered by the flush below: take them all.
            while let Ok(more) = committed.try_recv() {
                ready.push(more);
            }
            let taken = ready.len();
            match this.lock() {
                Ok(mut flusher) => flusher.finish(&mut ready),
                // The writer panicked while finishing a batch: nothing becomes durable any more.
                Err(_) => return,
            }
            queued.fetch_sub(taken, Ordering::AcqRel);
        }
    }

    pub(super) fn finish(&mut self, ready: &mut Vec<Committed>) {
        if let Some(gate) = &self.gate {
            gate.pass(GatePoint::BeforeFlush);
        }
        let mut flushed = false;
        if self.failure.is_none()
            && self.durability == Durability::Fsync
            && ready.iter().any(|c| c.needs_flush)
        {
            // Each of these batches' transactions completed before this call: the flush covers them.
            let began = std::time::Instant::now();
            match self.db.flush() {
                Ok(_) => {
                    self.shared.flushes.fetch_add(1, Ordering::Relaxed);
                    metrics::histogram!(crate::metric::LOG_FSYNC_SECONDS)
                        .record(began.elapsed().as_secs_f64());
                    flushed = true;
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
        // The durable mark, before anyone learns of these records (answers, readers): a kill
        // after this point leaves a mark that names every record acknowledged or read.
        if let Some(mark) = &mut self.mark
            && wrote_records
        {
            // Moved into the mark: nothing reads a batch's appends after this.
            let appends = ready.iter_mut().flat_map(|c| std::mem::take(&mut c.appends));
            if let Err(error) = mark.write(position, checksum, appends) {
                // The records are durable, but the evidence of how far is not: fail this
                // flush's appends like a failed flush, and stop.
                self.stop(ready, error.to_string());
                return;
            }
        }
        if flushed {
            // Counted once the batch is durable and marked, as its appends are answered.
            let appends: usize = ready.iter().map(|c| c.jobs.len()).sum();
            metrics::histogram!(crate::metric::LOG_FLUSH_BATCH_APPENDS).record(appends as f64);
        }
        // Only the durable point moves: `failed` is the writer's too (a batch that failed after
        // this one was committed stops the log), and once set it is never cleared.
        self.durable.send_modify(|durable| {
            durable.seq = seq;
            durable.position = position;
        });
        for batch in ready.drain(..) {
            for (job, outcome) in batch.jobs {
                if let Outcome::Appended(appended) = &outcome {
                    // One append call, however many streams it wrote (`append_all`).
                    self.shared.appends.fetch_add(1, Ordering::Relaxed);
                    let events: u64 = appended
                        .iter()
                        .map(|a| a.last_position.get() - a.first_position.get() + 1)
                        .sum();
                    self.shared.events.fetch_add(events, Ordering::Relaxed);
                }
                reply(job, outcome);
            }
        }
        // The mark's fdatasync (power-loss staleness, see `mark`) is off the answers' latency
        // (run inline by the writer, it delays the next commit instead).
        if let Some(mark) = &mut self.mark
            && let Err(error) = mark.sync_if_due()
        {
            tracing::error!(%error, "durable mark not synced; the log stops accepting writes");
            self.failure = Some(error.to_string());
            self.durable.send_modify(|d| d.failed = true);
        }
    }

    /// Stops the log after a failure of this flush: its appends are answered `FlushFailed`
    /// (their outcome is unknown to the caller), later ones `Failed`.
    fn stop(&mut self, ready: &mut Vec<Committed>, reason: String) {
        tracing::error!(%reason, "event log stops accepting writes");
        self.failure = Some(reason.clone());
        self.durable.send_modify(|d| d.failed = true);
        for batch in ready.drain(..) {
            for (job, _) in batch.jobs {
                reply(job, Outcome::Failed(StorageError::FlushFailed(reason.clone())));
            }
        }
    }
}

//! The flusher thread: makes committed batches durable, in commit order, answers them, and
//! writes the durable mark.

use super::*;

/// The flusher thread: makes committed batches durable, in commit order, then answers them.
pub(super) struct Flusher {
    pub(super) db: sled::Db,
    pub(super) shared: Arc<Shared>,
    pub(super) durable: watch::Sender<Durable>,
    pub(super) durability: Durability,
    pub(super) failure: Option<String>,
    /// The durable mark, written after each flush that made records durable (`None` without
    /// fsync: see `mark`).
    pub(super) mark: Option<MarkWriter>,
}

impl Flusher {
    pub(super) fn run(mut self, committed: std::sync::mpsc::Receiver<Committed>) {
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

    pub(super) fn finish(&mut self, ready: &mut Vec<Committed>) {
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
                        appended.last_position.get() - appended.first_position.get() + 1,
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

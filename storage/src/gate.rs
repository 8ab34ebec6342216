//! A test hook that holds the log's writer thread at a named point of a batch, so that crash
//! windows can be reproduced deterministically in one process:
//!
//! - [`GatePoint::BeforeCommit`]: a batch taken from the queue, not yet in sled. Failing it
//!   ([`WriterGate::fail`]) is what a crash at that moment does: the batch never existed, its
//!   callers get an error and the log stops accepting writes (reopen it, as after a restart).
//! - [`GatePoint::AfterCommit`]: the batch's transaction committed (its data is visible to sled
//!   readers) and not yet flushed. Readers must not return it before the flush covers it.
//! - [`GatePoint::BeforeFlush`]: the **flusher** thread holds committed batches before their
//!   flush (a gate of its own, [`crate::LogConfig::flush_gate`]), so that the writer can go on
//!   meanwhile, as it does when a flush is slow. With this gate set the writer never flushes a
//!   batch itself (it does when nothing else is queued, without the gate).
//!
//! Off unless a `WriterGate` is put in [`crate::LogConfig::gate`]; production never sets one.
//! The gate is one-shot: `arm` holds the next batch that reaches the point, then disarms.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Where the writer can be held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatePoint {
    BeforeCommit,
    AfterCommit,
    BeforeFlush,
}

/// What the held batch does when let go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateVerdict {
    Proceed,
    /// Only honoured at [`GatePoint::BeforeCommit`]: the batch is dropped as if the process
    /// had died before writing it.
    Fail,
}

#[derive(Debug, Default)]
struct GateState {
    armed: Option<GatePoint>,
    held: Option<GatePoint>,
    verdict: Option<GateVerdict>,
}

/// See the module doc.
#[derive(Debug, Default)]
pub struct WriterGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

impl WriterGate {
    pub fn new() -> Self {
        Self::default()
    }

    /// Holds the next batch that reaches `point`.
    pub fn arm(&self, point: GatePoint) {
        let mut state = self.state.lock().expect("gate lock");
        state.armed = Some(point);
        state.verdict = None;
    }

    /// Blocks (up to `timeout`) until a batch is held; returns whether one is.
    pub fn wait_held(&self, timeout: Duration) -> bool {
        let state = self.state.lock().expect("gate lock");
        let (state, _) = self
            .changed
            .wait_timeout_while(state, timeout, |s| s.held.is_none())
            .expect("gate lock");
        state.held.is_some()
    }

    /// [`WriterGate::wait_held`] for async callers: waits on a blocking thread, so that the
    /// runtime's workers stay free (the held writer may need them to answer other jobs).
    pub async fn held(self: &std::sync::Arc<Self>, timeout: Duration) -> bool {
        let gate = std::sync::Arc::clone(self);
        tokio::task::spawn_blocking(move || gate.wait_held(timeout))
            .await
            .expect("the waiting thread does not panic")
    }

    /// Lets the held batch (or the next one to arrive) go on.
    pub fn release(&self) {
        self.decide(GateVerdict::Proceed);
    }

    /// Drops the held batch as a crash would (see [`GateVerdict::Fail`]).
    pub fn fail(&self) {
        self.decide(GateVerdict::Fail);
    }

    fn decide(&self, verdict: GateVerdict) {
        let mut state = self.state.lock().expect("gate lock");
        state.verdict = Some(verdict);
        state.armed = None;
        self.changed.notify_all();
    }

    /// Called by the writer at `point`: returns at once unless armed for it.
    pub(crate) fn pass(&self, point: GatePoint) -> GateVerdict {
        let mut state = self.state.lock().expect("gate lock");
        if state.armed != Some(point) {
            return GateVerdict::Proceed;
        }
        state.held = Some(point);
        self.changed.notify_all();
        let mut state = self
            .changed
            .wait_while(state, |s| s.verdict.is_none())
            .expect("gate lock");
        state.held = None;
        state.armed = None;
        state.verdict.take().expect("waited for a verdict")
    }
}

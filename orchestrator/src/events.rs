//! The saga events: past-tense facts appended to the saga's own stream (the stream name is the
//! saga id). A saga's state is their fold (`state`). Stored with the codec of saga-storage
//! (bincode 2); never change the meaning of a stored field, add variants instead.

use serde::{Deserialize, Serialize};

/// Why a forward step failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureKind {
    /// The participant refused for good (FAILED_PRECONDITION with a `BusinessRefusal`, or a
    /// request it will never accept): nothing took effect.
    Business,
    /// The call failed before the participant answered (unavailable, overloaded): retried
    /// with the same idempotency key while attempts remain.
    Transient,
    /// The deadline passed: the step may or may not have taken effect. A compensable step is
    /// compensated (the participant's barrier makes that safe either way).
    Unknown,
}

impl FailureKind {
    pub fn name(self) -> &'static str {
        match self {
            FailureKind::Business => "business",
            FailureKind::Transient => "transient",
            FailureKind::Unknown => "unknown",
        }
    }
}

/// What a participant reported for a compensation it handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompensationOutcome {
    Applied,
    /// Nothing had taken effect (null compensation).
    Null,
    AlreadyApplied,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SagaEvent {
    /// A saga was started. `steps` are the definition's step names at start time (so the fold
    /// needs no definition), `skipped` those that do not apply to this saga.
    SagaStarted {
        definition: String,
        request_id: String,
        /// The definition's input, opaque to the engine (the order saga stores a protobuf
        /// `saga.v1.OrderDetails`).
        payload: Vec<u8>,
        steps: Vec<String>,
        skipped: Vec<String>,
    },
    /// A forward call of `step` was (or is about to be) made; `attempt` counts from 1.
    StepStarted {
        step: String,
        attempt: u32,
    },
    StepSucceeded {
        step: String,
    },
    /// `retrying`: another attempt follows (after a backoff); otherwise the failure is final.
    StepFailed {
        step: String,
        kind: FailureKind,
        error: String,
        retrying: bool,
    },
    /// An operator asked to give up (AbortSaga).
    AbortRequested {
        reason: String,
    },
    /// Compensation messages for `steps` (reverse order) were written to the outbox in the
    /// same append.
    CompensationRequested {
        steps: Vec<String>,
        reason: String,
    },
    CompensationApplied {
        step: String,
        outcome: CompensationOutcome,
    },
    /// The participant parked the compensation after its retries.
    CompensationParked {
        step: String,
        error: String,
    },
    SagaCompleted,
    SagaCompensated,
    /// The saga needs an operator (RetrySaga).
    SagaStuck {
        reason: String,
    },
    /// An operator retried a stuck saga. `compensations`: the parked compensations sent again
    /// (written to the outbox in the same append); empty when a forward step is retried.
    SagaRetried {
        reason: String,
        compensations: Vec<String>,
    },
}

impl SagaEvent {
    /// The event type stored in the record envelope.
    pub fn name(&self) -> &'static str {
        match self {
            SagaEvent::SagaStarted { .. } => "SagaStarted",
            SagaEvent::StepStarted { .. } => "StepStarted",
            SagaEvent::StepSucceeded { .. } => "StepSucceeded",
            SagaEvent::StepFailed { .. } => "StepFailed",
            SagaEvent::AbortRequested { .. } => "AbortRequested",
            SagaEvent::CompensationRequested { .. } => "CompensationRequested",
            SagaEvent::CompensationApplied { .. } => "CompensationApplied",
            SagaEvent::CompensationParked { .. } => "CompensationParked",
            SagaEvent::SagaCompleted => "SagaCompleted",
            SagaEvent::SagaCompensated => "SagaCompensated",
            SagaEvent::SagaStuck { .. } => "SagaStuck",
            SagaEvent::SagaRetried { .. } => "SagaRetried",
        }
    }

    /// The step the event concerns, if any.
    pub fn step(&self) -> Option<&str> {
        match self {
            SagaEvent::StepStarted { step, .. }
            | SagaEvent::StepSucceeded { step }
            | SagaEvent::StepFailed { step, .. }
            | SagaEvent::CompensationApplied { step, .. }
            | SagaEvent::CompensationParked { step, .. } => Some(step),
            _ => None,
        }
    }

    /// A one-line human rendering (WatchSaga's `detail`, sagactl).
    pub fn detail(&self) -> String {
        match self {
            SagaEvent::SagaStarted {
                definition,
                request_id,
                skipped,
                ..
            } => format!("{definition} saga for request {request_id}; skipped {skipped:?}"),
            SagaEvent::StepStarted { attempt, .. } => format!("attempt {attempt}"),
            SagaEvent::StepSucceeded { .. } => String::new(),
            SagaEvent::StepFailed {
                kind,
                error,
                retrying,
                ..
            } => format!(
                "{} failure{}: {error}",
                kind.name(),
                if *retrying { ", retrying" } else { "" }
            ),
            SagaEvent::AbortRequested { reason } => reason.clone(),
            SagaEvent::CompensationRequested { steps, reason } => format!("{reason}; undo {steps:?}"),
            SagaEvent::CompensationApplied { outcome, .. } => format!("{outcome:?}"),
            SagaEvent::CompensationParked { error, .. } => error.clone(),
            SagaEvent::SagaCompleted | SagaEvent::SagaCompensated => String::new(),
            SagaEvent::SagaStuck { reason } => reason.clone(),
            SagaEvent::SagaRetried {
                reason,
                compensations,
            } => format!("{reason}; resend {compensations:?}"),
        }
    }
}

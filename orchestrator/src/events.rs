//! The saga events: past-tense facts appended to the saga's own stream (the stream name is the
//! saga id). A saga's state is their fold (`state`). Stored with the codec of saga-storage
//! (bincode 2); never change the meaning of a stored field, add variants instead.
//!
//! **Append only at the end.** bincode writes an enum's *variant index*: a variant inserted
//! or moved anywhere but at the end of [`SagaEvent`] (or of the enums it holds) silently
//! misreads every stored log. The golden-bytes tests below fail when an existing variant's
//! encoding changes.

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
    /// A stuck saga's compensation made progress (its parked step was acknowledged, or a late
    /// acknowledgement arrived): it goes on compensating.
    CompensationResumed {
        reason: String,
    },
    /// No acknowledgement came for `steps` within the deadline: their compensation messages
    /// were written to the outbox again in the same append (re-publish number `republish`).
    CompensationRepublished {
        steps: Vec<String>,
        republish: u32,
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
            SagaEvent::CompensationResumed { .. } => "CompensationResumed",
            SagaEvent::CompensationRepublished { .. } => "CompensationRepublished",
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
            SagaEvent::CompensationResumed { reason } => reason.clone(),
            SagaEvent::CompensationRepublished { steps, republish } => {
                format!("re-publish {republish}: no acknowledgement of {steps:?}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use saga_storage::codec;

    /// One value of every variant, in declaration order, with the bytes it was first stored
    /// as. A failure here means stored logs would be misread: add new variants at the end
    /// instead, and never change an existing one.
    fn golden() -> Vec<(SagaEvent, &'static str)> {
        let s = |x: &str| x.to_owned();
        vec![
            (
                SagaEvent::SagaStarted {
                    definition: s("order"),
                    request_id: s("r"),
                    payload: vec![7],
                    steps: vec![s("a")],
                    skipped: vec![],
                },
                "00056f726465720172010701016100",
            ),
            (
                SagaEvent::StepStarted {
                    step: s("a"),
                    attempt: 2,
                },
                "01016102",
            ),
            (SagaEvent::StepSucceeded { step: s("a") }, "020161"),
            (
                SagaEvent::StepFailed {
                    step: s("a"),
                    kind: FailureKind::Unknown,
                    error: s("e"),
                    retrying: true,
                },
                "03016102016501",
            ),
            (SagaEvent::AbortRequested { reason: s("x") }, "040178"),
            (
                SagaEvent::CompensationRequested {
                    steps: vec![s("a")],
                    reason: s("x"),
                },
                "050101610178",
            ),
            (
                SagaEvent::CompensationApplied {
                    step: s("a"),
                    outcome: CompensationOutcome::AlreadyApplied,
                },
                "06016102",
            ),
            (
                SagaEvent::CompensationParked {
                    step: s("a"),
                    error: s("e"),
                },
                "0701610165",
            ),
            (SagaEvent::SagaCompleted, "08"),
            (SagaEvent::SagaCompensated, "09"),
            (SagaEvent::SagaStuck { reason: s("x") }, "0a0178"),
            (
                SagaEvent::SagaRetried {
                    reason: s("x"),
                    compensations: vec![s("a")],
                },
                "0b0178010161",
            ),
            (SagaEvent::CompensationResumed { reason: s("x") }, "0c0178"),
            (
                SagaEvent::CompensationRepublished {
                    steps: vec![s("a")],
                    republish: 3,
                },
                "0d01016103",
            ),
        ]
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn stored_saga_events_keep_their_encoding() {
        let (events, stored): (Vec<SagaEvent>, Vec<&str>) = golden().into_iter().unzip();
        let actual: Vec<String> = events
            .iter()
            .map(|e| hex(&codec::encode(e).expect("encodes")))
            .collect();
        assert_eq!(actual, stored);
    }
}

//! The orchestrator's metrics (the `metrics` facade: nothing is kept until the binary installs
//! a recorder with `--metrics-listen`). Documented in the README. Saga counters are counted
//! where the events become durable ([`sagas_appended`], called by the engine's one append), so
//! a counted saga is one the log holds.

use std::time::Duration;

use crate::engine::StepError;
use crate::events::SagaEvent;
use crate::state::Status;

/// Counter by `definition`: sagas started.
pub const SAGAS_STARTED_TOTAL: &str = "saga_sagas_started_total";
/// Counter by `definition`: sagas completed.
pub const SAGAS_COMPLETED_TOTAL: &str = "saga_sagas_completed_total";
/// Counter by `definition`: sagas compensated.
pub const SAGAS_COMPENSATED_TOTAL: &str = "saga_sagas_compensated_total";
/// Counter by `definition`: sagas that became STUCK (each time).
pub const SAGAS_STUCK_TOTAL: &str = "saga_sagas_stuck_total";
/// Gauge: sagas running or compensating (not final, not stuck): those the log held so at
/// start, plus those started, retried or resumed since, minus those that ended or got stuck.
pub const SAGAS_IN_FLIGHT: &str = "saga_sagas_in_flight";
/// Histogram by `step` and `outcome` (`ok`, `business`, `transient`, `unknown`): seconds of one
/// step call, from the call to its answer or missed deadline.
pub const STEP_SECONDS: &str = "saga_step_seconds";
/// Counter: appends to a saga's stream refused with a version conflict (another writer of the
/// saga appended first: its driver, an acknowledgement, an operator); the loser read and
/// decided again.
pub const SAGA_APPEND_CONFLICTS_TOTAL: &str = "saga_append_conflicts_total";
/// Counter by `via` (`topic`: the acknowledgement topic; `grpc`: AcknowledgeCompensations):
/// participants' acknowledgements received (duplicates included), before they are applied.
pub const ACKS_RECEIVED_TOTAL: &str = "saga_acks_received_total";

/// Whether a saga is in flight (driven: running or compensating) after `event`, given whether
/// it was before. Mirrors the statuses `SagaState::apply` sets; only in-flight or not matters
/// here (a retried saga runs or compensates: both are in flight).
fn in_flight_after(before: bool, event: &SagaEvent) -> bool {
    match event {
        SagaEvent::SagaStarted { .. }
        | SagaEvent::CompensationRequested { .. }
        | SagaEvent::SagaRetried { .. }
        | SagaEvent::CompensationResumed { .. } => true,
        SagaEvent::SagaCompleted | SagaEvent::SagaCompensated | SagaEvent::SagaStuck { .. } => false,
        _ => before,
    }
}

/// Counts what `events`, just made durable for a saga of `definition` whose durable status
/// before them was `before` (`None`: a new saga), did. The in-flight gauge moves by the change
/// of one saga's in-flight-ness, so that a saga stuck and then compensated by a late
/// acknowledgement leaves it once. (The gauge starts from [`set_in_flight`] before anything
/// can append.)
pub fn sagas_appended(definition: &str, before: Option<Status>, events: &[SagaEvent]) {
    let was = before.is_some_and(|s| matches!(s, Status::Running | Status::Compensating));
    let mut now = was;
    for event in events {
        now = in_flight_after(now, event);
        let counter = match event {
            SagaEvent::SagaStarted { .. } => SAGAS_STARTED_TOTAL,
            SagaEvent::SagaCompleted => SAGAS_COMPLETED_TOTAL,
            SagaEvent::SagaCompensated => SAGAS_COMPENSATED_TOTAL,
            SagaEvent::SagaStuck { .. } => SAGAS_STUCK_TOTAL,
            _ => continue,
        };
        metrics::counter!(counter, "definition" => definition.to_owned()).increment(1);
    }
    if now != was {
        metrics::gauge!(SAGAS_IN_FLIGHT).increment(if now { 1.0 } else { -1.0 });
    }
}

/// The gauge's start: the sagas the log holds as running or compensating, counted before the
/// first append of this process.
pub fn set_in_flight(count: usize) {
    metrics::gauge!(SAGAS_IN_FLIGHT).set(count as f64);
}

/// Counts an append to a saga's stream refused with a version conflict.
pub fn append_conflicted() {
    metrics::counter!(SAGA_APPEND_CONFLICTS_TOTAL).increment(1);
}

/// Counts acknowledgements received by `via` (`topic` or `grpc`).
pub fn acks_received(via: &'static str, count: usize) {
    metrics::counter!(ACKS_RECEIVED_TOTAL, "via" => via).increment(count as u64);
}

/// Records one step call.
pub fn step_called(step: &str, took: Duration, result: &Result<(), StepError>) {
    let outcome = match result {
        Ok(()) => "ok",
        Err(StepError::Business(_)) => "business",
        Err(StepError::Transient(_)) => "transient",
        Err(StepError::Unknown(_)) => "unknown",
    };
    metrics::histogram!(STEP_SECONDS, "step" => step.to_owned(), "outcome" => outcome)
        .record(took.as_secs_f64());
}

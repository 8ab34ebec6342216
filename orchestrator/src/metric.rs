//! The orchestrator's metrics (the `metrics` facade: nothing is kept until the binary installs
//! a recorder with `--metrics-listen`). Documented in the README. Saga counters are counted
//! where the events become durable ([`sagas_appended`], called by the engine's one append), so
//! a counted saga is one the log holds.

use std::time::Duration;

use crate::engine::StepError;
use crate::events::SagaEvent;

/// Counter by `definition`: sagas started.
pub const SAGAS_STARTED_TOTAL: &str = "saga_sagas_started_total";
/// Counter by `definition`: sagas completed.
pub const SAGAS_COMPLETED_TOTAL: &str = "saga_sagas_completed_total";
/// Counter by `definition`: sagas compensated.
pub const SAGAS_COMPENSATED_TOTAL: &str = "saga_sagas_compensated_total";
/// Counter by `definition`: sagas that became STUCK (each time).
pub const SAGAS_STUCK_TOTAL: &str = "saga_sagas_stuck_total";
/// Gauge: sagas this process drives (started, resumed at start or retried, and not yet final
/// or stuck).
pub const SAGAS_IN_FLIGHT: &str = "saga_sagas_in_flight";
/// Histogram by `step` and `outcome` (`ok`, `business`, `transient`, `unknown`): seconds of one
/// step call, from the call to its answer or missed deadline.
pub const STEP_SECONDS: &str = "saga_step_seconds";

/// Counts what `events`, just made durable for a saga of `definition`, did.
pub fn sagas_appended(definition: &str, events: &[SagaEvent]) {
    for event in events {
        let (counter, in_flight) = match event {
            SagaEvent::SagaStarted { .. } => (Some(SAGAS_STARTED_TOTAL), 1.0),
            SagaEvent::SagaCompleted => (Some(SAGAS_COMPLETED_TOTAL), -1.0),
            SagaEvent::SagaCompensated => (Some(SAGAS_COMPENSATED_TOTAL), -1.0),
            SagaEvent::SagaStuck { .. } => (Some(SAGAS_STUCK_TOTAL), -1.0),
            SagaEvent::SagaRetried { .. } | SagaEvent::CompensationResumed { .. } => (None, 1.0),
            _ => continue,
        };
        if let Some(counter) = counter {
            metrics::counter!(counter, "definition" => definition.to_owned()).increment(1);
        }
        metrics::gauge!(SAGAS_IN_FLIGHT).increment(in_flight);
    }
}

/// Sagas resumed at start join the in-flight gauge.
pub fn sagas_resumed(count: usize) {
    metrics::gauge!(SAGAS_IN_FLIGHT).increment(count as f64);
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

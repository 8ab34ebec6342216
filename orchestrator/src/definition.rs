//! Saga definitions as data: ordered steps, each with its participant, action, compensation,
//! deadline and retry policy. The engine interprets a definition; it knows nothing about what
//! the steps mean (the order saga is one definition, in `order`).

use std::time::Duration;

/// How a step's transient failures are retried (always with the same idempotency key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Most forward attempts of the step, the first included.
    pub attempts_max: u32,
    /// Backoff before the second attempt; doubles with each further attempt.
    pub backoff_base_ms: u64,
    /// Longest backoff.
    pub backoff_max_ms: u64,
}

impl RetryPolicy {
    /// The wait before attempt `attempt` (2 = the first retry): exponential with "full
    /// jitter" (uniform in [half, full] of the exponential value), so that retries of many
    /// sagas against a participant that just came back do not arrive in lockstep.
    pub fn backoff(&self, attempt: u32) -> Duration {
        if attempt <= 1 {
            return Duration::ZERO;
        }
        let exp = self
            .backoff_base_ms
            .saturating_mul(1u64 << (attempt - 2).min(20))
            .min(self.backoff_max_ms);
        let half = exp / 2;
        Duration::from_millis(half + jitter(exp - half + 1))
    }
}

/// A random number in `0..bound`.
fn jitter(bound: u64) -> u64 {
    fastrand::u64(0..bound.max(1))
}

/// One step of a saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepDef {
    /// The step's name: part of the idempotency key (`<saga_id>` + name) and of message keys.
    pub name: String,
    /// The participant role that performs it; also the compensation message's tag.
    pub participant: String,
    /// What the invoker should do (e.g. `stock.reserve`); opaque to the engine.
    pub action: String,
    /// Whether a compensation exists. A step without one (the pivot's successors, e.g.
    /// confirming the order) is never undone: its transient or unknown failures are retried,
    /// and past its attempts the saga is STUCK for an operator rather than compensated.
    pub compensable: bool,
    /// Deadline of one forward call. Passing it means "outcome unknown".
    pub deadline_ms: u64,
    pub retry: RetryPolicy,
}

/// A definition the engine cannot run (refused when it is registered, `Engine::new`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid saga definition: {0}")]
pub struct InvalidDefinition(pub String);

/// A saga definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaDefinition {
    /// Stored in `SagaStarted`: the engine finds the definition of a saga by it on recovery.
    pub name: String,
    /// Prefix of the saga ids (`ord` gives `ord-...`).
    pub id_prefix: String,
    pub steps: Vec<StepDef>,
}

impl SagaDefinition {
    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }

    /// What the engine relies on: unique step names, and every compensable step before the
    /// first step without compensation (the pivot). The engine calls compensable steps without
    /// a record in between and compensates all of them that may have been called; a
    /// compensable step after the pivot could only be undone together with a step that cannot
    /// be (crash-safety invariants 1 and 3, in `state`).
    pub fn validate(&self) -> Result<(), InvalidDefinition> {
        for (i, step) in self.steps.iter().enumerate() {
            if self.steps[..i].iter().any(|s| s.name == step.name) {
                return Err(InvalidDefinition(format!("step {:?} appears twice", step.name)));
            }
            if step.compensable
                && let Some(pivot) = self.steps[..i].iter().find(|s| !s.compensable)
            {
                return Err(InvalidDefinition(format!(
                    "compensable step {:?} comes after {:?}, which has no compensation",
                    step.name, pivot.name
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::order::{self, OrderTiming};

    #[test]
    fn a_compensable_step_after_the_pivot_or_a_repeated_name_is_refused() {
        let mut def = order::definition(&OrderTiming::default());
        assert_eq!(def.validate(), Ok(()));
        let pivot = def.steps.last().expect("steps").clone();
        let mut after = def.steps[0].clone();
        after.name = "after_pivot".into();
        def.steps.push(after);
        let error = def.validate().expect_err("compensable after the pivot");
        assert!(
            error.0.contains("after_pivot") && error.0.contains(&pivot.name),
            "{error}"
        );
        def.steps.pop();
        def.steps.push(def.steps[1].clone());
        let error = def.validate().expect_err("a name twice");
        assert!(error.0.contains("twice"), "{error}");
    }
}

//! A saga's state as the fold of its events, and the engine's decision of what to do next,
//! computed from that state alone (so recovery after a crash is: replay, then decide).
//!
//! Which steps are compensated: every compensable step that may have taken effect. That is
//! each succeeded step, and the *frontier* step (the first one neither succeeded nor skipped)
//! unless a participant refused it for good. The frontier is included whatever its recorded
//! phase: the engine may call a step before its `StepStarted` is durable, so after a crash a
//! step that shows as pending may have been applied. Its compensation is then a null
//! compensation at worst.

use crate::definition::SagaDefinition;
use crate::events::{FailureKind, SagaEvent};

/// Where the saga stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Running,
    Compensating,
    Completed,
    Compensated,
    Stuck,
}

impl Status {
    pub fn is_final(self) -> bool {
        matches!(self, Status::Completed | Status::Compensated)
    }

    /// The name used in projection keys and by sagactl.
    pub fn name(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Compensating => "compensating",
            Status::Completed => "completed",
            Status::Compensated => "compensated",
            Status::Stuck => "stuck",
        }
    }

    pub const ALL: [Status; 5] = [
        Status::Running,
        Status::Compensating,
        Status::Completed,
        Status::Compensated,
        Status::Stuck,
    ];
}

/// Where one step stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Pending,
    /// Called; outcome not recorded (in flight, or the process died).
    Running,
    Succeeded,
    Failed(FailureKind),
    Skipped,
    Compensating,
    Compensated,
    CompensationParked,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepState {
    pub name: String,
    pub phase: Phase,
    /// Forward attempts made.
    pub attempts: u32,
    pub last_error: String,
    /// Whether the last recorded failure is followed by another attempt.
    pub retrying: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaState {
    pub saga_id: String,
    pub definition: String,
    pub request_id: String,
    pub payload: Vec<u8>,
    pub status: Status,
    pub steps: Vec<StepState>,
    /// Number of events folded (the stream version).
    pub version: u64,
    pub started_at_unix_us: i64,
    pub updated_at_unix_us: i64,
    pub failure_reason: String,
    pub abort_requested: bool,
}

impl SagaState {
    /// The state after `SagaStarted` (the first event of every saga stream).
    fn started(saga_id: &str, event: &SagaEvent, timestamp_us: i64) -> Option<SagaState> {
        let SagaEvent::SagaStarted {
            definition,
            request_id,
            payload,
            steps,
            skipped,
        } = event
        else {
            return None;
        };
        Some(SagaState {
            saga_id: saga_id.to_owned(),
            definition: definition.clone(),
            request_id: request_id.clone(),
            payload: payload.clone(),
            status: Status::Running,
            steps: steps
                .iter()
                .map(|name| StepState {
                    name: name.clone(),
                    phase: if skipped.contains(name) {
                        Phase::Skipped
                    } else {
                        Phase::Pending
                    },
                    attempts: 0,
                    last_error: String::new(),
                    retrying: false,
                })
                .collect(),
            version: 1,
            started_at_unix_us: timestamp_us,
            updated_at_unix_us: timestamp_us,
            failure_reason: String::new(),
            abort_requested: false,
        })
    }

    /// Folds a whole stream. `None` for an empty stream; an error names the first event that
    /// does not fit (a bug or a foreign stream, never silently skipped).
    pub fn fold(
        saga_id: &str,
        events: impl IntoIterator<Item = (SagaEvent, i64)>,
    ) -> Result<Option<SagaState>, String> {
        let mut events = events.into_iter();
        let Some((first, ts)) = events.next() else {
            return Ok(None);
        };
        let mut state = SagaState::started(saga_id, &first, ts)
            .ok_or_else(|| format!("stream {saga_id} does not begin with SagaStarted"))?;
        for (event, ts) in events {
            state.apply(&event, ts)?;
        }
        Ok(Some(state))
    }

    fn step_mut(&mut self, name: &str) -> Result<&mut StepState, String> {
        let saga = &self.saga_id;
        self.steps
            .iter_mut()
            .find(|s| s.name == name)
            .ok_or_else(|| format!("saga {saga} has no step {name:?}"))
    }

    /// Applies one event. Never does I/O; an error means the event cannot follow this state.
    pub fn apply(&mut self, event: &SagaEvent, timestamp_us: i64) -> Result<(), String> {
        if self.status.is_final() {
            return Err(format!(
                "{} after the saga {} was final",
                event.name(),
                self.saga_id
            ));
        }
        match event {
            SagaEvent::SagaStarted { .. } => return Err("a second SagaStarted".into()),
            SagaEvent::StepStarted { step, attempt } => {
                let s = self.step_mut(step)?;
                s.phase = Phase::Running;
                s.attempts = *attempt;
            }
            SagaEvent::StepSucceeded { step } => {
                let s = self.step_mut(step)?;
                s.phase = Phase::Succeeded;
                s.retrying = false;
            }
            SagaEvent::StepFailed {
                step,
                kind,
                error,
                retrying,
            } => {
                let s = self.step_mut(step)?;
                s.last_error = error.clone();
                s.retrying = *retrying;
                s.phase = if *retrying {
                    Phase::Pending
                } else {
                    Phase::Failed(*kind)
                };
                if !*retrying {
                    self.failure_reason = format!("{step}: {} failure: {error}", kind.name());
                }
            }
            SagaEvent::AbortRequested { reason } => {
                self.abort_requested = true;
                self.failure_reason = format!("aborted: {reason}");
            }
            SagaEvent::CompensationRequested { steps, reason } => {
                for name in steps {
                    self.step_mut(name)?.phase = Phase::Compensating;
                }
                self.status = Status::Compensating;
                if self.failure_reason.is_empty() {
                    self.failure_reason = reason.clone();
                }
            }
            SagaEvent::CompensationApplied { step, .. } => {
                self.step_mut(step)?.phase = Phase::Compensated;
            }
            SagaEvent::CompensationParked { step, error } => {
                let s = self.step_mut(step)?;
                s.phase = Phase::CompensationParked;
                s.last_error = error.clone();
            }
            SagaEvent::SagaCompleted => self.status = Status::Completed,
            SagaEvent::SagaCompensated => self.status = Status::Compensated,
            SagaEvent::SagaStuck { reason } => {
                self.status = Status::Stuck;
                self.failure_reason = reason.clone();
            }
            SagaEvent::SagaRetried { compensations, .. } => {
                if compensations.is_empty() {
                    // A forward step ran out of attempts: it starts again from attempt 1.
                    for s in &mut self.steps {
                        if matches!(s.phase, Phase::Failed(_)) {
                            s.phase = Phase::Pending;
                            s.attempts = 0;
                        }
                    }
                    self.status = Status::Running;
                } else {
                    for name in compensations {
                        self.step_mut(name)?.phase = Phase::Compensating;
                    }
                    self.status = Status::Compensating;
                }
            }
        }
        self.version += 1;
        self.updated_at_unix_us = timestamp_us;
        Ok(())
    }

    /// The first step neither succeeded nor skipped.
    pub fn frontier(&self) -> Option<usize> {
        self.steps
            .iter()
            .position(|s| !matches!(s.phase, Phase::Succeeded | Phase::Skipped))
    }

    /// The steps to compensate, in reverse order (see the module doc).
    pub fn to_compensate(&self, definition: &SagaDefinition) -> Vec<usize> {
        let frontier = self.frontier().unwrap_or(self.steps.len());
        let mut steps: Vec<usize> = (0..self.steps.len().min(frontier + 1))
            .filter(|&i| {
                let compensable = definition
                    .steps
                    .iter()
                    .find(|d| d.name == self.steps[i].name)
                    .is_some_and(|d| d.compensable);
                compensable
                    && !matches!(
                        self.steps[i].phase,
                        Phase::Skipped | Phase::Failed(FailureKind::Business)
                    )
            })
            .collect();
        steps.reverse();
        steps
    }

    /// Whether an abort is still possible: not once a step without compensation may have
    /// started (past the pivot, the saga can only go forward).
    pub fn abortable(&self, definition: &SagaDefinition) -> bool {
        if self.status != Status::Running {
            return false;
        }
        let Some(frontier) = self.frontier() else {
            return false;
        };
        self.steps[..=frontier].iter().all(|s| {
            s.phase == Phase::Skipped
                || definition
                    .steps
                    .iter()
                    .find(|d| d.name == s.name)
                    .is_some_and(|d| d.compensable)
        })
    }

    /// What to do next, from the state alone.
    pub fn next(&self, definition: &SagaDefinition) -> Next {
        match self.status {
            Status::Completed | Status::Compensated => Next::Done,
            Status::Stuck => Next::Wait,
            Status::Compensating => {
                if self.steps.iter().any(|s| s.phase == Phase::CompensationParked) {
                    Next::MarkStuck {
                        reason: "a compensation was parked by its participant".into(),
                    }
                } else if self.steps.iter().any(|s| s.phase == Phase::Compensating) {
                    Next::Wait
                } else {
                    Next::FinishCompensated
                }
            }
            Status::Running => {
                let failed = self
                    .steps
                    .iter()
                    .position(|s| matches!(s.phase, Phase::Failed(_)));
                if let Some(i) = failed {
                    let Phase::Failed(kind) = self.steps[i].phase else {
                        unreachable!("matched above")
                    };
                    let compensable = definition
                        .steps
                        .iter()
                        .find(|d| d.name == self.steps[i].name)
                        .is_none_or(|d| d.compensable);
                    if kind != FailureKind::Business && !compensable {
                        return Next::MarkStuck {
                            reason: format!(
                                "{} (not compensable) failed past its attempts: {}",
                                self.steps[i].name, self.steps[i].last_error
                            ),
                        };
                    }
                    return Next::Compensate {
                        steps: self.to_compensate(definition),
                    };
                }
                if self.abort_requested {
                    return Next::Compensate {
                        steps: self.to_compensate(definition),
                    };
                }
                let Some(i) = self.frontier() else {
                    return Next::Complete;
                };
                let step = &self.steps[i];
                let attempts_max = definition
                    .steps
                    .iter()
                    .find(|d| d.name == step.name)
                    .map_or(1, |d| d.retry.attempts_max);
                if step.attempts >= attempts_max {
                    // Only after a crash mid-call: the last attempt's outcome is unknown.
                    Next::GiveUp { step: i }
                } else {
                    Next::Call {
                        step: i,
                        attempt: step.attempts + 1,
                    }
                }
            }
        }
    }
}

/// The engine's next move for a saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Call step `step` (index into the definition), attempt `attempt`.
    Call {
        step: usize,
        attempt: u32,
    },
    /// The step's attempts are used up with its last outcome unknown: record the failure.
    GiveUp {
        step: usize,
    },
    /// Request compensation of these steps (indices, reverse order); empty: nothing to undo.
    Compensate {
        steps: Vec<usize>,
    },
    Complete,
    FinishCompensated,
    MarkStuck {
        reason: String,
    },
    /// Nothing to do until an acknowledgement or an operator arrives.
    Wait,
    Done,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::CompensationOutcome;
    use crate::order::{self, OrderTiming};

    fn started(skipped: &[&str]) -> SagaState {
        let def = order::definition(&OrderTiming::default());
        let event = SagaEvent::SagaStarted {
            definition: def.name.clone(),
            request_id: "r".into(),
            payload: Vec::new(),
            steps: def.steps.iter().map(|s| s.name.clone()).collect(),
            skipped: skipped.iter().map(|s| s.to_string()).collect(),
        };
        SagaState::fold("ord-1", [(event, 0)])
            .expect("folds")
            .expect("state")
    }

    fn apply(state: &mut SagaState, events: &[SagaEvent]) {
        for e in events {
            state.apply(e, 0).expect("applies");
        }
    }

    fn ok(step: &str) -> SagaEvent {
        SagaEvent::StepSucceeded { step: step.into() }
    }

    fn failed(step: &str, kind: FailureKind, retrying: bool) -> SagaEvent {
        SagaEvent::StepFailed {
            step: step.into(),
            kind,
            error: "e".into(),
            retrying,
        }
    }

    #[test]
    fn the_frontier_step_is_compensated_even_when_it_looks_pending() {
        let def = order::definition(&OrderTiming::default());
        let mut state = started(&["lock_coupon"]);
        apply(&mut state, &[ok("create_order"), ok("reserve_stock")]);
        // The process died after calling deduct_balance, before recording StepStarted.
        state.abort_requested = true;
        assert_eq!(state.next(&def), Next::Compensate { steps: vec![3, 1, 0] });
    }

    #[test]
    fn a_business_refusal_is_not_compensated_but_an_unknown_outcome_is() {
        let def = order::definition(&OrderTiming::default());
        let mut refused = started(&[]);
        apply(
            &mut refused,
            &[
                ok("create_order"),
                failed("reserve_stock", FailureKind::Business, false),
            ],
        );
        assert_eq!(refused.next(&def), Next::Compensate { steps: vec![0] });
        let mut unknown = started(&[]);
        apply(
            &mut unknown,
            &[
                ok("create_order"),
                failed("reserve_stock", FailureKind::Unknown, false),
            ],
        );
        assert_eq!(unknown.next(&def), Next::Compensate { steps: vec![1, 0] });
    }

    #[test]
    fn transient_failures_retry_then_a_crash_mid_last_attempt_gives_up() {
        let def = order::definition(&OrderTiming::default());
        let mut state = started(&[]);
        apply(
            &mut state,
            &[failed("create_order", FailureKind::Transient, true)],
        );
        assert_eq!(state.next(&def), Next::Call { step: 0, attempt: 1 });
        let max = def.steps[0].retry.attempts_max;
        apply(
            &mut state,
            &[SagaEvent::StepStarted {
                step: "create_order".into(),
                attempt: max,
            }],
        );
        assert_eq!(state.next(&def), Next::GiveUp { step: 0 });
    }

    #[test]
    fn past_the_pivot_a_failure_is_stuck_not_compensated_and_abort_is_refused() {
        let def = order::definition(&OrderTiming::default());
        let mut state = started(&[]);
        apply(
            &mut state,
            &[
                ok("create_order"),
                ok("reserve_stock"),
                ok("lock_coupon"),
                ok("deduct_balance"),
            ],
        );
        assert!(!state.abortable(&def));
        let mut unknown = state.clone();
        apply(
            &mut unknown,
            &[failed("confirm_order", FailureKind::Unknown, false)],
        );
        assert!(matches!(unknown.next(&def), Next::MarkStuck { .. }));
        // A refusal of the confirmation did nothing: undo the four earlier steps.
        apply(
            &mut state,
            &[failed("confirm_order", FailureKind::Business, false)],
        );
        assert_eq!(
            state.next(&def),
            Next::Compensate {
                steps: vec![3, 2, 1, 0]
            }
        );
    }

    #[test]
    fn acknowledgements_and_parking_lead_to_compensated_or_stuck_and_retry_resends() {
        let def = order::definition(&OrderTiming::default());
        let mut state = started(&[]);
        apply(
            &mut state,
            &[
                ok("create_order"),
                failed("reserve_stock", FailureKind::Business, false),
                SagaEvent::CompensationRequested {
                    steps: vec!["create_order".into()],
                    reason: "r".into(),
                },
            ],
        );
        assert_eq!(state.next(&def), Next::Wait);
        let mut parked = state.clone();
        apply(
            &mut parked,
            &[SagaEvent::CompensationParked {
                step: "create_order".into(),
                error: "x".into(),
            }],
        );
        assert!(matches!(parked.next(&def), Next::MarkStuck { .. }));
        apply(
            &mut parked,
            &[
                SagaEvent::SagaStuck { reason: "x".into() },
                SagaEvent::SagaRetried {
                    reason: "fixed".into(),
                    compensations: vec!["create_order".into()],
                },
            ],
        );
        assert_eq!(parked.status, Status::Compensating);
        assert_eq!(parked.next(&def), Next::Wait);
        apply(
            &mut state,
            &[SagaEvent::CompensationApplied {
                step: "create_order".into(),
                outcome: CompensationOutcome::Applied,
            }],
        );
        assert_eq!(state.next(&def), Next::FinishCompensated);
        apply(&mut state, &[SagaEvent::SagaCompensated]);
        assert!(
            state.apply(&ok("create_order"), 0).is_err(),
            "nothing follows a final event"
        );
    }
}

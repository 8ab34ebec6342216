//! A saga's state as the fold of its events, and the engine's decision of what to do next,
//! computed from that state alone (so recovery after a crash is: replay, then decide).
//!
//! # Crash-safety invariants (kept here and by `engine`)
//!
//! 1. **Every step that may have been called is either durably recorded as succeeded or is
//!    compensated.** The engine calls the compensable steps of a definition (they all come
//!    before its first step without compensation, `SagaDefinition::validate`) without waiting
//!    for any record: their starts and outcomes reach the log in one append, before the first
//!    step without compensation is called (or with the compensation request, the saga's end, a
//!    retry's backoff, a drain). So after a crash the log can end at any step before the pivot
//!    while every compensable step after it was applied. Which steps may have been called is
//!    therefore computed from the log, not from the phases alone
//!    ([`SagaState::called_horizon`]): every started step, and every compensable step after
//!    the last started one up to the next step without compensation. A step refused for good
//!    (a business refusal) did nothing, and nothing after it was called: a participant's
//!    barrier answers a repeated call with its first outcome, so a refusal seen in any life
//!    was the first outcome, and no life went past it. Compensating a step that was never
//!    applied is a null compensation at the participant's barrier: over-approximating costs a
//!    message (only after a crash, an abort or an unknown outcome), never money.
//! 2. **Once compensation is requested, no forward step is called again**:
//!    `compensation_requested` is set by `CompensationRequested` and nothing clears it; a
//!    retried or resumed saga with it set goes on compensating ([`SagaState::next`] never
//!    answers `Call` for it).
//! 3. **A step past the pivot (no compensation) that may have been called is never followed by
//!    compensation.** The engine calls a step without compensation for the first time only
//!    once its `StepStarted` (with every record before it) is durable, so such a step is inside
//!    the horizon only when its start is durable; from then on failures are retried,
//!    then the saga is Stuck for an operator, and abort is refused ([`SagaState::abortable`]).
//! 4. **Every compensation is acknowledged or re-published.** The state remembers when the
//!    open compensations were last sent and how often they were re-published; the engine
//!    re-publishes them when the acknowledgement deadline passes and, past a bounded number of
//!    re-publishes, marks the saga Stuck with the reason ([`Next::AwaitAcks`]). Each sending
//!    is a numbered round (`compensation_round`), echoed by acks, so a PARKED ack of an earlier
//!    round cannot park the saga again after a retry. Participants
//!    write acknowledgements to their own outbox with the consumer-log event, so an ack is lost
//!    only with the participant's log itself.

use saga_proto::v1 as pb;
use saga_storage::StreamVersion;

use crate::definition::SagaDefinition;
use crate::events::{FailureKind, SagaEvent};

/// Why an event cannot follow a saga's state: the stream is damaged or foreign (never skipped).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FoldError {
    #[error("stream {saga_id} does not begin with SagaStarted")]
    NotStarted { saga_id: String },
    #[error("{event} after the saga {saga_id} was final")]
    AfterFinal { saga_id: String, event: &'static str },
    #[error("a second SagaStarted in saga {saga_id}")]
    StartedTwice { saga_id: String },
    #[error("saga {saga_id} has no step {step:?}")]
    UnknownStep { saga_id: String, step: String },
    #[error("definition {definition:?} has no step {step:?}")]
    NotInDefinition { definition: String, step: String },
    #[error("CompensationResumed of saga {saga_id} that never requested compensation")]
    ResumedWithoutCompensation { saga_id: String },
}

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

    /// The name used in projection keys, logs and by sagactl (`saga_proto`'s one list).
    pub fn name(self) -> &'static str {
        pb::SagaState::from(self).name()
    }

    pub const ALL: [Status; 5] = [
        Status::Running,
        Status::Compensating,
        Status::Completed,
        Status::Compensated,
        Status::Stuck,
    ];
}

impl From<Status> for pb::SagaState {
    fn from(status: Status) -> pb::SagaState {
        match status {
            Status::Running => pb::SagaState::Running,
            Status::Compensating => pb::SagaState::Compensating,
            Status::Completed => pb::SagaState::Completed,
            Status::Compensated => pb::SagaState::Compensated,
            Status::Stuck => pb::SagaState::Stuck,
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is no saga status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown saga status {0:?}")]
pub struct UnknownStatus(pub String);

impl std::str::FromStr for Status {
    type Err = UnknownStatus;

    fn from_str(name: &str) -> Result<Status, UnknownStatus> {
        Status::ALL
            .into_iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| UnknownStatus(name.to_owned()))
    }
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
    /// A `StepStarted` of this step is in the log. Never cleared (a RetrySaga restarts the
    /// attempts, but an earlier attempt may have taken effect: invariants 1 and 3).
    pub ever_started: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaState {
    pub saga_id: String,
    pub definition: String,
    pub request_id: String,
    pub payload: Vec<u8>,
    pub status: Status,
    pub steps: Vec<StepState>,
    /// The stream version folded (its number of events).
    pub version: StreamVersion,
    pub started_at_unix_us: i64,
    pub updated_at_unix_us: i64,
    pub failure_reason: String,
    pub abort_requested: bool,
    /// Set by `CompensationRequested`, never cleared (invariant 2).
    pub compensation_requested: bool,
    /// When the open compensations were last sent (requested, re-published, retried).
    pub compensations_sent_at_unix_us: i64,
    /// Re-publishes since they were last sent by a decision or an operator.
    pub republishes: u32,
    /// How many times compensations were sent (requested, re-published, retried): the round
    /// named in the requests and echoed by acknowledgements.
    pub compensation_round: u32,
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
                    ever_started: false,
                })
                .collect(),
            version: StreamVersion::FIRST,
            started_at_unix_us: timestamp_us,
            updated_at_unix_us: timestamp_us,
            failure_reason: String::new(),
            abort_requested: false,
            compensation_requested: false,
            compensations_sent_at_unix_us: 0,
            republishes: 0,
            compensation_round: 0,
        })
    }

    /// Folds a whole stream. `None` for an empty stream; an error names the first event that
    /// does not fit (a bug or a foreign stream, never silently skipped).
    pub fn fold(
        saga_id: &str,
        events: impl IntoIterator<Item = (SagaEvent, i64)>,
    ) -> Result<Option<SagaState>, FoldError> {
        let mut events = events.into_iter();
        let Some((first, ts)) = events.next() else {
            return Ok(None);
        };
        let mut state = SagaState::started(saga_id, &first, ts).ok_or_else(|| FoldError::NotStarted {
            saga_id: saga_id.to_owned(),
        })?;
        for (event, ts) in events {
            state.apply(&event, ts)?;
        }
        Ok(Some(state))
    }

    fn step_mut(&mut self, name: &str) -> Result<&mut StepState, FoldError> {
        let saga = &self.saga_id;
        self.steps
            .iter_mut()
            .find(|s| s.name == name)
            .ok_or_else(|| FoldError::UnknownStep {
                saga_id: saga.clone(),
                step: name.to_owned(),
            })
    }

    /// Applies one event. Never does I/O; an error means the event cannot follow this state.
    pub fn apply(&mut self, event: &SagaEvent, timestamp_us: i64) -> Result<(), FoldError> {
        if self.status.is_final() {
            return Err(FoldError::AfterFinal {
                saga_id: self.saga_id.clone(),
                event: event.name(),
            });
        }
        match event {
            SagaEvent::SagaStarted { .. } => {
                return Err(FoldError::StartedTwice {
                    saga_id: self.saga_id.clone(),
                });
            }
            SagaEvent::StepStarted { step, attempt } => {
                let s = self.step_mut(step)?;
                s.phase = Phase::Running;
                s.attempts = *attempt;
                s.ever_started = true;
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
                self.compensation_requested = true;
                self.compensations_sent_at_unix_us = timestamp_us;
                self.republishes = 0;
                self.compensation_round += 1;
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
                if self.compensation_requested {
                    // Invariant 2: a saga that requested compensation only compensates, even
                    // when an (older) event lists nothing to send again.
                    for name in compensations {
                        self.step_mut(name)?.phase = Phase::Compensating;
                    }
                    self.status = Status::Compensating;
                    self.compensations_sent_at_unix_us = timestamp_us;
                    self.republishes = 0;
                    self.compensation_round += 1;
                } else {
                    // A forward step ran out of attempts: it starts again from attempt 1.
                    for s in &mut self.steps {
                        if matches!(s.phase, Phase::Failed(_)) {
                            s.phase = Phase::Pending;
                            s.attempts = 0;
                        }
                    }
                    self.status = Status::Running;
                }
            }
            SagaEvent::CompensationResumed { .. } => {
                if !self.compensation_requested {
                    return Err(FoldError::ResumedWithoutCompensation {
                        saga_id: self.saga_id.clone(),
                    });
                }
                self.status = Status::Compensating;
                self.compensations_sent_at_unix_us = timestamp_us;
                self.republishes = 0;
            }
            SagaEvent::CompensationRepublished { steps, republish } => {
                for name in steps {
                    self.step_mut(name)?;
                }
                self.compensations_sent_at_unix_us = timestamp_us;
                self.republishes = *republish;
                self.compensation_round += 1;
            }
        }
        self.version = self.version.next();
        self.updated_at_unix_us = timestamp_us;
        Ok(())
    }

    /// The names of the steps that do not apply to this saga (as given at start).
    pub fn skipped(&self) -> Vec<String> {
        self.steps
            .iter()
            .filter(|s| s.phase == Phase::Skipped)
            .map(|s| s.name.clone())
            .collect()
    }

    /// The first step neither succeeded nor skipped.
    pub fn frontier(&self) -> Option<usize> {
        self.steps
            .iter()
            .position(|s| !matches!(s.phase, Phase::Succeeded | Phase::Skipped))
    }

    fn compensable(&self, definition: &SagaDefinition, index: usize) -> bool {
        definition
            .steps
            .iter()
            .find(|d| d.name == self.steps[index].name)
            .is_some_and(|d| d.compensable)
    }

    /// Whether a `StepStarted` of the step is in the log (so its call may have been made).
    fn is_started(step: &StepState) -> bool {
        step.ever_started || step.attempts > 0 || !matches!(step.phase, Phase::Pending | Phase::Skipped)
    }

    /// The furthest step that may have been called (invariant 1), or `None` before any: the
    /// last started step, or, after it, the last of the compensable steps that follow it up to
    /// the next step without compensation (the engine calls those with no record in the log);
    /// but the last started step itself when it was refused for good (nothing after it was
    /// called). A step without compensation is inside the horizon only once its start is in the
    /// log (the engine makes it durable before the call, invariant 3).
    pub fn called_horizon(&self, definition: &SagaDefinition) -> Option<usize> {
        let last_started = self.steps.iter().rposition(Self::is_started);
        if let Some(i) = last_started
            && self.steps[i].phase == Phase::Failed(FailureKind::Business)
        {
            return Some(i);
        }
        let after = last_started.map_or(0, |i| i + 1);
        let mut horizon = last_started;
        for j in after..self.steps.len() {
            if self.steps[j].phase == Phase::Skipped {
                continue;
            }
            if !self.compensable(definition, j) {
                break;
            }
            horizon = Some(j);
        }
        horizon
    }

    /// The steps to compensate, in reverse order: every compensable step up to the horizon
    /// that may have taken effect (not skipped, not refused for good).
    pub fn to_compensate(&self, definition: &SagaDefinition) -> Vec<usize> {
        let Some(horizon) = self.called_horizon(definition) else {
            return Vec::new();
        };
        let mut steps: Vec<usize> = (0..=horizon)
            .filter(|&i| {
                self.compensable(definition, i)
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
    /// been called (past the pivot, the saga can only go forward).
    pub fn abortable(&self, definition: &SagaDefinition) -> bool {
        if self.status != Status::Running || self.frontier().is_none() {
            return false;
        }
        let Some(horizon) = self.called_horizon(definition) else {
            return true;
        };
        (0..=horizon).all(|i| self.steps[i].phase == Phase::Skipped || self.compensable(definition, i))
    }

    /// Compensations sent and not acknowledged (parked ones excluded), in reverse step order
    /// (the order compensations are sent in).
    pub fn open_compensations(&self) -> Vec<usize> {
        (0..self.steps.len())
            .rev()
            .filter(|&i| self.steps[i].phase == Phase::Compensating)
            .collect()
    }

    /// What to do next, from the state alone.
    pub fn next(&self, definition: &SagaDefinition) -> Next {
        match self.status {
            Status::Completed | Status::Compensated => Next::Done,
            Status::Stuck => Next::Wait,
            Status::Compensating => {
                let open = self.open_compensations();
                if self.steps.iter().any(|s| s.phase == Phase::CompensationParked) {
                    Next::MarkStuck {
                        reason: "a compensation was parked by its participant".into(),
                    }
                } else if !open.is_empty() {
                    Next::AwaitAcks {
                        open,
                        sent_at_unix_us: self.compensations_sent_at_unix_us,
                        republishes: self.republishes,
                    }
                } else {
                    Next::FinishCompensated
                }
            }
            Status::Running if self.compensation_requested => {
                // Invariant 2 (unreachable through the engine's events): never forward again.
                Next::MarkStuck {
                    reason: "running after compensation was requested".into(),
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
    /// Compensations `open` (indices) were sent at `sent_at_unix_us` and re-published
    /// `republishes` times: wait for their acknowledgements until the deadline, then re-publish
    /// or, past the bound, mark the saga Stuck (the engine's configuration has both).
    AwaitAcks {
        open: Vec<usize>,
        sent_at_unix_us: i64,
        republishes: u32,
    },
    /// Nothing to do until an operator arrives.
    Wait,
    Done,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::CompensationOutcome;
    use crate::order::{self, OrderTiming};

    fn started_saga(skipped: &[&str]) -> SagaState {
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
        let mut state = started_saga(&["lock_coupon"]);
        apply(&mut state, &[ok("create_order"), ok("reserve_stock")]);
        // The process died after calling deduct_balance, before recording StepStarted.
        state.abort_requested = true;
        assert_eq!(state.next(&def), Next::Compensate { steps: vec![3, 1, 0] });
    }

    #[test]
    fn a_business_refusal_is_not_compensated_but_an_unknown_outcome_is() {
        let def = order::definition(&OrderTiming::default());
        let mut refused = started_saga(&[]);
        apply(
            &mut refused,
            &[
                ok("create_order"),
                failed("reserve_stock", FailureKind::Business, false),
            ],
        );
        assert_eq!(refused.next(&def), Next::Compensate { steps: vec![0] });
        let mut unknown = started_saga(&[]);
        apply(
            &mut unknown,
            &[
                ok("create_order"),
                failed("reserve_stock", FailureKind::Unknown, false),
            ],
        );
        // lock_coupon and deduct_balance too: reserve_stock may have succeeded in a life whose
        // record was lost, and the compensable steps after it been called with no record
        // (invariant 1); at worst null compensations.
        assert_eq!(
            unknown.next(&def),
            Next::Compensate {
                steps: vec![3, 2, 1, 0]
            }
        );
    }

    #[test]
    fn the_compensable_steps_after_the_last_started_one_are_compensated_but_not_the_pivot() {
        let def = order::definition(&OrderTiming::default());
        let started = |step: &str| SagaEvent::StepStarted {
            step: step.into(),
            attempt: 1,
        };
        // A fresh saga: every compensable step may be called before anything is recorded.
        let state = started_saga(&[]);
        assert_eq!(state.called_horizon(&def), Some(3));
        assert!(state.abortable(&def));
        // Crash after reserve_stock's call returned and the later compensable steps were
        // called, before the append recording them was durable (a retry's backoff had recorded
        // reserve_stock's start): the log ends at reserve_stock's start.
        let mut state = started_saga(&[]);
        apply(
            &mut state,
            &[
                started("create_order"),
                ok("create_order"),
                started("reserve_stock"),
            ],
        );
        assert_eq!(state.called_horizon(&def), Some(3));
        apply(
            &mut state,
            &[failed("reserve_stock", FailureKind::Unknown, false)],
        );
        assert_eq!(
            state.next(&def),
            Next::Compensate {
                steps: vec![3, 2, 1, 0]
            }
        );
        // A business refusal bounds the horizon: nothing after it was called in any life.
        let mut refused = started_saga(&[]);
        apply(
            &mut refused,
            &[
                started("create_order"),
                ok("create_order"),
                started("reserve_stock"),
                failed("reserve_stock", FailureKind::Business, false),
            ],
        );
        assert_eq!(refused.called_horizon(&def), Some(1));
        // Before the pivot: confirm_order is called only once its start is durable, so a log
        // ending at deduct_balance's start never compensates it (it has no compensation) and
        // the saga can still be aborted.
        let mut state = started_saga(&[]);
        for step in ["create_order", "reserve_stock", "lock_coupon"] {
            apply(&mut state, &[started(step), ok(step)]);
        }
        apply(&mut state, &[started("deduct_balance")]);
        assert_eq!(state.called_horizon(&def), Some(3));
        assert!(state.abortable(&def));
        apply(&mut state, &[ok("deduct_balance"), started("confirm_order")]);
        assert_eq!(state.called_horizon(&def), Some(4));
        assert!(!state.abortable(&def), "confirm_order may have been called");
    }

    #[test]
    fn a_retried_confirmation_still_counts_as_possibly_called() {
        // confirm_order ran out of attempts with its outcome unknown, the saga was Stuck, and
        // an operator retried it: its attempts start again, but an earlier attempt may have
        // confirmed the order, so the saga must not become abortable or compensate.
        let def = order::definition(&OrderTiming::default());
        let mut state = started_saga(&[]);
        for step in ["create_order", "reserve_stock", "lock_coupon", "deduct_balance"] {
            apply(
                &mut state,
                &[
                    SagaEvent::StepStarted {
                        step: step.into(),
                        attempt: 1,
                    },
                    ok(step),
                ],
            );
        }
        apply(
            &mut state,
            &[
                SagaEvent::StepStarted {
                    step: "confirm_order".into(),
                    attempt: 1,
                },
                failed("confirm_order", FailureKind::Unknown, false),
                SagaEvent::SagaStuck { reason: "x".into() },
                SagaEvent::SagaRetried {
                    reason: "operator".into(),
                    compensations: vec![],
                },
            ],
        );
        assert_eq!(state.status, Status::Running);
        assert!(!state.abortable(&def), "confirm_order may have been applied");
        assert_eq!(state.called_horizon(&def), Some(4));
    }

    #[test]
    fn a_saga_that_requested_compensation_never_runs_forward_again() {
        let def = order::definition(&OrderTiming::default());
        let mut state = started_saga(&[]);
        apply(
            &mut state,
            &[
                ok("create_order"),
                failed("reserve_stock", FailureKind::Unknown, false),
                SagaEvent::CompensationRequested {
                    steps: vec![
                        "lock_coupon".into(),
                        "reserve_stock".into(),
                        "create_order".into(),
                    ],
                    reason: "r".into(),
                },
                SagaEvent::CompensationApplied {
                    step: "reserve_stock".into(),
                    outcome: CompensationOutcome::Applied,
                },
                SagaEvent::SagaStuck {
                    reason: "no ack".into(),
                },
                // An older engine wrote this for a stuck compensating saga.
                SagaEvent::SagaRetried {
                    reason: "operator".into(),
                    compensations: vec![],
                },
            ],
        );
        assert_eq!(state.status, Status::Compensating);
        assert!(matches!(state.next(&def), Next::AwaitAcks { .. }));
    }

    #[test]
    fn transient_failures_retry_then_a_crash_mid_last_attempt_gives_up() {
        let def = order::definition(&OrderTiming::default());
        let mut state = started_saga(&[]);
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
        let mut state = started_saga(&[]);
        apply(
            &mut state,
            &[
                ok("create_order"),
                ok("reserve_stock"),
                ok("lock_coupon"),
                ok("deduct_balance"),
            ],
        );
        // Nothing irreversible was called yet (confirm_order's start is durable before its
        // call): an abort is still possible.
        assert!(state.abortable(&def));
        apply(
            &mut state,
            &[SagaEvent::StepStarted {
                step: "confirm_order".into(),
                attempt: 1,
            }],
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
        let mut state = started_saga(&[]);
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
        assert!(matches!(state.next(&def), Next::AwaitAcks { .. }));
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
        assert!(matches!(parked.next(&def), Next::AwaitAcks { .. }));
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

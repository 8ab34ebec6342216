//! The barrier per (saga id, step), as the fold of the step's own stream
//! `step/<saga_id>/<step>`:
//!
//! - a repeated action returns the first outcome (the recorded action, or the recorded
//!   refusal) and changes nothing again;
//! - a compensation with no prior action is recorded (`NullCompensated`) and does nothing;
//! - an action arriving after its compensation is refused (`AlreadyCompensated`), so nothing
//!   is left reserved for a saga that gave up on this step;
//! - a repeated compensation does nothing again.
//!
//! Races need no lock: an action appends with `ExpectedVersion::NoStream` and a compensation
//! with the exact version it folded, so of two racing calls on one key exactly one appends
//! and the other re-reads and follows the barrier's answer.
//!
//! A compensation's caller may hand a record of its own ([`AlsoRecord`]: the consumer log's
//! success and the acknowledgement in the outbox), built from the outcome; it is written in
//! **the same atomic append** as the barrier's record (`EventLog::append_all`), or alone when
//! the step was compensated before. So an undo is never durable without its consumer-log
//! success and ack, nor the reverse, and the compensation costs one durable wait, not two.

use saga_storage::{
    AppendRequest, Contended, EventLog, ExpectedVersion, NewEvent, StorageError, Tried, retry_on_conflict,
};

use crate::keys;
use crate::record::ParticipantEvent;
use crate::refusal::{Refusal, Refused};
use saga_storage::StreamVersion;

/// The barrier's own events in a step stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepEvent {
    /// The action was refused by its role's guard; a repeat gets the same answer.
    ActionRefused { refusal: Refusal, detail: String },
    /// A compensation found no action: recorded, nothing undone.
    NullCompensated,
}

impl StepEvent {
    pub fn name(&self) -> &'static str {
        match self {
            StepEvent::ActionRefused { .. } => "ActionRefused",
            StepEvent::NullCompensated => "NullCompensated",
        }
    }
}

/// What a role service and the compensation consumer call for a step: the barrier over the
/// log ([`StepBarrier`]), or a decorator around it that the binary builds (fault injection
/// for tests and chaos runs: `crate::faults`, behind the `faults` feature).
#[tonic::async_trait]
pub trait Barrier: Send + Sync + 'static {
    /// Performs `action` once for `key`: the recorded action and whether an earlier call
    /// recorded it (`replayed`).
    async fn act(
        &self,
        key: &StepKey,
        action: ParticipantEvent,
    ) -> Result<(ParticipantEvent, bool), BarrierError>;
    /// Undoes whatever `key`'s action did, exactly once, and writes `also`'s record for the
    /// outcome in the same append (alone when the step was compensated before; see
    /// [`AlsoRecord`]). Every implementation must hand `also` on to the barrier over the log:
    /// an `Ok` tells the compensation consumer that its success and ack are written.
    async fn compensate(
        &self,
        key: &StepKey,
        also: Option<&AlsoRecord<'_>>,
    ) -> Result<Compensated, BarrierError>;
    /// What `key`'s stream says now.
    async fn state(&self, key: &StepKey) -> Result<StepState, BarrierError>;
}

/// The barrier over a participant's log.
pub struct StepBarrier {
    pub log: EventLog,
}

#[tonic::async_trait]
impl Barrier for StepBarrier {
    async fn act(
        &self,
        key: &StepKey,
        action: ParticipantEvent,
    ) -> Result<(ParticipantEvent, bool), BarrierError> {
        let acted = act(&self.log, key, action).await;
        // In the call's span: the caller's trace id (saga_proto::trace).
        match &acted {
            Ok((_, replayed)) => {
                tracing::debug!(saga = %key.saga_id, step = %key.step, replayed, "step applied")
            }
            Err(error) => tracing::debug!(saga = %key.saga_id, step = %key.step, %error, "step not applied"),
        }
        acted
    }

    async fn compensate(
        &self,
        key: &StepKey,
        also: Option<&AlsoRecord<'_>>,
    ) -> Result<Compensated, BarrierError> {
        let compensated = compensate(&self.log, key, also).await;
        tracing::debug!(saga = %key.saga_id, step = %key.step, outcome = ?compensated, "compensation handled");
        compensated
    }

    async fn state(&self, key: &StepKey) -> Result<StepState, BarrierError> {
        state(&self.log, key).await
    }
}

/// The idempotency key of a step.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StepKey {
    pub saga_id: String,
    pub step: String,
}

impl StepKey {
    pub fn stream(&self) -> String {
        keys::step_stream(&self.saga_id, &self.step)
    }

    /// Checks both parts: what the log can name unambiguously (`step/<saga>/<step>`, and
    /// `<saga>:<step>` as a message key, so a step name has no ':'). Returns the field at
    /// fault and why.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        saga_proto::ids::check(&self.saga_id).map_err(|why| ("key.saga_id", why.to_string()))?;
        saga_proto::ids::check(&self.step).map_err(|why| ("key.step", why.to_string()))?;
        if self.step.contains(':') {
            return Err(("key.step", "must not contain ':'".into()));
        }
        Ok(())
    }
}

/// What the step's stream says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepState {
    Empty,
    Acted(ParticipantEvent),
    Refused(Refused),
    Compensated { null: bool },
}

/// Folds a step stream. The barrier writes every step stream itself, so a stream that breaks
/// its order is a bug, not an input: it panics.
pub fn fold(events: impl IntoIterator<Item = ParticipantEvent>) -> StepState {
    use ParticipantEvent::Step;
    let mut state = StepState::Empty;
    for event in events {
        state = match (state, event) {
            (StepState::Empty, Step(StepEvent::ActionRefused { refusal, detail })) => {
                StepState::Refused(Refused {
                    reason: refusal,
                    detail,
                })
            }
            (
                StepState::Empty | StepState::Refused(_) | StepState::Acted(_),
                Step(StepEvent::NullCompensated),
            ) => StepState::Compensated { null: true },
            (StepState::Empty, action) if action.is_action() => StepState::Acted(action),
            (StepState::Acted(_), undo) if undo.is_compensation() => StepState::Compensated { null: false },
            (state, event) => panic!("step stream breaks the barrier: {event:?} after {state:?}"),
        };
    }
    state
}

/// Why a barrier call did not produce an outcome.
#[derive(Debug, thiserror::Error)]
pub enum BarrierError {
    #[error("refused ({refused})", refused = .0)]
    Refused(Refused),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Contended(#[from] Contended),
}

async fn read(log: &EventLog, key: &StepKey) -> Result<(StepState, StreamVersion), BarrierError> {
    let records = log.read_stream(&key.stream(), StreamVersion::new(1), 16).await?;
    let version = StreamVersion::new(records.len() as u64);
    let events = records
        .iter()
        .map(|r| r.decode::<ParticipantEvent>())
        .collect::<Result<Vec<_>, _>>()?;
    Ok((fold(events), version))
}

fn append_request(
    key: &StepKey,
    expected: ExpectedVersion,
    event: &ParticipantEvent,
) -> Result<AppendRequest, BarrierError> {
    Ok(AppendRequest::new(key.stream(), expected).event(NewEvent::encode(event.name(), event)?))
}

/// Performs `action` once for `key`. Returns the recorded action and whether it was recorded
/// by an earlier call (`replayed`).
pub async fn act(
    log: &EventLog,
    key: &StepKey,
    action: ParticipantEvent,
) -> Result<(ParticipantEvent, bool), BarrierError> {
    let action = &action;
    retry_on_conflict(
        || key.stream(),
        || async move {
            match read(log, key).await? {
                (StepState::Acted(done), _) => return Ok(Tried::Done((done, true))),
                (StepState::Refused(refused), _) => return Err(BarrierError::Refused(refused)),
                (StepState::Compensated { .. }, _) => {
                    return Err(BarrierError::Refused(Refused::new(
                        Refusal::AlreadyCompensated,
                        format!(
                            "{}/{} was compensated before this action arrived",
                            key.saga_id, key.step
                        ),
                    )));
                }
                (StepState::Empty, _) => {}
            }
            let refused = match log
                .append(append_request(key, ExpectedVersion::NoStream, action)?)
                .await
            {
                Err(e @ StorageError::Refused { .. }) => match e.refusal::<Refused>() {
                    Some(refused) => refused.clone(),
                    None => return Err(e.into()),
                },
                other => {
                    return Ok(match Tried::of(other)? {
                        Tried::Done(_) => Tried::Done((action.clone(), false)),
                        Tried::Conflicted => Tried::Conflicted,
                    });
                }
            };
            // A business refusal from the role's guard: record it, so that a repeat of this
            // action gets the same answer.
            let recorded: ParticipantEvent = StepEvent::ActionRefused {
                refusal: refused.reason,
                detail: refused.detail.clone(),
            }
            .into();
            let request = append_request(key, ExpectedVersion::NoStream, &recorded)?;
            match Tried::of(log.append(request).await)? {
                Tried::Done(_) => Err(BarrierError::Refused(refused)),
                Tried::Conflicted => Ok(Tried::Conflicted),
            }
        },
    )
    .await
}

/// What a compensation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compensated {
    /// The action's effect was undone now.
    Applied,
    /// There was no action: recorded, nothing undone.
    Null,
    /// Done before; nothing changed now.
    AlreadyApplied,
}

/// A caller's record of a compensation's outcome, written with the barrier's (see the module
/// doc): the consumer log's `ConsumeSucceeded` and the acknowledgement, for the compensation
/// consumer. Its stream must not be the step's own, and it should expect `Any` version: a
/// conflict on it would retry the whole compensation (at most `CONFLICT_RETRIES_MAX` times,
/// then `Contended`).
pub type AlsoRecord<'a> = dyn Fn(Compensated) -> Result<AppendRequest, StorageError> + Send + Sync + 'a;

/// Undoes whatever `key`'s action did, exactly once. `also` (if any) is written for the outcome
/// in the same append as the undo or the null compensation, or alone when the step was
/// compensated before (see the module doc).
pub async fn compensate(
    log: &EventLog,
    key: &StepKey,
    also: Option<&AlsoRecord<'_>>,
) -> Result<Compensated, BarrierError> {
    retry_on_conflict(
        || key.stream(),
        || async move {
            let (state, version) = read(log, key).await?;
            let (event, outcome) = match state {
                StepState::Compensated { .. } => {
                    if let Some(also) = also {
                        match Tried::of(log.append(also(Compensated::AlreadyApplied)?).await)? {
                            Tried::Done(_) => {}
                            Tried::Conflicted => return Ok(Tried::Conflicted),
                        }
                    }
                    return Ok(Tried::Done(Compensated::AlreadyApplied));
                }
                StepState::Empty | StepState::Refused(_) => {
                    (StepEvent::NullCompensated.into(), Compensated::Null)
                }
                StepState::Acted(action) => match action.undo() {
                    Some(undo) => (undo, Compensated::Applied),
                    // A confirmation is not undoable: compensating it records a null compensation
                    // (the saga never compensates its last step, so this is a caller's mistake).
                    None => (StepEvent::NullCompensated.into(), Compensated::Null),
                },
            };
            let own = append_request(key, ExpectedVersion::Exact(version), &event)?;
            let appended = match also {
                None => log.append(own).await.map(|_| ()),
                Some(also) => log.append_all(vec![own, also(outcome)?]).await.map(|_| ()),
            };
            match appended {
                // The undo would break an invariant (e.g. cancel a confirmed order): a refusal the
                // consumer parks, with nothing written.
                Err(e @ StorageError::Refused { .. }) => Err(match e.refusal::<Refused>() {
                    Some(refused) => BarrierError::Refused(refused.clone()),
                    None => e.into(),
                }),
                other => Ok(match Tried::of(other)? {
                    Tried::Done(_) => Tried::Done(outcome),
                    Tried::Conflicted => Tried::Conflicted,
                }),
            }
        },
    )
    .await
}

/// The step's current state (for audits and tests).
pub async fn state(log: &EventLog, key: &StepKey) -> Result<StepState, BarrierError> {
    Ok(read(log, key).await?.0)
}

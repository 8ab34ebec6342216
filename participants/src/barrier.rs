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

use saga_storage::{AppendRequest, EventLog, ExpectedVersion, NewEvent, StorageError};

use crate::events::{ParticipantEvent, Refusal};

/// Longest saga id and step name, in bytes.
pub const KEY_PART_LEN_MAX: usize = 64;
/// Tries of one call against concurrent writers of the same key before giving up (each
/// conflict means another call on the same key made progress, so this is never reached in
/// practice; it bounds the loop).
const CONFLICT_RETRIES_MAX: usize = 16;

/// Fault injection for process tests and chaos runs, read by the `saga-participant` binary: a
/// comma-separated list of `delay:<step>:<ms>` (every action of `<step>` answers `<ms>` after it
/// was applied, so the caller's deadline passes after the effect: "outcome unknown") and
/// `refuse:<step>[:<times>]` (the first `<times>` actions of `<step>`, or all, are refused with
/// INVALID_STATE without recording anything).
pub const ACT_FAULT_ENV: &str = "SAGA_FAULT_ACT";

/// One parsed fault of [`ACT_FAULT_ENV`].
#[derive(Debug)]
pub enum ActFault {
    DelayAfterApply {
        step: String,
        delay_ms: u64,
    },
    Refuse {
        step: String,
        times_left: std::sync::atomic::AtomicU64,
    },
}

impl ActFault {
    /// Parses the whole variable.
    pub fn parse_list(text: &str) -> Option<Vec<ActFault>> {
        text.split(',')
            .filter(|p| !p.is_empty())
            .map(ActFault::parse)
            .collect()
    }

    fn parse(text: &str) -> Option<ActFault> {
        let mut parts = text.split(':');
        match (parts.next()?, parts.next()?, parts.next(), parts.next()) {
            ("delay", step, Some(ms), None) => Some(ActFault::DelayAfterApply {
                step: step.to_owned(),
                delay_ms: ms.parse().ok()?,
            }),
            ("refuse", step, times, None) => Some(ActFault::Refuse {
                step: step.to_owned(),
                times_left: std::sync::atomic::AtomicU64::new(match times {
                    Some(n) => n.parse().ok()?,
                    None => u64::MAX,
                }),
            }),
            _ => None,
        }
    }
}

static ACT_FAULTS: std::sync::OnceLock<Vec<ActFault>> = std::sync::OnceLock::new();

/// Installs faults for this process (once; later calls are ignored).
pub fn inject_act_faults(faults: Vec<ActFault>) {
    let _ = ACT_FAULTS.set(faults);
}

fn injected_refusal(step: &str) -> bool {
    ACT_FAULTS.get().is_some_and(|faults| {
        faults.iter().any(|f| match f {
            ActFault::Refuse { step: s, times_left } => {
                s == step
                    && times_left
                        .fetch_update(
                            std::sync::atomic::Ordering::SeqCst,
                            std::sync::atomic::Ordering::SeqCst,
                            |n| n.checked_sub(1),
                        )
                        .is_ok()
            }
            ActFault::DelayAfterApply { .. } => false,
        })
    })
}

fn injected_delay(step: &str) -> Option<u64> {
    ACT_FAULTS.get()?.iter().find_map(|f| match f {
        ActFault::DelayAfterApply { step: s, delay_ms } if s == step => Some(*delay_ms),
        _ => None,
    })
}

/// The idempotency key of a step.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StepKey {
    pub saga_id: String,
    pub step: String,
}

impl StepKey {
    pub fn stream(&self) -> String {
        format!("step/{}/{}", self.saga_id, self.step)
    }

    /// Checks both parts: what the log can name unambiguously (`step/<saga>/<step>`, and
    /// `<saga>:<step>` as a message key, so a step name has no ':'). Returns the field at
    /// fault and why.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        check_key_part(&self.saga_id).map_err(|why| ("key.saga_id", why))?;
        check_key_part(&self.step).map_err(|why| ("key.step", why))?;
        if self.step.contains(':') {
            return Err(("key.step", "must not contain ':'".into()));
        }
        Ok(())
    }
}

/// The rule for one part of a step key (and for ids in general): 1..=[`KEY_PART_LEN_MAX`]
/// bytes of printable ASCII without '/'.
pub fn check_key_part(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    if value.len() > KEY_PART_LEN_MAX {
        return Err(format!("at most {KEY_PART_LEN_MAX} bytes"));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic() && b != b'/') {
        return Err("printable ASCII without '/' only".into());
    }
    Ok(())
}

/// What the step's stream says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepState {
    Empty,
    Acted(ParticipantEvent),
    Refused(Refusal, String),
    Compensated { null: bool },
}

/// Folds a step stream.
pub fn fold(events: impl IntoIterator<Item = ParticipantEvent>) -> StepState {
    let mut state = StepState::Empty;
    for event in events {
        state = match (state, event) {
            (StepState::Empty, ParticipantEvent::ActionRefused { refusal, detail }) => {
                StepState::Refused(refusal, detail)
            }
            (StepState::Empty, ParticipantEvent::NullCompensated) => StepState::Compensated { null: true },
            (StepState::Empty, action) => StepState::Acted(action),
            (StepState::Refused(..), ParticipantEvent::NullCompensated) => {
                StepState::Compensated { null: true }
            }
            (StepState::Acted(_), ParticipantEvent::NullCompensated) => StepState::Compensated { null: true },
            (StepState::Acted(_), _) => StepState::Compensated { null: false },
            (state, event) => panic!("step stream breaks the barrier: {event:?} after {state:?}"),
        };
    }
    state
}

/// Why a barrier call did not produce an outcome.
#[derive(Debug, thiserror::Error)]
pub enum BarrierError {
    #[error("refused ({code}): {detail}", code = .0.code(), detail = .1)]
    Refused(Refusal, String),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("too many concurrent writers on {0}")]
    Contended(String),
}

async fn read(log: &EventLog, key: &StepKey) -> Result<(StepState, u64), BarrierError> {
    let records = log.read_stream(&key.stream(), 1, 16).await?;
    let version = records.len() as u64;
    let events = records
        .iter()
        .map(|r| r.decode::<ParticipantEvent>())
        .collect::<Result<Vec<_>, _>>()?;
    Ok((fold(events), version))
}

fn new_event(event: &ParticipantEvent) -> Result<NewEvent, BarrierError> {
    Ok(NewEvent::encode(event.name(), event)?)
}

/// Performs `action` once for `key`. Returns the recorded action and whether it was recorded
/// by an earlier call (`replayed`).
pub async fn act(
    log: &EventLog,
    key: &StepKey,
    action: ParticipantEvent,
) -> Result<(ParticipantEvent, bool), BarrierError> {
    for _ in 0..CONFLICT_RETRIES_MAX {
        match read(log, key).await? {
            (StepState::Acted(done), _) => return Ok((done, true)),
            (StepState::Refused(refusal, detail), _) => return Err(BarrierError::Refused(refusal, detail)),
            (StepState::Compensated { .. }, _) => {
                return Err(BarrierError::Refused(
                    Refusal::AlreadyCompensated,
                    format!(
                        "{}/{} was compensated before this action arrived",
                        key.saga_id, key.step
                    ),
                ));
            }
            (StepState::Empty, _) => {}
        }
        // Only an action that has not taken effect can be refused: a refusal promises the
        // caller that nothing happened (the engine does not compensate a refused step).
        if injected_refusal(&key.step) {
            return Err(BarrierError::Refused(
                Refusal::InvalidState,
                format!("injected refusal ({ACT_FAULT_ENV})"),
            ));
        }
        let request = AppendRequest::new(key.stream(), ExpectedVersion::NoStream).event(new_event(&action)?);
        match log.append(request).await {
            Ok(_) => {
                if let Some(delay_ms) = injected_delay(&key.step) {
                    tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
                }
                return Ok((action, false));
            }
            Err(StorageError::VersionConflict { .. }) => continue,
            Err(StorageError::Projection { reason, .. }) => {
                // A business refusal from the projector's guard: record it, so that a repeat
                // of this action gets the same answer.
                let (refusal, detail) = Refusal::parse(&reason).ok_or_else(|| {
                    BarrierError::Storage(StorageError::Projection {
                        stream: key.stream(),
                        event_type: action.name().into(),
                        reason: reason.clone(),
                    })
                })?;
                let refused = ParticipantEvent::ActionRefused {
                    refusal,
                    detail: detail.clone(),
                };
                let request =
                    AppendRequest::new(key.stream(), ExpectedVersion::NoStream).event(new_event(&refused)?);
                match log.append(request).await {
                    Ok(_) => return Err(BarrierError::Refused(refusal, detail)),
                    Err(StorageError::VersionConflict { .. }) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(BarrierError::Contended(key.stream()))
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

/// Undoes whatever `key`'s action did, exactly once.
pub async fn compensate(log: &EventLog, key: &StepKey) -> Result<Compensated, BarrierError> {
    for _ in 0..CONFLICT_RETRIES_MAX {
        let (state, version) = read(log, key).await?;
        let (event, outcome) = match state {
            StepState::Compensated { .. } => return Ok(Compensated::AlreadyApplied),
            StepState::Empty | StepState::Refused(..) => {
                (ParticipantEvent::NullCompensated, Compensated::Null)
            }
            StepState::Acted(action) => match action.undo() {
                Some(undo) => (undo, Compensated::Applied),
                // A confirmation is not undoable: compensating it records a null compensation
                // (the saga never compensates its last step, so this is a caller's mistake).
                None => (ParticipantEvent::NullCompensated, Compensated::Null),
            },
        };
        let request =
            AppendRequest::new(key.stream(), ExpectedVersion::Exact(version)).event(new_event(&event)?);
        match log.append(request).await {
            Ok(_) => return Ok(outcome),
            Err(StorageError::VersionConflict { .. }) => continue,
            // The undo would break an invariant (e.g. cancel a confirmed order): a refusal the
            // consumer parks, with nothing written.
            Err(StorageError::Projection { reason, .. }) => {
                return Err(match Refusal::parse(&reason) {
                    Some((refusal, detail)) => BarrierError::Refused(refusal, detail),
                    None => BarrierError::Refused(Refusal::InvalidState, reason),
                });
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(BarrierError::Contended(key.stream()))
}

/// The step's current state (for audits and tests).
pub async fn state(log: &EventLog, key: &StepKey) -> Result<StepState, BarrierError> {
    Ok(read(log, key).await?.0)
}

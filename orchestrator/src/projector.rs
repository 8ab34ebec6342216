//! The orchestrator's read models, kept by the projector in each append's transaction:
//!
//! - `req/<request_id>` -> saga id: StartOrder's idempotency. A second `SagaStarted` with a
//!   known request id is refused inside the transaction ([`DuplicateRequest`], read back by
//!   the engine with `StorageError::refusal`), so two concurrent starts with one request id
//!   create one saga.
//! - `idx/<status>/<inverted start time>/<saga id>` and `idx/all/...` (empty values): sagas by
//!   status, newest first, for ListSagas and for recovery (running and compensating sagas).
//! - `cur/<saga id>` -> status byte + inverted start time: where the saga's `idx` key is, so
//!   that a status change moves it.

use saga_storage::{EventView, ProjectError, ProjectionTx, Projector, codec};

use crate::events::SagaEvent;
use crate::keys;
use crate::state::Status;

/// The projector's refusal of a `SagaStarted` whose request id started another saga.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("request id {request_id:?} started saga {saga_id} already")]
pub struct DuplicateRequest {
    pub request_id: String,
    pub saga_id: String,
}

pub struct SagaProjector;

fn status_code(status: Status) -> u8 {
    Status::ALL.iter().position(|s| *s == status).expect("in ALL") as u8
}

fn set_status(
    tx: &mut ProjectionTx<'_>,
    saga_id: &str,
    status: Status,
    started_us: i64,
) -> Result<(), ProjectError> {
    let cur_key = keys::current(saga_id);
    let inverted = match tx.get(&cur_key)? {
        Some(cur) if cur.len() == 9 => {
            let old = Status::ALL
                .get(cur[0] as usize)
                .copied()
                .ok_or_else(|| ProjectError::Invalid(format!("{cur_key} holds status {}", cur[0])))?;
            let inverted = u64::from_be_bytes(cur[1..9].try_into().expect("9 bytes"));
            tx.remove(keys::index(Some(old), inverted, saga_id))?;
            inverted
        }
        Some(cur) => return Err(ProjectError::Invalid(format!("{cur_key} is {} bytes", cur.len()))),
        None => {
            let inverted = u64::MAX - started_us.max(0) as u64;
            tx.insert(keys::index(None, inverted, saga_id), &[][..])?;
            inverted
        }
    };
    tx.insert(keys::index(Some(status), inverted, saga_id), &[][..])?;
    let mut cur = [0u8; 9];
    cur[0] = status_code(status);
    cur[1..].copy_from_slice(&inverted.to_be_bytes());
    tx.insert(cur_key, &cur[..])?;
    Ok(())
}

impl Projector for SagaProjector {
    fn project(&self, event: &EventView<'_>, tx: &mut ProjectionTx<'_>) -> Result<(), ProjectError> {
        // Only status changes touch the read models; other events are not even decoded.
        let status = match event.event_type {
            "SagaStarted" => {
                let SagaEvent::SagaStarted { request_id, .. } = codec::decode::<SagaEvent>(event.payload)?
                else {
                    return Err(ProjectError::Invalid(
                        "SagaStarted payload is another event".into(),
                    ));
                };
                let key = keys::request(&request_id);
                if let Some(existing) = tx.get(&key)? {
                    return Err(ProjectError::refused(DuplicateRequest {
                        request_id,
                        saga_id: String::from_utf8_lossy(&existing).into_owned(),
                    }));
                }
                tx.insert(key, event.stream.as_bytes())?;
                Status::Running
            }
            "CompensationRequested" | "CompensationResumed" => Status::Compensating,
            "SagaCompleted" => Status::Completed,
            "SagaCompensated" => Status::Compensated,
            "SagaStuck" => Status::Stuck,
            "SagaRetried" => match codec::decode::<SagaEvent>(event.payload)? {
                SagaEvent::SagaRetried { compensations, .. } if compensations.is_empty() => Status::Running,
                SagaEvent::SagaRetried { .. } => Status::Compensating,
                _ => {
                    return Err(ProjectError::Invalid(
                        "SagaRetried payload is another event".into(),
                    ));
                }
            },
            _ => return Ok(()),
        };
        set_status(tx, event.stream, status, event.timestamp_us)
    }
}

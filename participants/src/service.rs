//! What the four role services share: input validation (INVALID_ARGUMENT naming the field,
//! nothing changed), status mapping, projection reads and seeding.
//!
//! Status codes (details in the standard rich error model, `saga_proto::status`):
//! INVALID_ARGUMENT names the field and changes nothing; FAILED_PRECONDITION is a business
//! refusal with an `ErrorInfo` and a `BusinessRefusal` in the status details; UNAVAILABLE means "try
//! again" (storage busy or failing); ALREADY_EXISTS for conflicting seeds.

use std::collections::HashSet;

use saga_proto::v1 as pb;
use saga_storage::{AppendRequest, EventLog, ExpectedVersion, NewEvent, StorageError, codec};
use tonic::Status;

use crate::barrier::{BarrierError, StepKey};
use crate::record::ParticipantEvent;
use crate::stock::Item;
use saga_storage::StreamVersion;

/// Most items in one order or reservation.
pub const ITEMS_MAX: usize = 64;
/// Most ids in one read call.
pub const READ_IDS_MAX: usize = 1000;
/// Most entries in one seed call.
pub const SEED_LEN_MAX: usize = 10_000;

/// INVALID_ARGUMENT naming `field`, with a `google.rpc.BadRequest` in the details.
pub(crate) fn invalid(field: &str, reason: &str) -> Status {
    saga_proto::status::invalid_argument(field, reason)
}

/// An id used in stream names and projection keys (see `saga_proto::ids`).
pub(crate) fn check_id(field: &str, value: &str) -> Result<(), Status> {
    saga_proto::ids::check(value).map_err(|why| invalid(field, &why.to_string()))
}

pub(crate) fn check_positive(field: &str, value: i64) -> Result<(), Status> {
    if value <= 0 {
        return Err(invalid(field, "must be positive"));
    }
    Ok(())
}

pub(crate) fn step_key(key: Option<pb::StepKey>) -> Result<StepKey, Status> {
    let key = key.ok_or_else(|| invalid("key", "required"))?;
    let key = StepKey {
        saga_id: key.saga_id,
        step: key.step,
    };
    key.validate().map_err(|(field, why)| invalid(field, &why))?;
    Ok(key)
}

pub(crate) fn items(items: Vec<pb::OrderItem>) -> Result<Vec<Item>, Status> {
    if items.is_empty() || items.len() > ITEMS_MAX {
        return Err(invalid("items", &format!("1..={ITEMS_MAX} items")));
    }
    let mut seen = HashSet::new();
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            check_id(&format!("items[{i}].product_id"), &item.product_id)?;
            check_positive(&format!("items[{i}].quantity"), item.quantity)?;
            if !seen.insert(item.product_id.clone()) {
                return Err(invalid(&format!("items[{i}].product_id"), "appears twice"));
            }
            Ok(Item {
                product_id: item.product_id,
                quantity: item.quantity,
            })
        })
        .collect()
}

pub(crate) fn check_ids(field: &str, ids: &[String]) -> Result<(), Status> {
    if ids.len() > READ_IDS_MAX {
        return Err(invalid(field, &format!("at most {READ_IDS_MAX} ids")));
    }
    ids.iter()
        .enumerate()
        .try_for_each(|(i, id)| check_id(&format!("{field}[{i}]"), id))
}

pub(crate) fn check_seed_len(field: &str, len: usize) -> Result<(), Status> {
    if len > SEED_LEN_MAX {
        return Err(invalid(field, &format!("at most {SEED_LEN_MAX} entries")));
    }
    Ok(())
}

pub(crate) fn storage_status(error: StorageError) -> Status {
    Status::unavailable(format!("storage: {error}"))
}

pub(crate) fn barrier_status(error: BarrierError) -> Status {
    match error {
        BarrierError::Refused(refused) => refused.to_status(),
        BarrierError::Storage(e) => storage_status(e),
        BarrierError::Contended(stream) => Status::unavailable(format!("contended: {stream}")),
    }
}

/// The answer of an action whose step stream holds another kind of action (the same step key
/// used for two different calls).
pub(crate) fn other_action(key: &StepKey) -> Status {
    Status::internal(format!("step {} holds another action", key.stream()))
}

pub(crate) async fn read_projection<T: serde::de::DeserializeOwned>(
    log: &EventLog,
    key: &str,
) -> Result<Option<T>, Status> {
    match log.projection_get(key).await.map_err(storage_status)? {
        Some(bytes) => {
            Ok(Some(codec::decode(&bytes).map_err(|e| {
                Status::internal(format!("projection {key}: {e}"))
            })?))
        }
        None => Ok(None),
    }
}

/// Every read model under `prefix` (at most [`READ_IDS_MAX`]), with the id of each.
pub(crate) async fn scan_projection<T: serde::de::DeserializeOwned>(
    log: &EventLog,
    prefix: &str,
) -> Result<Vec<(String, T)>, Status> {
    log.projection_scan_prefix(prefix, None, READ_IDS_MAX)
        .await
        .map_err(storage_status)?
        .into_iter()
        .map(|(key, value)| {
            let id = crate::keys::id_of(&key, prefix).into_owned();
            let model = codec::decode(&value)
                .map_err(|e| Status::internal(format!("projection {prefix}{id}: {e}")))?;
            Ok((id, model))
        })
        .collect()
}

/// Seeds one entity through its own stream: new -> seeded; identical -> no-op; different ->
/// ALREADY_EXISTS. Returns whether it was new.
pub(crate) async fn seed_one(
    log: &EventLog,
    stream: String,
    event: ParticipantEvent,
) -> Result<bool, Status> {
    let new = NewEvent::encode(event.name(), &event).map_err(storage_status)?;
    match log
        .append(AppendRequest::new(&stream, ExpectedVersion::NoStream).event(new))
        .await
    {
        Ok(_) => Ok(true),
        Err(StorageError::VersionConflict { .. }) => {
            let existing = log
                .read_stream(&stream, StreamVersion::new(1), 1)
                .await
                .map_err(storage_status)?;
            let same = existing
                .first()
                .map(|r| r.decode::<ParticipantEvent>())
                .transpose()
                .map_err(storage_status)?
                .is_some_and(|e| e == event);
            if same {
                Ok(false)
            } else {
                Err(Status::already_exists(format!(
                    "{stream} was seeded with other values"
                )))
            }
        }
        Err(e) => Err(storage_status(e)),
    }
}

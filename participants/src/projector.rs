//! The participants' projector: keeps each role's read model in the append's transaction by
//! handing every event to the module that owns it (`stock::project`, ...). Each role's
//! `project` reads what its event touches, runs the role's `decide` (the guard: a refusal
//! aborts the append, so two sagas can never both take the last unit) and then its `apply`
//! (cannot fail), and writes the result back.

use saga_storage::{EventView, ProjectError, ProjectionTx, Projector, codec};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::record::ParticipantEvent;
use crate::{balance, consumer_log, coupon, order, stock};

/// Keeps the projections and guards the cross-saga invariants.
pub struct ParticipantProjector;

impl Projector for ParticipantProjector {
    fn project(&self, view: &EventView<'_>, tx: &mut ProjectionTx<'_>) -> Result<(), ProjectError> {
        match codec::decode::<ParticipantEvent>(view.payload)? {
            ParticipantEvent::Stock(event) => stock::project(&event, tx),
            ParticipantEvent::Coupon(event) => coupon::project(&event, tx),
            ParticipantEvent::Balance(event) => balance::project(&event, tx),
            ParticipantEvent::Order(event) => order::project(&event, tx),
            ParticipantEvent::Step(_) => Ok(()),
            ParticipantEvent::Consumer(event) => consumer_log::project(&event, view, tx),
        }
    }
}

/// The read model at `key`, if any.
pub(crate) fn get<T: DeserializeOwned>(tx: &ProjectionTx<'_>, key: &str) -> Result<Option<T>, ProjectError> {
    match tx.get(key)? {
        Some(bytes) => Ok(Some(codec::decode(&bytes)?)),
        None => Ok(None),
    }
}

/// Writes the read model at `key` (nothing for `None`: no event removes an entity).
pub(crate) fn put<T: Serialize>(
    tx: &mut ProjectionTx<'_>,
    key: &str,
    value: Option<&T>,
) -> Result<(), ProjectError> {
    match value {
        Some(value) => tx.insert(key, codec::encode(value)?),
        None => Ok(()),
    }
}

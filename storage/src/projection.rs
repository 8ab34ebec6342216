//! Projections: read models kept in the same sled transaction as the events that drive them.
//!
//! A [`Projector`] is registered when the log is opened. The writer calls it for every event
//! of every append, inside the append's transaction, so a projection can never disagree with
//! the log: both are written or neither is, also across a crash. The projector sees the
//! projection state including the earlier events of the same batch, so read-modify-write
//! (e.g. "available stock -= quantity") is safe without locks.
//!
//! All projections of a log share one tree (`projections`); a projector namespaces its keys
//! (e.g. `stock/<product>`). Read them with `EventLog::projection_get` and
//! `EventLog::projection_scan_prefix`.

use sled::IVec;
use sled::transaction::{TransactionalTree, UnabortableTransactionError};

/// An event as the projector sees it, before it is visible to anyone else.
#[derive(Debug, Clone, Copy)]
pub struct EventView<'a> {
    pub position: crate::Position,
    pub stream: &'a str,
    pub version: crate::StreamVersion,
    pub event_type: &'a str,
    pub timestamp_us: i64,
    /// The payload as stored (decode with `crate::codec::decode`).
    pub payload: &'a [u8],
}

/// A projector's own typed reason for refusing an event (a business rule, say "out of stock").
/// The log carries it to the appender untouched (`StorageError::Refused`), where
/// `StorageError::refusal::<R>()` gets the projector's type back: no text is parsed on the way.
pub type Refusal = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a projector did not apply an event. Either way the whole append is refused and nothing
/// of it is written; other appends of the batch go ahead.
#[derive(Debug)]
pub enum ProjectError {
    /// A rule of the read model refuses the event: the appender gets `StorageError::Refused`
    /// with this value, to act on by type.
    Refused(Refusal),
    /// The event cannot be applied at all (its payload does not decode, a read model holds
    /// bytes the projector cannot read): `StorageError::Projection` with the reason.
    Invalid(String),
    /// A transaction-level error from sled; propagate it with `?` (the writer retries or fails).
    Tx(UnabortableTransactionError),
}

impl ProjectError {
    /// A refusal of the projector's type `R`.
    pub fn refused(refusal: impl std::error::Error + Send + Sync + 'static) -> ProjectError {
        ProjectError::Refused(Box::new(refusal))
    }
}

impl From<UnabortableTransactionError> for ProjectError {
    fn from(error: UnabortableTransactionError) -> Self {
        ProjectError::Tx(error)
    }
}

impl From<crate::codec::CodecError> for ProjectError {
    fn from(error: crate::codec::CodecError) -> Self {
        ProjectError::Invalid(error.to_string())
    }
}

/// Keeps read models in step with the log. Implementations must be deterministic, must not do
/// I/O other than through [`ProjectionTx`], and should not fail for events their own service
/// produced: `project` is `apply` of the event-sourcing habit.
pub trait Projector: Send + Sync + 'static {
    fn project(&self, event: &EventView<'_>, tx: &mut ProjectionTx<'_>) -> Result<(), ProjectError>;
}

/// The projection tree inside the append transaction.
pub struct ProjectionTx<'a> {
    pub(crate) tree: &'a TransactionalTree,
}

impl ProjectionTx<'_> {
    /// The current value of `key`, including writes of earlier events in this transaction.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<IVec>, ProjectError> {
        Ok(self.tree.get(key)?)
    }

    /// Sets `key` to `value` (a blind write: the old value is not read, vendor/sled/PATCHES.md
    /// item 5).
    pub fn insert(&mut self, key: impl AsRef<[u8]>, value: impl Into<IVec>) -> Result<(), ProjectError> {
        self.tree.insert_blind(key.as_ref(), value);
        Ok(())
    }

    /// Removes `key` (blind, like `insert`).
    pub fn remove(&mut self, key: impl AsRef<[u8]>) -> Result<(), ProjectError> {
        self.tree.remove_blind(key.as_ref());
        Ok(())
    }
}

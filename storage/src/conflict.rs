//! The read -> decide -> append-at-version loop, once: optimistic concurrency's retry.
//!
//! A writer reads a stream (or a fold of it), decides what to append, and appends with the
//! version it read (`ExpectedVersion::Exact` or `NoStream`). A version conflict means another
//! writer appended first: nothing of this try was written, so the writer reads again and
//! decides again. [`retry_on_conflict`] runs that loop with a named bound.

use crate::StorageError;

/// Tries of one read-decide-append against concurrent writers of the same stream. Each
/// conflict means another writer made progress, so this is not reached in practice; it bounds
/// a loop that must never spin.
pub const CONFLICT_RETRIES_MAX: usize = 16;

/// What one try came to.
#[derive(Debug)]
pub enum Tried<T> {
    /// Decided and done (appended, or nothing to append).
    Done(T),
    /// The append met a version conflict: nothing was written; read and decide again.
    Conflicted,
}

impl<T> Tried<T> {
    /// An append's result as a try: a version conflict asks for another try, any other error
    /// ends the loop.
    pub fn of(result: Result<T, StorageError>) -> Result<Tried<T>, StorageError> {
        match result {
            Ok(value) => Ok(Tried::Done(value)),
            Err(StorageError::VersionConflict { .. }) => Ok(Tried::Conflicted),
            Err(error) => Err(error),
        }
    }
}

/// [`CONFLICT_RETRIES_MAX`] tries all met a version conflict.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {tries} tries met concurrent writers")]
pub struct Contended {
    pub what: String,
    pub tries: usize,
}

/// Runs `attempt` (read, decide, append at the version read) until a try is not conflicted, at
/// most [`CONFLICT_RETRIES_MAX`] times; then `Contended` naming `what`.
///
/// (`attempt` returns a future rather than being an async closure: the futures of async
/// closures that borrow are not yet provably `Send`, which `#[async_trait]` callers need.)
pub async fn retry_on_conflict<T, E, Fut>(
    what: impl FnOnce() -> String,
    mut attempt: impl FnMut() -> Fut,
) -> Result<T, E>
where
    E: From<Contended>,
    Fut: std::future::Future<Output = Result<Tried<T>, E>>,
{
    for _ in 0..CONFLICT_RETRIES_MAX {
        if let Tried::Done(value) = attempt().await? {
            return Ok(value);
        }
    }
    Err(Contended {
        what: what(),
        tries: CONFLICT_RETRIES_MAX,
    }
    .into())
}

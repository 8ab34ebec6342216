//! Every projection key of the orchestrator's log, in one place (the saga streams are named
//! by the saga id itself).
//!
//! - `req/<request_id>` -> saga id: StartOrder's idempotency;
//! - `idx/<status>/<inverted start time, 16 hex>/<saga id>` and `idx/all/...` (empty values):
//!   sagas by status, newest first;
//! - `cur/<saga id>` -> status byte + inverted start time: where the saga's `idx` key is.

use crate::state::Status;

pub fn request(request_id: &str) -> String {
    format!("req/{request_id}")
}

/// The index prefix of one status, or of every saga (`None`).
pub fn index_prefix(status: Option<Status>) -> String {
    format!("idx/{}/", status.map_or("all", Status::name))
}

pub fn index(status: Option<Status>, inverted_us: u64, saga_id: &str) -> String {
    format!("{}{inverted_us:016x}/{saga_id}", index_prefix(status))
}

/// The saga id at the end of an index key.
pub fn saga_of_index(key: &[u8]) -> Option<&str> {
    let key = std::str::from_utf8(key).ok()?;
    key.rsplit('/').next()
}

pub fn current(saga_id: &str) -> String {
    format!("cur/{saga_id}")
}

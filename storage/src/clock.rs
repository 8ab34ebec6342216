//! The one wall clock of the system: record timestamps, saga timings (acknowledgement
//! deadlines, `requested_at`) and parking times all read it, so that they compare.
//!
//! A clock before 1970 reads as 0 (never a panic); the log's timestamps are informational and
//! for deadlines, never for ordering (positions and versions order everything).

use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch.
pub fn now_unix_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> i64 {
    now_unix_us() / 1000
}

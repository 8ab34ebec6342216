//! The event log's metrics (recorded through the `metrics` facade: nothing is kept until a
//! binary installs a recorder, `--metrics-listen`). Documented in the README.

/// Histogram: seconds from an `append` call to its durable answer (successful appends only).
pub const LOG_APPEND_SECONDS: &str = "saga_log_append_seconds";
/// Histogram: seconds one flush (fsync) of the log took.
pub const LOG_FSYNC_SECONDS: &str = "saga_log_fsync_seconds";
/// Histogram: appends made durable by one flush (group commit's batch).
pub const LOG_FLUSH_BATCH_APPENDS: &str = "saga_log_flush_batch_appends";

//! `saga-storage`: the durable event log every process of the saga system keeps, on sled.
//!
//! - [`log`]: the log itself, [`EventLog`]. `append` is atomic per call, checks the stream's
//!   expected version (optimistic concurrency) and returns only once flushed to disk;
//!   concurrent appends share one flush (group commit). Reads of one stream, of the whole log
//!   from a global position (audit replay), and live subscriptions.
//! - [`record_format`]: the on-disk record envelope (format version, position, stream, version,
//!   timestamp, event type, payload, checksum, hash chain). A record that fails verification is
//!   a `StorageError::Corrupt` naming its position.
//! - [`audit`]: offline verification of a data dir (checksums, hash chains, index, mark,
//!   projections against a replay) and reading it for export.
//! - [`conflict`]: the read -> decide -> append-at-version loop with its bound, once.
//! - [`clock`]: the one wall clock (microseconds since the epoch).
//! - [`codec`]: the payload codec (bincode 2 + serde), the one place that knows it.
//! - [`projection`]: read models written in the same transaction as their events.
//! - [`position`]: [`Position`] and [`StreamVersion`], the log's two counters.
//! - [`outbox`]: messages written with the events that decide them, for a relay to publish.
//! - [`mark`]: the durable mark beside the log, so that a lost tail is detected at open.
//! - [`gate`]: a test hook that holds the writer at a named point (crash-window tests).
//! - [`heap`]: the allocator setting that keeps sled's I/O buffers out of the heap.
//! - [`error`]: the error type, [`StorageError`], with variants a caller can act on.
//! - [`metric`]: the names of the log's metrics (the `metrics` facade; a no-op until a
//!   binary installs a recorder).

pub mod audit;
pub mod clock;
pub mod codec;
pub mod conflict;
pub mod error;
pub mod gate;
pub mod heap;
pub mod log;
pub mod mark;
pub mod metric;
pub mod outbox;
pub mod position;
pub mod projection;
pub mod record_format;

pub use conflict::{CONFLICT_RETRIES_MAX, Contended, Tried, retry_on_conflict};
pub use error::StorageError;
pub use log::{
    AppendRequest, Appended, Durability, EventLog, ExpectedVersion, LOG_STREAM, LogConfig, LogStats,
    LostTailAccepted, NewEvent, Record, STREAMS_PER_APPEND_MAX, Subscription,
};
pub use outbox::{OutboxEntry, OutboxId, OutboxMessage};
pub use position::{Position, StreamVersion};
pub use projection::{EventView, ProjectError, ProjectionTx, Projector};

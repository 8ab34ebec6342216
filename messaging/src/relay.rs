//! The outbox relay: publishes a log's outbox entries through a [`Transport`] and deletes them
//! only after the transport acknowledged them. The orchestrator relays compensation requests
//! with it, every participant its acknowledgements: one mechanism, so an acknowledgement is as
//! durable as the compensation it answers.
//!
//! Crash windows: an entry is written in the same append as the event that decided it, so it
//! exists iff its decision is durable. A crash after the publish and before the deletion
//! publishes it again on restart (a duplicate, which consumers absorb by key); a deletion is
//! never done before the transport stored the message, so nothing is lost.

use std::sync::Arc;
use std::time::Duration;

use saga_storage::EventLog;
use tokio::sync::Notify;

use crate::transport::{Outgoing, Transport};

/// Outbox entries published in one request.
pub const RELAY_BATCH_LEN_MAX: usize = 128;
/// First wait after a failed publish; doubles up to [`RELAY_BACKOFF_MAX`].
const RELAY_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest wait of the relay between publish failures.
const RELAY_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Longest sleep without a wake-up: covers entries that became durable without one (the wake
/// is sent after an append returns, so a crash-free process always sends it; this is a bound).
const RELAY_IDLE_MAX: Duration = Duration::from_millis(500);

/// Gauge: outbox entries the relay found pending in its last pass (at most a batch).
pub const RELAY_OUTBOX_PENDING: &str = "saga_relay_outbox_pending";
/// Histogram: seconds one batch took to publish (until the broker acknowledged it).
pub const RELAY_PUBLISH_SECONDS: &str = "saga_relay_publish_seconds";
/// Counter: outbox messages published.
pub const RELAY_PUBLISHED_TOTAL: &str = "saga_relay_published_total";
/// Counter: batches whose publication failed (they are retried).
pub const RELAY_PUBLISH_FAILURES_TOTAL: &str = "saga_relay_publish_failures_total";

/// Publishes `log`'s outbox through `transport` until the task is dropped. `wake` is notified
/// by whoever appends outbox entries (the relay also looks every [`RELAY_IDLE_MAX`]).
pub async fn run(log: EventLog, transport: Arc<dyn Transport>, wake: Arc<Notify>) {
    let mut backoff = RELAY_BACKOFF_MIN;
    loop {
        let entries = match log.outbox_pending(RELAY_BATCH_LEN_MAX) {
            Ok(entries) => entries,
            Err(error) => {
                tracing::error!(%error, "outbox unreadable; retrying");
                tokio::time::sleep(RELAY_BACKOFF_MAX).await;
                continue;
            }
        };
        // Depth as the relay sees it: what one pass found pending, at most a batch.
        metrics::gauge!(RELAY_OUTBOX_PENDING).set(entries.len() as f64);
        if entries.is_empty() {
            // A wake-up stored while we were publishing is not lost (`notify_one` keeps a
            // permit).
            let _ = tokio::time::timeout(RELAY_IDLE_MAX, wake.notified()).await;
            continue;
        }
        let messages: Vec<Outgoing> = entries
            .iter()
            .map(|e| Outgoing {
                topic: e.message.topic.clone(),
                tag: e.message.tag.clone(),
                key: e.message.key.clone(),
                body: e.message.body.clone(),
            })
            .collect();
        let began = std::time::Instant::now();
        match transport.publish(&messages).await {
            Ok(()) => {
                metrics::histogram!(RELAY_PUBLISH_SECONDS).record(began.elapsed().as_secs_f64());
                metrics::counter!(RELAY_PUBLISHED_TOTAL).increment(messages.len() as u64);
                backoff = RELAY_BACKOFF_MIN;
                let ids = entries.iter().map(|e| e.id).collect();
                if let Err(error) = log.outbox_ack(ids).await {
                    tracing::error!(%error, "published outbox entries not deleted; they will be sent again");
                    tokio::time::sleep(RELAY_BACKOFF_MAX).await;
                }
            }
            Err(error) => {
                metrics::counter!(RELAY_PUBLISH_FAILURES_TOTAL).increment(1);
                tracing::warn!(%error, len = messages.len(), "publishing the outbox failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RELAY_BACKOFF_MAX);
            }
        }
    }
}

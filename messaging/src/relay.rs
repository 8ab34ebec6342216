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
/// Counter: outbox messages published, counting each sending (a message published again after
/// a crash before its entry was deleted counts again: delivery is at least once).
pub const RELAY_PUBLISHED_TOTAL: &str = "saga_relay_published_total";
/// Counter: batches whose publication failed (they are retried).
pub const RELAY_PUBLISH_FAILURES_TOTAL: &str = "saga_relay_publish_failures_total";

/// What one pass of the relay did.
enum Pass {
    /// The outbox was empty.
    Empty,
    /// A batch was published and deleted.
    Published,
    /// Publishing failed (the entries stay, for the next pass).
    PublishFailed,
    /// The outbox could not be read or the published entries not deleted (they will be sent
    /// again: a duplicate, never a loss).
    LogFailed,
}

/// Publishes one batch of `log`'s outbox and deletes it once the transport acknowledged it.
async fn pass(log: &EventLog, transport: &dyn Transport) -> Pass {
    let entries = match log.outbox_pending(RELAY_BATCH_LEN_MAX) {
        Ok(entries) => entries,
        Err(error) => {
            tracing::error!(%error, "outbox unreadable; retrying");
            return Pass::LogFailed;
        }
    };
    // Depth as the relay sees it: what one pass found pending, at most a batch.
    metrics::gauge!(RELAY_OUTBOX_PENDING).set(entries.len() as f64);
    if entries.is_empty() {
        return Pass::Empty;
    }
    let messages: Vec<Outgoing> = entries
        .iter()
        .map(|e| Outgoing {
            topic: e.message.topic.clone(),
            tag: e.message.tag.clone(),
            key: e.message.key.clone(),
            body: e.message.body.clone(),
            properties: crate::topics::message_properties(&e.message.key),
        })
        .collect();
    let began = std::time::Instant::now();
    match transport.publish(&messages).await {
        Ok(()) => {
            metrics::histogram!(RELAY_PUBLISH_SECONDS).record(began.elapsed().as_secs_f64());
            metrics::counter!(RELAY_PUBLISHED_TOTAL).increment(messages.len() as u64);
            let ids = entries.iter().map(|e| e.id).collect();
            match log.outbox_ack(ids).await {
                Ok(()) => Pass::Published,
                Err(error) => {
                    tracing::error!(%error, "published outbox entries not deleted; they will be sent again");
                    Pass::LogFailed
                }
            }
        }
        Err(error) => {
            metrics::counter!(RELAY_PUBLISH_FAILURES_TOTAL).increment(1);
            tracing::warn!(%error, len = messages.len(), "publishing the outbox failed; retrying");
            Pass::PublishFailed
        }
    }
}

/// Publishes `log`'s outbox through `transport` until the task is dropped. `wake` is notified
/// by whoever appends outbox entries (the relay also looks every [`RELAY_IDLE_MAX`]).
pub async fn run(log: EventLog, transport: Arc<dyn Transport>, wake: Arc<Notify>) {
    let mut backoff = RELAY_BACKOFF_MIN;
    loop {
        match pass(&log, transport.as_ref()).await {
            Pass::Empty => {
                // A wake-up stored while we were publishing is not lost (`notify_one` keeps a
                // permit).
                let _ = tokio::time::timeout(RELAY_IDLE_MAX, wake.notified()).await;
            }
            Pass::Published => backoff = RELAY_BACKOFF_MIN,
            Pass::PublishFailed => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RELAY_BACKOFF_MAX);
            }
            Pass::LogFailed => tokio::time::sleep(RELAY_BACKOFF_MAX).await,
        }
    }
}

/// At shutdown, after [`run`]'s task stopped: publishes what the outbox holds until it is
/// empty or `deadline`; returns whether it emptied it. What is left stays in the log for the
/// next start's relay (nothing is lost; an entry published and not yet deleted when the
/// deadline cuts in is sent again then, a duplicate consumers absorb).
pub async fn drain(log: &EventLog, transport: &dyn Transport, deadline: tokio::time::Instant) -> bool {
    let mut backoff = RELAY_BACKOFF_MIN;
    loop {
        let passed = tokio::time::timeout_at(deadline, pass(log, transport)).await;
        let wait = match passed {
            Err(_) => return false,
            Ok(Pass::Empty) => return true,
            Ok(Pass::Published) => continue,
            Ok(Pass::PublishFailed) => {
                backoff = (backoff * 2).min(RELAY_BACKOFF_MAX);
                backoff / 2
            }
            Ok(Pass::LogFailed) => return false,
        };
        if tokio::time::timeout_at(deadline, tokio::time::sleep(wait))
            .await
            .is_err()
        {
            return false;
        }
    }
}

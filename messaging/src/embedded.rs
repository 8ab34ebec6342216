//! The embedded compensation transport: a durable queue inside the process, on its own
//! saga-storage event log, for the all-in-one demo (no broker needed).
//!
//! Layout, all as events (so the queue itself replays for audits):
//! - stream `topic/<topic>`: one `Published { tag, key, body }` event per message; `publish`
//!   is one durable append.
//! - stream `group/<group>/<topic>`: the group's progress, `Acked { position }` when the
//!   handler consumed the message at that global position, `RetryScheduled { position,
//!   attempt }` when it asked for a retry.
//!
//! A consumer replays its group stream on start: the next position to read is one past the
//! last position it acknowledged or scheduled, and every scheduled retry without a later ack is
//! pending again. It then tails the log. Fresh messages are handled one at a time in log order;
//! retries come back after an exponential delay (`retry_delay_*`). A crash between handling and
//! the `Acked` append redelivers that message: duplicates are possible, as with RocketMQ.
//!
//! Limits: one running consumer per (group, topic) per process; the group stream grows by one
//! event per message (compaction is future work: fine for the demo's volumes).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use saga_storage::{
    AppendRequest, EventLog, ExpectedVersion, LogConfig, NewEvent, Position, Record, StreamVersion,
};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::error::MessagingError;
use crate::transport::{
    BoxFuture, Consumer, Delivery, Handler, Outcome, Outgoing, SubscriptionSpec, Transport,
};

/// Settings of the embedded transport.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// Delay before the first redelivery of a message the handler asked to retry; doubles
    /// with every attempt up to `retry_delay_max`.
    pub retry_delay_base: Duration,
    pub retry_delay_max: Duration,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            retry_delay_base: Duration::from_millis(500),
            retry_delay_max: Duration::from_secs(30),
        }
    }
}

impl EmbeddedConfig {
    fn retry_delay(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(16);
        self.retry_delay_base
            .saturating_mul(factor)
            .min(self.retry_delay_max)
    }
}

#[derive(Debug, Serialize, Deserialize)]
enum QueueEvent {
    Published {
        tag: String,
        key: String,
        body: Vec<u8>,
    },
    Acked {
        position: u64,
    },
    RetryScheduled {
        position: u64,
        attempt: u32,
    },
    /// A message with its user properties (what `publish` writes since properties exist;
    /// `Published` is read as a message without any).
    PublishedWithProperties {
        tag: String,
        key: String,
        body: Vec<u8>,
        properties: Vec<(String, String)>,
    },
}

impl QueueEvent {
    fn name(&self) -> &'static str {
        match self {
            QueueEvent::Published { .. } => "Published",
            QueueEvent::Acked { .. } => "Acked",
            QueueEvent::RetryScheduled { .. } => "RetryScheduled",
            QueueEvent::PublishedWithProperties { .. } => "PublishedWithProperties",
        }
    }

    fn to_new(&self) -> Result<NewEvent, MessagingError> {
        NewEvent::encode(self.name(), self).map_err(storage_error)
    }
}

fn storage_error(e: saga_storage::StorageError) -> MessagingError {
    MessagingError::Unavailable(format!("embedded queue: {e}"))
}

fn topic_stream(topic: &str) -> String {
    format!("topic/{topic}")
}

fn group_stream(group: &str, topic: &str) -> String {
    format!("group/{group}/{topic}")
}

/// The embedded transport. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedTransport {
    log: EventLog,
    config: EmbeddedConfig,
    running: Arc<Mutex<HashSet<String>>>,
}

impl EmbeddedTransport {
    /// Opens (or creates) the queue in `dir`, with full durability.
    pub fn open(dir: &Path, config: EmbeddedConfig) -> Result<Self, MessagingError> {
        Self::open_with(LogConfig::new(dir), config)
    }

    /// As [`EmbeddedTransport::open`], with the queue's log set up by the caller (its cache).
    pub fn open_with(log: LogConfig, config: EmbeddedConfig) -> Result<Self, MessagingError> {
        let log = EventLog::open(log).map_err(|e| MessagingError::Storage(e.to_string()))?;
        Ok(EmbeddedTransport {
            log,
            config,
            running: Arc::default(),
        })
    }

    /// The queue's own event log (for audits).
    pub fn log(&self) -> &EventLog {
        &self.log
    }
}

impl Transport for EmbeddedTransport {
    fn publish<'a>(&'a self, messages: &'a [Outgoing]) -> BoxFuture<'a, Result<(), MessagingError>> {
        Box::pin(async move {
            // One durable append per topic.
            let mut by_topic: BTreeMap<&str, Vec<NewEvent>> = BTreeMap::new();
            for m in messages {
                let event = QueueEvent::PublishedWithProperties {
                    tag: m.tag.clone(),
                    key: m.key.clone(),
                    body: m.body.clone(),
                    properties: m.properties.clone(),
                };
                by_topic.entry(&m.topic).or_default().push(event.to_new()?);
            }
            for (topic, events) in by_topic {
                self.log
                    .append(AppendRequest::new(topic_stream(topic), ExpectedVersion::Any).events(events))
                    .await
                    .map_err(storage_error)?;
            }
            Ok(())
        })
    }

    fn subscribe(
        &self,
        spec: SubscriptionSpec,
        handler: Arc<dyn Handler>,
    ) -> BoxFuture<'_, Result<Box<dyn Consumer>, MessagingError>> {
        Box::pin(async move {
            let name = group_stream(&spec.group, &spec.topic);
            if !self.running.lock().expect("not poisoned").insert(name.clone()) {
                return Err(MessagingError::Config(format!(
                    "a consumer of group {} on topic {} already runs in this process",
                    spec.group, spec.topic
                )));
            }
            let (stop, stopped) = oneshot::channel();
            let worker = Worker {
                log: self.log.clone(),
                config: self.config.clone(),
                group_stream: name.clone(),
                topic_stream: topic_stream(&spec.topic),
                spec,
                handler,
            };
            let task = tokio::spawn(async move {
                if let Err(error) = worker.run(stopped).await {
                    tracing::error!(%error, "embedded consumer stopped");
                }
            });
            Ok(Box::new(EmbeddedConsumer {
                stop: Some(stop),
                task,
                running: Arc::clone(&self.running),
                name,
            }) as Box<dyn Consumer>)
        })
    }
}

struct EmbeddedConsumer {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    running: Arc<Mutex<HashSet<String>>>,
    name: String,
}

impl Consumer for EmbeddedConsumer {
    fn shutdown(mut self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            let _ = (&mut self.task).await;
            self.running.lock().expect("not poisoned").remove(&self.name);
        })
    }
}

struct Worker {
    log: EventLog,
    config: EmbeddedConfig,
    spec: SubscriptionSpec,
    group_stream: String,
    topic_stream: String,
    handler: Arc<dyn Handler>,
}

/// A message waiting for redelivery.
#[derive(Debug, Clone, Copy)]
struct Pending {
    attempt: u32,
    due: Instant,
}

impl Worker {
    async fn run(self, mut stopped: oneshot::Receiver<()>) -> Result<(), MessagingError> {
        // Recover the group's progress from its own events.
        let mut next_position = 1u64;
        let mut retries: BTreeMap<u64, Pending> = BTreeMap::new();
        let mut from_version = 1;
        loop {
            let records = self
                .log
                .read_stream(
                    &self.group_stream,
                    StreamVersion::new(from_version),
                    saga_storage::log::READ_LEN_MAX,
                )
                .await
                .map_err(storage_error)?;
            if records.is_empty() {
                break;
            }
            from_version += records.len() as u64;
            for record in records {
                match record.decode::<QueueEvent>().map_err(storage_error)? {
                    QueueEvent::Acked { position } => {
                        retries.remove(&position);
                        next_position = next_position.max(position + 1);
                    }
                    QueueEvent::RetryScheduled { position, attempt } => {
                        let due = Instant::now() + self.config.retry_delay(attempt);
                        retries.insert(position, Pending { attempt, due });
                        next_position = next_position.max(position + 1);
                    }
                    QueueEvent::Published { .. } | QueueEvent::PublishedWithProperties { .. } => {}
                }
            }
        }
        let mut tail = self.log.subscribe(Position::new(next_position));
        loop {
            let next_retry = retries
                .iter()
                .min_by_key(|(_, p)| p.due)
                .map(|(pos, p)| (*pos, *p));
            let retry_due = async {
                match next_retry {
                    Some((_, pending)) => tokio::time::sleep_until(pending.due).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut stopped => return Ok(()),
                record = tail.next() => {
                    let record = match record {
                        Ok(record) => record,
                        Err(saga_storage::StorageError::Closed) => return Ok(()),
                        Err(e) => return Err(storage_error(e)),
                    };
                    if record.stream() != self.topic_stream {
                        continue;
                    }
                    self.deliver(&record, 0, &mut retries).await?;
                }
                () = retry_due => {
                    let (position, pending) = next_retry.expect("a retry was due");
                    let record = self
                        .log
                        .read_all(Position::new(position), 1)
                        .map_err(storage_error)?
                        .pop()
                        .ok_or_else(|| MessagingError::Unavailable(format!("message at {position} is gone")))?;
                    self.deliver(&record, pending.attempt, &mut retries).await?;
                }
            }
        }
    }

    /// Hands one message to the handler and records what it said.
    async fn deliver(
        &self,
        record: &Record,
        attempt: u32,
        retries: &mut BTreeMap<u64, Pending>,
    ) -> Result<(), MessagingError> {
        let (tag, key, body, properties) = match record.decode::<QueueEvent>().map_err(storage_error)? {
            QueueEvent::Published { tag, key, body } => (tag, key, body, Vec::new()),
            QueueEvent::PublishedWithProperties {
                tag,
                key,
                body,
                properties,
            } => (tag, key, body, properties),
            QueueEvent::Acked { .. } | QueueEvent::RetryScheduled { .. } => {
                return Err(MessagingError::Unavailable(format!(
                    "position {} of {} is not a published message",
                    record.position(),
                    self.topic_stream
                )));
            }
        };
        if !self.spec.accepts(&tag) {
            return Ok(());
        }
        // Stored in the group's events as a plain number.
        let position = record.position().get();
        let delivery = Delivery {
            topic: self.spec.topic.clone(),
            tag,
            key,
            body,
            properties,
            attempt,
        };
        let event = match self.handler.handle(delivery).await {
            Outcome::Consumed => {
                retries.remove(&position);
                QueueEvent::Acked { position }
            }
            Outcome::RetryLater => {
                let attempt = attempt + 1;
                let due = Instant::now() + self.config.retry_delay(attempt);
                retries.insert(position, Pending { attempt, due });
                QueueEvent::RetryScheduled { position, attempt }
            }
        };
        self.log
            .append(AppendRequest::new(&self.group_stream, ExpectedVersion::Any).event(event.to_new()?))
            .await
            .map_err(storage_error)?;
        Ok(())
    }
}

#[cfg(test)]
mod golden {
    use super::*;

    /// The queue's events are stored by variant index: add variants only at the end.
    #[test]
    fn stored_queue_events_keep_their_encoding() {
        let cases = [
            (
                QueueEvent::Published {
                    tag: "g".into(),
                    key: "k".into(),
                    body: vec![1],
                },
                "000167016b0101",
            ),
            (QueueEvent::Acked { position: 7 }, "0107"),
            (
                QueueEvent::RetryScheduled {
                    position: 7,
                    attempt: 2,
                },
                "020702",
            ),
            (
                QueueEvent::PublishedWithProperties {
                    tag: "g".into(),
                    key: "k".into(),
                    body: vec![1],
                    properties: vec![("n".into(), "v".into())],
                },
                "030167016b010101016e0176",
            ),
        ];
        for (event, stored) in cases {
            let hex: String = saga_storage::codec::encode(&event)
                .expect("encodes")
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(hex, stored, "{event:?}");
        }
    }
}

//! The compensation consumer and its consumer log.
//!
//! As in the classic design, each message is tracked per (group, tag, key) with a status:
//! processing -> success | fail (with the number of tries); a duplicate of a successful
//! message is skipped; after [`TRIES_MAX`] failed tries the message is parked (an event, and
//! an entry in the parked list served by `ConsumerAdmin`), never dropped. Here the log is a
//! stream of events per message, `consumer/<group>/<tag>/<key>`, in the participant's own
//! event log, so it replays with everything else.
//!
//! Exactly once: the transport delivers at least once, the consumer log skips what succeeded,
//! and the barrier (`barrier::compensate`) makes even a redelivery after a crash between
//! "applied" and "success recorded" harmless.
//!
//! After a compensation is applied (or found applied, or parked) the consumer publishes a
//! `saga.v1.CompensationAck` to the acknowledgement topic (key `<saga_id>:<step>`), batched with
//! the acks of concurrent handlers. A duplicate
//! delivery of a successful message publishes the ack again, since the first one may have been
//! lost with a crash.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message as _;
use saga_messaging::topics;
use saga_messaging::transport::{BoxFuture, Delivery, Handler, Outcome, Outgoing, Transport};
use saga_proto::v1 as pb;
use saga_storage::{AppendRequest, ExpectedVersion, NewEvent};

use crate::barrier::{BarrierError, Compensated, StepKey};
use crate::events::ParticipantEvent;
use crate::{Participant, Role};

/// Failed tries before a message is parked.
pub const TRIES_MAX: u32 = 3;
/// Most acknowledgements published in one request.
pub const ACK_BATCH_LEN_MAX: usize = 64;
/// Most acknowledgements waiting for the publisher; handlers wait beyond it (back-pressure).
const ACK_QUEUE_LEN_MAX: usize = 1024;

type AckJob = (Outgoing, tokio::sync::oneshot::Sender<Result<(), String>>);

/// Publishes acknowledgements in batches: whatever queued up while the previous publish was in
/// flight goes out as one request (no added wait when idle, fewer broker round trips under a
/// burst). Each handler still learns whether its own ack was stored before it consumes.
#[derive(Clone)]
struct AckBatcher {
    jobs: tokio::sync::mpsc::Sender<AckJob>,
}

impl AckBatcher {
    /// Must be called inside a Tokio runtime (it spawns the publisher task, which ends when
    /// the last handle is dropped).
    fn spawn(transport: Arc<dyn Transport>) -> AckBatcher {
        let (jobs, mut queue) = tokio::sync::mpsc::channel::<AckJob>(ACK_QUEUE_LEN_MAX);
        tokio::spawn(async move {
            while let Some(first) = queue.recv().await {
                let mut batch = vec![first];
                while batch.len() < ACK_BATCH_LEN_MAX {
                    match queue.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                let messages: Vec<Outgoing> = batch.iter().map(|(m, _)| m.clone()).collect();
                let result = transport.publish(&messages).await.map_err(|e| e.to_string());
                for (_, reply) in batch {
                    let _ = reply.send(result.clone());
                }
            }
        });
        AckBatcher { jobs }
    }

    async fn publish(&self, message: Outgoing) -> Result<(), String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.jobs
            .send((message, reply))
            .await
            .map_err(|_| "ack publisher stopped".to_owned())?;
        answer.await.map_err(|_| "ack publisher stopped".to_owned())?
    }
}

/// Where a message stands in the consumer log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumeStatus {
    New,
    Processing { tries: u32 },
    Failed { tries: u32 },
    Succeeded,
    Parked { tries: u32 },
}

fn fold(events: impl IntoIterator<Item = ParticipantEvent>) -> ConsumeStatus {
    let mut status = ConsumeStatus::New;
    for event in events {
        let tries = match status {
            ConsumeStatus::Processing { tries }
            | ConsumeStatus::Failed { tries }
            | ConsumeStatus::Parked { tries } => tries,
            ConsumeStatus::New | ConsumeStatus::Succeeded => 0,
        };
        status = match event {
            ParticipantEvent::ConsumeStarted { .. } => ConsumeStatus::Processing { tries },
            ParticipantEvent::ConsumeSucceeded { .. } => ConsumeStatus::Succeeded,
            ParticipantEvent::ConsumeFailed { tries, .. } => ConsumeStatus::Failed { tries },
            ParticipantEvent::MessageParked { tries, .. } => ConsumeStatus::Parked { tries },
            ParticipantEvent::ParkedRequeued => ConsumeStatus::Failed { tries: 0 },
            other => panic!("consumer log holds a non-consumer event: {other:?}"),
        };
    }
    status
}

/// Fault injection for tests and chaos runs: compensations of sagas whose id starts with this
/// prefix fail (as a storage outage would), so that the retry and parking paths can be
/// exercised end to end. The `saga-participant` binary reads it at start-up.
pub const FAULT_PREFIX_ENV: &str = "SAGA_FAULT_COMPENSATION_FAILS_FOR";

/// Fault injection for crash tests: right after applying a compensation of a saga whose id
/// starts with this prefix, the handler stops for good, before recording success or
/// acknowledging, and says so on stderr. A test then kills the process with SIGKILL: the
/// "killed between consuming and acknowledging" case, with the kill at a known point.
pub const CRASH_PREFIX_ENV: &str = "SAGA_FAULT_FREEZE_AFTER_APPLY_FOR";

/// Handles compensation messages for one participant.
pub struct CompensationConsumer {
    participant: Participant,
    acks: Arc<dyn Transport>,
    ack_batcher: AckBatcher,
    group: String,
    topic: String,
    ack_topic: String,
    fault_prefix: Option<String>,
    crash_prefix: Option<String>,
}

impl CompensationConsumer {
    /// A consumer that acknowledges through `acks`. Must be called inside a Tokio runtime.
    pub fn new(participant: Participant, acks: Arc<dyn Transport>) -> Self {
        let group = topics::compensation_group(participant.role().name());
        CompensationConsumer {
            participant,
            ack_batcher: AckBatcher::spawn(acks.clone()),
            acks,
            group,
            topic: topics::COMPENSATION_TOPIC.into(),
            ack_topic: topics::COMPENSATION_ACK_TOPIC.into(),
            fault_prefix: None,
            crash_prefix: None,
        }
    }

    /// Consumes as `group` instead of the role's default `saga-compensation-<role>` (tests that
    /// run several participants of one role against one broker; see the note on instances in
    /// README).
    pub fn with_group(mut self, group: String) -> Self {
        self.group = group;
        self
    }

    /// Consumes compensations from `topic` instead of `saga-compensation` (isolated test runs
    /// against a shared broker).
    pub fn with_topic(mut self, topic: String) -> Self {
        self.topic = topic;
        self
    }

    /// Acknowledges to `topic` instead of `saga-compensation-ack` (isolated test runs).
    pub fn with_ack_topic(mut self, topic: String) -> Self {
        self.ack_topic = topic;
        self
    }

    /// Fault injection (see [`CRASH_PREFIX_ENV`]).
    pub fn with_crash_prefix(mut self, prefix: Option<String>) -> Self {
        self.crash_prefix = prefix.filter(|p| !p.is_empty());
        self
    }

    /// Fault injection (see [`FAULT_PREFIX_ENV`]): compensations of sagas whose id starts with
    /// `prefix` fail. `None` or an empty prefix turns it off.
    pub fn with_fault_prefix(mut self, prefix: Option<String>) -> Self {
        self.fault_prefix = prefix.filter(|p| !p.is_empty());
        self
    }

    /// The subscription this consumer needs: the compensation topic, its role's tag.
    pub fn spec(&self) -> saga_messaging::transport::SubscriptionSpec {
        saga_messaging::transport::SubscriptionSpec {
            group: self.group.clone(),
            topic: self.topic.clone(),
            tags: vec![self.participant.role().name().into()],
        }
    }

    fn log_stream(&self, tag: &str, key: &str) -> String {
        format!("consumer/{}/{tag}/{key}", self.group)
    }

    async fn append(&self, stream: &str, event: ParticipantEvent) -> Result<(), String> {
        let new = NewEvent::encode(event.name(), &event).map_err(|e| e.to_string())?;
        self.participant
            .log()
            .append(AppendRequest::new(stream, ExpectedVersion::Any).event(new))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn status(&self, stream: &str) -> Result<ConsumeStatus, String> {
        let records = self
            .participant
            .log()
            .read_stream(stream, 1, saga_storage::log::READ_LEN_MAX)
            .await
            .map_err(|e| e.to_string())?;
        let events = records
            .iter()
            .map(|r| r.decode::<ParticipantEvent>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        Ok(fold(events))
    }

    async fn ack(
        &self,
        key: &StepKey,
        outcome: pb::CompensationOutcome,
        detail: String,
    ) -> Result<(), String> {
        let body = pb::CompensationAck {
            key: Some(pb::StepKey {
                saga_id: key.saga_id.clone(),
                step: key.step.clone(),
            }),
            role: self.participant.role().name().into(),
            outcome: outcome as i32,
            detail,
        }
        .encode_to_vec();
        self.ack_batcher
            .publish(Outgoing {
                topic: self.ack_topic.clone(),
                tag: self.participant.role().name().into(),
                key: format!("{}:{}", key.saga_id, key.step),
                body,
            })
            .await
    }

    async fn compensate(&self, key: &StepKey) -> Result<Compensated, BarrierError> {
        if let Some(prefix) = &self.fault_prefix
            && key.saga_id.starts_with(prefix.as_str())
        {
            return Err(BarrierError::Contended(format!(
                "injected fault ({FAULT_PREFIX_ENV})"
            )));
        }
        self.participant.compensate(key).await
    }

    async fn park(
        &self,
        stream: &str,
        delivery: &Delivery,
        tries: u32,
        error: String,
        key: Option<&StepKey>,
    ) -> Outcome {
        let parked = ParticipantEvent::MessageParked {
            group: self.group.clone(),
            tag: delivery.tag.clone(),
            key: delivery.key.clone(),
            tries,
            error: error.clone(),
            body: delivery.body.clone(),
            parked_at_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
        };
        if let Err(e) = self.append(stream, parked).await {
            tracing::warn!(key = %delivery.key, error = %e, "could not record parking; retry later");
            return Outcome::RetryLater;
        }
        tracing::error!(key = %delivery.key, tries, %error, "compensation parked");
        if let Some(key) = key
            && let Err(e) = self.ack(key, pb::CompensationOutcome::Parked, error).await
        {
            tracing::warn!(error = %e, "parked ack not published; the parked list still shows it");
        }
        Outcome::Consumed
    }

    async fn handle_delivery(&self, delivery: Delivery) -> Outcome {
        let stream = self.log_stream(&delivery.tag, &delivery.key);
        let status = match self.status(&stream).await {
            Ok(status) => status,
            Err(e) => {
                tracing::warn!(key = %delivery.key, error = %e, "consumer log unreadable; retry later");
                return Outcome::RetryLater;
            }
        };
        // A message that can never succeed is parked at once: retrying cannot help.
        let request = match pb::CompensationRequest::decode(delivery.body.as_slice()) {
            Ok(r) => r,
            Err(e) => {
                return self
                    .park(&stream, &delivery, 1, format!("undecodable body: {e}"), None)
                    .await;
            }
        };
        let Some(key) = request.key.map(|k| StepKey {
            saga_id: k.saga_id,
            step: k.step,
        }) else {
            return self
                .park(&stream, &delivery, 1, "body has no step key".into(), None)
                .await;
        };
        if Role::parse(&request.role) != Some(self.participant.role()) || delivery.tag != request.role {
            let error = format!(
                "message for role {:?} (tag {:?}) reached {}",
                request.role,
                delivery.tag,
                self.participant.role().name()
            );
            return self.park(&stream, &delivery, 1, error, Some(&key)).await;
        }
        let tries = match status {
            ConsumeStatus::Succeeded => {
                // Duplicate: skip the work, re-send the ack (the first may have been lost).
                return match self
                    .ack(&key, pb::CompensationOutcome::AlreadyApplied, String::new())
                    .await
                {
                    Ok(()) => Outcome::Consumed,
                    Err(_) => Outcome::RetryLater,
                };
            }
            ConsumeStatus::Parked { .. } => {
                // A parked message was consumed, so a new delivery of its key is a resend: the
                // orchestrator's RetrySaga after an operator fixed the cause (or, rarely, a
                // duplicate, which costs at most another TRIES_MAX bounded tries). Requeue it.
                if let Err(e) = self.append(&stream, ParticipantEvent::ParkedRequeued).await {
                    tracing::warn!(key = %delivery.key, error = %e, "could not requeue; retry later");
                    return Outcome::RetryLater;
                }
                0
            }
            ConsumeStatus::New => 0,
            ConsumeStatus::Processing { tries } | ConsumeStatus::Failed { tries } => tries,
        };
        if let Err(e) = self
            .append(&stream, ParticipantEvent::ConsumeStarted { attempt: tries + 1 })
            .await
        {
            tracing::warn!(key = %delivery.key, error = %e, "could not record processing; retry later");
            return Outcome::RetryLater;
        }
        match self.compensate(&key).await {
            Ok(compensated) => {
                if let Some(prefix) = &self.crash_prefix
                    && key.saga_id.starts_with(prefix.as_str())
                {
                    eprintln!(
                        "injected fault ({CRASH_PREFIX_ENV}): frozen after applying {}",
                        delivery.key
                    );
                    return std::future::pending().await;
                }
                let outcome = match compensated {
                    Compensated::Applied => pb::CompensationOutcome::Applied,
                    Compensated::Null => pb::CompensationOutcome::Null,
                    Compensated::AlreadyApplied => pb::CompensationOutcome::AlreadyApplied,
                };
                let recorded = ParticipantEvent::ConsumeSucceeded {
                    outcome: outcome.as_str_name().into(),
                };
                if self.append(&stream, recorded).await.is_err() {
                    // The barrier makes the redelivery harmless.
                    return Outcome::RetryLater;
                }
                match self.ack(&key, outcome, String::new()).await {
                    Ok(()) => Outcome::Consumed,
                    Err(_) => Outcome::RetryLater,
                }
            }
            Err(error) => {
                let tries = tries + 1;
                let error = error.to_string();
                if tries >= TRIES_MAX {
                    return self.park(&stream, &delivery, tries, error, Some(&key)).await;
                }
                tracing::warn!(key = %delivery.key, tries, %error, "compensation failed; retry later");
                let _ = self
                    .append(&stream, ParticipantEvent::ConsumeFailed { tries, error })
                    .await;
                Outcome::RetryLater
            }
        }
    }

    /// Parked messages, oldest key first, after `after` (a log key) when given.
    pub async fn parked(&self, after: Option<&str>, max: usize) -> Result<Vec<pb::ParkedMessage>, String> {
        let after_key = after.map(|a| format!("parked/consumer/{a}"));
        let entries = self
            .participant
            .log()
            .projection_scan_prefix("parked/", after_key.as_deref().map(str::as_bytes), max)
            .await
            .map_err(|e| e.to_string())?;
        let mut out = Vec::with_capacity(entries.len());
        for (_, value) in entries {
            out.push(parked_message(&value)?);
        }
        Ok(out)
    }
}

impl CompensationConsumer {
    /// Puts a parked message back: records `ParkedRequeued` (its tries start again from 0)
    /// and publishes the original message again. `log_key` is `<group>/<tag>/<key>`.
    pub async fn requeue(&self, log_key: &str) -> Result<Option<pb::ParkedMessage>, String> {
        let stream = format!("consumer/{log_key}");
        let Some(value) = self
            .participant
            .log()
            .projection_get(format!("parked/{stream}"))
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(None);
        };
        let message = parked_message(&value)?;
        self.append(&stream, ParticipantEvent::ParkedRequeued).await?;
        self.acks
            .publish(&[Outgoing {
                topic: self.topic.clone(),
                tag: message.tag.clone(),
                key: message.key.clone(),
                body: message.body.clone(),
            }])
            .await
            .map_err(|e| e.to_string())?;
        Ok(Some(message))
    }
}

/// A parked-list entry (the stored `MessageParked` event) as the API shows it.
fn parked_message(stored: &[u8]) -> Result<pb::ParkedMessage, String> {
    match saga_storage::codec::decode::<ParticipantEvent>(stored).map_err(|e| e.to_string())? {
        ParticipantEvent::MessageParked {
            group,
            tag,
            key,
            tries,
            error,
            body,
            parked_at_unix_ms,
        } => Ok(pb::ParkedMessage {
            log_key: format!("{group}/{tag}/{key}"),
            group,
            tag,
            key,
            tries,
            last_error: error,
            parked_at_unix_ms,
            body,
        }),
        other => Err(format!("parked list holds a {} event", other.name())),
    }
}

impl Handler for CompensationConsumer {
    fn handle(&self, delivery: Delivery) -> BoxFuture<'static, Outcome> {
        // The handler owns clones of what it needs so that the future is 'static.
        let this = CompensationConsumer {
            participant: self.participant.clone(),
            acks: Arc::clone(&self.acks),
            ack_batcher: self.ack_batcher.clone(),
            group: self.group.clone(),
            topic: self.topic.clone(),
            ack_topic: self.ack_topic.clone(),
            fault_prefix: self.fault_prefix.clone(),
            crash_prefix: self.crash_prefix.clone(),
        };
        Box::pin(async move { this.handle_delivery(delivery).await })
    }
}

//! The compensation consumer and its consumer log.
//!
//! As in the classic design, each message is tracked per (group, tag, key) with a status:
//! processing -> success | fail (with the number of tries); a duplicate of a successful
//! message is skipped; after [`TRIES_MAX`] tries the message is parked (an event, and an entry
//! in the parked list served by `ConsumerAdmin`), never dropped. Here the log is a stream of
//! events per message, `consumer/<group>/<tag>/<saga_id>:<step>` (named from the body's step
//! key, the one the barrier acts on), in the participant's own event log, so it replays with
//! everything else. A try that started and never finished (the process died in it) counts as a
//! try, so a message that kills the process is parked after [`TRIES_MAX`] such deaths.
//!
//! A message that is not a valid compensation for this role (undecodable, no step key, another
//! role, a transport key that disagrees with the body) is parked at once in its own stream
//! `poison/<group>/<tag>/<transport key>`, so it never disturbs the consumer log of a valid
//! message with the same key. Parked bodies are kept up to
//! [`crate::consumer_log::PARKED_BODY_LEN_MAX`] bytes with their length and digest, and the parked
//! list is keyed by the digest: every parked message stays listed.
//!
//! Exactly once: the transport delivers at least once, the consumer log skips what succeeded,
//! and the undo is written in one append with its success and acknowledgement
//! (`barrier::AlsoRecord`), so no crash separates "applied" from "success recorded". The
//! barrier (`barrier::compensate`) still answers "already applied" to a redelivery that finds
//! the undo without its success (logs written before that append existed, or another consumer
//! log of the same step), and records the success then.
//!
//! A compensation costs two durable appends: the try's start (`ConsumeStarted`, durable before
//! the undo runs, so a try that kills the process is counted), then the undo with its success
//! and acknowledgement.
//!
//! Acknowledgements are as durable as compensations: each `saga.v1.CompensationAck` (APPLIED,
//! NULL, ALREADY_APPLIED or PARKED) is written to the participant's outbox **in the same
//! append** as the consumer-log event that decides it, and a relay (`saga_messaging::relay`,
//! the orchestrator's mechanism) publishes it. So a delivery is consumed only once its ack is
//! durable here; a crash before the append redelivers the message, a crash after it relays the
//! ack on restart. Acks go to the topic and tag the request names (the owning orchestrator's),
//! with the key `<saga_id>:<step>`, or, when the request names the orchestrator's
//! `ack_endpoint`, straight to it over gRPC (`crate::acks`; the same outbox and relay). A
//! duplicate delivery of a successful message writes the ack again (the first may have gone to
//! an orchestrator that lost it).

use std::sync::Arc;

use prost::Message as _;
use saga_messaging::topics;
use saga_messaging::transport::{BoxFuture, Delivery, Handler, Outcome, Outgoing, Transport};
use saga_proto::v1 as pb;
use saga_storage::{AppendRequest, ExpectedVersion, NewEvent, OutboxMessage};
use tokio::sync::Notify;

use crate::barrier::{BarrierError, Compensated, StepKey};
use crate::consumer_log::{
    ConsumeStatus, ConsumerEvent, PARKED_BODY_LEN_MAX, ParkedEntryError, body_digest, parked_message,
};
use crate::record::ParticipantEvent;
use crate::{Participant, Role, keys};
use saga_storage::StreamVersion;

/// Counter by `role` and `outcome` (`consumed`, `retry_later`): deliveries handled.
pub const CONSUMER_DELIVERIES_TOTAL: &str = "saga_consumer_deliveries_total";
/// Counter by `role`: tries of a compensation started (a first try and each retry).
pub const CONSUMER_TRIES_TOTAL: &str = "saga_consumer_tries_total";
/// Counter by `role`: messages parked (each needs an operator; see `ConsumerAdmin`).
pub const CONSUMER_PARKED_TOTAL: &str = "saga_consumer_parked_total";
/// Histogram by `role`: consumer lag, seconds from the orchestrator's request of a
/// compensation (`requested_at_unix_ms`) to its delivery here (outbox, relay and broker).
pub const CONSUMER_LAG_SECONDS: &str = "saga_consumer_lag_seconds";

/// Tries before a message is parked (a try that never finished counts).
pub const TRIES_MAX: u32 = 3;
/// Longest transport key or tag used in a poison stream's name; longer ones are replaced by
/// the body's digest (stream names are bounded by the log).
const POISON_NAME_LEN_MAX: usize = 64;

/// Why the consumer log could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerLogError {
    #[error(transparent)]
    Storage(#[from] saga_storage::StorageError),
    #[error(transparent)]
    Codec(#[from] saga_storage::codec::CodecError),
    #[error(transparent)]
    NotAConsumerEvent(#[from] crate::consumer_log::NotAConsumerEvent),
}

/// Why a parked message could not be listed or requeued.
#[derive(Debug, thiserror::Error)]
pub enum ParkedError {
    #[error(transparent)]
    Log(#[from] ConsumerLogError),
    #[error(transparent)]
    Entry(#[from] ParkedEntryError),
    #[error("{log_key}: only {kept} of its {len} bytes were kept; it cannot be sent again")]
    Truncated { log_key: String, kept: usize, len: u64 },
    #[error("publishing it again failed: {0}")]
    Publish(#[from] saga_messaging::MessagingError),
}

impl From<saga_storage::StorageError> for ParkedError {
    fn from(error: saga_storage::StorageError) -> Self {
        ParkedError::Log(error.into())
    }
}

/// Aborts the participant's relay task when the last consumer handle goes away, so that the
/// log is released (and can be reopened) after a shutdown.
struct RelayTask {
    wake: Arc<Notify>,
    task: tokio::task::AbortHandle,
}

impl Drop for RelayTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where an acknowledgement goes (the topic and tag the request named), and the request's
/// round, echoed.
struct AckRoute {
    topic: String,
    tag: String,
    round: u32,
    /// The orchestrator's address for acknowledgements over gRPC (`crate::acks`) if the
    /// request named a usable one (empty: the topic), and the token to echo.
    endpoint: String,
    token: String,
}

/// Handles compensation messages for one participant.
#[derive(Clone)]
pub struct CompensationConsumer {
    participant: Participant,
    /// The relay's transport: acks to an orchestrator's endpoint over gRPC, the rest through
    /// `transport` (`crate::acks`).
    router: Arc<crate::acks::AckRouter>,
    /// Publishes acknowledgements (through the relay) and requeued messages.
    transport: Arc<dyn Transport>,
    relay: Arc<RelayTask>,
    group: String,
    topic: String,
    ack_topic: String,
}

impl CompensationConsumer {
    /// A consumer that acknowledges through `transport`, and starts the relay of the
    /// participant's outbox (stopped when the last handle is dropped). Must be called inside
    /// a Tokio runtime.
    pub fn new(participant: Participant, transport: Arc<dyn Transport>) -> Self {
        let group = topics::compensation_group(participant.role().name());
        let wake = Arc::new(Notify::new());
        // Acknowledgements whose request named an `ack_endpoint` go to it over gRPC, the rest
        // through the transport (`crate::acks`).
        let router = Arc::new(crate::acks::AckRouter::new(Arc::clone(&transport)));
        let task = tokio::spawn(saga_messaging::relay::run(
            participant.log().clone(),
            Arc::clone(&router) as Arc<dyn Transport>,
            Arc::clone(&wake),
        ))
        .abort_handle();
        CompensationConsumer {
            participant,
            router,
            transport,
            relay: Arc::new(RelayTask { wake, task }),
            group,
            topic: topics::COMPENSATION_TOPIC.into(),
            ack_topic: topics::COMPENSATION_ACK_TOPIC.into(),
        }
    }

    /// Consumes as `group` instead of the role's default `saga-compensation-<role>` (tests that
    /// run several participants of one role against one broker; see the note on instances in
    /// README).
    pub fn with_group(mut self, group: String) -> Self {
        self.group = group;
        self
    }

    /// Sends acknowledgements to `https://` orchestrator endpoints with `tls` (without it a
    /// request naming one is acknowledged through the topic).
    pub fn with_orchestrator_tls(self, tls: tonic::transport::ClientTlsConfig) -> Self {
        self.router.set_tls(tls);
        self
    }

    /// Consumes compensations from `topic` instead of `saga-compensation` (isolated test runs
    /// against a shared broker).
    pub fn with_topic(mut self, topic: String) -> Self {
        self.topic = topic;
        self
    }

    /// Acknowledges to `topic` instead of `saga-compensation-ack` when a request names no
    /// acknowledgement topic (requests of older orchestrators).
    pub fn with_ack_topic(mut self, topic: String) -> Self {
        self.ack_topic = topic;
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
        keys::consumer_stream(&self.group, tag, key)
    }

    /// Appends `events` (and `outbox`) to `stream`; wakes the relay for the outbox.
    async fn append(
        &self,
        stream: &str,
        event: ConsumerEvent,
        outbox: Option<OutboxMessage>,
    ) -> Result<(), ConsumerLogError> {
        let event = ParticipantEvent::from(event);
        let mut request =
            AppendRequest::new(stream, ExpectedVersion::Any).event(NewEvent::encode(event.name(), &event)?);
        let has_outbox = outbox.is_some();
        if let Some(message) = outbox {
            request = request.outbox(message);
        }
        self.participant.log().append(request).await?;
        if has_outbox {
            self.relay.wake.notify_one();
        }
        Ok(())
    }

    async fn status(&self, stream: &str) -> Result<ConsumeStatus, ConsumerLogError> {
        let records = self
            .participant
            .log()
            .read_stream(stream, StreamVersion::new(1), saga_storage::log::READ_LEN_MAX)
            .await?;
        let events = records
            .iter()
            .map(|r| r.decode::<ParticipantEvent>())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(crate::consumer_log::fold(events)?)
    }

    /// The acknowledgement of `key` as an outbox message.
    fn ack(
        &self,
        key: &StepKey,
        route: &AckRoute,
        outcome: pb::CompensationOutcome,
        detail: String,
    ) -> OutboxMessage {
        let body = pb::CompensationAck {
            key: Some(pb::StepKey {
                saga_id: key.saga_id.clone(),
                step: key.step.clone(),
            }),
            role: self.participant.role().name().into(),
            outcome: outcome as i32,
            detail,
            round: route.round,
            ack_token: route.token.clone(),
            ack_endpoint: route.endpoint.clone(),
        }
        .encode_to_vec();
        OutboxMessage {
            topic: route.topic.clone(),
            tag: route.tag.clone(),
            key: topics::message_key(&key.saga_id, &key.step),
            body,
        }
    }

    fn route(&self, request: Option<&pb::CompensationRequest>) -> AckRoute {
        let named = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        AckRoute {
            topic: request
                .and_then(|r| named(&r.ack_topic))
                .unwrap_or_else(|| self.ack_topic.clone()),
            // Requests of older orchestrators name no tag: their acks carried the role.
            tag: request
                .and_then(|r| named(&r.ack_tag))
                .unwrap_or_else(|| self.participant.role().name().into()),
            round: request.map_or(0, |r| r.round),
            // An address the router could not call is left out: the ack takes the topic.
            endpoint: request
                .map(|r| r.ack_endpoint.as_str())
                .filter(|e| self.router.usable(e))
                .unwrap_or_default()
                .to_owned(),
            token: request.map(|r| r.ack_token.clone()).unwrap_or_default(),
        }
    }

    /// Parks `delivery` in `stream` with the PARKED acknowledgement of `ack` (if the step is
    /// known) in the same append.
    async fn park(
        &self,
        stream: &str,
        delivery: &Delivery,
        tries: u32,
        error: String,
        ack: Option<(&StepKey, &AckRoute)>,
    ) -> Outcome {
        let kept = delivery.body.len().min(PARKED_BODY_LEN_MAX);
        let parked = ConsumerEvent::Parked {
            group: self.group.clone(),
            tag: bounded(&delivery.tag),
            key: bounded(&delivery.key),
            tries,
            error: error.clone(),
            body_prefix: delivery.body[..kept].to_vec(),
            body_len: delivery.body.len() as u64,
            body_digest: body_digest(&delivery.body),
            parked_at_unix_ms: saga_storage::clock::now_unix_ms(),
        };
        let ack =
            ack.map(|(key, route)| self.ack(key, route, pb::CompensationOutcome::Parked, error.clone()));
        if let Err(e) = self.append(stream, parked, ack).await {
            tracing::warn!(key = %delivery.key, error = %e, "could not record parking; retry later");
            return Outcome::RetryLater;
        }
        metrics::counter!(CONSUMER_PARKED_TOTAL, "role" => self.participant.role().name()).increment(1);
        tracing::error!(key = %delivery.key, tries, %error, "compensation parked");
        Outcome::Consumed
    }

    /// Parks a message that is not a valid compensation for this role, in its own stream.
    async fn park_poison(
        &self,
        delivery: &Delivery,
        error: String,
        ack: Option<(&StepKey, &AckRoute)>,
    ) -> Outcome {
        let digest = format!("{:016x}", body_digest(&delivery.body));
        let name = |s: &str| {
            if s.is_empty() || s.len() > POISON_NAME_LEN_MAX || s.contains(['\0', '@']) {
                digest.clone()
            } else {
                s.to_owned()
            }
        };
        let stream = keys::poison_stream(&self.group, &name(&delivery.tag), &name(&delivery.key));
        self.park(&stream, delivery, 1, error, ack).await
    }

    /// Handles `delivery`, whose body decoded to `decoded`.
    async fn handle_delivery(
        &self,
        delivery: Delivery,
        decoded: Result<pb::CompensationRequest, prost::DecodeError>,
    ) -> Outcome {
        // What the message is: anything but a valid compensation for this role is parked at
        // once (retrying cannot help), with a PARKED ack when the step can be named.
        let request = match decoded {
            Ok(r) => r,
            Err(e) => {
                let key = parse_transport_key(&delivery.key);
                let route = self.route(None);
                let error = format!("undecodable body: {e}");
                return self
                    .park_poison(&delivery, error, key.as_ref().map(|k| (k, &route)))
                    .await;
            }
        };
        let lag_ms = saga_storage::clock::now_unix_ms().saturating_sub(request.requested_at_unix_ms);
        metrics::histogram!(CONSUMER_LAG_SECONDS, "role" => self.participant.role().name())
            .record(lag_ms.max(0) as f64 / 1000.0);
        let route = self.route(Some(&request));
        let Some(key) = request.key.as_ref().map(|k| StepKey {
            saga_id: k.saga_id.clone(),
            step: k.step.clone(),
        }) else {
            let key = parse_transport_key(&delivery.key);
            return self
                .park_poison(
                    &delivery,
                    "body has no step key".into(),
                    key.as_ref().map(|k| (k, &route)),
                )
                .await;
        };
        if let Err((field, why)) = key.validate() {
            // The log could not name its consumer log (or would name it ambiguously).
            let error = format!("invalid step key: {field} {why}");
            return self.park_poison(&delivery, error, None).await;
        }
        let body_key = topics::message_key(&key.saga_id, &key.step);
        if delivery.key != body_key {
            let error = format!(
                "transport key {:?} disagrees with the body's step key {body_key:?}",
                delivery.key
            );
            return self.park_poison(&delivery, error, Some((&key, &route))).await;
        }
        if Role::parse(&request.role) != Some(self.participant.role()) || delivery.tag != request.role {
            let error = format!(
                "message for role {:?} (tag {:?}) reached {}",
                request.role,
                delivery.tag,
                self.participant.role().name()
            );
            return self.park_poison(&delivery, error, Some((&key, &route))).await;
        }

        let stream = self.log_stream(&delivery.tag, &body_key);
        let status = match self.status(&stream).await {
            Ok(status) => status,
            Err(e) => {
                tracing::warn!(key = %delivery.key, error = %e, "consumer log unreadable; retry later");
                return Outcome::RetryLater;
            }
        };
        let tries = match status {
            ConsumeStatus::Succeeded { outcome } => {
                // Duplicate: skip the work, acknowledge again (the first may have been lost).
                let ack = self.ack(
                    &key,
                    &route,
                    pb::CompensationOutcome::AlreadyApplied,
                    String::new(),
                );
                return match self
                    .append(
                        &stream,
                        ConsumerEvent::DuplicateAcknowledged { outcome },
                        Some(ack),
                    )
                    .await
                {
                    Ok(()) => Outcome::Consumed,
                    Err(_) => Outcome::RetryLater,
                };
            }
            ConsumeStatus::Parked { digest, .. } => {
                // A parked message was consumed, so a new delivery of its key is a resend: the
                // orchestrator's RetrySaga or re-publish after an operator fixed the cause (or,
                // rarely, a duplicate, which costs at most another TRIES_MAX bounded tries).
                let requeued = match digest {
                    Some(body_digest) => ConsumerEvent::Requeued { body_digest },
                    None => ConsumerEvent::RequeuedWholeBody,
                };
                if let Err(e) = self.append(&stream, requeued, None).await {
                    tracing::warn!(key = %delivery.key, error = %e, "could not requeue; retry later");
                    return Outcome::RetryLater;
                }
                0
            }
            ConsumeStatus::New => 0,
            ConsumeStatus::Processing { tries } | ConsumeStatus::Failed { tries } => tries,
        };
        if tries >= TRIES_MAX {
            // Only reached through tries that never finished: each one took the process down.
            let error = format!("{tries} tries started and never finished (the process died in each)");
            return self
                .park(&stream, &delivery, tries, error, Some((&key, &route)))
                .await;
        }
        if let Err(e) = self
            .append(&stream, ConsumerEvent::Started { attempt: tries + 1 }, None)
            .await
        {
            tracing::warn!(key = %delivery.key, error = %e, "could not record processing; retry later");
            return Outcome::RetryLater;
        }
        // A try counts once its start is durable (what the consumer log's bound counts).
        metrics::counter!(CONSUMER_TRIES_TOTAL, "role" => self.participant.role().name()).increment(1);
        // The undo (or null compensation), its consumer-log success and its acknowledgement
        // in one append (`barrier::AlsoRecord`): a crash leaves all three or none, and a
        // redelivery after it finds "succeeded" (and acknowledges again) or "processing"
        // (and tries again).
        let record = |compensated: Compensated| {
            let outcome = ack_outcome(compensated);
            let recorded = ParticipantEvent::from(ConsumerEvent::Succeeded {
                outcome: outcome.as_str_name().into(),
            });
            Ok(AppendRequest::new(stream.as_str(), ExpectedVersion::Any)
                .event(NewEvent::encode(recorded.name(), &recorded)?)
                .outbox(self.ack(&key, &route, outcome, String::new())))
        };
        match self.participant.compensate_recording(&key, &record).await {
            Ok(_) => {
                self.relay.wake.notify_one();
                Outcome::Consumed
            }
            Err(BarrierError::Refused(refused)) => {
                // The undo would break an invariant: retrying cannot help.
                let error = format!("refused ({}): {}", refused.reason, refused.detail);
                self.park(&stream, &delivery, tries + 1, error, Some((&key, &route)))
                    .await
            }
            Err(error) => {
                let tries = tries + 1;
                let error = error.to_string();
                if tries >= TRIES_MAX {
                    return self
                        .park(&stream, &delivery, tries, error, Some((&key, &route)))
                        .await;
                }
                tracing::warn!(key = %delivery.key, tries, %error, "compensation failed; retry later");
                let _ = self
                    .append(&stream, ConsumerEvent::Failed { tries, error }, None)
                    .await;
                Outcome::RetryLater
            }
        }
    }

    /// Parked messages in key order, after the `log_key` `after` when given.
    pub async fn parked(
        &self,
        after: Option<&str>,
        max: usize,
    ) -> Result<Vec<pb::ParkedMessage>, ParkedError> {
        let after_key = after.map(|a| format!("{}{a}", keys::PARKED_PREFIX));
        let entries = self
            .participant
            .log()
            .projection_scan_prefix(keys::PARKED_PREFIX, after_key.as_deref().map(str::as_bytes), max)
            .await?;
        let mut out = Vec::with_capacity(entries.len());
        for (key, value) in entries {
            let log_key = keys::id_of(&key, keys::PARKED_PREFIX).into_owned();
            out.push(parked_message(log_key, &value)?);
        }
        Ok(out)
    }

    /// Puts a parked message back: publishes the original message again, then records the
    /// requeue (its tries start again from 0). In that order: a failed publish leaves it parked
    /// and listed; a crash between the two leaves it listed although sent, and the new
    /// delivery requeues it anyway. `log_key` is a [`pb::ParkedMessage::log_key`].
    pub async fn requeue(&self, log_key: &str) -> Result<Option<pb::ParkedMessage>, ParkedError> {
        let Some(value) = self
            .participant
            .log()
            .projection_get(format!("{}{log_key}", keys::PARKED_PREFIX))
            .await?
        else {
            return Ok(None);
        };
        let message = parked_message(log_key.to_owned(), &value)?;
        if message.body.len() as u64 != message.body_len {
            return Err(ParkedError::Truncated {
                log_key: log_key.to_owned(),
                kept: message.body.len(),
                len: message.body_len,
            });
        }
        self.transport
            .publish(&[Outgoing {
                topic: self.topic.clone(),
                tag: message.tag.clone(),
                key: message.key.clone(),
                body: message.body.clone(),
                properties: topics::message_properties(&message.key),
            }])
            .await?;
        let (stream, requeued) = match log_key.rsplit_once('@') {
            Some((stream, _)) => (
                stream,
                ConsumerEvent::Requeued {
                    body_digest: message.body_digest,
                },
            ),
            // Entries of older logs: `consumer/<group>/<tag>/<key>`.
            None => (log_key, ConsumerEvent::RequeuedWholeBody),
        };
        self.append(stream, requeued, None)
            .await
            .map_err(ParkedError::Log)?;
        Ok(Some(message))
    }
}

/// The acknowledgement's outcome for what the barrier did.
fn ack_outcome(compensated: Compensated) -> pb::CompensationOutcome {
    match compensated {
        Compensated::Applied => pb::CompensationOutcome::Applied,
        Compensated::Null => pb::CompensationOutcome::Null,
        Compensated::AlreadyApplied => pb::CompensationOutcome::AlreadyApplied,
    }
}

/// `<saga_id>:<step>`, if the transport key has that shape.
fn parse_transport_key(key: &str) -> Option<StepKey> {
    topics::parse_message_key(key).map(|(saga_id, step)| StepKey {
        saga_id: saga_id.to_owned(),
        step: step.to_owned(),
    })
}

/// A transport-supplied name cut to a length the log can store.
fn bounded(text: &str) -> String {
    const LEN_MAX: usize = 256;
    let mut end = text.len().min(LEN_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

impl Handler for CompensationConsumer {
    fn handle(&self, delivery: Delivery) -> BoxFuture<'static, Outcome> {
        // The handler owns a clone so that the future is 'static.
        let this = self.clone();
        Box::pin(async move {
            let role = this.participant.role().name();
            // The saga's trace: the message's `traceparent` property, else the request's
            // field (a message relayed before properties existed), else derived from the saga
            // id (saga_proto::trace).
            let decoded = pb::CompensationRequest::decode(delivery.body.as_slice());
            let request = decoded.as_ref().ok();
            let saga_id = request
                .and_then(|r| r.key.as_ref().map(|k| k.saga_id.clone()))
                .or_else(|| parse_transport_key(&delivery.key).map(|k| k.saga_id))
                .unwrap_or_default();
            let context = topics::delivery_trace(&delivery)
                .or_else(|| request.and_then(|r| saga_proto::trace::TraceContext::parse(&r.traceparent)));
            let span = saga_proto::trace::saga_span("compensation", &saga_id, context);
            let outcome =
                tracing::Instrument::instrument(this.handle_delivery(delivery, decoded), span).await;
            let outcome_name = match outcome {
                Outcome::Consumed => "consumed",
                Outcome::RetryLater => "retry_later",
            };
            metrics::counter!(CONSUMER_DELIVERIES_TOTAL, "role" => role, "outcome" => outcome_name)
                .increment(1);
            outcome
        })
    }
}

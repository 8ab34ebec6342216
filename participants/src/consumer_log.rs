//! The consumer log: where each compensation message stands, as events of its own stream
//! `consumer/<group>/<tag>/<saga_id>:<step>` (or `poison/...` for a message that is not a valid
//! compensation), and the parked list those events keep.
//!
//! Status, as in the classic design: processing -> success | fail (with the number of tries);
//! parked after `consumer::TRIES_MAX` tries, never dropped. [`fold`] reads a stream's status;
//! the projector keeps the parked list `parked/<stream>@<digest>` -> the parking event.

use saga_proto::v1 as pb;
use saga_storage::{EventView, ProjectError, ProjectionTx};

use crate::keys;
use crate::record::ParticipantEvent;

/// Most bytes of a parked message's body kept in its parking event.
pub const PARKED_BODY_LEN_MAX: usize = 64 * 1024;

/// The digest that names a parked body (xxh3-64).
pub fn body_digest(body: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(body)
}

/// The consumer log's events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumerEvent {
    /// A try started (`ConsumeStarted`).
    Started { attempt: u32 },
    /// The compensation was done; `outcome` is the acknowledgement's outcome name.
    Succeeded { outcome: String },
    /// A try failed; the message will be delivered again.
    Failed { tries: u32, error: String },
    /// Parked, the whole body kept (`MessageParked`, written by older versions only).
    ParkedWholeBody {
        group: String,
        tag: String,
        key: String,
        tries: u32,
        error: String,
        body: Vec<u8>,
        parked_at_unix_ms: i64,
    },
    /// The whole-body entry was requeued (`ParkedRequeued`, older versions only).
    RequeuedWholeBody,
    /// Parked (`MessageParkedDigest`): the body is kept up to [`PARKED_BODY_LEN_MAX`] bytes
    /// with its length and digest, so a body too large for the log parks all the same, and the
    /// parked list is keyed by the digest, so two messages parked under one key both stay
    /// listed.
    Parked {
        group: String,
        tag: String,
        key: String,
        tries: u32,
        error: String,
        body_prefix: Vec<u8>,
        body_len: u64,
        body_digest: u64,
        parked_at_unix_ms: i64,
    },
    /// The parked message with this digest was published again (RequeueParked, or a new
    /// delivery of its key after a RetrySaga): its tries start again.
    Requeued { body_digest: u64 },
    /// A duplicate delivery of a compensation that had succeeded: its acknowledgement was
    /// written to the outbox again in the same append (the first may have been lost).
    DuplicateAcknowledged { outcome: String },
}

impl ConsumerEvent {
    pub fn name(&self) -> &'static str {
        match self {
            ConsumerEvent::Started { .. } => "ConsumeStarted",
            ConsumerEvent::Succeeded { .. } => "ConsumeSucceeded",
            ConsumerEvent::Failed { .. } => "ConsumeFailed",
            ConsumerEvent::ParkedWholeBody { .. } => "MessageParked",
            ConsumerEvent::RequeuedWholeBody => "ParkedRequeued",
            ConsumerEvent::Parked { .. } => "MessageParkedDigest",
            ConsumerEvent::Requeued { .. } => "ParkedMessageRequeued",
            ConsumerEvent::DuplicateAcknowledged { .. } => "DuplicateAcknowledged",
        }
    }
}

/// Where a message stands in the consumer log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumeStatus {
    New,
    /// `tries` started, the last one not finished.
    Processing {
        tries: u32,
    },
    Failed {
        tries: u32,
    },
    Succeeded {
        outcome: String,
    },
    /// `digest`: of the parked body (`None` for entries of older logs).
    Parked {
        tries: u32,
        digest: Option<u64>,
    },
}

/// A consumer-log stream that holds another family's event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a consumer log holds a {0} event")]
pub struct NotAConsumerEvent(pub &'static str);

/// Folds a consumer-log stream.
pub fn fold(events: impl IntoIterator<Item = ParticipantEvent>) -> Result<ConsumeStatus, NotAConsumerEvent> {
    let mut status = ConsumeStatus::New;
    for event in events {
        let ParticipantEvent::Consumer(event) = event else {
            return Err(NotAConsumerEvent(event.name()));
        };
        status = apply(status, event);
    }
    Ok(status)
}

fn apply(status: ConsumeStatus, event: ConsumerEvent) -> ConsumeStatus {
    let tries = match status {
        ConsumeStatus::Processing { tries }
        | ConsumeStatus::Failed { tries }
        | ConsumeStatus::Parked { tries, .. } => tries,
        ConsumeStatus::New | ConsumeStatus::Succeeded { .. } => 0,
    };
    match event {
        ConsumerEvent::Started { .. } => ConsumeStatus::Processing { tries: tries + 1 },
        ConsumerEvent::Succeeded { outcome } => ConsumeStatus::Succeeded { outcome },
        ConsumerEvent::Failed { tries, .. } => ConsumeStatus::Failed { tries },
        ConsumerEvent::ParkedWholeBody { tries, .. } => ConsumeStatus::Parked { tries, digest: None },
        ConsumerEvent::Parked {
            tries, body_digest, ..
        } => ConsumeStatus::Parked {
            tries,
            digest: Some(body_digest),
        },
        // A requeue recorded after the republished message already succeeded (RequeueParked
        // publishes first) changes nothing.
        ConsumerEvent::RequeuedWholeBody | ConsumerEvent::Requeued { .. } => match status {
            ConsumeStatus::Parked { .. } => ConsumeStatus::Failed { tries: 0 },
            other => other,
        },
        ConsumerEvent::DuplicateAcknowledged { .. } => status,
    }
}

/// Keeps the parked list: key = the parked-list key, value = the parking event as stored.
pub(crate) fn project(
    event: &ConsumerEvent,
    view: &EventView<'_>,
    tx: &mut ProjectionTx<'_>,
) -> Result<(), ProjectError> {
    match event {
        ConsumerEvent::ParkedWholeBody { .. } => {
            tx.insert(keys::parked_whole_body(view.stream), view.payload.to_vec())
        }
        ConsumerEvent::RequeuedWholeBody => tx.remove(keys::parked_whole_body(view.stream)),
        ConsumerEvent::Parked { body_digest, .. } => {
            tx.insert(keys::parked(view.stream, *body_digest), view.payload.to_vec())
        }
        ConsumerEvent::Requeued { body_digest } => tx.remove(keys::parked(view.stream, *body_digest)),
        ConsumerEvent::Started { .. }
        | ConsumerEvent::Succeeded { .. }
        | ConsumerEvent::Failed { .. }
        | ConsumerEvent::DuplicateAcknowledged { .. } => Ok(()),
    }
}

/// A parked-list entry that is not a parking event.
#[derive(Debug, thiserror::Error)]
pub enum ParkedEntryError {
    #[error("parked entry {log_key}: {error}")]
    Undecodable {
        log_key: String,
        error: saga_storage::codec::CodecError,
    },
    #[error("parked entry {log_key} holds a {event} event")]
    NotParked { log_key: String, event: &'static str },
}

/// A parked-list entry (the stored parking event) as the API shows it.
pub fn parked_message(log_key: String, stored: &[u8]) -> Result<pb::ParkedMessage, ParkedEntryError> {
    let event = match saga_storage::codec::decode::<ParticipantEvent>(stored) {
        Ok(event) => event,
        Err(error) => return Err(ParkedEntryError::Undecodable { log_key, error }),
    };
    let event = match event {
        // Entries of older logs kept the whole body: the same entry with a full prefix.
        ParticipantEvent::Consumer(ConsumerEvent::ParkedWholeBody {
            group,
            tag,
            key,
            tries,
            error,
            body,
            parked_at_unix_ms,
        }) => ParticipantEvent::Consumer(ConsumerEvent::Parked {
            group,
            tag,
            key,
            tries,
            error,
            body_len: body.len() as u64,
            body_digest: body_digest(&body),
            body_prefix: body,
            parked_at_unix_ms,
        }),
        other => other,
    };
    match event {
        ParticipantEvent::Consumer(ConsumerEvent::Parked {
            group,
            tag,
            key,
            tries,
            error,
            body_prefix,
            body_len,
            body_digest,
            parked_at_unix_ms,
        }) => Ok(pb::ParkedMessage {
            log_key,
            group,
            tag,
            key,
            tries,
            last_error: error,
            parked_at_unix_ms,
            body: body_prefix,
            body_len,
            body_digest,
        }),
        other => Err(ParkedEntryError::NotParked {
            log_key,
            event: other.name(),
        }),
    }
}

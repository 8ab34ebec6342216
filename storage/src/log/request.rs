//! What an append asks for: the stream, the expected version, the events and outbox
//! messages, and its validation before it reaches the writer; and what it answers.

use super::*;

/// Most events in one append request (each request of an `append_all` has its own bound).
pub const EVENTS_PER_APPEND_MAX: usize = 1024;
/// Most streams in one atomic append across streams ([`EventLog::append_all`]).
pub const STREAMS_PER_APPEND_MAX: usize = 16;

/// What the writer expects a stream's version to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Append whatever the version is.
    Any,
    /// The stream must not exist yet (version 0).
    NoStream,
    /// The stream must be at exactly this version (`StreamVersion::NONE`: no stream).
    Exact(StreamVersion),
}

impl ExpectedVersion {
    /// Exactly `version`, as a fold read it (`NONE`: the stream must not exist yet).
    pub fn at(version: StreamVersion) -> ExpectedVersion {
        if version == StreamVersion::NONE {
            ExpectedVersion::NoStream
        } else {
            ExpectedVersion::Exact(version)
        }
    }

    pub(super) fn admits(self, actual: u64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => actual == 0,
            ExpectedVersion::Exact(v) => actual == v.get(),
        }
    }
}

/// An event to append: its type and its payload, already encoded (see [`NewEvent::encode`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub event_type: String,
    pub payload: Vec<u8>,
}

impl NewEvent {
    pub fn new(event_type: impl Into<String>, payload: Vec<u8>) -> Self {
        NewEvent {
            event_type: event_type.into(),
            payload,
        }
    }

    /// Encodes `value` with the project's codec.
    pub fn encode<T: Serialize + ?Sized>(
        event_type: impl Into<String>,
        value: &T,
    ) -> Result<Self, StorageError> {
        Ok(NewEvent::new(event_type, codec::encode(value)?))
    }
}

/// One atomic append: events to one stream, and outbox messages decided by them.
#[derive(Debug, Clone)]
pub struct AppendRequest {
    pub stream: String,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
    pub outbox: Vec<OutboxMessage>,
}

impl AppendRequest {
    pub fn new(stream: impl Into<String>, expected: ExpectedVersion) -> Self {
        AppendRequest {
            stream: stream.into(),
            expected,
            events: Vec::new(),
            outbox: Vec::new(),
        }
    }

    pub fn event(mut self, event: NewEvent) -> Self {
        self.events.push(event);
        self
    }

    pub fn events(mut self, events: impl IntoIterator<Item = NewEvent>) -> Self {
        self.events.extend(events);
        self
    }

    pub fn outbox(mut self, message: OutboxMessage) -> Self {
        self.outbox.push(message);
        self
    }

    pub(super) fn validate(&self) -> Result<(), StorageError> {
        if self.events.is_empty() || self.events.len() > EVENTS_PER_APPEND_MAX {
            return Err(StorageError::Invalid {
                field: "events",
                reason: format!("must hold 1..={EVENTS_PER_APPEND_MAX} events"),
            });
        }
        if self.outbox.len() > OUTBOX_PER_APPEND_MAX {
            return Err(StorageError::Invalid {
                field: "outbox",
                reason: format!("at most {OUTBOX_PER_APPEND_MAX} messages"),
            });
        }
        for event in &self.events {
            record_format::validate_names(&self.stream, &event.event_type)?;
            if event.payload.len() > record_format::PAYLOAD_LEN_MAX {
                return Err(StorageError::Invalid {
                    field: "payload",
                    reason: format!("at most {} bytes", record_format::PAYLOAD_LEN_MAX),
                });
            }
        }
        Ok(())
    }
}

/// Checks the appends of one [`EventLog::append_all`]: 1..=[`STREAMS_PER_APPEND_MAX`] of them,
/// each valid, each to another stream (a stream's appends in one call are one request).
pub(super) fn validate_all(requests: &[AppendRequest]) -> Result<(), StorageError> {
    if requests.is_empty() || requests.len() > STREAMS_PER_APPEND_MAX {
        return Err(StorageError::Invalid {
            field: "requests",
            reason: format!("must hold 1..={STREAMS_PER_APPEND_MAX} appends"),
        });
    }
    for (i, request) in requests.iter().enumerate() {
        request.validate()?;
        if requests[..i].iter().any(|r| r.stream == request.stream) {
            return Err(StorageError::Invalid {
                field: "requests",
                reason: format!("stream {:?} appears twice", request.stream),
            });
        }
    }
    Ok(())
}

/// Where an append landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The stream's version after the append (the version of its last event).
    pub stream_version: StreamVersion,
    /// Global positions of the append's first and last events.
    pub first_position: Position,
    pub last_position: Position,
}

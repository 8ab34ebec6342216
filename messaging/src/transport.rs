//! The compensation transport: one trait, two providers (RocketMQ for production, an embedded
//! sled queue for the all-in-one demo), one conformance suite (`tests/conformance.rs`) that
//! both pass.
//!
//! Contract, for every provider:
//! - `publish` returns once the messages are durable in the transport (the broker stored them,
//!   or the embedded queue flushed them). A publish of several messages is one request.
//! - Each subscribed consumer group receives every message of its topic whose tag it asked
//!   for (fan-out by group), at least once, also across restarts of the consumer.
//! - A message the handler answers with `RetryLater` is delivered again later with a higher
//!   `attempt`, until the handler consumes it: nothing is dropped by the transport.
//! - Duplicates are possible (a crash between handling and acknowledging): handlers must be
//!   idempotent by key. A redelivery carries the same key, tag, body and properties.
//! - Properties (name, value) travel with the message: RocketMQ carries them as user properties
//!   of the message, the embedded queue stores them beside the body. We send one, the saga's
//!   W3C trace context ([`crate::topics::message_properties`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::error::MessagingError;

/// A boxed, sendable future: keeps the traits dyn-compatible (`Arc<dyn Transport>`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub topic: String,
    /// Consumers filter on it (the participant role for compensations).
    pub tag: String,
    /// Consumers deduplicate on it (`<saga_id>:<step>` for compensations).
    pub key: String,
    pub body: Vec<u8>,
    /// User properties, (name, value); names must not be RocketMQ's own (`KEYS`, `TAGS`, ...).
    pub properties: Vec<(String, String)>,
}

/// A delivered message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub topic: String,
    pub tag: String,
    pub key: String,
    pub body: Vec<u8>,
    /// The user properties the message was published with (in no particular order).
    pub properties: Vec<(String, String)>,
    /// 0 on the first delivery; how many times it was delivered before otherwise.
    pub attempt: u32,
}

impl Delivery {
    /// The value of user property `name`, if the message has it.
    pub fn property(&self, name: &str) -> Option<&str> {
        self.properties
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What the handler did with a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done (applied, found already applied, or parked by the consumer): forget it.
    Consumed,
    /// Not done: deliver it again later.
    RetryLater,
}

/// Handles deliveries of one subscription. Must be idempotent by key.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, delivery: Delivery) -> BoxFuture<'static, Outcome>;
}

/// What to subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionSpec {
    /// The consumer group: every group gets every message; instances of a group share them.
    pub group: String,
    pub topic: String,
    /// Tags to receive; empty means every tag.
    pub tags: Vec<String>,
}

impl SubscriptionSpec {
    pub(crate) fn accepts(&self, tag: &str) -> bool {
        self.tags.is_empty() || self.tags.iter().any(|t| t == tag)
    }
}

/// A running subscription.
pub trait Consumer: Send {
    /// Stops delivering. Deliveries handled before return are acknowledged; one in progress
    /// may be delivered again after a restart.
    fn shutdown(self: Box<Self>) -> BoxFuture<'static, ()>;
}

/// A compensation transport provider.
pub trait Transport: Send + Sync + 'static {
    /// Publishes `messages`, returning once they are durable in the transport.
    fn publish<'a>(&'a self, messages: &'a [Outgoing]) -> BoxFuture<'a, Result<(), MessagingError>>;

    /// Starts delivering to `handler`.
    fn subscribe(
        &self,
        spec: SubscriptionSpec,
        handler: Arc<dyn Handler>,
    ) -> BoxFuture<'_, Result<Box<dyn Consumer>, MessagingError>>;
}

//! `saga-messaging`: the compensation transport between the orchestrator and the participants.
//!
//! - [`transport`]: the compensation transport trait ([`transport::Transport`]): publish
//!   durably, deliver at least once per consumer group, redeliver until consumed.
//! - [`embedded`]: its in-process provider, a durable queue on a saga-storage log (the
//!   all-in-one demo's default, no broker needed).
//! - [`rocketmq`]: the production provider ([`rocketmq::RocketMqTransport`]) and its wiring on rocketmq-client-rust 1.0.0: one sized
//!   client runtime per process ([`rocketmq::RocketMqClient`]), producers, clustering push
//!   consumers with a [`rocketmq::MessageHandler`], and topic creation that waits for routes.
//!   This is the only crate that links the RocketMQ client (heavy to build: keep it stable).
//! - [`relay`]: the outbox relay (publish a log's outbox, delete after the transport stored
//!   it), used by the orchestrator for compensations and by participants for acknowledgements.
//! - [`topics`]: topic and consumer-group names shared by every process and by scripts/dev-env.
//! - [`error`]: the error type, [`MessagingError`].
//!
//! Both providers pass one conformance suite (`tests/conformance.rs`).

pub mod embedded;
pub mod error;
pub mod relay;
pub mod rocketmq;
pub mod topics;
pub mod transport;

pub use error::MessagingError;

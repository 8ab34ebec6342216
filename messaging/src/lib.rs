//! `saga-messaging`: the compensation transport between the orchestrator and the participants.
//!
//! - [`rocketmq`]: the production transport's wiring on rocketmq-client-rust 1.0.0: one sized
//!   client runtime per process ([`rocketmq::RocketMqClient`]), producers, clustering push
//!   consumers with a [`rocketmq::MessageHandler`], and topic creation that waits for routes.
//!   This is the only crate that links the RocketMQ client (heavy to build: keep it stable).
//! - [`topics`]: topic and consumer-group names shared by every process and by scripts/dev-env.
//! - [`error`]: the error type, [`MessagingError`].
//!
//! Still to come (participants issue): the transport trait, its embedded sled-backed
//! implementation, and one conformance suite both implementations pass.

pub mod error;
pub mod rocketmq;
pub mod topics;

pub use error::MessagingError;

//! The gRPC contract of the saga orchestrator, package `saga.v1`.
//!
//! - `saga/v1/orchestrator.proto`: the [`v1::orchestrator_server::Orchestrator`] service
//!   clients use to start, inspect, steer and replay sagas.
//! - `saga/v1/participants.proto`: the order, stock, coupon and balance services the
//!   orchestrator calls, and `ConsumerAdmin` for each participant's compensation consumer.
//! - `saga/v1/common.proto`: the step idempotency key, business refusals, and the bodies of
//!   compensation and acknowledgement messages on the compensation transport.
//!
//! The `.proto` files are the API's documentation; this crate only compiles them (tonic +
//! prost, with a vendored protoc) and exposes [`FILE_DESCRIPTOR_SET`] for server reflection.

/// Generated messages, clients and servers of `saga.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("saga.v1");
}

/// The encoded `FileDescriptorSet` of `saga.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("saga_v1_descriptor");

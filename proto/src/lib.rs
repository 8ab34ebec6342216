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

/// Largest request a server of ours decodes, in bytes. Above tonic's 4 MiB default so that an
/// oversized field (a 10 MB id, say) reaches validation and is answered INVALID_ARGUMENT naming
/// the field, as every other bad input is; a request past this bound is refused by tonic
/// (OUT_OF_RANGE) before it is decoded. Every field we accept is far smaller (ids are at most
/// 64 bytes, item lists at most a few hundred entries), so this bounds memory per request only.
pub const REQUEST_LEN_MAX: usize = 16 * 1024 * 1024;

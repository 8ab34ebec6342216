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

/// The one rule for ids (saga, step, user, product, coupon, order ids): they travel in the
/// participants' stream names (`step/<saga>/<step>`), projection keys and message keys, so
/// they are 1..=[`ids::ID_LEN_MAX`] bytes of printable ASCII without '/'. Request ids are
/// only stored by the orchestrator and may be longer ([`ids::REQUEST_ID_LEN_MAX`]).
pub mod ids {
    /// Longest id, in bytes.
    pub const ID_LEN_MAX: usize = 64;
    /// Longest client request id (StartOrder), in bytes.
    pub const REQUEST_ID_LEN_MAX: usize = 128;

    /// Why a value is not an id.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum IdError {
        Empty,
        TooLong { len_max: usize },
        NotPrintable,
    }

    impl std::fmt::Display for IdError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                IdError::Empty => f.write_str("must not be empty"),
                IdError::TooLong { len_max } => write!(f, "at most {len_max} bytes"),
                IdError::NotPrintable => f.write_str("must be printable ASCII without spaces or '/'"),
            }
        }
    }

    impl std::error::Error for IdError {}

    /// Checks an id of at most [`ID_LEN_MAX`] bytes.
    pub fn check(value: &str) -> Result<(), IdError> {
        check_len(value, ID_LEN_MAX)
    }

    /// Checks an id of at most `len_max` bytes.
    pub fn check_len(value: &str, len_max: usize) -> Result<(), IdError> {
        if value.is_empty() {
            return Err(IdError::Empty);
        }
        if value.len() > len_max {
            return Err(IdError::TooLong { len_max });
        }
        if !value.bytes().all(|b| b.is_ascii_graphic() && b != b'/') {
            return Err(IdError::NotPrintable);
        }
        Ok(())
    }
}

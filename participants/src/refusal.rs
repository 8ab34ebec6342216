//! Business refusals, typed from the guard that decides them to the gRPC status that reports
//! them: a role's `decide` returns a [`Refused`], the log carries it through the append
//! (`saga_storage::StorageError::Refused`, read back with `refusal::<Refused>()`), the barrier
//! records it, and the services answer FAILED_PRECONDITION with a `saga.v1.BusinessRefusal`
//! (and a `google.rpc.ErrorInfo`) in the standard rich status details. No text is parsed on the way.

use serde::{Deserialize, Serialize};

/// The business reasons of `saga.v1.RefusalReason`, as stored (in `ActionRefused`: append
/// only at the end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    OutOfStock,
    CouponNotFree,
    InsufficientBalance,
    UnknownEntity,
    AlreadyCompensated,
    InvalidState,
}

impl Refusal {
    /// The reason's short name (`OUT_OF_STOCK`), as status messages and `ErrorInfo` spell it.
    pub fn code(self) -> &'static str {
        saga_proto::status::reason_name(self.to_proto())
    }

    pub fn to_proto(self) -> saga_proto::v1::RefusalReason {
        use saga_proto::v1::RefusalReason as R;
        match self {
            Refusal::OutOfStock => R::OutOfStock,
            Refusal::CouponNotFree => R::CouponNotFree,
            Refusal::InsufficientBalance => R::InsufficientBalance,
            Refusal::UnknownEntity => R::UnknownEntity,
            Refusal::AlreadyCompensated => R::AlreadyCompensated,
            Refusal::InvalidState => R::InvalidState,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

/// A refusal with what the caller needs to know about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct Refused {
    pub reason: Refusal,
    pub detail: String,
}

impl Refused {
    pub fn new(reason: Refusal, detail: impl std::fmt::Display) -> Refused {
        Refused {
            reason,
            detail: detail.to_string(),
        }
    }

    /// FAILED_PRECONDITION with a `google.rpc.ErrorInfo` and a `saga.v1.BusinessRefusal` in
    /// the details (`saga_proto::status::refused`).
    pub fn to_status(&self) -> tonic::Status {
        saga_proto::status::refused(self.reason.to_proto(), &self.detail)
    }
}

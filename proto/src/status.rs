//! Error statuses in the standard rich error model, once for every server of ours.
//!
//! The `grpc-status-details-bin` trailer holds a `google.rpc.Status` (same code and message as
//! the status itself) whose `details` are `Any`-packed messages, which is what grpcio-status's
//! `rpc_status.from_call`, grpc-go's `status.Details()` and tonic-types' `ErrorDetails` read:
//! - invalid input (INVALID_ARGUMENT): a `google.rpc.BadRequest` with one field violation
//!   naming the field, and the message `<field>: <reason>`;
//! - a business refusal (FAILED_PRECONDITION): a `google.rpc.ErrorInfo` (reason = the
//!   `saga.v1.RefusalReason` name, domain [`ERROR_DOMAIN`], metadata `detail`) for generic
//!   clients, and our `saga.v1.BusinessRefusal` for typed ones ([`refusal_of`] reads it back).

use std::collections::HashMap;

use prost::Message as _;
use tonic::{Code, Status};

use crate::v1;

/// The `ErrorInfo.domain` of our refusals.
pub const ERROR_DOMAIN: &str = "saga.v1";

/// `Any` type URLs of the details we pack.
const BAD_REQUEST_URL: &str = "type.googleapis.com/google.rpc.BadRequest";
const ERROR_INFO_URL: &str = "type.googleapis.com/google.rpc.ErrorInfo";
const BUSINESS_REFUSAL_URL: &str = "type.googleapis.com/saga.v1.BusinessRefusal";

fn any(type_url: &str, message: &impl prost::Message) -> prost_types::Any {
    prost_types::Any {
        type_url: type_url.to_owned(),
        value: message.encode_to_vec(),
    }
}

fn with_details(code: Code, message: String, details: Vec<prost_types::Any>) -> Status {
    let rich = tonic_types::pb::Status {
        code: code as i32,
        message: message.clone(),
        details,
    };
    Status::with_details(code, message, rich.encode_to_vec().into())
}

/// INVALID_ARGUMENT naming `field`, with a `BadRequest` field violation.
pub fn invalid_argument(field: &str, reason: impl std::fmt::Display) -> Status {
    let reason = reason.to_string();
    let bad_request = tonic_types::pb::BadRequest {
        field_violations: vec![tonic_types::pb::bad_request::FieldViolation {
            field: field.to_owned(),
            description: reason.clone(),
            ..Default::default()
        }],
    };
    with_details(
        Code::InvalidArgument,
        format!("{field}: {reason}"),
        vec![any(BAD_REQUEST_URL, &bad_request)],
    )
}

/// A refusal reason's short name, as `ErrorInfo.reason` and status messages spell it
/// (`OUT_OF_STOCK` for `REFUSAL_REASON_OUT_OF_STOCK`).
pub fn reason_name(reason: v1::RefusalReason) -> &'static str {
    let name = reason.as_str_name();
    name.strip_prefix("REFUSAL_REASON_").unwrap_or(name)
}

/// FAILED_PRECONDITION for a business refusal: message `<REASON>: <detail>`, an `ErrorInfo`
/// and the typed `BusinessRefusal`.
pub fn refused(reason: v1::RefusalReason, detail: &str) -> Status {
    let error_info = tonic_types::pb::ErrorInfo {
        reason: reason_name(reason).to_owned(),
        domain: ERROR_DOMAIN.to_owned(),
        metadata: HashMap::from([("detail".to_owned(), detail.to_owned())]),
    };
    let refusal = v1::BusinessRefusal {
        reason: reason as i32,
        detail: detail.to_owned(),
    };
    with_details(
        Code::FailedPrecondition,
        format!("{}: {detail}", reason_name(reason)),
        vec![
            any(ERROR_INFO_URL, &error_info),
            any(BUSINESS_REFUSAL_URL, &refusal),
        ],
    )
}

/// The `google.rpc.Status` a status carries in its details, if it carries one.
pub fn rich(status: &Status) -> Option<tonic_types::pb::Status> {
    if status.details().is_empty() {
        return None;
    }
    tonic_types::pb::Status::decode(status.details()).ok()
}

/// The `BusinessRefusal` of a refusal made by [`refused`]; `None` for any other status.
pub fn refusal_of(status: &Status) -> Option<v1::BusinessRefusal> {
    rich(status)?
        .details
        .into_iter()
        .find(|detail| detail.type_url == BUSINESS_REFUSAL_URL)
        .and_then(|detail| v1::BusinessRefusal::decode(detail.value.as_slice()).ok())
}

/// The field a [`invalid_argument`] status names; `None` for any other status.
pub fn invalid_field(status: &Status) -> Option<String> {
    rich(status)?
        .details
        .into_iter()
        .find(|detail| detail.type_url == BAD_REQUEST_URL)
        .and_then(|detail| tonic_types::pb::BadRequest::decode(detail.value.as_slice()).ok())
        .and_then(|bad| bad.field_violations.into_iter().next())
        .map(|violation| violation.field)
}

#[cfg(test)]
mod tests {
    use tonic_types::StatusExt as _;

    use super::*;

    #[test]
    fn an_invalid_argument_is_read_by_tonic_types_as_a_bad_request_naming_the_field() {
        let status = invalid_argument("items[0].quantity", "must be positive");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "items[0].quantity: must be positive");
        let details = status.get_error_details();
        let violations = &details.bad_request().expect("a BadRequest").field_violations;
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].field, "items[0].quantity");
        assert_eq!(violations[0].description, "must be positive");
        assert_eq!(invalid_field(&status).as_deref(), Some("items[0].quantity"));
        let rich = rich(&status).expect("a google.rpc.Status");
        assert_eq!(
            (rich.code, rich.message.as_str()),
            (Code::InvalidArgument as i32, status.message())
        );
    }

    #[test]
    fn a_refusal_carries_an_error_info_and_the_typed_refusal() {
        let status = refused(v1::RefusalReason::OutOfStock, "p-1: 2 wanted, 1 available");
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(status.message(), "OUT_OF_STOCK: p-1: 2 wanted, 1 available");
        let info = status.get_details_error_info().expect("an ErrorInfo");
        assert_eq!(info.reason, "OUT_OF_STOCK");
        assert_eq!(info.domain, ERROR_DOMAIN);
        assert_eq!(info.metadata["detail"], "p-1: 2 wanted, 1 available");
        let refusal = refusal_of(&status).expect("a BusinessRefusal");
        assert_eq!(refusal.reason, v1::RefusalReason::OutOfStock as i32);
        assert_eq!(refusal.detail, "p-1: 2 wanted, 1 available");
        assert_eq!(invalid_field(&status), None);
    }

    #[test]
    fn statuses_without_rich_details_have_no_refusal() {
        assert_eq!(refusal_of(&Status::failed_precondition("x")), None);
        assert_eq!(
            refusal_of(&Status::with_details(
                Code::FailedPrecondition,
                "x",
                vec![1, 2, 3].into()
            )),
            None
        );
    }
}

//! The order saga: its definition (data for the engine) and the invoker that turns its steps
//! into gRPC calls to the participants.
//!
//! create_order -> reserve_stock -> lock_coupon (skipped without a coupon) -> deduct_balance
//! -> confirm_order. Confirming is the one step without a compensation: once balance is
//! deducted the saga can only go forward, so a confirmation that does not answer is retried,
//! and past its attempts the saga is STUCK for an operator rather than undone.

use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use saga_messaging::transport::BoxFuture;
use saga_proto::v1 as pb;
use tonic::transport::{Channel, Endpoint};

use crate::definition::{RetryPolicy, SagaDefinition, StepDef};
use crate::engine::{StepError, StepInvoker};

/// The definition's name, stored in every order saga's `SagaStarted`.
pub const DEFINITION: &str = "order";
pub const CREATE_ORDER: &str = "create_order";
pub const RESERVE_STOCK: &str = "reserve_stock";
pub const LOCK_COUPON: &str = "lock_coupon";
pub const DEDUCT_BALANCE: &str = "deduct_balance";
pub const CONFIRM_ORDER: &str = "confirm_order";

/// Timing of the order saga's steps.
#[derive(Debug, Clone)]
pub struct OrderTiming {
    /// Deadline of one participant call.
    pub step_deadline_ms: u64,
    /// Attempts of one step against transient failures.
    pub attempts_max: u32,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
}

impl Default for OrderTiming {
    fn default() -> Self {
        // 8 attempts with 50 ms doubling to 2 s: about 6 s for a participant to come back.
        OrderTiming {
            step_deadline_ms: 2_000,
            attempts_max: 8,
            backoff_base_ms: 50,
            backoff_max_ms: 2_000,
        }
    }
}

/// The order saga as data.
pub fn definition(timing: &OrderTiming) -> SagaDefinition {
    let step = |name: &str, participant: &str, action: &str, compensable: bool| StepDef {
        name: name.into(),
        participant: participant.into(),
        action: action.into(),
        compensable,
        deadline_ms: timing.step_deadline_ms,
        retry: RetryPolicy {
            // The step after the pivot gets more patience: it cannot be undone.
            attempts_max: if compensable {
                timing.attempts_max
            } else {
                timing.attempts_max * 4
            },
            backoff_base_ms: timing.backoff_base_ms,
            backoff_max_ms: timing.backoff_max_ms,
        },
    };
    SagaDefinition {
        name: DEFINITION.into(),
        id_prefix: "ord".into(),
        steps: vec![
            step(CREATE_ORDER, "order", "order.create", true),
            step(RESERVE_STOCK, "stock", "stock.reserve", true),
            step(LOCK_COUPON, "coupon", "coupon.lock", true),
            step(DEDUCT_BALANCE, "balance", "balance.deduct", true),
            step(CONFIRM_ORDER, "order", "order.confirm", false),
        ],
    }
}

/// The steps that do not apply to `order`.
pub fn skipped_steps(order: &pb::OrderDetails) -> Vec<String> {
    if order.coupon_id.is_empty() {
        vec![LOCK_COUPON.into()]
    } else {
        Vec::new()
    }
}

/// Where the participants listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParticipantAddrs {
    pub order: String,
    pub stock: String,
    pub coupon: String,
    pub balance: String,
}

impl ParticipantAddrs {
    /// Parses `order=HOST:PORT,stock=HOST:PORT,coupon=HOST:PORT,balance=HOST:PORT`.
    pub fn parse(text: &str) -> Result<ParticipantAddrs, String> {
        let mut found: [Option<String>; 4] = Default::default();
        const ROLES: [&str; 4] = ["order", "stock", "coupon", "balance"];
        for part in text.split(',').filter(|p| !p.is_empty()) {
            let (role, addr) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not ROLE=HOST:PORT"))?;
            let i = ROLES
                .iter()
                .position(|r| *r == role)
                .ok_or_else(|| format!("unknown role {role:?} (order, stock, coupon, balance)"))?;
            found[i] = Some(addr.to_owned());
        }
        let [Some(order), Some(stock), Some(coupon), Some(balance)] = found else {
            return Err("every role needs an address: order=..,stock=..,coupon=..,balance=..".into());
        };
        Ok(ParticipantAddrs {
            order,
            stock,
            coupon,
            balance,
        })
    }
}

/// A lazily connecting channel: the orchestrator starts before its participants, and a
/// participant that restarts is reconnected to by the next call.
pub fn lazy_channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy())
}

/// Calls the participants for the order saga's steps.
pub struct OrderInvoker {
    order: pb::order_service_client::OrderServiceClient<Channel>,
    stock: pb::stock_service_client::StockServiceClient<Channel>,
    coupon: pb::coupon_service_client::CouponServiceClient<Channel>,
    balance: pb::balance_service_client::BalanceServiceClient<Channel>,
}

impl OrderInvoker {
    pub fn new(addrs: &ParticipantAddrs) -> Result<Arc<OrderInvoker>, tonic::transport::Error> {
        Ok(Arc::new(OrderInvoker {
            order: pb::order_service_client::OrderServiceClient::new(lazy_channel(&addrs.order)?),
            stock: pb::stock_service_client::StockServiceClient::new(lazy_channel(&addrs.stock)?),
            coupon: pb::coupon_service_client::CouponServiceClient::new(lazy_channel(&addrs.coupon)?),
            balance: pb::balance_service_client::BalanceServiceClient::new(lazy_channel(&addrs.balance)?),
        }))
    }
}

/// How a participant's status maps onto the engine's failure kinds.
pub fn classify(status: &tonic::Status) -> StepError {
    use tonic::Code;
    let text = format!("{:?}: {}", status.code(), status.message());
    match status.code() {
        Code::FailedPrecondition => match pb::BusinessRefusal::decode(status.details()) {
            Ok(refusal) => StepError::Business(format!(
                "{}: {}",
                pb::RefusalReason::try_from(refusal.reason).map_or("UNKNOWN_REASON", |r| r.as_str_name()),
                refusal.detail
            )),
            Err(_) => StepError::Business(text),
        },
        // The participant will never accept this request: nothing took effect.
        Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::OutOfRange
        | Code::Unimplemented => StepError::Business(text),
        Code::DeadlineExceeded | Code::Cancelled => StepError::Unknown(text),
        // Unavailable, ResourceExhausted, Aborted, Internal, Unknown, ...: try again with the
        // same key; the barrier answers a retry of an applied call with its first outcome.
        _ => StepError::Transient(text),
    }
}

fn request<T>(message: T, deadline_ms: u64) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(Duration::from_millis(deadline_ms));
    request
}

impl StepInvoker for OrderInvoker {
    fn invoke(
        &self,
        saga_id: &str,
        step: &StepDef,
        payload: &[u8],
    ) -> BoxFuture<'static, Result<(), StepError>> {
        let order = match pb::OrderDetails::decode(payload) {
            Ok(order) => order,
            Err(e) => {
                let error = StepError::Business(format!("saga payload is not OrderDetails: {e}"));
                return Box::pin(async move { Err(error) });
            }
        };
        let key = Some(pb::StepKey {
            saga_id: saga_id.to_owned(),
            step: step.name.clone(),
        });
        let deadline_ms = step.deadline_ms;
        let order_id = saga_id.to_owned();
        let action = step.action.clone();
        let (mut orders, mut stock, mut coupon, mut balance) = (
            self.order.clone(),
            self.stock.clone(),
            self.coupon.clone(),
            self.balance.clone(),
        );
        Box::pin(async move {
            let result = match action.as_str() {
                "order.create" => orders
                    .create_order(request(
                        pb::CreateOrderRequest {
                            key,
                            order_id,
                            user_id: order.user_id,
                            items: order.items,
                            amount_minor: order.amount_minor,
                            coupon_id: order.coupon_id,
                        },
                        deadline_ms,
                    ))
                    .await
                    .map(drop),
                "stock.reserve" => stock
                    .reserve_stock(request(
                        pb::ReserveStockRequest {
                            key,
                            order_id,
                            items: order.items,
                        },
                        deadline_ms,
                    ))
                    .await
                    .map(drop),
                "coupon.lock" => coupon
                    .lock_coupon(request(
                        pb::LockCouponRequest {
                            key,
                            coupon_id: order.coupon_id,
                            user_id: order.user_id,
                            order_id,
                        },
                        deadline_ms,
                    ))
                    .await
                    .map(drop),
                "balance.deduct" => balance
                    .deduct_balance(request(
                        pb::DeductBalanceRequest {
                            key,
                            user_id: order.user_id,
                            amount_minor: order.amount_minor,
                            order_id,
                        },
                        deadline_ms,
                    ))
                    .await
                    .map(drop),
                "order.confirm" => orders
                    .confirm_order(request(pb::ConfirmOrderRequest { key, order_id }, deadline_ms))
                    .await
                    .map(drop),
                other => return Err(StepError::Business(format!("unknown action {other:?}"))),
            };
            result.map_err(|status| classify(&status))
        })
    }
}

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
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use saga_proto::Role;

use crate::definition::{InvalidDefinition, RetryPolicy, SagaDefinition, StepDef};
use crate::engine::{StepError, StepInvoker};
use crate::step_stream::{StepStream, Unserved};

/// The definition's name, stored in every order saga's `SagaStarted`.
pub const DEFINITION: &str = "order";

/// What each step of the order saga does: the invoker's whole vocabulary. A definition names
/// its steps' actions by [`OrderAction::name`]; [`OrderInvoker`] checks every one of them when
/// the definition is registered with the engine (`StepInvoker::check`), so a misspelt action
/// is refused at start, not at the first call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderAction {
    CreateOrder,
    ReserveStock,
    LockCoupon,
    DeductBalance,
    ConfirmOrder,
}

impl OrderAction {
    pub const ALL: [OrderAction; 5] = [
        OrderAction::CreateOrder,
        OrderAction::ReserveStock,
        OrderAction::LockCoupon,
        OrderAction::DeductBalance,
        OrderAction::ConfirmOrder,
    ];

    pub fn name(self) -> &'static str {
        match self {
            OrderAction::CreateOrder => "order.create",
            OrderAction::ReserveStock => "stock.reserve",
            OrderAction::LockCoupon => "coupon.lock",
            OrderAction::DeductBalance => "balance.deduct",
            OrderAction::ConfirmOrder => "order.confirm",
        }
    }

    /// The participant that performs it.
    pub fn role(self) -> Role {
        match self {
            OrderAction::CreateOrder | OrderAction::ConfirmOrder => Role::Order,
            OrderAction::ReserveStock => Role::Stock,
            OrderAction::LockCoupon => Role::Coupon,
            OrderAction::DeductBalance => Role::Balance,
        }
    }
}

impl std::fmt::Display for OrderAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for OrderAction {
    type Err = InvalidDefinition;

    fn from_str(name: &str) -> Result<OrderAction, InvalidDefinition> {
        OrderAction::ALL
            .into_iter()
            .find(|a| a.name() == name)
            .ok_or_else(|| InvalidDefinition(format!("unknown action {name:?}")))
    }
}
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
    let step = |name: &str, action: OrderAction, compensable: bool| StepDef {
        name: name.into(),
        participant: action.role().name().into(),
        action: action.name().into(),
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
            step(CREATE_ORDER, OrderAction::CreateOrder, true),
            step(RESERVE_STOCK, OrderAction::ReserveStock, true),
            step(LOCK_COUPON, OrderAction::LockCoupon, true),
            step(DEDUCT_BALANCE, OrderAction::DeductBalance, true),
            step(CONFIRM_ORDER, OrderAction::ConfirmOrder, false),
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

/// Why a participant list does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadParticipantList {
    #[error("{0:?} is not ROLE=HOST:PORT")]
    NotRoleAddr(String),
    #[error(transparent)]
    UnknownRole(#[from] saga_proto::UnknownRole),
    #[error("every role needs an address: order=..,stock=..,coupon=..,balance=..")]
    Missing,
}

impl ParticipantAddrs {
    /// Parses `order=HOST:PORT,stock=HOST:PORT,coupon=HOST:PORT,balance=HOST:PORT`.
    pub fn parse(text: &str) -> Result<ParticipantAddrs, BadParticipantList> {
        let mut found: [Option<String>; 4] = Default::default();
        for part in text.split(',').filter(|p| !p.is_empty()) {
            let (role, addr) = part
                .split_once('=')
                .ok_or_else(|| BadParticipantList::NotRoleAddr(part.to_owned()))?;
            let role: Role = role.parse()?;
            let i = Role::ALL.iter().position(|r| *r == role).expect("in ALL");
            found[i] = Some(addr.to_owned());
        }
        let [Some(order), Some(stock), Some(coupon), Some(balance)] = found else {
            return Err(BadParticipantList::Missing);
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
/// participant that restarts is reconnected to by the next call. With `tls`, over TLS (the
/// server's name is checked against the address's host).
pub fn lazy_channel(addr: &str, tls: Option<&ClientTlsConfig>) -> Result<Channel, tonic::transport::Error> {
    let mut endpoint = Endpoint::from_shared(format!("{}://{addr}", saga_proto::tls::scheme(tls)))?;
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.clone())?;
    }
    Ok(endpoint
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy())
}

/// Calls the participants for the order saga's steps: over each participant's step stream
/// ([`StepStream`]), or its unary RPCs when it does not serve one.
pub struct OrderInvoker {
    unary: UnaryClients,
    order_steps: Arc<StepStream>,
    stock_steps: Arc<StepStream>,
    coupon_steps: Arc<StepStream>,
    balance_steps: Arc<StepStream>,
}

#[derive(Clone)]
struct UnaryClients {
    order: pb::order_service_client::OrderServiceClient<Channel>,
    stock: pb::stock_service_client::StockServiceClient<Channel>,
    coupon: pb::coupon_service_client::CouponServiceClient<Channel>,
    balance: pb::balance_service_client::BalanceServiceClient<Channel>,
}

impl OrderInvoker {
    /// Channels to `addrs`, over TLS when `tls` is given (mutual TLS when it has an identity).
    pub fn new(
        addrs: &ParticipantAddrs,
        tls: Option<&ClientTlsConfig>,
    ) -> Result<Arc<OrderInvoker>, tonic::transport::Error> {
        let (order, stock, coupon, balance) = (
            lazy_channel(&addrs.order, tls)?,
            lazy_channel(&addrs.stock, tls)?,
            lazy_channel(&addrs.coupon, tls)?,
            lazy_channel(&addrs.balance, tls)?,
        );
        Ok(Arc::new(OrderInvoker {
            order_steps: Arc::new(StepStream::new(order.clone())),
            stock_steps: Arc::new(StepStream::new(stock.clone())),
            coupon_steps: Arc::new(StepStream::new(coupon.clone())),
            balance_steps: Arc::new(StepStream::new(balance.clone())),
            unary: UnaryClients {
                order: pb::order_service_client::OrderServiceClient::new(order),
                stock: pb::stock_service_client::StockServiceClient::new(stock),
                coupon: pb::coupon_service_client::CouponServiceClient::new(coupon),
                balance: pb::balance_service_client::BalanceServiceClient::new(balance),
            },
        }))
    }

    fn steps_of(&self, role: Role) -> &Arc<StepStream> {
        match role {
            Role::Order => &self.order_steps,
            Role::Stock => &self.stock_steps,
            Role::Coupon => &self.coupon_steps,
            Role::Balance => &self.balance_steps,
        }
    }
}

/// How a participant's status maps onto the engine's failure kinds. A missed deadline reads
/// the same whether tonic saw it first or the engine ([`crate::engine::deadline_missed`]).
pub fn classify(status: &tonic::Status, deadline_ms: u64) -> StepError {
    use tonic::Code;
    let text = format!("{:?}: {}", status.code(), status.message());
    match status.code() {
        Code::FailedPrecondition => match saga_proto::status::refusal_of(status) {
            Some(refusal) => StepError::Business(format!(
                "{}: {}",
                pb::RefusalReason::try_from(refusal.reason)
                    .map_or("UNKNOWN_REASON", saga_proto::status::reason_name),
                refusal.detail
            )),
            // Not the barrier's refusal: see below.
            None => StepError::Unknown(text),
        },
        // Only a refusal the participant's barrier recorded is a business failure: a repeated
        // call gets it again, so no life of the saga went past it, and the engine bounds what
        // it compensates by it (crash-safety invariant 1, in `state`). These codes may come
        // from elsewhere (a proxy's 404 read as UNIMPLEMENTED, a participant upgraded with
        // stricter validation, a wrong address) after an earlier attempt took effect: the
        // outcome is unknown (a compensable step is compensated, with every compensable step
        // after it; a confirmation is retried, then Stuck for an operator).
        Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::Cancelled => StepError::Unknown(text),
        Code::DeadlineExceeded => crate::engine::deadline_missed(deadline_ms),
        // Unavailable, ResourceExhausted, Aborted, Internal, Unknown, ...: try again with the
        // same key; the barrier answers a retry of an applied call with its first outcome.
        _ => StepError::Transient(text),
    }
}

/// What every step call carries besides its message: its deadline and the saga's trace
/// (`traceparent`, see `saga_proto::trace`).
struct CallMeta {
    deadline_ms: u64,
    trace: saga_proto::trace::TraceContext,
}

fn request<T>(message: T, call: &CallMeta) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(Duration::from_millis(call.deadline_ms));
    call.trace.inject(&mut request);
    request
}

impl StepInvoker for OrderInvoker {
    /// Every step's action is an [`OrderAction`], performed by the participant it names.
    fn check(&self, def: &SagaDefinition) -> Result<(), InvalidDefinition> {
        for step in &def.steps {
            let action: OrderAction = step.action.parse()?;
            if step.participant != action.role().name() {
                return Err(InvalidDefinition(format!(
                    "step {}: {action} is performed by {}, not {}",
                    step.name,
                    action.role(),
                    step.participant
                )));
            }
        }
        Ok(())
    }

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
        let call = CallMeta {
            deadline_ms,
            trace: saga_proto::trace::outgoing(saga_id),
        };
        let order_id = saga_id.to_owned();
        let action = match step.action.parse::<OrderAction>() {
            Ok(action) => action,
            // Not reached: `check` refused the definition at registration.
            Err(e) => return Box::pin(async move { Err(StepError::Business(e.to_string())) }),
        };
        use pb::step_call::Call;
        let step_call = match action {
            OrderAction::CreateOrder => Call::CreateOrder(pb::CreateOrderRequest {
                key,
                order_id,
                user_id: order.user_id,
                items: order.items,
                amount_minor: order.amount_minor,
                coupon_id: order.coupon_id,
            }),
            OrderAction::ReserveStock => Call::ReserveStock(pb::ReserveStockRequest {
                key,
                order_id,
                items: order.items,
            }),
            OrderAction::LockCoupon => Call::LockCoupon(pb::LockCouponRequest {
                key,
                coupon_id: order.coupon_id,
                user_id: order.user_id,
                order_id,
            }),
            OrderAction::DeductBalance => Call::DeductBalance(pb::DeductBalanceRequest {
                key,
                user_id: order.user_id,
                amount_minor: order.amount_minor,
                order_id,
            }),
            OrderAction::ConfirmOrder => Call::ConfirmOrder(pb::ConfirmOrderRequest { key, order_id }),
        };
        let steps = Arc::clone(self.steps_of(action.role()));
        let unary = self.unary.clone();
        Box::pin(async move {
            let timeout = Duration::from_millis(deadline_ms);
            let result = match steps.call(step_call, call.trace.traceparent(), timeout).await {
                Ok(result) => result,
                Err(Unserved(step_call)) => unary.call(step_call, &call).await,
            };
            result.map_err(|status| classify(&status, deadline_ms))
        })
    }
}

impl UnaryClients {
    /// `call` as the participant's unary RPC (a participant without a step stream).
    async fn call(mut self, call: pb::step_call::Call, meta: &CallMeta) -> Result<(), tonic::Status> {
        use pb::step_call::Call;
        match call {
            Call::CreateOrder(r) => self.order.create_order(request(r, meta)).await.map(drop),
            Call::ConfirmOrder(r) => self.order.confirm_order(request(r, meta)).await.map(drop),
            Call::ReserveStock(r) => self.stock.reserve_stock(request(r, meta)).await.map(drop),
            Call::LockCoupon(r) => self.coupon.lock_coupon(request(r, meta)).await.map(drop),
            Call::DeductBalance(r) => self.balance.deduct_balance(request(r, meta)).await.map(drop),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missed_deadline_reads_the_same_whether_tonic_or_the_engine_saw_it() {
        let tonic_saw = classify(&tonic::Status::deadline_exceeded("Timeout expired"), 2000);
        assert_eq!(tonic_saw, crate::engine::deadline_missed(2000));
        assert!(matches!(tonic_saw, StepError::Unknown(_)));
    }

    #[test]
    fn a_refusal_is_a_business_failure_with_its_reason_and_detail() {
        let refused = saga_proto::status::refused(pb::RefusalReason::OutOfStock, "p1: 2 wanted");
        assert_eq!(
            classify(&refused, 2000),
            StepError::Business("OUT_OF_STOCK: p1: 2 wanted".into())
        );
    }

    /// Only a refusal the participant's barrier recorded (FAILED_PRECONDITION with a
    /// `BusinessRefusal`) says "nothing took effect, now or in any earlier life": the engine
    /// bounds compensation by it (invariant 1) and compensates after a refused confirmation.
    /// Any other refusal-like code may come from something else than the barrier (a proxy's
    /// 404 read as UNIMPLEMENTED, a participant upgraded with stricter validation, a wrong
    /// address) after an earlier attempt took effect, so its outcome is unknown.
    #[test]
    fn only_a_recorded_refusal_is_a_business_failure() {
        use tonic::{Code, Status};
        for code in [
            Code::FailedPrecondition,
            Code::InvalidArgument,
            Code::NotFound,
            Code::AlreadyExists,
            Code::OutOfRange,
            Code::Unimplemented,
        ] {
            let classified = classify(&Status::new(code, "no refusal detail"), 2000);
            assert!(
                matches!(classified, StepError::Unknown(_)),
                "{code:?} without a recorded refusal: {classified:?}"
            );
        }
    }

    fn invoker() -> Arc<OrderInvoker> {
        let addr = "127.0.0.1:1".to_owned();
        OrderInvoker::new(
            &ParticipantAddrs {
                order: addr.clone(),
                stock: addr.clone(),
                coupon: addr.clone(),
                balance: addr,
            },
            None,
        )
        .expect("lazy channels")
    }

    #[tokio::test]
    async fn a_definition_with_an_unknown_or_misplaced_action_is_refused_at_registration() {
        let invoker = invoker();
        let mut def = definition(&OrderTiming::default());
        invoker.check(&def).expect("the order saga is valid");
        def.steps[1].action = "stock.reserv".into();
        let error = invoker.check(&def).expect_err("misspelt");
        assert!(error.0.contains("stock.reserv"), "{error}");
        def.steps[1].action = OrderAction::ReserveStock.name().into();
        def.steps[1].participant = Role::Balance.name().into();
        let error = invoker.check(&def).expect_err("wrong participant");
        assert!(error.0.contains("performed by stock"), "{error}");
    }
}

//! `StepCalls.Steps`: the role's forward step calls multiplexed on one long-lived stream
//! (participants.proto). Each call runs the role's unary handler, so validation, the barrier,
//! refusals and their status details are exactly those of the unary RPC; only the framing
//! differs: one message each way instead of an HTTP/2 request with headers and trailers.
//!
//! Calls on a stream run concurrently, each in a task of its own, and are answered in the
//! order they finish. When the caller's stream ends or breaks, the calls already running
//! finish (their appends complete, as a unary handler's would after its caller went away) and
//! their replies are dropped: the caller treats every unanswered call as an unknown outcome
//! and repeats it with the same key, which the barrier answers with its first outcome.

use std::pin::Pin;
use std::sync::Arc;

use saga_proto::v1 as pb;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::Role;

/// Replies waiting to be written to one stream.
const REPLIES_QUEUED_MAX: usize = 1024;
/// Calls of one stream running at once. A caller that sends more, or stops reading its
/// replies, is held back (the stream stops being read), so a stream's tasks and replies stay
/// bounded. The orchestrator has about as many calls in flight to one participant as sagas in
/// flight.
const CALLS_RUNNING_MAX: usize = 512;

/// The role's unary service, whose handlers the stream's calls run.
pub(crate) enum RoleService {
    Order(Arc<crate::order::OrderService>),
    Stock(Arc<crate::stock::StockService>),
    Coupon(Arc<crate::coupon::CouponService>),
    Balance(Arc<crate::balance::BalanceService>),
}

impl RoleService {
    fn role(&self) -> Role {
        match self {
            RoleService::Order(_) => Role::Order,
            RoleService::Stock(_) => Role::Stock,
            RoleService::Coupon(_) => Role::Coupon,
            RoleService::Balance(_) => Role::Balance,
        }
    }

    /// Runs `call` through the role's unary handler; another role's action is UNIMPLEMENTED,
    /// as its RPC would be on this server.
    async fn run(&self, call: pb::step_call::Call) -> Result<(), Status> {
        use pb::step_call::Call;
        match (self, call) {
            (RoleService::Order(s), Call::CreateOrder(r)) => {
                pb::order_service_server::OrderService::create_order(s.as_ref(), Request::new(r))
                    .await
                    .map(drop)
            }
            (RoleService::Order(s), Call::ConfirmOrder(r)) => {
                pb::order_service_server::OrderService::confirm_order(s.as_ref(), Request::new(r))
                    .await
                    .map(drop)
            }
            (RoleService::Stock(s), Call::ReserveStock(r)) => {
                pb::stock_service_server::StockService::reserve_stock(s.as_ref(), Request::new(r))
                    .await
                    .map(drop)
            }
            (RoleService::Coupon(s), Call::LockCoupon(r)) => {
                pb::coupon_service_server::CouponService::lock_coupon(s.as_ref(), Request::new(r))
                    .await
                    .map(drop)
            }
            (RoleService::Balance(s), Call::DeductBalance(r)) => {
                pb::balance_service_server::BalanceService::deduct_balance(s.as_ref(), Request::new(r))
                    .await
                    .map(drop)
            }
            (_, call) => Err(Status::unimplemented(format!(
                "the {} participant does not perform {}",
                self.role(),
                call_name(&call)
            ))),
        }
    }
}

/// The unary RPC's path of `call`, naming it in spans like a unary call's.
fn call_path(call: &pb::step_call::Call) -> &'static str {
    use pb::step_call::Call;
    match call {
        Call::CreateOrder(_) => "/saga.v1.OrderService/CreateOrder",
        Call::ConfirmOrder(_) => "/saga.v1.OrderService/ConfirmOrder",
        Call::ReserveStock(_) => "/saga.v1.StockService/ReserveStock",
        Call::LockCoupon(_) => "/saga.v1.CouponService/LockCoupon",
        Call::DeductBalance(_) => "/saga.v1.BalanceService/DeductBalance",
    }
}

/// The RPC name of `call` (the last part of its path).
fn call_name(call: &pb::step_call::Call) -> &'static str {
    call_path(call)
        .rsplit('/')
        .next()
        .expect("a path has a last part")
}

/// The reply to call `id` with `result`: the status the unary call would have ended with.
fn reply(id: u64, result: Result<(), Status>) -> pb::StepReply {
    match result {
        Ok(()) => pb::StepReply {
            id,
            code: tonic::Code::Ok as i32,
            message: String::new(),
            details: Vec::new(),
        },
        Err(status) => pb::StepReply {
            id,
            code: status.code() as i32,
            message: status.message().to_owned(),
            details: status.details().to_vec(),
        },
    }
}

/// Runs `call` within `deadline_ms` of its receipt (0: no deadline), as tonic's server bounds a
/// unary handler by its `grpc-timeout`: past it the handler is dropped (an append it started
/// completes or not in the log's writer, as for a unary call) and the answer is
/// DEADLINE_EXCEEDED, an unknown outcome to the caller, who gave up on it already.
async fn run_within(role: &RoleService, call: pb::step_call::Call, deadline_ms: u32) -> Result<(), Status> {
    if deadline_ms == 0 {
        return role.run(call).await;
    }
    let deadline = std::time::Duration::from_millis(u64::from(deadline_ms));
    tokio::time::timeout(deadline, role.run(call))
        .await
        .unwrap_or_else(|_| Err(Status::deadline_exceeded("Timeout expired")))
}

/// Completes once the server stops; never without a sender (no `Participant` left to stop it).
async fn stopping(closing: &mut watch::Receiver<bool>) {
    if closing.wait_for(|closing| *closing).await.is_err() {
        std::future::pending::<()>().await;
    }
}

pub(crate) struct StepCallsService {
    pub(crate) role: Arc<RoleService>,
    /// True once the server stops (`Participant::close_step_streams`).
    pub(crate) closing: watch::Receiver<bool>,
}

#[tonic::async_trait]
impl pb::step_calls_server::StepCalls for StepCallsService {
    type StepsStream = Pin<Box<dyn Stream<Item = Result<pb::StepReply, Status>> + Send + 'static>>;

    async fn steps(
        &self,
        request: Request<Streaming<pb::StepCall>>,
    ) -> Result<Response<Self::StepsStream>, Status> {
        let mut closing = self.closing.clone();
        if *closing.borrow_and_update() {
            return Err(Status::unavailable("the participant is stopping"));
        }
        let mut calls = request.into_inner();
        let (replies, answers) = mpsc::channel(REPLIES_QUEUED_MAX);
        let role = Arc::clone(&self.role);
        let running = Arc::new(Semaphore::new(CALLS_RUNNING_MAX));
        tokio::spawn(async move {
            // Until the caller ends the stream or it breaks (a malformed message breaks it too:
            // tonic answers the stream with its status, the caller repeats its calls), or the
            // server stops: then the stream ends once the running calls are answered (each
            // within its deadline), so that the server's graceful shutdown is not held by a
            // caller that never ends it.
            loop {
                // At most CALLS_RUNNING_MAX calls run at once: past that this stops reading,
                // and HTTP/2 flow control holds the caller back.
                let permit = tokio::select! {
                    permit = Arc::clone(&running).acquire_owned() => permit.expect("never closed"),
                    () = stopping(&mut closing) => break,
                };
                let mut call = tokio::select! {
                    message = calls.message() => match message {
                        Ok(Some(call)) => call,
                        Ok(None) | Err(_) => break,
                    },
                    () = stopping(&mut closing) => break,
                };
                let (role, replies) = (Arc::clone(&role), replies.clone());
                let inner = call.call.take();
                let span = saga_proto::trace::call_span(
                    inner.as_ref().map_or("/saga.v1.StepCalls/Steps", call_path),
                    Some(&call.traceparent),
                );
                tokio::spawn(
                    async move {
                        let result = match inner {
                            Some(inner) => run_within(&role, inner, call.deadline_ms).await,
                            None => Err(saga_proto::status::invalid_argument("call", "required")),
                        };
                        // The caller may be gone: its unanswered calls are unknown outcomes to
                        // it, repeated with the same key.
                        let _ = replies.send(Ok(reply(call.id, result))).await;
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(answers))))
    }
}

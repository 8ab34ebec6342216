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
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::Role;

/// Replies waiting to be written to one stream; a caller that stops reading holds its calls'
/// tasks at their reply, not the process's memory.
const REPLIES_QUEUED_MAX: usize = 1024;

/// The role's unary service, whose handlers the stream's calls run.
pub(crate) enum RoleService {
    Order(crate::order::OrderService),
    Stock(crate::stock::StockService),
    Coupon(crate::coupon::CouponService),
    Balance(crate::balance::BalanceService),
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
                pb::order_service_server::OrderService::create_order(s, Request::new(r))
                    .await
                    .map(drop)
            }
            (RoleService::Order(s), Call::ConfirmOrder(r)) => {
                pb::order_service_server::OrderService::confirm_order(s, Request::new(r))
                    .await
                    .map(drop)
            }
            (RoleService::Stock(s), Call::ReserveStock(r)) => {
                pb::stock_service_server::StockService::reserve_stock(s, Request::new(r))
                    .await
                    .map(drop)
            }
            (RoleService::Coupon(s), Call::LockCoupon(r)) => {
                pb::coupon_service_server::CouponService::lock_coupon(s, Request::new(r))
                    .await
                    .map(drop)
            }
            (RoleService::Balance(s), Call::DeductBalance(r)) => {
                pb::balance_service_server::BalanceService::deduct_balance(s, Request::new(r))
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

fn call_name(call: &pb::step_call::Call) -> &'static str {
    use pb::step_call::Call;
    match call {
        Call::CreateOrder(_) => "CreateOrder",
        Call::ConfirmOrder(_) => "ConfirmOrder",
        Call::ReserveStock(_) => "ReserveStock",
        Call::LockCoupon(_) => "LockCoupon",
        Call::DeductBalance(_) => "DeductBalance",
    }
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
        tokio::spawn(async move {
            // Until the caller ends the stream or it breaks (a malformed message breaks it too:
            // tonic answers the stream with its status, the caller repeats its calls), or the
            // server stops: then the stream ends once the running calls are answered, so that
            // the server's graceful shutdown is not held by a caller that never ends it.
            loop {
                let stopping = async {
                    // Without a sender (no `Participant` left) nothing will ever close it.
                    if closing.wait_for(|closing| *closing).await.is_err() {
                        std::future::pending::<()>().await;
                    }
                };
                let mut call = tokio::select! {
                    message = calls.message() => match message {
                        Ok(Some(call)) => call,
                        Ok(None) | Err(_) => break,
                    },
                    () = stopping => break,
                };
                let Some(inner) = call.call.take() else {
                    let answer = reply(
                        call.id,
                        Err(saga_proto::status::invalid_argument("call", "required")),
                    );
                    if replies.send(Ok(answer)).await.is_err() {
                        break;
                    }
                    continue;
                };
                let span = saga_proto::trace::call_span(call_path(&inner), Some(&call.traceparent));
                let (role, replies) = (Arc::clone(&role), replies.clone());
                tokio::spawn(
                    async move {
                        let result = role.run(inner).await;
                        // The caller may be gone: its unanswered calls are unknown outcomes to
                        // it, repeated with the same key.
                        let _ = replies.send(Ok(reply(call.id, result))).await;
                    }
                    .instrument(span),
                );
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(answers))))
    }
}

//! `saga-participants`: the order, stock, coupon and balance services, each an event-sourced
//! process with its own sled log.
//!
//! One module per role, each owning its event enum, its read model and projection keys, a
//! typed `decide` (the guard the projector runs inside the append's transaction, so the
//! no-oversell check is atomic), an `apply` that cannot fail and asserts what the fold keeps
//! true, and its gRPC service:
//! - [`stock`]: units available and reserved per product (never oversold);
//! - [`coupon`]: coupons locked by at most one order, by their owner;
//! - [`balance`]: money per user (never negative);
//! - [`order`]: orders, pending -> confirmed | cancelled.
//!
//! What the roles share:
//! - [`barrier`]: the barrier per (saga id, step) as the fold of the step's own stream:
//!   repeated actions return the first outcome, null compensations are recorded, late actions
//!   are refused, compensations apply once; the [`barrier::Barrier`] trait the services and
//!   the consumer call it through.
//! - [`refusal`]: business refusals, typed from `decide` to the gRPC status detail.
//! - [`record`]: [`record::ParticipantEvent`], the sum of every family's events, and how it is
//!   stored (the on-disk variant order, guarded by a golden test).
//! - [`keys`]: every stream name and projection key.
//! - [`projector`]: hands each event to its role's `decide` and `apply` in the transaction.
//! - [`service`]: validation, status mapping and seeding shared by the role services.
//! - [`consumer`]: the compensation consumer on any `saga_messaging::transport::Transport`,
//!   with acknowledgements to the orchestrator; [`consumer_log`]: its consumer log
//!   (processing / success / fail, parked after 3 tries, never dropped) and parked list;
//!   [`admin`]: `ConsumerAdmin`, the parked list over gRPC.
//! - [`faults`] (feature `faults`, tests only): fault injection as a barrier decorator.
//! - [`Participant`]: opens a role's log and serves its gRPC service (a library entry point, so
//!   one process can host all four).
//!
//! The `saga-participant` binary (`src/bin/saga-participant.rs`) runs one role as a process.

pub mod acks;
pub mod admin;
pub mod balance;
pub mod barrier;
pub mod consumer;
pub mod consumer_log;
pub mod coupon;
#[cfg(feature = "faults")]
pub mod faults;
pub mod keys;
pub mod order;
pub mod projector;
pub mod record;
pub mod refusal;
pub mod service;
mod step_calls;
pub mod stock;

use std::path::Path;
use std::sync::Arc;

use saga_proto::REQUEST_LEN_MAX;
use saga_proto::v1 as pb;
use saga_storage::{EventLog, LogConfig, StorageError};

use crate::barrier::{Barrier, StepBarrier};
use saga_proto::auth::AdminToken;

/// Why a participant's server did not serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

pub use saga_proto::{Role, UnknownRole};

/// The environment variables of a fault plan (see `faults`, compiled with the `faults` feature
/// only): listed here so that a binary built without it can refuse them instead of ignoring
/// them.
pub const FAULT_PLAN_ENV: [&str; 3] = [
    "SAGA_FAULT_ACT",
    "SAGA_FAULT_COMPENSATION_FAILS_FOR",
    "SAGA_FAULT_FREEZE_AFTER_APPLY_FOR",
];

/// Wraps a role's barrier (a decorator such as `faults::FaultPlan::decorate`).
pub type BarrierDecorator = Arc<dyn Fn(Role, Arc<dyn Barrier>) -> Arc<dyn Barrier> + Send + Sync>;

/// One participant: its role, its event log and the barrier its calls go through.
#[derive(Clone)]
pub struct Participant {
    role: Role,
    log: EventLog,
    barrier: Arc<dyn Barrier>,
    admin: AdminToken,
    tls: Option<tonic::transport::ServerTlsConfig>,
    /// Set when the server stops: the step streams end (see [`Participant::close_step_streams`]).
    closing: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Participant {
    /// Opens (or creates) the role's log in `data_dir`.
    pub fn open(role: Role, data_dir: &Path) -> Result<Participant, StorageError> {
        Self::open_with(role, LogConfig::new(data_dir))
    }

    /// Opens (or creates) the role's log with `config` (e.g. `accept_lost_tail`).
    pub fn open_with(role: Role, config: LogConfig) -> Result<Participant, StorageError> {
        let log = EventLog::open_with(config, Some(Arc::new(projector::ParticipantProjector)))?;
        let barrier = Arc::new(StepBarrier { log: log.clone() });
        Ok(Participant {
            role,
            log,
            barrier,
            admin: AdminToken::none(),
            tls: None,
            closing: Arc::new(tokio::sync::watch::Sender::new(false)),
        })
    }

    /// The participant serving TLS only, with `tls` (`saga_proto::tls::server_config`; with a
    /// client CA, mutual TLS).
    pub fn with_tls(mut self, tls: tonic::transport::ServerTlsConfig) -> Participant {
        self.tls = Some(tls);
        self
    }

    /// The participant with `token` required on its admin RPCs (Seed*, ConsumerAdmin).
    pub fn with_admin_token(mut self, token: AdminToken) -> Participant {
        self.admin = token;
        self
    }

    /// The participant with `decorate` around its barrier (every service call and every
    /// compensation goes through it).
    pub fn with_barrier(mut self, decorate: &BarrierDecorator) -> Participant {
        self.barrier = decorate(self.role, self.barrier);
        self
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn log(&self) -> &EventLog {
        &self.log
    }

    /// The role's gRPC service and `ConsumerAdmin` (answering FAILED_PRECONDITION when no
    /// consumer is given), with health and reflection, ready to serve. Health reports SERVING
    /// (the log is open) until the log fails. Requests up to `saga_proto::REQUEST_LEN_MAX` are
    /// decoded, so that oversized fields are answered INVALID_ARGUMENT by field.
    pub async fn routes(
        &self,
        consumer: Option<Arc<consumer::CompensationConsumer>>,
    ) -> Result<tonic::service::Routes, tonic_reflection::server::Error> {
        use saga_proto::server::name_of;
        let log = self.log.clone();
        let barrier = Arc::clone(&self.barrier);
        let admin = self.admin.clone();
        // One service per role, shared by its unary RPCs and its step stream.
        let (routes, name, role_service) = match self.role {
            Role::Order => {
                type S = pb::order_service_server::OrderServiceServer<order::OrderService>;
                let service = Arc::new(order::OrderService { log, barrier });
                (
                    tonic::service::Routes::new(
                        S::from_arc(Arc::clone(&service)).max_decoding_message_size(REQUEST_LEN_MAX),
                    ),
                    name_of::<S>(),
                    step_calls::RoleService::Order(service),
                )
            }
            Role::Stock => {
                type S = pb::stock_service_server::StockServiceServer<stock::StockService>;
                let service = Arc::new(stock::StockService { log, barrier, admin });
                (
                    tonic::service::Routes::new(
                        S::from_arc(Arc::clone(&service)).max_decoding_message_size(REQUEST_LEN_MAX),
                    ),
                    name_of::<S>(),
                    step_calls::RoleService::Stock(service),
                )
            }
            Role::Coupon => {
                type S = pb::coupon_service_server::CouponServiceServer<coupon::CouponService>;
                let service = Arc::new(coupon::CouponService { log, barrier, admin });
                (
                    tonic::service::Routes::new(
                        S::from_arc(Arc::clone(&service)).max_decoding_message_size(REQUEST_LEN_MAX),
                    ),
                    name_of::<S>(),
                    step_calls::RoleService::Coupon(service),
                )
            }
            Role::Balance => {
                type S = pb::balance_service_server::BalanceServiceServer<balance::BalanceService>;
                let service = Arc::new(balance::BalanceService { log, barrier, admin });
                (
                    tonic::service::Routes::new(
                        S::from_arc(Arc::clone(&service)).max_decoding_message_size(REQUEST_LEN_MAX),
                    ),
                    name_of::<S>(),
                    step_calls::RoleService::Balance(service),
                )
            }
        };
        let role_service = Arc::new(role_service);
        type Admin = pb::consumer_admin_server::ConsumerAdminServer<admin::ConsumerAdminService>;
        let routes = routes.add_service(
            Admin::new(admin::ConsumerAdminService {
                consumer,
                admin: self.admin.clone(),
            })
            .max_decoding_message_size(REQUEST_LEN_MAX),
        );
        type Steps = pb::step_calls_server::StepCallsServer<step_calls::StepCallsService>;
        let routes = routes.add_service(
            Steps::new(step_calls::StepCallsService {
                role: role_service,
                closing: self.closing.subscribe(),
            })
            .max_decoding_message_size(REQUEST_LEN_MAX),
        );
        let (routes, standard) = saga_proto::server::with_standard_services(
            routes,
            &[name, name_of::<Admin>(), name_of::<Steps>()],
        )
        .await?;
        // Health is also the no-op call of the ceiling benchmark (tests/benches/ceiling.rs).
        let failure = self.log.failure();
        if !self.log.is_failed() {
            standard.health.set_serving(true).await;
        }
        let health = standard.health;
        let role = self.role;
        tokio::spawn(async move {
            if failure.await {
                tracing::error!(%role, "the event log failed: health reports NOT_SERVING until a restart");
                health.set_serving(false).await;
            }
        });
        Ok(routes)
    }

    /// Serves the role's gRPC service (and `ConsumerAdmin`) on `listener` until `shutdown`
    /// completes (`saga_proto::server::serve_tls`; TLS only when given [`Participant::with_tls`]).
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        consumer: Option<Arc<consumer::CompensationConsumer>>,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        // Served again after a stop: step streams are accepted again.
        self.closing.send_replace(false);
        let routes = self.routes(consumer).await?;
        let closing = Arc::clone(&self.closing);
        let shutdown = async move {
            shutdown.await;
            let _ = closing.send(true);
        };
        Ok(saga_proto::server::serve_tls(routes, listener, self.tls.clone(), shutdown).await?)
    }

    /// Ends the step streams of this participant's routes (`StepCalls.Steps`) once their
    /// running calls are answered, and refuses new ones UNAVAILABLE. A server's graceful
    /// shutdown waits for its open HTTP/2 streams, and a caller keeps its step stream open for
    /// as long as it lives: [`Participant::serve`] calls this when its shutdown completes; a
    /// caller serving [`Participant::routes`] itself calls it when it stops the server. The
    /// caller's calls still unanswered are unknown outcomes to it, repeated with their keys.
    pub fn close_step_streams(&self) {
        let _ = self.closing.send(true);
    }

    /// Undoes `key`'s action exactly once.
    pub async fn compensate(
        &self,
        key: &barrier::StepKey,
    ) -> Result<barrier::Compensated, barrier::BarrierError> {
        self.barrier.compensate(key, None).await
    }

    /// Undoes `key`'s action exactly once, writing `also`'s record of the outcome in the same
    /// append (the compensation consumer: its consumer log and acknowledgement; see
    /// [`barrier::AlsoRecord`]).
    pub async fn compensate_recording(
        &self,
        key: &barrier::StepKey,
        also: &barrier::AlsoRecord<'_>,
    ) -> Result<barrier::Compensated, barrier::BarrierError> {
        self.barrier.compensate(key, Some(also)).await
    }
}

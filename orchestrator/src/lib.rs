//! `saga-orchestrator`: the saga engine, the order saga and the orchestrator's gRPC API.
//!
//! - [`definition`]: a saga definition as data (steps, participants, deadlines, retries).
//! - [`events`] and [`state`]: the saga events and the saga's state as their fold, with the
//!   next move computed from state alone.
//! - [`engine`]: starts and drives sagas, writes compensations to the outbox in the same
//!   append as the decision, relays the outbox to the compensation transport, applies
//!   participants' acknowledgements, and resumes every unfinished saga after a restart.
//! - [`projector`]: read models kept in each append's transaction (request ids for
//!   idempotent starts, sagas by status for listing and recovery); [`keys`]: their keys.
//! - [`order`]: the order saga's definition and the invoker that calls the participants.
//! - [`api`]: the `saga.v1.Orchestrator` gRPC service, with health checking and reflection.
//! - [`workload`]: the benchmark workload of shared/BENCH.md (data, orders, conservation
//!   checks), shared by `dev` and the multi-process benchmark.
//! - [`metric`]: the orchestrator's metrics (saga counters, in-flight gauge, step latency).
//! - [`node`]: the composition root: one node's engine, relay, acknowledgement subscription
//!   and API, wired once for `serve` and `dev`.
//! - `dev` (feature `dev`): the all-in-one process behind `saga-orchestrator dev`.
//!
//! The binaries: `saga-orchestrator` (`serve`, `dev`) and `sagactl` (the client CLI).

pub mod ack_key;
pub mod api;
pub mod definition;
#[cfg(feature = "dev")]
pub mod dev;
pub mod engine;
pub mod events;
pub mod keys;
pub mod metric;
pub mod node;
pub mod order;
pub mod projector;
pub mod state;
pub mod step_stream;
pub mod workload;

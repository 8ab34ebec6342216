//! `saga-orchestrator`: runs order sagas. Empty until the orchestrator issue; this is the
//! map of what it will own (ARCHITECTURE.md):
//!
//! - saga definitions as data (ordered steps: participant, action, compensation, deadline,
//!   retry policy) and the generic engine that decides the next command from a saga's state;
//! - saga events (`SagaStarted`, `StepStarted`, `StepSucceeded`, `StepFailed`,
//!   `CompensationRequested`, `CompensationApplied`, `SagaCompleted`, `SagaCompensated`,
//!   `SagaStuck`) appended to its `saga_storage::EventLog`, state as their fold;
//! - the outbox relay that publishes compensation messages through `saga_messaging`;
//! - the `saga.v1.Orchestrator` gRPC service (`saga_proto`), health and reflection;
//! - binaries `saga-orchestrator` (`serve`, and `dev`: the all-in-one demo) and `sagactl`.
//!
//! It never links participant code except in the `dev` composition root.

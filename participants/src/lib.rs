//! `saga-participants`: the order, stock, coupon and balance services. Empty until the
//! participants issue; this is the map of what it will own (ARCHITECTURE.md):
//!
//! - one module per participant: its events, its state as their fold, its projections kept in
//!   the same transaction (`saga_storage::Projector`), its `saga.v1` gRPC service;
//! - the barrier per (saga id, step): repeated actions return the first outcome, a
//!   compensation without action is recorded and does nothing, a late action is refused;
//! - the compensation consumer and its consumer log (processing -> success | fail, bounded
//!   tries, then parked, never dropped), over the `saga_messaging` transport;
//! - the `saga-participant --role ...` binary, and a library entry point so that one process
//!   can host all four.

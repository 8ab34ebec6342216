//! `saga-tests`: process-level end-to-end and chaos tests (real orchestrator and participant
//! processes on loopback ports, real RocketMQ from scripts/dev-env). Empty until the
//! orchestrator and participants exist; helpers for starting processes and stopping them by
//! PID (also when a test fails) will live here, the tests in `tests/tests/`.

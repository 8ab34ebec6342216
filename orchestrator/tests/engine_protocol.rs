//! Crash windows of the engine, reproduced deterministically in one process: the log's writer
//! gate (`saga_storage::gate`) drops a held append as a crash before its flush would, the
//! engine is dropped and a new one recovers from the reopened log. Participants are a ledger
//! of applied effects (the fake invoker), compensations are read from the outbox and applied
//! to the ledger, so "what leaked" is a set difference.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message as _;
use saga_messaging::transport::BoxFuture;
use saga_orchestrator::definition::StepDef;
use saga_orchestrator::engine::{Engine, EngineConfig, StepError, StepInvoker, open_log};
use saga_orchestrator::events::SagaEvent;
use saga_orchestrator::order::{self, OrderTiming};
use saga_orchestrator::state::Status;
use saga_proto::v1 as pb;
use saga_storage::LogConfig;
use saga_storage::Position;
use saga_storage::gate::{GatePoint, WriterGate};
use saga_tests::compensation_ack as ack;

/// What the fake participants did: the steps applied and not undone.
#[derive(Default)]
struct Ledger {
    applied: Mutex<BTreeSet<String>>,
    /// Steps whose forward call was made at all.
    called: Mutex<BTreeSet<String>>,
}

/// Per phase: what the fake participants answer.
struct FakeInvoker {
    ledger: Arc<Ledger>,
    /// Phase 1: when this step is called, the log is armed to drop the next append (for a
    /// compensable step, the one that records the forward run before the pivot is called),
    /// then the step succeeds.
    crash_after: Option<String>,
    gate: Arc<WriterGate>,
    /// Phase 2: this step's participant is down (every call fails transiently).
    down: Option<String>,
    /// This step is refused for good (a business refusal: nothing took effect).
    refuse: Option<String>,
}

impl StepInvoker for FakeInvoker {
    fn invoke(
        &self,
        _saga_id: &str,
        step: &StepDef,
        _payload: &[u8],
    ) -> BoxFuture<'static, Result<(), StepError>> {
        let name = step.name.clone();
        let ledger = Arc::clone(&self.ledger);
        let crash_here = self.crash_after.as_deref() == Some(name.as_str());
        let down = self.down.as_deref() == Some(name.as_str());
        let refuse = self.refuse.as_deref() == Some(name.as_str());
        let gate = Arc::clone(&self.gate);
        Box::pin(async move {
            if down {
                return Err(StepError::Transient("participant down".into()));
            }
            if refuse {
                ledger.called.lock().unwrap().insert(name.clone());
                return Err(StepError::Business("refused (test)".into()));
            }
            ledger.called.lock().unwrap().insert(name.clone());
            ledger.applied.lock().unwrap().insert(name.clone());
            if crash_here {
                gate.arm(GatePoint::BeforeCommit);
            }
            Ok(())
        })
    }
}

fn timing() -> OrderTiming {
    OrderTiming {
        step_deadline_ms: 1_000,
        attempts_max: 2,
        backoff_base_ms: 1,
        backoff_max_ms: 2,
    }
}

fn order_payload() -> Vec<u8> {
    pb::OrderDetails {
        user_id: "u1".into(),
        items: vec![pb::OrderItem {
            product_id: "p1".into(),
            quantity: 1,
        }],
        amount_minor: 100,
        coupon_id: "c1".into(),
        ..Default::default()
    }
    .encode_to_vec()
}

/// Runs the saga until `crash_after` succeeded and the append recording it is dropped as by a
/// crash; then recovers with `down`'s participant down for good. Returns the ledger after the
/// compensations in the outbox were applied, the saga's compensation request, and whether the
/// saga compensated.
async fn crash_then_fail_on_resume(crash_after: &str, down: &str) -> (Arc<Ledger>, Vec<String>, Status) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Arc::new(Ledger::default());
    let gate = Arc::new(WriterGate::new());
    let definition = order::definition(&timing());

    // Phase 1: the saga runs until the crash.
    let saga_id = {
        let log = open_log(LogConfig {
            gate: Some(Arc::clone(&gate)),
            ..LogConfig::new(dir.path())
        })
        .expect("opens");
        let invoker = Arc::new(FakeInvoker {
            ledger: Arc::clone(&ledger),
            crash_after: Some(crash_after.into()),
            gate: Arc::clone(&gate),
            down: None,
            refuse: None,
        });
        let engine = Engine::new(log, vec![definition.clone()], invoker, EngineConfig::default());
        let (state, _) = engine
            .start(order::DEFINITION, "req-1", order_payload(), Vec::new())
            .await
            .expect("starts");
        let held = gate.held(Duration::from_secs(20)).await;
        assert!(held, "the append after {crash_after} reached the gate");
        gate.fail();
        state.saga_id
        // The engine, its driver (which stops on the failed append) and the log go away here:
        // reopening below waits for the last handle.
    };

    // Phase 2: restart; the participant of `down` stays down past the step's attempts.
    let log = open_log(LogConfig::new(dir.path())).expect("reopens");
    let invoker = Arc::new(FakeInvoker {
        ledger: Arc::clone(&ledger),
        crash_after: None,
        gate: Arc::new(WriterGate::new()),
        down: Some(down.into()),
        refuse: None,
    });
    let engine = Engine::new(log.clone(), vec![definition], invoker, EngineConfig::default());
    let mut watch = engine.watch(&saga_id);
    engine.recover().await.expect("recovers");
    let state = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let state = engine.load(&saga_id).await.expect("loads").expect("exists");
            if state.status != Status::Running {
                return state;
            }
            watch.changed().await;
        }
    })
    .await
    .expect("the saga leaves Running after the resumed step fails for good");

    // The participants receive every compensation of the outbox (the barrier makes a
    // compensation of a step never applied a null compensation).
    let mut requested = Vec::new();
    for entry in log.outbox_pending(1000).expect("outbox") {
        let request = pb::CompensationRequest::decode(entry.message.body.as_slice()).expect("decodes");
        let step = request.key.expect("key").step;
        ledger.applied.lock().unwrap().remove(&step);
        requested.push(step);
    }
    (ledger, requested, state.status)
}

/// The saga compensates, and the compensations requested undid every effect applied.
fn assert_compensated_without_leak(ledger: &Ledger, requested: &[String], status: Status) {
    assert_eq!(status, Status::Compensating, "compensation was requested");
    let leaked = ledger.applied.lock().unwrap().clone();
    assert!(
        leaked.is_empty(),
        "effects left applied for a compensated saga: {leaked:?} (compensations requested: {requested:?})"
    );
}

/// Item 1 of the crash-safety review, and issue 11's records: the driver calls the compensable
/// steps with no append in between and records them all before the pivot. A crash before that
/// append leaves the log at `SagaStarted` (or at an earlier step), yet the steps after it were
/// applied. If a step then fails for good on resumption, every step after it up to the pivot
/// must be compensated too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_called_before_its_start_was_durable_is_compensated_when_the_resumed_step_fails() {
    let (ledger, requested, status) =
        crash_then_fail_on_resume(order::RESERVE_STOCK, order::RESERVE_STOCK).await;
    assert!(
        ledger.called.lock().unwrap().contains(order::LOCK_COUPON),
        "the test reproduces the window: lock_coupon was called before the crash"
    );
    assert_compensated_without_leak(&ledger, &requested, status);
}

/// The widest form of that window: every compensable step was applied and the append that
/// records them (before the pivot is called) is lost; on resumption the first step fails for
/// good. All four are compensated, and the confirmation was never called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_called_with_no_record_are_all_compensated_when_the_resumed_first_step_fails() {
    let (ledger, requested, status) =
        crash_then_fail_on_resume(order::DEDUCT_BALANCE, order::CREATE_ORDER).await;
    let called = ledger.called.lock().unwrap().clone();
    assert!(
        called.contains(order::DEDUCT_BALANCE) && !called.contains(order::CONFIRM_ORDER),
        "the test reproduces the window: every compensable step was called, the pivot was not ({called:?})"
    );
    assert_compensated_without_leak(&ledger, &requested, status);
}

/// The same window when k+1 is the pivot's successor (confirm_order, no compensation): a saga
/// whose confirmation may have been applied must never be compensated, and one that is
/// compensated must not have a confirmed order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmation_that_may_have_been_applied_is_never_followed_by_compensation() {
    let (ledger, requested, status) =
        crash_then_fail_on_resume(order::DEDUCT_BALANCE, order::DEDUCT_BALANCE).await;
    let confirmed = ledger.called.lock().unwrap().contains(order::CONFIRM_ORDER);
    if status == Status::Compensating {
        assert!(
            !confirmed,
            "the order was confirmed and the saga compensates (requested: {requested:?})"
        );
        let leaked = ledger.applied.lock().unwrap().clone();
        assert!(leaked.is_empty(), "effects left applied: {leaked:?}");
    } else {
        assert_eq!(
            status,
            Status::Stuck,
            "a saga that may be confirmed waits for an operator"
        );
        assert!(requested.is_empty(), "nothing compensated: {requested:?}");
    }
}

/// An engine over a fresh log whose participants refuse `refuse` for good.
struct Running {
    engine: Engine,
    log: saga_storage::EventLog,
    ledger: Arc<Ledger>,
    _dir: tempfile::TempDir,
}

impl Running {
    /// Starts the order saga (request `req-1`); returns its id.
    async fn start(&self) -> String {
        let (state, _) = self
            .engine
            .start(order::DEFINITION, "req-1", order_payload(), Vec::new())
            .await
            .expect("starts");
        state.saga_id
    }
}

fn running(refuse: &str, config: EngineConfig) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_log(LogConfig::new(dir.path())).expect("opens");
    let ledger = Arc::new(Ledger::default());
    let invoker = Arc::new(FakeInvoker {
        ledger: Arc::clone(&ledger),
        crash_after: None,
        gate: Arc::new(WriterGate::new()),
        down: None,
        refuse: Some(refuse.into()),
    });
    let engine = Engine::new(log.clone(), vec![order::definition(&timing())], invoker, config);
    Running {
        engine,
        log,
        ledger,
        _dir: dir,
    }
}

async fn wait_status(engine: &Engine, saga_id: &str, wanted: Status) -> saga_orchestrator::state::SagaState {
    let mut watch = engine.watch(saga_id);
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let state = engine.load(saga_id).await.expect("loads").expect("exists");
            if state.status == wanted {
                return state;
            }
            watch.changed().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("saga {saga_id} never reached {wanted:?}"))
}

/// Steps named by the compensation messages in the outbox, in order.
fn outbox_steps(log: &saga_storage::EventLog) -> Vec<String> {
    log.outbox_pending(1000)
        .expect("outbox")
        .iter()
        .map(|e| {
            pb::CompensationRequest::decode(e.message.body.as_slice())
                .expect("decodes")
                .key
                .expect("key")
                .step
        })
        .collect()
}

/// Item 2: a stuck saga whose parked compensation is then acknowledged leaves Stuck (it goes
/// on compensating, and ends Compensated once every compensation is acknowledged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_saga_leaves_stuck_when_its_parked_compensation_is_acknowledged() {
    let r = running(order::DEDUCT_BALANCE, EngineConfig::default());
    let id = r.start().await;
    wait_status(&r.engine, &id, Status::Compensating).await;
    use pb::CompensationOutcome as O;
    r.engine
        .on_ack(&ack(&id, order::RESERVE_STOCK, O::Parked))
        .await
        .expect("applies");
    assert_eq!(r.engine.load(&id).await.unwrap().unwrap().status, Status::Stuck);
    r.engine
        .on_ack(&ack(&id, order::RESERVE_STOCK, O::Applied))
        .await
        .expect("applies");
    assert_eq!(
        r.engine.load(&id).await.unwrap().unwrap().status,
        Status::Compensating,
        "the parked compensation was acknowledged: the saga is no longer stuck"
    );
    r.engine
        .on_ack(&ack(&id, order::LOCK_COUPON, O::Applied))
        .await
        .expect("applies");
    r.engine
        .on_ack(&ack(&id, order::CREATE_ORDER, O::Null))
        .await
        .expect("applies");
    assert_eq!(
        r.engine.load(&id).await.unwrap().unwrap().status,
        Status::Compensated
    );
}

/// Item 2: RetrySaga of a stuck saga whose compensation was requested re-sends every open
/// compensation and never calls a forward step again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_of_a_stuck_compensating_saga_resends_open_compensations_and_never_goes_forward() {
    let r = running(order::DEDUCT_BALANCE, EngineConfig::default());
    let id = r.start().await;
    let compensating = wait_status(&r.engine, &id, Status::Compensating).await;
    let first = outbox_steps(&r.log);
    assert_eq!(
        first,
        [order::LOCK_COUPON, order::RESERVE_STOCK, order::CREATE_ORDER]
    );
    use pb::CompensationOutcome as O;
    r.engine
        .on_ack(&ack(&id, order::RESERVE_STOCK, O::Applied))
        .await
        .expect("applies");
    // Stuck with compensations still open and none parked (what running out of re-publishes
    // leads to).
    let stuck = SagaEvent::SagaStuck {
        reason: "no acknowledgement (test)".into(),
    };
    r.log
        .append(
            saga_storage::AppendRequest::new(
                &id,
                saga_storage::ExpectedVersion::Exact(compensating.version.next()),
            )
            .event(saga_storage::NewEvent::encode(stuck.name(), &stuck).expect("encodes")),
        )
        .await
        .expect("appends");
    let called_before = r.ledger.called.lock().unwrap().clone();
    let retried = r.engine.retry(&id, "operator (test)").await.expect("retries");
    assert_eq!(
        retried.status,
        Status::Compensating,
        "a compensating saga never runs forward again"
    );
    assert_eq!(
        outbox_steps(&r.log)[first.len()..],
        [order::LOCK_COUPON, order::CREATE_ORDER],
        "the open compensations are sent again"
    );
    r.engine
        .on_ack(&ack(&id, order::LOCK_COUPON, O::Applied))
        .await
        .expect("applies");
    r.engine
        .on_ack(&ack(&id, order::CREATE_ORDER, O::Applied))
        .await
        .expect("applies");
    let done = wait_status(&r.engine, &id, Status::Compensated).await;
    assert_eq!(done.status, Status::Compensated);
    assert_eq!(
        *r.ledger.called.lock().unwrap(),
        called_before,
        "no forward call after the retry"
    );
}

/// Item 3: acknowledgements reach the orchestrator that owns the saga. Two orchestrators (two
/// logs, node ids "a" and "b") share one transport and one stock participant; each ack is
/// routed by the tag its request named, so both sagas end Compensated (with one shared ack
/// group, each orchestrator received and dropped about half of the other's acks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_reach_the_orchestrator_that_owns_the_saga() {
    use saga_messaging::embedded::{EmbeddedConfig, EmbeddedTransport};
    use saga_messaging::transport::{SubscriptionSpec, Transport};
    use saga_orchestrator::definition::{RetryPolicy, SagaDefinition};
    use saga_orchestrator::engine::{AckHandler, ack_group};
    use saga_participants::consumer::CompensationConsumer;
    use saga_participants::{Participant, Role};

    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().expect("tempdir")).collect();
    let transport = Arc::new(
        EmbeddedTransport::open(
            dirs[0].path(),
            EmbeddedConfig {
                retry_delay_base: Duration::from_millis(20),
                retry_delay_max: Duration::from_millis(100),
            },
        )
        .expect("queue"),
    );
    let stock = Participant::open(Role::Stock, dirs[1].path()).expect("opens");
    let consumer = Arc::new(CompensationConsumer::new(stock, transport.clone()));
    let _stock_sub = transport
        .subscribe(consumer.spec(), consumer.clone())
        .await
        .expect("subscribes");
    // Reserve, then a step that is refused: the reservation is compensated.
    let step = |name: &str, participant: &str| StepDef {
        name: name.into(),
        participant: participant.into(),
        action: name.into(),
        compensable: true,
        deadline_ms: 1_000,
        retry: RetryPolicy {
            attempts_max: 1,
            backoff_base_ms: 1,
            backoff_max_ms: 1,
        },
    };
    let definition = SagaDefinition {
        name: "two".into(),
        id_prefix: "two".into(),
        steps: vec![step(order::RESERVE_STOCK, "stock"), step("refused", "stock")],
    };
    let mut engines = Vec::new();
    let mut subscriptions = Vec::new();
    for (node, dir) in [("a", &dirs[2]), ("b", &dirs[3])] {
        let log = open_log(LogConfig::new(dir.path())).expect("opens");
        let invoker = Arc::new(FakeInvoker {
            ledger: Arc::new(Ledger::default()),
            crash_after: None,
            gate: Arc::new(WriterGate::new()),
            down: None,
            refuse: Some("refused".into()),
        });
        let config = EngineConfig {
            node_id: node.into(),
            ..EngineConfig::default()
        };
        let spec = SubscriptionSpec {
            group: ack_group(node),
            topic: config.ack_topic.clone(),
            tags: vec![node.into()],
        };
        let engine = Engine::new(log, vec![definition.clone()], invoker, config);
        let relay = {
            let engine = engine.clone();
            let transport: Arc<dyn Transport> = transport.clone();
            tokio::spawn(async move { engine.run_relay(transport).await })
        };
        subscriptions.push(relay);
        std::mem::forget(
            transport
                .subscribe(
                    spec,
                    Arc::new(AckHandler {
                        engine: engine.clone(),
                    }),
                )
                .await
                .expect("subscribes"),
        );
        engines.push(engine);
    }
    let mut sagas = Vec::new();
    for (i, engine) in engines.iter().enumerate() {
        for n in 0..8 {
            let (state, _) = engine
                .start("two", &format!("req-{i}-{n}"), Vec::new(), Vec::new())
                .await
                .expect("starts");
            sagas.push((engine.clone(), state.saga_id));
        }
    }
    for (engine, saga_id) in &sagas {
        wait_status(engine, saga_id, Status::Compensated).await;
    }
    for relay in subscriptions {
        relay.abort();
    }
}

/// Item 3: a compensation that is never acknowledged is re-published when its deadline passes
/// and, after the bounded number of re-publishes, the saga is Stuck with the reason; a late
/// acknowledgement then lets it go on and end Compensated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_compensation_is_republished_then_the_saga_is_stuck() {
    let config = EngineConfig {
        compensation_ack_deadline_ms: 50,
        compensation_republishes_max: 2,
        ..EngineConfig::default()
    };
    let r = running(order::DEDUCT_BALANCE, config);
    let id = r.start().await;
    let stuck = wait_status(&r.engine, &id, Status::Stuck).await;
    assert!(
        stuck.failure_reason.contains("no acknowledgement"),
        "{}",
        stuck.failure_reason
    );
    let once = [order::LOCK_COUPON, order::RESERVE_STOCK, order::CREATE_ORDER];
    let sent = outbox_steps(&r.log);
    assert_eq!(sent, once.repeat(3), "sent, then re-published twice");
    use pb::CompensationOutcome as O;
    for step in once {
        r.engine
            .on_ack(&ack(&id, step, O::Applied))
            .await
            .expect("applies");
    }
    assert_eq!(
        r.engine.load(&id).await.unwrap().unwrap().status,
        Status::Compensated
    );
}

/// A PARKED acknowledgement of an earlier sending, relayed late (the participant crashed
/// before its relay deleted it), does not make a retried saga Stuck again: acks echo the
/// request's round, and only a PARKED of the current round parks the saga.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_parked_ack_of_an_earlier_round_does_not_stick_a_retried_saga() {
    let r = running(order::DEDUCT_BALANCE, EngineConfig::default());
    let id = r.start().await;
    wait_status(&r.engine, &id, Status::Compensating).await;
    use pb::CompensationOutcome as O;
    let first_round = ack(&id, order::RESERVE_STOCK, O::Parked);
    r.engine.on_ack(&first_round).await.expect("applies");
    assert_eq!(r.engine.load(&id).await.unwrap().unwrap().status, Status::Stuck);
    let retried = r.engine.retry(&id, "operator (test)").await.expect("retries");
    assert_eq!(retried.status, Status::Compensating);
    r.engine.on_ack(&first_round).await.expect("applies");
    assert_eq!(
        r.engine.load(&id).await.unwrap().unwrap().status,
        Status::Compensating,
        "the late PARKED of round 1 does not stick the retried saga"
    );
}

/// A caller that goes away while its StartOrder's SagaStarted is being made durable (tonic
/// drops a cancelled call's future) does not leave the saga without a driver: the append
/// completes in the writer, and the saga must go on in this process, not only after a
/// restart's recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_whose_caller_went_away_during_the_append_is_still_driven() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gate = Arc::new(WriterGate::new());
    let mut config = LogConfig::new(dir.path());
    config.flush_gate = Some(Arc::clone(&gate));
    let log = open_log(config).expect("opens");
    let invoker = Arc::new(FakeInvoker {
        ledger: Arc::new(Ledger::default()),
        crash_after: None,
        gate: Arc::new(WriterGate::new()),
        down: None,
        refuse: None,
    });
    let engine = Engine::new(
        log,
        vec![order::definition(&timing())],
        invoker,
        EngineConfig::default(),
    );
    gate.arm(GatePoint::BeforeFlush);
    let start = tokio::spawn({
        let engine = engine.clone();
        async move {
            engine
                .start(order::DEFINITION, "req-gone", order_payload(), Vec::new())
                .await
        }
    });
    let held = {
        let gate = Arc::clone(&gate);
        tokio::task::spawn_blocking(move || gate.wait_held(Duration::from_secs(10)))
            .await
            .expect("joins")
    };
    assert!(held, "the SagaStarted append reached the flush");
    start.abort();
    assert!(
        start.await.is_err_and(|e| e.is_cancelled()),
        "the caller went away"
    );
    gate.release();
    tokio::time::timeout(
        Duration::from_secs(10),
        engine.log().wait_durable_position(Position::FIRST),
    )
    .await
    .expect("the append completed in the writer")
    .expect("durable");
    let saga_id = engine
        .saga_of_request("req-gone")
        .await
        .expect("reads")
        .expect("the saga was started");
    wait_status(&engine, &saga_id, Status::Completed).await;
}

/// Panics in the balance step's call (a bug in an invoker); `reached` is notified when that
/// call is made.
#[derive(Default)]
struct PanickingInvoker {
    reached: tokio::sync::Notify,
}

impl StepInvoker for PanickingInvoker {
    fn invoke(
        &self,
        _saga_id: &str,
        step: &StepDef,
        _payload: &[u8],
    ) -> BoxFuture<'static, Result<(), StepError>> {
        let panics = step.name == order::DEDUCT_BALANCE;
        if panics {
            self.reached.notify_one();
        }
        Box::pin(async move {
            assert!(!panics, "invoker bug (test)");
            Ok(())
        })
    }
}

/// A driver worker that panics gives its place back: a drain does not wait its whole grace
/// for a worker that is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_driver_pass_does_not_hold_a_drain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_log(LogConfig::new(dir.path())).expect("opens");
    let invoker = Arc::new(PanickingInvoker::default());
    let engine = Engine::new(
        log,
        vec![order::definition(&timing())],
        Arc::clone(&invoker) as Arc<dyn StepInvoker>,
        EngineConfig::default(),
    );
    engine
        .start(order::DEFINITION, "req-panics", order_payload(), Vec::new())
        .await
        .expect("starts");
    // The pass reaches the balance step, then panics.
    tokio::time::timeout(Duration::from_secs(20), invoker.reached.notified())
        .await
        .expect("the balance step is called");
    let began = std::time::Instant::now();
    assert!(
        engine.drain(Duration::from_secs(20)).await,
        "every worker gave its place back"
    );
    assert!(began.elapsed() < Duration::from_secs(10), "{:?}", began.elapsed());
}

/// Fails the first call of the stock step transiently; counts the calls of each step.
#[derive(Default)]
struct FlakyStock {
    calls: Mutex<Vec<String>>,
}

impl StepInvoker for FlakyStock {
    fn invoke(
        &self,
        _saga_id: &str,
        step: &StepDef,
        _payload: &[u8],
    ) -> BoxFuture<'static, Result<(), StepError>> {
        let mut calls = self.calls.lock().unwrap();
        calls.push(step.name.clone());
        let first_stock =
            step.name == order::RESERVE_STOCK && calls.iter().filter(|c| **c == step.name).count() == 1;
        Box::pin(async move {
            if first_stock {
                Err(StepError::Transient("stock down (test)".into()))
            } else {
                Ok(())
            }
        })
    }
}

/// A drain that begins while a retry waits its backoff calls no further step: the retry is
/// left to the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_during_a_retry_backoff_calls_no_further_step() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_log(LogConfig::new(dir.path())).expect("opens");
    let invoker = Arc::new(FlakyStock::default());
    let timing = OrderTiming {
        step_deadline_ms: 1_000,
        attempts_max: 3,
        backoff_base_ms: 1_000,
        backoff_max_ms: 1_000,
    };
    let engine = Engine::new(
        log,
        vec![order::definition(&timing)],
        Arc::clone(&invoker) as Arc<dyn StepInvoker>,
        EngineConfig::default(),
    );
    let (state, _) = engine
        .start(order::DEFINITION, "req-backoff", order_payload(), Vec::new())
        .await
        .expect("starts");
    // The first attempt failed (its outcome is durable before the backoff); drain now.
    let mut tail = engine.log().subscribe(Position::new(1));
    loop {
        let record = tail.next().await.expect("tail");
        if record.stream() == state.saga_id
            && matches!(
                record.decode::<SagaEvent>().expect("decodes"),
                SagaEvent::StepFailed { .. }
            )
        {
            break;
        }
    }
    assert!(engine.drain(Duration::from_secs(10)).await, "the pass ended");
    let calls = invoker.calls.lock().unwrap().clone();
    assert_eq!(
        calls.iter().filter(|c| *c == order::RESERVE_STOCK).count(),
        1,
        "no retry after the drain began: {calls:?}"
    );
    let saga = engine.load(&state.saga_id).await.expect("loads").expect("exists");
    assert_eq!(saga.status, Status::Running, "left for the next start");
}

//! The orchestrator's saga metrics against a recorder installed for this test binary (one test:
//! the recorder is global to the process). The in-flight gauge follows each saga's status, also
//! when a stuck saga ends by a late acknowledgement.

use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use saga_messaging::transport::BoxFuture;
use saga_orchestrator::definition::StepDef;
use saga_orchestrator::engine::{Engine, EngineConfig, StepError, StepInvoker, open_log};
use saga_orchestrator::metric;
use saga_orchestrator::order::{self, OrderTiming};
use saga_orchestrator::state::Status;
use saga_proto::v1 as pb;
use saga_storage::LogConfig;
use saga_storage::gate::{GatePoint, WriterGate};
use std::future::Future as _;

/// Refuses the balance step of an order of 1 (minor unit), never answers it for an order of 2,
/// accepts everything else.
struct Invoker;

const REFUSED: i64 = 1;
const HANGS: i64 = 2;

impl StepInvoker for Invoker {
    fn invoke(
        &self,
        _saga_id: &str,
        step: &StepDef,
        payload: &[u8],
    ) -> BoxFuture<'static, Result<(), StepError>> {
        let amount = pb::OrderDetails::decode(payload).expect("order").amount_minor;
        let balance = step.name == order::DEDUCT_BALANCE;
        Box::pin(async move {
            match amount {
                REFUSED if balance => Err(StepError::Business("refused (test)".into())),
                HANGS if balance => std::future::pending().await,
                _ => Ok(()),
            }
        })
    }
}

fn payload(amount_minor: i64) -> Vec<u8> {
    pb::OrderDetails {
        user_id: "u1".into(),
        items: vec![pb::OrderItem {
            product_id: "p1".into(),
            quantity: 1,
        }],
        amount_minor,
        coupon_id: "c1".into(),
        ..Default::default()
    }
    .encode_to_vec()
}

async fn wait_status(engine: &Engine, saga_id: &str, wanted: Status) {
    let mut watch = engine.watch(saga_id);
    tokio::time::timeout(Duration::from_secs(20), async {
        while engine.load(saga_id).await.expect("loads").expect("exists").status != wanted {
            watch.changed().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("saga {saga_id} never reached {wanted:?}"));
}

/// The value of the sample `name` (no labels, or the `definition="order"` one) in the text.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(name)?;
            let value = rest
                .strip_prefix(' ')
                .or_else(|| rest.strip_prefix("{definition=\"order\"} "))?;
            value.trim().parse().ok()
        })
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
}

use saga_tests::compensation_ack as ack;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_flight_gauge_follows_each_sagas_status() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).expect("the only recorder of this binary");

    let dir = tempfile::tempdir().expect("tempdir");
    let gate = Arc::new(WriterGate::new());
    let log = open_log(LogConfig {
        gate: Some(Arc::clone(&gate)),
        ..LogConfig::new(dir.path())
    })
    .expect("opens");
    let timing = OrderTiming {
        step_deadline_ms: 120_000,
        attempts_max: 1,
        backoff_base_ms: 1,
        backoff_max_ms: 2,
    };
    let engine = Engine::new(
        log,
        vec![order::definition(&timing)],
        Arc::new(Invoker),
        EngineConfig::default(),
    );
    assert_eq!(engine.count_in_flight().await.expect("counts"), 0);

    // Compensating, then stuck on a parked compensation, then compensated from Stuck by the
    // parked step's late acknowledgement: it leaves the gauge once.
    let (state, _) = engine
        .start(order::DEFINITION, "req-refused", payload(REFUSED), Vec::new())
        .await
        .expect("starts");
    let id = state.saga_id;
    wait_status(&engine, &id, Status::Compensating).await;
    use pb::CompensationOutcome as O;
    for (step, outcome) in [
        (order::LOCK_COUPON, O::Applied),
        (order::CREATE_ORDER, O::Null),
        (order::RESERVE_STOCK, O::Parked),
    ] {
        engine.on_ack(&ack(&id, step, outcome)).await.expect("applies");
    }
    assert_eq!(engine.load(&id).await.unwrap().unwrap().status, Status::Stuck);
    engine
        .on_ack(&ack(&id, order::RESERVE_STOCK, O::Applied))
        .await
        .expect("applies");
    assert_eq!(
        engine.load(&id).await.unwrap().unwrap().status,
        Status::Compensated
    );

    let text = handle.render();
    assert_eq!(sample(&text, metric::SAGAS_STARTED_TOTAL), 1.0, "{text}");
    assert_eq!(sample(&text, metric::SAGAS_STUCK_TOTAL), 1.0, "{text}");
    assert_eq!(sample(&text, metric::SAGAS_COMPENSATED_TOTAL), 1.0, "{text}");
    assert_eq!(sample(&text, metric::SAGAS_IN_FLIGHT), 0.0, "{text}");

    // A saga left running is in flight, and counting the log again (what a start does) agrees.
    let (state, _) = engine
        .start(order::DEFINITION, "req-hangs", payload(HANGS), Vec::new())
        .await
        .expect("starts");
    assert_eq!(
        engine.load(&state.saga_id).await.unwrap().unwrap().status,
        Status::Running
    );
    assert_eq!(sample(&handle.render(), metric::SAGAS_IN_FLIGHT), 1.0);
    assert_eq!(engine.count_in_flight().await.expect("counts"), 1);
    assert_eq!(sample(&handle.render(), metric::SAGAS_IN_FLIGHT), 1.0);

    // Two acknowledgements of one saga decided from the same version: the second one's append
    // meets a version conflict (counted), and it decides again from the first one's result.
    let (state, _) = engine
        .start(order::DEFINITION, "req-conflict", payload(REFUSED), Vec::new())
        .await
        .expect("starts");
    let id = state.saga_id;
    wait_status(&engine, &id, Status::Compensating).await;
    assert!(
        !handle.render().contains(metric::SAGA_APPEND_CONFLICTS_TOTAL),
        "no conflict so far: every append above had the saga's stream to itself"
    );
    gate.arm(GatePoint::BeforeCommit);
    let first = tokio::spawn({
        let (engine, ack) = (engine.clone(), ack(&id, order::LOCK_COUPON, O::Applied));
        async move { engine.on_ack(&ack).await }
    });
    assert!(
        gate.held(Duration::from_secs(20)).await,
        "the first ack's append reached the writer"
    );
    let second_ack = ack(&id, order::RESERVE_STOCK, O::Applied);
    let mut second = Box::pin(engine.on_ack(&second_ack));
    // Polled until it waits: it has read the saga (committed, durable) and queued its append
    // at the version the held one is about to take.
    std::future::poll_fn(|cx| {
        assert!(second.as_mut().poll(cx).is_pending(), "the writer is held");
        std::task::Poll::Ready(())
    })
    .await;
    gate.release();
    first.await.expect("joins").expect("applies");
    second.await.expect("applies after deciding again");
    assert_eq!(sample(&handle.render(), metric::SAGA_APPEND_CONFLICTS_TOTAL), 1.0);
    let state = engine.load(&id).await.unwrap().unwrap();
    let applied: Vec<&str> = state
        .steps
        .iter()
        .filter(|s| s.phase == saga_orchestrator::state::Phase::Compensated)
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(
        applied.len(),
        2,
        "both acknowledgements are in the log: {applied:?}"
    );
}

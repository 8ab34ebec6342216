//! `saga-participant` as a real process: restart after SIGKILL, and compensations through the
//! real RocketMQ broker (scripts/dev-env): a duplicate is applied once, and a crash between
//! applying and acknowledging is healed by redelivery, the consumer log and the barrier.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message as _;
use saga_messaging::rocketmq::{RocketMqConfig, RocketMqTransport};
use saga_messaging::topics;
use saga_messaging::transport::{BoxFuture, Delivery, Handler, Outcome, SubscriptionSpec, Transport};
use saga_participants::consumer::TRIES_MAX;
use saga_participants::faults::{CRASH_PREFIX_ENV, FAULT_PREFIX_ENV};
use saga_proto::v1 as pb;
use saga_storage::StreamVersion;
use saga_tests::{Proc, compensation_request, run_id, stock_level};
use tonic::transport::Channel;

/// Starts `saga-participant` as the stock role. `rocketmq`: name server and the test's run id.
/// Each test gets its own compensation topic and group: tests run at once, every group
/// receives every message of its topic, and a participant that never saw a step would record
/// a null compensation for it.
fn start_stock(data_dir: &std::path::Path, rocketmq: Option<(&str, &str)>, env: &[(&str, &str)]) -> Proc {
    let mut args: Vec<String> = vec![
        "--role".into(),
        "stock".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        data_dir.to_string_lossy().into_owned(),
    ];
    if let Some((namesrv, run)) = rocketmq {
        args.extend([
            "--rocketmq".into(),
            namesrv.to_owned(),
            "--group".into(),
            format!("stock-{run}"),
            "--compensation-topic".into(),
            format!("comp-{run}"),
        ]);
    }
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Proc::start("saga-participant", &args, &env)
}

async fn stock_client(p: &Proc) -> pb::stock_service_client::StockServiceClient<Channel> {
    pb::stock_service_client::StockServiceClient::new(p.channel().await)
}

fn reserve(saga: &str, product: &str) -> pb::ReserveStockRequest {
    pb::ReserveStockRequest {
        key: Some(pb::StepKey {
            saga_id: saga.into(),
            step: "reserve_stock".into(),
        }),
        order_id: saga.into(),
        items: vec![pb::OrderItem {
            product_id: product.into(),
            quantity: 2,
        }],
    }
}

async fn seed(client: &mut pb::stock_service_client::StockServiceClient<Channel>, product: &str) {
    client
        .seed_stock(pb::SeedStockRequest {
            stock: vec![pb::ProductStock {
                product_id: product.into(),
                available: 100,
                reserved: 0,
            }],
        })
        .await
        .expect("seeds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_participant_restarts_with_every_acknowledged_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = start_stock(dir.path(), None, &[]);
    let mut client = stock_client(&p).await;
    seed(&mut client, "p1").await;
    for i in 0..20 {
        client
            .reserve_stock(reserve(&format!("k{i}"), "p1"))
            .await
            .expect("reserves");
    }
    let invalid = client
        .reserve_stock(reserve("", "p1"))
        .await
        .expect_err("invalid");
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
    assert_eq!(stock_level(&mut client, "p1").await, (60, 40));
    p.kill();

    let p = start_stock(dir.path(), None, &[]);
    let mut client = stock_client(&p).await;
    assert_eq!(
        stock_level(&mut client, "p1").await,
        (60, 40),
        "every acknowledged reservation survived SIGKILL"
    );
    let again = client
        .reserve_stock(reserve("k7", "p1"))
        .await
        .expect("replays")
        .into_inner();
    assert!(again.replayed, "the barrier survived too");
    assert_eq!(stock_level(&mut client, "p1").await, (60, 40));
}

/// Acks of one run (the ack topic holds older runs' acks too).
struct Acks {
    run: String,
    seen: Mutex<Vec<pb::CompensationAck>>,
    changed: tokio::sync::Notify,
}

impl Handler for Acks {
    fn handle(&self, delivery: Delivery) -> BoxFuture<'static, Outcome> {
        if delivery.key.starts_with(&self.run)
            && let Ok(ack) = pb::CompensationAck::decode(delivery.body.as_slice())
        {
            self.seen.lock().expect("not poisoned").push(ack);
            self.changed.notify_waiters();
        }
        Box::pin(async { Outcome::Consumed })
    }
}

impl Acks {
    async fn wait_for(&self, n: usize, patience: Duration) -> Vec<pb::CompensationAck> {
        self.wait_until(|seen| seen.len() >= n, patience).await
    }

    /// What was seen once `done` holds of it, or when `patience` ran out.
    async fn wait_until(
        &self,
        done: impl Fn(&[pb::CompensationAck]) -> bool,
        patience: Duration,
    ) -> Vec<pb::CompensationAck> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let notified = self.changed.notified();
            let seen = self.seen.lock().expect("not poisoned").clone();
            if done(&seen) || tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.seen.lock().expect("not poisoned").clone();
            }
        }
    }
}

async fn ack_listener(
    namesrv: &str,
    run: &str,
) -> (
    RocketMqTransport,
    Box<dyn saga_messaging::transport::Consumer>,
    Arc<Acks>,
) {
    let transport = RocketMqTransport::start(RocketMqConfig::new(namesrv), &format!("test-{run}"))
        .await
        .expect("client");
    transport
        .ensure_topics(&[&format!("comp-{run}")], 2, Duration::from_secs(30))
        .await
        .expect("creates the run's compensation topic");
    let acks = Arc::new(Acks {
        run: run.to_owned(),
        seen: Mutex::default(),
        changed: tokio::sync::Notify::new(),
    });
    let consumer = transport
        .subscribe(
            SubscriptionSpec {
                group: format!("test-acks-{run}"),
                topic: topics::COMPENSATION_ACK_TOPIC.into(),
                tags: vec!["stock".into()],
            },
            acks.clone(),
        )
        .await
        .expect("subscribes");
    (transport, consumer, acks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compensation_delivered_twice_by_rocketmq_is_applied_once() {
    let Some(namesrv) = topics::namesrv_for_tests() else {
        return;
    };
    let run = run_id();
    let dir = tempfile::tempdir().expect("tempdir");
    let (transport, consumer, acks) = ack_listener(&namesrv, &run).await;
    let p = start_stock(dir.path(), Some((&namesrv, &run)), &[]);
    let mut client = stock_client(&p).await;
    let product = format!("p{run}");
    seed(&mut client, &product).await;
    let saga = format!("{run}-dup");
    client
        .reserve_stock(reserve(&saga, &product))
        .await
        .expect("reserves");
    transport
        .publish(&[compensation_request(
            &format!("comp-{run}"),
            "stock",
            &saga,
            "reserve_stock",
        )])
        .await
        .expect("publishes");
    transport
        .publish(&[compensation_request(
            &format!("comp-{run}"),
            "stock",
            &saga,
            "reserve_stock",
        )])
        .await
        .expect("publishes the duplicate");
    let seen = acks.wait_for(2, Duration::from_secs(60)).await;
    consumer.shutdown().await;
    transport.shutdown().await;
    let mut outcomes: Vec<i32> = seen.iter().map(|a| a.outcome).collect();
    outcomes.sort_unstable();
    assert_eq!(
        outcomes,
        vec![
            pb::CompensationOutcome::Applied as i32,
            pb::CompensationOutcome::AlreadyApplied as i32
        ],
        "one application, one duplicate acknowledged: {seen:?}"
    );
    assert_eq!(
        stock_level(&mut client, &product).await,
        (100, 0),
        "released exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_killed_after_applying_before_consuming_applies_exactly_once_after_restart() {
    let Some(namesrv) = topics::namesrv_for_tests() else {
        return;
    };
    let run = run_id();
    let dir = tempfile::tempdir().expect("tempdir");
    let crash_prefix = format!("{run}-crash");
    let (transport, consumer, acks) = ack_listener(&namesrv, &run).await;
    let p = start_stock(
        dir.path(),
        Some((&namesrv, &run)),
        &[(CRASH_PREFIX_ENV, &crash_prefix)],
    );
    let mut client = stock_client(&p).await;
    let product = format!("p{run}");
    seed(&mut client, &product).await;
    let saga = format!("{run}-crash");
    client
        .reserve_stock(reserve(&saga, &product))
        .await
        .expect("reserves");
    transport
        .publish(&[compensation_request(
            &format!("comp-{run}"),
            "stock",
            &saga,
            "reserve_stock",
        )])
        .await
        .expect("publishes");
    // The participant applies the compensation (its consumer-log success and APPLIED ack in
    // the same append), then its handler freezes before handing the message back as consumed.
    // Once the release is visible, SIGKILL the process.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while stock_level(&mut client, &product).await != (100, 0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the compensation was not applied within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut p = p;
    p.child.kill().expect("SIGKILL");
    let status = p.child.wait().expect("reaped");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "killed by SIGKILL: {status:?}"
    );
    drop(p);

    // Restart without the fault: the relay sends the APPLIED ack the append left in the outbox
    // (unless it went before the kill), the broker redelivers the message, the consumer log
    // says "succeeded": acknowledged again (ALREADY_APPLIED), nothing released twice.
    let p = start_stock(dir.path(), Some((&namesrv, &run)), &[]);
    let outcome =
        |seen: &[pb::CompensationAck], o: pb::CompensationOutcome| seen.iter().any(|a| a.outcome == o as i32);
    let seen = acks
        .wait_until(
            |seen| {
                outcome(seen, pb::CompensationOutcome::Applied)
                    && outcome(seen, pb::CompensationOutcome::AlreadyApplied)
            },
            Duration::from_secs(90),
        )
        .await;
    consumer.shutdown().await;
    transport.shutdown().await;
    assert!(
        outcome(&seen, pb::CompensationOutcome::Applied),
        "the ack written with the undo was relayed: {seen:?}"
    );
    assert!(
        outcome(&seen, pb::CompensationOutcome::AlreadyApplied),
        "the redelivered compensation was acknowledged again: {seen:?}"
    );
    assert!(
        seen.iter()
            .all(|a| a.outcome == pb::CompensationOutcome::Applied as i32
                || a.outcome == pb::CompensationOutcome::AlreadyApplied as i32),
        "{seen:?}"
    );
    let mut client = stock_client(&p).await;
    assert_eq!(
        stock_level(&mut client, &product).await,
        (100, 0),
        "applied exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compensation_that_keeps_failing_is_parked_after_3_tries_and_listed() {
    let Some(namesrv) = topics::namesrv_for_tests() else {
        return;
    };
    let run = run_id();
    let dir = tempfile::tempdir().expect("tempdir");
    let (transport, consumer, acks) = ack_listener(&namesrv, &run).await;
    let failing = format!("{run}-fails");
    let p = start_stock(
        dir.path(),
        Some((&namesrv, &run)),
        &[(FAULT_PREFIX_ENV, &failing)],
    );
    let mut client = stock_client(&p).await;
    let product = format!("p{run}");
    seed(&mut client, &product).await;
    client
        .reserve_stock(reserve(&failing, &product))
        .await
        .expect("reserves");
    transport
        .publish(&[compensation_request(
            &format!("comp-{run}"),
            "stock",
            &failing,
            "reserve_stock",
        )])
        .await
        .expect("publishes");
    // The broker redelivers after ~10 s and ~40 s: the third failure parks it.
    let seen = acks.wait_for(1, Duration::from_secs(150)).await;
    consumer.shutdown().await;
    transport.shutdown().await;
    assert_eq!(seen.len(), 1, "one ack, for the parking: {seen:?}");
    assert_eq!(seen[0].outcome, pb::CompensationOutcome::Parked as i32);
    let mut admin = pb::consumer_admin_client::ConsumerAdminClient::new(p.channel().await);
    let parked = admin
        .list_parked(pb::ListParkedRequest::default())
        .await
        .expect("lists")
        .into_inner()
        .parked;
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(parked[0].tries, TRIES_MAX);
    assert_eq!(parked[0].key, format!("{failing}:reserve_stock"));
    assert_eq!(
        parked[0].body,
        compensation_request(&format!("comp-{run}"), "stock", &failing, "reserve_stock").body,
        "the message is kept, not dropped"
    );
    assert_eq!(
        stock_level(&mut client, &product).await,
        (98, 2),
        "not applied while parked"
    );
}

/// The four barrier rules against a separate process, compensations arriving through the real
/// broker, asserted on the participant's state and then on its own log (read after it stopped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barrier_rules_hold_in_a_separate_process_through_the_broker() {
    let Some(namesrv) = topics::namesrv_for_tests() else {
        return;
    };
    let run = run_id();
    let dir = tempfile::tempdir().expect("tempdir");
    let (transport, consumer, acks) = ack_listener(&namesrv, &run).await;
    let p = start_stock(dir.path(), Some((&namesrv, &run)), &[]);
    let mut client = stock_client(&p).await;
    let product = format!("p{run}");
    seed(&mut client, &product).await;

    // Duplicate action: the first outcome again, nothing reserved twice.
    let done = format!("{run}-done");
    let first = client
        .reserve_stock(reserve(&done, &product))
        .await
        .expect("reserves")
        .into_inner();
    let again = client
        .reserve_stock(reserve(&done, &product))
        .await
        .expect("replays")
        .into_inner();
    assert!(!first.replayed && again.replayed);
    assert_eq!(stock_level(&mut client, &product).await, (98, 2));

    // Null compensation, then the late action is refused.
    let never = format!("{run}-never");
    transport
        .publish(&[compensation_request(
            &format!("comp-{run}"),
            "stock",
            &never,
            "reserve_stock",
        )])
        .await
        .expect("publishes");
    let seen = acks.wait_for(1, Duration::from_secs(60)).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].outcome, pb::CompensationOutcome::Null as i32);
    let late = client
        .reserve_stock(reserve(&never, &product))
        .await
        .expect_err("late action refused");
    assert_eq!(late.code(), tonic::Code::FailedPrecondition, "{late:?}");
    let refusal = saga_proto::status::refusal_of(&late).expect("refusal detail");
    assert_eq!(refusal.reason, pb::RefusalReason::AlreadyCompensated as i32);
    assert_eq!(
        stock_level(&mut client, &product).await,
        (98, 2),
        "nothing hangs reserved"
    );

    // Duplicate compensation: undone once.
    transport
        .publish(&[compensation_request(
            &format!("comp-{run}"),
            "stock",
            &done,
            "reserve_stock",
        )])
        .await
        .expect("publishes");
    transport
        .publish(&[compensation_request(
            &format!("comp-{run}"),
            "stock",
            &done,
            "reserve_stock",
        )])
        .await
        .expect("publishes the duplicate");
    let seen = acks.wait_for(3, Duration::from_secs(60)).await;
    consumer.shutdown().await;
    transport.shutdown().await;
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(
        stock_level(&mut client, &product).await,
        (100, 0),
        "released exactly once"
    );
    drop(client);

    // The events, from the participant's own log once it is gone.
    p.kill();
    let log = saga_storage::EventLog::open(saga_storage::LogConfig::new(dir.path())).expect("reopens");
    let types = |stream: String| {
        let log = log.clone();
        async move {
            log.read_stream(&stream, StreamVersion::new(1), 10)
                .await
                .expect("reads")
                .iter()
                .map(|r| r.event_type().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        types(saga_participants::keys::step_stream(&done, "reserve_stock")).await,
        vec!["StockReserved", "StockReleased"],
        "one action, one compensation, duplicates recorded nowhere"
    );
    assert_eq!(
        types(saga_participants::keys::step_stream(&never, "reserve_stock")).await,
        vec!["NullCompensated"],
        "the null compensation is recorded, the late action is not"
    );
}

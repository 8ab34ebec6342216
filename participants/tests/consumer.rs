//! The compensation consumer on the embedded transport (the RocketMQ provider passes the same
//! transport conformance suite; process-level runs with the broker are in saga-tests).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message as _;
use saga_messaging::embedded::{EmbeddedConfig, EmbeddedTransport};
use saga_messaging::topics;
use saga_messaging::transport::{
    BoxFuture, Delivery, Handler, Outcome, Outgoing, SubscriptionSpec, Transport,
};
use saga_participants::barrier::{self, StepKey};
use saga_participants::consumer::{CompensationConsumer, TRIES_MAX};
use saga_participants::consumer_log::ConsumerEvent;
use saga_participants::faults::FaultPlan;
use saga_participants::keys;
use saga_participants::order::OrderEvent;
use saga_participants::record::ParticipantEvent;
use saga_participants::stock::{Item, StockEvent, StockLevel};
use saga_participants::{Participant, Role};
use saga_proto::v1 as pb;
use saga_storage::StreamVersion;
use saga_storage::{AppendRequest, ExpectedVersion, NewEvent};
use saga_tests::compensation_request;

/// Collects the acknowledgements the consumer publishes.
#[derive(Default)]
struct Acks {
    seen: Mutex<Vec<pb::CompensationAck>>,
    changed: tokio::sync::Notify,
}

impl Handler for Acks {
    fn handle(&self, delivery: Delivery) -> BoxFuture<'static, Outcome> {
        let ack = pb::CompensationAck::decode(delivery.body.as_slice()).expect("ack decodes");
        self.seen.lock().expect("not poisoned").push(ack);
        self.changed.notify_waiters();
        Box::pin(async { Outcome::Consumed })
    }
}

impl Acks {
    async fn wait_for(&self, n: usize) -> Vec<pb::CompensationAck> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let notified = self.changed.notified();
            let seen = self.seen.lock().expect("not poisoned").clone();
            if seen.len() >= n {
                return seen;
            }
            assert!(
                tokio::time::timeout_at(deadline, notified).await.is_ok(),
                "only {} of {n} acks arrived: {seen:?}",
                seen.len()
            );
        }
    }
}

/// A stock consumer subscribed to the embedded queue (deliveries through the transport), its
/// acks collected; see [`direct`].
async fn setup(fault_prefix: Option<&str>) -> Direct {
    let s = direct(Role::Stock, fault_prefix).await;
    // Leak the running subscription for the test's lifetime: the runtime ends with the test.
    std::mem::forget(
        s.flaky
            .inner
            .subscribe(s.consumer.spec(), s.consumer.clone())
            .await
            .expect("subscribes"),
    );
    s
}

async fn reserve(p: &Participant, saga: &str) -> StepKey {
    let key = StepKey {
        saga_id: saga.into(),
        step: "reserve_stock".into(),
    };
    let action = StockEvent::Reserved {
        order_id: saga.into(),
        items: vec![Item {
            product_id: "p1".into(),
            quantity: 4,
        }],
    };
    barrier::act(p.log(), &key, action.into())
        .await
        .expect("reserves");
    key
}

async fn level(p: &Participant) -> StockLevel {
    let bytes = p
        .log()
        .projection_get(keys::stock("p1"))
        .await
        .expect("reads")
        .expect("present");
    saga_storage::codec::decode(&bytes).expect("decodes")
}

/// The seeded 10 units are all available again: the reservation (of 4) was released, once.
async fn assert_released_once(p: &Participant) {
    assert_eq!(
        level(p).await,
        StockLevel {
            available: 10,
            reserved: 0
        },
        "released once"
    );
}

async fn consumer_log(p: &Participant, key: &StepKey) -> Vec<String> {
    let stream = format!(
        "consumer/saga-compensation-stock/stock/{}:{}",
        key.saga_id, key.step
    );
    p.log()
        .read_stream(&stream, StreamVersion::new(1), 100)
        .await
        .expect("reads")
        .iter()
        .map(|r| r.event_type().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compensation_delivered_twice_is_applied_once_and_acked_twice() {
    let s = setup(None).await;
    let key = reserve(&s.participant, "saga-1").await;
    assert_eq!(
        level(&s.participant).await,
        StockLevel {
            available: 6,
            reserved: 4
        }
    );
    s.flaky
        .inner
        .publish(&[compensation_request(
            topics::COMPENSATION_TOPIC,
            "stock",
            &key.saga_id,
            &key.step,
        )])
        .await
        .expect("publishes");
    s.flaky
        .inner
        .publish(&[compensation_request(
            topics::COMPENSATION_TOPIC,
            "stock",
            &key.saga_id,
            &key.step,
        )])
        .await
        .expect("publishes the duplicate");
    let acks = s.acks.wait_for(2).await;
    let outcomes: Vec<i32> = acks.iter().map(|a| a.outcome).collect();
    assert_eq!(
        outcomes,
        vec![
            pb::CompensationOutcome::Applied as i32,
            pb::CompensationOutcome::AlreadyApplied as i32
        ]
    );
    assert_released_once(&s.participant).await;
    assert_eq!(
        consumer_log(&s.participant, &key).await,
        vec!["ConsumeStarted", "ConsumeSucceeded", "DuplicateAcknowledged"],
        "the duplicate was skipped (only its ack was written again)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compensation_that_keeps_failing_is_parked_after_3_tries_never_dropped() {
    let s = setup(Some("bad-")).await;
    let key = reserve(&s.participant, "bad-1").await;
    s.flaky
        .inner
        .publish(&[compensation_request(
            topics::COMPENSATION_TOPIC,
            "stock",
            &key.saga_id,
            &key.step,
        )])
        .await
        .expect("publishes");
    let acks = s.acks.wait_for(1).await;
    assert_eq!(acks[0].outcome, pb::CompensationOutcome::Parked as i32);
    assert!(acks[0].detail.contains("injected fault"), "{:?}", acks[0].detail);
    let parked = s.consumer.parked(None, 100).await.expect("lists");
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].tries, TRIES_MAX);
    assert_eq!(parked[0].key, "bad-1:reserve_stock");
    assert_eq!(
        parked[0].body,
        compensation_request(topics::COMPENSATION_TOPIC, "stock", &key.saga_id, &key.step).body,
        "the original message is kept"
    );
    assert_eq!(
        consumer_log(&s.participant, &key).await,
        vec![
            "ConsumeStarted",
            "ConsumeFailed",
            "ConsumeStarted",
            "ConsumeFailed",
            "ConsumeStarted",
            "MessageParkedDigest"
        ]
    );
    assert_eq!(
        level(&s.participant).await,
        StockLevel {
            available: 6,
            reserved: 4
        },
        "not applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_compensation_is_parked_at_once() {
    let s = setup(None).await;
    let mut garbage = compensation_request(topics::COMPENSATION_TOPIC, "stock", "x", "reserve_stock");
    garbage.key = "garbage".into();
    garbage.body = vec![0xFF, 0xFF, 0xFF];
    s.flaky.inner.publish(&[garbage]).await.expect("publishes");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let parked = loop {
        let parked = s.consumer.parked(None, 100).await.expect("lists");
        if !parked.is_empty() {
            break parked;
        }
        assert!(tokio::time::Instant::now() < deadline, "garbage was never parked");
        // Polling the parked list: the consumer publishes no ack for a message without a key.
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(parked[0].key, "garbage");
    assert_eq!(parked[0].tries, 1);
    assert!(
        parked[0].last_error.contains("undecodable"),
        "{}",
        parked[0].last_error
    );
}

/// A transport whose publishes fail while `down` is set (a broker outage seen by the
/// publisher); deliveries are the inner transport's.
struct Flaky {
    inner: Arc<EmbeddedTransport>,
    down: std::sync::atomic::AtomicBool,
}

impl Transport for Flaky {
    fn publish<'a>(
        &'a self,
        messages: &'a [Outgoing],
    ) -> BoxFuture<'a, Result<(), saga_messaging::MessagingError>> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Box::pin(async {
                Err(saga_messaging::MessagingError::Unavailable(
                    "broker down (test)".into(),
                ))
            });
        }
        self.inner.publish(messages)
    }

    fn subscribe(
        &self,
        spec: SubscriptionSpec,
        handler: Arc<dyn Handler>,
    ) -> BoxFuture<'_, Result<Box<dyn saga_messaging::transport::Consumer>, saga_messaging::MessagingError>>
    {
        self.inner.subscribe(spec, handler)
    }
}

/// A consumer of `role` whose publishes go through a [`Flaky`] transport; deliveries are
/// handed to the consumer directly by the tests (no subscription), acks are collected from
/// the embedded queue.
struct Direct {
    participant: Participant,
    flaky: Arc<Flaky>,
    consumer: Arc<CompensationConsumer>,
    acks: Arc<Acks>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

async fn direct(role: Role, fault_prefix: Option<&str>) -> Direct {
    let (pdir, qdir) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let mut participant = Participant::open(role, pdir.path()).expect("opens");
    if let Some(prefix) = fault_prefix {
        let prefix = prefix.to_owned();
        let failing: saga_participants::BarrierDecorator = Arc::new(move |_, inner| {
            FaultPlan {
                compensation_fails_for: Some(prefix.clone()),
                ..FaultPlan::default()
            }
            .decorate(inner)
        });
        participant = participant.with_barrier(&failing);
    }
    let inner = Arc::new(
        EmbeddedTransport::open(
            qdir.path(),
            EmbeddedConfig {
                retry_delay_base: Duration::from_millis(20),
                retry_delay_max: Duration::from_millis(100),
            },
        )
        .expect("queue"),
    );
    let flaky = Arc::new(Flaky {
        inner: inner.clone(),
        down: std::sync::atomic::AtomicBool::new(false),
    });
    let consumer = Arc::new(CompensationConsumer::new(participant.clone(), flaky.clone()));
    let acks = Arc::new(Acks::default());
    let spec = SubscriptionSpec {
        group: "test-orchestrator".into(),
        topic: topics::COMPENSATION_ACK_TOPIC.into(),
        tags: vec![],
    };
    std::mem::forget(inner.subscribe(spec, acks.clone()).await.expect("subscribes"));
    let seed = ParticipantEvent::from(StockEvent::Seeded {
        product_id: "p1".into(),
        available: 10,
    });
    participant
        .log()
        .append(
            AppendRequest::new("seed/product/p1", ExpectedVersion::NoStream)
                .event(NewEvent::encode(seed.name(), &seed).expect("enc")),
        )
        .await
        .expect("seeds");
    Direct {
        participant,
        flaky,
        consumer,
        acks,
        _dirs: (pdir, qdir),
    }
}

fn delivery(message: Outgoing) -> Delivery {
    Delivery {
        topic: message.topic,
        tag: message.tag,
        key: message.key,
        body: message.body,
        properties: message.properties,
        attempt: 0,
    }
}

/// Delivers until the consumer stops asking for a redelivery (as a transport would), at most
/// `times` deliveries.
async fn deliver_until_consumed(consumer: &CompensationConsumer, message: &Outgoing, times: u32) -> u32 {
    for attempt in 0..times {
        let mut d = delivery(message.clone());
        d.attempt = attempt;
        if consumer.handle(d).await == Outcome::Consumed {
            return attempt + 1;
        }
    }
    panic!("not consumed after {times} deliveries");
}

/// A compensation costs two durable appends: the try's start, then the undo with its
/// consumer-log success and its ack (one atomic append across the step's and the consumer
/// log's streams), so no crash can leave the undo without the success and the ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_is_two_appends_the_undo_with_its_success_and_ack() {
    let s = direct(Role::Stock, None).await;
    let key = reserve(&s.participant, "saga-2a").await;
    let message = compensation_request(topics::COMPENSATION_TOPIC, "stock", &key.saga_id, &key.step);
    let before = s.participant.log().stats();
    assert_eq!(deliver_until_consumed(&s.consumer, &message, 1).await, 1);
    let after = s.participant.log().stats();
    assert_eq!(
        after.appends - before.appends,
        2,
        "ConsumeStarted, then the undo with ConsumeSucceeded and the ack: {before:?} -> {after:?}"
    );
    assert_released_once(&s.participant).await;
    assert_eq!(
        consumer_log(&s.participant, &key).await,
        vec!["ConsumeStarted", "ConsumeSucceeded"]
    );
    // The undo and the success are one append: consecutive positions, one commit timestamp.
    let undo = s
        .participant
        .log()
        .read_stream(&key.stream(), StreamVersion::new(2), 1)
        .await
        .expect("reads");
    let consumer_stream = format!(
        "consumer/saga-compensation-stock/stock/{}:{}",
        key.saga_id, key.step
    );
    let success = s
        .participant
        .log()
        .read_stream(&consumer_stream, StreamVersion::new(2), 1)
        .await
        .expect("reads");
    assert_eq!(undo[0].event_type(), "StockReleased");
    assert_eq!(success[0].position().get(), undo[0].position().get() + 1);
    assert_eq!(success[0].timestamp_us(), undo[0].timestamp_us());
    // Its ack was in that append's outbox and is relayed.
    let acks = s.acks.wait_for(1).await;
    assert_eq!(acks[0].outcome, pb::CompensationOutcome::Applied as i32);
}

/// A log written before the undo and its success were one append can hold an undo whose try
/// never recorded success (the process died between the two). Its redelivery finds the step
/// compensated: nothing is undone again, the success is recorded with an ALREADY_APPLIED ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undo_recorded_without_its_success_is_acknowledged_already_applied() {
    let s = direct(Role::Stock, None).await;
    let key = reserve(&s.participant, "saga-old").await;
    let consumer_stream = format!(
        "consumer/saga-compensation-stock/stock/{}:{}",
        key.saga_id, key.step
    );
    let started = ParticipantEvent::from(ConsumerEvent::Started { attempt: 1 });
    s.participant
        .log()
        .append(
            AppendRequest::new(consumer_stream.as_str(), ExpectedVersion::NoStream)
                .event(NewEvent::encode(started.name(), &started).expect("enc")),
        )
        .await
        .expect("try started");
    assert_eq!(
        barrier::compensate(s.participant.log(), &key, None)
            .await
            .expect("undone"),
        barrier::Compensated::Applied
    );
    let message = compensation_request(topics::COMPENSATION_TOPIC, "stock", &key.saga_id, &key.step);
    assert_eq!(deliver_until_consumed(&s.consumer, &message, 1).await, 1);
    assert_released_once(&s.participant).await;
    assert_eq!(
        consumer_log(&s.participant, &key).await,
        vec!["ConsumeStarted", "ConsumeStarted", "ConsumeSucceeded"]
    );
    let acks = s.acks.wait_for(1).await;
    assert_eq!(acks[0].outcome, pb::CompensationOutcome::AlreadyApplied as i32);
}

/// Item 3: a PARKED acknowledgement whose publish fails must not be lost: it is written to the
/// participant's log with the parking and relayed once the broker is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_ack_whose_publish_fails_is_relayed_later() {
    let s = direct(Role::Stock, Some("bad-")).await;
    let key = reserve(&s.participant, "bad-1").await;
    s.flaky.down.store(true, std::sync::atomic::Ordering::SeqCst);
    deliver_until_consumed(
        &s.consumer,
        &compensation_request(topics::COMPENSATION_TOPIC, "stock", &key.saga_id, &key.step),
        TRIES_MAX + 2,
    )
    .await;
    assert_eq!(s.consumer.parked(None, 10).await.expect("lists").len(), 1);
    assert!(
        s.acks.seen.lock().unwrap().is_empty(),
        "no ack while the broker is down"
    );
    s.flaky.down.store(false, std::sync::atomic::Ordering::SeqCst);
    let acks = s.acks.wait_for(1).await;
    assert_eq!(acks[0].outcome, pb::CompensationOutcome::Parked as i32);
    assert_eq!(acks[0].key.as_ref().expect("key").saga_id, "bad-1");
}

/// Item 3: an APPLIED acknowledgement whose publish fails is relayed later too, and the
/// delivery is consumed (the ack is durable in the participant's outbox).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_applied_ack_whose_publish_fails_is_relayed_later() {
    let s = direct(Role::Stock, None).await;
    let key = reserve(&s.participant, "saga-1").await;
    s.flaky.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut message = compensation_request(topics::COMPENSATION_TOPIC, "stock", &key.saga_id, &key.step);
    let mut request = pb::CompensationRequest::decode(message.body.as_slice()).expect("decodes");
    request.round = 7;
    message.body = request.encode_to_vec();
    let deliveries = deliver_until_consumed(&s.consumer, &message, 3).await;
    assert_eq!(deliveries, 1, "consumed at once: the ack is in the outbox");
    s.flaky.down.store(false, std::sync::atomic::Ordering::SeqCst);
    let acks = s.acks.wait_for(1).await;
    assert_eq!(acks[0].outcome, pb::CompensationOutcome::Applied as i32);
    assert_eq!(acks[0].round, 7, "the ack echoes the request's round");
}

/// Item 3: an undecodable message whose transport key names a step is parked and the
/// orchestrator hears of it (PARKED ack for that key), instead of waiting for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_message_with_a_step_key_is_parked_and_acknowledged_parked() {
    let s = direct(Role::Stock, None).await;
    let mut garbage = compensation_request(topics::COMPENSATION_TOPIC, "stock", "saga-7", "reserve_stock");
    garbage.body = vec![0xFF, 0xFF, 0xFF];
    deliver_until_consumed(&s.consumer, &garbage, 1).await;
    let acks = s.acks.wait_for(1).await;
    assert_eq!(acks[0].outcome, pb::CompensationOutcome::Parked as i32);
    let key = acks[0].key.as_ref().expect("key");
    assert_eq!(
        (key.saga_id.as_str(), key.step.as_str()),
        ("saga-7", "reserve_stock")
    );
}

/// Item 4: compensating the creation of an order that was confirmed is an invariant a message
/// can violate: a refusal that parks the message, not a panic of the log's writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compensating_a_confirmed_order_is_refused_and_parked_and_the_log_goes_on() {
    let s = direct(Role::Order, None).await;
    let create = StepKey {
        saga_id: "ord-1".into(),
        step: "create_order".into(),
    };
    let created = OrderEvent::Created {
        order_id: "ord-1".into(),
        user_id: "u1".into(),
        items: vec![],
        amount_minor: 5,
        coupon_id: String::new(),
    };
    barrier::act(s.participant.log(), &create, created.into())
        .await
        .expect("creates");
    let confirm = StepKey {
        saga_id: "ord-1".into(),
        step: "confirm_order".into(),
    };
    let confirmed = OrderEvent::Confirmed {
        order_id: "ord-1".into(),
    };
    barrier::act(s.participant.log(), &confirm, confirmed.into())
        .await
        .expect("confirms");
    deliver_until_consumed(
        &s.consumer,
        &compensation_request(topics::COMPENSATION_TOPIC, "order", &create.saga_id, &create.step),
        TRIES_MAX + 2,
    )
    .await;
    let acks = s.acks.wait_for(1).await;
    assert_eq!(acks[0].outcome, pb::CompensationOutcome::Parked as i32);
    assert!(
        acks[0].detail.contains("Confirmed") || acks[0].detail.contains("confirmed"),
        "{}",
        acks[0].detail
    );
    // The writer still works.
    let key = reserve(&s.participant, "ord-2").await;
    assert_eq!(key.saga_id, "ord-2");
}

/// Item 4: a try that started and never finished (the process died in it) counts, so a poison
/// message that kills the process is parked after TRIES_MAX such tries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tries_that_never_finished_count_and_park_a_poison_message() {
    let s = direct(Role::Stock, None).await;
    let key = reserve(&s.participant, "saga-3").await;
    let stream = format!(
        "consumer/saga-compensation-stock/stock/{}:{}",
        key.saga_id, key.step
    );
    for attempt in 1..=TRIES_MAX {
        let started = ParticipantEvent::from(ConsumerEvent::Started { attempt });
        s.participant
            .log()
            .append(
                AppendRequest::new(&stream, ExpectedVersion::Any)
                    .event(NewEvent::encode(started.name(), &started).expect("enc")),
            )
            .await
            .expect("appends");
    }
    deliver_until_consumed(
        &s.consumer,
        &compensation_request(topics::COMPENSATION_TOPIC, "stock", &key.saga_id, &key.step),
        1,
    )
    .await;
    let acks = s.acks.wait_for(1).await;
    assert_eq!(acks[0].outcome, pb::CompensationOutcome::Parked as i32);
    assert_eq!(
        level(&s.participant).await,
        StockLevel {
            available: 6,
            reserved: 4
        },
        "the poison message was not tried again"
    );
}

/// Item 7: the consumer log is keyed by the body's step key; a delivery whose transport key
/// disagrees with its body is parked, not applied under another key's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_whose_transport_key_disagrees_with_its_body_is_parked() {
    let s = direct(Role::Stock, None).await;
    let key = reserve(&s.participant, "saga-4").await;
    let mut message = compensation_request(topics::COMPENSATION_TOPIC, "stock", &key.saga_id, &key.step);
    message.key = "saga-5:reserve_stock".into();
    deliver_until_consumed(&s.consumer, &message, 1).await;
    let parked = s.consumer.parked(None, 10).await.expect("lists");
    assert_eq!(parked.len(), 1, "parked: {parked:?}");
    assert!(
        parked[0].last_error.contains("saga-5:reserve_stock"),
        "{}",
        parked[0].last_error
    );
    assert_eq!(
        level(&s.participant).await,
        StockLevel {
            available: 6,
            reserved: 4
        },
        "not applied"
    );
}

/// Item 8: RequeueParked publishes first and records after: a failed publish leaves the
/// message parked (and listed), instead of recorded as requeued and never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeue_whose_publish_fails_leaves_the_message_parked() {
    let s = direct(Role::Stock, Some("bad-")).await;
    let key = reserve(&s.participant, "bad-2").await;
    deliver_until_consumed(
        &s.consumer,
        &compensation_request(topics::COMPENSATION_TOPIC, "stock", &key.saga_id, &key.step),
        TRIES_MAX + 2,
    )
    .await;
    let parked = s.consumer.parked(None, 10).await.expect("lists");
    assert_eq!(parked.len(), 1);
    s.flaky.down.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(
        s.consumer.requeue(&parked[0].log_key).await.is_err(),
        "the publish failed"
    );
    let still = s.consumer.parked(None, 10).await.expect("lists");
    assert_eq!(still.len(), 1, "still parked after a failed requeue");
}

/// Item 11: a compensation whose body is larger than the log's payload limit is parked with a
/// bounded prefix and a digest of the body (the whole body cannot be stored), and two
/// different messages parked under one key both stay visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_conflicting_messages_are_parked_and_all_visible() {
    let s = direct(Role::Stock, None).await;
    let mut huge = compensation_request(topics::COMPENSATION_TOPIC, "stock", "saga-8", "reserve_stock");
    huge.body = vec![0xFF; saga_storage::codec::PAYLOAD_LEN_MAX + 10];
    deliver_until_consumed(&s.consumer, &huge, 2).await;
    let mut other = huge.clone();
    other.body = vec![0xFE, 0xFF];
    deliver_until_consumed(&s.consumer, &other, 2).await;
    let parked = s.consumer.parked(None, 10).await.expect("lists");
    assert_eq!(
        parked.len(),
        2,
        "both parked messages are listed: {:?}",
        parked
            .iter()
            .map(|p| (&p.log_key, p.body.len()))
            .collect::<Vec<_>>()
    );
    assert!(
        parked
            .iter()
            .all(|p| p.body.len() < saga_storage::codec::PAYLOAD_LEN_MAX),
        "parked bodies are bounded"
    );
    assert!(
        parked.iter().any(|p| p.body == other.body),
        "a small body is kept whole"
    );
}

/// A compensation whose step key the log cannot name (too long, or with a separator) is
/// parked at once as poison, instead of failing its consumer-log append and being redelivered
/// for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_with_an_invalid_step_key_is_parked_not_retried_for_ever() {
    let s = direct(Role::Stock, None).await;
    for (saga_id, step) in [
        ("x".repeat(300), "reserve_stock"),
        ("a/b".into(), "reserve_stock"),
        ("s-1".into(), "a:b"),
    ] {
        let key = StepKey {
            saga_id,
            step: step.into(),
        };
        deliver_until_consumed(
            &s.consumer,
            &compensation_request(topics::COMPENSATION_TOPIC, "stock", &key.saga_id, &key.step),
            1,
        )
        .await;
    }
    let parked = s.consumer.parked(None, 10).await.expect("lists");
    assert_eq!(
        parked.len(),
        3,
        "{:?}",
        parked.iter().map(|p| &p.last_error).collect::<Vec<_>>()
    );
    assert!(
        parked.iter().all(|p| p.log_key.starts_with("poison/")),
        "{parked:?}"
    );
}

/// Issue 9: malformed messages on the compensation topic from a foreign producer, table-driven:
/// each is consumed at once (never retried for ever), parked with its reason (never dropped),
/// changes no state, and the consumer goes on applying valid compensations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_from_a_foreign_producer_are_parked_with_the_reason() {
    let s = direct(Role::Stock, None).await;
    let key = reserve(&s.participant, "saga-f").await;
    let valid = compensation_request(topics::COMPENSATION_TOPIC, "stock", &key.saga_id, &key.step);
    let with = |change: &dyn Fn(&mut Outgoing)| {
        let mut message = valid.clone();
        change(&mut message);
        message
    };
    let body_for = |role: &str, saga: &str| {
        pb::CompensationRequest {
            key: Some(pb::StepKey {
                saga_id: saga.into(),
                step: "reserve_stock".into(),
            }),
            role: role.into(),
            ..Default::default()
        }
        .encode_to_vec()
    };
    let cases: Vec<(&str, Outgoing, &str)> = vec![
        (
            "unknown tag",
            with(&|m| m.tag = "refund".into()),
            "tag \"refund\"",
        ),
        (
            "garbage body",
            with(&|m| m.body = b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff".to_vec()),
            "undecodable body",
        ),
        (
            "empty body",
            with(&|m| m.body = Vec::new()),
            "body has no step key",
        ),
        (
            "missing key",
            with(&|m| m.key = String::new()),
            "disagrees with the body's step key",
        ),
        (
            "key/body mismatch",
            with(&|m| m.key = "saga-g:reserve_stock".into()),
            "disagrees with the body's step key",
        ),
        (
            "another role's body",
            with(&|m| m.body = body_for("coupon", "saga-f")),
            "message for role \"coupon\"",
        ),
    ];
    let levels = level(&s.participant).await;
    for (i, (case, message, reason)) in cases.iter().enumerate() {
        let deliveries = deliver_until_consumed(&s.consumer, message, 1).await;
        assert_eq!(deliveries, 1, "{case}: consumed at once");
        let parked = s.consumer.parked(None, 100).await.expect("lists");
        assert_eq!(parked.len(), i + 1, "{case}: parked, none lost: {parked:?}");
        assert!(
            parked.iter().any(|p| p.last_error.contains(reason)),
            "{case}: reason {reason:?} in {:?}",
            parked.iter().map(|p| &p.last_error).collect::<Vec<_>>()
        );
        assert_eq!(level(&s.participant).await, levels, "{case}: no state changed");
    }
    // The consumer goes on: the valid compensation applies.
    deliver_until_consumed(&s.consumer, &valid, 1).await;
    assert_eq!(
        level(&s.participant).await,
        StockLevel {
            available: 10,
            reserved: 0
        },
        "the valid compensation applied after the malformed ones"
    );
}

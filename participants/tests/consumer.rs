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
use saga_participants::events::{Item, ParticipantEvent, StockLevel, stock_key};
use saga_participants::{Participant, Role};
use saga_proto::v1 as pb;
use saga_storage::{AppendRequest, ExpectedVersion, NewEvent};

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

struct Setup {
    participant: Participant,
    transport: Arc<EmbeddedTransport>,
    consumer: Arc<CompensationConsumer>,
    acks: Arc<Acks>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

async fn setup(fault_prefix: Option<&str>) -> Setup {
    let (pdir, qdir) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let participant = Participant::open(Role::Stock, pdir.path()).expect("opens");
    let transport = Arc::new(
        EmbeddedTransport::open(
            qdir.path(),
            EmbeddedConfig {
                retry_delay_base: Duration::from_millis(20),
                retry_delay_max: Duration::from_millis(100),
            },
        )
        .expect("queue"),
    );
    let consumer = Arc::new(
        CompensationConsumer::new(participant.clone(), transport.clone())
            .with_fault_prefix(fault_prefix.map(String::from)),
    );
    // Leak the running subscriptions for the test's lifetime: the runtime ends with the test.
    std::mem::forget(
        transport
            .subscribe(consumer.spec(), consumer.clone())
            .await
            .expect("subscribes"),
    );
    let acks = Arc::new(Acks::default());
    let spec = SubscriptionSpec {
        group: "test-orchestrator".into(),
        topic: topics::COMPENSATION_ACK_TOPIC.into(),
        tags: vec![],
    };
    std::mem::forget(transport.subscribe(spec, acks.clone()).await.expect("subscribes"));
    // Seed and reserve through events, as the gRPC service would.
    let seed = ParticipantEvent::StockSeeded {
        product_id: "p1".into(),
        available: 10,
    };
    participant
        .log()
        .append(
            AppendRequest::new("seed/product/p1", ExpectedVersion::NoStream)
                .event(NewEvent::encode(seed.name(), &seed).expect("enc")),
        )
        .await
        .expect("seeds");
    Setup {
        participant,
        transport,
        consumer,
        acks,
        _dirs: (pdir, qdir),
    }
}

async fn reserve(p: &Participant, saga: &str) -> StepKey {
    let key = StepKey {
        saga_id: saga.into(),
        step: "reserve_stock".into(),
    };
    let action = ParticipantEvent::StockReserved {
        order_id: saga.into(),
        items: vec![Item {
            product_id: "p1".into(),
            quantity: 4,
        }],
    };
    barrier::act(p.log(), &key, action).await.expect("reserves");
    key
}

fn compensation(key: &StepKey) -> Outgoing {
    Outgoing {
        topic: topics::COMPENSATION_TOPIC.into(),
        tag: "stock".into(),
        key: format!("{}:{}", key.saga_id, key.step),
        body: pb::CompensationRequest {
            key: Some(pb::StepKey {
                saga_id: key.saga_id.clone(),
                step: key.step.clone(),
            }),
            role: "stock".into(),
            requested_at_unix_ms: 0,
        }
        .encode_to_vec(),
    }
}

async fn level(p: &Participant) -> StockLevel {
    let bytes = p
        .log()
        .projection_get(stock_key("p1"))
        .await
        .expect("reads")
        .expect("present");
    saga_storage::codec::decode(&bytes).expect("decodes")
}

async fn consumer_log(p: &Participant, key: &StepKey) -> Vec<String> {
    let stream = format!(
        "consumer/saga-compensation-stock/stock/{}:{}",
        key.saga_id, key.step
    );
    p.log()
        .read_stream(&stream, 1, 100)
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
    s.transport
        .publish(&[compensation(&key)])
        .await
        .expect("publishes");
    s.transport
        .publish(&[compensation(&key)])
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
    assert_eq!(
        level(&s.participant).await,
        StockLevel {
            available: 10,
            reserved: 0
        },
        "released once"
    );
    assert_eq!(
        consumer_log(&s.participant, &key).await,
        vec!["ConsumeStarted", "ConsumeSucceeded"],
        "the duplicate was skipped by the consumer log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compensation_that_keeps_failing_is_parked_after_3_tries_never_dropped() {
    let s = setup(Some("bad-")).await;
    let key = reserve(&s.participant, "bad-1").await;
    s.transport
        .publish(&[compensation(&key)])
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
        compensation(&key).body,
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
            "MessageParked"
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
    let mut garbage = compensation(&StepKey {
        saga_id: "x".into(),
        step: "reserve_stock".into(),
    });
    garbage.key = "garbage".into();
    garbage.body = vec![0xFF, 0xFF, 0xFF];
    s.transport.publish(&[garbage]).await.expect("publishes");
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

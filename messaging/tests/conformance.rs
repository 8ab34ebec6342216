// RocketMQ client futures: see the "Recursion limit" note in saga_messaging::rocketmq.
#![recursion_limit = "256"]

//! One conformance suite for every compensation transport provider: the embedded sled queue
//! and RocketMQ through the real broker (scripts/dev-env). Each scenario is written once,
//! generic over a `Provider`, and instantiated for both at the bottom.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use saga_messaging::embedded::{EmbeddedConfig, EmbeddedTransport};
use saga_messaging::rocketmq::{RocketMqConfig, RocketMqTransport};
use saga_messaging::topics;
use saga_messaging::transport::{
    BoxFuture, Delivery, Handler, Outcome, Outgoing, SubscriptionSpec, Transport,
};
use saga_tests::run_id;

/// Opens and closes one provider's transport; "reopen" is a restart of the consumer side.
trait Provider {
    type T: Transport;
    async fn open(&self) -> Self::T;
    async fn close(&self, transport: Self::T);
    fn topic(&self) -> &'static str;
    /// How long a delivery may take (RocketMQ redelivers after >= 10 s).
    fn patience(&self) -> Duration;
    /// How many times the redelivery scenario asks for a retry.
    fn retries(&self) -> u32;
}

struct Embedded {
    dir: tempfile::TempDir,
}

impl Embedded {
    fn new() -> Self {
        Embedded {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
}

impl Provider for Embedded {
    type T = EmbeddedTransport;
    async fn open(&self) -> EmbeddedTransport {
        let config = EmbeddedConfig {
            retry_delay_base: Duration::from_millis(50),
            retry_delay_max: Duration::from_millis(400),
        };
        EmbeddedTransport::open(self.dir.path(), config).expect("opens queue")
    }
    async fn close(&self, transport: EmbeddedTransport) {
        drop(transport);
    }
    fn topic(&self) -> &'static str {
        topics::COMPENSATION_TOPIC
    }
    fn patience(&self) -> Duration {
        Duration::from_secs(10)
    }
    fn retries(&self) -> u32 {
        3
    }
}

struct RocketMq {
    namesrv: String,
}

impl RocketMq {
    /// `None` outside scripts/test; under CI a missing broker is a failure.
    fn from_env() -> Option<Self> {
        topics::namesrv_for_tests().map(|namesrv| RocketMq { namesrv })
    }
}

impl Provider for RocketMq {
    type T = RocketMqTransport;
    async fn open(&self) -> RocketMqTransport {
        RocketMqTransport::start(
            RocketMqConfig::new(self.namesrv.clone()),
            &format!("conformance-{}", run_id()),
        )
        .await
        .expect("rocketmq transport starts")
    }
    async fn close(&self, transport: RocketMqTransport) {
        transport.shutdown().await;
    }
    fn topic(&self) -> &'static str {
        // The smoke topic: conformance runs never touch the real compensation topic.
        topics::SMOKE_TOPIC
    }
    fn patience(&self) -> Duration {
        Duration::from_secs(60)
    }
    fn retries(&self) -> u32 {
        1 // the broker redelivers after ~10 s, then ~40 s: one retry keeps the test short
    }
}

/// Records deliveries; asks for `RetryLater` on the first `retries[key]` deliveries of a key.
#[derive(Default)]
struct Recorder {
    deliveries: Mutex<Vec<Delivery>>,
    retries: HashMap<String, u32>,
    changed: tokio::sync::Notify,
}

impl Handler for Recorder {
    fn handle(&self, delivery: Delivery) -> BoxFuture<'static, Outcome> {
        let retry = delivery.attempt < self.retries.get(&delivery.key).copied().unwrap_or(0);
        self.deliveries.lock().expect("not poisoned").push(delivery);
        self.changed.notify_waiters();
        Box::pin(async move {
            if retry {
                Outcome::RetryLater
            } else {
                Outcome::Consumed
            }
        })
    }
}

impl Recorder {
    fn keys(&self) -> Vec<String> {
        self.deliveries
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|d| d.key.clone())
            .collect()
    }

    fn of_key(&self, key: &str) -> Vec<Delivery> {
        self.deliveries
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|d| d.key == key)
            .cloned()
            .collect()
    }

    /// Waits until `done` holds for the deliveries so far, or `patience` passes.
    async fn wait_until(&self, patience: Duration, done: impl Fn(&[Delivery]) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let notified = self.changed.notified();
            if done(&self.deliveries.lock().expect("not poisoned")) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return done(&self.deliveries.lock().expect("not poisoned"));
            }
        }
    }
}

fn message(topic: &str, tag: &str, key: &str) -> Outgoing {
    Outgoing {
        topic: topic.into(),
        tag: tag.into(),
        key: key.into(),
        body: format!("body of {key}").into_bytes(),
        properties: properties_of(key),
    }
}

/// The user properties `message` gives `key`: the saga trace context of ours and one more.
fn properties_of(key: &str) -> Vec<(String, String)> {
    let mut properties = topics::message_properties(key);
    properties.push(("x-test-key".into(), key.into()));
    properties
}

/// Properties arrive as sent (order aside), also on a redelivery. The trace context's span id
/// is new per message: its trace id is the saga's.
fn assert_properties(delivery: &Delivery) {
    let names = |properties: &[(String, String)]| {
        let mut names: Vec<String> = properties.iter().map(|(n, _)| n.clone()).collect();
        names.sort();
        names
    };
    assert_eq!(
        names(&delivery.properties),
        names(&properties_of(&delivery.key)),
        "property names of {} (attempt {})",
        delivery.key,
        delivery.attempt
    );
    assert_eq!(delivery.property("x-test-key"), Some(delivery.key.as_str()));
    let (saga_id, _) = topics::parse_message_key(&delivery.key).expect("a saga key");
    assert_eq!(
        topics::delivery_trace(delivery).map(|c| c.trace_id),
        Some(saga_proto::trace::TraceContext::for_saga(saga_id).trace_id),
        "{} carries its saga's traceparent",
        delivery.key
    );
}

fn has_all(deliveries: &[Delivery], keys: &[String]) -> bool {
    keys.iter().all(|k| deliveries.iter().any(|d| &d.key == k))
}

async fn delivery_survives_consumer_restart<P: Provider>(provider: &P) {
    let run = run_id();
    let (tag, group, topic) = (format!("t{run}"), format!("g{run}"), provider.topic());
    let keys: Vec<String> = (0..10).map(|i| format!("{run}:{i}")).collect();
    let spec = SubscriptionSpec {
        group: group.clone(),
        topic: topic.into(),
        tags: vec![tag.clone()],
    };

    let transport = provider.open().await;
    let first = Arc::new(Recorder::default());
    let consumer = transport
        .subscribe(spec.clone(), first.clone())
        .await
        .expect("subscribes");
    let batch: Vec<Outgoing> = keys[..5].iter().map(|k| message(topic, &tag, k)).collect();
    transport.publish(&batch).await.expect("publishes");
    assert!(
        first
            .wait_until(provider.patience(), |d| has_all(d, &keys[..5]))
            .await,
        "first five delivered, got {:?}",
        first.keys()
    );
    consumer.shutdown().await;
    // Published while no consumer of the group runs.
    let batch: Vec<Outgoing> = keys[5..].iter().map(|k| message(topic, &tag, k)).collect();
    transport.publish(&batch).await.expect("publishes");
    provider.close(transport).await;

    let transport = provider.open().await;
    let second = Arc::new(Recorder::default());
    let consumer = transport
        .subscribe(spec, second.clone())
        .await
        .expect("resubscribes");
    assert!(
        second
            .wait_until(provider.patience(), |d| has_all(d, &keys[5..]))
            .await,
        "messages published while the consumer was down are delivered after restart, got {:?}",
        second.keys()
    );
    for d in second.deliveries.lock().expect("not poisoned").iter() {
        assert_eq!(d.body, format!("body of {}", d.key).into_bytes(), "body intact");
        assert_eq!(d.tag, tag);
        assert_properties(d);
    }
    for d in first.deliveries.lock().expect("not poisoned").iter() {
        assert_properties(d);
    }
    consumer.shutdown().await;
    provider.close(transport).await;
}

async fn retry_later_is_redelivered_until_consumed<P: Provider>(provider: &P) {
    let run = run_id();
    let (tag, topic) = (format!("t{run}"), provider.topic());
    let (flaky, steady) = (format!("{run}:flaky"), format!("{run}:steady"));
    let retries = provider.retries();
    let transport = provider.open().await;
    let recorder = Arc::new(Recorder {
        retries: HashMap::from([(flaky.clone(), retries)]),
        ..Recorder::default()
    });
    let consumer = transport
        .subscribe(
            SubscriptionSpec {
                group: format!("g{run}"),
                topic: topic.into(),
                tags: vec![tag.clone()],
            },
            recorder.clone(),
        )
        .await
        .expect("subscribes");
    transport
        .publish(&[message(topic, &tag, &flaky), message(topic, &tag, &steady)])
        .await
        .expect("publishes");
    let needed = retries as usize + 1;
    let done = recorder
        .wait_until(provider.patience(), |d| {
            d.iter().filter(|d| d.key == flaky).count() >= needed
        })
        .await;
    consumer.shutdown().await;
    provider.close(transport).await;
    assert!(done, "redelivered until consumed: got {:?}", recorder.keys());
    let flaky_deliveries = recorder.of_key(&flaky);
    let attempts: Vec<u32> = flaky_deliveries.iter().map(|d| d.attempt).collect();
    assert_eq!(
        attempts,
        (0..=retries).collect::<Vec<_>>(),
        "attempt rises by one per redelivery"
    );
    assert!(
        flaky_deliveries
            .iter()
            .all(|d| d.body == flaky_deliveries[0].body && d.tag == tag),
        "a redelivery carries the same body and tag, so consumers can deduplicate by key"
    );
    flaky_deliveries.iter().for_each(assert_properties);
    let steady_deliveries = recorder.of_key(&steady);
    assert_eq!(
        steady_deliveries.len(),
        1,
        "a consumed message is not delivered again"
    );
    assert_eq!(steady_deliveries[0].attempt, 0);
}

async fn every_group_gets_every_message_of_its_tags<P: Provider>(provider: &P) {
    let run = run_id();
    let topic = provider.topic();
    let (wanted, other) = (format!("a{run}"), format!("b{run}"));
    let transport = provider.open().await;
    let groups = [Arc::new(Recorder::default()), Arc::new(Recorder::default())];
    let mut consumers = Vec::new();
    for (i, recorder) in groups.iter().enumerate() {
        consumers.push(
            transport
                .subscribe(
                    SubscriptionSpec {
                        group: format!("g{run}-{i}"),
                        topic: topic.into(),
                        tags: vec![wanted.clone()],
                    },
                    recorder.clone(),
                )
                .await
                .expect("subscribes"),
        );
    }
    let wanted_keys: Vec<String> = (0..4).map(|i| format!("{run}:w{i}")).collect();
    let mut batch: Vec<Outgoing> = wanted_keys.iter().map(|k| message(topic, &wanted, k)).collect();
    batch.extend((0..3).map(|i| message(topic, &other, &format!("{run}:o{i}"))));
    transport.publish(&batch).await.expect("publishes");
    for (i, recorder) in groups.iter().enumerate() {
        assert!(
            recorder
                .wait_until(provider.patience(), |d| has_all(d, &wanted_keys))
                .await,
            "group {i} got every message of its tag, got {:?}",
            recorder.keys()
        );
    }
    for consumer in consumers {
        consumer.shutdown().await;
    }
    provider.close(transport).await;
    for recorder in &groups {
        assert!(
            recorder.keys().iter().all(|k| wanted_keys.contains(k)),
            "no message of another tag: {:?}",
            recorder.keys()
        );
    }
}

macro_rules! conformance {
    ($provider:ident, $make:expr) => {
        mod $provider {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn delivery_survives_consumer_restart() {
                let Some(p) = $make else { return };
                super::delivery_survives_consumer_restart(&p).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn retry_later_is_redelivered_until_consumed() {
                let Some(p) = $make else { return };
                super::retry_later_is_redelivered_until_consumed(&p).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn every_group_gets_every_message_of_its_tags() {
                let Some(p) = $make else { return };
                super::every_group_gets_every_message_of_its_tags(&p).await;
            }
        }
    };
}

conformance!(embedded, Some(Embedded::new()));
conformance!(rocketmq, RocketMq::from_env());

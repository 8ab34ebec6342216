//! Smoke test through the real broker (scripts/dev-env): a burst of keyed, tagged messages to
//! a clustering push consumer whose listener takes a few milliseconds. Every message must
//! arrive, and none after a multi-second redelivery stall (the symptom of an undersized client
//! runtime, see ROCKETMQ.md).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use saga_messaging::rocketmq::{
    Handled, MessageHandler, OutgoingMessage, ReceivedMessage, RocketMqClient, RocketMqConfig,
};
use saga_messaging::topics;

const MESSAGES: usize = 5_000;
const SENDERS: usize = 32;
const LISTENER_WORK: Duration = Duration::from_millis(3);
/// A message that was refused admission comes back after ~10 s; anything this slow is one.
const STALL: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Seen {
    /// key -> (deliveries, first receive time)
    by_key: HashMap<String, (u32, Instant)>,
    redelivered: usize,
    wrong_tag: usize,
}

struct Recorder {
    seen: Arc<Mutex<Seen>>,
    run_tag: String,
    notify: tokio::sync::mpsc::UnboundedSender<()>,
}

impl MessageHandler for Recorder {
    fn handle(&self, message: &ReceivedMessage<'_>) -> Handled {
        // Only this run's messages (the topic may hold older ones from earlier runs).
        if !message.key.starts_with(&self.run_tag) {
            return Handled::Consumed;
        }
        std::thread::sleep(LISTENER_WORK);
        let mut seen = self.seen.lock().expect("not poisoned");
        if message.tag != "burst" {
            seen.wrong_tag += 1;
        }
        if message.reconsume_times > 0 {
            seen.redelivered += 1;
        }
        let entry = seen
            .by_key
            .entry(message.key.to_owned())
            .or_insert((0, Instant::now()));
        entry.0 += 1;
        let first = entry.0 == 1;
        drop(seen);
        if first {
            let _ = self.notify.send(());
        }
        Handled::Consumed
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_5000_keyed_messages_all_arrive_without_redelivery_stall() {
    let Some(namesrv) = topics::namesrv_for_tests() else {
        return;
    };
    let client = RocketMqClient::new(RocketMqConfig::new(namesrv)).expect("client runtime");
    let run_tag = format!(
        "burst-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    );
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (notify, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
    let consumer = client
        .push_consumer(
            &format!("saga-smoke-{}", std::process::id()),
            topics::SMOKE_TOPIC,
            "burst",
            Arc::new(Recorder {
                seen: Arc::clone(&seen),
                run_tag: run_tag.clone(),
                notify,
            }),
        )
        .await
        .expect("consumer starts");
    let producer = Arc::new(
        client
            .producer("saga-smoke-producer")
            .await
            .expect("producer starts"),
    );

    let sent_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let started = Instant::now();
    let senders: Vec<_> = (0..SENDERS)
        .map(|s| {
            let producer = Arc::clone(&producer);
            let run_tag = run_tag.clone();
            let sent_at = Arc::clone(&sent_at);
            tokio::spawn(async move {
                for i in (s..MESSAGES).step_by(SENDERS) {
                    let key = format!("{run_tag}:{i}");
                    let body = format!("message {i}");
                    sent_at
                        .lock()
                        .expect("not poisoned")
                        .insert(key.clone(), Instant::now());
                    producer
                        .send(&OutgoingMessage {
                            topic: topics::SMOKE_TOPIC,
                            tag: "burst",
                            key: &key,
                            body: body.as_bytes(),
                            properties: &[],
                        })
                        .await
                        .unwrap_or_else(|e| panic!("send {key}: {e}"));
                }
            })
        })
        .collect();
    for s in senders {
        s.await.expect("sender task");
    }
    let send_elapsed = started.elapsed();

    // Wait for every message's first arrival (bounded: 60 s is far beyond a healthy run).
    let mut arrived = 0;
    let wait = tokio::time::timeout(Duration::from_secs(60), async {
        while arrived < MESSAGES {
            arrivals.recv().await.expect("recorder alive");
            arrived += 1;
        }
    })
    .await;
    let total_elapsed = started.elapsed();

    consumer.shutdown().await;
    Arc::into_inner(producer).expect("senders done").shutdown().await;
    client.shutdown().await;

    let seen = seen.lock().expect("not poisoned");
    let sent_at = sent_at.lock().expect("not poisoned");
    assert!(
        wait.is_ok(),
        "only {arrived} of {MESSAGES} messages arrived within 60 s"
    );
    assert_eq!(seen.by_key.len(), MESSAGES, "every message arrived");
    assert_eq!(seen.wrong_tag, 0, "tags survive the trip");
    let mut latencies: Vec<Duration> = seen
        .by_key
        .iter()
        .map(|(key, (_, received))| received.saturating_duration_since(sent_at[key]))
        .collect();
    latencies.sort_unstable();
    let p50 = latencies[latencies.len() / 2];
    let p99 = latencies[latencies.len() * 99 / 100];
    let max = *latencies.last().expect("non-empty");
    eprintln!(
        "burst: {MESSAGES} messages sent in {send_elapsed:?}, all received after {total_elapsed:?}; \
         send-to-receive p50 {p50:?} p99 {p99:?} max {max:?}; redelivered {}",
        seen.redelivered
    );
    assert!(
        max < STALL,
        "a message took {max:?}: a redelivery stall (listener admission refused?)"
    );
    assert_eq!(seen.redelivered, 0, "no message needed a redelivery");
}

#[test]
fn undersized_listener_capacity_is_refused_by_validate() {
    let config = RocketMqConfig {
        listener_concurrency_max: 4,
        listener_queue_depth_max: 16,
        consume_threads_max: 64,
        ..RocketMqConfig::new("127.0.0.1:9876")
    };
    let err = config.validate().expect_err("4 + 16 <= 64 must be refused");
    assert!(err.to_string().contains("consume_threads_max"), "{err}");
    RocketMqConfig::new("127.0.0.1:9876")
        .validate()
        .expect("the defaults pass");
}

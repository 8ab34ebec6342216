//! RocketMQ wiring (rocketmq-client-rust 1.0.0): one client runtime per process, sized on
//! purpose, with producers, clustering push consumers and topic creation on top.
//!
//! # Why the runtime is sized by hand
//!
//! The client runs every listener call on its runtime's `metadata_io` blocking lane. The
//! defaults on 2 cores admit 4 concurrent calls with a queue of 16 against 64 consume workers:
//! under a burst, admission fails and the message goes back to the broker, returning ~10 s
//! later with `reconsume_times` raised although no listener saw it (ROCKETMQ.md). So
//! [`RocketMqConfig`] sets the blocking capacity, the lane's concurrency and its queue depth
//! explicitly, keeping `listener_concurrency_max + listener_queue_depth_max` above
//! `consume_threads_max`. [`RocketMqConfig::validate`] enforces that rule.
//!
//! # Threads
//!
//! The client owns its own Tokio runtime (`RuntimeOwner`), beside the service's. Producers and
//! consumers may be used from any runtime.
//!
//! **Recursion limit.** The client's futures are deep: a crate that awaits them inside
//! further async code (a binary's main, a generic test scenario) exceeds rustc's default query
//! depth of 128 while checking auto traits ("queries overflow the depth limit"). Such crates,
//! and only those, say `#![recursion_limit = "256"]` with a pointer here.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rocketmq_client_rust::{
    ClientRuntime, ClientRuntimeConfig, ConsumeConcurrentlyContext, ConsumeConcurrentlyStatus,
    DefaultMQProducer, DefaultMQPushConsumer, MQPushConsumer, MessageListenerConcurrently,
};
use rocketmq_model::common::consumer::consume_from_where::ConsumeFromWhere;
use rocketmq_model::common::message::message_ext::MessageExt;
use rocketmq_model::common::message::message_single::Message;
use rocketmq_observability::TelemetryRuntimeGuard;
use rocketmq_protocol::protocol::heartbeat::message_model::MessageModel;
use rocketmq_runtime::{RuntimeConfig, RuntimeOwner};

use crate::error::MessagingError;

/// The topic the broker copies new topics' settings from (it exists when the broker runs with
/// `autoCreateTopicEnable = true`).
pub const DEFAULT_TOPIC_KEY: &str = "TBW102";

/// Settings of one process's RocketMQ client. [`RocketMqConfig::new`] gives values measured to
/// work on 2 cores (see ROCKETMQ.md); every field is passed to the client explicitly.
#[derive(Debug, Clone)]
pub struct RocketMqConfig {
    /// Name server address, `host:port`.
    pub name_server: String,
    /// Prefix of the client runtime's thread names.
    pub thread_name: String,
    /// Async worker threads of the client runtime.
    pub worker_threads: usize,
    /// Blocking threads the client runtime may use (all lanes together).
    pub blocking_threads_max: usize,
    /// Listener calls that may run at once (`metadata_io.max_concurrency`).
    pub listener_concurrency_max: usize,
    /// Listener calls that may wait for a slot (`metadata_io.max_queue_depth`).
    pub listener_queue_depth_max: usize,
    /// Consume workers of a push consumer (`consume_thread_min/max`).
    pub consume_threads_min: u32,
    pub consume_threads_max: u32,
    /// Messages a push consumer pulls per request.
    pub pull_batch_len: u32,
    /// Tries of a message before the broker moves it to the dead-letter topic. Our consumers
    /// park messages themselves before that (consumer log); this is the broker's backstop.
    pub max_reconsume_times: i32,
    /// Deadline of one send, in milliseconds.
    pub send_timeout_ms: u32,
    /// Extra tries of a failed send inside the client.
    pub send_retries: u32,
    /// Deadline of admin calls (topic creation, route lookups), in milliseconds.
    pub admin_timeout_ms: u64,
}

impl RocketMqConfig {
    pub fn new(name_server: impl Into<String>) -> Self {
        RocketMqConfig {
            name_server: name_server.into(),
            thread_name: "saga-rocketmq".into(),
            worker_threads: 2,
            blocking_threads_max: 32,
            listener_concurrency_max: 32,
            listener_queue_depth_max: 512,
            consume_threads_min: 20,
            consume_threads_max: 64,
            pull_batch_len: 32,
            max_reconsume_times: 16,
            send_timeout_ms: 3_000,
            send_retries: 2,
            admin_timeout_ms: 10_000,
        }
    }

    /// Checks the capacity rule that keeps listener admission from failing under a burst.
    pub fn validate(&self) -> Result<(), MessagingError> {
        if self.listener_concurrency_max + self.listener_queue_depth_max <= self.consume_threads_max as usize
        {
            return Err(MessagingError::Config(format!(
                "listener_concurrency_max ({}) + listener_queue_depth_max ({}) must exceed consume_threads_max ({}), \
                 or listener calls are refused under a burst and come back 10 s later",
                self.listener_concurrency_max, self.listener_queue_depth_max, self.consume_threads_max
            )));
        }
        if self.listener_concurrency_max > self.blocking_threads_max {
            return Err(MessagingError::Config(
                "listener_concurrency_max must not exceed blocking_threads_max".into(),
            ));
        }
        Ok(())
    }

    fn runtime_config(&self) -> Result<RuntimeConfig, MessagingError> {
        let mut config = RuntimeConfig {
            thread_name: self.thread_name.clone(),
            worker_threads: self.worker_threads,
            ..RuntimeConfig::default()
        }
        .with_max_blocking_threads(self.blocking_threads_max)
        .map_err(|e| MessagingError::Config(format!("blocking_threads_max: {e:?}")))?;
        config.blocking_lane_policies.metadata_io.max_concurrency = self.listener_concurrency_max;
        config.blocking_lane_policies.metadata_io.max_queue_depth = self.listener_queue_depth_max;
        config
            .validate()
            .map_err(|e| MessagingError::Config(format!("runtime: {e:?}")))?;
        Ok(config)
    }
}

/// One process's RocketMQ client: the runtime every producer and consumer shares.
/// How long a consumer's shutdown waits for its in-flight handlers, in milliseconds.
pub const CONSUMER_SHUTDOWN_MS: u64 = 5_000;

pub struct RocketMqClient {
    config: RocketMqConfig,
    /// The runtime's owner and the telemetry guard, taken by the first
    /// [`RocketMqClient::shutdown`] (its last steps consume them).
    owner: std::sync::Mutex<Option<(RuntimeOwner, TelemetryRuntimeGuard)>>,
    runtime: Arc<ClientRuntime>,
}

impl RocketMqClient {
    /// Builds the client runtime. Installs no global tracing subscriber (the service owns
    /// that); the client's telemetry is a no-op.
    pub fn new(config: RocketMqConfig) -> Result<Self, MessagingError> {
        config.validate()?;
        let owner = RuntimeOwner::plan(config.runtime_config()?)
            .map_err(|e| MessagingError::Config(format!("runtime plan: {e:?}")))?
            .build()
            .map_err(|e| MessagingError::Client(format!("build client runtime: {e}")))?;
        let telemetry = TelemetryRuntimeGuard::noop();
        let runtime = ClientRuntime::try_new(
            owner.root_context().component("client"),
            ClientRuntimeConfig::default(),
            telemetry.handle(),
        )
        .map_err(MessagingError::client)?;
        Ok(RocketMqClient {
            config,
            owner: std::sync::Mutex::new(Some((owner, telemetry))),
            runtime,
        })
    }

    pub fn config(&self) -> &RocketMqConfig {
        &self.config
    }

    /// Starts a producer in `group`.
    pub async fn producer(&self, group: &str) -> Result<Producer, MessagingError> {
        let mut inner = DefaultMQProducer::builder(Arc::clone(&self.runtime))
            .producer_group(group.to_owned())
            .name_server_addr(self.config.name_server.clone())
            .send_msg_timeout(self.config.send_timeout_ms)
            .retry_times_when_send_failed(self.config.send_retries)
            .build();
        inner.start().await.map_err(MessagingError::client)?;
        Ok(Producer {
            inner,
            send_timeout_ms: u64::from(self.config.send_timeout_ms),
        })
    }

    /// Creates `topics` (idempotent) with `queue_count` queues each, and waits until the name
    /// server returns a route for every one of them, or `deadline` passes. The broker registers
    /// a topic created this way with the name server at once, instead of at its next periodic
    /// registration (up to 30 s later) as for topics auto-created on first send.
    pub async fn ensure_topics(
        &self,
        topics: &[&str],
        queue_count: i32,
        deadline: Duration,
    ) -> Result<(), MessagingError> {
        let started = Instant::now();
        let mut admin = self.producer("saga-topic-admin").await?;
        let mut result = Ok(());
        'topics: for topic in topics {
            loop {
                let attempt = async {
                    admin
                        .inner
                        .create_topic(DEFAULT_TOPIC_KEY, topic, queue_count, HashMap::new())
                        .await?;
                    admin.inner.fetch_publish_message_queues(topic).await
                };
                let error = match attempt.await {
                    Ok(queues) if !queues.is_empty() => continue 'topics,
                    Ok(_) => "route has no queues yet".to_string(),
                    Err(e) => e.to_string(),
                };
                if started.elapsed() >= deadline {
                    result = Err(MessagingError::Unavailable(format!(
                        "topic {topic} has no route after {:?}: {error}",
                        started.elapsed()
                    )));
                    break 'topics;
                }
                // The broker may still be registering with the name server: poll again.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        admin.shutdown().await;
        result
    }

    /// Starts a clustering push consumer: `group` shares the queues of `topic` among its
    /// instances; messages whose tag matches `tag_expression` ("*" or "a || b") are handed to
    /// `handler`, one at a time per consume worker.
    pub async fn push_consumer(
        &self,
        group: &str,
        topic: &str,
        tag_expression: &str,
        handler: Arc<dyn MessageHandler>,
    ) -> Result<PushConsumer, MessagingError> {
        let c = &self.config;
        let mut inner = DefaultMQPushConsumer::builder(Arc::clone(&self.runtime))
            .consumer_group(group.to_owned())
            .name_server_addr(c.name_server.clone())
            .message_model(MessageModel::Clustering)
            .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset)
            .consume_thread_min(c.consume_threads_min)
            .consume_thread_max(c.consume_threads_max)
            .consume_message_batch_max_size(1)
            .pull_batch_size(c.pull_batch_len)
            .max_reconsume_times(c.max_reconsume_times)
            // The client's default (0 ms) aborts its consume tasks at shutdown without waiting
            // and reports each one; give in-flight handlers time to finish instead.
            .await_termination_millis_when_shutdown(CONSUMER_SHUTDOWN_MS)
            .build();
        inner
            .subscribe(topic, tag_expression)
            .await
            .map_err(MessagingError::client)?;
        inner.register_message_listener_concurrently(Listener { handler });
        inner.start().await.map_err(MessagingError::client)?;
        Ok(PushConsumer { inner })
    }

    /// Stops the client runtime, in the order the client needs (ROCKETMQ.md). Shut producers
    /// and consumers down first. Takes `&self`, so that it runs even while handlers the client
    /// still holds keep a reference to the transport; a second call does nothing. What did not
    /// stop in time is reported at debug level only: at exit it is expected, and the runtime's
    /// reports run to hundreds of lines.
    pub async fn shutdown(&self) {
        let Some((owner, telemetry)) = self.owner.lock().expect("owner lock").take() else {
            return;
        };
        let report = self.runtime.shutdown().await;
        if !report.is_healthy() {
            tracing::debug!(report = %report.to_json(), "rocketmq client runtime shutdown");
        }
        let report = owner.shutdown_tasks().await;
        if !report.is_healthy() {
            tracing::debug!(report = %report.to_json(), "rocketmq runtime tasks shutdown");
        }
        let report = owner.shutdown_background();
        if !report.is_healthy() {
            tracing::debug!(report = %report.to_json(), "rocketmq runtime background shutdown");
        }
        let _ = telemetry.shutdown();
    }
}

/// A started producer. `send` takes `&self`: one producer serves many tasks.
pub struct Producer {
    inner: DefaultMQProducer,
    send_timeout_ms: u64,
}

/// A message to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMessage<'a> {
    pub topic: &'a str,
    pub tag: &'a str,
    pub key: &'a str,
    pub body: &'a [u8],
    /// User properties, (name, value).
    pub properties: &'a [(String, String)],
}

impl OutgoingMessage<'_> {
    /// The client's message; a property name of RocketMQ's own (`KEYS`, `TAGS`, ...) is a
    /// configuration error of ours.
    fn to_message(&self) -> Result<Message, MessagingError> {
        let mut builder = Message::builder()
            .topic(self.topic)
            .tags(self.tag)
            .keys(vec![self.key.to_owned()])
            .body_slice(self.body);
        for (name, value) in self.properties {
            builder = builder
                .raw_property(name.as_str(), value.as_str())
                .map_err(|e| MessagingError::Config(format!("message property {name}: {e}")))?;
        }
        Ok(builder.build_unchecked())
    }
}

impl Producer {
    /// Sends one message and returns once the broker stored it (per its flush setting).
    pub async fn send(&self, message: &OutgoingMessage<'_>) -> Result<(), MessagingError> {
        let result = self
            .inner
            .send_with_timeout(message.to_message()?, self.send_timeout_ms)
            .await
            .map_err(MessagingError::client)?;
        match result {
            Some(_) => Ok(()),
            None => Err(MessagingError::Unavailable(
                "broker returned no send result".into(),
            )),
        }
    }

    /// Sends messages of one topic as one batch request: stored together or not at all.
    pub async fn send_batch(&self, messages: &[OutgoingMessage<'_>]) -> Result<(), MessagingError> {
        if messages.is_empty() {
            return Ok(());
        }
        let batch = messages
            .iter()
            .map(OutgoingMessage::to_message)
            .collect::<Result<Vec<_>, _>>()?;
        self.inner
            .send_batch_with_timeout(batch, self.send_timeout_ms)
            .await
            .map_err(MessagingError::client)?;
        Ok(())
    }

    /// Stops the producer (a clone of the client's producer handle: `send` may still hold
    /// this one).
    pub async fn shutdown(&self) {
        self.inner.clone().shutdown().await;
    }
}

/// A message as a handler sees it.
#[derive(Debug)]
pub struct ReceivedMessage<'a> {
    pub topic: &'a str,
    pub tag: &'a str,
    pub key: &'a str,
    pub body: &'a [u8],
    /// The message's user properties (those not reserved by RocketMQ).
    pub properties: Vec<(String, String)>,
    /// How often the broker delivered this message before (0 on first delivery).
    pub reconsume_times: i32,
    pub msg_id: &'a str,
}

/// What a handler did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Done (or deliberately parked): the broker may forget it.
    Consumed,
    /// Not done: the broker delivers it again later (+10 s, +30 s, ... on the broker here).
    RetryLater,
}

/// Handles delivered messages. Runs on the client's blocking lane: it may block for a few
/// milliseconds, and must be idempotent by key, since delivery is at least once.
pub trait MessageHandler: Send + Sync + 'static {
    fn handle(&self, message: &ReceivedMessage<'_>) -> Handled;
}

struct Listener {
    handler: Arc<dyn MessageHandler>,
}

impl MessageListenerConcurrently for Listener {
    fn consume_message(
        &self,
        msgs: &[&MessageExt],
        _context: &ConsumeConcurrentlyContext,
    ) -> rocketmq_client_rust::ClientResult<ConsumeConcurrentlyStatus> {
        for msg in msgs {
            let keys = msg.message.keys().unwrap_or_default();
            let body = msg.body().unwrap_or_default();
            let received = ReceivedMessage {
                topic: msg.topic().as_str(),
                tag: msg.message.tags().unwrap_or(""),
                key: keys.first().map(String::as_str).unwrap_or(""),
                body: &body,
                properties: user_properties(&msg.message),
                reconsume_times: msg.reconsume_times(),
                msg_id: msg.msg_id().as_str(),
            };
            if self.handler.handle(&received) == Handled::RetryLater {
                return Ok(ConsumeConcurrentlyStatus::ReconsumeLater);
            }
        }
        Ok(ConsumeConcurrentlyStatus::ConsumeSuccess)
    }
}

/// The properties of `message` that RocketMQ does not reserve for itself: the ones a producer
/// set with [`OutgoingMessage::properties`].
fn user_properties(message: &Message) -> Vec<(String, String)> {
    let reserved = &rocketmq_model::common::message::STRING_HASH_SET;
    message
        .properties()
        .as_map()
        .iter()
        .filter(|(name, _)| !reserved.contains(name.as_str()))
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

/// A started push consumer.
pub struct PushConsumer {
    inner: DefaultMQPushConsumer,
}

impl PushConsumer {
    /// Stops consuming; offsets of handled messages are committed, so a restart redelivers
    /// nothing that was handled.
    pub async fn shutdown(mut self) {
        self.inner.shutdown().await;
    }
}

/// The production compensation transport: a [`RocketMqClient`] with one producer.
pub struct RocketMqTransport {
    client: RocketMqClient,
    producer: Producer,
}

impl RocketMqTransport {
    /// Starts the client runtime and a producer in `producer_group`.
    pub async fn start(config: RocketMqConfig, producer_group: &str) -> Result<Self, MessagingError> {
        let client = RocketMqClient::new(config)?;
        let producer = client.producer(producer_group).await?;
        Ok(RocketMqTransport { client, producer })
    }

    /// See [`RocketMqClient::ensure_topics`].
    pub async fn ensure_topics(
        &self,
        topics: &[&str],
        queue_count: i32,
        deadline: Duration,
    ) -> Result<(), MessagingError> {
        self.client.ensure_topics(topics, queue_count, deadline).await
    }

    /// Stops the producer and the client runtime. Shut consumers down first. Takes `&self`:
    /// the consumers' handlers (held by the client until it stops) may still hold the
    /// transport, so callers cannot count on owning it.
    pub async fn shutdown(&self) {
        self.producer.shutdown().await;
        self.client.shutdown().await;
    }
}

impl crate::transport::Transport for RocketMqTransport {
    fn publish<'a>(
        &'a self,
        messages: &'a [crate::transport::Outgoing],
    ) -> crate::transport::BoxFuture<'a, Result<(), MessagingError>> {
        Box::pin(async move {
            // A RocketMQ batch holds one topic: one request per topic.
            let mut by_topic: std::collections::BTreeMap<&str, Vec<OutgoingMessage<'_>>> = Default::default();
            for m in messages {
                by_topic.entry(&m.topic).or_default().push(OutgoingMessage {
                    topic: &m.topic,
                    tag: &m.tag,
                    key: &m.key,
                    body: &m.body,
                    properties: &m.properties,
                });
            }
            for batch in by_topic.values() {
                match batch.as_slice() {
                    [one] => self.producer.send(one).await?,
                    many => self.producer.send_batch(many).await?,
                }
            }
            Ok(())
        })
    }

    fn subscribe(
        &self,
        spec: crate::transport::SubscriptionSpec,
        handler: Arc<dyn crate::transport::Handler>,
    ) -> crate::transport::BoxFuture<'_, Result<Box<dyn crate::transport::Consumer>, MessagingError>> {
        Box::pin(async move {
            let tags = if spec.tags.is_empty() {
                "*".to_string()
            } else {
                spec.tags.join(" || ")
            };
            let bridge = Arc::new(Bridge {
                handler,
                // The listener runs on the client runtime's blocking lane; the handler's future
                // runs on the service's runtime, which subscribes from inside it.
                runtime: tokio::runtime::Handle::current(),
                spec: spec.clone(),
            });
            let consumer = self
                .client
                .push_consumer(&spec.group, &spec.topic, &tags, bridge)
                .await?;
            Ok(Box::new(consumer) as Box<dyn crate::transport::Consumer>)
        })
    }
}

/// Runs an async transport handler from the client's synchronous listener.
struct Bridge {
    handler: Arc<dyn crate::transport::Handler>,
    runtime: tokio::runtime::Handle,
    spec: crate::transport::SubscriptionSpec,
}

impl MessageHandler for Bridge {
    fn handle(&self, message: &ReceivedMessage<'_>) -> Handled {
        if !self.spec.accepts(message.tag) {
            return Handled::Consumed;
        }
        let delivery = crate::transport::Delivery {
            topic: message.topic.to_owned(),
            tag: message.tag.to_owned(),
            key: message.key.to_owned(),
            body: message.body.to_vec(),
            properties: message.properties.clone(),
            attempt: u32::try_from(message.reconsume_times).unwrap_or(0),
        };
        match self.runtime.block_on(self.handler.handle(delivery)) {
            crate::transport::Outcome::Consumed => Handled::Consumed,
            crate::transport::Outcome::RetryLater => Handled::RetryLater,
        }
    }
}

impl crate::transport::Consumer for PushConsumer {
    fn shutdown(self: Box<Self>) -> crate::transport::BoxFuture<'static, ()> {
        Box::pin(PushConsumer::shutdown(*self))
    }
}

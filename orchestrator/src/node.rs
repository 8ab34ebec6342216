//! The composition root: how one orchestrator node is wired, written once for `serve` (RocketMQ)
//! and `dev` (the embedded queue). A node is the engine over its log with the order saga, the
//! outbox relay to the compensation transport, the subscription to its acknowledgements
//! (group and tag from its node id), and the gRPC API with health and reflection.
//!
//! Start-up is two steps, so that a server can answer while recovery runs: [`Node::open`]
//! builds everything (the API answers UNAVAILABLE "recovering" and health reports
//! NOT_SERVING), and [`Node::recover`] resumes every unfinished saga, then opens the API and
//! reports SERVING. [`Node::start`] does both. Health turns NOT_SERVING for good when the
//! log fails (its writer stopped: nothing can be recorded until a restart).
//!
//! Shutdown is two steps too, around the caller's server stop: [`Node::drain`] (health
//! NOT_SERVING, no new saga, retry or abort, in-flight step calls finish, up to a grace
//! period), then [`Node::shutdown`] (the acknowledgement subscription stops, the outbox is
//! relayed until empty or a deadline). Everything recorded is durable whenever the process
//! stops; the drain only leaves less for the next start to resume.

use std::sync::Arc;

use saga_messaging::MessagingError;
use saga_messaging::transport::{Consumer, SubscriptionSpec, Transport};
use saga_proto::auth::AdminToken;
use saga_proto::server::Health;
use saga_storage::{LogConfig, StorageError};

use crate::engine::{AckHandler, Engine, EngineConfig, EngineError, ack_group};
use crate::order::{self, OrderInvoker, OrderTiming, ParticipantAddrs};

/// What a node is built from.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub log: LogConfig,
    pub participants: ParticipantAddrs,
    pub timing: OrderTiming,
    pub engine: EngineConfig,
    /// The consumer group on the acknowledgement topic (default `saga-orchestrator-<node id>`).
    pub ack_group: Option<String>,
    /// The bearer token of admin RPCs (`saga_proto::auth`); none leaves them open.
    pub admin_token: AdminToken,
    /// TLS (mutual with an identity) to the participants (`saga_proto::tls::client_config`);
    /// none: plaintext.
    pub participant_tls: Option<tonic::transport::ClientTlsConfig>,
}

/// Why a node did not start; each names the part that failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot open the event log: {0}")]
    Log(#[source] StorageError),
    #[error("bad participant address: {0}")]
    Participants(#[source] tonic::transport::Error),
    #[error("cannot subscribe to acknowledgements: {0}")]
    Acks(#[source] MessagingError),
    #[error("recovery failed: {0}")]
    Recover(#[source] EngineError),
    #[error("cannot build the gRPC services: {0}")]
    Routes(#[source] tonic_reflection::server::Error),
}

/// A running orchestrator node (everything but the gRPC server, which the caller runs on
/// [`Node::routes`]).
pub struct Node {
    pub engine: Engine,
    /// The API, health and reflection services, to serve.
    pub routes: tonic::service::Routes,
    /// Unfinished sagas resumed at start (0 until [`Node::recover`] ran).
    pub resumed: usize,
    health: Health,
    ready: Arc<std::sync::atomic::AtomicBool>,
    relay: tokio::task::JoinHandle<()>,
    health_watch: Option<tokio::task::JoinHandle<()>>,
    acks: Box<dyn Consumer>,
    transport: Arc<dyn Transport>,
}

/// What a shutdown got done in its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// Every driver pass ended within the grace period (else the rest resume at the next start).
    pub drained: bool,
    /// The outbox was relayed until empty (else the rest is relayed at the next start).
    pub outbox_empty: bool,
}

impl Node {
    /// Opens and recovers ([`Node::open`], then [`Node::recover`]).
    pub async fn start(config: NodeConfig, transport: Arc<dyn Transport>) -> Result<Node, NodeError> {
        let mut node = Node::open(config, transport).await?;
        node.recover().await?;
        Ok(node)
    }

    /// Builds the node without resuming anything: its routes can be served, the API answers
    /// UNAVAILABLE and health NOT_SERVING until [`Node::recover`] ran.
    pub async fn open(config: NodeConfig, transport: Arc<dyn Transport>) -> Result<Node, NodeError> {
        let log = crate::engine::open_log(config.log).map_err(NodeError::Log)?;
        let ack_spec = SubscriptionSpec {
            group: config
                .ack_group
                .unwrap_or_else(|| ack_group(&config.engine.node_id)),
            topic: config.engine.ack_topic.clone(),
            tags: vec![config.engine.node_id.clone()],
        };
        let engine = Engine::new(
            log,
            vec![order::definition(&config.timing)],
            OrderInvoker::new(&config.participants, config.participant_tls.as_ref())
                .map_err(NodeError::Participants)?,
            config.engine,
        );
        // Before the relay and the acknowledgement subscription: nothing appends yet.
        engine.count_in_flight().await.map_err(NodeError::Recover)?;
        let relay = {
            let engine = engine.clone();
            let transport = Arc::clone(&transport);
            tokio::spawn(async move { engine.run_relay(transport).await })
        };
        let acks = transport
            .subscribe(
                ack_spec,
                Arc::new(AckHandler {
                    engine: engine.clone(),
                }),
            )
            .await
            .map_err(NodeError::Acks)?;
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (routes, standard) = crate::api::routes(engine.clone(), config.admin_token, Arc::clone(&ready))
            .await
            .map_err(NodeError::Routes)?;
        Ok(Node {
            engine,
            routes,
            resumed: 0,
            health: standard.health,
            ready,
            relay,
            health_watch: None,
            acks,
            transport,
        })
    }

    /// Resumes every unfinished saga, then opens the API and reports SERVING (until the log
    /// fails). Returns how many sagas were resumed.
    pub async fn recover(&mut self) -> Result<usize, NodeError> {
        self.resumed = self.engine.recover().await.map_err(NodeError::Recover)?;
        self.ready.store(true, std::sync::atomic::Ordering::Release);
        let health = self.health.clone();
        let failure = self.engine.log().failure();
        if !self.engine.log().is_failed() {
            health.set_serving(true).await;
        }
        self.health_watch = Some(tokio::spawn(async move {
            if failure.await {
                tracing::error!("the event log failed: health reports NOT_SERVING until a restart");
                health.set_serving(false).await;
            }
        }));
        Ok(self.resumed)
    }

    /// The first step of a shutdown, while the server still serves: health reports
    /// NOT_SERVING, StartOrder, RetrySaga and AbortSaga answer UNAVAILABLE, and step calls in
    /// flight finish (see [`Engine::drain`]), up to `grace`. Returns whether every pass ended.
    pub async fn drain(&self, grace: std::time::Duration) -> bool {
        if let Some(watch) = &self.health_watch {
            watch.abort();
        }
        self.health.set_serving(false).await;
        self.engine.drain(grace).await
    }

    /// The last step (the caller stopped serving): stops the acknowledgement subscription,
    /// stops the relay task and relays what the outbox holds until it is empty or `relay_wait`
    /// passed (counted from then). `drained` is what [`Node::drain`] returned.
    pub async fn shutdown(self, drained: bool, relay_wait: std::time::Duration) -> Stopped {
        self.acks.shutdown().await;
        let relay_deadline = tokio::time::Instant::now() + relay_wait;
        if let Some(watch) = self.health_watch {
            watch.abort();
        }
        self.relay.abort();
        // Wait for the task to stop, so that the drain below is the only relay.
        let _ = self.relay.await;
        let outbox_empty =
            saga_messaging::relay::drain(self.engine.log(), self.transport.as_ref(), relay_deadline).await;
        Stopped {
            drained,
            outbox_empty,
        }
    }
}

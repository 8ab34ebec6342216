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
            OrderInvoker::new(&config.participants).map_err(NodeError::Participants)?,
            config.engine,
        );
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

    /// Stops the acknowledgement subscription and the relay (the caller stopped serving).
    pub async fn shutdown(self) {
        self.acks.shutdown().await;
        self.relay.abort();
        if let Some(watch) = self.health_watch {
            watch.abort();
        }
    }
}

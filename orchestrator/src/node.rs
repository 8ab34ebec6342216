//! The composition root: how one orchestrator node is wired, written once for `serve` (RocketMQ)
//! and `dev` (the embedded queue). A node is the engine over its log with the order saga, the
//! outbox relay to the compensation transport, the subscription to its acknowledgements
//! (group and tag from its node id), and the gRPC API; [`Node::start`] also resumes every
//! unfinished saga before it returns, so the API answers only once recovery ran.

use std::sync::Arc;

use saga_messaging::MessagingError;
use saga_messaging::transport::{Consumer, SubscriptionSpec, Transport};
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
    /// Unfinished sagas resumed at start.
    pub resumed: usize,
    relay: tokio::task::JoinHandle<()>,
    acks: Box<dyn Consumer>,
}

impl Node {
    pub async fn start(config: NodeConfig, transport: Arc<dyn Transport>) -> Result<Node, NodeError> {
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
        let resumed = engine.recover().await.map_err(NodeError::Recover)?;
        let routes = crate::api::routes(engine.clone())
            .await
            .map_err(NodeError::Routes)?;
        Ok(Node {
            engine,
            routes,
            resumed,
            relay,
            acks,
        })
    }

    /// Stops the acknowledgement subscription and the relay (the caller stopped serving).
    pub async fn shutdown(self) {
        self.acks.shutdown().await;
        self.relay.abort();
    }
}

//! `saga-orchestrator dev`: the embedded default. One process hosts the orchestrator and the
//! four participants, each with its own sled log under one data directory, talking over real
//! gRPC on loopback ports, with the embedded (sled) compensation transport instead of a
//! broker. It seeds the data of shared/BENCH.md and, with `--orders N`, runs N orders through
//! the public API and checks conservation on the participants' own state.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use saga_messaging::embedded::{EmbeddedConfig, EmbeddedTransport};
use saga_messaging::transport::{Consumer, Transport};
use saga_participants::consumer::CompensationConsumer;
use saga_participants::{Participant, Role};
use saga_proto::v1 as pb;
use tonic::transport::Channel;

use crate::ack_key::AckKey;
use crate::engine::{AckEndpoint, Engine, EngineConfig};
use crate::node::{Node, NodeConfig, NodeError};
use crate::order::{OrderTiming, ParticipantAddrs};
use crate::workload::Scenario;

/// Test knobs of a dev system.
#[derive(Clone, Default)]
pub struct DevOptions {
    /// Wraps every participant's barrier (tests inject faults with
    /// `saga_participants::faults::FaultPlan::decorate`).
    pub barrier: Option<saga_participants::BarrierDecorator>,
}

/// sled's page cache of each of the dev system's logs, in bytes. Larger than a service's
/// default (`LogConfig::CACHE_MB_DEFAULT`): here six logs share one process and one sled I/O
/// pool, and the queue's five subscribers read every message from sled; with 8 MiB each the
/// demo ran 256-266 sagas/s at 32 in flight, with 64 MiB 328-353/s (BENCHMARKS.md).
pub const DEV_CACHE_BYTES: u64 = 64 << 20;

/// A log of the dev system in `dir`.
fn dev_log(dir: PathBuf) -> saga_storage::LogConfig {
    saga_storage::LogConfig {
        cache_capacity_bytes: DEV_CACHE_BYTES,
        ..saga_storage::LogConfig::new(dir)
    }
}

/// Why a dev system did not start or run.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("cannot create {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("cannot open the embedded queue: {0}")]
    Queue(#[source] saga_messaging::MessagingError),
    #[error("cannot open the {role} log: {source}")]
    Participant {
        role: Role,
        source: saga_storage::StorageError,
    },
    #[error("the {role} consumer cannot subscribe: {source}")]
    Subscribe {
        role: Role,
        source: saga_messaging::MessagingError,
    },
    #[error("cannot bind {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("orchestrator: {0}")]
    Node(#[from] NodeError),
    #[error("cannot build a participant's gRPC services: {0}")]
    Routes(#[source] tonic_reflection::server::Error),
    #[error("seeding the benchmark data: {0}")]
    Seed(#[source] crate::workload::WorkloadError),
    #[error(transparent)]
    Workload(#[from] crate::workload::WorkloadError),
    #[error("the orchestrator's acknowledgement key: {0}")]
    AckKey(#[from] crate::ack_key::AckKeyError),
}

/// A running all-in-one system.
pub struct Dev {
    pub engine: Engine,
    pub api_addr: SocketAddr,
    pub participants: ParticipantAddrs,
    node: Node,
    stop: Vec<tokio::sync::oneshot::Sender<()>>,
    servers: Vec<tokio::task::JoinHandle<()>>,
    consumers: Vec<Box<dyn Consumer>>,
}

/// Serves `routes` on `listener` in a task until the returned sender fires.
/// `on_stop` runs when it fires, before the server waits for its open streams to end.
fn serve_routes(
    routes: tonic::service::Routes,
    listener: tokio::net::TcpListener,
    on_stop: impl FnOnce() + Send + 'static,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let stopped = async {
            let _ = stopped.await;
            on_stop();
        };
        if let Err(error) = saga_proto::server::serve(routes, listener, stopped).await {
            tracing::error!(%error, "gRPC server failed");
        }
    });
    (stop, server)
}

async fn bind(addr: &str) -> Result<tokio::net::TcpListener, DevError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| DevError::Bind {
            addr: addr.to_owned(),
            source,
        })
}

fn local_addr(listener: &tokio::net::TcpListener) -> Result<SocketAddr, DevError> {
    listener.local_addr().map_err(|source| DevError::Bind {
        addr: "a loopback port".into(),
        source,
    })
}

impl Dev {
    /// Starts everything under `data_dir`, the API on `listen`. Seeds the benchmark data
    /// (with `coupons` coupons) when the data directory is new.
    pub async fn start(
        data_dir: &Path,
        listen: &str,
        coupons: u64,
        options: DevOptions,
    ) -> Result<Dev, DevError> {
        let fresh = !data_dir.join("orchestrator").exists();
        std::fs::create_dir_all(data_dir).map_err(|source| DevError::DataDir {
            path: data_dir.to_owned(),
            source,
        })?;
        let transport: Arc<dyn Transport> = Arc::new(
            EmbeddedTransport::open_with(
                dev_log(data_dir.join("queue")),
                EmbeddedConfig {
                    retry_delay_base: Duration::from_millis(200),
                    retry_delay_max: Duration::from_secs(5),
                },
            )
            .map_err(DevError::Queue)?,
        );
        let mut stop = Vec::new();
        let mut servers = Vec::new();
        let mut consumers = Vec::new();
        let mut addrs = Vec::new();
        for role in Role::ALL {
            let mut participant = Participant::open_with(role, dev_log(data_dir.join(role.name())))
                .map_err(|source| DevError::Participant { role, source })?;
            if let Some(decorate) = &options.barrier {
                participant = participant.with_barrier(decorate);
            }
            let consumer = Arc::new(CompensationConsumer::new(participant.clone(), transport.clone()));
            consumers.push(
                transport
                    .subscribe(consumer.spec(), consumer.clone())
                    .await
                    .map_err(|source| DevError::Subscribe { role, source })?,
            );
            let listener = bind("127.0.0.1:0").await?;
            addrs.push(local_addr(&listener)?.to_string());
            let routes = participant
                .routes(Some(consumer))
                .await
                .map_err(DevError::Routes)?;
            // The orchestrator's step streams would hold the server's graceful shutdown.
            let (s, server) = serve_routes(routes, listener, move || participant.close_step_streams());
            stop.push(s);
            servers.push(server);
        }
        let participants = ParticipantAddrs {
            order: addrs[0].clone(),
            stock: addrs[1].clone(),
            coupon: addrs[2].clone(),
            balance: addrs[3].clone(),
        };

        // The API's address first: compensation requests name it, and the participants
        // acknowledge there over loopback gRPC (`saga_participants::acks`), not through the
        // queue.
        let listener = bind(listen).await?;
        let api_addr = local_addr(&listener)?;
        let ack_addr = if api_addr.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], api_addr.port()))
        } else {
            api_addr
        };
        let node = Node::start(
            NodeConfig {
                log: dev_log(data_dir.join("orchestrator")),
                participants: participants.clone(),
                timing: OrderTiming::default(),
                engine: EngineConfig {
                    ack_endpoint: Some(AckEndpoint {
                        url: format!("http://{ack_addr}"),
                        key: AckKey::load_or_create(&data_dir.join("orchestrator"))?,
                    }),
                    ..EngineConfig::default()
                },
                ack_group: None,
                admin_token: saga_proto::auth::AdminToken::none(),
                participant_tls: None,
            },
            transport,
        )
        .await?;
        if node.resumed > 0 {
            tracing::info!(resumed = node.resumed, "resumed unfinished sagas");
        }
        let (s, server) = serve_routes(node.routes.clone(), listener, || ());
        stop.push(s);
        servers.push(server);

        let dev = Dev {
            engine: node.engine.clone(),
            api_addr,
            participants,
            node,
            stop,
            servers,
            consumers,
        };
        if fresh {
            crate::workload::seed(&dev.participants, 0..coupons, Scenario::Fail20)
                .await
                .map_err(DevError::Seed)?;
        }
        Ok(dev)
    }

    /// A client of the system's orchestrator API (a deadline on every call).
    pub async fn client(&self) -> Result<pb::orchestrator_client::OrchestratorClient<Channel>, DevError> {
        Ok(pb::orchestrator_client::OrchestratorClient::new(
            crate::workload::channel(&self.api_addr.to_string()).await?,
        ))
    }

    /// Stops the servers, consumers and the relay at once (no drain: what was left resumes
    /// at the next start on the same data dir).
    pub async fn shutdown(self) {
        for s in self.stop {
            let _ = s.send(());
        }
        for server in self.servers {
            let _ = server.await;
        }
        for consumer in self.consumers {
            consumer.shutdown().await;
        }
        self.node.shutdown(false, std::time::Duration::ZERO).await;
    }
}

/// The data directory of a dev run: the given one, or a new temporary one removed at exit.
pub fn data_dir(given: Option<PathBuf>) -> Result<(PathBuf, Option<tempfile::TempDir>), DevError> {
    match given {
        Some(dir) => Ok((dir, None)),
        None => {
            let temp = tempfile::Builder::new()
                .prefix("saga-dev-")
                .tempdir()
                .map_err(|source| DevError::DataDir {
                    path: std::env::temp_dir(),
                    source,
                })?;
            Ok((temp.path().to_owned(), Some(temp)))
        }
    }
}

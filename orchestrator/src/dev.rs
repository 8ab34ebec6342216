//! `saga-orchestrator dev`: the embedded default. One process hosts the orchestrator and the
//! four participants, each with its own sled log under one data directory, talking over real
//! gRPC on loopback ports, with the embedded (sled) compensation transport instead of a
//! broker. It seeds the data of shared/BENCH.md and, with `--orders N`, runs N orders through
//! the public API and checks conservation on the participants' own state.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use saga_messaging::embedded::{EmbeddedConfig, EmbeddedTransport};
use saga_messaging::transport::{Consumer, SubscriptionSpec, Transport};
use saga_participants::consumer::CompensationConsumer;
use saga_participants::{Participant, Role};
use saga_proto::v1 as pb;
use tonic::transport::Channel;

use crate::engine::{AckHandler, Engine, EngineConfig, ack_group};
use crate::order::{self, OrderInvoker, OrderTiming, ParticipantAddrs};
use crate::workload::Scenario;

/// Test knobs of a dev system.
#[derive(Clone, Default)]
pub struct DevOptions {
    /// Wraps every participant's barrier (tests inject faults with
    /// `saga_participants::faults::FaultPlan::decorate`).
    pub barrier: Option<saga_participants::BarrierDecorator>,
}

/// A running all-in-one system.
pub struct Dev {
    pub engine: Engine,
    pub api_addr: SocketAddr,
    pub participants: ParticipantAddrs,
    stop: Vec<tokio::sync::oneshot::Sender<()>>,
    servers: Vec<tokio::task::JoinHandle<()>>,
    consumers: Vec<Box<dyn Consumer>>,
    relay: tokio::task::JoinHandle<()>,
}

fn serve_routes(
    routes: tonic::service::Routes,
    listener: tokio::net::TcpListener,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_routes(routes)
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    let _ = stopped.await;
                },
            )
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "gRPC server failed");
        }
    });
    (stop, server)
}

impl Dev {
    /// Starts everything under `data_dir`, the API on `listen`. Seeds the benchmark data
    /// (with `coupons` coupons) when the data directory is new.
    pub async fn start(
        data_dir: &Path,
        listen: &str,
        coupons: u64,
        options: DevOptions,
    ) -> anyhow::Result<Dev> {
        let fresh = !data_dir.join("orchestrator").exists();
        std::fs::create_dir_all(data_dir).with_context(|| format!("cannot create {}", data_dir.display()))?;
        let transport: Arc<dyn Transport> = Arc::new(
            EmbeddedTransport::open(
                &data_dir.join("queue"),
                EmbeddedConfig {
                    retry_delay_base: Duration::from_millis(200),
                    retry_delay_max: Duration::from_secs(5),
                },
            )
            .context("cannot open the embedded queue")?,
        );
        let mut stop = Vec::new();
        let mut servers = Vec::new();
        let mut consumers = Vec::new();
        let mut addrs = Vec::new();
        for role in Role::ALL {
            let mut participant = Participant::open(role, &data_dir.join(role.name()))
                .with_context(|| format!("cannot open the {} log", role.name()))?;
            if let Some(decorate) = &options.barrier {
                participant = participant.with_barrier(decorate);
            }
            let consumer = Arc::new(CompensationConsumer::new(participant.clone(), transport.clone()));
            consumers.push(transport.subscribe(consumer.spec(), consumer.clone()).await?);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            addrs.push(listener.local_addr()?.to_string());
            let (s, server) = serve_routes(participant.router(Some(consumer)), listener);
            stop.push(s);
            servers.push(server);
        }
        let participants = ParticipantAddrs {
            order: addrs[0].clone(),
            stock: addrs[1].clone(),
            coupon: addrs[2].clone(),
            balance: addrs[3].clone(),
        };

        let log = crate::engine::open_log(saga_storage::LogConfig::new(data_dir.join("orchestrator")))
            .context("cannot open the orchestrator log")?;
        let timing = OrderTiming::default();
        let config = EngineConfig::default();
        let ack_spec = SubscriptionSpec {
            group: ack_group(&config.node_id),
            topic: config.ack_topic.clone(),
            tags: vec![config.node_id.clone()],
        };
        let engine = Engine::new(
            log,
            vec![order::definition(&timing)],
            OrderInvoker::new(&participants)?,
            config,
        );
        let relay = {
            let engine = engine.clone();
            let transport = transport.clone();
            tokio::spawn(async move { engine.run_relay(transport).await })
        };
        consumers.push(
            transport
                .subscribe(
                    ack_spec,
                    Arc::new(AckHandler {
                        engine: engine.clone(),
                    }),
                )
                .await?,
        );
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("--listen: cannot bind {listen}"))?;
        let api_addr = listener.local_addr()?;
        let (s, server) = serve_routes(crate::api::routes(engine.clone()).await?, listener);
        stop.push(s);
        servers.push(server);

        let dev = Dev {
            engine,
            api_addr,
            participants,
            stop,
            servers,
            consumers,
            relay,
        };
        if fresh {
            crate::workload::seed(&dev.participants, 0..coupons, Scenario::Fail20)
                .await
                .context("seeding the benchmark data")?;
        }
        let resumed = dev.engine.recover().await?;
        if resumed > 0 {
            tracing::info!(resumed, "resumed unfinished sagas");
        }
        Ok(dev)
    }

    /// A client of the system's orchestrator API (a deadline on every call).
    pub async fn client(&self) -> anyhow::Result<pb::orchestrator_client::OrchestratorClient<Channel>> {
        Ok(pb::orchestrator_client::OrchestratorClient::new(
            crate::workload::channel(&self.api_addr.to_string()).await?,
        ))
    }

    /// Stops the servers, consumers and the relay.
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
        self.relay.abort();
    }
}

/// The data directory of a dev run: the given one, or a new temporary one removed at exit.
pub fn data_dir(given: Option<PathBuf>) -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    match given {
        Some(dir) => Ok((dir, None)),
        None => {
            let temp = tempfile::Builder::new().prefix("saga-dev-").tempdir()?;
            Ok((temp.path().to_owned(), Some(temp)))
        }
    }
}

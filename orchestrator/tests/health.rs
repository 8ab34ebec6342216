//! Issue 12: health that means something. The orchestrator's health service reports
//! NOT_SERVING (and its API answers UNAVAILABLE) while recovery has not run, SERVING after, and
//! NOT_SERVING again once its event log fails.

use std::sync::Arc;
use std::time::Duration;

use saga_messaging::embedded::{EmbeddedConfig, EmbeddedTransport};
use saga_orchestrator::engine::EngineConfig;
use saga_orchestrator::node::{Node, NodeConfig};
use saga_orchestrator::order::{OrderTiming, ParticipantAddrs};
use saga_proto::v1 as pb;
use saga_storage::gate::{GatePoint, WriterGate};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

async fn health(channel: &tonic::transport::Channel, service: &str) -> ServingStatus {
    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health answers")
        .into_inner()
        .status;
    ServingStatus::try_from(status).expect("a known status")
}

/// Waits, through the health service's Watch stream, until `service` reports `wanted`.
async fn health_becomes(channel: &tonic::transport::Channel, service: &str, wanted: ServingStatus) {
    let mut updates = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health watch")
        .into_inner();
    let seen = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(update) = updates.message().await.expect("watch stream") {
            if update.status == wanted as i32 {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(seen, Ok(true), "{service} reports {wanted:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_serving_before_recovery_and_after_the_log_failed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let transport = Arc::new(
        EmbeddedTransport::open(&dir.path().join("queue"), EmbeddedConfig::default()).expect("queue"),
    );
    let gate = Arc::new(WriterGate::new());
    let mut log = saga_storage::LogConfig::new(dir.path().join("orchestrator"));
    log.gate = Some(Arc::clone(&gate));
    // Participants nobody listens on: the saga below cannot get past its first step.
    let nowhere = "127.0.0.1:1".to_owned();
    let mut node = Node::open(
        NodeConfig {
            log,
            participants: ParticipantAddrs {
                order: nowhere.clone(),
                stock: nowhere.clone(),
                coupon: nowhere.clone(),
                balance: nowhere,
            },
            timing: OrderTiming::default(),
            engine: EngineConfig::default(),
            ack_group: None,
            admin_token: saga_proto::auth::AdminToken::none(),
            participant_tls: None,
        },
        transport,
    )
    .await
    .expect("opens");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(saga_proto::server::serve(node.routes.clone(), listener, async {
        let _ = stopped.await;
    }));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connects");

    // Before recovery: NOT_SERVING, and the API refuses with UNAVAILABLE.
    assert_eq!(health(&channel, "").await, ServingStatus::NotServing);
    assert_eq!(
        health(&channel, "saga.v1.Orchestrator").await,
        ServingStatus::NotServing
    );
    let mut client = pb::orchestrator_client::OrchestratorClient::new(channel.clone());
    let early = client
        .start_order(saga_orchestrator::workload::order_request("health", 1))
        .await
        .expect_err("recovering");
    assert_eq!(early.code(), tonic::Code::Unavailable, "{early:?}");

    node.recover().await.expect("recovers");
    assert_eq!(health(&channel, "").await, ServingStatus::Serving);
    assert_eq!(
        health(&channel, "saga.v1.Orchestrator").await,
        ServingStatus::Serving
    );

    // The log fails (a batch fails before its commit, as in a crash there): NOT_SERVING.
    gate.arm(GatePoint::BeforeCommit);
    let start = tokio::spawn({
        let mut client = client.clone();
        async move {
            client
                .start_order(saga_orchestrator::workload::order_request("health", 2))
                .await
        }
    });
    assert!(
        gate.held(Duration::from_secs(10)).await,
        "the start's batch is held"
    );
    gate.fail();
    let failed = start.await.expect("joins").expect_err("its batch failed");
    assert_ne!(failed.code(), tonic::Code::Ok);
    health_becomes(&channel, "", ServingStatus::NotServing).await;
    assert_eq!(
        health(&channel, "saga.v1.Orchestrator").await,
        ServingStatus::NotServing
    );

    let _ = stop.send(());
    let _ = server.await;
    node.shutdown(false, std::time::Duration::ZERO).await;
}

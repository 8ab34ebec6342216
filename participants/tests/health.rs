//! Issue 12: a participant's health service reports SERVING while its log works and
//! NOT_SERVING once the log failed (nothing can be recorded until a restart).

use std::sync::Arc;
use std::time::Duration;

use saga_participants::{Participant, Role};
use saga_proto::v1 as pb;
use saga_storage::gate::{GatePoint, WriterGate};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_not_serving_when_the_log_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gate = Arc::new(WriterGate::new());
    let mut config = saga_storage::LogConfig::new(dir.path());
    config.gate = Some(Arc::clone(&gate));
    let participant = Participant::open_with(Role::Stock, config).expect("opens");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn({
        let participant = participant.clone();
        async move {
            participant
                .serve(listener, None, async {
                    let _ = stopped.await;
                })
                .await
        }
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connects");
    let check = |service: &'static str| {
        let channel = channel.clone();
        async move {
            HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .expect("health answers")
                .into_inner()
                .status
        }
    };
    assert_eq!(check("").await, ServingStatus::Serving as i32);
    assert_eq!(check("saga.v1.StockService").await, ServingStatus::Serving as i32);

    gate.arm(GatePoint::BeforeCommit);
    let seed = tokio::spawn({
        let channel = channel.clone();
        async move {
            pb::stock_service_client::StockServiceClient::new(channel)
                .seed_stock(pb::SeedStockRequest {
                    stock: vec![pb::ProductStock {
                        product_id: "p1".into(),
                        available: 1,
                        reserved: 0,
                    }],
                })
                .await
        }
    });
    assert!(
        gate.held(Duration::from_secs(10)).await,
        "the seed's batch is held"
    );
    gate.fail();
    seed.await.expect("joins").expect_err("its batch failed");
    let mut updates = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: "saga.v1.StockService".into(),
        })
        .await
        .expect("health watch")
        .into_inner();
    let not_serving = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(update) = updates.message().await.expect("watch stream") {
            if update.status == ServingStatus::NotServing as i32 {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(not_serving, Ok(true), "NOT_SERVING after the log failed");
    assert_eq!(check("").await, ServingStatus::NotServing as i32);

    // The server stops gracefully: it waits for open streams, so close ours first.
    drop(updates);
    drop(channel);
    let _ = stop.send(());
    server.await.expect("joins").expect("served");
}

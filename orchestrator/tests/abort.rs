//! AbortSaga on a running saga.

use std::time::Duration;

use saga_orchestrator::dev::{Dev, DevOptions};
use saga_orchestrator::workload;
use saga_participants::faults::{ActFault, FaultPlan};
use saga_proto::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_running_saga_compensates_what_it_did() {
    // Reservations answer 500 ms after they are applied: the saga is surely running when the
    // abort arrives.
    let slow_reservations = DevOptions {
        barrier: Some(std::sync::Arc::new(|_, inner| {
            FaultPlan {
                act: ActFault::parse_list("delay:reserve_stock:500").expect("parses"),
                ..FaultPlan::default()
            }
            .decorate(inner)
        })),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let system = Dev::start(dir.path(), "127.0.0.1:0", 100, slow_reservations)
        .await
        .expect("starts");
    let mut client = system.client().await.expect("connects");
    let saga = client
        .start_order(workload::order_request("t", 1))
        .await
        .expect("starts")
        .into_inner()
        .saga
        .expect("saga");
    let aborted = client
        .abort_saga(pb::AbortSagaRequest {
            saga_id: saga.saga_id.clone(),
            reason: "customer cancelled".into(),
        })
        .await
        .expect("aborts")
        .into_inner()
        .saga
        .expect("saga");
    assert!(
        aborted.failure_reason.contains("customer cancelled"),
        "{aborted:?}"
    );
    let mut events = client
        .watch_saga(pb::WatchSagaRequest {
            saga_id: saga.saga_id.clone(),
            from_version: 1,
            status_changes_only: false,
        })
        .await
        .expect("watches")
        .into_inner();
    let mut types = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(e) = events.message().await.expect("stream") {
            types.push(e.event_type);
        }
    })
    .await
    .expect("final in time");
    assert_eq!(
        types.last().map(String::as_str),
        Some("SagaCompensated"),
        "{types:?}"
    );
    assert!(types.contains(&"AbortRequested".to_owned()));
    assert!(!types.contains(&"SagaCompleted".to_owned()));
    let stock = pb::stock_service_client::StockServiceClient::new(
        workload::channel(&system.participants.stock)
            .await
            .expect("connects"),
    )
    .get_stock(pb::GetStockRequest {
        product_ids: vec![workload::product_id(1)],
    })
    .await
    .expect("reads")
    .into_inner()
    .stock;
    assert_eq!(
        (stock[0].available, stock[0].reserved),
        (workload::STOCK_INITIAL, 0)
    );
    let balances = pb::balance_service_client::BalanceServiceClient::new(
        workload::channel(&system.participants.balance)
            .await
            .expect("connects"),
    )
    .get_balances(pb::GetBalancesRequest {
        user_ids: vec![workload::user_id(1)],
    })
    .await
    .expect("reads")
    .into_inner()
    .accounts;
    assert_eq!(
        balances[0].balance_minor,
        workload::initial_balance(1),
        "never charged"
    );
    system.shutdown().await;
}

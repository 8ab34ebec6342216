//! The orchestrator and four participants as separate processes, compensations through the
//! real RocketMQ broker (scripts/dev-env), each test on topics and groups of its own.

use std::time::Duration;

use saga_messaging::topics;
use saga_proto::v1 as pb;
use saga_tests::{System, SystemConfig, order, step_state, wait_final};

const PATIENCE: Duration = Duration::from_secs(90);

async fn start(
    client: &mut pb::orchestrator_client::OrchestratorClient<tonic::transport::Channel>,
    request: pb::StartOrderRequest,
) -> String {
    client
        .start_order(request)
        .await
        .expect("starts")
        .into_inner()
        .saga
        .expect("saga")
        .saga_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_completes_once_and_a_repeated_request_id_returns_the_same_saga_or_already_exists() {
    let Some(namesrv) = topics::namesrv_for_tests() else {
        return;
    };
    let system = System::start(&namesrv, SystemConfig::default()).await;
    system.seed_stock("p1", 10).await;
    system.seed_balance("u1", 100).await;
    system.seed_coupon("c1", "u1").await;
    let mut client = system.client().await;

    // Eight concurrent starts with one request id: one saga, created once.
    let request = order(&format!("{}-r1", system.run), "u1", "p1", "c1");
    let mut calls = Vec::new();
    for _ in 0..8 {
        let mut client = client.clone();
        let request = request.clone();
        calls.push(tokio::spawn(async move {
            client.start_order(request).await.expect("starts").into_inner()
        }));
    }
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.expect("join"));
    }
    let saga_id = answers[0].saga.as_ref().expect("saga").saga_id.clone();
    assert!(
        answers
            .iter()
            .all(|a| a.saga.as_ref().expect("saga").saga_id == saga_id)
    );
    assert_eq!(
        answers.iter().filter(|a| a.created).count(),
        1,
        "created exactly once"
    );

    let saga = wait_final(&mut client, &saga_id, PATIENCE).await;
    assert_eq!(saga.state, pb::SagaState::Completed as i32, "{saga:?}");
    // A later repeat returns the same saga; the same request id with another order is
    // refused, naming the field (it used to return the first saga silently).
    let again = client
        .start_order(request.clone())
        .await
        .expect("repeats")
        .into_inner();
    assert!(!again.created);
    assert_eq!(again.saga.expect("saga").saga_id, saga_id);
    let other = client
        .start_order(order(&format!("{}-r1", system.run), "u1", "p1", ""))
        .await
        .expect_err("another order under a known request id");
    assert_eq!(other.code(), tonic::Code::AlreadyExists, "{other:?}");
    assert!(other.message().contains("request_id"), "{}", other.message());

    assert_eq!(system.stock("p1").await, (9, 1));
    assert_eq!(system.balance("u1").await, 90);
    assert_eq!(system.coupon("c1").await, pb::CouponStatus::Locked);
    assert_eq!(system.order(&saga_id).await, Some(pb::OrderStatus::Confirmed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_at_reserve_lock_or_deduct_compensates_exactly_the_earlier_steps() {
    let Some(namesrv) = topics::namesrv_for_tests() else {
        return;
    };
    let system = System::start(&namesrv, SystemConfig::default()).await;
    let run = &system.run;
    system.seed_stock("p1", 10).await;
    system.seed_stock("empty", 0).await;
    system.seed_balance("rich", 100).await;
    system.seed_balance("poor", 0).await;
    system.seed_coupon("c-rich", "rich").await;
    system.seed_coupon("c-poor", "poor").await;
    let mut client = system.client().await;

    // reserve_stock refused: only the order is undone.
    let s1 = start(&mut client, order(&format!("{run}-1"), "rich", "empty", "c-rich")).await;
    let saga = wait_final(&mut client, &s1, PATIENCE).await;
    assert_eq!(saga.state, pb::SagaState::Compensated as i32, "{saga:?}");
    assert_eq!(step_state(&saga, "create_order"), pb::StepState::Compensated);
    assert_eq!(step_state(&saga, "reserve_stock"), pb::StepState::Failed);
    assert_eq!(step_state(&saga, "lock_coupon"), pb::StepState::Pending);
    assert_eq!(system.order(&s1).await, Some(pb::OrderStatus::Cancelled));
    assert_eq!(system.coupon("c-rich").await, pb::CouponStatus::Free);
    assert_eq!(system.stock("empty").await, (0, 0));

    // lock_coupon refused (someone else's coupon): stock released, order cancelled.
    let s2 = start(&mut client, order(&format!("{run}-2"), "rich", "p1", "c-poor")).await;
    let saga = wait_final(&mut client, &s2, PATIENCE).await;
    assert_eq!(saga.state, pb::SagaState::Compensated as i32, "{saga:?}");
    assert_eq!(step_state(&saga, "reserve_stock"), pb::StepState::Compensated);
    assert_eq!(step_state(&saga, "lock_coupon"), pb::StepState::Failed);
    assert_eq!(system.stock("p1").await, (10, 0));
    assert_eq!(system.coupon("c-poor").await, pb::CouponStatus::Free);
    assert_eq!(system.balance("rich").await, 100);

    // deduct_balance refused: coupon unlocked, stock released, order cancelled.
    let s3 = start(&mut client, order(&format!("{run}-3"), "poor", "p1", "c-poor")).await;
    let saga = wait_final(&mut client, &s3, PATIENCE).await;
    assert_eq!(saga.state, pb::SagaState::Compensated as i32, "{saga:?}");
    for step in ["create_order", "reserve_stock", "lock_coupon"] {
        assert_eq!(step_state(&saga, step), pb::StepState::Compensated, "{step}");
    }
    assert_eq!(step_state(&saga, "deduct_balance"), pb::StepState::Failed);
    assert_eq!(system.stock("p1").await, (10, 0));
    assert_eq!(system.coupon("c-poor").await, pb::CouponStatus::Free);
    assert_eq!(system.balance("poor").await, 0);
    assert_eq!(system.order(&s3).await, Some(pb::OrderStatus::Cancelled));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_at_create_or_confirm_compensates_exactly_the_earlier_steps() {
    let Some(namesrv) = topics::namesrv_for_tests() else {
        return;
    };
    // The order participant refuses the first create and the first confirmation.
    let config = SystemConfig {
        participant_env: vec![(
            "order",
            "SAGA_FAULT_ACT".into(),
            "refuse:create_order:1,refuse:confirm_order:1".into(),
        )],
        ..SystemConfig::default()
    };
    let system = System::start(&namesrv, config).await;
    let run = &system.run;
    system.seed_stock("p1", 10).await;
    system.seed_balance("u1", 100).await;
    system.seed_coupon("c1", "u1").await;
    let mut client = system.client().await;

    let s1 = start(&mut client, order(&format!("{run}-1"), "u1", "p1", "c1")).await;
    let saga = wait_final(&mut client, &s1, PATIENCE).await;
    assert_eq!(saga.state, pb::SagaState::Compensated as i32, "{saga:?}");
    assert_eq!(step_state(&saga, "create_order"), pb::StepState::Failed);
    assert_eq!(
        step_state(&saga, "reserve_stock"),
        pb::StepState::Pending,
        "nothing else was called"
    );
    assert_eq!(system.stock("p1").await, (10, 0));

    let s2 = start(&mut client, order(&format!("{run}-2"), "u1", "p1", "c1")).await;
    let saga = wait_final(&mut client, &s2, PATIENCE).await;
    assert_eq!(saga.state, pb::SagaState::Compensated as i32, "{saga:?}");
    for step in ["create_order", "reserve_stock", "lock_coupon", "deduct_balance"] {
        assert_eq!(step_state(&saga, step), pb::StepState::Compensated, "{step}");
    }
    assert_eq!(step_state(&saga, "confirm_order"), pb::StepState::Failed);
    assert_eq!(system.stock("p1").await, (10, 0));
    assert_eq!(system.balance("u1").await, 100, "refunded exactly once");
    assert_eq!(system.coupon("c1").await, pb::CouponStatus::Free);
    assert_eq!(system.order(&s2).await, Some(pb::OrderStatus::Cancelled));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_down_and_back_is_retried_with_no_double_effect() {
    let Some(namesrv) = topics::namesrv_for_tests() else {
        return;
    };
    let mut system = System::start(&namesrv, SystemConfig::default()).await;
    let run = system.run.clone();
    system.seed_stock("p1", 10).await;
    system.seed_balance("u1", 100).await;
    let mut client = system.client().await;

    // Stock goes down; the saga keeps retrying reserve_stock with the same key.
    let stock_index = system
        .participants
        .iter()
        .position(|(r, _)| r == "stock")
        .expect("stock");
    let (_, stock) = system.participants.remove(stock_index);
    stock.kill();
    let saga_id = start(&mut client, order(&format!("{run}-1"), "u1", "p1", "")).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let saga = client
            .get_saga(pb::GetSagaRequest {
                saga_id: saga_id.clone(),
            })
            .await
            .expect("gets")
            .into_inner()
            .saga
            .expect("saga");
        let reserve = saga
            .steps
            .iter()
            .find(|s| s.name == "reserve_stock")
            .expect("step");
        if reserve.attempts >= 2 {
            assert!(!reserve.last_error.is_empty(), "{reserve:?}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no retry seen: {saga:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let port = system.ports[stock_index];
    let stock = system.start_participant("stock", port);
    system.participants.insert(stock_index, ("stock".into(), stock));

    let saga = wait_final(&mut client, &saga_id, PATIENCE).await;
    assert_eq!(saga.state, pb::SagaState::Completed as i32, "{saga:?}");
    assert_eq!(system.stock("p1").await, (9, 1), "reserved once");
    assert_eq!(system.balance("u1").await, 90, "charged once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_times_out_after_applying_is_compensated_exactly_once() {
    let Some(namesrv) = topics::namesrv_for_tests() else {
        return;
    };
    // Balance applies the deduction, then answers after 1.5 s; the deadline is 300 ms.
    let config = SystemConfig {
        participant_env: vec![(
            "balance",
            "SAGA_FAULT_ACT".into(),
            "delay:deduct_balance:1500".into(),
        )],
        orchestrator_args: vec!["--step-deadline-ms".into(), "300".into()],
    };
    let system = System::start(&namesrv, config).await;
    let run = &system.run;
    system.seed_stock("p1", 10).await;
    system.seed_balance("u1", 100).await;
    let mut client = system.client().await;

    let saga_id = start(&mut client, order(&format!("{run}-1"), "u1", "p1", "")).await;
    let saga = wait_final(&mut client, &saga_id, PATIENCE).await;
    assert_eq!(saga.state, pb::SagaState::Compensated as i32, "{saga:?}");
    assert_eq!(
        step_state(&saga, "deduct_balance"),
        pb::StepState::Compensated,
        "{saga:?}"
    );
    assert_eq!(system.balance("u1").await, 100, "deducted once, refunded once");
    assert_eq!(system.stock("p1").await, (10, 0));
    assert_eq!(system.order(&saga_id).await, Some(pb::OrderStatus::Cancelled));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrator_sigkilled_mid_saga_finishes_every_saga_after_restart() {
    let Some(namesrv) = topics::namesrv_for_tests() else {
        return;
    };
    // Slow reservations keep sagas in flight when the orchestrator dies.
    let config = SystemConfig {
        participant_env: vec![("stock", "SAGA_FAULT_ACT".into(), "delay:reserve_stock:200".into())],
        ..SystemConfig::default()
    };
    let mut system = System::start(&namesrv, config).await;
    let run = system.run.clone();
    system.seed_stock("p1", 1000).await;
    system.seed_balance("rich", 1000).await;
    system.seed_balance("poor", 0).await;
    let mut client = system.client().await;
    let mut sagas = Vec::new();
    for i in 0..20 {
        let user = if i % 4 == 0 { "poor" } else { "rich" };
        sagas.push((
            user,
            start(&mut client, order(&format!("{run}-{i}"), user, "p1", "")).await,
        ));
    }
    system.orchestrator.take().expect("running").kill();
    system.start_orchestrator();
    let mut client = system.client().await;
    let mut completed = 0;
    for (user, saga_id) in &sagas {
        let saga = wait_final(&mut client, saga_id, PATIENCE).await;
        let expected = if *user == "poor" {
            pb::SagaState::Compensated
        } else {
            completed += 1;
            pb::SagaState::Completed
        };
        assert_eq!(saga.state, expected as i32, "{saga:?}");
    }
    assert_eq!(system.stock("p1").await, (1000 - completed, completed));
    assert_eq!(system.balance("rich").await, 1000 - 10 * completed);
    assert_eq!(system.balance("poor").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_orchestrators_on_one_broker_each_get_the_acks_of_their_own_sagas() {
    use saga_orchestrator::order::ParticipantAddrs;
    use saga_orchestrator::workload::{self, Scenario};
    let Some(namesrv) = topics::namesrv_for_tests() else {
        return;
    };
    // Two orchestrator nodes share the participants and the topics; each has its own log,
    // node id and acknowledgement group. The system's own orchestrator is replaced by them,
    // so that both write their reports to files this test reads.
    let mut system = System::start(&namesrv, SystemConfig::default()).await;
    system.orchestrator.take().expect("running").kill();
    let logs = tempfile::tempdir().expect("tempdir");
    let nodes = ["n1", "n2"].map(|node| {
        let log = logs.path().join(format!("{node}.log"));
        (node, system.start_orchestrator_node(node, &log), log)
    });
    let addrs = ParticipantAddrs::parse(&system.participant_list()).expect("participant list");
    let halves = [0..200u64, 200..400];
    workload::seed(&addrs, 0..400, Scenario::Fail20)
        .await
        .expect("seeds");
    // 32 in flight, split evenly: orders 0..200 through n1, 200..400 through n2.
    let apis = nodes
        .iter()
        .map(|(_, proc, _)| proc.addr.clone())
        .collect::<Vec<_>>();
    let results = saga_tests::run_split(&apis, Scenario::Fail20, &system.run, 0..400, 32)
        .await
        .expect("runs");
    // Every saga ended on its owner: a compensated saga needs every compensation's ack, so the
    // acks of each node's sagas reached that node.
    for (node_index, orders) in halves.iter().enumerate() {
        let mine: Vec<_> = results.iter().filter(|r| orders.contains(&r.n)).collect();
        let compensated = mine
            .iter()
            .filter(|r| r.state == pb::SagaState::Compensated)
            .count();
        assert_eq!(mine.len(), 200);
        assert!(
            mine.iter()
                .all(|r| matches!(r.state, pb::SagaState::Completed | pb::SagaState::Compensated)),
            "node {}: {:?}",
            nodes[node_index].0,
            mine.iter().map(|r| r.state).collect::<Vec<_>>()
        );
        assert_eq!(
            compensated, 40,
            "node {}: every 5th order compensates",
            nodes[node_index].0
        );
    }
    let problems = workload::check_conservation(&addrs, &results)
        .await
        .expect("checks");
    assert!(problems.is_empty(), "{problems:?}");
    // A saga belongs to the node that started it: the other node does not know it.
    let mut other = pb::orchestrator_client::OrchestratorClient::new(nodes[1].1.channel().await);
    let status = other
        .get_saga(pb::GetSagaRequest {
            saga_id: results[0].saga_id.clone(),
        })
        .await
        .expect_err("n1's saga is not n2's");
    assert_eq!(status.code(), tonic::Code::NotFound);
    // And no node received an ack of a saga it does not own (each logs one if it does).
    for (node, proc, log) in nodes {
        proc.kill();
        assert!(
            !saga_tests::reported_misrouted_ack(&log),
            "node {node} received another node's ack:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
}

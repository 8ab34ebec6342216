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
        ..SystemConfig::default()
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

/// Issue 12: with a token configured, every admin RPC (the orchestrator's ReplayEvents,
/// RetrySaga and AbortSaga; the participants' Seed* and ConsumerAdmin) answers a call without
/// it, or with another token, UNAUTHENTICATED before it reads or changes anything; ordinary
/// calls need no token; the right token works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_rpcs_without_the_bearer_token_are_unauthenticated_and_change_nothing() {
    let Some(namesrv) = topics::namesrv_for_tests() else {
        return;
    };
    let token = "e2e-admin-token-0123456789";
    let secrets = tempfile::tempdir().expect("tempdir");
    let token_file = secrets.path().join("admin-token");
    std::fs::write(&token_file, format!("{token}\n")).expect("writes the token file");
    let config = SystemConfig {
        participant_env: ["order", "stock", "coupon", "balance"]
            .into_iter()
            .map(|role| (role, saga_proto::auth::TOKEN_ENV.to_owned(), token.to_owned()))
            .collect(),
        orchestrator_args: vec!["--admin-token-file".to_owned(), token_file.display().to_string()],
        ..SystemConfig::default()
    };
    let system = System::start(&namesrv, config).await;
    let seed = pb::SeedStockRequest {
        stock: vec![pb::ProductStock {
            product_id: "p1".into(),
            available: 10,
            reserved: 0,
        }],
    };
    let mut stock =
        pb::stock_service_client::StockServiceClient::new(system.participant("stock").channel().await);
    for token in [None, Some("e2e-admin-token-wrong-0000")] {
        unauthenticated(
            stock.seed_stock(with_token(token, seed.clone())).await,
            "SeedStock",
        );
    }
    let mut parked =
        pb::consumer_admin_client::ConsumerAdminClient::new(system.participant("coupon").channel().await);
    unauthenticated(
        parked
            .list_parked(with_token(None, pb::ListParkedRequest::default()))
            .await,
        "ListParked",
    );
    let known = stock
        .get_stock(pb::GetStockRequest {
            product_ids: vec!["p1".into()],
        })
        .await
        .expect("reads stock (no token needed)")
        .into_inner()
        .stock;
    assert!(known.is_empty(), "nothing was seeded: {known:?}");
    stock
        .seed_stock(with_token(Some(token), seed))
        .await
        .expect("seeds with the token");
    assert_eq!(system.stock("p1").await, (10, 0));
    parked
        .list_parked(with_token(Some(token), pb::ListParkedRequest::default()))
        .await
        .expect("lists with the token");
    pb::balance_service_client::BalanceServiceClient::new(system.participant("balance").channel().await)
        .seed_balances(with_token(
            Some(token),
            pb::SeedBalancesRequest {
                accounts: vec![pb::Account {
                    user_id: "u1".into(),
                    balance_minor: 100,
                }],
            },
        ))
        .await
        .expect("seeds with the token");

    // Ordinary calls need no token.
    let mut client = system.client().await;
    let saga_id = start(
        &mut client,
        order(&format!("{}-auth", system.run), "u1", "p1", ""),
    )
    .await;
    let done = wait_final(&mut client, &saga_id, PATIENCE).await;
    assert_eq!(done.state, pb::SagaState::Completed as i32, "{done:?}");
    let replay = |client: &mut pb::orchestrator_client::OrchestratorClient<_>, token| {
        let request = with_token(
            token,
            pb::ReplayEventsRequest {
                from_position: 1,
                follow: false,
            },
        );
        let mut client = client.clone();
        async move {
            let mut events = client.replay_events(request).await?.into_inner();
            let mut count = 0u64;
            while events.message().await?.is_some() {
                count += 1;
            }
            Ok::<u64, tonic::Status>(count)
        }
    };
    let logged = replay(&mut client, Some(token))
        .await
        .expect("replays with the token");
    for token in [None, Some("e2e-admin-token-wrong-0000")] {
        unauthenticated(replay(&mut client, token).await, "ReplayEvents");
        unauthenticated(
            client
                .abort_saga(with_token(
                    token,
                    pb::AbortSagaRequest {
                        saga_id: saga_id.clone(),
                        reason: "no token".into(),
                    },
                ))
                .await,
            "AbortSaga",
        );
        unauthenticated(
            client
                .retry_saga(with_token(
                    token,
                    pb::RetrySagaRequest {
                        saga_id: "ord-unknown".into(),
                        reason: "no token".into(),
                    },
                ))
                .await,
            "RetrySaga of an unknown saga (not NOT_FOUND: nothing is told)",
        );
    }
    assert_eq!(
        replay(&mut client, Some(token)).await.expect("replays"),
        logged,
        "the refused calls wrote nothing"
    );
    let status = client
        .abort_saga(with_token(
            Some(token),
            pb::AbortSagaRequest {
                saga_id,
                reason: "late".into(),
            },
        ))
        .await
        .expect_err("a completed saga cannot be aborted");
    assert_eq!(
        status.code(),
        tonic::Code::FailedPrecondition,
        "past the token check: {status:?}"
    );
}

/// `message` as a request, with `token` as its bearer token when given.
fn with_token<T>(token: Option<&str>, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        saga_proto::auth::authorize(&mut request, token).expect("valid token");
    }
    request
}

fn unauthenticated<T>(result: Result<T, tonic::Status>, what: &str) {
    match result {
        Err(status) => assert_eq!(status.code(), tonic::Code::Unauthenticated, "{what}: {status:?}"),
        Ok(_) => panic!("{what} was accepted"),
    }
}

/// Issue 12: SIGTERM of a participant with its compensation consumer running stops it in
/// order (consumer, producer, client runtime) with status 0 and one "participant stopped"
/// line, not the RocketMQ runtime's task reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_stops_on_sigterm_in_order_with_one_line() {
    let Some(namesrv) = topics::namesrv_for_tests() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("stderr.log");
    let group = format!("stock-sigterm-{}", saga_tests::run_id());
    let args: Vec<String> = [
        "--role",
        "stock",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &dir.path().join("stock").to_string_lossy(),
        "--rocketmq",
        &namesrv,
        "--group",
        &group,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let proc = saga_tests::Proc::start_logged("saga-participant", &args, &[], Some(&log));
    let status = tokio::task::spawn_blocking(move || proc.terminate(Duration::from_secs(60)))
        .await
        .expect("joins");
    let stderr = std::fs::read_to_string(&log).expect("reads the log");
    assert!(status.success(), "exit status {status:?}:\n{stderr}");
    assert_eq!(
        stderr.matches("participant stopped").count(),
        1,
        "one stop line:\n{stderr}"
    );
    assert!(
        !stderr.contains("report") && !stderr.contains("\"leaked\""),
        "no task reports:\n{stderr}"
    );
    assert!(
        stderr.lines().count() < 20,
        "a few lines, not hundreds:\n{stderr}"
    );
}

/// `GET /metrics` of a Prometheus endpoint: the body (plain HTTP/1.0, no client crate needed).
async fn scrape(addr: &str) -> String {
    let addr = addr.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::{Read as _, Write as _};
        let mut stream = std::net::TcpStream::connect(&addr)
            .unwrap_or_else(|e| panic!("connects to the metrics endpoint {addr}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("sets a read timeout");
        stream
            .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .expect("sends the request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("reads the response");
        assert!(
            response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
            "{response}"
        );
        response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default()
    })
    .await
    .expect("joins")
}

/// The value of the sample `name` (with its labels, as printed) in a scrape; 0 when absent.
fn sample(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Issue 12: `--metrics-listen` serves Prometheus text; after a completed and a compensated saga
/// the orchestrator's saga counters, step histogram and log histograms moved, and the stock
/// participant's consumer counted the compensation it applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoints_count_sagas_steps_appends_and_compensations() {
    let Some(namesrv) = topics::namesrv_for_tests() else {
        return;
    };
    let orchestrator_metrics = format!("127.0.0.1:{}", saga_tests::free_port());
    let stock_metrics = format!("127.0.0.1:{}", saga_tests::free_port());
    let config = SystemConfig {
        participant_env: vec![("stock", "SAGA_METRICS_LISTEN".to_owned(), stock_metrics.clone())],
        orchestrator_args: vec!["--metrics-listen".to_owned(), orchestrator_metrics.clone()],
        ..SystemConfig::default()
    };
    let system = System::start(&namesrv, config).await;
    system.seed_stock("p1", 10).await;
    system.seed_balance("u1", 100).await;
    system.seed_balance("u2", 0).await;
    let mut client = system.client().await;
    let ok = start(&mut client, order(&format!("{}-m1", system.run), "u1", "p1", "")).await;
    let poor = start(&mut client, order(&format!("{}-m2", system.run), "u2", "p1", "")).await;
    assert_eq!(
        wait_final(&mut client, &ok, PATIENCE).await.state,
        pb::SagaState::Completed as i32
    );
    assert_eq!(
        wait_final(&mut client, &poor, PATIENCE).await.state,
        pb::SagaState::Compensated as i32
    );

    let body = scrape(&orchestrator_metrics).await;
    let by_definition = |name: &str| sample(&body, &format!("{name}{{definition=\"order\"}}"));
    assert_eq!(by_definition("saga_sagas_started_total"), 2.0, "{body}");
    assert_eq!(by_definition("saga_sagas_completed_total"), 1.0, "{body}");
    assert_eq!(by_definition("saga_sagas_compensated_total"), 1.0, "{body}");
    assert_eq!(sample(&body, "saga_sagas_in_flight"), 0.0, "{body}");
    assert!(
        sample(
            &body,
            "saga_step_seconds_count{step=\"reserve_stock\",outcome=\"ok\"}"
        ) >= 2.0,
        "{body}"
    );
    assert!(
        sample(
            &body,
            "saga_step_seconds_count{step=\"deduct_balance\",outcome=\"business\"}"
        ) >= 1.0,
        "{body}"
    );
    assert!(sample(&body, "saga_log_append_seconds_count") >= 4.0, "{body}");
    assert!(sample(&body, "saga_log_fsync_seconds_count") >= 1.0, "{body}");
    assert!(sample(&body, "saga_relay_published_total") >= 2.0, "{body}");
    // Without --ack-endpoint the acknowledgements (create_order's and reserve_stock's) come
    // through the topic.
    assert!(
        sample(&body, "saga_acks_received_total{via=\"topic\"}") >= 2.0,
        "{body}"
    );
    assert_eq!(
        sample(&body, "saga_acks_received_total{via=\"grpc\"}"),
        0.0,
        "{body}"
    );
    // And the gRPC route is closed.
    let refused = client
        .acknowledge_compensations(pb::AcknowledgeCompensationsRequest {
            acks: vec![saga_tests::compensation_ack(
                &poor,
                "reserve_stock",
                pb::CompensationOutcome::Applied,
            )],
        })
        .await
        .expect_err("off without --ack-endpoint");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");

    // The stock participant applied the compensation of the poor user's reservation.
    let stock = scrape(&stock_metrics).await;
    assert_eq!(
        sample(
            &stock,
            "saga_consumer_deliveries_total{role=\"stock\",outcome=\"consumed\"}"
        ),
        1.0,
        "{stock}"
    );
    assert_eq!(
        sample(&stock, "saga_consumer_tries_total{role=\"stock\"}"),
        1.0,
        "{stock}"
    );
    assert_eq!(
        sample(&stock, "saga_consumer_lag_seconds_count{role=\"stock\"}"),
        1.0,
        "{stock}"
    );
    assert!(sample(&stock, "saga_log_append_seconds_count") >= 3.0, "{stock}");
}

/// The orchestrator's scrape `body` after one compensated saga without a coupon: its two
/// acknowledgements (create_order's and reserve_stock's, at least once each: a duplicate is
/// possible) came over gRPC, none through the topic.
fn assert_acks_came_over_grpc(body: &str) {
    assert!(
        sample(body, "saga_acks_received_total{via=\"grpc\"}") >= 2.0,
        "{body}"
    );
    assert_eq!(
        sample(body, "saga_acks_received_total{via=\"topic\"}"),
        0.0,
        "{body}"
    );
}

/// Issue 11: with `--ack-endpoint listen` the compensation requests name the orchestrator's
/// address and the participants acknowledge there over gRPC (`saga_participants::acks`): a
/// compensated saga's acknowledgements all arrive that way, none through the topic, and the
/// saga ends COMPENSATED with the stock back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_ack_endpoint_acknowledgements_arrive_over_grpc_not_the_topic() {
    let Some(namesrv) = topics::namesrv_for_tests() else {
        return;
    };
    let orchestrator_metrics = format!("127.0.0.1:{}", saga_tests::free_port());
    let config = SystemConfig {
        orchestrator_args: vec![
            "--metrics-listen".to_owned(),
            orchestrator_metrics.clone(),
            "--ack-endpoint".to_owned(),
            "listen".to_owned(),
        ],
        ..SystemConfig::default()
    };
    let (system, _saga) = one_compensated_saga(&namesrv, config, "g1").await;

    assert_acks_came_over_grpc(&scrape(&orchestrator_metrics).await);
    assert_eq!(system.stock("p1").await, (10, 0), "the reservation was undone");
}

/// Issue 12: SIGTERM under load stops the orchestrator in order: new StartOrder calls are told
/// UNAVAILABLE ("shutting down"), step calls in flight finish, it exits 0 with a log that
/// audits clean (every stream gapless, every record chained), and after a restart every saga
/// that was started ends, with stock and money conserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_refuses_new_sagas_exits_0_and_every_saga_finishes_after_restart() {
    let Some(namesrv) = topics::namesrv_for_tests() else {
        return;
    };
    // Slow reservations keep step calls in flight when SIGTERM comes.
    let config = SystemConfig {
        participant_env: vec![("stock", "SAGA_FAULT_ACT".into(), "delay:reserve_stock:100".into())],
        ..SystemConfig::default()
    };
    let mut system = System::start(&namesrv, config).await;
    let run = system.run.clone();
    system.seed_stock("p1", 100_000).await;
    system.seed_balance("rich", 1_000_000).await;
    system.seed_balance("poor", 0).await;
    let client = system.client().await;

    // Eight loops start orders until one is refused; every saga started is kept.
    let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
    let loops: Vec<_> = (0..8)
        .map(|l| {
            let (mut client, started_tx, run) = (client.clone(), started_tx.clone(), run.clone());
            tokio::spawn(async move {
                for i in 0.. {
                    let user = if i % 4 == 3 { "poor" } else { "rich" };
                    match client
                        .start_order(order(&format!("{run}-{l}-{i}"), user, "p1", ""))
                        .await
                    {
                        Ok(response) => {
                            let saga = response.into_inner().saga.expect("saga");
                            let _ = started_tx.send((user.to_owned(), saga.saga_id));
                        }
                        Err(status) => return status,
                    }
                }
                unreachable!("the loop ends with a refusal")
            })
        })
        .collect();
    drop(started_tx);
    let mut sagas = Vec::new();
    while sagas.len() < 40 {
        sagas.push(started_rx.recv().await.expect("a loop started a saga"));
    }

    let orchestrator = system.orchestrator.take().expect("running");
    let status = tokio::task::spawn_blocking(move || orchestrator.terminate(Duration::from_secs(60)))
        .await
        .expect("joins");
    assert!(
        status.success(),
        "the orchestrator exits 0 after SIGTERM: {status:?}"
    );
    let mut refusals = Vec::new();
    for handle in loops {
        refusals.push(handle.await.expect("a loop"));
    }
    while let Some(saga) = started_rx.recv().await {
        sagas.push(saga);
    }
    for refusal in &refusals {
        assert_eq!(refusal.code(), tonic::Code::Unavailable, "{refusal:?}");
    }
    assert!(
        refusals.iter().any(|r| r.message().contains("shutting down")),
        "StartOrder during the drain is told the orchestrator is shutting down: {refusals:?}"
    );

    let orchestrator_dir = system.dir.path().join("orchestrator");
    let audit = std::process::Command::new(saga_tests::bin_path("sagactl"))
        .args(["audit", "verify", "--data-dir"])
        .arg(&orchestrator_dir)
        .output()
        .expect("runs sagactl");
    assert!(
        audit.status.success(),
        "the log audits clean after SIGTERM:\n{}{}",
        String::from_utf8_lossy(&audit.stdout),
        String::from_utf8_lossy(&audit.stderr)
    );

    system.start_orchestrator();
    let mut client = system.client().await;
    let mut completed = 0;
    for (user, saga_id) in &sagas {
        let saga = wait_final(&mut client, saga_id, PATIENCE).await;
        let expected = if user == "poor" {
            pb::SagaState::Compensated
        } else {
            completed += 1;
            pb::SagaState::Completed
        };
        assert_eq!(saga.state, expected as i32, "{saga:?}");
    }
    assert_eq!(system.stock("p1").await, (100_000 - completed, completed));
    assert_eq!(system.balance("rich").await, 1_000_000 - 10 * completed);
    assert_eq!(system.balance("poor").await, 0);
}

/// Issue 12: TLS everywhere: the participants serve mutual TLS (only the orchestrator's client
/// certificate, and the test's, get in), the orchestrator calls them with its certificate and
/// serves its API over TLS. Sagas complete and compensate as usual; a plaintext client of the
/// API is refused; sagactl connects with `--tls-ca` and `https://`, and not without.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_everywhere_sagas_complete_and_compensate_and_plaintext_is_refused() {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let Some(namesrv) = topics::namesrv_for_tests() else {
        return;
    };
    let certs = tempfile::tempdir().expect("tempdir");
    let pki = saga_tests::pki::Pki::new(certs.path());
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let read = |p: &std::path::Path| std::fs::read(p).expect("reads a PEM file");
    let ca = Certificate::from_pem(read(&pki.ca));
    let orchestrator_metrics = format!("127.0.0.1:{}", saga_tests::free_port());
    let config = SystemConfig {
        participant_args: vec![
            "--tls-cert".into(),
            path(&pki.server_cert),
            "--tls-key".into(),
            path(&pki.server_key),
            "--tls-client-ca".into(),
            path(&pki.ca),
            "--orchestrator-tls-ca".into(),
            path(&pki.ca),
        ],
        orchestrator_args: vec![
            "--tls-cert".into(),
            path(&pki.server_cert),
            "--tls-key".into(),
            path(&pki.server_key),
            "--participant-tls-ca".into(),
            path(&pki.ca),
            "--participant-tls-cert".into(),
            path(&pki.client_cert),
            "--participant-tls-key".into(),
            path(&pki.client_key),
            // Acknowledgements over gRPC, over TLS too.
            "--ack-endpoint".into(),
            "listen".into(),
            "--metrics-listen".into(),
            orchestrator_metrics.clone(),
        ],
        participant_client_tls: Some(
            ClientTlsConfig::new()
                .ca_certificate(ca.clone())
                .identity(Identity::from_pem(read(&pki.client_cert), read(&pki.client_key))),
        ),
        api_client_tls: Some(ClientTlsConfig::new().ca_certificate(ca)),
        ..SystemConfig::default()
    };
    let system = System::start(&namesrv, config).await;
    let run = system.run.clone();
    system.seed_stock("p1", 10).await;
    system.seed_balance("rich", 100).await;
    system.seed_balance("poor", 0).await;
    let mut client = system.client().await;
    let completed = start(&mut client, order(&format!("{run}-1"), "rich", "p1", "")).await;
    let compensated = start(&mut client, order(&format!("{run}-2"), "poor", "p1", "")).await;
    let saga = wait_final(&mut client, &completed, PATIENCE).await;
    assert_eq!(saga.state, pb::SagaState::Completed as i32, "{saga:?}");
    let saga = wait_final(&mut client, &compensated, PATIENCE).await;
    assert_eq!(saga.state, pb::SagaState::Compensated as i32, "{saga:?}");
    assert_eq!(system.stock("p1").await, (9, 1));
    assert_eq!(system.balance("rich").await, 90);
    // The compensation's acknowledgements came over TLS gRPC, none through the topic.
    assert_acks_came_over_grpc(&scrape(&orchestrator_metrics).await);

    let api = system.orchestrator.as_ref().expect("running").addr.clone();
    let plaintext = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{api}"))
            .expect("uri")
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        pb::orchestrator_client::OrchestratorClient::new(channel)
            .get_saga(pb::GetSagaRequest {
                saga_id: completed.clone(),
            })
            .await
            .map_err(|s| s.to_string())
    }
    .await;
    assert!(
        plaintext.is_err(),
        "a plaintext client of the TLS API is refused: {plaintext:?}"
    );

    let sagactl = |args: &[&str]| {
        std::process::Command::new(saga_tests::bin_path("sagactl"))
            .args(args)
            .output()
            .expect("runs sagactl")
    };
    let ca_path = path(&pki.ca);
    let https = format!("https://{api}");
    let out = sagactl(&[
        "--server", &https, "--tls-ca", &ca_path, "--json", "get", &completed,
    ]);
    assert!(
        out.status.success(),
        "sagactl over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&completed));
    let out = sagactl(&["--server", &api, "get", &completed]);
    assert!(!out.status.success(), "sagactl without TLS is refused");
}

/// A system with `config`, and one saga (request id `<run>-<tag>`) that its balance step
/// refuses, waited for until Compensated.
async fn one_compensated_saga(namesrv: &str, config: SystemConfig, tag: &str) -> (System, String) {
    let system = System::start(namesrv, config).await;
    system.seed_stock("p1", 10).await;
    system.seed_balance("poor", 0).await;
    let mut client = system.client().await;
    let saga_id = start(
        &mut client,
        order(&format!("{}-{tag}", system.run), "poor", "p1", ""),
    )
    .await;
    let saga = wait_final(&mut client, &saga_id, PATIENCE).await;
    assert_eq!(saga.state, pb::SagaState::Compensated as i32, "{saga:?}");
    (system, saga_id)
}

/// Issue 12: one saga is one trace across processes. A compensated saga's trace id (derived
/// from its id, saga_proto::trace) is on the orchestrator's JSON log lines and on the stock
/// participant's, both for the step call (gRPC metadata) and for the compensation it
/// consumed from the broker (the message's traceparent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_saga_is_one_trace_in_the_orchestrator_and_participant_logs_including_compensation() {
    let Some(namesrv) = topics::namesrv_for_tests() else {
        return;
    };
    let logs = tempfile::tempdir().expect("tempdir");
    let debug = "warn,saga_orchestrator=debug,saga_participants=debug,saga_trace=info";
    let config = SystemConfig {
        participant_env: ["order", "stock", "coupon", "balance"]
            .into_iter()
            .map(|role| (role, "RUST_LOG".to_owned(), debug.to_owned()))
            .collect(),
        participant_args: vec!["--log-format".into(), "json".into()],
        orchestrator_args: vec!["--log-format".into(), "json".into()],
        orchestrator_env: vec![("RUST_LOG".into(), debug.into())],
        log_dir: Some(logs.path().to_owned()),
        ..SystemConfig::default()
    };
    let (_system, saga_id) = one_compensated_saga(&namesrv, config, "trace").await;
    // The stock participant's acknowledgement reached the orchestrator, so its consumer
    // handled the compensation before: its log line is written.
    let trace_id = saga_proto::trace::TraceContext::for_saga(&saga_id).trace_id_hex();
    let lines = |name: &str| -> Vec<String> {
        std::fs::read_to_string(logs.path().join(name))
            .expect("reads a log")
            .lines()
            .filter(|l| l.contains(&trace_id))
            .map(str::to_owned)
            .collect()
    };
    // The line about the last acknowledgement is written just after the append the watch saw:
    // wait for it (a file offers nothing to await).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let orchestrator = loop {
        let orchestrator = lines("orchestrator.log");
        if orchestrator.iter().any(|l| l.contains("acknowledgement handled"))
            || std::time::Instant::now() > deadline
        {
            break orchestrator;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        orchestrator.iter().any(|l| l.contains("step answered")),
        "the orchestrator's step calls carry trace {trace_id}: {orchestrator:#?}"
    );
    assert!(
        orchestrator.iter().any(|l| l.contains("acknowledgement handled")),
        "so do the acknowledgements: {orchestrator:#?}"
    );
    let stock = lines("stock.log");
    assert!(
        stock.iter().any(|l| l.contains("step applied")),
        "the stock participant's call carries trace {trace_id}: {stock:#?}"
    );
    assert!(
        stock
            .iter()
            .any(|l| l.contains("compensation handled") && l.contains("\"what\":\"compensation\"")),
        "so does its compensation, consumed from the broker: {stock:#?}"
    );
    for line in orchestrator.iter().chain(&stock) {
        let _: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("JSON line: {e}: {line}"));
    }
}

/// A stand-in OTLP/gRPC collector: keeps every exported span as (service, trace id, name,
/// `what` attribute) and wakes whoever waits for more.
#[derive(Default)]
struct Collector {
    spans: std::sync::Mutex<Vec<ExportedSpan>>,
    arrived: tokio::sync::Notify,
}

#[derive(Debug, Clone)]
struct ExportedSpan {
    service: String,
    trace_id: String,
    name: String,
    what: Option<String>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest>,
    ) -> Result<
        tonic::Response<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse>,
        tonic::Status,
    > {
        use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
        let text = |attributes: &[KeyValue], key: &str| {
            attributes
                .iter()
                .find(|a| a.key == key)
                .and_then(|a| match a.value {
                    Some(AnyValue {
                        value: Some(Value::StringValue(ref s)),
                    }) => Some(s.clone()),
                    _ => None,
                })
        };
        let mut spans = Vec::new();
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .as_ref()
                .and_then(|r| text(&r.attributes, "service.name"))
                .unwrap_or_default();
            for span in resource.scope_spans.into_iter().flat_map(|s| s.spans) {
                spans.push(ExportedSpan {
                    service: service.clone(),
                    trace_id: span.trace_id.iter().map(|b| format!("{b:02x}")).collect(),
                    what: text(&span.attributes, "what"),
                    name: span.name,
                    span_id: span.span_id,
                    parent_span_id: span.parent_span_id,
                });
            }
        }
        self.spans.lock().expect("collector lock").extend(spans);
        self.arrived.notify_waiters();
        Ok(tonic::Response::new(Default::default()))
    }
}

/// Issue 12: with `--otlp-endpoint` every process exports its spans over OTLP, and one
/// compensated saga is one trace there too: the orchestrator's driver span and the stock
/// participant's step call and compensation spans carry the saga's trace id, and the step
/// call's span is a child of the driver's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_export_shows_one_compensated_saga_as_one_trace_across_processes() {
    let Some(namesrv) = topics::namesrv_for_tests() else {
        return;
    };
    let collector = std::sync::Arc::new(Collector::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds");
    let endpoint = format!("http://{}", listener.local_addr().expect("address"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(saga_proto::server::serve(
        tonic::service::Routes::new(
            opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer::from_arc(
                collector.clone(),
            ),
        ),
        listener,
        async move {
            let _ = stopped.await;
        },
    ));
    // Export every 100 ms instead of every 5 s.
    let env = |name: &str, value: &str| (name.to_owned(), value.to_owned());
    let config = SystemConfig {
        participant_env: ["order", "stock", "coupon", "balance"]
            .into_iter()
            .flat_map(|role| {
                [
                    (role, "SAGA_OTLP_ENDPOINT".to_owned(), endpoint.clone()),
                    (role, "OTEL_BSP_SCHEDULE_DELAY".to_owned(), "100".to_owned()),
                ]
            })
            .collect(),
        orchestrator_env: vec![
            env("SAGA_OTLP_ENDPOINT", &endpoint),
            env("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
        ..SystemConfig::default()
    };
    let (system, saga_id) = one_compensated_saga(&namesrv, config, "otlp").await;

    let trace_id = saga_proto::trace::TraceContext::for_saga(&saga_id).trace_id_hex();
    let wanted = |spans: &[ExportedSpan]| {
        let of = |service: &str, what: Option<&str>| {
            spans.iter().any(|s| {
                s.trace_id == trace_id
                    && s.service == service
                    && what.is_none_or(|w| s.what.as_deref() == Some(w))
            })
        };
        of("saga-orchestrator", Some("driver"))
            && of("saga-participant-stock", None)
            && of("saga-participant-stock", Some("compensation"))
    };
    // The exporters send in batches every 100 ms: wait for the batch holding the last span.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let arrived = collector.arrived.notified();
        let spans = collector.spans.lock().expect("collector lock").clone();
        if wanted(&spans) {
            // The stock participant's step call is a server span in the saga's trace, a child
            // of the orchestrator's driver span (the call's traceparent names that span).
            let driver: Vec<&[u8]> = spans
                .iter()
                .filter(|s| s.trace_id == trace_id && s.service == "saga-orchestrator")
                .map(|s| s.span_id.as_slice())
                .collect();
            assert!(
                spans.iter().any(|s| s.trace_id == trace_id
                    && s.service == "saga-participant-stock"
                    && s.name == "grpc"
                    && driver.contains(&s.parent_span_id.as_slice())),
                "{spans:#?}"
            );
            break;
        }
        if tokio::time::timeout_at(deadline, arrived).await.is_err() {
            let ours: Vec<_> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
            panic!(
                "spans of trace {trace_id} after 20 s: {ours:#?}\nall services: {:?}",
                {
                    let mut services: Vec<_> = spans.iter().map(|s| s.service.clone()).collect();
                    services.sort();
                    services.dedup();
                    services
                }
            );
        }
    }
    drop(system);
    let _ = stop.send(());
    let _ = server.await;
}

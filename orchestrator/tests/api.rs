//! The orchestrator's gRPC API over loopback against the all-in-one system (participants
//! in-process, embedded transport): validation, lookups, listing, replay, health checking,
//! reflection, and a stuck saga retried after the cause is fixed (with a restart between).

use std::time::Duration;

use saga_orchestrator::dev::{Dev, DevOptions};
use saga_orchestrator::workload;
use saga_participants::faults::FaultPlan;
use saga_proto::v1 as pb;
use saga_tests::wait_state;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_name_the_field_and_lookups_list_and_replay_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let system = Dev::start(dir.path(), "127.0.0.1:0", 100, DevOptions::default())
        .await
        .expect("starts");
    let mut client = system.client().await.expect("connects");
    let before = system.engine.log().durable_position();

    let valid = workload::order_request("t", 1);
    let cases: Vec<(&str, pb::StartOrderRequest)> = vec![
        (
            "request_id",
            pb::StartOrderRequest {
                request_id: String::new(),
                ..valid.clone()
            },
        ),
        (
            "user_id",
            pb::StartOrderRequest {
                user_id: "a/b".into(),
                ..valid.clone()
            },
        ),
        (
            "items",
            pb::StartOrderRequest {
                items: vec![],
                ..valid.clone()
            },
        ),
        (
            "items[0].quantity",
            pb::StartOrderRequest {
                items: vec![pb::OrderItem {
                    product_id: "p1".into(),
                    quantity: 0,
                }],
                ..valid.clone()
            },
        ),
        (
            "amount_minor",
            pb::StartOrderRequest {
                amount_minor: -5,
                ..valid.clone()
            },
        ),
        (
            "coupon_id",
            pb::StartOrderRequest {
                coupon_id: "c".repeat(65),
                ..valid.clone()
            },
        ),
    ];
    for (field, request) in cases {
        let status = client.start_order(request).await.expect_err("invalid");
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().starts_with(field),
            "{field}: {}",
            status.message()
        );
        assert_eq!(
            saga_proto::status::invalid_field(&status).as_deref(),
            Some(field),
            "a google.rpc.BadRequest names {field} in the details"
        );
    }
    assert_eq!(
        system.engine.log().durable_position(),
        before,
        "invalid requests wrote nothing"
    );

    let missing = client
        .get_saga(pb::GetSagaRequest {
            saga_id: "ord-nope".into(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(missing.code(), Code::NotFound);
    let retry = client
        .retry_saga(pb::RetrySagaRequest {
            saga_id: "ord-nope".into(),
            reason: String::new(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(retry.code(), Code::NotFound);

    // Three orders: n = 1, 2 complete, n = 5 (user u5, no balance) compensates.
    let mut ids = Vec::new();
    for n in [1, 2, 5] {
        let saga = client
            .start_order(workload::order_request("t", n))
            .await
            .expect("starts")
            .into_inner()
            .saga
            .expect("saga");
        ids.push(saga.saga_id);
    }
    wait_state(
        &mut client,
        &ids[0],
        Some(pb::SagaState::Completed),
        Duration::from_secs(60),
    )
    .await;
    wait_state(
        &mut client,
        &ids[1],
        Some(pb::SagaState::Completed),
        Duration::from_secs(60),
    )
    .await;
    let compensated = wait_state(
        &mut client,
        &ids[2],
        Some(pb::SagaState::Compensated),
        Duration::from_secs(60),
    )
    .await;
    assert!(
        compensated.failure_reason.contains("INSUFFICIENT_BALANCE"),
        "{compensated:?}"
    );

    // A completed saga cannot be retried or aborted.
    let status = client
        .abort_saga(pb::AbortSagaRequest {
            saga_id: ids[0].clone(),
            reason: "late".into(),
        })
        .await
        .expect_err("final");
    assert_eq!(status.code(), Code::FailedPrecondition);

    // Listing: newest first, paged, filtered.
    let page1 = client
        .list_sagas(pb::ListSagasRequest {
            state: 0,
            page_size: 2,
            page_token: String::new(),
        })
        .await
        .expect("lists")
        .into_inner();
    let page2 = client
        .list_sagas(pb::ListSagasRequest {
            state: 0,
            page_size: 2,
            page_token: page1.next_page_token.clone(),
        })
        .await
        .expect("lists")
        .into_inner();
    let listed: Vec<String> = page1
        .sagas
        .iter()
        .chain(&page2.sagas)
        .map(|s| s.saga_id.clone())
        .collect();
    assert_eq!(listed, vec![ids[2].clone(), ids[1].clone(), ids[0].clone()]);
    assert!(page2.next_page_token.is_empty());
    let only = client
        .list_sagas(pb::ListSagasRequest {
            state: pb::SagaState::Compensated as i32,
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .expect("lists")
        .into_inner();
    assert_eq!(
        only.sagas.iter().map(|s| s.saga_id.clone()).collect::<Vec<_>>(),
        vec![ids[2].clone()]
    );
    let bad = client
        .list_sagas(pb::ListSagasRequest {
            state: 0,
            page_size: 5000,
            page_token: String::new(),
        })
        .await
        .expect_err("too big");
    assert!(bad.message().starts_with("page_size"), "{bad:?}");

    // Replay: the whole log in order, each record chained to its stream's previous one.
    let mut replay = client
        .replay_events(pb::ReplayEventsRequest {
            from_position: 1,
            follow: false,
        })
        .await
        .expect("replays")
        .into_inner();
    let mut events = Vec::new();
    while let Some(event) = replay.message().await.expect("stream") {
        events.push(event);
    }
    assert_eq!(system.engine.log().durable_position(), events.len() as u64);
    assert!(events.iter().enumerate().all(|(i, e)| e.position == i as u64 + 1));
    let mut last = std::collections::HashMap::new();
    for e in &events {
        assert_eq!(
            last.insert(e.stream.clone(), e.checksum).unwrap_or(0),
            e.prev_checksum,
            "chain of {}",
            e.stream
        );
        assert!(!e.payload_json.is_empty());
    }
    let per_saga = events.iter().filter(|e| e.stream == ids[0]).count() as u64;
    let saga = client
        .get_saga(pb::GetSagaRequest {
            saga_id: ids[0].clone(),
        })
        .await
        .expect("gets")
        .into_inner()
        .saga
        .expect("saga");
    assert_eq!(
        per_saga, saga.version,
        "GetSaga is the fold of the replayed stream"
    );

    // Health checking and reflection, as grpcurl uses them: both reflection versions list
    // exactly what each server serves.
    let channel = workload::channel(&system.api_addr.to_string())
        .await
        .expect("connects");
    let health = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "saga.v1.Orchestrator".into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let standard = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    let expected = |own: &[&str]| {
        let mut names: Vec<String> = own.iter().chain(&standard).map(|s| s.to_string()).collect();
        names.sort();
        names
    };
    assert_eq!(
        list_services_v1(channel.clone()).await,
        expected(&["saga.v1.Orchestrator"])
    );
    assert_eq!(
        list_services_v1alpha(channel).await,
        expected(&["saga.v1.Orchestrator"])
    );
    let stock = workload::channel(&system.participants.stock)
        .await
        .expect("connects");
    let own = [
        "saga.v1.StockService",
        "saga.v1.ConsumerAdmin",
        "saga.v1.StepCalls",
    ];
    assert_eq!(list_services_v1(stock.clone()).await, expected(&own));
    assert_eq!(list_services_v1alpha(stock).await, expected(&own));
    system.shutdown().await;
}

/// The services a server lists through reflection (`$version`: the generated module of v1 or
/// v1alpha, whose types differ but have the same shape), sorted.
macro_rules! list_services {
    ($version:ident, $channel:expr) => {{
        use tonic_reflection::pb::$version as reflection;
        let mut answers = reflection::server_reflection_client::ServerReflectionClient::new($channel)
            .server_reflection_info(tokio_stream::iter([reflection::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(
                    reflection::server_reflection_request::MessageRequest::ListServices(String::new()),
                ),
            }]))
            .await
            .expect(concat!("reflection ", stringify!($version)))
            .into_inner();
        let answer = answers.message().await.expect("stream").expect("one answer");
        let Some(reflection::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
            answer.message_response
        else {
            panic!("unexpected answer {answer:?}");
        };
        let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        names.sort();
        names
    }};
}

/// The services a server lists through reflection v1.
async fn list_services_v1(channel: tonic::transport::Channel) -> Vec<String> {
    list_services!(v1, channel)
}

/// The services a server lists through reflection v1alpha (grpcio-reflection, older grpcurl).
async fn list_services_v1alpha(channel: tonic::transport::Channel) -> Vec<String> {
    list_services!(v1alpha, channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_compensation_makes_the_saga_stuck_and_retry_finishes_it_after_the_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Every compensation fails: the consumers park them after 3 tries.
    let broken = DevOptions {
        barrier: Some(std::sync::Arc::new(|_, inner| {
            FaultPlan {
                compensation_fails_for: Some("ord-".into()),
                ..FaultPlan::default()
            }
            .decorate(inner)
        })),
    };
    let system = Dev::start(dir.path(), "127.0.0.1:0", 100, broken)
        .await
        .expect("starts");
    let mut client = system.client().await.expect("connects");
    let saga = client
        .start_order(workload::order_request("t", 5))
        .await
        .expect("starts")
        .into_inner()
        .saga
        .expect("saga");
    let stuck = wait_state(
        &mut client,
        &saga.saga_id,
        Some(pb::SagaState::Stuck),
        Duration::from_secs(60),
    )
    .await;
    assert!(
        stuck
            .steps
            .iter()
            .any(|s| s.state == pb::StepState::CompensationParked as i32),
        "{stuck:?}"
    );
    // Watching a stuck saga ends after its events, the last one STUCK: it does not stream
    // forever waiting for an operator.
    let watched = watch_to_end(&mut client, &saga.saga_id, false).await;
    let last = watched.last().expect("events");
    assert_eq!(last.state, pb::SagaState::Stuck as i32, "{watched:?}");
    assert!(
        last.version >= stuck.version,
        "every event up to the current one was sent: {watched:?}"
    );
    let status = client
        .abort_saga(pb::AbortSagaRequest {
            saga_id: saga.saga_id.clone(),
            reason: "no".into(),
        })
        .await
        .expect_err("stuck is not running");
    assert_eq!(status.code(), Code::FailedPrecondition);
    system.shutdown().await;

    // The operator fixes the cause (here: restarts without the fault) and retries.
    let system = Dev::start(dir.path(), "127.0.0.1:0", 100, DevOptions::default())
        .await
        .expect("restarts");
    let mut client = system.client().await.expect("connects");
    let still = client
        .get_saga(pb::GetSagaRequest {
            saga_id: saga.saga_id.clone(),
        })
        .await
        .expect("gets")
        .into_inner()
        .saga
        .expect("saga");
    assert_eq!(
        still.state,
        pb::SagaState::Stuck as i32,
        "a restart does not unstick by itself"
    );
    client
        .retry_saga(pb::RetrySagaRequest {
            saga_id: saga.saga_id.clone(),
            reason: "fixed".into(),
        })
        .await
        .expect("retries");
    let done = wait_state(
        &mut client,
        &saga.saga_id,
        Some(pb::SagaState::Compensated),
        Duration::from_secs(60),
    )
    .await;
    assert!(
        done.steps
            .iter()
            .all(|s| s.state != pb::StepState::CompensationParked as i32),
        "{done:?}"
    );
    let stock = pb::stock_service_client::StockServiceClient::new(
        workload::channel(&system.participants.stock)
            .await
            .expect("connects"),
    )
    .get_stock(pb::GetStockRequest {
        product_ids: vec![workload::product_id(5)],
    })
    .await
    .expect("reads")
    .into_inner()
    .stock;
    assert_eq!(
        (stock[0].available, stock[0].reserved),
        (workload::STOCK_INITIAL, 0),
        "released exactly once"
    );
    system.shutdown().await;
}

/// Item 6 of the crash-safety review: a known request id with another order is refused with
/// ALREADY_EXISTS naming `request_id` (it used to return the first saga silently); the same
/// request repeated returns the first saga.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_reused_for_another_order_is_already_exists() {
    let dir = tempfile::tempdir().expect("tempdir");
    let system = Dev::start(dir.path(), "127.0.0.1:0", 100, DevOptions::default())
        .await
        .expect("starts");
    let mut client = system.client().await.expect("connects");
    let first = workload::order_request("reuse", 1);
    let created = client
        .start_order(first.clone())
        .await
        .expect("starts")
        .into_inner();
    assert!(created.created);
    let again = client
        .start_order(first.clone())
        .await
        .expect("repeat")
        .into_inner();
    assert!(!again.created);
    assert_eq!(
        again.saga.expect("saga").saga_id,
        created.saga.expect("saga").saga_id
    );
    let other = pb::StartOrderRequest {
        amount_minor: first.amount_minor + 1,
        ..first
    };
    let status = client.start_order(other).await.expect_err("refused");
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert!(status.message().contains("request_id"), "{}", status.message());
}

/// Issue 9: every RPC, table-driven, with malformed input (empty, a 10 MB string field, zero
/// and negative quantities and amounts, too many and duplicate items, unknown ids): each is
/// INVALID_ARGUMENT naming the field (NOT_FOUND for an unknown saga), nothing is recorded,
/// and the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_refuses_malformed_input_by_field_records_nothing_and_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let system = Dev::start(dir.path(), "127.0.0.1:0", 100, DevOptions::default())
        .await
        .expect("starts");
    let mut client = system.client().await.expect("connects");
    let huge = "x".repeat(10 * 1024 * 1024);
    let valid = workload::order_request("bad", 1);
    let item = |product: &str, quantity: i64| pb::OrderItem {
        product_id: product.into(),
        quantity,
    };
    let start_cases: Vec<(&str, pb::StartOrderRequest)> = vec![
        ("request_id", pb::StartOrderRequest::default()),
        (
            "request_id",
            pb::StartOrderRequest {
                request_id: huge.clone(),
                ..valid.clone()
            },
        ),
        (
            "user_id",
            pb::StartOrderRequest {
                user_id: huge.clone(),
                ..valid.clone()
            },
        ),
        (
            "user_id",
            pb::StartOrderRequest {
                user_id: String::new(),
                ..valid.clone()
            },
        ),
        (
            "items[0].product_id",
            pb::StartOrderRequest {
                items: vec![item(&huge, 1)],
                ..valid.clone()
            },
        ),
        (
            "items[0].quantity",
            pb::StartOrderRequest {
                items: vec![item("p1", -3)],
                ..valid.clone()
            },
        ),
        (
            "items",
            pb::StartOrderRequest {
                items: (0..1000).map(|i| item(&format!("p{i}"), 1)).collect(),
                ..valid.clone()
            },
        ),
        (
            "items[1].product_id",
            pb::StartOrderRequest {
                items: vec![item("p1", 1), item("p1", 2)],
                ..valid.clone()
            },
        ),
        (
            "amount_minor",
            pb::StartOrderRequest {
                amount_minor: 0,
                ..valid.clone()
            },
        ),
        (
            "amount_minor",
            pb::StartOrderRequest {
                amount_minor: i64::MIN,
                ..valid.clone()
            },
        ),
        (
            "coupon_id",
            pb::StartOrderRequest {
                coupon_id: huge.clone(),
                ..valid.clone()
            },
        ),
    ];
    let expect_invalid = |rpc: &str, field: &str, answer: Result<(), tonic::Status>| {
        let status = answer.expect_err(&format!("{rpc} {field}: accepted"));
        assert_eq!(status.code(), Code::InvalidArgument, "{rpc} {field}: {status:?}");
        assert!(
            status.message().starts_with(&format!("{field}:")),
            "{rpc} names {field}: {}",
            &status.message()[..status.message().len().min(200)]
        );
    };
    let before = system.engine.log().durable_position();
    for (field, request) in start_cases {
        expect_invalid("StartOrder", field, client.start_order(request).await.map(|_| ()));
    }
    for (field, saga_id) in [("saga_id", String::new()), ("saga_id", huge.clone())] {
        let get = client
            .get_saga(pb::GetSagaRequest {
                saga_id: saga_id.clone(),
            })
            .await;
        expect_invalid("GetSaga", field, get.map(|_| ()));
        let watch = client
            .watch_saga(pb::WatchSagaRequest {
                saga_id: saga_id.clone(),
                from_version: 1,
                status_changes_only: false,
            })
            .await;
        expect_invalid("WatchSaga", field, watch.map(|_| ()));
        let retry = client
            .retry_saga(pb::RetrySagaRequest {
                saga_id: saga_id.clone(),
                reason: String::new(),
            })
            .await;
        expect_invalid("RetrySaga", field, retry.map(|_| ()));
        let abort = client
            .abort_saga(pb::AbortSagaRequest {
                saga_id,
                reason: String::new(),
            })
            .await;
        expect_invalid("AbortSaga", field, abort.map(|_| ()));
    }
    for (field, request) in [
        (
            "page_size",
            pb::ListSagasRequest {
                state: 0,
                page_size: 1_000_000,
                page_token: String::new(),
            },
        ),
        (
            "state",
            pb::ListSagasRequest {
                state: 99,
                page_size: 10,
                page_token: String::new(),
            },
        ),
        (
            "page_token",
            pb::ListSagasRequest {
                state: 0,
                page_size: 10,
                page_token: huge.clone(),
            },
        ),
    ] {
        expect_invalid("ListSagas", field, client.list_sagas(request).await.map(|_| ()));
    }
    // Unknown sagas are NOT_FOUND, by every RPC that names one.
    let unknown = "ord-unknown".to_owned();
    let answers = [
        client
            .get_saga(pb::GetSagaRequest {
                saga_id: unknown.clone(),
            })
            .await
            .map(|_| ()),
        client
            .watch_saga(pb::WatchSagaRequest {
                saga_id: unknown.clone(),
                from_version: 1,
                status_changes_only: false,
            })
            .await
            .map(|_| ()),
        client
            .retry_saga(pb::RetrySagaRequest {
                saga_id: unknown.clone(),
                reason: String::new(),
            })
            .await
            .map(|_| ()),
        client
            .abort_saga(pb::AbortSagaRequest {
                saga_id: unknown.clone(),
                reason: String::new(),
            })
            .await
            .map(|_| ()),
    ];
    for answer in answers {
        assert_eq!(answer.expect_err("unknown").code(), Code::NotFound);
    }
    // Acknowledgements (the dev system takes them over gRPC): one that names no step is refused
    // by field (the whole request), one without its request's token is PERMISSION_DENIED, one
    // for a saga this orchestrator does not have is accepted, named, and changes nothing.
    let ack_key = system
        .engine
        .ack_endpoint()
        .expect("dev takes acks over gRPC")
        .key
        .clone();
    let ack = |saga_id: &str, step: &str| pb::CompensationAck {
        key: Some(pb::StepKey {
            saga_id: saga_id.into(),
            step: step.into(),
        }),
        role: "stock".into(),
        outcome: pb::CompensationOutcome::Applied as i32,
        round: 1,
        ack_token: ack_key.token(saga_id, step),
        ..Default::default()
    };
    let ack_cases: Vec<(&str, Vec<pb::CompensationAck>)> = vec![
        ("acks[0].key", vec![pb::CompensationAck::default()]),
        (
            "acks[1].key.saga_id",
            vec![ack(&unknown, "reserve_stock"), ack(&huge, "reserve_stock")],
        ),
        ("acks[0].key.step", vec![ack(&unknown, "")]),
        (
            "acks",
            (0..=saga_orchestrator::api::ACKS_MAX)
                .map(|_| ack(&unknown, "reserve_stock"))
                .collect(),
        ),
    ];
    for (field, acks) in ack_cases {
        let answer = client
            .acknowledge_compensations(pb::AcknowledgeCompensationsRequest { acks })
            .await;
        expect_invalid("AcknowledgeCompensations", field, answer.map(|_| ()));
    }
    for token in [
        String::new(),
        "00".repeat(16),
        ack_key.token(&unknown, "lock_coupon"),
    ] {
        let forged = pb::CompensationAck {
            ack_token: token,
            ..ack(&unknown, "reserve_stock")
        };
        let answer = client
            .acknowledge_compensations(pb::AcknowledgeCompensationsRequest {
                acks: vec![ack(&unknown, "create_order"), forged],
            })
            .await
            .expect_err("a wrong token is refused");
        assert_eq!(answer.code(), Code::PermissionDenied, "{answer:?}");
        assert!(answer.message().starts_with("acks[1].ack_token"), "{answer:?}");
    }
    let answer = client
        .acknowledge_compensations(pb::AcknowledgeCompensationsRequest {
            acks: vec![ack(&unknown, "reserve_stock")],
        })
        .await
        .expect("an ack of an unknown saga is accepted")
        .into_inner();
    assert_eq!(answer.not_owned, vec![0], "and named as not this orchestrator's");
    assert_eq!(
        system.engine.log().durable_position(),
        before,
        "malformed requests recorded nothing"
    );
    // A reason too long for the log is refused by field, not stored.
    let saga = workload::run_order(&mut client, workload::Scenario::AllOk, "bad", 2)
        .await
        .expect("runs");
    let before_reason = system.engine.log().durable_position();
    let retry = client
        .retry_saga(pb::RetrySagaRequest {
            saga_id: saga.saga_id.clone(),
            reason: huge.clone(),
        })
        .await;
    expect_invalid("RetrySaga", "reason", retry.map(|_| ()));
    assert_eq!(
        system.engine.log().durable_position(),
        before_reason,
        "nothing recorded"
    );
    // Still serving.
    assert_eq!(saga.state, pb::SagaState::Completed);
    system.shutdown().await;
}

/// A watch ends on a stuck saga also when STUCK is the last record of a full read chunk (the
/// next read is empty): the saga is written directly into the orchestrator's log, 256 events
/// with SagaStuck last, before the system starts on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ends_when_stuck_is_the_last_record_of_a_full_chunk() {
    use saga_orchestrator::events::SagaEvent;
    use saga_storage::{AppendRequest, ExpectedVersion, NewEvent, StreamVersion};

    let dir = tempfile::tempdir().expect("tempdir");
    let saga_id = "ord-chunk";
    let step = saga_orchestrator::order::CREATE_ORDER.to_owned();
    let mut events = vec![
        SagaEvent::SagaStarted {
            definition: saga_orchestrator::order::DEFINITION.into(),
            request_id: "req-chunk".into(),
            payload: Vec::new(),
            steps: vec![step.clone()],
            skipped: Vec::new(),
        },
        SagaEvent::CompensationRequested {
            steps: vec![step.clone()],
            reason: "test".into(),
        },
    ];
    let chunk = saga_orchestrator::api::STREAM_CHUNK;
    for republish in 1..=(chunk - 3) as u32 {
        events.push(SagaEvent::CompensationRepublished {
            steps: vec![step.clone()],
            republish,
        });
    }
    events.push(SagaEvent::SagaStuck {
        reason: "no acknowledgement (test)".into(),
    });
    assert_eq!(events.len(), chunk);
    {
        let log = saga_orchestrator::engine::open_log(saga_storage::LogConfig::new(
            dir.path().join("orchestrator"),
        ))
        .expect("opens");
        let mut request = AppendRequest::new(saga_id, ExpectedVersion::at(StreamVersion::NONE));
        for event in &events {
            request = request.event(NewEvent::encode(event.name(), event).expect("encodes"));
        }
        log.append(request).await.expect("appends");
    }

    let system = Dev::start(dir.path(), "127.0.0.1:0", 100, DevOptions::default())
        .await
        .expect("starts");
    let mut client = system.client().await.expect("connects");
    let watched = watch_to_end(&mut client, saga_id, false).await;
    assert_eq!(watched.len(), chunk);
    assert_eq!(watched.last().expect("events").state, pb::SagaState::Stuck as i32);
    system.shutdown().await;
}

/// Issue 11: a client that waits for the outcome asks WatchSaga for the state changes only,
/// and gets the events that changed the saga's state and nothing else: a completed saga
/// RUNNING then COMPLETED, a compensated one RUNNING, COMPENSATING, COMPENSATED, each with its
/// version as in the full stream, which still sends every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_of_status_changes_only_sends_the_events_that_change_the_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let system = Dev::start(dir.path(), "127.0.0.1:0", 100, DevOptions::default())
        .await
        .expect("starts");
    let mut client = system.client().await.expect("connects");
    use pb::SagaState::{Compensated, Compensating, Completed, Running};
    // Fail20: order 1's user has balance, order 5's has none (it fails at deduct_balance).
    for (n, expected) in [
        (1, vec![Running, Completed]),
        (5, vec![Running, Compensating, Compensated]),
    ] {
        let saga = workload::run_order(&mut client, workload::Scenario::Fail20, "changes", n)
            .await
            .expect("runs");
        let every = watch_to_end(&mut client, &saga.saga_id, false).await;
        let changes = watch_to_end(&mut client, &saga.saga_id, true).await;
        let states = |events: &[pb::SagaEvent]| -> Vec<pb::SagaState> {
            events
                .iter()
                .map(|e| pb::SagaState::try_from(e.state).expect("a state"))
                .collect()
        };
        assert_eq!(states(&changes), expected, "order {n}: {changes:?}");
        // The same events as the full stream's where the state changed, versions included.
        let mut before = None;
        let expected_events: Vec<pb::SagaEvent> = every
            .iter()
            .filter(|e| before.replace(e.state) != Some(e.state))
            .cloned()
            .collect();
        assert_eq!(changes, expected_events, "order {n}");
        assert!(every.len() > changes.len(), "order {n}: {} events", every.len());
    }
    system.shutdown().await;
}

/// Watches `saga_id` from version 1 until the stream ends (at most 30 s, else the test
/// fails); every event sent, or with `status_changes_only` those that change the state.
async fn watch_to_end(
    client: &mut pb::orchestrator_client::OrchestratorClient<tonic::transport::Channel>,
    saga_id: &str,
    status_changes_only: bool,
) -> Vec<pb::SagaEvent> {
    let mut stream = client
        .watch_saga(pb::WatchSagaRequest {
            saga_id: saga_id.into(),
            from_version: 1,
            status_changes_only,
        })
        .await
        .expect("watches")
        .into_inner();
    let mut watched = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(event) = stream.message().await.expect("stream") {
            watched.push(event);
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the watch of saga {saga_id} ended after {} events",
        watched.len()
    );
    watched
}

/// Records what is published through it (the participant router's topic side).
#[derive(Default)]
struct Recording(std::sync::Mutex<Vec<saga_messaging::transport::Outgoing>>);

impl saga_messaging::transport::Transport for Recording {
    fn publish<'a>(
        &'a self,
        messages: &'a [saga_messaging::transport::Outgoing],
    ) -> saga_messaging::transport::BoxFuture<'a, Result<(), saga_messaging::MessagingError>> {
        self.0.lock().expect("lock").extend(messages.iter().cloned());
        Box::pin(async { Ok(()) })
    }

    fn subscribe(
        &self,
        _spec: saga_messaging::transport::SubscriptionSpec,
        _handler: std::sync::Arc<dyn saga_messaging::transport::Handler>,
    ) -> saga_messaging::transport::BoxFuture<
        '_,
        Result<Box<dyn saga_messaging::transport::Consumer>, saga_messaging::MessagingError>,
    > {
        Box::pin(async { Err(saga_messaging::MessagingError::Config("not used".into())) })
    }
}

/// Issue 11: an acknowledgement sent over gRPC to an orchestrator that does not have its saga
/// (a log that lost it) is not lost there: the orchestrator names it, and the participant's
/// router publishes it as it is, on the topic and tag its request named, which route by the
/// owner's node id. Its token is the orchestrator's (else it would be refused, and published on
/// the topic just the same).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_of_a_saga_the_orchestrator_does_not_have_goes_through_the_topic() {
    use prost::Message as _;
    use saga_messaging::transport::{Outgoing, Transport as _};
    use saga_participants::acks::AckRouter;

    let dir = tempfile::tempdir().expect("tempdir");
    let system = Dev::start(dir.path(), "127.0.0.1:0", 100, DevOptions::default())
        .await
        .expect("starts");
    let endpoint = system.engine.ack_endpoint().expect("dev takes acks over gRPC");
    let ack = Outgoing {
        topic: "ack-topic".into(),
        tag: "owner".into(),
        key: "ord-elsewhere:reserve_stock".into(),
        body: pb::CompensationAck {
            key: Some(pb::StepKey {
                saga_id: "ord-elsewhere".into(),
                step: "reserve_stock".into(),
            }),
            role: "stock".into(),
            outcome: pb::CompensationOutcome::Applied as i32,
            round: 1,
            ack_token: endpoint.key.token("ord-elsewhere", "reserve_stock"),
            ack_endpoint: endpoint.url.clone(),
            ..Default::default()
        }
        .encode_to_vec(),
        properties: Vec::new(),
    };
    let topic = std::sync::Arc::new(Recording::default());
    let router = AckRouter::new(topic.clone());
    let before = system.engine.log().durable_position();
    router
        .publish(std::slice::from_ref(&ack))
        .await
        .expect("published");
    assert_eq!(topic.0.lock().expect("lock").clone(), vec![ack]);
    assert_eq!(
        system.engine.log().durable_position(),
        before,
        "nothing recorded here"
    );
    system.shutdown().await;
}

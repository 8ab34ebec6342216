//! Participants over real gRPC on loopback (in-process server): the barrier's four rules,
//! business refusals, invariants under concurrency, and input validation. Process-level tests
//! with the compensation consumer live in `tests/` (saga-tests).

use saga_participants::barrier::{Compensated, StepKey};
use saga_participants::{Participant, Role};
use saga_proto::v1 as pb;
use saga_storage::{Position, StreamVersion};
use saga_tests::stock_level;
use tonic::Code;
use tonic::transport::Channel;

struct Running {
    participant: Participant,
    channel: Channel,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Running {
    async fn start(role: Role) -> Running {
        Running::start_with(role, None).await
    }

    /// With `decorate` around the participant's barrier (fault injection).
    async fn start_with(role: Role, decorate: Option<saga_participants::BarrierDecorator>) -> Running {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut participant = Participant::open(role, dir.path()).expect("opens");
        if let Some(decorate) = decorate {
            participant = participant.with_barrier(&decorate);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = participant.clone();
        let server = tokio::spawn(async move {
            serving
                .serve(listener, None, async {
                    let _ = stopped.await;
                })
                .await
                .expect("serves");
        });
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect_timeout(std::time::Duration::from_secs(5))
            .timeout(std::time::Duration::from_secs(10))
            .connect()
            .await
            .expect("connects");
        Running {
            participant,
            channel,
            stop: Some(stop),
            server: Some(server),
            _dir: dir,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().expect("running").send(());
        self.server.take().expect("running").await.expect("server task");
    }
}

fn key(saga: &str, step: &str) -> Option<pb::StepKey> {
    Some(pb::StepKey {
        saga_id: saga.into(),
        step: step.into(),
    })
}

fn item(product: &str, quantity: i64) -> pb::OrderItem {
    pb::OrderItem {
        product_id: product.into(),
        quantity,
    }
}

fn refusal_of(status: &tonic::Status) -> pb::RefusalReason {
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let refusal = saga_proto::status::refusal_of(status).expect("details hold a BusinessRefusal");
    pb::RefusalReason::try_from(refusal.reason).expect("known reason")
}

async fn seed_stock(
    client: &mut pb::stock_service_client::StockServiceClient<Channel>,
    product: &str,
    n: i64,
) {
    client
        .seed_stock(pb::SeedStockRequest {
            stock: vec![pb::ProductStock {
                product_id: product.into(),
                available: n,
                reserved: 0,
            }],
        })
        .await
        .expect("seeds");
}

fn reserve(saga: &str, product: &str, quantity: i64) -> pb::ReserveStockRequest {
    pb::ReserveStockRequest {
        key: key(saga, "reserve_stock"),
        order_id: saga.into(),
        items: vec![item(product, quantity)],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_action_returns_first_outcome_and_changes_nothing_again() {
    let p = Running::start(Role::Stock).await;
    let mut client = pb::stock_service_client::StockServiceClient::new(p.channel.clone());
    seed_stock(&mut client, "p1", 10).await;
    let first = client
        .reserve_stock(reserve("s1", "p1", 3))
        .await
        .expect("reserves")
        .into_inner();
    assert!(!first.replayed);
    // The same key again, even with other content: the first outcome, nothing reserved again.
    let again = client
        .reserve_stock(reserve("s1", "p1", 5))
        .await
        .expect("replays")
        .into_inner();
    assert!(again.replayed);
    assert_eq!(stock_level(&mut client, "p1").await, (7, 3));
    let events = p
        .participant
        .log()
        .read_stream("step/s1/reserve_stock", StreamVersion::new(1), 10)
        .await
        .expect("reads");
    assert_eq!(events.len(), 1, "one event for the key");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compensation_without_action_is_null_and_a_late_action_is_refused() {
    let p = Running::start(Role::Stock).await;
    let mut client = pb::stock_service_client::StockServiceClient::new(p.channel.clone());
    seed_stock(&mut client, "p1", 10).await;
    let key_ = StepKey {
        saga_id: "s2".into(),
        step: "reserve_stock".into(),
    };
    assert_eq!(
        p.participant.compensate(&key_).await.expect("compensates"),
        Compensated::Null
    );
    let late = client
        .reserve_stock(reserve("s2", "p1", 4))
        .await
        .expect_err("late action is refused");
    assert_eq!(refusal_of(&late), pb::RefusalReason::AlreadyCompensated);
    assert_eq!(
        stock_level(&mut client, "p1").await,
        (10, 0),
        "nothing left reserved"
    );
    let types: Vec<String> = p
        .participant
        .log()
        .read_stream("step/s2/reserve_stock", StreamVersion::new(1), 10)
        .await
        .expect("reads")
        .iter()
        .map(|r| r.event_type().to_owned())
        .collect();
    assert_eq!(
        types,
        vec!["NullCompensated"],
        "the null compensation is recorded, the late action is not"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_compensation_undoes_once() {
    let p = Running::start(Role::Stock).await;
    let mut client = pb::stock_service_client::StockServiceClient::new(p.channel.clone());
    seed_stock(&mut client, "p1", 10).await;
    client
        .reserve_stock(reserve("s3", "p1", 4))
        .await
        .expect("reserves");
    let key_ = StepKey {
        saga_id: "s3".into(),
        step: "reserve_stock".into(),
    };
    // Concurrent duplicates of the compensation, as a redelivering broker may cause.
    let outcomes = futures_join(&p.participant, &key_, 8).await;
    assert_eq!(
        outcomes.iter().filter(|o| **o == Compensated::Applied).count(),
        1,
        "{outcomes:?}"
    );
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Compensated::Applied | Compensated::AlreadyApplied))
    );
    assert_eq!(
        stock_level(&mut client, "p1").await,
        (10, 0),
        "released exactly once"
    );
    p.stop().await;
}

async fn futures_join(participant: &Participant, key: &StepKey, n: usize) -> Vec<Compensated> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let participant = participant.clone();
            let key = key.clone();
            tokio::spawn(async move { participant.compensate(&key).await.expect("compensates") })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sagas_never_oversell_and_refusals_are_remembered() {
    let p = Running::start(Role::Stock).await;
    let mut client = pb::stock_service_client::StockServiceClient::new(p.channel.clone());
    seed_stock(&mut client, "last", 10).await;
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move {
                client
                    .reserve_stock(reserve(&format!("race{i}"), "last", 1))
                    .await
            })
        })
        .collect();
    let mut ok = 0;
    let mut refused = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.expect("task") {
            Ok(_) => ok += 1,
            Err(status) => {
                assert_eq!(refusal_of(&status), pb::RefusalReason::OutOfStock);
                refused.push(i);
            }
        }
    }
    assert_eq!(ok, 10, "exactly the available units were reserved");
    assert_eq!(stock_level(&mut client, "last").await, (0, 10));
    // A refused key keeps its refusal, even after a compensation frees a unit.
    p.participant
        .compensate(&StepKey {
            saga_id: "race-none".into(),
            step: "reserve_stock".into(),
        })
        .await
        .expect("null compensation");
    let again = client
        .reserve_stock(reserve(&format!("race{}", refused[0]), "last", 1))
        .await
        .expect_err("still refused");
    assert_eq!(refusal_of(&again), pb::RefusalReason::OutOfStock);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balance_and_coupon_refuse_for_business_reasons_and_compensate_exactly() {
    let b = Running::start(Role::Balance).await;
    let mut balance = pb::balance_service_client::BalanceServiceClient::new(b.channel.clone());
    balance
        .seed_balances(pb::SeedBalancesRequest {
            accounts: vec![
                pb::Account {
                    user_id: "rich".into(),
                    balance_minor: 100,
                },
                pb::Account {
                    user_id: "poor".into(),
                    balance_minor: 0,
                },
            ],
        })
        .await
        .expect("seeds");
    let deduct = |saga: &str, user: &str| pb::DeductBalanceRequest {
        key: key(saga, "deduct_balance"),
        user_id: user.into(),
        amount_minor: 10,
        order_id: saga.into(),
    };
    let err = balance
        .deduct_balance(deduct("b1", "poor"))
        .await
        .expect_err("refused");
    assert_eq!(refusal_of(&err), pb::RefusalReason::InsufficientBalance);
    let ok = balance
        .deduct_balance(deduct("b2", "rich"))
        .await
        .expect("deducts")
        .into_inner();
    assert_eq!(ok.account.expect("account").balance_minor, 90);
    let k = StepKey {
        saga_id: "b2".into(),
        step: "deduct_balance".into(),
    };
    assert_eq!(
        b.participant.compensate(&k).await.expect("refunds"),
        Compensated::Applied
    );
    assert_eq!(
        b.participant.compensate(&k).await.expect("dup"),
        Compensated::AlreadyApplied
    );
    let accounts = balance
        .get_balances(pb::GetBalancesRequest {
            user_ids: vec!["rich".into()],
        })
        .await
        .expect("reads")
        .into_inner()
        .accounts;
    assert_eq!(accounts[0].balance_minor, 100, "refunded exactly once");
    b.stop().await;

    let c = Running::start(Role::Coupon).await;
    let mut coupon = pb::coupon_service_client::CouponServiceClient::new(c.channel.clone());
    coupon
        .seed_coupons(pb::SeedCouponsRequest {
            coupons: vec![pb::Coupon {
                coupon_id: "c1".into(),
                owner_user_id: "u1".into(),
                value_minor: 5,
                status: pb::CouponStatus::Free as i32,
                locked_by_order_id: String::new(),
            }],
        })
        .await
        .expect("seeds");
    let lock = |saga: &str, user: &str| pb::LockCouponRequest {
        key: key(saga, "lock_coupon"),
        coupon_id: "c1".into(),
        user_id: user.into(),
        order_id: saga.into(),
    };
    let err = coupon
        .lock_coupon(lock("x1", "someone-else"))
        .await
        .expect_err("not theirs");
    assert_eq!(refusal_of(&err), pb::RefusalReason::CouponNotFree);
    coupon.lock_coupon(lock("x2", "u1")).await.expect("locks");
    let err = coupon
        .lock_coupon(lock("x3", "u1"))
        .await
        .expect_err("already locked");
    assert_eq!(refusal_of(&err), pb::RefusalReason::CouponNotFree);
    let k = StepKey {
        saga_id: "x2".into(),
        step: "lock_coupon".into(),
    };
    assert_eq!(
        c.participant.compensate(&k).await.expect("unlocks"),
        Compensated::Applied
    );
    let c1 = coupon
        .get_coupons(pb::GetCouponsRequest {
            coupon_ids: vec!["c1".into()],
        })
        .await
        .expect("reads")
        .into_inner()
        .coupons
        .remove(0);
    assert_eq!(
        c1.status,
        pb::CouponStatus::Free as i32,
        "free again after the compensation"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_name_the_field_and_change_nothing() {
    let p = Running::start(Role::Stock).await;
    let mut client = pb::stock_service_client::StockServiceClient::new(p.channel.clone());
    seed_stock(&mut client, "p1", 10).await;
    let before = p.participant.log().durable_position();
    let cases = [
        (
            pb::ReserveStockRequest {
                key: None,
                ..reserve("s", "p1", 1)
            },
            "key",
        ),
        (
            pb::ReserveStockRequest {
                key: key("", "reserve_stock"),
                ..reserve("s", "p1", 1)
            },
            "key.saga_id",
        ),
        (
            pb::ReserveStockRequest {
                key: key("a/b", "reserve_stock"),
                ..reserve("s", "p1", 1)
            },
            "key.saga_id",
        ),
        (
            pb::ReserveStockRequest {
                key: key("s", &"x".repeat(65)),
                ..reserve("s", "p1", 1)
            },
            "key.step",
        ),
        (
            pb::ReserveStockRequest {
                order_id: String::new(),
                ..reserve("s", "p1", 1)
            },
            "order_id",
        ),
        (reserve("s", "p1", 0), "items[0].quantity"),
        (reserve("s", "p1", -2), "items[0].quantity"),
        (
            pb::ReserveStockRequest {
                items: vec![],
                ..reserve("s", "p1", 1)
            },
            "items",
        ),
        (
            pb::ReserveStockRequest {
                items: vec![item("p1", 1), item("p1", 2)],
                ..reserve("s", "p1", 1)
            },
            "items[1].product_id",
        ),
    ];
    for (request, field) in cases {
        let status = client.reserve_stock(request).await.expect_err("invalid");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().starts_with(&format!("{field}:")),
            "names {field}: {}",
            status.message()
        );
    }
    assert_eq!(
        p.participant.log().durable_position(),
        before,
        "nothing was written"
    );
    assert_eq!(stock_level(&mut client, "p1").await, (10, 0));
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_is_created_confirmed_or_cancelled_once() {
    let p = Running::start(Role::Order).await;
    let mut client = pb::order_service_client::OrderServiceClient::new(p.channel.clone());
    let create = |saga: &str| pb::CreateOrderRequest {
        key: key(saga, "create_order"),
        order_id: saga.into(),
        user_id: "u1".into(),
        items: vec![item("p1", 1)],
        amount_minor: 10,
        coupon_id: String::new(),
    };
    let created = client
        .create_order(create("o1"))
        .await
        .expect("creates")
        .into_inner();
    assert_eq!(
        created.order.expect("order").status,
        pb::OrderStatus::Pending as i32
    );
    assert!(
        client
            .create_order(create("o1"))
            .await
            .expect("replays")
            .into_inner()
            .replayed
    );
    let confirmed = client
        .confirm_order(pb::ConfirmOrderRequest {
            key: key("o1", "confirm_order"),
            order_id: "o1".into(),
        })
        .await
        .expect("confirms")
        .into_inner();
    assert_eq!(
        confirmed.order.expect("order").status,
        pb::OrderStatus::Confirmed as i32
    );

    client.create_order(create("o2")).await.expect("creates");
    let k = StepKey {
        saga_id: "o2".into(),
        step: "create_order".into(),
    };
    assert_eq!(
        p.participant.compensate(&k).await.expect("cancels"),
        Compensated::Applied
    );
    let err = client
        .confirm_order(pb::ConfirmOrderRequest {
            key: key("o2", "confirm_order"),
            order_id: "o2".into(),
        })
        .await
        .expect_err("a cancelled order is not confirmed");
    assert_eq!(refusal_of(&err), pb::RefusalReason::InvalidState);
    p.stop().await;
}

/// What a malformed request must get.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// INVALID_ARGUMENT whose message starts with the field, and nothing recorded.
    Invalid(&'static str),
    /// A business refusal (FAILED_PRECONDITION with a `BusinessRefusal`): unknown ids.
    Refused(pb::RefusalReason),
    /// Accepted as the no-op it is (an empty seed list), and nothing recorded.
    Noop,
}

/// Makes the call and checks its answer against `expect`.
async fn expect_answer(
    case: &str,
    expect: Expect,
    participant: &Participant,
    call: impl std::future::Future<Output = Result<(), tonic::Status>>,
) {
    let before = participant.log().durable_position();
    let answer = call.await;
    check(case, expect, answer, participant, before);
}

/// Checks one answer; for `Invalid`, that the log did not move.
fn check(
    case: &str,
    expect: Expect,
    answer: Result<(), tonic::Status>,
    participant: &Participant,
    before: Position,
) {
    let status = match (answer, expect) {
        (Ok(()), Expect::Noop) => {
            assert_eq!(
                participant.log().durable_position(),
                before,
                "{case}: recorded something"
            );
            return;
        }
        (Ok(()), _) => panic!("{case}: accepted"),
        (Err(status), _) => status,
    };
    match expect {
        Expect::Invalid(field) => {
            assert_eq!(status.code(), Code::InvalidArgument, "{case}: {status:?}");
            assert!(
                status.message().starts_with(&format!("{field}:")),
                "{case}: names {field}: {}",
                &status.message()[..status.message().len().min(200)]
            );
            assert_eq!(
                participant.log().durable_position(),
                before,
                "{case}: recorded something"
            );
        }
        Expect::Refused(reason) => assert_eq!(refusal_of(&status), reason, "{case}"),
        Expect::Noop => panic!("{case}: {status:?}"),
    }
}

/// Issue 9: every RPC of every role, table-driven: empty, oversized (a 10 MB string field),
/// zero and negative amounts, too many and duplicate items, unknown ids. INVALID_ARGUMENT names
/// the field and records nothing; unknown users, products and coupons are business refusals;
/// and the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_refuses_malformed_input_by_field_records_nothing_and_keeps_serving() {
    let huge = "x".repeat(10 * 1024 * 1024);
    let many_items: Vec<pb::OrderItem> = (0..1000).map(|i| item(&format!("p{i}"), 1)).collect();
    let ok_key = |step: &str| key("s1", step);

    // Stock.
    let running = Running::start(Role::Stock).await;
    let mut client = pb::stock_service_client::StockServiceClient::new(running.channel.clone());
    seed_stock(&mut client, "p1", 10).await;
    let reserve_cases: Vec<(&str, pb::ReserveStockRequest, Expect)> = vec![
        (
            "empty",
            pb::ReserveStockRequest::default(),
            Expect::Invalid("key"),
        ),
        (
            "10 MB order id",
            pb::ReserveStockRequest {
                order_id: huge.clone(),
                ..reserve("s1", "p1", 1)
            },
            Expect::Invalid("order_id"),
        ),
        (
            "10 MB product id",
            pb::ReserveStockRequest {
                items: vec![item(&huge, 1)],
                ..reserve("s1", "p1", 1)
            },
            Expect::Invalid("items[0].product_id"),
        ),
        (
            "zero quantity",
            reserve("s1", "p1", 0),
            Expect::Invalid("items[0].quantity"),
        ),
        (
            "negative quantity",
            reserve("s1", "p1", -1),
            Expect::Invalid("items[0].quantity"),
        ),
        (
            "too many items",
            pb::ReserveStockRequest {
                items: many_items.clone(),
                ..reserve("s1", "p1", 1)
            },
            Expect::Invalid("items"),
        ),
        (
            "duplicate items",
            pb::ReserveStockRequest {
                items: vec![item("p1", 1), item("p1", 1)],
                ..reserve("s1", "p1", 1)
            },
            Expect::Invalid("items[1].product_id"),
        ),
        (
            "unknown product",
            reserve("s-unknown", "p-none", 1),
            Expect::Refused(pb::RefusalReason::UnknownEntity),
        ),
    ];
    for (case, request, expect) in reserve_cases {
        expect_answer(
            &format!("ReserveStock {case}"),
            expect,
            &running.participant,
            async { client.reserve_stock(request).await.map(|_| ()) },
        )
        .await;
    }
    let seed_cases: Vec<(&str, pb::SeedStockRequest, Expect)> = vec![
        ("empty", pb::SeedStockRequest::default(), Expect::Noop),
        (
            "negative",
            pb::SeedStockRequest {
                stock: vec![pb::ProductStock {
                    product_id: "p2".into(),
                    available: -1,
                    reserved: 0,
                }],
            },
            Expect::Invalid("stock[0].available"),
        ),
        (
            "10 MB id",
            pb::SeedStockRequest {
                stock: vec![pb::ProductStock {
                    product_id: huge.clone(),
                    available: 1,
                    reserved: 0,
                }],
            },
            Expect::Invalid("stock[0].product_id"),
        ),
    ];
    for (case, request, expect) in seed_cases {
        expect_answer(
            &format!("SeedStock {case}"),
            expect,
            &running.participant,
            async { client.seed_stock(request).await.map(|_| ()) },
        )
        .await;
    }
    for (case, ids, field) in [
        ("10 MB id", vec![huge.clone()], "product_ids[0]"),
        (
            "too many ids",
            (0..20_000).map(|i| format!("p{i}")).collect(),
            "product_ids",
        ),
    ] {
        expect_answer(
            &format!("GetStock {case}"),
            Expect::Invalid(field),
            &running.participant,
            async {
                client
                    .get_stock(pb::GetStockRequest { product_ids: ids })
                    .await
                    .map(|_| ())
            },
        )
        .await;
    }
    client
        .reserve_stock(reserve("s1", "p1", 1))
        .await
        .expect("keeps serving");
    running.stop().await;

    // Coupon.
    let running = Running::start(Role::Coupon).await;
    let mut client = pb::coupon_service_client::CouponServiceClient::new(running.channel.clone());
    client
        .seed_coupons(pb::SeedCouponsRequest {
            coupons: vec![pb::Coupon {
                coupon_id: "c1".into(),
                owner_user_id: "u1".into(),
                value_minor: 1,
                status: pb::CouponStatus::Free as i32,
                locked_by_order_id: String::new(),
            }],
        })
        .await
        .expect("seeds");
    let lock = |coupon: &str, user: &str, order: &str| pb::LockCouponRequest {
        key: ok_key("lock_coupon"),
        coupon_id: coupon.into(),
        user_id: user.into(),
        order_id: order.into(),
    };
    let lock_cases: Vec<(&str, pb::LockCouponRequest, Expect)> = vec![
        ("empty", pb::LockCouponRequest::default(), Expect::Invalid("key")),
        ("empty coupon", lock("", "u1", "s1"), Expect::Invalid("coupon_id")),
        (
            "10 MB coupon",
            lock(&huge, "u1", "s1"),
            Expect::Invalid("coupon_id"),
        ),
        ("10 MB user", lock("c1", &huge, "s1"), Expect::Invalid("user_id")),
        ("empty order", lock("c1", "u1", ""), Expect::Invalid("order_id")),
        (
            "unknown coupon",
            pb::LockCouponRequest {
                key: key("s-unknown", "lock_coupon"),
                ..lock("c-none", "u1", "s-unknown")
            },
            Expect::Refused(pb::RefusalReason::CouponNotFree),
        ),
    ];
    for (case, request, expect) in lock_cases {
        expect_answer(
            &format!("LockCoupon {case}"),
            expect,
            &running.participant,
            async { client.lock_coupon(request).await.map(|_| ()) },
        )
        .await;
    }
    expect_answer(
        "SeedCoupons negative value",
        Expect::Invalid("coupons[0].value_minor"),
        &running.participant,
        async {
            client
                .seed_coupons(pb::SeedCouponsRequest {
                    coupons: vec![pb::Coupon {
                        coupon_id: "c2".into(),
                        owner_user_id: "u1".into(),
                        value_minor: -3,
                        status: pb::CouponStatus::Free as i32,
                        locked_by_order_id: String::new(),
                    }],
                })
                .await
                .map(|_| ())
        },
    )
    .await;
    client
        .lock_coupon(lock("c1", "u1", "s1"))
        .await
        .expect("keeps serving");
    running.stop().await;

    // Balance.
    let running = Running::start(Role::Balance).await;
    let mut client = pb::balance_service_client::BalanceServiceClient::new(running.channel.clone());
    client
        .seed_balances(pb::SeedBalancesRequest {
            accounts: vec![pb::Account {
                user_id: "u1".into(),
                balance_minor: 100,
            }],
        })
        .await
        .expect("seeds");
    let deduct = |user: &str, amount: i64| pb::DeductBalanceRequest {
        key: ok_key("deduct_balance"),
        user_id: user.into(),
        amount_minor: amount,
        order_id: "s1".into(),
    };
    let deduct_cases: Vec<(&str, pb::DeductBalanceRequest, Expect)> = vec![
        (
            "empty",
            pb::DeductBalanceRequest::default(),
            Expect::Invalid("key"),
        ),
        ("zero amount", deduct("u1", 0), Expect::Invalid("amount_minor")),
        (
            "negative amount",
            deduct("u1", -10),
            Expect::Invalid("amount_minor"),
        ),
        ("10 MB user", deduct(&huge, 10), Expect::Invalid("user_id")),
        (
            "unknown user",
            pb::DeductBalanceRequest {
                key: key("s-unknown", "deduct_balance"),
                ..deduct("u-none", 10)
            },
            Expect::Refused(pb::RefusalReason::UnknownEntity),
        ),
    ];
    for (case, request, expect) in deduct_cases {
        expect_answer(
            &format!("DeductBalance {case}"),
            expect,
            &running.participant,
            async { client.deduct_balance(request).await.map(|_| ()) },
        )
        .await;
    }
    expect_answer(
        "SeedBalances negative",
        Expect::Invalid("accounts[0].balance_minor"),
        &running.participant,
        async {
            client
                .seed_balances(pb::SeedBalancesRequest {
                    accounts: vec![pb::Account {
                        user_id: "u2".into(),
                        balance_minor: -1,
                    }],
                })
                .await
                .map(|_| ())
        },
    )
    .await;
    client
        .deduct_balance(deduct("u1", 10))
        .await
        .expect("keeps serving");
    running.stop().await;

    // Order.
    let running = Running::start(Role::Order).await;
    let mut client = pb::order_service_client::OrderServiceClient::new(running.channel.clone());
    let create = |items: Vec<pb::OrderItem>, amount: i64| pb::CreateOrderRequest {
        key: ok_key("create_order"),
        order_id: "s1".into(),
        user_id: "u1".into(),
        items,
        amount_minor: amount,
        coupon_id: String::new(),
    };
    let create_cases: Vec<(&str, pb::CreateOrderRequest, Expect)> = vec![
        ("empty", pb::CreateOrderRequest::default(), Expect::Invalid("key")),
        ("no items", create(vec![], 10), Expect::Invalid("items")),
        (
            "too many items",
            create(many_items.clone(), 10),
            Expect::Invalid("items"),
        ),
        (
            "duplicate items",
            create(vec![item("p1", 1), item("p1", 2)], 10),
            Expect::Invalid("items[1].product_id"),
        ),
        (
            "zero quantity",
            create(vec![item("p1", 0)], 10),
            Expect::Invalid("items[0].quantity"),
        ),
        (
            "negative amount",
            create(vec![item("p1", 1)], -1),
            Expect::Invalid("amount_minor"),
        ),
        (
            "10 MB user",
            pb::CreateOrderRequest {
                user_id: huge.clone(),
                ..create(vec![item("p1", 1)], 10)
            },
            Expect::Invalid("user_id"),
        ),
    ];
    for (case, request, expect) in create_cases {
        expect_answer(
            &format!("CreateOrder {case}"),
            expect,
            &running.participant,
            async { client.create_order(request).await.map(|_| ()) },
        )
        .await;
    }
    for (case, request, field) in [
        ("empty", pb::ConfirmOrderRequest::default(), "key"),
        (
            "10 MB order",
            pb::ConfirmOrderRequest {
                key: key("s1", "confirm_order"),
                order_id: huge.clone(),
            },
            "order_id",
        ),
    ] {
        expect_answer(
            &format!("ConfirmOrder {case}"),
            Expect::Invalid(field),
            &running.participant,
            async { client.confirm_order(request).await.map(|_| ()) },
        )
        .await;
    }
    client
        .create_order(create(vec![item("p1", 1)], 10))
        .await
        .expect("keeps serving");
    running.stop().await;
}

/// A step stream to the participant at `channel`: where calls go, and their replies.
async fn open_step_stream(
    channel: &Channel,
) -> (
    tokio::sync::mpsc::UnboundedSender<pb::StepCall>,
    tonic::Streaming<pb::StepReply>,
) {
    let (calls, outgoing) = tokio::sync::mpsc::unbounded_channel();
    let replies = pb::step_calls_client::StepCallsClient::new(channel.clone())
        .steps(tokio_stream::wrappers::UnboundedReceiverStream::new(outgoing))
        .await
        .expect("opens")
        .into_inner();
    (calls, replies)
}

/// `StepCalls.Steps` (the orchestrator's path): each call on the stream is answered with its
/// id and the status the unary RPC gives (refusal details and the invalid field included), the
/// barrier holds across both paths, and another role's action or an empty call is refused
/// without writing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_step_stream_answers_each_call_as_the_unary_rpc_does() {
    use pb::step_call::Call;
    let p = Running::start(Role::Stock).await;
    let mut unary = pb::stock_service_client::StockServiceClient::new(p.channel.clone());
    seed_stock(&mut unary, "p1", 1).await;
    let (calls, mut replies) = open_step_stream(&p.channel).await;
    let mut call = async |id: u64, call: Option<Call>| -> Result<(), tonic::Status> {
        calls
            .send(pb::StepCall {
                id,
                traceparent: String::new(),
                deadline_ms: 10_000,
                call,
            })
            .expect("stream open");
        let reply = replies.message().await.expect("reply").expect("a reply");
        assert_eq!(reply.id, id);
        match Code::from(reply.code) {
            Code::Ok => Ok(()),
            code => Err(tonic::Status::with_details(
                code,
                reply.message,
                reply.details.into(),
            )),
        }
    };
    call(1, Some(Call::ReserveStock(reserve("s1", "p1", 1))))
        .await
        .expect("reserved");
    let refused = call(2, Some(Call::ReserveStock(reserve("s2", "p1", 1))))
        .await
        .expect_err("out of stock");
    assert_eq!(refusal_of(&refused), pb::RefusalReason::OutOfStock);
    // The unary path sees the stream's decisions: a repeat returns the first outcome.
    let repeat = unary
        .reserve_stock(reserve("s1", "p1", 1))
        .await
        .expect("repeat")
        .into_inner();
    assert!(repeat.replayed);
    let before = p.participant.log().durable_position();
    let invalid = call(3, Some(Call::ReserveStock(reserve("s3", "p1", 0))))
        .await
        .expect_err("invalid");
    assert_eq!(invalid.code(), Code::InvalidArgument, "{invalid:?}");
    assert!(invalid.message().starts_with("items[0].quantity:"), "{invalid:?}");
    let elsewhere = call(
        4,
        Some(Call::ConfirmOrder(pb::ConfirmOrderRequest {
            key: key("s1", "confirm_order"),
            order_id: "s1".into(),
        })),
    )
    .await
    .expect_err("not the stock participant's");
    assert_eq!(elsewhere.code(), Code::Unimplemented, "{elsewhere:?}");
    let empty = call(5, None).await.expect_err("no call");
    assert_eq!(empty.code(), Code::InvalidArgument, "{empty:?}");
    assert!(empty.message().starts_with("call:"), "{empty:?}");
    assert_eq!(
        p.participant.log().durable_position(),
        before,
        "nothing was written"
    );
    // A repeat on the stream: the first outcome, nothing reserved twice.
    call(6, Some(Call::ReserveStock(reserve("s1", "p1", 1))))
        .await
        .expect("the first outcome");
    assert_eq!(stock_level(&mut unary, "p1").await, (0, 1));
    p.stop().await;
}

/// A caller keeps its step stream open for as long as it lives, and a server's graceful
/// shutdown waits for open streams: the participant ends its step streams when it stops, so
/// stopping it is not held by a caller, and the caller sees its stream end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_stops_with_a_step_stream_open_and_the_stream_ends() {
    let p = Running::start(Role::Stock).await;
    let mut unary = pb::stock_service_client::StockServiceClient::new(p.channel.clone());
    seed_stock(&mut unary, "p1", 5).await;
    let (calls, mut replies) = open_step_stream(&p.channel).await;
    calls
        .send(pb::StepCall {
            id: 1,
            traceparent: String::new(),
            deadline_ms: 0,
            call: Some(pb::step_call::Call::ReserveStock(reserve("s1", "p1", 1))),
        })
        .expect("stream open");
    let reply = replies.message().await.expect("reply").expect("a reply");
    assert_eq!((reply.id, reply.code), (1, 0));
    tokio::time::timeout(std::time::Duration::from_secs(10), p.stop())
        .await
        .expect("the participant stops with the caller's stream still open");
    assert!(
        !matches!(replies.message().await, Ok(Some(_))),
        "the stream ended"
    );
    drop(calls);
}

/// A call on the step stream is bounded by its deadline, as a unary handler is by its
/// `grpc-timeout`: past it the participant answers DEADLINE_EXCEEDED (what it did is an unknown
/// outcome to the caller, here a reservation taken) and stops working on it, so a stop is not
/// held by it either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_stream_call_past_its_deadline_is_answered_deadline_exceeded() {
    use saga_participants::faults::{ActFault, FaultPlan};
    let slow: saga_participants::BarrierDecorator = std::sync::Arc::new(|_, inner| {
        FaultPlan {
            act: vec![ActFault::DelayAfterApply {
                step: "reserve_stock".into(),
                delay_ms: 60_000,
            }],
            ..FaultPlan::default()
        }
        .decorate(inner)
    });
    let p = Running::start_with(Role::Stock, Some(slow)).await;
    let mut unary = pb::stock_service_client::StockServiceClient::new(p.channel.clone());
    seed_stock(&mut unary, "p1", 5).await;
    let (calls, mut replies) = open_step_stream(&p.channel).await;
    let began = std::time::Instant::now();
    calls
        .send(pb::StepCall {
            id: 7,
            traceparent: String::new(),
            deadline_ms: 200,
            call: Some(pb::step_call::Call::ReserveStock(reserve("s1", "p1", 1))),
        })
        .expect("stream open");
    let reply = replies.message().await.expect("reply").expect("a reply");
    assert_eq!((reply.id, Code::from(reply.code)), (7, Code::DeadlineExceeded));
    assert!(
        began.elapsed() < std::time::Duration::from_secs(30),
        "{:?}",
        began.elapsed()
    );
    assert_eq!(
        stock_level(&mut unary, "p1").await,
        (4, 1),
        "applied before the delay"
    );
    tokio::time::timeout(std::time::Duration::from_secs(10), p.stop())
        .await
        .expect("stops");
    drop(calls);
}

//! The benchmark workload of shared/BENCH.md, shared by `saga-orchestrator dev` and the
//! multi-process benchmark (`saga-tests`' `sagas` bench): the data and how it is seeded, order
//! n of each scenario, running orders with C in flight (latency from StartOrder to the final
//! event seen on WatchSaga), and the conservation checks on the participants' own state.

use std::sync::Arc;
use std::time::{Duration, Instant};

use saga_proto::v1 as pb;
use tonic::transport::Channel;

use crate::order::ParticipantAddrs;

/// The benchmark data (shared/BENCH.md).
pub const PRODUCTS: u64 = 100;
pub const USERS: u64 = 1000;
pub const STOCK_INITIAL: i64 = 1_000_000;
/// "Ample" balance: enough for far more orders than any run makes.
pub const BALANCE_AMPLE: i64 = 1_000_000_000;
pub const ORDER_AMOUNT: i64 = 10;

pub fn product_id(n: u64) -> String {
    format!("p{}", n % PRODUCTS)
}
pub fn user_id(n: u64) -> String {
    format!("u{}", n % USERS)
}
pub fn coupon_id(n: u64) -> String {
    format!("c{n}")
}
pub fn initial_balance(user: u64) -> i64 {
    if user.is_multiple_of(5) { 0 } else { BALANCE_AMPLE }
}

/// The two scenarios of shared/BENCH.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Every order's user has balance: every saga completes.
    AllOk,
    /// Order n's user is user n % 1000, so every 5th order fails at `deduct_balance` (20%).
    Fail20,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::AllOk => "all_ok",
            Scenario::Fail20 => "fail20",
        }
    }

    pub fn parse(name: &str) -> Option<Scenario> {
        [Scenario::AllOk, Scenario::Fail20]
            .into_iter()
            .find(|s| s.name() == name)
    }

    /// The user of order `n`.
    pub fn user(self, n: u64) -> u64 {
        let user = n % USERS;
        match self {
            Scenario::Fail20 => user,
            // The next user has balance (user % 5 == 0 is at most 995, so user + 1 exists).
            Scenario::AllOk if initial_balance(user) == 0 => user + 1,
            Scenario::AllOk => user,
        }
    }
}

/// Order n of the benchmark workload (scenario fail20).
pub fn order_request(run: &str, n: u64) -> pb::StartOrderRequest {
    scenario_order(Scenario::Fail20, run, n)
}

/// Order n of `scenario`: request id `<run>-<n>`, product n % 100, quantity 1, amount 10,
/// coupon n.
pub fn scenario_order(scenario: Scenario, run: &str, n: u64) -> pb::StartOrderRequest {
    pb::StartOrderRequest {
        request_id: format!("{run}-{n}"),
        user_id: user_id(scenario.user(n)),
        items: vec![pb::OrderItem {
            product_id: product_id(n),
            quantity: 1,
        }],
        amount_minor: ORDER_AMOUNT,
        coupon_id: coupon_id(n),
    }
}

/// Seeds the benchmark data through the participants' own Seed calls (events): every product's
/// stock, every user's balance, and the coupons of `orders` (coupon n for order n, owned by
/// order n's user in `scenario`).
/// The coupon of order `n`: free, owned by the order's user.
pub fn coupon(n: u64, scenario: Scenario) -> pb::Coupon {
    pb::Coupon {
        coupon_id: coupon_id(n),
        owner_user_id: user_id(scenario.user(n)),
        value_minor: 1,
        status: pb::CouponStatus::Free as i32,
        locked_by_order_id: String::new(),
    }
}

pub async fn seed(
    participants: &ParticipantAddrs,
    orders: std::ops::Range<u64>,
    scenario: Scenario,
) -> Result<(), WorkloadError> {
    let mut stock = pb::stock_service_client::StockServiceClient::new(channel(&participants.stock).await?);
    stock
        .seed_stock(pb::SeedStockRequest {
            stock: (0..PRODUCTS)
                .map(|n| pb::ProductStock {
                    product_id: product_id(n),
                    available: STOCK_INITIAL,
                    reserved: 0,
                })
                .collect(),
        })
        .await?;
    let mut balance =
        pb::balance_service_client::BalanceServiceClient::new(channel(&participants.balance).await?);
    balance
        .seed_balances(pb::SeedBalancesRequest {
            accounts: (0..USERS)
                .map(|n| pb::Account {
                    user_id: user_id(n),
                    balance_minor: initial_balance(n),
                })
                .collect(),
        })
        .await?;
    let mut coupons =
        pb::coupon_service_client::CouponServiceClient::new(channel(&participants.coupon).await?);
    let ids: Vec<u64> = orders.collect();
    for chunk in ids.chunks(10_000) {
        coupons
            .seed_coupons(pb::SeedCouponsRequest {
                coupons: chunk.iter().map(|&n| coupon(n, scenario)).collect(),
            })
            .await?;
    }
    Ok(())
}

/// A connected channel to `addr` with a deadline on every call.
pub async fn channel(addr: &str) -> Result<Channel, WorkloadError> {
    let connect = |source| WorkloadError::Connect {
        addr: addr.to_owned(),
        source,
    };
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(connect)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(connect)
}

/// Why a workload call failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error("call failed: {0}")]
    Call(#[from] tonic::Status),
    #[error("StartOrder answered without a saga")]
    NoSaga,
    #[error("a driver task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// How one order ended.
#[derive(Debug, Clone)]
pub struct OrderResult {
    pub n: u64,
    pub saga_id: String,
    /// The order's user and amount (the conservation checks charge them per user).
    pub user: String,
    pub amount_minor: i64,
    pub state: pb::SagaState,
    pub latency: Duration,
}

/// Starts order `n` of `scenario` and waits (WatchSaga) until its saga is final or stuck.
pub async fn run_order(
    client: &mut pb::orchestrator_client::OrchestratorClient<Channel>,
    scenario: Scenario,
    run: &str,
    n: u64,
) -> Result<OrderResult, WorkloadError> {
    let began = Instant::now();
    let request = scenario_order(scenario, run, n);
    let (user, amount_minor) = (request.user_id.clone(), request.amount_minor);
    let saga = client
        .start_order(request)
        .await?
        .into_inner()
        .saga
        .ok_or(WorkloadError::NoSaga)?;
    let mut events = client
        .watch_saga(pb::WatchSagaRequest {
            saga_id: saga.saga_id.clone(),
            from_version: 1,
            // Only the outcome matters here: the events that change the state.
            status_changes_only: true,
        })
        .await?
        .into_inner();
    let mut state = pb::SagaState::try_from(saga.state).unwrap_or_default();
    while let Some(event) = events.message().await? {
        state = pb::SagaState::try_from(event.state).unwrap_or_default();
        // A stuck saga keeps its stream open (it may be retried); the run counts it as stuck.
        if state == pb::SagaState::Stuck {
            break;
        }
    }
    Ok(OrderResult {
        n,
        saga_id: saga.saga_id,
        user,
        amount_minor,
        state,
        latency: began.elapsed(),
    })
}

/// Runs orders `orders` of `scenario` with `concurrency` in flight; `progress` is called after
/// each. Results are in order number order.
pub async fn run_orders(
    api: &str,
    scenario: Scenario,
    run: &str,
    orders: std::ops::Range<u64>,
    concurrency: usize,
    progress: impl Fn() + Send + Sync + 'static,
) -> Result<Vec<OrderResult>, WorkloadError> {
    let client = pb::orchestrator_client::OrchestratorClient::new(channel(api).await?);
    let next = Arc::new(std::sync::atomic::AtomicU64::new(orders.start));
    let end = orders.end;
    let progress = Arc::new(progress);
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let mut client = client.clone();
        let next = next.clone();
        let progress = progress.clone();
        let run = run.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut results = Vec::new();
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= end {
                    return Ok::<_, WorkloadError>(results);
                }
                results.push(run_order(&mut client, scenario, &run, n).await?);
                progress();
            }
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.extend(task.await??);
    }
    results.sort_by_key(|r| r.n);
    Ok(results)
}

/// The conservation checks of shared/BENCH.md on the participants' own state. Returns the
/// violations found (empty: correct).
pub async fn check_conservation(
    participants: &ParticipantAddrs,
    results: &[OrderResult],
) -> Result<Vec<String>, WorkloadError> {
    let mut problems = Vec::new();
    let completed: Vec<&OrderResult> = results
        .iter()
        .filter(|r| r.state == pb::SagaState::Completed)
        .collect();
    for r in results {
        if !matches!(r.state, pb::SagaState::Completed | pb::SagaState::Compensated) {
            problems.push(format!("saga {} (order {}) ended {:?}", r.saga_id, r.n, r.state));
        }
    }
    // Stock: available + reserved = initial; reserved = completed orders of the product.
    let mut stock = pb::stock_service_client::StockServiceClient::new(channel(&participants.stock).await?);
    let levels = stock
        .get_stock(pb::GetStockRequest {
            product_ids: (0..PRODUCTS).map(product_id).collect(),
        })
        .await?
        .into_inner()
        .stock;
    for level in &levels {
        let sold = completed
            .iter()
            .filter(|r| product_id(r.n) == level.product_id)
            .count() as i64;
        if level.available + level.reserved != STOCK_INITIAL || level.reserved != sold {
            problems.push(format!(
                "product {}: available {} + reserved {} (expected reserved {sold}, total {STOCK_INITIAL})",
                level.product_id, level.available, level.reserved
            ));
        }
    }
    // Money: each user's balance fell by exactly the amounts of that user's completed sagas.
    let mut balance =
        pb::balance_service_client::BalanceServiceClient::new(channel(&participants.balance).await?);
    let accounts = balance
        .get_balances(pb::GetBalancesRequest {
            user_ids: (0..USERS).map(user_id).collect(),
        })
        .await?
        .into_inner()
        .accounts;
    let mut charged: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    for r in &completed {
        *charged.entry(r.user.clone()).or_default() += r.amount_minor;
    }
    for (user, account) in accounts.iter().enumerate() {
        let expected = initial_balance(user as u64) - charged.get(&account.user_id).copied().unwrap_or(0);
        if account.user_id != user_id(user as u64) || account.balance_minor != expected {
            problems.push(format!(
                "user {}: balance {} but {expected} expected from its completed sagas",
                account.user_id, account.balance_minor
            ));
        }
    }
    // Coupons: locked by completed sagas, free after compensated ones.
    let mut coupons =
        pb::coupon_service_client::CouponServiceClient::new(channel(&participants.coupon).await?);
    for chunk in results.chunks(1000) {
        let found = coupons
            .get_coupons(pb::GetCouponsRequest {
                coupon_ids: chunk.iter().map(|r| coupon_id(r.n)).collect(),
            })
            .await?
            .into_inner()
            .coupons;
        for (r, coupon) in chunk.iter().zip(found) {
            let status = pb::CouponStatus::try_from(coupon.status).unwrap_or_default();
            let expected = if r.state == pb::SagaState::Completed {
                pb::CouponStatus::Locked
            } else {
                pb::CouponStatus::Free
            };
            if coupon.coupon_id != coupon_id(r.n) || status != expected {
                problems.push(format!(
                    "coupon {} is {status:?} after saga {} ended {:?}",
                    coupon.coupon_id, r.saga_id, r.state
                ));
            }
        }
    }
    // Orders: confirmed when completed, cancelled when compensated.
    let mut orders = pb::order_service_client::OrderServiceClient::new(channel(&participants.order).await?);
    for chunk in results.chunks(1000) {
        let found = orders
            .get_orders(pb::GetOrdersRequest {
                order_ids: chunk.iter().map(|r| r.saga_id.clone()).collect(),
            })
            .await?
            .into_inner()
            .orders;
        let status: std::collections::HashMap<&str, pb::OrderStatus> = found
            .iter()
            .map(|o| {
                (
                    o.order_id.as_str(),
                    pb::OrderStatus::try_from(o.status).unwrap_or_default(),
                )
            })
            .collect();
        for r in chunk {
            let found = status.get(r.saga_id.as_str()).copied();
            let right = match r.state {
                pb::SagaState::Completed => found == Some(pb::OrderStatus::Confirmed),
                // Cancelled, or never created (the saga failed before create_order took effect).
                _ => found != Some(pb::OrderStatus::Confirmed) && found != Some(pb::OrderStatus::Pending),
            };
            if !right {
                problems.push(format!(
                    "order {} is {found:?} after its saga ended {:?}",
                    r.saga_id, r.state
                ));
            }
        }
    }
    problems.truncate(20);
    Ok(problems)
}

/// The percentile `p` (0..=100) of sorted latencies, in milliseconds.
pub fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_ok_orders_only_users_with_balance_and_fail20_has_one_in_five_without() {
        for n in 0..5 * USERS {
            let user = Scenario::AllOk.user(n);
            assert!(user < USERS, "order {n}: user {user} does not exist");
            assert!(initial_balance(user) > 0, "order {n}: user {user} cannot pay");
        }
        let broke = (0..5 * USERS)
            .filter(|&n| initial_balance(Scenario::Fail20.user(n)) == 0)
            .count() as u64;
        assert_eq!(broke, USERS, "20% of 5,000 orders");
        assert_eq!(Scenario::parse("all_ok"), Some(Scenario::AllOk));
        assert_eq!(Scenario::parse("fail20"), Some(Scenario::Fail20));
        assert_eq!(Scenario::parse("fail30"), None);
    }
}

//! `saga-orchestrator dev`: the embedded default. One process hosts the orchestrator and the
//! four participants, each with its own sled log under one data directory, talking over real
//! gRPC on loopback ports, with the embedded (sled) compensation transport instead of a
//! broker. It seeds the data of shared/BENCH.md and, with `--orders N`, runs N orders through
//! the public API and checks conservation on the participants' own state.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use saga_messaging::embedded::{EmbeddedConfig, EmbeddedTransport};
use saga_messaging::topics;
use saga_messaging::transport::{Consumer, SubscriptionSpec, Transport};
use saga_participants::consumer::CompensationConsumer;
use saga_participants::{Participant, Role};
use saga_proto::v1 as pb;
use tonic::transport::Channel;

use crate::engine::{AckHandler, Engine, EngineConfig};
use crate::order::{self, OrderInvoker, OrderTiming, ParticipantAddrs};

/// The benchmark data (shared/BENCH.md).
pub const PRODUCTS: u64 = 100;
pub const USERS: u64 = 1000;
pub const STOCK_INITIAL: i64 = 1_000_000;
/// "Ample" balance: enough for far more orders than any run makes.
pub const BALANCE_AMPLE: i64 = 1_000_000_000;
pub const ORDER_AMOUNT: i64 = 10;
/// The orchestrator's consumer group on the acknowledgement topic.
pub const ACK_GROUP: &str = "saga-orchestrator";

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

/// Order n of the benchmark workload.
pub fn order_request(run: &str, n: u64) -> pb::StartOrderRequest {
    pb::StartOrderRequest {
        request_id: format!("{run}-{n}"),
        user_id: user_id(n),
        items: vec![pb::OrderItem {
            product_id: product_id(n),
            quantity: 1,
        }],
        amount_minor: ORDER_AMOUNT,
        coupon_id: coupon_id(n),
    }
}

/// Test and chaos knobs of a dev system.
#[derive(Debug, Clone, Default)]
pub struct DevOptions {
    /// Compensations of sagas whose id starts with this fail in every participant's consumer
    /// (see `saga_participants::consumer::FAULT_PREFIX_ENV`), so they are parked.
    pub compensation_fault_prefix: Option<String>,
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
            let participant = Participant::open(role, &data_dir.join(role.name()))
                .with_context(|| format!("cannot open the {} log", role.name()))?;
            let consumer = Arc::new(
                CompensationConsumer::new(participant.clone(), transport.clone())
                    .with_fault_prefix(options.compensation_fault_prefix.clone()),
            );
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
        let engine = Engine::new(
            log,
            vec![order::definition(&timing)],
            OrderInvoker::new(&participants)?,
            EngineConfig::default(),
        );
        let relay = {
            let engine = engine.clone();
            let transport = transport.clone();
            tokio::spawn(async move { engine.run_relay(transport).await })
        };
        consumers.push(
            transport
                .subscribe(
                    SubscriptionSpec {
                        group: ACK_GROUP.into(),
                        topic: topics::COMPENSATION_ACK_TOPIC.into(),
                        tags: Vec::new(),
                    },
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
            dev.seed(coupons).await.context("seeding the benchmark data")?;
        }
        let resumed = dev.engine.recover().await?;
        if resumed > 0 {
            tracing::info!(resumed, "resumed unfinished sagas");
        }
        Ok(dev)
    }

    async fn seed(&self, coupons: u64) -> anyhow::Result<()> {
        let mut stock =
            pb::stock_service_client::StockServiceClient::new(channel(&self.participants.stock).await?);
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
            pb::balance_service_client::BalanceServiceClient::new(channel(&self.participants.balance).await?);
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
        let mut coupon =
            pb::coupon_service_client::CouponServiceClient::new(channel(&self.participants.coupon).await?);
        let ids: Vec<u64> = (0..coupons).collect();
        for chunk in ids.chunks(10_000) {
            coupon
                .seed_coupons(pb::SeedCouponsRequest {
                    coupons: chunk
                        .iter()
                        .map(|&n| pb::Coupon {
                            coupon_id: coupon_id(n),
                            owner_user_id: user_id(n),
                            value_minor: 1,
                            status: pb::CouponStatus::Free as i32,
                            locked_by_order_id: String::new(),
                        })
                        .collect(),
                })
                .await?;
        }
        Ok(())
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

/// A connected channel to `addr` with a deadline on every call.
pub async fn channel(addr: &str) -> anyhow::Result<Channel> {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot connect to {addr}"))
}

/// How one order ended.
#[derive(Debug, Clone)]
pub struct OrderResult {
    pub n: u64,
    pub saga_id: String,
    pub state: pb::SagaState,
    pub latency: Duration,
}

/// Starts order `n` and waits (WatchSaga) until its saga is final or stuck.
pub async fn run_order(
    client: &mut pb::orchestrator_client::OrchestratorClient<Channel>,
    run: &str,
    n: u64,
) -> anyhow::Result<OrderResult> {
    let began = Instant::now();
    let saga = client
        .start_order(order_request(run, n))
        .await?
        .into_inner()
        .saga
        .context("StartOrder answered without a saga")?;
    let mut events = client
        .watch_saga(pb::WatchSagaRequest {
            saga_id: saga.saga_id.clone(),
            from_version: 1,
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
        state,
        latency: began.elapsed(),
    })
}

/// Runs orders `0..count` with `concurrency` in flight; `progress` is called after each.
pub async fn run_orders(
    api: &str,
    run: &str,
    count: u64,
    concurrency: usize,
    progress: impl Fn() + Send + Sync + 'static,
) -> anyhow::Result<Vec<OrderResult>> {
    let client = pb::orchestrator_client::OrchestratorClient::new(channel(api).await?);
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
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
                if n >= count {
                    return anyhow::Ok(results);
                }
                results.push(run_order(&mut client, &run, n).await?);
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
) -> anyhow::Result<Vec<String>> {
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
    // Money: the sum of balances fell by exactly the completed orders' amounts.
    let mut balance =
        pb::balance_service_client::BalanceServiceClient::new(channel(&participants.balance).await?);
    let accounts = balance
        .get_balances(pb::GetBalancesRequest {
            user_ids: (0..USERS).map(user_id).collect(),
        })
        .await?
        .into_inner()
        .accounts;
    let initial: i64 = (0..USERS).map(initial_balance).sum();
    let now: i64 = accounts.iter().map(|a| a.balance_minor).sum();
    let charged = completed.len() as i64 * ORDER_AMOUNT;
    if initial - now != charged {
        problems.push(format!(
            "balances fell by {} but completed orders charged {charged}",
            initial - now
        ));
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
        let confirmed = found
            .iter()
            .filter(|o| o.status == pb::OrderStatus::Confirmed as i32)
            .count();
        let expected = chunk
            .iter()
            .filter(|r| r.state == pb::SagaState::Completed)
            .count();
        if confirmed != expected {
            problems.push(format!(
                "{confirmed} orders confirmed, {expected} sagas completed"
            ));
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

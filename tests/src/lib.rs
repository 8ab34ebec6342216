//! `saga-tests`: process-level end-to-end and chaos tests (real orchestrator and participant
//! processes on loopback ports, real RocketMQ from scripts/dev-env), in `tests/tests/`.
//!
//! This library holds what they share: starting a binary of the workspace and reading the
//! `listening on ADDR` line it prints when ready ([`Proc`], stopped by PID when dropped, also
//! when a test fails), a [`System`] of four participants and an orchestrator on their own
//! topics and consumer groups, and gRPC helpers.
//!
//! The binaries are found next to the test executable (`target/<profile>/`): `cargo test
//! --workspace` (scripts/test) builds them.

pub mod pki;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use saga_messaging::rocketmq::{RocketMqConfig, RocketMqTransport};
use saga_orchestrator::workload::{OrderResult, Scenario, WorkloadError};
use saga_proto::Role;
use saga_proto::v1 as pb;
use tonic::transport::Channel;

/// The path of a workspace binary, built alongside the tests.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> or target/<profile>/<bin> -> target/<profile>/<name>
    let mut dir = exe.parent().expect("target/<profile>");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().expect("target/<profile>");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (scripts/test runs cargo test --workspace)",
        path.display()
    );
    path
}

/// A unique id for one test run (unique within the process too): topics, groups and request
/// ids carry it.
pub fn run_id() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    format!(
        "{}x{}x{}",
        std::process::id(),
        nanos % 1_000_000_000_000,
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// A product's (available, reserved) units, read from the stock service.
pub async fn stock_level(
    client: &mut pb::stock_service_client::StockServiceClient<Channel>,
    product: &str,
) -> (i64, i64) {
    let stock = client
        .get_stock(pb::GetStockRequest {
            product_ids: vec![product.into()],
        })
        .await
        .expect("reads")
        .into_inner()
        .stock;
    (stock[0].available, stock[0].reserved)
}

/// A participant's acknowledgement of `saga_id`'s `step` (round 1), as the engine receives it.
pub fn compensation_ack(saga_id: &str, step: &str, outcome: pb::CompensationOutcome) -> pb::CompensationAck {
    pb::CompensationAck {
        key: Some(pb::StepKey {
            saga_id: saga_id.into(),
            step: step.into(),
        }),
        role: String::new(),
        outcome: outcome as i32,
        detail: format!("{outcome:?} (test)"),
        round: 1,
        ..Default::default()
    }
}

/// A compensation request for `saga_id`'s `step` of `role`, as the engine publishes it (without
/// acknowledgement routing: the consumer's defaults apply).
pub fn compensation_request(
    topic: &str,
    role: &str,
    saga_id: &str,
    step: &str,
) -> saga_messaging::transport::Outgoing {
    use prost::Message as _;
    saga_messaging::transport::Outgoing {
        topic: topic.into(),
        tag: role.into(),
        key: saga_messaging::topics::message_key(saga_id, step),
        properties: saga_messaging::topics::message_properties(&saga_messaging::topics::message_key(
            saga_id, step,
        )),
        body: pb::CompensationRequest {
            key: Some(pb::StepKey {
                saga_id: saga_id.into(),
                step: step.into(),
            }),
            role: role.into(),
            requested_at_unix_ms: 0,
            ..Default::default()
        }
        .encode_to_vec(),
    }
}

/// Watches `saga_id` until its state is `wanted` (or it is final, or Stuck, when `wanted` is
/// `None`), at most `patience`; then its full view.
pub async fn wait_state(
    client: &mut pb::orchestrator_client::OrchestratorClient<Channel>,
    saga_id: &str,
    wanted: Option<pb::SagaState>,
    patience: Duration,
) -> pb::Saga {
    let watched = async {
        let mut events = client
            .watch_saga(pb::WatchSagaRequest {
                saga_id: saga_id.into(),
                from_version: 1,
                status_changes_only: false,
            })
            .await
            .expect("watches")
            .into_inner();
        // The stream ends when the saga is final; a Stuck saga keeps it open.
        while let Some(event) = events.message().await.expect("event stream") {
            let reached = match wanted {
                Some(wanted) => event.state == wanted as i32,
                None => event.state == pb::SagaState::Stuck as i32,
            };
            if reached {
                return;
            }
        }
        assert!(
            wanted.is_none(),
            "saga {saga_id} ended without reaching {wanted:?}"
        );
    };
    tokio::time::timeout(patience, watched)
        .await
        .unwrap_or_else(|_| panic!("saga {saga_id} did not reach {wanted:?} within {patience:?}"));
    client
        .get_saga(pb::GetSagaRequest {
            saga_id: saga_id.into(),
        })
        .await
        .expect("gets")
        .into_inner()
        .saga
        .expect("saga")
}

/// A loopback port that was free a moment ago (for a process that must come back on the
/// same address after a restart).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("binds")
        .local_addr()
        .expect("addr")
        .port()
}

/// A child process, killed (SIGKILL) and reaped when dropped, also when a test fails.
pub struct Proc {
    pub child: Child,
    pub addr: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Starts `bin` with `args` and `env`; returns once it printed `listening on ADDR`.
    pub fn start(bin: &str, args: &[String], env: &[(String, String)]) -> Proc {
        Proc::start_logged(bin, args, env, None)
    }

    /// As [`Proc::start`], with standard error appended to `log` when given (else inherited).
    pub fn start_logged(bin: &str, args: &[String], env: &[(String, String)], log: Option<&Path>) -> Proc {
        let stderr = match log {
            Some(path) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap_or_else(|e| panic!("opens {}: {e}", path.display())),
            ),
            None => Stdio::inherit(),
        };
        let mut child = Command::new(bin_path(bin))
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("starts {bin}: {e}"));
        let stdout = child.stdout.take().expect("piped");
        let mut proc = Proc {
            child,
            addr: String::new(),
        };
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("reads stdout");
        proc.addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("{bin}: unexpected first line {line:?}"))
            .to_owned();
        proc
    }

    /// SIGTERM, and wait (up to `patience`) until it is gone; its exit status. Past
    /// `patience` it is killed and the test fails.
    pub fn terminate(mut self, patience: Duration) -> std::process::ExitStatus {
        // SAFETY: `kill` on the PID of our own child, not reaped yet (reaping needs `&mut self`).
        #[allow(unsafe_code, reason = "libc::kill; see SAFETY")]
        let sent = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(sent, 0, "SIGTERM sent");
        let began = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("polls the child") {
                return status;
            }
            assert!(
                began.elapsed() < patience,
                "still running {patience:?} after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, and wait until it is gone.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }

    pub async fn channel(&self) -> Channel {
        channel(&self.addr).await
    }
}

/// A connected channel with a deadline on every call.
pub async fn channel(addr: &str) -> Channel {
    tls_channel(addr, None).await
}

/// [`channel`], over TLS when `tls` is given.
pub async fn tls_channel(addr: &str, tls: Option<&tonic::transport::ClientTlsConfig>) -> Channel {
    let mut endpoint =
        tonic::transport::Endpoint::from_shared(format!("{}://{addr}", saga_proto::tls::scheme(tls)))
            .expect("uri");
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.clone()).expect("tls config");
    }
    endpoint
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connects to {addr}: {e}"))
}

/// How to start a [`System`].
#[derive(Default, Clone)]
pub struct SystemConfig {
    /// Extra environment per role (fault injection).
    pub participant_env: Vec<(&'static str, String, String)>,
    /// Extra orchestrator arguments.
    pub orchestrator_args: Vec<String>,
    /// Extra arguments of every participant.
    pub participant_args: Vec<String>,
    /// How the test's own clients reach the participants (TLS when they serve it).
    pub participant_client_tls: Option<tonic::transport::ClientTlsConfig>,
    /// How the test's own clients reach the orchestrator's API.
    pub api_client_tls: Option<tonic::transport::ClientTlsConfig>,
    /// Extra environment of the orchestrator.
    pub orchestrator_env: Vec<(String, String)>,
    /// Where each process's standard error goes (`<dir>/<role>.log`, `orchestrator.log`);
    /// inherited when none.
    pub log_dir: Option<PathBuf>,
}

/// Four participant processes and an orchestrator process, on the real broker, with topics and
/// consumer groups of their own (tests run at once against one broker).
pub struct System {
    pub run: String,
    pub namesrv: String,
    pub dir: tempfile::TempDir,
    pub participants: Vec<(String, Proc)>,
    pub ports: Vec<u16>,
    pub orchestrator: Option<Proc>,
    config: SystemConfig,
}

impl System {
    pub async fn start(namesrv: &str, config: SystemConfig) -> System {
        let run = run_id();
        let transport = RocketMqTransport::start(RocketMqConfig::new(namesrv), &format!("setup-{run}"))
            .await
            .expect("RocketMQ client");
        transport
            .ensure_topics(
                &[&format!("comp-{run}"), &format!("ack-{run}")],
                2,
                Duration::from_secs(30),
            )
            .await
            .expect("creates the run's topics");
        transport.shutdown().await;
        let mut system = System {
            run,
            namesrv: namesrv.to_owned(),
            dir: tempfile::tempdir().expect("tempdir"),
            participants: Vec::new(),
            ports: Vec::new(),
            orchestrator: None,
            config,
        };
        for role in Role::ALL.map(Role::name) {
            let port = free_port();
            system.ports.push(port);
            let proc = system.start_participant(role, port);
            system.participants.push((role.to_owned(), proc));
        }
        system.start_orchestrator();
        system
    }

    /// Starts (or restarts) `role` on `port` with its data directory.
    pub fn start_participant(&self, role: &str, port: u16) -> Proc {
        let run = &self.run;
        let args: Vec<String> = [
            "--role",
            role,
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            &self.dir.path().join(role).to_string_lossy(),
            "--rocketmq",
            &self.namesrv,
            "--group",
            &format!("{role}-{run}"),
            "--compensation-topic",
            &format!("comp-{run}"),
            "--ack-topic",
            &format!("ack-{run}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(self.config.participant_args.iter().cloned())
        .collect();
        let env: Vec<(String, String)> = self
            .config
            .participant_env
            .iter()
            .filter(|(r, _, _)| *r == role)
            .map(|(_, k, v)| (k.clone(), v.clone()))
            .collect();
        let log = self
            .config
            .log_dir
            .as_ref()
            .map(|d| d.join(format!("{role}.log")));
        Proc::start_logged("saga-participant", &args, &env, log.as_deref())
    }

    /// `order=127.0.0.1:PORT,stock=...`: the orchestrator's `--participants`.
    pub fn participant_list(&self) -> String {
        Role::ALL
            .map(Role::name)
            .iter()
            .zip(&self.ports)
            .map(|(role, port)| format!("{role}=127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts (or restarts) the orchestrator on its data directory.
    pub fn start_orchestrator(&mut self) {
        let mut args = self.orchestrator_args("orchestrator", &format!("orch-{}", self.run));
        args.extend(self.config.orchestrator_args.iter().cloned());
        let log = self.config.log_dir.as_ref().map(|d| d.join("orchestrator.log"));
        self.orchestrator = Some(Proc::start_logged(
            "saga-orchestrator",
            &args,
            &self.config.orchestrator_env,
            log.as_deref(),
        ));
    }

    /// Starts one more orchestrator, node `node_id` (its own data directory, acknowledgement
    /// group and tag), on the same participants and topics, with its standard error written to
    /// `log` (so a test can read what it reported).
    pub fn start_orchestrator_node(&self, node_id: &str, log: &Path) -> Proc {
        let mut args = self.orchestrator_args(
            &format!("orchestrator-{node_id}"),
            &format!("orch-{}-{node_id}", self.run),
        );
        args.extend(["--node-id".to_owned(), node_id.to_owned()]);
        args.extend(self.config.orchestrator_args.iter().cloned());
        Proc::start_logged("saga-orchestrator", &args, &[], Some(log))
    }

    fn orchestrator_args(&self, data_dir: &str, ack_group: &str) -> Vec<String> {
        let run = &self.run;
        [
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &self.dir.path().join(data_dir).to_string_lossy(),
            "--participants",
            &self.participant_list(),
            "--rocketmq",
            &self.namesrv,
            "--compensation-topic",
            &format!("comp-{run}"),
            "--ack-topic",
            &format!("ack-{run}"),
            "--ack-group",
            ack_group,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    pub fn participant(&self, role: &str) -> &Proc {
        &self
            .participants
            .iter()
            .find(|(r, _)| r == role)
            .expect("known role")
            .1
    }

    pub async fn client(&self) -> pb::orchestrator_client::OrchestratorClient<Channel> {
        let addr = &self.orchestrator.as_ref().expect("orchestrator running").addr;
        pb::orchestrator_client::OrchestratorClient::new(
            tls_channel(addr, self.config.api_client_tls.as_ref()).await,
        )
    }

    /// A channel to `role`'s participant (TLS when the system's participants serve it).
    pub async fn participant_channel(&self, role: &str) -> Channel {
        tls_channel(
            &self.participant(role).addr,
            self.config.participant_client_tls.as_ref(),
        )
        .await
    }

    pub async fn seed_stock(&self, product: &str, available: i64) {
        pb::stock_service_client::StockServiceClient::new(self.participant_channel("stock").await)
            .seed_stock(pb::SeedStockRequest {
                stock: vec![pb::ProductStock {
                    product_id: product.into(),
                    available,
                    reserved: 0,
                }],
            })
            .await
            .expect("seeds stock");
    }

    pub async fn seed_balance(&self, user: &str, balance: i64) {
        pb::balance_service_client::BalanceServiceClient::new(self.participant_channel("balance").await)
            .seed_balances(pb::SeedBalancesRequest {
                accounts: vec![pb::Account {
                    user_id: user.into(),
                    balance_minor: balance,
                }],
            })
            .await
            .expect("seeds balance");
    }

    pub async fn seed_coupon(&self, coupon: &str, owner: &str) {
        pb::coupon_service_client::CouponServiceClient::new(self.participant_channel("coupon").await)
            .seed_coupons(pb::SeedCouponsRequest {
                coupons: vec![pb::Coupon {
                    coupon_id: coupon.into(),
                    owner_user_id: owner.into(),
                    value_minor: 1,
                    status: pb::CouponStatus::Free as i32,
                    locked_by_order_id: String::new(),
                }],
            })
            .await
            .expect("seeds coupon");
    }

    /// (available, reserved) of a product.
    pub async fn stock(&self, product: &str) -> (i64, i64) {
        let s = pb::stock_service_client::StockServiceClient::new(self.participant_channel("stock").await)
            .get_stock(pb::GetStockRequest {
                product_ids: vec![product.into()],
            })
            .await
            .expect("reads stock")
            .into_inner()
            .stock;
        (s[0].available, s[0].reserved)
    }

    pub async fn balance(&self, user: &str) -> i64 {
        pb::balance_service_client::BalanceServiceClient::new(self.participant_channel("balance").await)
            .get_balances(pb::GetBalancesRequest {
                user_ids: vec![user.into()],
            })
            .await
            .expect("reads balance")
            .into_inner()
            .accounts[0]
            .balance_minor
    }

    pub async fn coupon(&self, coupon: &str) -> pb::CouponStatus {
        let c = pb::coupon_service_client::CouponServiceClient::new(self.participant_channel("coupon").await)
            .get_coupons(pb::GetCouponsRequest {
                coupon_ids: vec![coupon.into()],
            })
            .await
            .expect("reads coupon")
            .into_inner()
            .coupons;
        pb::CouponStatus::try_from(c[0].status).expect("known status")
    }

    /// The order's status; `None` if the order participant never saw it.
    pub async fn order(&self, order_id: &str) -> Option<pb::OrderStatus> {
        let o = pb::order_service_client::OrderServiceClient::new(self.participant_channel("order").await)
            .get_orders(pb::GetOrdersRequest {
                order_ids: vec![order_id.into()],
            })
            .await
            .expect("reads order")
            .into_inner()
            .orders;
        o.first()
            .map(|o| pb::OrderStatus::try_from(o.status).expect("known status"))
    }
}

/// A StartOrder request for one unit of `product`, amount 10.
pub fn order(request_id: &str, user: &str, product: &str, coupon: &str) -> pb::StartOrderRequest {
    pb::StartOrderRequest {
        request_id: request_id.into(),
        user_id: user.into(),
        items: vec![pb::OrderItem {
            product_id: product.into(),
            quantity: 1,
        }],
        amount_minor: 10,
        coupon_id: coupon.into(),
    }
}

/// Watches `saga_id` until it is final or Stuck, at most `patience`; then its full view.
pub async fn wait_final(
    client: &mut pb::orchestrator_client::OrchestratorClient<Channel>,
    saga_id: &str,
    patience: Duration,
) -> pb::Saga {
    wait_state(client, saga_id, None, patience).await
}

/// The state of step `name` of `saga`.
pub fn step_state(saga: &pb::Saga, name: &str) -> pb::StepState {
    let step = saga.steps.iter().find(|s| s.name == name).expect("step exists");
    pb::StepState::try_from(step.state).expect("known state")
}

/// Runs orders `orders` split evenly over the orchestrators at `apis`, `conc` in flight in all
/// (shared between them), and returns every result.
pub async fn run_split(
    apis: &[String],
    scenario: Scenario,
    run: &str,
    orders: std::ops::Range<u64>,
    conc: usize,
) -> Result<Vec<OrderResult>, WorkloadError> {
    let nodes = apis.len() as u64;
    let len = orders.end - orders.start;
    let runs = apis.iter().enumerate().map(|(i, api)| {
        let (i, conc) = (i as u64, conc.div_ceil(apis.len()));
        let part = orders.start + len * i / nodes..orders.start + len * (i + 1) / nodes;
        let (api, run) = (api.clone(), run.to_owned());
        tokio::spawn(async move {
            saga_orchestrator::workload::run_orders(&api, scenario, &run, part, conc, || {}).await
        })
    });
    let mut results = Vec::new();
    for handle in runs.collect::<Vec<_>>() {
        results.extend(handle.await.expect("an order runner panicked")?);
    }
    Ok(results)
}

/// Whether the orchestrator node whose standard error is in `log` reported an acknowledgement
/// of a saga it does not own ([`saga_orchestrator::engine::MISROUTED_ACK`]).
pub fn reported_misrouted_ack(log: &Path) -> bool {
    std::fs::read_to_string(log)
        .unwrap_or_else(|e| panic!("reads {}: {e}", log.display()))
        .contains(saga_orchestrator::engine::MISROUTED_ACK)
}

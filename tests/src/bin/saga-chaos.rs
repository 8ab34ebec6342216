//! `saga-chaos`: kill anything at any moment, lose nothing, and prove it from the logs.
//!
//! Starts a RocketMQ name server and broker of its own (scripts/dev-env, own ports and state
//! dir), the four participants and the orchestrator as separate processes, and drives orders
//! (the fail20 mix of shared/BENCH.md) at a steady concurrency through the gRPC API. Meanwhile,
//! on a schedule drawn from `--seed` alone (so `--seed S --duration D` replays it), it
//! SIGKILLs and restarts participants, the orchestrator and the broker, SIGSTOPs and SIGCONTs
//! a participant or the orchestrator for longer than the step deadline, and restarts
//! participants with faults (refused or slow actions: `SAGA_FAULT_ACT`).
//!
//! Then it stops injecting, waits (bounded) until every saga is final, and checks, from the
//! processes' own state and logs:
//! - every acknowledged StartOrder has its saga, every saga had an acknowledged start, and
//!   every saga is Completed or Compensated (none stuck: no fault here parks on purpose);
//! - stock, balances per user, coupons and orders against the sagas' outcomes
//!   (`workload::check_conservation`);
//! - each step's action took effect at most once and each compensation at most once (from the
//!   participants' step streams), and every step the orchestrator shows compensated has its
//!   applied or null record, every step of a completed saga its action;
//! - the orchestrator's log, folded offline, gives exactly the sagas its API reported;
//! - every log verifies (checksums, hash chains, index, durable mark, projections vs replay).
//!
//! Its last line is exactly `chaos seed=S duration_s=D sagas=N kills=K pauses=P violations=V`,
//! and it exits 1 when V > 0, after printing the violations (with saga ids) and the paths of
//! the logs, which it keeps.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::Parser;
use rand::{RngExt as _, SeedableRng as _};
use rand_pcg::Pcg64;
use saga_orchestrator::events::SagaEvent;
use saga_orchestrator::order::ParticipantAddrs;
use saga_orchestrator::state::SagaState;
use saga_orchestrator::workload::{self, OrderResult, Scenario};
use saga_participants::barrier::StepEvent;
use saga_participants::consumer_log::ConsumerEvent;
use saga_participants::record::ParticipantEvent;
use saga_proto::Role;
use saga_proto::v1 as pb;
use saga_storage::Position;
use saga_storage::audit::AuditLog;
use saga_tests::{bin_path, free_port};
use tonic::transport::Channel;

#[derive(Parser, Clone)]
#[command(about = "Chaos run: kill and pause every process on a seeded schedule, then check the logs")]
struct Args {
    /// Seed of the fault schedule (default: from the clock; printed first).
    #[arg(long)]
    seed: Option<u64>,
    /// Seconds of load and fault injection.
    #[arg(long, default_value_t = 90)]
    duration: u64,
    /// Orders in flight.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Most seconds to wait, after injection stops, for every saga to be final. A broker
    /// restart makes sends fail for ~30 s (ROCKETMQ.md) and compensation acks are re-sent
    /// after 30 s, so allow well over 90 s.
    #[arg(long, default_value_t = 240)]
    quiesce_max_s: u64,
    /// Keep the work dir (data dirs, process logs) also after a clean run.
    #[arg(long)]
    keep: bool,
    /// How participants acknowledge compensations: `grpc` (the orchestrator runs with
    /// `--ack-endpoint listen`; acks fall back to the topic while it is down or paused, so both
    /// routes are exercised) or `topic` (through the broker only).
    #[arg(long, default_value = "grpc", value_parser = ["grpc", "topic"])]
    acks: String,
}

/// The order saga as the orchestrator runs it (default timing): which role serves each step,
/// which steps can be compensated, and the step deadline that pauses and delays exceed.
fn order_saga() -> (saga_orchestrator::definition::SagaDefinition, Duration) {
    let timing = saga_orchestrator::order::OrderTiming::default();
    (
        saga_orchestrator::order::definition(&timing),
        Duration::from_millis(timing.step_deadline_ms),
    )
}

/// The step of `role` that faults target: its compensable one (a fault on the pivot would park
/// sagas Stuck on purpose, which this run counts as a violation).
fn fault_step(role: &str) -> String {
    order_saga()
        .0
        .steps
        .into_iter()
        .find(|s| s.participant == role && s.compensable)
        .map(|s| s.name)
        .expect("every role serves a compensable step")
}

/// The role that serves `step`.
fn role_of(step: &str) -> String {
    order_saga()
        .0
        .steps
        .into_iter()
        .find(|s| s.name == step)
        .map_or_else(|| "?".to_owned(), |s| s.participant)
}

/// Coupons are seeded in blocks as the order numbers reach them.
const COUPON_BLOCK: u64 = 5_000;
/// Deadline of one StartOrder call; unanswered calls are repeated with the same request id.
const START_DEADLINE: Duration = Duration::from_secs(5);
/// How long a driver follows one saga before it moves on (the final check covers the rest).
const FOLLOW_MAX: Duration = Duration::from_secs(15);

// ------------------------------------------------------------------------------ schedule

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Participant(usize),
    Orchestrator,
    Broker,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Participant(i) => f.write_str(Role::ALL[*i].name()),
            Target::Orchestrator => f.write_str("orchestrator"),
            Target::Broker => f.write_str("broker"),
        }
    }
}

#[derive(Debug, Clone)]
enum Action {
    /// SIGKILL, stay down for `down`, restart (a participant with `fault` until healed).
    Kill {
        target: Target,
        down: Duration,
        fault: Option<String>,
    },
    /// SIGSTOP for `length` (longer than the step deadline), then SIGCONT.
    Pause { target: Target, length: Duration },
}

#[derive(Debug, Clone)]
struct Planned {
    at: Duration,
    action: Action,
}

fn ms(range: std::ops::Range<u64>, rng: &mut Pcg64) -> Duration {
    Duration::from_millis(rng.random_range(range))
}

/// The schedule: a function of the seed and the duration only.
fn plan(seed: u64, duration: Duration) -> Vec<Planned> {
    let mut rng = Pcg64::seed_from_u64(seed);
    let deadline_ms = order_saga().1.as_millis() as u64;
    let mut out = Vec::new();
    let mut at = Duration::from_secs(3);
    let end = duration.saturating_sub(Duration::from_secs(3));
    loop {
        at += ms(2_500..7_000, &mut rng);
        if at >= end {
            break;
        }
        let roll = rng.random_range(0..100u32);
        let action = match roll {
            0..35 => {
                let role = rng.random_range(0..Role::ALL.len());
                let fault = if rng.random_bool(0.5) {
                    None
                } else {
                    let step = fault_step(Role::ALL[role].name());
                    Some(if rng.random_bool(0.5) {
                        format!("refuse:{step}:{}", rng.random_range(1..30u32))
                    } else {
                        // Answers after the step deadline: outcome unknown, effect applied.
                        format!("delay:{step}:{}", deadline_ms + rng.random_range(500..2_000u64))
                    })
                };
                Action::Kill {
                    target: Target::Participant(role),
                    down: ms(300..5_000, &mut rng),
                    fault,
                }
            }
            35..55 => Action::Kill {
                target: Target::Orchestrator,
                down: ms(300..4_000, &mut rng),
                fault: None,
            },
            55..63 => Action::Kill {
                target: Target::Broker,
                down: ms(2_000..12_000, &mut rng),
                fault: None,
            },
            _ => Action::Pause {
                target: if rng.random_bool(0.7) {
                    Target::Participant(rng.random_range(0..Role::ALL.len()))
                } else {
                    Target::Orchestrator
                },
                length: ms(deadline_ms + 500..deadline_ms + 4_000, &mut rng),
            },
        };
        out.push(Planned { at, action });
    }
    // Every run kills the orchestrator at least once and kills at least three times.
    let is_kill = |p: &Planned| matches!(p.action, Action::Kill { .. });
    if !out.iter().any(|p| {
        matches!(
            p.action,
            Action::Kill {
                target: Target::Orchestrator,
                ..
            }
        )
    }) && let Some(first) = out.first_mut()
    {
        first.action = Action::Kill {
            target: Target::Orchestrator,
            down: Duration::from_secs(1),
            fault: None,
        };
    }
    let mut role = 0;
    while out.iter().filter(|p| is_kill(p)).count() < 3 {
        let Some(pause) = out.iter_mut().find(|p| !is_kill(p)) else {
            break;
        };
        pause.action = Action::Kill {
            target: Target::Participant(role % Role::ALL.len()),
            down: Duration::from_secs(1),
            fault: None,
        };
        role += 1;
    }
    out
}

// ------------------------------------------------------------------------------ processes

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) with a PID we started; no memory is involved.
    #[allow(unsafe_code, reason = "libc::kill; see SAFETY")]
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Whether `pid` is a live process (a zombie counts as gone).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// One saga process (participant or orchestrator), restartable on the same address and data.
struct Node {
    name: String,
    bin: &'static str,
    args: Vec<String>,
    log: PathBuf,
    fault: Option<String>,
    child: Option<Child>,
    paused: bool,
}

impl Node {
    fn start(&mut self) -> anyhow::Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opens {}", self.log.display()))?;
        let mut command = Command::new(bin_path(self.bin));
        command
            .args(&self.args)
            .stdout(Stdio::piped())
            .stderr(log)
            .env("RUST_LOG", "warn");
        if let Some(fault) = &self.fault {
            command.env(saga_participants::faults::ACT_FAULT_ENV, fault);
        }
        let mut child = command.spawn().with_context(|| format!("starts {}", self.name))?;
        let stdout = child.stdout.take().expect("piped");
        let (first_line, line) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = first_line.send(line);
            // Keep the pipe drained for the process's life.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        match line.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.starts_with("listening on ") => {
                self.child = Some(child);
                self.paused = false;
                Ok(())
            }
            other => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{} did not start (first line {other:?}); its log: {}",
                    self.name,
                    self.log.display()
                )
            }
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
    }

    fn pause(&mut self) {
        if let Some(child) = &self.child {
            signal(child.id(), libc::SIGSTOP);
            self.paused = true;
        }
    }

    fn resume(&mut self) {
        if let Some(child) = &self.child {
            signal(child.id(), libc::SIGCONT);
        }
        self.paused = false;
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The run's own name server and broker, through scripts/dev-env; stopped when dropped.
struct Broker {
    script: PathBuf,
    state: PathBuf,
    namesrv_port: u16,
    broker_port: u16,
    started: bool,
}

impl Broker {
    fn dev_env(&self, action: &str) -> anyhow::Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state.with_extension("dev-env.log"))?;
        let status = Command::new(&self.script)
            .arg(action)
            .env("SAGA_MQ_STATE", &self.state)
            .env("SAGA_NAMESRV_PORT", self.namesrv_port.to_string())
            .env("SAGA_BROKER_PORT", self.broker_port.to_string())
            .env("SAGA_MQADMIN", bin_path("saga-mqadmin"))
            .stdout(Stdio::null())
            .stderr(log)
            .status()
            .with_context(|| format!("runs {} {action}", self.script.display()))?;
        if !status.success() {
            bail!(
                "scripts/dev-env {action} failed ({status}); see {}",
                self.state.with_extension("dev-env.log").display()
            );
        }
        Ok(())
    }

    fn namesrv(&self) -> String {
        format!("127.0.0.1:{}", self.namesrv_port)
    }

    fn pids(&self) -> Vec<i32> {
        ["namesrv", "broker"]
            .iter()
            .filter_map(|name| std::fs::read_to_string(self.state.join(format!("{name}.pid"))).ok())
            .filter_map(|pid| pid.trim().parse().ok())
            .collect()
    }

    /// SIGKILL the name server and the broker, and wait until both are gone.
    fn kill(&self) {
        for pid in self.pids() {
            signal(pid as u32, libc::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(10);
            // Not our children (dev-env started them): poll /proc until the PID is gone.
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if self.started {
            let _ = self.dev_env("stop");
        }
    }
}

/// A free port `p` with `p - 2` and `p + 1` free too (the broker's fast and HA ports).
fn broker_port() -> u16 {
    loop {
        let port = free_port();
        if port > 1026
            && [port - 2, port + 1]
                .iter()
                .all(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        {
            return port;
        }
    }
}

// ------------------------------------------------------------------------------ load

#[derive(Default)]
struct Drive {
    next: AtomicU64,
    /// Stop starting new orders.
    stop: AtomicBool,
    /// Stop retrying unanswered starts (the quiescence bound passed).
    give_up: AtomicBool,
    /// Order n -> saga id, for every acknowledged StartOrder.
    acked: Mutex<BTreeMap<u64, String>>,
    unanswered: Mutex<Vec<u64>>,
    violations: Mutex<Vec<String>>,
    seeded: tokio::sync::Mutex<HashSet<u64>>,
}

async fn seed_coupon_block(drive: &Drive, coupon: &str, n: u64) {
    let block = n / COUPON_BLOCK;
    let mut seeded = drive.seeded.lock().await;
    if seeded.contains(&block) {
        return;
    }
    let request = pb::SeedCouponsRequest {
        coupons: (block * COUPON_BLOCK..(block + 1) * COUPON_BLOCK)
            .map(|n| workload::coupon(n, Scenario::Fail20))
            .collect(),
    };
    // Seeding is idempotent: repeat until the coupon participant answers.
    while !drive.give_up.load(Ordering::Relaxed) {
        let client = pb::coupon_service_client::CouponServiceClient::new(lazy_channel(coupon));
        if client.clone().seed_coupons(request.clone()).await.is_ok() {
            seeded.insert(block);
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn lazy_channel(addr: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("a valid address")
        .connect_timeout(Duration::from_secs(2))
        .timeout(START_DEADLINE)
        .connect_lazy()
}

async fn follow(client: &mut pb::orchestrator_client::OrchestratorClient<Channel>, saga_id: &str) {
    let Ok(events) = client
        .watch_saga(pb::WatchSagaRequest {
            saga_id: saga_id.into(),
            from_version: 1,
            status_changes_only: false,
        })
        .await
    else {
        return;
    };
    let mut events = events.into_inner();
    while let Ok(Some(event)) = events.message().await {
        let state = pb::SagaState::try_from(event.state).unwrap_or_default();
        if matches!(
            state,
            pb::SagaState::Completed | pb::SagaState::Compensated | pb::SagaState::Stuck
        ) {
            return;
        }
    }
}

async fn driver(drive: Arc<Drive>, api: String, coupon: String, run: String) {
    // A watch may outlive the unary deadline: its own channel has none.
    let watch_channel = tonic::transport::Endpoint::from_shared(format!("http://{api}"))
        .expect("a valid address")
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy();
    let mut client = pb::orchestrator_client::OrchestratorClient::new(lazy_channel(&api));
    let mut watcher = pb::orchestrator_client::OrchestratorClient::new(watch_channel);
    while !drive.stop.load(Ordering::Relaxed) {
        let n = drive.next.fetch_add(1, Ordering::Relaxed);
        seed_coupon_block(&drive, &coupon, n).await;
        let request = workload::scenario_order(Scenario::Fail20, &run, n);
        let saga_id = loop {
            match client.start_order(request.clone()).await {
                Ok(response) => break response.into_inner().saga.map(|s| s.saga_id),
                Err(status)
                    if matches!(
                        status.code(),
                        tonic::Code::InvalidArgument
                            | tonic::Code::AlreadyExists
                            | tonic::Code::FailedPrecondition
                            | tonic::Code::NotFound
                    ) =>
                {
                    drive
                        .violations
                        .lock()
                        .expect("lock")
                        .push(format!("order {n}: StartOrder refused: {status:?}"));
                    break None;
                }
                // Unavailable, deadline, connection reset: the outcome is unknown; the same
                // request id makes the repeat safe.
                Err(_) if drive.give_up.load(Ordering::Relaxed) => {
                    drive.unanswered.lock().expect("lock").push(n);
                    break None;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        let Some(saga_id) = saga_id else { continue };
        drive.acked.lock().expect("lock").insert(n, saga_id.clone());
        let _ = tokio::time::timeout(FOLLOW_MAX, follow(&mut watcher, &saga_id)).await;
    }
}

// ------------------------------------------------------------------------------ run

struct System {
    broker: Broker,
    participants: Vec<Node>,
    orchestrator: Node,
    addrs: ParticipantAddrs,
    api: String,
}

impl System {
    fn start(work: &Path, acks: &str) -> anyhow::Result<System> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/dev-env");
        let mut broker = Broker {
            script,
            state: work.join("rocketmq"),
            namesrv_port: free_port(),
            broker_port: broker_port(),
            started: false,
        };
        broker.started = true;
        broker.dev_env("start").context("starts the run's broker")?;
        let namesrv = broker.namesrv();
        let mut participants = Vec::new();
        let mut addrs = Vec::new();
        for role in Role::ALL.map(Role::name) {
            let addr = format!("127.0.0.1:{}", free_port());
            let data = work.join(role);
            participants.push(Node {
                name: role.to_owned(),
                bin: "saga-participant",
                args: vec![
                    "--role".into(),
                    role.into(),
                    "--listen".into(),
                    addr.clone(),
                    "--data-dir".into(),
                    data.to_string_lossy().into_owned(),
                    "--rocketmq".into(),
                    namesrv.clone(),
                ],
                log: work.join(format!("{role}.log")),
                fault: None,
                child: None,
                paused: false,
            });
            addrs.push(addr);
        }
        let addrs = ParticipantAddrs {
            order: addrs[0].clone(),
            stock: addrs[1].clone(),
            coupon: addrs[2].clone(),
            balance: addrs[3].clone(),
        };
        let list = format!(
            "order={},stock={},coupon={},balance={}",
            addrs.order, addrs.stock, addrs.coupon, addrs.balance
        );
        let api = format!("127.0.0.1:{}", free_port());
        let orchestrator = Node {
            name: "orchestrator".into(),
            bin: "saga-orchestrator",
            args: vec![
                "serve".into(),
                "--listen".into(),
                api.clone(),
                "--data-dir".into(),
                work.join("orchestrator").to_string_lossy().into_owned(),
                "--participants".into(),
                list,
                "--rocketmq".into(),
                namesrv,
            ]
            .into_iter()
            .chain(
                (acks == "grpc")
                    .then(|| ["--ack-endpoint".to_owned(), "listen".to_owned()])
                    .into_iter()
                    .flatten(),
            )
            .collect(),
            log: work.join("orchestrator.log"),
            fault: None,
            child: None,
            paused: false,
        };
        let mut system = System {
            broker,
            participants,
            orchestrator,
            addrs,
            api,
        };
        for node in &mut system.participants {
            node.start()?;
        }
        system.orchestrator.start()?;
        Ok(system)
    }

    fn node(&mut self, target: Target) -> Option<&mut Node> {
        match target {
            Target::Participant(i) => Some(&mut self.participants[i]),
            Target::Orchestrator => Some(&mut self.orchestrator),
            Target::Broker => None,
        }
    }

    /// Carries out one planned action (blocking for its length).
    async fn act(&mut self, action: &Action) -> anyhow::Result<()> {
        match action {
            Action::Kill {
                target: Target::Broker,
                down,
                ..
            } => {
                self.broker.kill();
                tokio::time::sleep(*down).await;
                self.broker.dev_env("resume").context("restarts the broker")?;
            }
            Action::Kill { target, down, fault } => {
                let node = self.node(*target).expect("a process");
                node.kill();
                tokio::time::sleep(*down).await;
                node.fault = fault.clone();
                node.start()?;
            }
            Action::Pause { target, length } => {
                let node = self.node(*target).expect("a process");
                node.pause();
                tokio::time::sleep(*length).await;
                node.resume();
            }
        }
        Ok(())
    }

    /// Ends every injected fault: paused processes continue, faulted participants restart
    /// without their fault.
    fn heal(&mut self) -> anyhow::Result<()> {
        for node in self
            .participants
            .iter_mut()
            .chain(std::iter::once(&mut self.orchestrator))
        {
            if node.paused {
                node.resume();
            }
            if node.fault.is_some() {
                node.kill();
                node.fault = None;
                node.start()?;
            }
        }
        Ok(())
    }

    fn stop_processes(&mut self) {
        self.orchestrator.kill();
        for node in &mut self.participants {
            node.kill();
        }
    }
}

struct Outcome {
    sagas: usize,
    kills: usize,
    pauses: usize,
    violations: Vec<String>,
    notes: Vec<String>,
}

async fn list_all(
    client: &mut pb::orchestrator_client::OrchestratorClient<Channel>,
) -> anyhow::Result<Vec<pb::Saga>> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_sagas(pb::ListSagasRequest {
                state: 0,
                page_size: saga_orchestrator::api::PAGE_SIZE_MAX,
                page_token: token,
            })
            .await?
            .into_inner();
        out.extend(page.sagas);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        token = page.next_page_token;
    }
}

async fn count_in(
    client: &mut pb::orchestrator_client::OrchestratorClient<Channel>,
    state: pb::SagaState,
) -> anyhow::Result<Vec<String>> {
    Ok(client
        .list_sagas(pb::ListSagasRequest {
            state: state as i32,
            page_size: 10,
            page_token: String::new(),
        })
        .await?
        .into_inner()
        .sagas
        .into_iter()
        .map(|s| s.saga_id)
        .collect())
}

async fn run(args: &Args, seed: u64, work: &Path) -> anyhow::Result<Outcome> {
    let duration = Duration::from_secs(args.duration);
    let schedule = plan(seed, duration);
    let mut system = System::start(work, &args.acks)?;
    workload::seed(&system.addrs, 0..COUPON_BLOCK, Scenario::Fail20)
        .await
        .context("seeds stock, balances and the first coupons")?;
    let drive = Arc::new(Drive::default());
    drive.seeded.lock().await.insert(0);
    let run_name = format!("chaos{seed}");
    let drivers: Vec<_> = (0..args.concurrency.max(1))
        .map(|_| {
            tokio::spawn(driver(
                drive.clone(),
                system.api.clone(),
                system.addrs.coupon.clone(),
                run_name.clone(),
            ))
        })
        .collect();

    let began = Instant::now();
    let (mut kills, mut pauses) = (0, 0);
    for planned in &schedule {
        if began.elapsed() >= duration {
            break;
        }
        if let Some(wait) = planned.at.checked_sub(began.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        eprintln!(
            "chaos: t={:.1}s {:?}",
            began.elapsed().as_secs_f64(),
            planned.action
        );
        system.act(&planned.action).await?;
        match planned.action {
            Action::Kill { .. } => kills += 1,
            Action::Pause { .. } => pauses += 1,
        }
    }
    if let Some(rest) = duration.checked_sub(began.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    drive.stop.store(true, Ordering::Relaxed);
    system.heal()?;
    eprintln!(
        "chaos: injection over after {:.1}s ({kills} kills, {pauses} pauses); waiting for every saga to be final",
        began.elapsed().as_secs_f64()
    );

    // Quiescence: drivers finish their starts, then no saga is running or compensating.
    let mut violations: Vec<String> = Vec::new();
    let quiesce_deadline = Instant::now() + Duration::from_secs(args.quiesce_max_s);
    let give_up = {
        let drive = drive.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(quiesce_deadline.into()).await;
            drive.give_up.store(true, Ordering::Relaxed);
        })
    };
    for task in drivers {
        task.await.context("driver task")?;
    }
    let mut client = pb::orchestrator_client::OrchestratorClient::new(lazy_channel(&system.api));
    let quiet_began = Instant::now();
    loop {
        let busy = match (
            count_in(&mut client, pb::SagaState::Running).await,
            count_in(&mut client, pb::SagaState::Compensating).await,
        ) {
            (Ok(running), Ok(compensating)) => [running, compensating].concat(),
            _ => vec!["(orchestrator not answering)".into()],
        };
        if busy.is_empty() {
            break;
        }
        if Instant::now() >= quiesce_deadline {
            violations.push(format!(
                "not final {}s after injection stopped: {}",
                args.quiesce_max_s,
                busy.join(", ")
            ));
            break;
        }
        // Polling another process's state: nothing to await locally.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    give_up.abort();
    let mut notes = vec![format!(
        "quiescent {:.1}s after injection stopped",
        quiet_began.elapsed().as_secs_f64()
    )];
    violations.extend(drive.violations.lock().expect("lock").drain(..));
    for n in drive.unanswered.lock().expect("lock").iter() {
        violations.push(format!("order {n}: StartOrder never answered"));
    }

    // The API's view.
    let sagas = list_all(&mut client).await.context("lists every saga")?;
    let by_id: HashMap<&str, &pb::Saga> = sagas.iter().map(|s| (s.saga_id.as_str(), s)).collect();
    let acked = drive.acked.lock().expect("lock").clone();
    let mut results = Vec::new();
    for (n, saga_id) in &acked {
        let request = workload::scenario_order(Scenario::Fail20, &run_name, *n);
        match by_id.get(saga_id.as_str()) {
            None => violations.push(format!("order {n}: acknowledged saga {saga_id} does not exist")),
            Some(saga) if saga.request_id != request.request_id => violations.push(format!(
                "order {n}: saga {saga_id} has request id {}, not {}",
                saga.request_id, request.request_id
            )),
            Some(saga) => results.push(OrderResult {
                n: *n,
                saga_id: saga_id.clone(),
                user: request.user_id.clone(),
                amount_minor: request.amount_minor,
                state: pb::SagaState::try_from(saga.state).unwrap_or_default(),
                latency: Duration::ZERO,
            }),
        }
    }
    let acked_ids: HashSet<&str> = acked.values().map(String::as_str).collect();
    for saga in &sagas {
        if !acked_ids.contains(saga.saga_id.as_str()) {
            violations.push(format!(
                "saga {} (request {}) had no acknowledged start",
                saga.saga_id, saga.request_id
            ));
        }
        let state = pb::SagaState::try_from(saga.state).unwrap_or_default();
        if !matches!(state, pb::SagaState::Completed | pb::SagaState::Compensated) {
            violations.push(format!("saga {} ended {state:?}", saga.saga_id));
        }
    }
    let completed = results
        .iter()
        .filter(|r| r.state == pb::SagaState::Completed)
        .count();
    notes.push(format!(
        "{} sagas: {completed} completed, {} compensated",
        sagas.len(),
        results
            .iter()
            .filter(|r| r.state == pb::SagaState::Compensated)
            .count()
    ));
    match workload::check_conservation(&system.addrs, &results).await {
        Ok(problems) => violations.extend(problems),
        Err(error) => violations.push(format!("conservation check failed to run: {error:#}")),
    }

    // The logs, offline: stop the processes (their data is durable) and read every data dir.
    system.stop_processes();
    let (log_violations, log_notes) = check_logs(work, &sagas)?;
    violations.extend(log_violations);
    notes.extend(log_notes);
    drop(system);
    Ok(Outcome {
        sagas: sagas.len(),
        kills,
        pauses,
        violations,
        notes,
    })
}

/// Per step stream `step/<saga>/<step>`: (effects or refusals, compensations).
type StepCounts = HashMap<String, (u32, u32, bool)>;

fn check_logs(work: &Path, sagas: &[pb::Saga]) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let mut violations = Vec::new();
    let mut notes = Vec::new();
    // Every log verifies.
    for name in ["orchestrator", "order", "stock", "coupon", "balance"] {
        let dir = work.join(name);
        let log = AuditLog::open(&dir).with_context(|| format!("opens {}", dir.display()))?;
        let report = if name == "orchestrator" {
            log.verify(Some(&saga_orchestrator::projector::SagaProjector))
        } else {
            log.verify(Some(&saga_participants::projector::ParticipantProjector))
        }
        .with_context(|| format!("verifies {}", dir.display()))?;
        for finding in &report.findings {
            violations.push(format!("{name} log: {finding}"));
        }
        notes.push(format!(
            "{name} log verified: {} records, {} streams, {} projection keys",
            report.records, report.streams, report.projection_keys
        ));
    }

    // The orchestrator's log folds to what its API reported.
    let log = AuditLog::open(&work.join("orchestrator"))?;
    let mut streams: HashMap<String, Vec<(SagaEvent, i64)>> = HashMap::new();
    for record in log.records(Position::FIRST) {
        let record = record?;
        if record.stream() == saga_storage::LOG_STREAM {
            continue;
        }
        streams
            .entry(record.stream().to_owned())
            .or_default()
            .push((record.decode::<SagaEvent>()?, record.timestamp_us()));
    }
    drop(log);
    for saga in sagas {
        let folded = streams
            .remove(&saga.saga_id)
            .map(|events| SagaState::fold(&saga.saga_id, events));
        match folded {
            Some(Ok(Some(state))) => {
                let replayed = saga_orchestrator::api::saga_to_proto(&state);
                if &replayed != saga {
                    violations.push(format!(
                        "saga {}: the log replays to {replayed:?}, the API said {saga:?}",
                        saga.saga_id
                    ));
                }
            }
            other => violations.push(format!("saga {}: its log does not fold: {other:?}", saga.saga_id)),
        }
    }
    for extra in streams.keys() {
        violations.push(format!("saga {extra} is in the log but the API did not list it"));
    }

    // Participants: each action and each compensation took effect at most once per step.
    let mut steps: StepCounts = HashMap::new();
    let mut duplicates = 0u64;
    for role in Role::ALL.map(Role::name) {
        let log = AuditLog::open(&work.join(role))?;
        for record in log.records(Position::FIRST) {
            let record = record?;
            let stream = record.stream();
            let event: ParticipantEvent = match record.decode() {
                Ok(event) => event,
                Err(_) if stream == saga_storage::LOG_STREAM => continue,
                Err(error) => {
                    violations.push(format!("{role} log: position {}: {error}", record.position()));
                    continue;
                }
            };
            if matches!(
                event,
                ParticipantEvent::Consumer(ConsumerEvent::DuplicateAcknowledged { .. })
            ) {
                duplicates += 1;
            }
            if !stream.starts_with("step/") {
                continue;
            }
            let entry = steps.entry(stream.to_owned()).or_default();
            let refused = matches!(event, ParticipantEvent::Step(StepEvent::ActionRefused { .. }));
            if event.is_action() || refused {
                entry.0 += 1;
                entry.2 |= !refused;
            }
            if event.is_compensation() {
                entry.1 += 1;
            }
        }
    }
    notes.push(format!(
        "{duplicates} duplicate compensation deliveries acknowledged again"
    ));
    for (stream, (outcomes, compensations, _)) in &steps {
        if *outcomes > 1 {
            violations.push(format!("{stream}: the action was recorded {outcomes} times"));
        }
        if *compensations > 1 {
            violations.push(format!("{stream}: compensated {compensations} times"));
        }
    }
    for saga in sagas {
        let state = pb::SagaState::try_from(saga.state).unwrap_or_default();
        for step in &saga.steps {
            let stream = saga_participants::keys::step_stream(&saga.saga_id, &step.name);
            let (_, compensations, applied) = steps.get(&stream).copied().unwrap_or_default();
            let step_state = pb::StepState::try_from(step.state).unwrap_or_default();
            let role = role_of(&step.name);
            if step_state == pb::StepState::Compensated && compensations != 1 {
                violations.push(format!(
                    "saga {} compensated step {} but the {role} log has {compensations} compensation records",
                    saga.saga_id, step.name
                ));
            }
            if state == pb::SagaState::Completed && (!applied || compensations != 0) {
                violations.push(format!(
                    "saga {} completed but step {} in the {role} log: applied {applied}, compensations {compensations}",
                    saga.saga_id, step.name
                ));
            }
        }
    }
    Ok((violations, notes))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    println!(
        "chaos: seed={seed} duration_s={} concurrency={} acks={} (replay: saga-chaos --seed {seed} --duration {} --acks {})",
        args.duration, args.concurrency, args.acks, args.duration, args.acks
    );
    let work = match tempfile::Builder::new().prefix("saga-chaos-").tempdir() {
        Ok(dir) => dir,
        Err(error) => {
            eprintln!("saga-chaos: cannot create a work dir: {error}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    // An interrupt drops the run, and with it every process it started (Node and Broker stop
    // theirs when dropped).
    let outcome = runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            outcome = run(&args, seed, work.path()) => outcome,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted (SIGINT)")),
            _ = term.recv() => Err(anyhow::anyhow!("interrupted (SIGTERM)")),
        }
    });
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(error) => Outcome {
            sagas: 0,
            kills: 0,
            pauses: 0,
            violations: vec![format!("the run itself failed: {error:#}")],
            notes: Vec::new(),
        },
    };
    for note in &outcome.notes {
        println!("chaos: {note}");
    }
    let violations = outcome.violations.len();
    if violations > 0 || args.keep {
        let kept = work.keep();
        if violations > 0 {
            println!("chaos: {violations} violations (seed {seed}); the first ones:");
            for violation in outcome.violations.iter().take(50) {
                println!("  {violation}");
            }
            println!(
                "chaos: replay with: saga-chaos --seed {seed} --duration {}",
                args.duration
            );
        }
        println!(
            "chaos: logs kept in {}: data dirs orchestrator/ order/ stock/ coupon/ balance/ (sagactl audit), process logs *.log, broker rocketmq/",
            kept.display()
        );
    }
    println!(
        "chaos seed={seed} duration_s={} sagas={} kills={} pauses={} violations={violations}",
        args.duration, outcome.sagas, outcome.kills, outcome.pauses
    );
    if violations > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kills(plan: &[Planned]) -> (usize, usize) {
        let kills = plan
            .iter()
            .filter(|p| matches!(p.action, Action::Kill { .. }))
            .count();
        let orchestrator = plan
            .iter()
            .filter(|p| {
                matches!(
                    p.action,
                    Action::Kill {
                        target: Target::Orchestrator,
                        ..
                    }
                )
            })
            .count();
        (kills, orchestrator)
    }

    #[test]
    fn the_schedule_is_a_function_of_the_seed_and_kills_enough() {
        for seed in 0..200 {
            let a = plan(seed, Duration::from_secs(60));
            let b = plan(seed, Duration::from_secs(60));
            assert_eq!(format!("{a:?}"), format!("{b:?}"), "seed {seed} replays");
            let (kills, orchestrator) = kills(&a);
            assert!(kills >= 3 && orchestrator >= 1, "seed {seed}: {a:?}");
            assert!(a.windows(2).all(|w| w[0].at < w[1].at));
            assert!(a.last().unwrap().at < Duration::from_secs(57));
        }
        assert_ne!(
            format!("{:?}", plan(1, Duration::from_secs(60))),
            format!("{:?}", plan(2, Duration::from_secs(60)))
        );
    }

    #[test]
    fn faults_only_touch_compensable_steps() {
        for seed in 0..200 {
            for planned in plan(seed, Duration::from_secs(120)) {
                if let Action::Kill {
                    fault: Some(fault), ..
                } = planned.action
                {
                    assert!(!fault.contains("confirm_order"), "{fault}");
                }
            }
        }
    }
}

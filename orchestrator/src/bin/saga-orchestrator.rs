//! `saga-orchestrator`: the saga orchestrator as a process.
//!
//! ```text
//! saga-orchestrator serve --listen 127.0.0.1:50051 --data-dir DIR --rocketmq 127.0.0.1:9876 \
//!     --participants order=HOST:PORT,stock=HOST:PORT,coupon=HOST:PORT,balance=HOST:PORT
//! saga-orchestrator dev [--orders N] [--concurrency C] [--listen ADDR] [--data-dir DIR]
//! ```
//!
//! Every option of `serve` and `dev` is also read from `SAGA_<OPTION>` and from a TOML file
//! given with `--config` (flag > environment > file > default; see `saga_proto::config` and
//! `config/orchestrator.toml`).
//!
//! `serve` prints `listening on ADDR` once it accepts calls; SIGTERM or Ctrl-C stops it in
//! order (see `run_serve`) and it exits 0. `dev` is the all-in-one embedded default (see
//! `saga_orchestrator::dev`).

// RocketMQ client futures: see the "Recursion limit" note in saga_messaging::rocketmq.
#![recursion_limit = "256"]

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use saga_messaging::rocketmq::{RocketMqConfig, RocketMqTransport};
use saga_messaging::topics;
use saga_orchestrator::engine::EngineConfig;
use saga_orchestrator::node::{Node, NodeConfig, NodeError};
use saga_orchestrator::order::{OrderTiming, ParticipantAddrs};

#[derive(Parser)]
#[command(about = "The event-sourced saga orchestrator")]
struct Args {
    /// Log lines as text or JSON objects (levels from RUST_LOG); every line about a saga
    /// carries its trace id.
    #[arg(long, global = true, value_enum, default_value_t)]
    log_format: saga_proto::trace::LogFormat,
    /// Export spans over OTLP/gRPC to this collector, `http://host:port` (off unless given);
    /// the exporter's OTEL_* variables (OTEL_BSP_SCHEDULE_DELAY, ...) apply.
    #[arg(long, global = true)]
    otlp_endpoint: Option<String>,
    /// Tokio worker threads of the process [default: 1 for serve, 2 for dev]. The event
    /// log's writer and flusher threads are its own, so one worker serves `serve` on a small
    /// machine with fewer hand-offs (BENCHMARKS.md); give more where cores are many.
    #[arg(long, global = true)]
    worker_threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the orchestrator against participant processes and a RocketMQ broker.
    Serve(Box<Serve>),
    /// Run everything in one process with the embedded transport (no broker needed).
    Dev(DevArgs),
}

#[derive(clap::Args)]
struct Serve {
    /// Address of the gRPC API (port 0 picks one; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: String,
    /// Directory of the orchestrator's event log.
    #[arg(long)]
    data_dir: PathBuf,
    /// Serve a log that lost acknowledged records (it ends before its durable mark) instead of
    /// refusing to start; the decision is recorded in the log. Only after reading the refusal.
    #[arg(long)]
    accept_lost_tail: bool,
    /// order=HOST:PORT,stock=HOST:PORT,coupon=HOST:PORT,balance=HOST:PORT
    #[arg(long)]
    participants: String,
    /// RocketMQ name server (HOST:PORT).
    #[arg(long)]
    rocketmq: String,
    /// Topic compensations are published to.
    #[arg(long, default_value = topics::COMPENSATION_TOPIC)]
    compensation_topic: String,
    /// Topic acknowledgements are consumed from.
    #[arg(long, default_value = topics::COMPENSATION_ACK_TOPIC)]
    ack_topic: String,
    /// This orchestrator's id: compensation requests ask participants to acknowledge with it
    /// as the tag, so each orchestrator sharing a broker receives exactly its own acks. Keep it
    /// stable across restarts of the same data directory.
    #[arg(long, default_value = saga_orchestrator::engine::NODE_ID_DEFAULT)]
    node_id: String,
    /// Consumer group on the acknowledgement topic (default `saga-orchestrator-<node id>`).
    #[arg(long)]
    ack_group: Option<String>,
    /// This orchestrator's gRPC address as participants reach it (`http://HOST:PORT`,
    /// `https://` with TLS, or
    /// `listen` for the address it listens on): compensation requests name it, and
    /// participants acknowledge there (AcknowledgeCompensations) instead of through the
    /// acknowledgement topic, which saves a broker message per compensation. Unset: through
    /// the topic. The topic is consumed either way (participants of older versions use it, and
    /// participants fall back to it when this address does not answer). Give an address that
    /// reaches this orchestrator itself, not a load balancer in front of several: another
    /// node refuses the acks (their tokens are this node's) and they go through the topic.
    /// With TLS (`--tls-cert`) it is an `https://` address, and participants need
    /// `--orchestrator-tls-ca` to call it.
    #[arg(long)]
    ack_endpoint: Option<String>,
    /// sled's page cache for the event log, in MiB.
    #[arg(long, env = "SAGA_CACHE_MB", default_value_t = saga_storage::LogConfig::CACHE_MB_DEFAULT, value_parser = clap::value_parser!(u64).range(1..))]
    cache_mb: u64,
    /// How long a compensation's acknowledgement may take before it is re-published (doubled
    /// after each re-publish, up to 8 times this).
    #[arg(long, default_value_t = EngineConfig::default().compensation_ack_deadline_ms)]
    compensation_ack_deadline_ms: u64,
    /// Re-publishes of an unacknowledged compensation before its saga is marked STUCK.
    #[arg(long, default_value_t = EngineConfig::default().compensation_republishes_max)]
    compensation_republishes_max: u32,
    #[command(flatten)]
    timing: Timing,
    /// Serve Prometheus metrics over HTTP on this address (off unless given).
    #[arg(long, env = "SAGA_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// File holding the bearer token admin RPCs (ReplayEvents, RetrySaga, AbortSaga) require;
    /// else the SAGA_ADMIN_TOKEN environment variable; with neither they are open.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    #[command(flatten)]
    tls: saga_proto::tls::ServerTlsArgs,
    /// Call the participants over TLS, verifying them against this CA (PEM).
    #[arg(long)]
    participant_tls_ca: Option<PathBuf>,
    /// Present this certificate (PEM) to the participants (mutual TLS; with
    /// --participant-tls-key and --participant-tls-ca).
    #[arg(long)]
    participant_tls_cert: Option<PathBuf>,
    /// The private key of --participant-tls-cert (PEM).
    #[arg(long)]
    participant_tls_key: Option<PathBuf>,
    /// On SIGTERM: how long step calls in flight may take to finish (new sagas are refused
    /// from the signal on); what is left resumes at the next start.
    #[arg(long, default_value_t = 10_000)]
    shutdown_grace_ms: u64,
    /// On SIGTERM, after the grace period: how long the outbox may take to be relayed.
    #[arg(long, default_value_t = 5_000)]
    shutdown_relay_ms: u64,
}

#[derive(clap::Args)]
struct Timing {
    /// Deadline of one participant call; past it the step's outcome is unknown.
    #[arg(long, default_value_t = 2000)]
    step_deadline_ms: u64,
    /// Attempts of a step against transient errors.
    #[arg(long, default_value_t = 8)]
    step_attempts: u32,
}

impl Timing {
    fn order_timing(&self) -> OrderTiming {
        OrderTiming {
            step_deadline_ms: self.step_deadline_ms,
            attempts_max: self.step_attempts.max(1),
            ..OrderTiming::default()
        }
    }
}

#[derive(clap::Args)]
struct DevArgs {
    /// Run this many orders (order n as shared/BENCH.md defines it), print a summary and exit.
    /// Without it the system stays up for clients (sagactl).
    #[arg(long)]
    orders: Option<u64>,
    /// Orders in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Address of the gRPC API.
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: String,
    /// Data directory (default: a new temporary one, removed at exit). With `--orders` it must
    /// be new or empty, since the run's checks count from the seeded state.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Coupons to seed when no `--orders` is given (coupon n belongs to order n).
    #[arg(long, default_value_t = 10_000)]
    coupons: u64,
}

fn main() -> anyhow::Result<()> {
    // Before any thread: sled's I/O buffers in mappings of their own (see the function).
    saga_storage::heap::keep_large_buffers_out_of_the_heap();
    let (args, sources) = saga_proto::config::parse::<Args>(&["serve", "dev"]);
    // `dev` runs the participants and the embedded queue in this process too.
    let default_workers = match args.command {
        Command::Serve(_) => 1,
        Command::Dev(_) => 2,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.worker_threads.unwrap_or(default_workers).max(1))
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let telemetry = saga_proto::trace::init_service_logging(
        &runtime,
        "warn,saga_orchestrator=info,saga_trace=info",
        args.log_format,
        args.otlp_endpoint,
        "saga-orchestrator",
        &sources,
    )
    .map_err(anyhow::Error::msg)?;
    match args.command {
        Command::Serve(serve) => {
            let served = runtime.block_on(run_serve(*serve, &sources));
            telemetry.shutdown();
            served
        }
        Command::Dev(dev) => {
            let outcome = runtime.block_on(run_dev(dev));
            telemetry.shutdown();
            let outcome = outcome?;
            // Background tasks (consumers, drivers) are not waited for.
            runtime.shutdown_timeout(Duration::from_secs(1));
            match outcome {
                DevOutcome::Correct => Ok(()),
                DevOutcome::Incorrect => std::process::exit(1),
                // The conventional status of a process ended by SIGINT (128 + 2).
                DevOutcome::Interrupted => std::process::exit(130),
            }
        }
    }
}

async fn run_serve(args: Serve, sources: &saga_proto::config::Sources) -> anyhow::Result<()> {
    // Installed first: from here on SIGTERM / Ctrl-C stop the process in order.
    let stop = saga_proto::server::shutdown_signal();
    tokio::pin!(stop);
    let participants = ParticipantAddrs::parse(&args.participants)
        .map_err(|e| anyhow::anyhow!("{}: {e}", sources.name("participants")))?;
    let admin_token =
        saga_proto::server::start_operability(args.metrics_listen, args.admin_token_file.as_deref(), &|id| {
            sources.name(id)
        })
        .map_err(anyhow::Error::msg)?;
    if !admin_token.is_required() {
        tracing::warn!("admin RPCs are open: no --admin-token-file or SAGA_ADMIN_TOKEN given");
    }
    let name = |id: &str| sources.name(id);
    let server_tls = args.tls.load(&name).map_err(anyhow::Error::msg)?;
    let participant_tls = saga_proto::tls::client_config(
        args.participant_tls_ca.as_deref(),
        args.participant_tls_cert.as_deref(),
        args.participant_tls_key.as_deref(),
        "participant_tls_",
        &name,
    )
    .map_err(anyhow::Error::msg)?;
    let mut log = saga_storage::LogConfig::new(&args.data_dir);
    log.accept_lost_tail = args.accept_lost_tail;
    log.cache_capacity_bytes = args.cache_mb.saturating_mul(1024 * 1024);
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("{}: cannot bind {}", sources.name("listen"), args.listen))?;
    let addr = listener.local_addr()?;
    let ack_endpoint = match args.ack_endpoint.as_deref() {
        None => None,
        Some(endpoint) => {
            let url = ack_endpoint(endpoint, addr, server_tls.is_some())
                .map_err(|why| anyhow::anyhow!("{}: {why}", sources.name("ack_endpoint")))?;
            let key = saga_orchestrator::ack_key::AckKey::load_or_create(&args.data_dir)
                .with_context(|| format!("{}: the acknowledgement key", sources.name("data_dir")))?;
            Some(saga_orchestrator::engine::AckEndpoint { url, key })
        }
    };
    let config = RocketMqConfig {
        thread_name: "saga-orchestrator-mq".into(),
        ..RocketMqConfig::new(args.rocketmq.clone())
    };
    let transport = Arc::new(
        RocketMqTransport::start(config, "saga-orchestrator")
            .await
            .with_context(|| format!("{}: cannot start the RocketMQ client", sources.name("rocketmq")))?,
    );
    let mut node = Node::open(
        NodeConfig {
            log,
            participants,
            timing: args.timing.order_timing(),
            engine: EngineConfig {
                compensation_topic: args.compensation_topic.clone(),
                ack_topic: args.ack_topic.clone(),
                node_id: args.node_id.clone(),
                ack_endpoint,
                compensation_ack_deadline_ms: args.compensation_ack_deadline_ms,
                compensation_republishes_max: args.compensation_republishes_max,
                ..EngineConfig::default()
            },
            ack_group: args.ack_group.clone(),
            admin_token,
            participant_tls,
        },
        transport.clone(),
    )
    .await
    .map_err(|e| match e {
        NodeError::Log(_) => anyhow::Error::new(e).context(format!(
            "{}: cannot open the event log in {}",
            sources.name("data_dir"),
            args.data_dir.display()
        )),
        other => other.into(),
    })?;
    // Serve while recovery runs: health answers NOT_SERVING and the API UNAVAILABLE until it
    // is done; `listening on` is printed once the API answers.
    let (stop_serving, serving_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(saga_proto::server::serve_tls(
        node.routes.clone(),
        listener,
        server_tls,
        async {
            let _ = serving_stopped.await;
        },
    ));
    // A signal during recovery stops the process then (what recovery did not reach is still
    // durable and resumes at the next start), not after recovery.
    let recovered: anyhow::Result<bool> = tokio::select! {
        recovered = node.recover() => recovered.map(|_| true).map_err(Into::into),
        _ = &mut server => Err(anyhow::anyhow!("the gRPC server stopped during recovery")),
        _ = &mut stop => Ok(false),
    };
    match recovered {
        Ok(true) => {}
        Ok(false) => {
            tracing::info!("stopped during recovery");
            let _ = stop_serving.send(());
            server.abort();
            transport.shutdown().await;
            return Ok(());
        }
        Err(error) => {
            transport.shutdown().await;
            return Err(error);
        }
    }
    println!("listening on {addr}");
    std::io::stdout().flush()?;
    tracing::info!(%addr, resumed = node.resumed, "orchestrator started");
    tokio::select! {
        _ = &mut stop => {}
        served = &mut server => {
            transport.shutdown().await;
            served.context("gRPC server task")?.context("gRPC server")?;
            anyhow::bail!("the gRPC server stopped");
        }
    }
    // In order: refuse new sagas and let step calls in flight finish (the server still
    // answers reads and tells new StartOrder calls UNAVAILABLE), stop serving, stop the
    // acknowledgements, relay the outbox. A kill at any point of this loses nothing (every
    // decision is durable when made); it only leaves more for the next start.
    // A second SIGTERM or Ctrl-C ends the process at once (status 130).
    tracing::info!(
        grace_ms = args.shutdown_grace_ms,
        "stopping: new sagas are refused, step calls in flight finish (a second signal stops at once)"
    );
    let again = saga_proto::server::shutdown_signal();
    let stopping = async {
        let drained = node.drain(Duration::from_millis(args.shutdown_grace_ms)).await;
        let _ = stop_serving.send(());
        // Open streams (WatchSaga) hold a graceful server stop: they get a moment, then are cut.
        if tokio::time::timeout(SERVER_STOP_WAIT, &mut server).await.is_err() {
            server.abort();
        }
        let stopped = node
            .shutdown(drained, Duration::from_millis(args.shutdown_relay_ms))
            .await;
        transport.shutdown().await;
        stopped
    };
    tokio::select! {
        stopped = stopping => {
            tracing::info!(drained = stopped.drained, outbox_relayed = stopped.outbox_empty, "orchestrator stopped");
            Ok(())
        }
        _ = again => {
            tracing::warn!("second signal: stopping at once; what was left resumes at the next start");
            std::process::exit(130);
        }
    }
}

/// How long open streams may hold the server's stop.
const SERVER_STOP_WAIT: Duration = Duration::from_secs(2);

/// How a `dev` run ended.
enum DevOutcome {
    Correct,
    Incorrect,
    /// SIGTERM or Ctrl-C during `--orders`: the system was stopped and a temporary data dir
    /// removed.
    Interrupted,
}

/// The address compensation requests name for acknowledgements (`--ack-endpoint`): `listen`
/// is the bound address; `https://` when the API serves TLS, `http://` otherwise.
fn ack_endpoint(endpoint: &str, listening: std::net::SocketAddr, tls: bool) -> Result<String, String> {
    let scheme = if tls { "https" } else { "http" };
    if endpoint == "listen" {
        if listening.ip().is_unspecified() {
            return Err(format!(
                "`listen` needs a specific address, not {listening}: give {scheme}://HOST:PORT"
            ));
        }
        return Ok(format!("{scheme}://{listening}"));
    }
    let expected =
        || format!("{endpoint:?}: expected {scheme}://HOST:PORT (the API serves {scheme}) or `listen`");
    saga_proto::endpoint_authority(endpoint, &[scheme]).ok_or_else(expected)?;
    Ok(endpoint.to_owned())
}

async fn run_dev(args: DevArgs) -> anyhow::Result<DevOutcome> {
    use saga_orchestrator::{dev, workload};
    if let (Some(dir), Some(_)) = (&args.data_dir, args.orders)
        && std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some())
    {
        anyhow::bail!(
            "--data-dir {} is not empty; --orders needs a fresh one (or none, for a temporary one)",
            dir.display()
        );
    }
    // Listen for Ctrl-C / SIGTERM from the start, so that the process is never ended by the
    // default action and a temporary data dir is always removed.
    let mut stop = tokio::spawn(saga_proto::server::shutdown_signal());
    let (data_dir, _temp) = dev::data_dir(args.data_dir.clone())?;
    let coupons = args.orders.unwrap_or(args.coupons);
    // Start-up (which seeds the data: a while for many orders) stops on a signal too; what it
    // started is dropped with it.
    let system = tokio::select! {
        system = dev::Dev::start(&data_dir, &args.listen, coupons, dev::DevOptions::default()) => system?,
        _ = &mut stop => {
            eprintln!("interrupted");
            return Ok(DevOutcome::Interrupted);
        }
    };
    let api = system.api_addr.to_string();
    let Some(orders) = args.orders else {
        println!("listening on {api}");
        println!(
            "participants: order {} stock {} coupon {} balance {}; data in {}",
            system.participants.order,
            system.participants.stock,
            system.participants.coupon,
            system.participants.balance,
            data_dir.display()
        );
        std::io::stdout().flush()?;
        let _ = stop.await;
        system.shutdown().await;
        return Ok(DevOutcome::Correct);
    };

    let bar = indicatif::ProgressBar::new(orders);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} sagas {per_sec} eta {eta}")
            .expect("valid template"),
    );
    let began = Instant::now();
    let ticker = bar.clone();
    let run = workload::run_orders(
        &api,
        workload::Scenario::Fail20,
        "dev",
        0..orders,
        args.concurrency,
        move || ticker.inc(1),
    );
    // Ctrl-C or SIGTERM stops the run: the system shuts down and a temporary data dir is
    // removed when `_temp` drops at the end of this function.
    let results = tokio::select! {
        results = run => results?,
        _ = &mut stop => {
            bar.finish_and_clear();
            system.shutdown().await;
            eprintln!("interrupted");
            return Ok(DevOutcome::Interrupted);
        }
    };
    let elapsed = began.elapsed();
    bar.finish_and_clear();
    let problems = workload::check_conservation(&system.participants, &results).await?;
    system.shutdown().await;

    let mut latencies: Vec<Duration> = results.iter().map(|r| r.latency).collect();
    latencies.sort_unstable();
    let count = |state| results.iter().filter(|r| r.state == state).count();
    let completed = count(saga_proto::v1::SagaState::Completed);
    let compensated = count(saga_proto::v1::SagaState::Compensated);
    let stuck = results.len() - completed - compensated;
    for problem in &problems {
        println!("check failed: {problem}");
    }
    println!(
        "elapsed {:.2} s, {:.1} sagas/s at {} in flight, saga latency p50 {:.1} ms p99 {:.1} ms",
        elapsed.as_secs_f64(),
        results.len() as f64 / elapsed.as_secs_f64(),
        args.concurrency,
        workload::percentile_ms(&latencies, 50.0),
        workload::percentile_ms(&latencies, 99.0),
    );
    let correct = problems.is_empty() && results.len() as u64 == orders;
    println!(
        "orders={orders} completed={completed} compensated={compensated} stuck={stuck} correct={}",
        if correct { "yes" } else { "no" }
    );
    std::io::stdout().flush()?;
    Ok(if correct {
        DevOutcome::Correct
    } else {
        DevOutcome::Incorrect
    })
}

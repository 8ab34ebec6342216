//! `saga-participant`: one participant role as a process.
//!
//! ```text
//! saga-participant --role order|stock|coupon|balance --listen 127.0.0.1:PORT --data-dir DIR
//!                  [--rocketmq 127.0.0.1:9876 [--group G] [--compensation-topic T] [--ack-topic T]]
//! ```
//!
//! With `--rocketmq`, the role's compensation consumer runs (consumer group
//! `saga-compensation-<role>`, acknowledgements to `saga-compensation-ack`); without it only the
//! gRPC service runs. Prints `listening on ADDR` once it accepts calls. SIGTERM or Ctrl-C stops
//! it gracefully. Every option is also read from `SAGA_<OPTION>` and from a TOML file given
//! with `--config` (flag > environment > file > default; see `saga_proto::config` and
//! `config/participant.toml`). Built with the `faults` feature (the tests' build), it reads a fault plan
//! from `SAGA_FAULT_*` (see `saga_participants::faults`); built without it, it refuses to
//! start when one is set.

// RocketMQ client futures: see the "Recursion limit" note in saga_messaging::rocketmq.
#![recursion_limit = "256"]

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use saga_messaging::rocketmq::{RocketMqConfig, RocketMqTransport};
use saga_messaging::transport::Transport as _;
use saga_participants::consumer::CompensationConsumer;
use saga_participants::{Participant, Role};

#[derive(clap::Parser)]
#[command(about = "One saga participant (order, stock, coupon or balance) as a gRPC service")]
struct Args {
    /// order, stock, coupon or balance.
    #[arg(long)]
    role: String,
    /// Address to serve gRPC on (port 0 picks one; the chosen address is printed).
    #[arg(long)]
    listen: String,
    /// Directory of the role's event log.
    #[arg(long)]
    data_dir: PathBuf,
    /// RocketMQ name server; runs the compensation consumer.
    #[arg(long)]
    rocketmq: Option<String>,
    /// Consumer group of the compensation consumer (default `saga-compensation-<role>`).
    /// Every instance of a role keeps its own log, so run one instance per role and group.
    #[arg(long)]
    group: Option<String>,
    /// Topic to consume compensations from (default `saga-compensation`; it must exist).
    #[arg(long)]
    compensation_topic: Option<String>,
    /// Topic to acknowledge compensations on (default `saga-compensation-ack`; it must exist).
    #[arg(long)]
    ack_topic: Option<String>,
    /// Serve a log that lost acknowledged records (it ends before its durable mark) instead of
    /// refusing to start; the decision is recorded in the log. Only after reading the refusal.
    #[arg(long)]
    accept_lost_tail: bool,
    /// Tokio worker threads. One serves a participant's load here: its log's writer and
    /// flusher threads do the disk work, and fewer threads mean fewer hand-offs between them.
    #[arg(long, env = "SAGA_WORKER_THREADS", default_value_t = 1)]
    worker_threads: usize,
    /// sled's page cache for the role's event log, in MiB.
    #[arg(long, env = "SAGA_CACHE_MB", default_value_t = saga_storage::LogConfig::CACHE_MB_DEFAULT, value_parser = clap::value_parser!(u64).range(1..))]
    cache_mb: u64,
    /// Serve Prometheus metrics over HTTP on this address (off unless given).
    #[arg(long, env = "SAGA_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// File holding the bearer token admin RPCs (Seed*, ConsumerAdmin) require; else the
    /// SAGA_ADMIN_TOKEN environment variable; with neither they are open.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    #[command(flatten)]
    tls: saga_proto::tls::ServerTlsArgs,
    /// Acknowledge to orchestrators that name an `https://` endpoint over TLS, verifying them
    /// against this CA (PEM); without it such acknowledgements go through the topic.
    #[arg(long)]
    orchestrator_tls_ca: Option<PathBuf>,
    /// Present this certificate (PEM) to the orchestrator (with --orchestrator-tls-key and
    /// --orchestrator-tls-ca).
    #[arg(long)]
    orchestrator_tls_cert: Option<PathBuf>,
    /// The private key of --orchestrator-tls-cert (PEM).
    #[arg(long)]
    orchestrator_tls_key: Option<PathBuf>,
    /// Log lines as text or JSON objects (levels from RUST_LOG); every line about a saga
    /// carries its trace id.
    #[arg(long, value_enum, default_value_t)]
    log_format: saga_proto::trace::LogFormat,
    /// Export spans over OTLP/gRPC to this collector, `http://host:port` (off unless given);
    /// the exporter's OTEL_* variables (OTEL_BSP_SCHEDULE_DELAY, ...) apply.
    #[arg(long)]
    otlp_endpoint: Option<String>,
}

fn main() -> anyhow::Result<()> {
    // Before any thread: sled's I/O buffers in mappings of their own (see the function).
    saga_storage::heap::keep_large_buffers_out_of_the_heap();
    let (args, sources) = saga_proto::config::parse::<Args>(&[]);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.worker_threads.max(1))
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let telemetry = saga_proto::trace::init_service_logging(
        &runtime,
        "warn,saga_participants=info,saga_participant=info,saga_trace=info",
        args.log_format,
        args.otlp_endpoint.clone(),
        &format!("saga-participant-{}", args.role),
        &sources,
    )
    .map_err(anyhow::Error::msg)?;
    let role = args.role.parse::<Role>().with_context(|| sources.name("role"));
    let ran = role.and_then(|role| runtime.block_on(run(role, args, sources)));
    telemetry.shutdown();
    ran
}

/// The fault plan of the environment around the participant's barrier (tests and chaos runs;
/// see `saga_participants::faults`).
#[cfg(feature = "faults")]
fn with_fault_plan(participant: Participant) -> anyhow::Result<Participant> {
    let plan = saga_participants::faults::FaultPlan::from_env()?;
    if plan.is_empty() {
        return Ok(participant);
    }
    tracing::warn!(?plan, "fault injection on");
    let plan = std::sync::Mutex::new(Some(plan));
    let decorate: saga_participants::BarrierDecorator = Arc::new(move |_, inner| {
        let plan = plan.lock().expect("plan lock").take().expect("decorated once");
        plan.decorate(inner)
    });
    Ok(participant.with_barrier(&decorate))
}

/// A build without the `faults` feature refuses a fault plan instead of ignoring it (a test
/// that asks for faults must not silently run without them).
#[cfg(not(feature = "faults"))]
fn with_fault_plan(participant: Participant) -> anyhow::Result<Participant> {
    for name in saga_participants::FAULT_PLAN_ENV {
        if std::env::var_os(name).is_some() {
            anyhow::bail!("{name} is set, but this saga-participant was built without the `faults` feature");
        }
    }
    Ok(participant)
}

async fn run(role: Role, args: Args, sources: saga_proto::config::Sources) -> anyhow::Result<()> {
    // Installed first: from here on SIGTERM / Ctrl-C stop the process in order.
    let stop = saga_proto::server::shutdown_signal();
    let mut log_config = saga_storage::LogConfig::new(&args.data_dir);
    log_config.accept_lost_tail = args.accept_lost_tail;
    log_config.cache_capacity_bytes = args.cache_mb.saturating_mul(1024 * 1024);
    let participant = Participant::open_with(role, log_config).with_context(|| {
        format!(
            "{}: cannot open the event log in {}",
            sources.name("data_dir"),
            args.data_dir.display()
        )
    })?;
    let admin_token =
        saga_proto::server::start_operability(args.metrics_listen, args.admin_token_file.as_deref(), &|id| {
            sources.name(id)
        })
        .map_err(anyhow::Error::msg)?;
    if !admin_token.is_required() {
        tracing::warn!(
            role = role.name(),
            "admin RPCs are open: no --admin-token-file or SAGA_ADMIN_TOKEN given"
        );
    }
    let mut participant = with_fault_plan(participant)?.with_admin_token(admin_token);
    if let Some(tls) = args
        .tls
        .load(&|id| sources.name(id))
        .map_err(anyhow::Error::msg)?
    {
        participant = participant.with_tls(tls);
    }
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("{}: cannot bind {}", sources.name("listen"), args.listen))?;
    let addr = listener.local_addr()?;

    let mut messaging = None;
    if let Some(namesrv) = &args.rocketmq {
        let config = RocketMqConfig {
            thread_name: format!("saga-{}-mq", role.name()),
            ..RocketMqConfig::new(namesrv.clone())
        };
        let transport = Arc::new(
            RocketMqTransport::start(config, &format!("saga-participant-{}", role.name()))
                .await
                .with_context(|| format!("{}: cannot start the RocketMQ client", sources.name("rocketmq")))?,
        );
        let mut consumer = CompensationConsumer::new(participant.clone(), transport.clone());
        if let Some(tls) = saga_proto::tls::client_config(
            args.orchestrator_tls_ca.as_deref(),
            args.orchestrator_tls_cert.as_deref(),
            args.orchestrator_tls_key.as_deref(),
            "orchestrator_tls_",
            &|id| sources.name(id),
        )
        .map_err(anyhow::Error::msg)?
        {
            consumer = consumer.with_orchestrator_tls(tls);
        }
        if let Some(group) = args.group.clone() {
            consumer = consumer.with_group(group);
        }
        if let Some(topic) = args.compensation_topic.clone() {
            consumer = consumer.with_topic(topic);
        }
        if let Some(topic) = args.ack_topic.clone() {
            consumer = consumer.with_ack_topic(topic);
        }
        let consumer = Arc::new(consumer);
        let subscription = transport
            .subscribe(consumer.spec(), consumer.clone())
            .await
            .context("cannot start the compensation consumer")?;
        messaging = Some((transport, consumer, subscription));
    }

    let consumer = messaging.as_ref().map(|(_, consumer, _)| Arc::clone(consumer));
    println!("listening on {addr}");
    std::io::stdout().flush()?;
    tracing::info!(role = role.name(), %addr, consumer = consumer.is_some(), "participant started");
    participant
        .serve(listener, consumer, stop)
        .await
        .context("gRPC server")?;

    if let Some((transport, consumer, subscription)) = messaging {
        // In order: the consumer (it waits for in-flight compensations), then the producer
        // and the client runtime.
        subscription.shutdown().await;
        drop(consumer);
        transport.shutdown().await;
    }
    tracing::info!(role = role.name(), "participant stopped");
    Ok(())
}

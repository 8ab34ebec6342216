//! `sagactl`: the orchestrator's command-line client.
//!
//! ```text
//! sagactl [--server HOST:PORT] [--json] start-order --request-id R --user U --item P:Q [--item ..]
//!                                                   --amount CENTS [--coupon C]
//! sagactl get SAGA_ID | list [--state S] [--page-size N] [--page-token T] | watch SAGA_ID
//! sagactl replay [--from POSITION] [--follow] | retry SAGA_ID [--reason ..] | abort SAGA_ID [--reason ..]
//! sagactl audit verify --data-dir DIR | audit saga SAGA_ID --data-dir DIR [--data-dir ..]
//! sagactl audit export --data-dir DIR [--from POSITION]
//! ```
//!
//! `audit` works offline on data dirs (see `audit.rs`); `verify` exits 1 when it finds a
//! problem.
//!
//! Readable tables by default, `--json` for scripts (`replay` always prints JSON lines). When
//! the server cannot be reached it says so in one line and exits with status 2.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

mod audit;
use saga_proto::v1 as pb;
use serde_json::json;
use tonic::transport::Channel;

#[derive(Parser)]
#[command(about = "Client of the saga orchestrator")]
struct Args {
    /// The orchestrator's gRPC address.
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:50051",
        env = "SAGACTL_SERVER"
    )]
    server: String,
    /// Print JSON (one object per line) instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start an order saga (idempotent by --request-id).
    StartOrder {
        #[arg(long)]
        request_id: String,
        #[arg(long)]
        user: String,
        /// PRODUCT:QUANTITY; repeat for several items.
        #[arg(long = "item", required = true)]
        items: Vec<String>,
        /// Amount in minor units (cents).
        #[arg(long)]
        amount: i64,
        #[arg(long, default_value = "")]
        coupon: String,
    },
    /// Show one saga.
    Get { saga_id: String },
    /// List sagas, newest first.
    List {
        /// running, compensating, completed, compensated or stuck.
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 20)]
        page_size: u32,
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Follow a saga's events until it is final.
    Watch { saga_id: String },
    /// Print the orchestrator's event log as JSON lines.
    Replay {
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Keep following new events.
        #[arg(long)]
        follow: bool,
    },
    /// Retry a stuck saga.
    Retry {
        saga_id: String,
        #[arg(long, default_value = "operator retry")]
        reason: String,
    },
    /// Abort a running saga (compensates what it did).
    Abort {
        saga_id: String,
        #[arg(long, default_value = "operator abort")]
        reason: String,
    },
    /// Audit data dirs offline (no server): verify, one saga's timeline, export.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify every record's checksum, each stream's hash chain, the stream index, the durable
    /// mark, and the projections against a replay of the log. Exit 0 only when clean.
    Verify {
        #[arg(long)]
        data_dir: std::path::PathBuf,
    },
    /// One saga's timeline across the orchestrator's and participants' logs, in time order.
    Saga {
        saga_id: String,
        /// A data dir to read (repeat: orchestrator and participants).
        #[arg(long = "data-dir", required = true)]
        data_dirs: Vec<std::path::PathBuf>,
    },
    /// Every record as one JSON line.
    Export {
        #[arg(long)]
        data_dir: std::path::PathBuf,
        #[arg(long, default_value_t = 1)]
        from: u64,
    },
}

/// `sagactl audit ...`: exit 0 clean, 1 when verify found a problem, 2 on an error.
fn run_audit(command: AuditCommand, as_json: bool) -> ExitCode {
    let result = match command {
        AuditCommand::Verify { data_dir } => audit::verify(&data_dir, as_json),
        AuditCommand::Saga { saga_id, data_dirs } => {
            audit::saga(&saga_id, &data_dirs, as_json).map(|()| true)
        }
        AuditCommand::Export { data_dir, from } => audit::export(&data_dir, from).map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(message) => {
            eprintln!("sagactl audit: {message}");
            ExitCode::from(2)
        }
    }
}

fn state_name(state: i32) -> &'static str {
    pb::SagaState::try_from(state).unwrap_or_default().name()
}

fn step_state_name(state: i32) -> &'static str {
    pb::StepState::try_from(state).unwrap_or_default().name()
}

fn saga_json(saga: &pb::Saga) -> serde_json::Value {
    let order = saga.order.clone().unwrap_or_default();
    json!({
        "saga_id": saga.saga_id,
        "request_id": saga.request_id,
        "state": state_name(saga.state),
        "version": saga.version,
        "started_at_unix_ms": saga.started_at_unix_ms,
        "updated_at_unix_ms": saga.updated_at_unix_ms,
        "failure_reason": saga.failure_reason,
        "order": {
            "user_id": order.user_id,
            "items": order.items.iter().map(|i| json!({"product_id": i.product_id, "quantity": i.quantity})).collect::<Vec<_>>(),
            "amount_minor": order.amount_minor,
            "coupon_id": order.coupon_id,
        },
        "steps": saga.steps.iter().map(|s| json!({
            "name": s.name, "state": step_state_name(s.state), "attempts": s.attempts, "last_error": s.last_error,
        })).collect::<Vec<_>>(),
    })
}

fn print_saga(saga: &pb::Saga, as_json: bool) {
    if as_json {
        println!("{}", saga_json(saga));
        return;
    }
    let order = saga.order.clone().unwrap_or_default();
    println!("saga      {}", saga.saga_id);
    println!("request   {}", saga.request_id);
    println!("state     {}", state_name(saga.state));
    let items: Vec<String> = order
        .items
        .iter()
        .map(|i| format!("{}x{}", i.product_id, i.quantity))
        .collect();
    println!(
        "order     user {} items {} amount {} coupon {}",
        order.user_id,
        items.join(","),
        order.amount_minor,
        if order.coupon_id.is_empty() {
            "-"
        } else {
            &order.coupon_id
        }
    );
    if !saga.failure_reason.is_empty() {
        println!("reason    {}", saga.failure_reason);
    }
    println!("{:<16} {:<13} {:>8}  last error", "STEP", "STATE", "ATTEMPTS");
    for s in &saga.steps {
        println!(
            "{:<16} {:<13} {:>8}  {}",
            s.name,
            step_state_name(s.state),
            s.attempts,
            s.last_error
        );
    }
}

fn event_json(e: &pb::SagaEvent) -> serde_json::Value {
    json!({
        "saga_id": e.saga_id, "version": e.version, "position": e.position, "event_type": e.event_type,
        "timestamp_unix_us": e.timestamp_unix_us, "state": state_name(e.state), "step": e.step, "detail": e.detail,
    })
}

async fn connect(server: &str) -> Result<Channel, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{server}"))
        .map_err(|e| format!("--server {server:?}: {e}"))?
        .connect_timeout(Duration::from_secs(3));
    endpoint
        .connect()
        .await
        .map_err(|_| format!("cannot reach the orchestrator at {server} (is it running? see --server)"))
}

fn parse_state(name: &str) -> Result<pb::SagaState, String> {
    pb::SagaState::from_name(name).ok_or_else(|| {
        let names: Vec<&str> = pb::SagaState::NAMED.iter().map(|s| s.name()).collect();
        format!("--state {name:?}: use one of {}", names.join(", "))
    })
}

fn parse_item(text: &str) -> Result<pb::OrderItem, String> {
    let (product, quantity) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("--item {text:?}: use PRODUCT:QUANTITY"))?;
    Ok(pb::OrderItem {
        product_id: product.to_owned(),
        quantity: quantity
            .parse()
            .map_err(|_| format!("--item {text:?}: quantity is not a number"))?,
    })
}

async fn run(args: Args) -> Result<(), String> {
    let channel = connect(&args.server).await?;
    let mut client = pb::orchestrator_client::OrchestratorClient::new(channel);
    let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    match args.command {
        Command::StartOrder {
            request_id,
            user,
            items,
            amount,
            coupon,
        } => {
            let items = items
                .iter()
                .map(|i| parse_item(i))
                .collect::<Result<Vec<_>, _>>()?;
            let response = client
                .start_order(pb::StartOrderRequest {
                    request_id,
                    user_id: user,
                    items,
                    amount_minor: amount,
                    coupon_id: coupon,
                })
                .await
                .map_err(status)?
                .into_inner();
            let saga = response.saga.unwrap_or_default();
            if args.json {
                println!(
                    "{}",
                    json!({"created": response.created, "saga": saga_json(&saga)})
                );
            } else {
                println!(
                    "{} saga {}",
                    if response.created {
                        "started"
                    } else {
                        "already started:"
                    },
                    saga.saga_id
                );
            }
        }
        Command::Get { saga_id } => {
            let saga = client
                .get_saga(pb::GetSagaRequest { saga_id })
                .await
                .map_err(status)?
                .into_inner()
                .saga;
            print_saga(&saga.unwrap_or_default(), args.json);
        }
        Command::List {
            state,
            page_size,
            page_token,
        } => {
            let state = state.as_deref().map(parse_state).transpose()?.unwrap_or_default();
            let page = client
                .list_sagas(pb::ListSagasRequest {
                    state: state as i32,
                    page_size,
                    page_token,
                })
                .await
                .map_err(status)?
                .into_inner();
            if args.json {
                for saga in &page.sagas {
                    println!("{}", saga_json(saga));
                }
                if !page.next_page_token.is_empty() {
                    println!("{}", json!({"next_page_token": page.next_page_token}));
                }
            } else {
                println!(
                    "{:<30} {:<13} {:<8} {:<8} REASON",
                    "SAGA", "STATE", "USER", "AMOUNT"
                );
                for saga in &page.sagas {
                    let order = saga.order.clone().unwrap_or_default();
                    println!(
                        "{:<30} {:<13} {:<8} {:<8} {}",
                        saga.saga_id,
                        state_name(saga.state),
                        order.user_id,
                        order.amount_minor,
                        saga.failure_reason
                    );
                }
                if !page.next_page_token.is_empty() {
                    println!("more: --page-token '{}'", page.next_page_token);
                }
            }
        }
        Command::Watch { saga_id } => {
            let mut events = client
                .watch_saga(pb::WatchSagaRequest {
                    saga_id,
                    from_version: 1,
                })
                .await
                .map_err(status)?
                .into_inner();
            if !args.json {
                println!(
                    "{:>4} {:<22} {:<16} {:<13} DETAIL",
                    "VER", "EVENT", "STEP", "STATE"
                );
            }
            while let Some(e) = events.message().await.map_err(status)? {
                if args.json {
                    println!("{}", event_json(&e));
                } else {
                    println!(
                        "{:>4} {:<22} {:<16} {:<13} {}",
                        e.version,
                        e.event_type,
                        e.step,
                        state_name(e.state),
                        e.detail
                    );
                }
            }
        }
        Command::Replay { from, follow } => {
            let mut events = client
                .replay_events(pb::ReplayEventsRequest {
                    from_position: from,
                    follow,
                })
                .await
                .map_err(status)?
                .into_inner();
            while let Some(e) = events.message().await.map_err(status)? {
                let payload: serde_json::Value =
                    serde_json::from_str(&e.payload_json).unwrap_or(serde_json::Value::Null);
                println!(
                    "{}",
                    json!({
                        "position": e.position, "stream": e.stream, "version": e.version, "event_type": e.event_type,
                        "timestamp_unix_us": e.timestamp_unix_us, "payload": payload,
                        "checksum": format!("{:016x}", e.checksum), "prev_checksum": format!("{:016x}", e.prev_checksum),
                    })
                );
            }
        }
        Command::Retry { saga_id, reason } => {
            let saga = client
                .retry_saga(pb::RetrySagaRequest { saga_id, reason })
                .await
                .map_err(status)?
                .into_inner()
                .saga;
            print_saga(&saga.unwrap_or_default(), args.json);
        }
        Command::Audit { .. } => unreachable!("handled in main, without a server"),
        Command::Abort { saga_id, reason } => {
            let saga = client
                .abort_saga(pb::AbortSagaRequest { saga_id, reason })
                .await
                .map_err(status)?
                .into_inner()
                .saga;
            print_saga(&saga.unwrap_or_default(), args.json);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so `sagactl replay | head -1` would panic on the closed pipe. Like
    // any filter, end quietly instead: the default action ends the process.
    // SAFETY: called first thing in main, before any other thread exists.
    #[allow(unsafe_code, reason = "libc::signal; see SAFETY")]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args = Args::parse();
    if let Command::Audit { command } = args.command {
        return run_audit(command, args.json);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime");
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("sagactl: {message}");
            ExitCode::from(2)
        }
    }
}

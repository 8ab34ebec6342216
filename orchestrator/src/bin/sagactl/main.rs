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
//! Readable tables by default, `--json` for scripts (`replay` always prints JSON lines; with
//! `--json` an error is one JSON object on stderr). Admin calls (replay, retry, abort) send the
//! bearer token from `--token-file` or `SAGA_ADMIN_TOKEN` when one is given.
//!
//! Exit status (one per kind of failure, for scripts):
//!
//! | status | meaning                                                                   |
//! |--------|---------------------------------------------------------------------------|
//! | 0      | success                                                                   |
//! | 1      | any other failure (INTERNAL, ...); `audit verify` found a problem         |
//! | 2      | invalid: bad arguments, INVALID_ARGUMENT or OUT_OF_RANGE from the server, |
//! |        | a data dir `audit` cannot read                                            |
//! | 3      | not found: NOT_FOUND (no such saga)                                       |
//! | 4      | refused: FAILED_PRECONDITION, ALREADY_EXISTS, ABORTED (the saga's state   |
//! |        | does not allow it, or the request id was used for another order)          |
//! | 5      | unreachable: cannot connect, UNAVAILABLE, DEADLINE_EXCEEDED               |
//! | 6      | unauthenticated: UNAUTHENTICATED, PERMISSION_DENIED (admin token)         |

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

mod audit;
use saga_proto::v1 as pb;
use serde_json::json;
use tonic::transport::Channel;

#[derive(Parser)]
#[command(
    about = "Client of the saga orchestrator",
    after_help = "Exit status: 0 success, 1 other failure, 2 invalid, 3 not found, 4 refused, \
                  5 unreachable, 6 unauthenticated."
)]
struct Args {
    /// The orchestrator's gRPC address: HOST:PORT or http://HOST:PORT.
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:50051",
        env = "SAGACTL_SERVER"
    )]
    server: String,
    /// Print JSON (one object per line) instead of tables; errors too, on stderr.
    #[arg(long, global = true, env = "SAGACTL_JSON")]
    json: bool,
    /// File holding the bearer token of admin calls (replay, retry, abort); else the
    /// SAGA_ADMIN_TOKEN environment variable.
    #[arg(long, global = true, env = "SAGACTL_TOKEN_FILE")]
    token_file: Option<std::path::PathBuf>,
    /// Deadline of each call (not of a watch or replay stream), in milliseconds.
    #[arg(long, global = true, default_value_t = 10_000, env = "SAGACTL_TIMEOUT_MS")]
    timeout_ms: u64,
    /// Connect over TLS, verifying the orchestrator against this CA (PEM); `--server
    /// https://HOST:PORT` needs it.
    #[arg(long, global = true, env = "SAGACTL_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// Present this client certificate (PEM) when the orchestrator requires one (mutual TLS;
    /// with --tls-key and --tls-ca).
    #[arg(long, global = true, env = "SAGACTL_TLS_CERT")]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, global = true, env = "SAGACTL_TLS_KEY")]
    tls_key: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start an order saga (idempotent by --request-id).
    StartOrder {
        /// The client's id of this order: a repeat with the same id returns the first saga.
        #[arg(long)]
        request_id: String,
        /// The paying user's id.
        #[arg(long)]
        user: String,
        /// PRODUCT:QUANTITY; repeat for several items.
        #[arg(long = "item", required = true)]
        items: Vec<String>,
        /// Amount in minor units (cents).
        #[arg(long)]
        amount: i64,
        /// The coupon to lock (none when empty).
        #[arg(long, default_value = "")]
        coupon: String,
    },
    /// Show one saga.
    Get {
        /// The saga's id (StartOrder's answer).
        saga_id: String,
    },
    /// List sagas, newest first.
    List {
        /// running, compensating, completed, compensated or stuck.
        #[arg(long)]
        state: Option<String>,
        /// Sagas per page (at most 1000).
        #[arg(long, default_value_t = 20)]
        page_size: u32,
        /// The token a previous page printed, to continue from.
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Follow a saga's events until it is final or stuck.
    Watch {
        /// The saga's id.
        saga_id: String,
        /// Only the events that change the saga's state (running, compensating, completed,
        /// ...), as a client waiting for the outcome needs: the server leaves the others out.
        #[arg(long)]
        changes_only: bool,
    },
    /// Print the orchestrator's event log as JSON lines (an admin call).
    Replay {
        /// The first global log position to print.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Keep following new events.
        #[arg(long)]
        follow: bool,
    },
    /// Retry a stuck saga (an admin call).
    Retry {
        /// The saga's id.
        saga_id: String,
        /// Why, recorded in the saga's events.
        #[arg(long, default_value = "operator retry")]
        reason: String,
    },
    /// Abort a running saga, compensating what it did (an admin call).
    Abort {
        /// The saga's id.
        saga_id: String,
        /// Why, recorded in the saga's events.
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
        /// The data dir of a stopped orchestrator or participant.
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
        /// The data dir of a stopped orchestrator or participant.
        #[arg(long)]
        data_dir: std::path::PathBuf,
        /// The first global log position to print.
        #[arg(long, default_value_t = 1)]
        from: u64,
    },
}

/// `sagactl audit ...`: exit 0 clean, 1 when verify found a problem, 2 when a data dir cannot
/// be audited (missing, or held by a running process).
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
            let failure = Failure::new(Kind::Invalid, format!("audit: {message}"));
            failure.print(as_json);
            ExitCode::from(failure.kind.exit_code())
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

/// What went wrong, by the kind a script acts on (the exit status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Failed,
    Invalid,
    NotFound,
    Refused,
    Unreachable,
    Unauthenticated,
}

impl Kind {
    fn exit_code(self) -> u8 {
        match self {
            Kind::Failed => 1,
            Kind::Invalid => 2,
            Kind::NotFound => 3,
            Kind::Refused => 4,
            Kind::Unreachable => 5,
            Kind::Unauthenticated => 6,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Failed => "failed",
            Kind::Invalid => "invalid",
            Kind::NotFound => "not_found",
            Kind::Refused => "refused",
            Kind::Unreachable => "unreachable",
            Kind::Unauthenticated => "unauthenticated",
        }
    }

    fn of(code: tonic::Code) -> Kind {
        use tonic::Code;
        match code {
            Code::InvalidArgument | Code::OutOfRange => Kind::Invalid,
            Code::NotFound => Kind::NotFound,
            Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => Kind::Refused,
            Code::Unavailable | Code::DeadlineExceeded => Kind::Unreachable,
            Code::Unauthenticated | Code::PermissionDenied => Kind::Unauthenticated,
            _ => Kind::Failed,
        }
    }
}

/// A failed command: its kind, a message, and what the server said, if it answered.
struct Failure {
    kind: Kind,
    message: String,
    status: Option<tonic::Status>,
}

impl Failure {
    fn new(kind: Kind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
            status: None,
        }
    }

    fn print(&self, as_json: bool) {
        if !as_json {
            eprintln!("sagactl: {}", self.message);
            return;
        }
        let mut error =
            json!({"kind": self.kind.name(), "exit_code": self.kind.exit_code(), "message": self.message});
        if let Some(status) = &self.status {
            error["code"] = json!(format!("{:?}", status.code()));
            if let Some(field) = saga_proto::status::invalid_field(status) {
                error["field"] = json!(field);
            }
            if let Some(refusal) = saga_proto::status::refusal_of(status) {
                error["reason"] = json!(
                    pb::RefusalReason::try_from(refusal.reason)
                        .map_or("UNKNOWN_REASON", saga_proto::status::reason_name)
                );
            }
        }
        eprintln!("{}", json!({ "error": error }));
    }
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Failure {
        Failure {
            kind: Kind::of(status.code()),
            message: format!("{:?}: {}", status.code(), status.message()),
            status: Some(status),
        }
    }
}

/// The server's address as an endpoint: `HOST:PORT`, `http://HOST:PORT`, or with TLS
/// (`tls`) `https://HOST:PORT`.
fn endpoint_uri(server: &str, tls: bool, setting: &str) -> Result<String, Failure> {
    let scheme = if tls { "https" } else { "http" };
    let hostport = match server.split_once("://") {
        None => server,
        Some(("http", rest)) => rest,
        Some(("https", rest)) if tls => rest,
        Some(("https", _)) => {
            return Err(Failure::new(
                Kind::Invalid,
                format!(
                    "{setting}: {server:?}: https needs --tls-ca (the CA of the orchestrator's certificate)"
                ),
            ));
        }
        Some(_) => {
            return Err(Failure::new(
                Kind::Invalid,
                format!("{setting}: {server:?}: use HOST:PORT, http://HOST:PORT or https://HOST:PORT"),
            ));
        }
    };
    Ok(format!("{scheme}://{hostport}"))
}

/// A channel to `server`; `sources` name the settings in errors.
async fn connect(
    server: &str,
    tls: Option<tonic::transport::ClientTlsConfig>,
    sources: &saga_proto::config::Sources,
) -> Result<Channel, Failure> {
    let setting = sources.name("server");
    let mut endpoint =
        tonic::transport::Endpoint::from_shared(endpoint_uri(server, tls.is_some(), &setting)?)
            .map_err(|e| Failure::new(Kind::Invalid, format!("{setting}: {server:?}: {e}")))?
            .connect_timeout(Duration::from_secs(3));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(|e| {
            Failure::new(
                Kind::Invalid,
                format!("{}: {}", sources.name("tls_ca"), saga_proto::tls::error_chain(&e)),
            )
        })?;
    }
    endpoint.connect().await.map_err(|e| {
        Failure::new(
            Kind::Unreachable,
            format!(
                "cannot reach the orchestrator at {server} (is it running? see --server): {}",
                saga_proto::tls::error_chain(&e)
            ),
        )
    })
}

fn parse_state(name: &str) -> Result<pb::SagaState, Failure> {
    pb::SagaState::from_name(name).ok_or_else(|| {
        let names: Vec<&str> = pb::SagaState::NAMED.iter().map(|s| s.name()).collect();
        Failure::new(
            Kind::Invalid,
            format!("--state {name:?}: use one of {}", names.join(", ")),
        )
    })
}

fn parse_item(text: &str) -> Result<pb::OrderItem, Failure> {
    let invalid = |why: &str| Failure::new(Kind::Invalid, format!("--item {text:?}: {why}"));
    let (product, quantity) = text
        .rsplit_once(':')
        .ok_or_else(|| invalid("use PRODUCT:QUANTITY"))?;
    Ok(pb::OrderItem {
        product_id: product.to_owned(),
        quantity: quantity
            .parse()
            .map_err(|_| invalid("quantity is not a number"))?,
    })
}

/// How requests are made: a deadline on unary calls, the admin token on admin calls.
struct Calls {
    timeout: Duration,
    token: Option<String>,
}

impl Calls {
    /// A unary call with a deadline.
    fn call<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        request
    }

    /// An admin call: with the token, when there is one (`check_token` ran on it), and with a
    /// deadline unless it is a stream.
    fn admin<T>(&self, message: T, deadline: bool) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if deadline {
            request.set_timeout(self.timeout);
        }
        if let Some(token) = &self.token {
            saga_proto::auth::authorize(&mut request, token).expect("the token was checked");
        }
        request
    }
}

/// The admin token to send, from `--token-file` (named `setting` in errors) or
/// `SAGA_ADMIN_TOKEN`.
fn admin_token(file: Option<&std::path::Path>, setting: String) -> Result<Option<String>, Failure> {
    let (text, source) = match file {
        Some(path) => (
            std::fs::read_to_string(path)
                .map_err(|e| Failure::new(Kind::Invalid, format!("{setting}: {}: {e}", path.display())))?,
            setting,
        ),
        None => match std::env::var(saga_proto::auth::TOKEN_ENV) {
            Ok(text) => (text, saga_proto::auth::TOKEN_ENV.to_owned()),
            Err(_) => return Ok(None),
        },
    };
    let token = text.trim().to_owned();
    saga_proto::auth::check_token(&token)
        .map_err(|e| Failure::new(Kind::Invalid, format!("{source}: {e}")))?;
    Ok(Some(token))
}

async fn run(args: Args, sources: saga_proto::config::Sources) -> Result<(), Failure> {
    let token = admin_token(args.token_file.as_deref(), sources.name("token_file"))?;
    let tls = saga_proto::tls::client_config(
        args.tls_ca.as_deref(),
        args.tls_cert.as_deref(),
        args.tls_key.as_deref(),
        "tls_",
        &|id| sources.name(id),
    )
    .map_err(|e| Failure::new(Kind::Invalid, e))?;
    let channel = connect(&args.server, tls, &sources).await?;
    let mut client = pb::orchestrator_client::OrchestratorClient::new(channel);
    let calls = Calls {
        timeout: Duration::from_millis(args.timeout_ms),
        token,
    };
    let status = Failure::from;
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
                .start_order(calls.call(pb::StartOrderRequest {
                    request_id,
                    user_id: user,
                    items,
                    amount_minor: amount,
                    coupon_id: coupon,
                }))
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
                .get_saga(calls.call(pb::GetSagaRequest { saga_id }))
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
                .list_sagas(calls.call(pb::ListSagasRequest {
                    state: state as i32,
                    page_size,
                    page_token,
                }))
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
        Command::Watch {
            saga_id,
            changes_only,
        } => {
            let mut events = client
                .watch_saga(pb::WatchSagaRequest {
                    saga_id,
                    from_version: 1,
                    status_changes_only: changes_only,
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
                .replay_events(calls.admin(
                    pb::ReplayEventsRequest {
                        from_position: from,
                        follow,
                    },
                    false,
                ))
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
                .retry_saga(calls.admin(pb::RetrySagaRequest { saga_id, reason }, true))
                .await
                .map_err(status)?
                .into_inner()
                .saga;
            print_saga(&saga.unwrap_or_default(), args.json);
        }
        Command::Audit { .. } => unreachable!("handled in main, without a server"),
        Command::Abort { saga_id, reason } => {
            let saga = client
                .abort_saga(calls.admin(pb::AbortSagaRequest { saga_id, reason }, true))
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
    // Its global options also come from SAGACTL_* and a TOML file (`--config`, or SAGA_CONFIG;
    // see saga_proto::config and config/sagactl.toml).
    let (args, sources) = saga_proto::config::parse::<Args>(&[]);
    if let Command::Audit { command } = args.command {
        return run_audit(command, args.json);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime");
    let as_json = args.json;
    match runtime.block_on(run(args, sources)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            failure.print(as_json);
            ExitCode::from(failure.kind.exit_code())
        }
    }
}

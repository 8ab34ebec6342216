//! The gRPC contract of the saga orchestrator, package `saga.v1`.
//!
//! - `saga/v1/orchestrator.proto`: the [`v1::orchestrator_server::Orchestrator`] service
//!   clients use to start, inspect, steer and replay sagas.
//! - `saga/v1/participants.proto`: the order, stock, coupon and balance services the
//!   orchestrator calls, and `ConsumerAdmin` for each participant's compensation consumer.
//! - `saga/v1/common.proto`: the step idempotency key, business refusals, and the bodies of
//!   compensation and acknowledgement messages on the compensation transport.
//!
//! The `.proto` files are the API's documentation; this crate compiles them (tonic + prost,
//! with a vendored protoc) and exposes [`FILE_DESCRIPTOR_SET`] for server reflection. It also
//! holds the vocabulary every side of the contract shares: [`ids`] (the one id rule),
//! [`Role`], the short names of saga and step states, and [`server`] (how every one of our
//! gRPC servers serves, and the shutdown signal of our processes).

/// Generated messages, clients and servers of `saga.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("saga.v1");
}

/// The encoded `FileDescriptorSet` of `saga.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("saga_v1_descriptor");

/// Largest request a server of ours decodes, in bytes. Above tonic's 4 MiB default so that an
/// oversized field (a 10 MB id, say) reaches validation and is answered INVALID_ARGUMENT naming
/// the field, as every other bad input is; a request past this bound is refused by tonic
/// (OUT_OF_RANGE) before it is decoded. Every field we accept is far smaller (ids are at most
/// 64 bytes, item lists at most a few hundred entries), so this bounds memory per request only.
pub const REQUEST_LEN_MAX: usize = 16 * 1024 * 1024;

/// The one rule for ids (saga, step, user, product, coupon, order ids): they travel in the
/// participants' stream names (`step/<saga>/<step>`), projection keys and message keys, so
/// they are 1..=[`ids::ID_LEN_MAX`] bytes of printable ASCII without '/'. Request ids are
/// only stored by the orchestrator and may be longer ([`ids::REQUEST_ID_LEN_MAX`]).
pub mod ids {
    /// Longest id, in bytes.
    pub const ID_LEN_MAX: usize = 64;
    /// Longest client request id (StartOrder), in bytes.
    pub const REQUEST_ID_LEN_MAX: usize = 128;

    /// Why a value is not an id.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum IdError {
        Empty,
        TooLong { len_max: usize },
        NotPrintable,
    }

    impl std::fmt::Display for IdError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                IdError::Empty => f.write_str("must not be empty"),
                IdError::TooLong { len_max } => write!(f, "at most {len_max} bytes"),
                IdError::NotPrintable => f.write_str("must be printable ASCII without spaces or '/'"),
            }
        }
    }

    impl std::error::Error for IdError {}

    /// Checks an id of at most [`ID_LEN_MAX`] bytes.
    pub fn check(value: &str) -> Result<(), IdError> {
        check_len(value, ID_LEN_MAX)
    }

    /// Checks an id of at most `len_max` bytes.
    pub fn check_len(value: &str, len_max: usize) -> Result<(), IdError> {
        if value.is_empty() {
            return Err(IdError::Empty);
        }
        if value.len() > len_max {
            return Err(IdError::TooLong { len_max });
        }
        if !value.bytes().all(|b| b.is_ascii_graphic() && b != b'/') {
            return Err(IdError::NotPrintable);
        }
        Ok(())
    }
}

/// A participant role: the service a step calls, the compensation message's tag and the
/// consumer group's suffix. One list for every crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Order,
    Stock,
    Coupon,
    Balance,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Order, Role::Stock, Role::Coupon, Role::Balance];

    /// The role's name (as tag, group suffix, `--role` value and data dir name).
    pub fn name(self) -> &'static str {
        match self {
            Role::Order => "order",
            Role::Stock => "stock",
            Role::Coupon => "coupon",
            Role::Balance => "balance",
        }
    }

    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == name)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not a role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownRole(pub String);

impl std::fmt::Display for UnknownRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unknown role {:?} (order, stock, coupon or balance)", self.0)
    }
}

impl std::error::Error for UnknownRole {}

impl std::str::FromStr for Role {
    type Err = UnknownRole;

    fn from_str(name: &str) -> Result<Role, UnknownRole> {
        Role::parse(name).ok_or_else(|| UnknownRole(name.to_owned()))
    }
}

/// The short lower-case names of saga and step states, one list for the API's clients
/// (`sagactl`), the orchestrator's index keys and its logs.
impl v1::SagaState {
    pub const NAMED: [v1::SagaState; 5] = [
        v1::SagaState::Running,
        v1::SagaState::Compensating,
        v1::SagaState::Completed,
        v1::SagaState::Compensated,
        v1::SagaState::Stuck,
    ];

    pub fn name(self) -> &'static str {
        match self {
            v1::SagaState::Unspecified => "?",
            v1::SagaState::Running => "running",
            v1::SagaState::Compensating => "compensating",
            v1::SagaState::Completed => "completed",
            v1::SagaState::Compensated => "compensated",
            v1::SagaState::Stuck => "stuck",
        }
    }

    /// The state of a short name (`running`, ...).
    pub fn from_name(name: &str) -> Option<v1::SagaState> {
        v1::SagaState::NAMED.into_iter().find(|s| s.name() == name)
    }
}

impl v1::StepState {
    pub fn name(self) -> &'static str {
        match self {
            v1::StepState::Unspecified => "?",
            v1::StepState::Pending => "pending",
            v1::StepState::Running => "running",
            v1::StepState::Succeeded => "succeeded",
            v1::StepState::Failed => "failed",
            v1::StepState::Skipped => "skipped",
            v1::StepState::Compensating => "compensating",
            v1::StepState::Compensated => "compensated",
            v1::StepState::CompensationParked => "parked",
        }
    }
}

/// The authority of `endpoint` (`<scheme>://HOST:PORT` for one of `schemes`): nothing after it
/// (no path), no whitespace or control characters. The one rule for the acknowledgement
/// endpoint the orchestrator names (`--ack-endpoint`) and the participants call.
pub fn endpoint_authority<'a>(endpoint: &'a str, schemes: &[&str]) -> Option<&'a str> {
    schemes
        .iter()
        .find_map(|scheme| endpoint.strip_prefix(scheme)?.strip_prefix("://"))
        .filter(|authority| {
            !authority.is_empty()
                && !authority.contains(|c: char| c == '/' || c.is_whitespace() || c.is_control())
        })
}

pub mod auth;
pub mod config;
pub mod status;
pub mod tls;
pub mod trace;

/// How our gRPC servers serve, once for the orchestrator, the participants and `dev`.
pub mod server {
    use tonic::server::NamedService;
    use tonic_health::ServingStatus;
    use tonic_health::server::HealthReporter;

    /// The standard health service's name.
    pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
    /// The two versions of server reflection we serve: v1, and v1alpha for grpcio-reflection
    /// and older grpcurl, which speak only v1alpha.
    pub const REFLECTION_SERVICES: [&str; 2] = [
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];

    /// The name a generated server is served under (`saga.v1.Orchestrator`, ...).
    pub fn name_of<S: NamedService>() -> &'static str {
        S::NAME
    }

    /// What every server of ours serves besides its own services.
    pub struct Standard {
        /// Health of the whole server ("") and of each of its own services; starts NOT_SERVING.
        pub health: Health,
    }

    /// The standard health service's statuses of one server: the server as a whole ("") and
    /// each of its own services move together.
    #[derive(Clone)]
    pub struct Health {
        reporter: HealthReporter,
        services: Vec<&'static str>,
    }

    impl Health {
        /// Sets every status of the server to SERVING or NOT_SERVING.
        pub async fn set_serving(&self, serving: bool) {
            let status = if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            self.reporter.set_service_status("", status).await;
            for service in &self.services {
                self.reporter.set_service_status(*service, status).await;
            }
        }
    }

    /// `routes` with standard health checking and server reflection (v1 and v1alpha) added.
    /// Reflection lists exactly `served` (the names of the services in `routes`), health and
    /// reflection; health reports NOT_SERVING for "" and each of `served` until the caller
    /// says otherwise ([`Health::set_serving`]).
    pub async fn with_standard_services(
        routes: tonic::service::Routes,
        served: &[&'static str],
    ) -> Result<(tonic::service::Routes, Standard), tonic_reflection::server::Error> {
        let (reporter, health_service) = tonic_health::server::health_reporter();
        let health = Health {
            reporter,
            services: served.to_vec(),
        };
        health.set_serving(false).await;
        let builder = || {
            let mut builder = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
                .include_reflection_service(false);
            for name in served
                .iter()
                .copied()
                .chain([HEALTH_SERVICE])
                .chain(REFLECTION_SERVICES)
            {
                builder = builder.with_service_name(name);
            }
            builder
        };
        let routes = routes
            .add_service(health_service)
            .add_service(builder().build_v1()?)
            .add_service(builder().build_v1alpha()?);
        Ok((routes, Standard { health }))
    }

    /// Serves `routes` on `listener` until `shutdown` completes. Accepted connections get
    /// TCP_NODELAY: without it Nagle's algorithm held small responses back until the client's
    /// delayed ACK, ~40 ms per call (measured: a saga took 44 ms at concurrency 1).
    pub async fn serve(
        routes: tonic::service::Routes,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        serve_tls(routes, listener, None, shutdown).await
    }

    /// [`serve`] with TLS when `tls` is given (`crate::tls::server_config`): then only TLS
    /// connections are served; a plaintext one fails its handshake and is closed.
    pub async fn serve_tls(
        routes: tonic::service::Routes,
        listener: tokio::net::TcpListener,
        tls: Option<tonic::transport::ServerTlsConfig>,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        // Every call runs in a span carrying the caller's trace id (crate::trace). HTTP/2
        // keepalive: a caller's long-lived stream (a participant's step stream) whose host
        // vanished without closing its connection is noticed and dropped within 15 s.
        let mut builder = tonic::transport::Server::builder()
            .trace_fn(crate::trace::server_span)
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(5)));
        if let Some(tls) = tls {
            builder = builder.tls_config(tls)?;
        }
        builder
            .add_routes(routes)
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                shutdown,
            )
            .await
    }

    /// Latency buckets of every `*_seconds` histogram, 0.5 ms to 10 s.
    const SECONDS_BUCKETS: [f64; 14] = [
        0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    /// Buckets of every `*_appends` histogram (group commit's batch sizes).
    const COUNT_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

    /// Installs the process's metrics recorder and serves the Prometheus text format over HTTP
    /// on `addr` (any path, e.g. `/metrics`), from a task of the current Tokio runtime. Until
    /// this is called the `metrics` calls of our libraries record nothing.
    pub fn serve_metrics(addr: std::net::SocketAddr) -> Result<(), String> {
        use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
        PrometheusBuilder::new()
            .with_http_listener(addr)
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_appends".into()), &COUNT_BUCKETS))
            .and_then(|b| b.install())
            .map_err(|e| format!("{addr}: {e}"))
    }

    /// What every server binary does with its `--metrics-listen` and `--admin-token-file`
    /// settings at start: serves the metrics endpoint when asked ([`serve_metrics`]) and reads
    /// the admin token ([`crate::auth::AdminToken::configured`]). `name` names a setting by
    /// its id in errors (`config::Sources::name`).
    pub fn start_operability(
        metrics_listen: Option<std::net::SocketAddr>,
        admin_token_file: Option<&std::path::Path>,
        name: &dyn Fn(&str) -> String,
    ) -> Result<crate::auth::AdminToken, String> {
        if let Some(addr) = metrics_listen {
            serve_metrics(addr).map_err(|e| format!("{}: {e}", name("metrics_listen")))?;
        }
        crate::auth::AdminToken::configured(admin_token_file, &name("admin_token_file"))
    }

    /// A future that completes on SIGTERM or Ctrl-C (SIGINT): how every process of ours is
    /// asked to stop. The handlers are installed when this is **called**, not when the future
    /// is first polled: call it before the process announces itself (`listening on`), or a
    /// signal sent right after that line meets the default action and kills the process
    /// (seen in CI: a participant ended by SIGTERM with no shutdown at all).
    ///
    /// # Panics
    /// If the handlers cannot be installed (only outside a Tokio runtime with signals).
    pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler");
        async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = interrupt.recv() => {}
            }
        }
    }
}

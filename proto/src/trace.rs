//! One saga, one trace: W3C trace context (`traceparent`) across our processes, and how our
//! processes log.
//!
//! - A saga's trace id is derived from its id (the first 16 bytes of SHA-256 of the saga id),
//!   so the orchestrator, every participant and every restart name the same trace without
//!   storing it. [`TraceContext::for_saga`].
//! - The orchestrator sends `traceparent: 00-<trace id>-<span id>-01` in the metadata of each
//!   step call. Every message of ours (compensation requests and their acknowledgements)
//!   carries it as a `traceparent` message property, a RocketMQ user property, which the relay
//!   derives from the message key when it publishes (`saga_messaging::topics::message_properties`);
//!   a compensation request also has it in its `traceparent` field, which consumers read when a
//!   message has no property (one relayed by an older build).
//! - Every server of ours opens a span per call carrying the caller's trace id
//!   ([`server_span`]); the participants' compensation consumer opens one per delivery, the
//!   orchestrator one per saga driver pass and per acknowledgement. Every log line written in
//!   such a span carries `trace_id`, so `grep <trace id>` over all processes' logs (or a
//!   query on the JSON field) shows one saga's story, compensations included.
//! - Levels come from `RUST_LOG`; `--log-format json` writes one JSON object per line
//!   ([`init_logging`]).
//! - With `--otlp-endpoint` (off unless given) the spans of our crates are also exported over
//!   OTLP/gRPC to a collector ([`OtlpExport`]). Each span of a saga is parented on the saga's
//!   derived trace context, so the exported spans of every process share the saga's trace id;
//!   step calls then carry the sending span's id ([`outgoing`]), so a participant's span
//!   hangs under the orchestrator's.

use std::hash::{BuildHasher as _, Hasher as _};
use std::sync::atomic::{AtomicBool, Ordering};

use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use sha2::{Digest as _, Sha256};

/// The metadata key (and message field) of the trace context.
pub const TRACEPARENT: &str = "traceparent";
/// The target of our trace spans: keep it enabled (`saga_trace=info`, in every binary's default
/// filter) or log lines lose their `trace_id`.
pub const SPAN_TARGET: &str = "saga_trace";

/// A W3C trace context: the trace and the span of the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != N * 2
        || !text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

impl TraceContext {
    /// The trace of saga `saga_id` (its root span id is derived as well).
    pub fn for_saga(saga_id: &str) -> TraceContext {
        let digest = Sha256::digest(saga_id.as_bytes());
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        trace_id.copy_from_slice(&digest[..16]);
        span_id.copy_from_slice(&digest[16..24]);
        TraceContext { trace_id, span_id }
    }

    /// A new span of the same trace (a random span id).
    pub fn child(&self) -> TraceContext {
        let mut hasher = std::hash::RandomState::new().build_hasher();
        hasher.write(&self.span_id);
        let span_id = hasher.finish().max(1).to_be_bytes();
        TraceContext {
            trace_id: self.trace_id,
            span_id,
        }
    }

    /// `00-<trace id>-<span id>-01` (sampled).
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-01", hex(&self.trace_id), hex(&self.span_id))
    }

    /// The trace id as 32 lowercase hex digits (what the logs show).
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// Parses a `traceparent` of version 00; `None` for anything else (an invalid header is
    /// ignored, as the W3C recommendation says, never an error of the call).
    pub fn parse(text: &str) -> Option<TraceContext> {
        let mut parts = text.trim().split('-');
        let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version != "00" || parts.next().is_some() || unhex::<1>(flags).is_none() {
            return None;
        }
        let (trace_id, span_id) = (unhex::<16>(trace)?, unhex::<8>(span)?);
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceContext { trace_id, span_id })
    }

    /// Adds this context to a request of a client of ours.
    pub fn inject<T>(&self, request: &mut tonic::Request<T>) {
        if let Ok(value) = self.traceparent().parse() {
            request.metadata_mut().insert(TRACEPARENT, value);
        }
    }
}

/// The span a server of ours runs one call in: the method, and the caller's trace id when the
/// call carries a valid `traceparent`.
pub fn server_span(request: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let traceparent = request.headers().get(TRACEPARENT).and_then(|v| v.to_str().ok());
    call_span(request.uri().path(), traceparent)
}

/// The span of one served call (`method`: its path), carrying the caller's trace id from its
/// `traceparent` when valid: [`server_span`], and each call of a participant's step stream.
pub fn call_span(method: &str, traceparent: Option<&str>) -> tracing::Span {
    let context = traceparent.and_then(TraceContext::parse);
    let span = tracing::info_span!(
        target: SPAN_TARGET,
        "grpc",
        method = %method,
        trace_id = tracing::field::Empty
    );
    if let Some(context) = context {
        span.record("trace_id", context.trace_id_hex().as_str());
        context.parent(&span);
    }
    span
}

/// The span of work on saga `saga_id` (`what`: `driver`, `ack`, `compensation`), carrying the
/// saga's trace id, or the given context's (a message's `traceparent`).
pub fn saga_span(what: &'static str, saga_id: &str, context: Option<TraceContext>) -> tracing::Span {
    let context = context.unwrap_or_else(|| TraceContext::for_saga(saga_id));
    let span = tracing::info_span!(
        target: SPAN_TARGET,
        "saga",
        what,
        saga = %saga_id,
        trace_id = %context.trace_id_hex()
    );
    context.parent(&span);
    span
}

/// The trace context to send with a call or message about saga `saga_id`: the current span's
/// when spans are exported and the current span is of that saga's trace (so the receiver's
/// span is its child), else a new span id of the saga's trace.
pub fn outgoing(saga_id: &str) -> TraceContext {
    let saga = TraceContext::for_saga(saga_id);
    if OTLP_ON.load(Ordering::Relaxed) {
        use opentelemetry::trace::TraceContextExt as _;
        let current = tracing::Span::current().context();
        let current = current.span().span_context().clone();
        if current.is_valid() && current.trace_id().to_bytes() == saga.trace_id {
            return TraceContext {
                trace_id: saga.trace_id,
                span_id: current.span_id().to_bytes(),
            };
        }
    }
    saga.child()
}

/// Whether spans are exported (an [`OtlpExport`] was installed): only then do spans get an
/// OpenTelemetry parent, which costs an allocation per span.
static OTLP_ON: AtomicBool = AtomicBool::new(false);

impl TraceContext {
    /// Makes `span` a child of this (remote) context in the exported trace; nothing when no
    /// spans are exported.
    fn parent(&self, span: &tracing::Span) {
        if !OTLP_ON.load(Ordering::Relaxed) {
            return;
        }
        use opentelemetry::trace::{
            SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
        };
        let remote = SpanContext::new(
            TraceId::from_bytes(self.trace_id),
            SpanId::from_bytes(self.span_id),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        // An error means the span is disabled (filtered out): nothing to export then.
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
}

/// OTLP export of spans (`--otlp-endpoint`): where to, and as which service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpExport {
    /// The collector's OTLP/gRPC address, `http://host:port` (4317 is the usual port).
    pub endpoint: String,
    /// `service.name` of the exported spans (`saga-orchestrator`, `saga-participant-stock`).
    pub service_name: String,
}

/// What [`init_logging`] installed that needs stopping: the span exporter, if any.
#[must_use = "call shutdown before exit, or the last spans are not exported"]
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still queued (waits up to a few seconds for the collector). Call it
    /// from outside the Tokio runtime the exporter was made in, while that runtime still runs.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown_with_timeout(std::time::Duration::from_secs(5))
        {
            tracing::warn!(%error, "exporting the last spans failed");
        }
    }
}

/// How a process writes its log lines (standard error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (fields, span fields such as `trace_id`, level, target).
    Json,
}

/// Installs the process's log subscriber (an error names what went wrong with `otlp`'s
/// endpoint, or a second installation): levels from `RUST_LOG`, else `default_filter`;
/// lines on standard error in `format`; with `otlp`, the spans of our crates (targets
/// `saga*`) also go to that collector. With `otlp`, call it inside a Tokio runtime (the
/// exporter's gRPC channel runs on it) and stop the returned [`Telemetry`] before exit.
pub fn init_logging(
    default_filter: &str,
    format: LogFormat,
    otlp: Option<&OtlpExport>,
) -> Result<Telemetry, String> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let lines = match format {
        LogFormat::Text => lines.boxed(),
        LogFormat::Json => lines.json().with_current_span(true).with_span_list(true).boxed(),
    };
    let provider = otlp.map(otlp_provider).transpose()?;
    let export = provider.as_ref().map(|provider| {
        use opentelemetry::trace::TracerProvider as _;
        // Our spans only: the exporter's own gRPC client must not trace itself.
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("saga"))
            .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                meta.target().starts_with("saga")
            }))
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(lines)
        .with(export)
        .try_init()
        .map_err(|e| format!("installing the log subscriber: {e}"))?;
    OTLP_ON.store(provider.is_some(), Ordering::Relaxed);
    Ok(Telemetry { provider })
}

/// [`init_logging`] for a service process: with `otlp_endpoint` (the `otlp_endpoint`
/// setting, named as `sources` says in an error) its spans are exported as `service_name`,
/// through a channel that runs on `runtime`.
pub fn init_service_logging(
    runtime: &tokio::runtime::Runtime,
    default_filter: &str,
    format: LogFormat,
    otlp_endpoint: Option<String>,
    service_name: &str,
    sources: &crate::config::Sources,
) -> Result<Telemetry, String> {
    let otlp = otlp_endpoint.map(|endpoint| OtlpExport {
        endpoint,
        service_name: service_name.to_owned(),
    });
    let _entered = runtime.enter();
    init_logging(default_filter, format, otlp.as_ref())
        .map_err(|e| format!("{}: {e}", sources.name("otlp_endpoint")))
}

fn otlp_provider(otlp: &OtlpExport) -> Result<opentelemetry_sdk::trace::SdkTracerProvider, String> {
    use opentelemetry_otlp::WithExportConfig as _;
    let endpoint: tonic::transport::Uri = otlp
        .endpoint
        .parse()
        .map_err(|e| format!("{:?} is not a URL: {e}", otlp.endpoint))?;
    if endpoint.scheme_str() != Some("http") || endpoint.host().is_none() {
        return Err(format!(
            "{:?}: give http://host:port (OTLP over plaintext gRPC, to a collector on this host or network)",
            otlp.endpoint
        ));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(otlp.endpoint.clone())
        .build()
        .map_err(|e| format!("{:?}: {e}", otlp.endpoint))?;
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(otlp.service_name.clone())
                .build(),
        )
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saga_has_one_trace_and_its_traceparent_round_trips() {
        let root = TraceContext::for_saga("ord-1");
        assert_eq!(root, TraceContext::for_saga("ord-1"), "derived, not random");
        assert_ne!(root.trace_id, TraceContext::for_saga("ord-2").trace_id);
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.span_id, root.span_id);
        let text = child.traceparent();
        assert_eq!(text.len(), 55, "{text}");
        assert_eq!(TraceContext::parse(&text), Some(child));
    }

    #[test]
    fn invalid_traceparents_are_ignored() {
        let trace = "0af7651916cd43dd8448eb211c80319c";
        let span = "b7ad6b7169203331";
        assert!(TraceContext::parse(&format!("00-{trace}-{span}-01")).is_some());
        for bad in [
            format!("01-{trace}-{span}-01"),
            format!("00-{}-{span}-01", "0".repeat(32)),
            format!("00-{trace}-{}-01", "0".repeat(16)),
            format!("00-{}-{span}-01", trace.to_uppercase()),
            format!("00-{trace}-{span}"),
            format!("00-{trace}-{span}-01-extra"),
            "garbage".to_owned(),
        ] {
            assert_eq!(TraceContext::parse(&bad), None, "{bad}");
        }
    }
}

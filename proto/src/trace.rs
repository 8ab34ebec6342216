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

use std::hash::{BuildHasher as _, Hasher as _};

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
    let context = request
        .headers()
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse);
    let span = tracing::info_span!(
        target: SPAN_TARGET,
        "grpc",
        method = %request.uri().path(),
        trace_id = tracing::field::Empty
    );
    if let Some(context) = context {
        span.record("trace_id", context.trace_id_hex().as_str());
    }
    span
}

/// The span of work on saga `saga_id` (`what`: `driver`, `ack`, `compensation`), carrying the
/// saga's trace id, or the given context's (a message's `traceparent`).
pub fn saga_span(what: &'static str, saga_id: &str, context: Option<TraceContext>) -> tracing::Span {
    let context = context.unwrap_or_else(|| TraceContext::for_saga(saga_id));
    tracing::info_span!(
        target: SPAN_TARGET,
        "saga",
        what,
        saga = %saga_id,
        trace_id = %context.trace_id_hex()
    )
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

/// Installs the process's log subscriber: levels from `RUST_LOG`, else `default_filter`;
/// lines on standard error in `format`.
pub fn init_logging(default_filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(true).init(),
    }
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

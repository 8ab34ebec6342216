//! `sagactl audit`: offline audit of the data dirs of the orchestrator and the participants
//! (no server needed). Each data dir is opened with sled's lock, so a dir held by a running
//! process is refused with a clear message; stop the process (or audit a copy) first.
//!
//! - `verify`: checksums, hash chains, stream index, durable mark, and the projections
//!   rebuilt by replaying the log through the process's own projector (saga_storage::audit).
//! - `saga`: one saga's timeline across logs, correlated by saga id, in time order.
//! - `export`: every record as one JSON line.

use std::path::{Path, PathBuf};

use saga_storage::audit::{AuditLog, VerifyReport};
use saga_storage::{LOG_STREAM, LostTailAccepted, Record};
use serde_json::{Value, json};

use saga_orchestrator::events::SagaEvent;
use saga_storage::Position;

/// What kind of process wrote a log, from its streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogKind {
    Orchestrator,
    Participant,
    /// The embedded compensation transport's queue (`dev`).
    Queue,
    /// An empty log.
    Empty,
}

impl LogKind {
    fn name(self) -> &'static str {
        match self {
            LogKind::Orchestrator => "orchestrator",
            LogKind::Participant => "participant",
            LogKind::Queue => "embedded queue",
            LogKind::Empty => "empty",
        }
    }
}

const PARTICIPANT_PREFIXES: [&str; 4] = ["step/", "seed/", "consumer/", "poison/"];
const QUEUE_PREFIXES: [&str; 2] = ["topic/", "group/"];

fn stream_kind(stream: &str) -> Option<LogKind> {
    if stream == LOG_STREAM {
        None
    } else if PARTICIPANT_PREFIXES.iter().any(|p| stream.starts_with(p)) {
        Some(LogKind::Participant)
    } else if QUEUE_PREFIXES.iter().any(|p| stream.starts_with(p)) {
        Some(LogKind::Queue)
    } else {
        Some(LogKind::Orchestrator)
    }
}

/// The kind of the log, from its first record that is not the log's own.
pub fn kind_of(log: &AuditLog) -> Result<LogKind, String> {
    for record in log.records(Position::FIRST) {
        let record = record.map_err(|e| e.to_string())?;
        if let Some(kind) = stream_kind(record.stream()) {
            return Ok(kind);
        }
    }
    Ok(LogKind::Empty)
}

/// The saga a record belongs to, if any.
pub fn saga_of(record: &Record) -> Option<&str> {
    let stream = record.stream();
    match stream_kind(stream)? {
        LogKind::Orchestrator => Some(stream),
        LogKind::Participant => {
            if let Some(rest) = stream.strip_prefix("step/") {
                return rest.rsplit_once('/').map(|(saga, _)| saga);
            }
            if stream.starts_with("consumer/") || stream.starts_with("poison/") {
                let key = stream.rsplit('/').next()?;
                return key.rsplit_once(':').map(|(saga, _)| saga);
            }
            None
        }
        LogKind::Queue | LogKind::Empty => None,
    }
}

/// The payload as JSON, decoded with the type the record's stream implies (null if it does
/// not decode: the hex is in `payload_hex` then).
pub fn payload_json(record: &Record) -> Value {
    let decoded = match stream_kind(record.stream()) {
        None => record
            .decode::<LostTailAccepted>()
            .ok()
            .and_then(|e| serde_json::to_value(e).ok()),
        Some(LogKind::Orchestrator) => record
            .decode::<SagaEvent>()
            .ok()
            .and_then(|e| serde_json::to_value(e).ok()),
        Some(LogKind::Participant) => participant_json(record),
        Some(LogKind::Queue | LogKind::Empty) => None,
    };
    decoded.unwrap_or(Value::Null)
}

#[cfg(feature = "dev")]
fn participant_json(record: &Record) -> Option<Value> {
    record
        .decode::<saga_participants::record::ParticipantEvent>()
        .ok()
        .and_then(|e| serde_json::to_value(e).ok())
}

#[cfg(not(feature = "dev"))]
fn participant_json(_record: &Record) -> Option<Value> {
    None
}

pub fn record_json(record: &Record) -> Value {
    let payload = payload_json(record);
    let mut value = json!({
        "position": record.position(),
        "stream": record.stream(),
        "version": record.version(),
        "event_type": record.event_type(),
        "timestamp_unix_us": record.timestamp_us(),
        "checksum": format!("{:016x}", record.checksum()),
        "prev_checksum": format!("{:016x}", record.prev_checksum()),
        "payload": payload,
    });
    if value["payload"].is_null() {
        let hex: String = record.payload().iter().map(|b| format!("{b:02x}")).collect();
        value["payload_hex"] = Value::String(hex);
    }
    value
}

fn open(dir: &Path) -> Result<AuditLog, String> {
    AuditLog::open(dir).map_err(|e| format!("--data-dir {}: {e}", dir.display()))
}

/// `audit verify`: prints the report; `Ok(true)` when clean.
pub fn verify(dir: &Path, as_json: bool) -> Result<bool, String> {
    let log = open(dir)?;
    let kind = kind_of(&log)?;
    let report: VerifyReport = match kind {
        LogKind::Orchestrator => log.verify(Some(&saga_orchestrator::projector::SagaProjector)),
        #[cfg(feature = "dev")]
        LogKind::Participant => log.verify(Some(&saga_participants::projector::ParticipantProjector)),
        _ => log.verify(None),
    }
    .map_err(|e| format!("{}: {e}", dir.display()))?;
    let clean = report.findings.is_empty();
    if as_json {
        println!(
            "{}",
            json!({
                "data_dir": dir.display().to_string(), "kind": kind.name(), "clean": clean,
                "records": report.records, "streams": report.streams, "projection_keys": report.projection_keys,
                "findings": report.findings.iter().map(|f| json!({"position": f.position, "what": f.what})).collect::<Vec<_>>(),
            })
        );
    } else if clean {
        println!(
            "ok: {} ({} log): {} records, {} streams, checksums, hash chains, stream index and durable mark verified; {} projection keys equal to a replay",
            dir.display(),
            kind.name(),
            report.records,
            report.streams,
            report.projection_keys
        );
    } else {
        println!(
            "NOT CLEAN: {} ({} log), {} records",
            dir.display(),
            kind.name(),
            report.records
        );
        for finding in &report.findings {
            println!("  {finding}");
        }
    }
    Ok(clean)
}

/// `audit export`: one JSON line per record from `from`.
pub fn export(dir: &Path, from: u64) -> Result<(), String> {
    let log = open(dir)?;
    for record in log.records(Position::new(from)) {
        let record = record.map_err(|e| e.to_string())?;
        println!("{}", record_json(&record));
    }
    Ok(())
}

/// One line of a saga's timeline.
struct Entry {
    timestamp_us: i64,
    log: String,
    record: Record,
}

/// `audit saga`: the saga's records from every log, in time order.
pub fn saga(saga_id: &str, dirs: &[PathBuf], as_json: bool) -> Result<(), String> {
    let mut entries = Vec::new();
    for dir in dirs {
        let log = open(dir)?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        for record in log.records(Position::FIRST) {
            let record = record.map_err(|e| format!("{}: {e}", dir.display()))?;
            if saga_of(&record) == Some(saga_id) {
                entries.push(Entry {
                    timestamp_us: record.timestamp_us(),
                    log: name.clone(),
                    record,
                });
            }
        }
    }
    if entries.is_empty() {
        return Err(format!("saga {saga_id}: no record in {} data dir(s)", dirs.len()));
    }
    // Time order; within one log (and one timestamp) position order.
    entries.sort_by(|a, b| {
        (a.timestamp_us, &a.log, a.record.position()).cmp(&(b.timestamp_us, &b.log, b.record.position()))
    });
    if as_json {
        for e in &entries {
            let mut value = record_json(&e.record);
            value["log"] = Value::String(e.log.clone());
            println!("{value}");
        }
        return Ok(());
    }
    println!(
        "{:<27} {:<12} {:>8}  {:<40} {:<24} DETAIL",
        "TIME (UTC)", "LOG", "POSITION", "STREAM", "EVENT"
    );
    for e in &entries {
        let payload = payload_json(&e.record);
        let detail = match &payload {
            Value::Object(map) if map.len() == 1 => {
                map.values().next().map(Value::to_string).unwrap_or_default()
            }
            Value::Null => String::new(),
            other => other.to_string(),
        };
        println!(
            "{:<27} {:<12} {:>8}  {:<40} {:<24} {}",
            utc(e.timestamp_us),
            e.log,
            e.record.position(),
            e.record.stream(),
            e.record.event_type(),
            detail
        );
    }
    Ok(())
}

/// Unix microseconds as `YYYY-MM-DDTHH:MM:SS.ffffffZ` (proleptic Gregorian, UTC).
pub fn utc(unix_us: i64) -> String {
    let secs = unix_us.div_euclid(1_000_000);
    let micros = unix_us.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(super::utc(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(super::utc(1_796_083_200_123_456), "2026-12-01T00:00:00.123456Z");
        assert_eq!(super::utc(951_782_400_000_001), "2000-02-29T00:00:00.000001Z");
    }
}

//! Offline audit of a data dir: read every record, verify checksums, hash chains, the stream
//! index, the durable mark, and the projections (rebuilt by replaying the log through the
//! projector and compared with the stored ones). Used by `sagactl audit`.
//!
//! The data dir is opened with sled's lock: a directory held by a running process is refused
//! with `StorageError::Locked`, never read half-way.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use sled::IVec;

use crate::error::StorageError;
use crate::log::{LOG_STREAM, Record, check_mark, covering, decode_position, open_sled};
use crate::position::Position;
use crate::projection::{EventView, ProjectError, ProjectionTx, Projector};

/// Most findings a verification collects before it stops looking.
pub const FINDINGS_MAX: usize = 20;

/// One thing that is wrong, with where (`position` when it is a record's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub position: Option<u64>,
    pub what: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.position {
            Some(position) => write!(f, "position {position}: {}", self.what),
            None => f.write_str(&self.what),
        }
    }
}

/// What a verification found.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub records: u64,
    pub streams: u64,
    pub projection_keys: u64,
    /// Empty when the data dir is clean; otherwise the first problems, earliest position first.
    pub findings: Vec<Finding>,
}

/// A data dir opened for audit (holding sled's lock until dropped).
pub struct AuditLog {
    path: PathBuf,
    events: sled::Tree,
    streams: sled::Tree,
    projections: sled::Tree,
    _db: sled::Db,
}

impl AuditLog {
    /// Opens the log at `path` for reading. Refuses a directory without a log (it would create
    /// one) and one held by another process.
    pub fn open(path: &Path) -> Result<AuditLog, StorageError> {
        if !path.join("db").exists() && !path.join("conf").exists() {
            return Err(StorageError::Invalid {
                field: "data_dir",
                reason: format!("{} holds no event log", path.display()),
            });
        }
        let config = sled::Config::new()
            .path(path)
            .cache_capacity(16 * 1024 * 1024)
            .flush_every_ms(None);
        let db = open_sled(&config, path)?;
        Ok(AuditLog {
            path: path.to_owned(),
            events: db.open_tree("events")?,
            streams: db.open_tree("streams")?,
            projections: db.open_tree("projections")?,
            _db: db,
        })
    }

    /// The records from position `from` on (`NONE`: from the first), in order, each verified
    /// (checksum and position).
    pub fn records(&self, from: Position) -> impl Iterator<Item = Result<Record, StorageError>> + '_ {
        self.events
            .range(from.or_first().get().to_be_bytes()..)
            .map(|entry| {
                let (key, value) = entry?;
                let position = decode_position("events", &key, &key)?;
                Record::verify(position, value)
            })
    }

    /// The last position (`NONE` for an empty log).
    pub fn last_position(&self) -> Result<Position, StorageError> {
        match self.events.last()? {
            Some((key, _)) => decode_position("events", &key, &key).map(Position::new),
            None => Ok(Position::NONE),
        }
    }

    /// Verifies everything: every record's checksum, positions without gaps, each stream's
    /// versions and hash chain, the stream index, the durable mark, and (with `projector`) the
    /// projections against a replay of the log.
    pub fn verify(&self, projector: Option<&dyn Projector>) -> Result<VerifyReport, StorageError> {
        let mut report = VerifyReport::default();
        let mut findings: Vec<Finding> = Vec::new();
        let add = |findings: &mut Vec<Finding>, position: Option<u64>, what: String| {
            if findings.len() < FINDINGS_MAX {
                findings.push(Finding { position, what });
            }
        };
        // stream -> (version, checksum, position) of its last record seen.
        let mut heads: HashMap<String, (u64, u64, u64)> = HashMap::new();
        let mut expected = 1u64;
        // Index entries that name a record's exact stream, version and position.
        let mut index_matched = 0u64;
        let replay = match projector {
            Some(_) => Some(
                sled::Config::new()
                    .temporary(true)
                    .open()?
                    .open_tree("projections")?,
            ),
            None => None,
        };
        for entry in self.events.iter() {
            let (key, value) = entry?;
            let position = decode_position("events", &key, &key)?;
            if position != expected {
                add(
                    &mut findings,
                    Some(expected),
                    format!(
                        "positions {expected}..{} are missing (the next record is at {position})",
                        position - 1
                    ),
                );
            }
            expected = position + 1;
            report.records += 1;
            let record = match Record::verify(position, value) {
                Ok(record) => record,
                Err(error) => {
                    add(&mut findings, Some(position), error.to_string());
                    continue;
                }
            };
            let stream = record.stream();
            let (last_version, last_checksum, last_position) =
                heads.get(stream).copied().unwrap_or((0, 0, 0));
            if record.version().get() != last_version + 1 {
                add(
                    &mut findings,
                    Some(position),
                    format!(
                        "stream {stream:?} goes from version {last_version} to {}",
                        record.version()
                    ),
                );
            }
            if record.prev_checksum() != last_checksum {
                let previous = if last_position == 0 {
                    "it is the stream's first record (expected 0)".to_owned()
                } else {
                    format!(
                        "the stream's previous record (position {last_position}) has checksum {last_checksum:#018x}"
                    )
                };
                add(
                    &mut findings,
                    Some(position),
                    format!(
                        "hash chain of stream {stream:?} broken: v{} names prev_checksum {:#018x}, {previous}",
                        record.version(),
                        record.prev_checksum()
                    ),
                );
            }
            // The index entry covering this version (one per append, its last version) must
            // place it here; an entry naming this very version counts as matched.
            let version = record.version().get();
            match covering(&self.streams, stream, version) {
                Ok(Some(entry)) if entry.position_of(stream, version).ok() == Some(position) => {
                    if entry.last_version == version {
                        index_matched += 1;
                    }
                }
                other => add(
                    &mut findings,
                    Some(position),
                    match other {
                        Ok(Some(entry)) => format!(
                            "stream index for {stream:?} v{version}: its entry (v{} at {}) does not place it here",
                            entry.last_version, entry.last_position
                        ),
                        Ok(None) => format!("stream index for {stream:?} v{version}: no entry covers it"),
                        Err(error) => format!("stream index for {stream:?} v{version}: {error}"),
                    },
                ),
            }
            heads.insert(
                stream.to_owned(),
                (record.version().get(), record.checksum(), position),
            );
            if let (Some(projector), Some(replay)) = (projector, &replay)
                && stream != LOG_STREAM
                && let Err(what) = replay_one(projector, replay, &record)
            {
                add(
                    &mut findings,
                    Some(position),
                    format!("replay refused the event: {what}"),
                );
            }
        }
        report.streams = heads.len() as u64;
        let index_len = self.streams.len() as u64;
        if index_len != index_matched {
            add(
                &mut findings,
                None,
                format!(
                    "the stream index has {index_len} entries, of which {index_matched} name a record's stream, version and position"
                ),
            );
        }
        if let Err(refusal) = check_mark(&self.path, &self.events, expected - 1) {
            add(&mut findings, Some(expected - 1), refusal.to_string());
        }
        if let Some(replay) = &replay {
            report.projection_keys = self.projections.len() as u64;
            if let Some(what) = compare_trees(&self.projections, replay)? {
                add(&mut findings, None, what);
            }
        }
        findings.sort_by_key(|f| f.position.unwrap_or(u64::MAX));
        report.findings = findings;
        Ok(report)
    }
}

fn replay_one(projector: &dyn Projector, tree: &sled::Tree, record: &Record) -> Result<(), String> {
    let view = EventView {
        position: record.position(),
        stream: record.stream(),
        version: record.version(),
        event_type: record.event_type(),
        timestamp_us: record.timestamp_us(),
        payload: record.payload(),
    };
    let result = tree.transaction(|tx| {
        let mut ptx = ProjectionTx { tree: tx };
        match projector.project(&view, &mut ptx) {
            Ok(()) => Ok(Ok(())),
            Err(ProjectError::Refused(refusal)) => Ok(Err(refusal.to_string())),
            Err(ProjectError::Invalid(reason)) => Ok(Err(reason)),
            Err(ProjectError::Tx(error)) => {
                Err(sled::transaction::ConflictableTransactionError::<()>::from(error))
            }
        }
    });
    match result {
        Ok(outcome) => outcome,
        Err(error) => Err(format!("{error:?}")),
    }
}

fn show(value: Option<&IVec>) -> String {
    match value {
        None => "absent".into(),
        Some(v) => match std::str::from_utf8(v) {
            Ok(text) if text.len() <= 120 => format!("{text:?}"),
            _ => {
                let hex: String = v.iter().take(48).map(|b| format!("{b:02x}")).collect();
                format!("{} bytes {hex}{}", v.len(), if v.len() > 48 { ".." } else { "" })
            }
        },
    }
}

/// The first key where the stored and the replayed projections differ.
fn compare_trees(stored: &sled::Tree, replayed: &sled::Tree) -> Result<Option<String>, StorageError> {
    let mut a = stored.iter();
    let mut b = replayed.iter();
    let (mut x, mut y) = (a.next().transpose()?, b.next().transpose()?);
    loop {
        match (&x, &y) {
            (None, None) => return Ok(None),
            (Some((kx, vx)), Some((ky, vy))) if kx == ky => {
                if vx != vy {
                    return Ok(Some(format!(
                        "projection {}: stored {}, the replay gives {}",
                        String::from_utf8_lossy(kx),
                        show(Some(vx)),
                        show(Some(vy))
                    )));
                }
                x = a.next().transpose()?;
                y = b.next().transpose()?;
            }
            (Some((kx, vx)), Some((ky, _))) if kx < ky => {
                return Ok(Some(format!(
                    "projection {}: stored {}, the replay has no such key",
                    String::from_utf8_lossy(kx),
                    show(Some(vx))
                )));
            }
            (Some((kx, vx)), None) => {
                return Ok(Some(format!(
                    "projection {}: stored {}, the replay has no such key",
                    String::from_utf8_lossy(kx),
                    show(Some(vx))
                )));
            }
            (_, Some((ky, vy))) => {
                return Ok(Some(format!(
                    "projection {} is missing: the replay gives {}",
                    String::from_utf8_lossy(ky),
                    show(Some(vy))
                )));
            }
        }
    }
}

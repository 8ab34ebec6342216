//! The durable mark: a small file beside sled's files that says how far the log was durable
//! when it was last flushed, so that a log that lost its tail is detected at open instead of
//! serving silently without acknowledged records.
//!
//! # Why
//!
//! sled recovers to the longest valid prefix of its own log file. If the end of that file is
//! lost (a cut file, a disk that dropped acknowledged writes), sled opens normally and the
//! records of the lost tail are simply gone: appends that were acknowledged to callers, whose
//! effects other processes already acted on. Nothing inside the database can tell, because the
//! evidence was in the lost part. The mark keeps that evidence outside the tail.
//!
//! # What it holds (`durable-mark` in the data dir)
//!
//! Two slots of [`SLOT_LEN`] bytes at offsets 0 and `SLOT_LEN`, written alternately, each:
//! magic, slot sequence number, the last durable position, the checksum of the record at that
//! position, and the positions and streams of the most recent appends (at most
//! [`RECENT_LEN_MAX`]), then an xxh3 checksum of the slot. The reader takes the valid slot with
//! the highest sequence number, so a torn write of one slot leaves the other.
//!
//! # Cost and staleness
//!
//! The flusher writes the mark after every flush that made records durable, before it
//! answers that flush's appends or shows their records to readers: one `pwrite` of a few
//! hundred bytes to a few KiB into the page cache (about 10 us with the encoding; the fsync of
//! the log is 0.1-1 ms). It `fdatasync`s the mark at most every [`SYNC_INTERVAL`], after the
//! answers ([`MarkWriter::sync_if_due`]). So:
//! - when the process is killed (SIGKILL, panic, OOM), the mark is exact: the page cache
//!   survives the process, and no record was acknowledged or read before the mark named it
//!   (an earlier version wrote the mark after the answers, and a kill between the two let a
//!   cut log lose acknowledged records silently: `storage/tests/crash.rs` caught it);
//! - after a power loss it may lag by the records flushed in the last [`SYNC_INTERVAL`]: a
//!   lost tail within that window is not detected. It never runs ahead of the log: it is
//!   written only after sled's flush returned.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::StorageError;
use crate::record_format::checksum;

/// The mark's file name inside the data dir.
pub const FILE_NAME: &str = "durable-mark";
/// Bytes per slot; the file is two slots.
pub const SLOT_LEN: usize = 16 * 1024;
/// Most recent appends whose streams the mark names.
pub const RECENT_LEN_MAX: usize = 48;
/// Longest interval between two fdatasyncs of the mark while the log is written.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(250);

const MAGIC: &[u8; 8] = b"SAGAMRK1";

/// One recent append: its positions and stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecentAppend {
    pub first_position: u64,
    pub last_position: u64,
    pub stream: String,
}

/// What a mark says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Mark {
    /// The last durable position when the mark was written (0: empty log).
    pub position: u64,
    /// The checksum of the record at `position` (0 for an empty log).
    pub checksum: u64,
    /// The most recent appends, oldest first.
    pub recent: Vec<RecentAppend>,
}

impl Mark {
    /// The streams of recent appends above `position`, and whether older appends above it may
    /// be missing from the list (the list is bounded).
    pub fn streams_after(&self, position: u64) -> (Vec<String>, bool) {
        let mut streams: Vec<String> = Vec::new();
        for append in self.recent.iter().filter(|a| a.last_position > position) {
            if !streams.contains(&append.stream) {
                streams.push(append.stream.clone());
            }
        }
        let covered_from = self.recent.first().map_or(u64::MAX, |a| a.first_position);
        (streams, covered_from > position + 1)
    }
}

#[cfg(test)]
fn encode_slot(seq: u64, mark: &Mark) -> Vec<u8> {
    let mut out = Vec::new();
    encode_slot_into(&mut out, seq, mark.position, mark.checksum, &mark.recent);
    out
}

/// Encodes a slot into `out` (cleared first), from the recent appends by reference: the
/// flusher writes one per flush, so nothing of it is cloned or allocated once `out` has grown
/// to a slot's size.
fn encode_slot_into<'a, R>(out: &mut Vec<u8>, seq: u64, position: u64, checksum_at: u64, recent: R)
where
    R: IntoIterator<Item = &'a RecentAppend>,
    R::IntoIter: DoubleEndedIterator + ExactSizeIterator + Clone,
{
    out.clear();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&position.to_le_bytes());
    out.extend_from_slice(&checksum_at.to_le_bytes());
    // Keep the newest appends that fit in the slot.
    let recent = recent.into_iter();
    let mut kept = 0;
    let mut len = out.len() + 2 + 8;
    for append in recent.clone().rev() {
        let entry_len = 8 + 8 + 2 + append.stream.len();
        if len + entry_len > SLOT_LEN || kept >= RECENT_LEN_MAX {
            break;
        }
        len += entry_len;
        kept += 1;
    }
    out.reserve(len - out.len());
    out.extend_from_slice(&(kept as u16).to_le_bytes());
    let skipped = recent.len() - kept;
    for append in recent.skip(skipped) {
        out.extend_from_slice(&append.first_position.to_le_bytes());
        out.extend_from_slice(&append.last_position.to_le_bytes());
        out.extend_from_slice(&(append.stream.len() as u16).to_le_bytes());
        out.extend_from_slice(append.stream.as_bytes());
    }
    let sum = checksum(out);
    out.extend_from_slice(&sum.to_le_bytes());
}

/// Reads fields from the front of a byte slice.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let slice = self.bytes.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(slice)
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
}

/// Decodes a slot; `None` when it is empty, torn or not a mark.
fn decode_slot(bytes: &[u8]) -> Option<(u64, Mark)> {
    let mut cursor = Cursor { bytes, at: 0 };
    if cursor.take(8)? != MAGIC {
        return None;
    }
    let seq = cursor.u64()?;
    let position = cursor.u64()?;
    let sum = cursor.u64()?;
    let count = cursor.u16()? as usize;
    let mut recent = Vec::with_capacity(count.min(RECENT_LEN_MAX));
    for _ in 0..count {
        let first_position = cursor.u64()?;
        let last_position = cursor.u64()?;
        let len = cursor.u16()? as usize;
        let stream = String::from_utf8(cursor.take(len)?.to_vec()).ok()?;
        recent.push(RecentAppend {
            first_position,
            last_position,
            stream,
        });
    }
    let body_len = cursor.at;
    if cursor.u64()? != checksum(&bytes[..body_len]) {
        return None;
    }
    Some((
        seq,
        Mark {
            position,
            checksum: sum,
            recent,
        },
    ))
}

/// The mark's path for a data dir.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// What reading the mark found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// No mark file: a new data dir, or one written before marks existed.
    Missing,
    /// The file exists but neither slot is valid.
    Unreadable,
    Mark(Mark),
}

/// Reads the mark of the data dir `dir`.
pub fn read(dir: &Path) -> Result<Found, StorageError> {
    let bytes = match std::fs::read(path(dir)) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Found::Missing),
        Err(e) => return Err(StorageError::Failed(format!("read {}: {e}", path(dir).display()))),
    };
    let slots = [
        bytes.get(..SLOT_LEN.min(bytes.len())).and_then(decode_slot),
        bytes.get(SLOT_LEN..).and_then(decode_slot),
    ];
    Ok(slots
        .into_iter()
        .flatten()
        .max_by_key(|(seq, _)| *seq)
        .map_or(Found::Unreadable, |(_, mark)| Found::Mark(mark)))
}

/// Writes the mark after each flush (owned by the flusher thread).
pub struct MarkWriter {
    file: File,
    seq: u64,
    recent: VecDeque<RecentAppend>,
    last_sync: Instant,
    unsynced: bool,
    /// The slot being written, kept between writes (see `encode_slot_into`).
    slot: Vec<u8>,
}

impl MarkWriter {
    /// Opens (or creates) the mark file of `dir`, continuing from `start`.
    pub fn open(dir: &Path, start: &Mark) -> Result<MarkWriter, StorageError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path(dir))
            .map_err(|e| StorageError::Failed(format!("open {}: {e}", path(dir).display())))?;
        let mut writer = MarkWriter {
            file,
            seq: 0,
            recent: start.recent.iter().cloned().collect(),
            last_sync: Instant::now(),
            unsynced: false,
            slot: Vec::with_capacity(SLOT_LEN),
        };
        // Start both slots from `start`, durably: the log and its mark agree from here on.
        writer.write(start.position, start.checksum, [])?;
        writer.write(start.position, start.checksum, [])?;
        writer.sync()?;
        Ok(writer)
    }

    /// Records that the log is durable up to `position` (the record there has `checksum`),
    /// after `appends`: into the page cache, synced later by [`MarkWriter::sync_if_due`].
    pub fn write(
        &mut self,
        position: u64,
        checksum: u64,
        appends: impl IntoIterator<Item = RecentAppend>,
    ) -> Result<(), StorageError> {
        for append in appends {
            if self.recent.len() == RECENT_LEN_MAX {
                self.recent.pop_front();
            }
            self.recent.push_back(append);
        }
        self.seq += 1;
        encode_slot_into(&mut self.slot, self.seq, position, checksum, &self.recent);
        let offset = (self.seq % 2) * SLOT_LEN as u64;
        self.file
            .write_all_at(&self.slot, offset)
            .map_err(|e| StorageError::Failed(format!("write the durable mark: {e}")))?;
        self.unsynced = true;
        Ok(())
    }

    /// fdatasyncs the mark when the last sync is older than [`SYNC_INTERVAL`].
    pub fn sync_if_due(&mut self) -> Result<(), StorageError> {
        if self.last_sync.elapsed() >= SYNC_INTERVAL {
            self.sync()?;
        }
        Ok(())
    }

    /// fdatasyncs the mark if anything was written since the last sync.
    pub fn sync(&mut self) -> Result<(), StorageError> {
        if self.unsynced {
            self.file
                .sync_data()
                .map_err(|e| StorageError::Failed(format!("sync the durable mark: {e}")))?;
            self.unsynced = false;
        }
        self.last_sync = Instant::now();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(position: u64) -> Mark {
        Mark {
            position,
            checksum: position * 7,
            recent: (1..=position.min(3))
                .map(|p| RecentAppend {
                    first_position: p,
                    last_position: p,
                    stream: format!("s{p}"),
                })
                .collect(),
        }
    }

    #[test]
    fn a_slot_round_trips_and_a_torn_one_is_ignored() {
        let slot = encode_slot(5, &mark(3));
        assert_eq!(decode_slot(&slot), Some((5, mark(3))));
        for cut in [0, 1, 9, slot.len() - 1] {
            assert_eq!(decode_slot(&slot[..cut]), None, "cut at {cut}");
        }
        let mut flipped = slot.clone();
        flipped[20] ^= 1;
        assert_eq!(decode_slot(&flipped), None);
    }

    #[test]
    fn the_newest_valid_slot_wins_and_a_torn_newest_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = MarkWriter::open(dir.path(), &Mark::default()).unwrap();
        for p in 1..=5 {
            writer
                .write(
                    p,
                    p * 7,
                    [RecentAppend {
                        first_position: p,
                        last_position: p,
                        stream: format!("s{p}"),
                    }],
                )
                .unwrap();
        }
        let Found::Mark(found) = read(dir.path()).unwrap() else {
            panic!("a mark");
        };
        assert_eq!((found.position, found.checksum, found.recent.len()), (5, 35, 5));
        assert_eq!(
            found.streams_after(3),
            (vec!["s4".to_owned(), "s5".to_owned()], false)
        );
        // Tear the newest slot (seq 7 -> offset SLOT_LEN): the previous one is read.
        let file = OpenOptions::new().write(true).open(path(dir.path())).unwrap();
        file.write_all_at(&[0xff; 16], SLOT_LEN as u64 + 20).unwrap();
        let Found::Mark(found) = read(dir.path()).unwrap() else {
            panic!("a mark");
        };
        assert_eq!(found.position, 4);
    }

    #[test]
    fn a_slot_keeps_the_newest_appends_that_fit_in_order() {
        let long = |p: u64| RecentAppend {
            first_position: p,
            last_position: p + 1,
            stream: format!("{p:04}{}", "x".repeat(996)),
        };
        let mark = Mark {
            position: 100,
            checksum: 7,
            recent: (1..=RECENT_LEN_MAX as u64).map(long).collect(),
        };
        let slot = encode_slot(9, &mark);
        assert!(slot.len() <= SLOT_LEN, "{}", slot.len());
        // 8 magic + 3 * 8 fields + 2 count + 8 checksum, then 18 + 1000 bytes an append.
        let fit = (SLOT_LEN - 42) / 1018;
        let (seq, decoded) = decode_slot(&slot).expect("decodes");
        assert_eq!(seq, 9);
        assert_eq!(decoded.recent, mark.recent[mark.recent.len() - fit..]);
    }

    #[test]
    fn missing_and_unreadable_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), Found::Missing);
        std::fs::write(path(dir.path()), b"garbage").unwrap();
        assert_eq!(read(dir.path()).unwrap(), Found::Unreadable);
    }
}

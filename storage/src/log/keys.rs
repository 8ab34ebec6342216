//! The keys of the `events` and `streams` trees, and reading a stream's head from them.

use super::*;

pub(crate) fn stream_key(stream: &str, version: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(stream.len() + 9);
    key.extend_from_slice(stream.as_bytes());
    key.push(0);
    key.extend_from_slice(&version.to_be_bytes());
    key
}

pub(crate) fn decode_position(tree: &'static str, key: &[u8], value: &[u8]) -> Result<u64, StorageError> {
    let bytes: [u8; 8] = value.try_into().map_err(|_| StorageError::CorruptIndex {
        tree,
        key: key.to_vec(),
        reason: format!("value of {} bytes, expected 8", value.len()),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

/// One entry of the stream index: the last version of an append and its position. The
/// append's events are at consecutive positions, so it also places every version of the
/// stream after the previous entry's, up to its own.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IndexEntry {
    pub(crate) last_version: u64,
    pub(crate) last_position: u64,
}

impl IndexEntry {
    /// The entry at `key` if the key is `stream`'s (`stream ++ 0x00 ++ version`); `None` for a
    /// key of another stream inside the range (a name that extends `stream ++ 0x00`).
    fn decode(stream: &str, key: &[u8], value: &[u8]) -> Option<Result<IndexEntry, StorageError>> {
        if key.len() != stream.len() + 9 {
            return None;
        }
        let version = u64::from_be_bytes(key[stream.len() + 1..].try_into().expect("8 bytes"));
        Some(
            decode_position("streams", key, value).map(|last_position| IndexEntry {
                last_version: version,
                last_position,
            }),
        )
    }

    /// The position of `version` in this entry's run. An entry that would place it before
    /// the log's start, or that does not reach it, is corrupt; the record found at the
    /// position is checked by the caller (its stream and version).
    pub(crate) fn position_of(&self, stream: &str, version: u64) -> Result<u64, StorageError> {
        self.last_version
            .checked_sub(version)
            .and_then(|back| self.last_position.checked_sub(back))
            .filter(|&position| position >= 1)
            .ok_or_else(|| StorageError::Corrupt {
                position: self.last_position,
                reason: format!(
                    "the stream index puts {stream:?} v{} here, which cannot place v{version}",
                    self.last_version
                ),
            })
    }
}

/// The index entries of `stream` from the one covering `version` on, in version order.
pub(crate) fn entries_from<'s>(
    streams: &sled::Tree,
    stream: &'s str,
    version: u64,
) -> impl Iterator<Item = Result<IndexEntry, StorageError>> + 's {
    streams
        .range(stream_key(stream, version)..=stream_key(stream, u64::MAX))
        .filter_map(move |entry| match entry {
            Ok((key, value)) => IndexEntry::decode(stream, &key, &value),
            Err(error) => Some(Err(error.into())),
        })
}

/// The index entry covering `version` of `stream` (the first at or after it: the entry of
/// the append that wrote it), if the stream reaches that version.
pub(crate) fn covering(
    streams: &sled::Tree,
    stream: &str,
    version: u64,
) -> Result<Option<IndexEntry>, StorageError> {
    entries_from(streams, stream, version).next().transpose()
}

/// The stream's last (version, position) from the stream index, if it has any event.
pub(super) fn last_version(streams: &sled::Tree, stream: &str) -> Result<Option<(u64, u64)>, StorageError> {
    let (lo, hi) = (stream_key(stream, 1), stream_key(stream, u64::MAX));
    // The last entry in the stream's range, without the leaf copy of an iterator (a new
    // stream, a participant's every step, has none: vendor/sled/PATCHES.md item 9). An entry
    // that is not this stream's takes the loop below, which skips such entries.
    match streams.last_in(&lo, &hi)? {
        None => return Ok(None),
        Some((key, value)) => {
            if let Some(entry) = IndexEntry::decode(stream, &key, &value) {
                let entry = entry?;
                return Ok(Some((entry.last_version, entry.last_position)));
            }
        }
    }
    for entry in streams.range(lo..=hi).rev() {
        let (key, value) = entry?;
        if let Some(entry) = IndexEntry::decode(stream, &key, &value) {
            let entry = entry?;
            return Ok(Some((entry.last_version, entry.last_position)));
        }
    }
    Ok(None)
}

/// A stream's head: its version and the checksum of its last record (0, 0 for a new stream),
/// from committed data.
pub(super) fn load_head(trees: &Trees, stream: &str) -> Result<(u64, u64), StorageError> {
    let Some((version, position)) = last_version(&trees.streams, stream)? else {
        return Ok((0, 0));
    };
    let bytes = trees
        .events
        .get(position.to_be_bytes())?
        .ok_or_else(|| StorageError::Corrupt {
            position,
            reason: "indexed record is missing".into(),
        })?;
    let record = Record::verify(position, bytes)?;
    if record.version().get() != version || record.stream() != stream {
        return Err(StorageError::Corrupt {
            position,
            reason: format!("index says {stream:?} v{version}, record disagrees"),
        });
    }
    Ok((version, record.checksum()))
}

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

/// The stream's last (version, position) from the stream index, if it has any event.
pub(super) fn last_version(streams: &sled::Tree, stream: &str) -> Result<Option<(u64, u64)>, StorageError> {
    let Some(entry) = streams
        .range(stream_key(stream, 1)..=stream_key(stream, u64::MAX))
        .next_back()
    else {
        return Ok(None);
    };
    let (key, value) = entry?;
    let position = decode_position("streams", &key, &value)?;
    let version_bytes: [u8; 8] = key[key.len() - 8..]
        .try_into()
        .expect("stream keys end in 8 bytes");
    Ok(Some((u64::from_be_bytes(version_bytes), position)))
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

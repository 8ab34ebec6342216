//! A stored record as readers get it: verified once when read, then borrowed from.

use super::*;

/// A stored record, verified when read. Holds the stored bytes; accessors borrow from them.
#[derive(Clone)]
pub struct Record {
    pub(super) bytes: IVec,
    pub(super) layout: Layout,
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("position", &self.position())
            .field("stream", &self.stream())
            .field("version", &self.version())
            .field("event_type", &self.event_type())
            .field("payload_len", &self.payload().len())
            .finish()
    }
}

impl Record {
    /// Verifies `bytes` read from `position`: checksum, layout, and that the record says it is
    /// the record at that position.
    pub(crate) fn verify(position: u64, bytes: IVec) -> Result<Record, StorageError> {
        let layout = record_format::decode(&bytes).map_err(|e| StorageError::Corrupt {
            position,
            reason: e.to_string(),
        })?;
        if layout.position != position {
            return Err(StorageError::Corrupt {
                position,
                reason: format!("record says it is at position {}", layout.position),
            });
        }
        Ok(Record { bytes, layout })
    }

    pub(super) fn str_at(&self, (start, end): (usize, usize)) -> &str {
        std::str::from_utf8(&self.bytes[start..end]).expect("validated as UTF-8 by record_format::decode")
    }

    pub fn position(&self) -> Position {
        Position::new(self.layout.position)
    }
    pub fn version(&self) -> StreamVersion {
        StreamVersion::new(self.layout.version)
    }
    pub fn stream(&self) -> &str {
        self.str_at(self.layout.stream)
    }
    pub fn event_type(&self) -> &str {
        self.str_at(self.layout.event_type)
    }
    pub fn timestamp_us(&self) -> i64 {
        self.layout.timestamp_us
    }
    pub fn payload(&self) -> &[u8] {
        &self.bytes[self.layout.payload.0..self.layout.payload.1]
    }
    /// This record's checksum; the next record of the stream stores it as `prev_checksum`.
    pub fn checksum(&self) -> u64 {
        self.layout.checksum
    }
    pub fn prev_checksum(&self) -> u64 {
        self.layout.prev_checksum
    }
    /// The record exactly as stored.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
    /// Decodes the payload with the project's codec.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, StorageError> {
        codec::decode(self.payload()).map_err(|e| StorageError::Corrupt {
            position: self.position().get(),
            reason: format!("payload of {}: {e}", self.event_type()),
        })
    }
}

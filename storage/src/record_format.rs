//! The on-disk record envelope (format version 1).
//!
//! A record is the value stored under its global position in the `events` tree. All integers
//! are little-endian:
//!
//! ```text
//! offset  size  field
//! 0       1     format version (1)
//! 1       8     global position (u64, 1-based, gap-free)
//! 9       8     stream version (u64, 1-based)
//! 17      8     timestamp (i64, Unix epoch microseconds)
//! 25      8     prev_checksum: checksum of the previous record of the same stream (0 if first)
//! 33      2     stream length S (u16), then S bytes of UTF-8
//! ..      2     event type length T (u16), then T bytes of UTF-8
//! ..      4     payload length P (u32), then P bytes (codec.rs: bincode 2 + serde)
//! end-8   8     checksum: xxh3-64 of every byte before it
//! ```
//!
//! The checksum covers `prev_checksum`, so the records of a stream form a hash chain an auditor
//! can verify. The payload is encoded once, by the caller, and stored as is: reads hand out the
//! stored bytes without re-encoding.

use crate::error::StorageError;

/// The only format version written today.
pub const FORMAT_VERSION: u8 = 1;
/// Longest stream id, in bytes.
pub const STREAM_LEN_MAX: usize = 200;
/// Longest event type, in bytes.
pub const EVENT_TYPE_LEN_MAX: usize = 128;
/// Largest payload, in bytes.
pub const PAYLOAD_LEN_MAX: usize = crate::codec::PAYLOAD_LEN_MAX;

const FIXED_HEADER_LEN: usize = 1 + 8 + 8 + 8 + 8;
const CHECKSUM_LEN: usize = 8;
/// The smallest possible record: header, three empty length-prefixed fields, checksum.
const RECORD_LEN_MIN: usize = FIXED_HEADER_LEN + 2 + 2 + 4 + CHECKSUM_LEN;

/// The fields of a record before encoding.
#[derive(Debug, Clone, Copy)]
pub struct RecordFields<'a> {
    pub position: u64,
    pub version: u64,
    pub timestamp_us: i64,
    pub prev_checksum: u64,
    pub stream: &'a str,
    pub event_type: &'a str,
    pub payload: &'a [u8],
}

/// Checksum over record bytes.
pub fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// Encodes a record; returns the bytes and their checksum. The caller has validated the
/// lengths (see [`validate_names`]); they are asserted here because writing a record that
/// cannot be read back is a bug.
pub fn encode(fields: &RecordFields<'_>) -> (Vec<u8>, u64) {
    assert!(fields.stream.len() <= STREAM_LEN_MAX, "stream id validated");
    assert!(
        fields.event_type.len() <= EVENT_TYPE_LEN_MAX,
        "event type validated"
    );
    assert!(fields.payload.len() <= PAYLOAD_LEN_MAX, "payload validated");
    assert!(fields.position >= 1 && fields.version >= 1, "1-based");
    let len = RECORD_LEN_MIN + fields.stream.len() + fields.event_type.len() + fields.payload.len();
    let mut out = Vec::with_capacity(len);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&fields.position.to_le_bytes());
    out.extend_from_slice(&fields.version.to_le_bytes());
    out.extend_from_slice(&fields.timestamp_us.to_le_bytes());
    out.extend_from_slice(&fields.prev_checksum.to_le_bytes());
    out.extend_from_slice(&(fields.stream.len() as u16).to_le_bytes());
    out.extend_from_slice(fields.stream.as_bytes());
    out.extend_from_slice(&(fields.event_type.len() as u16).to_le_bytes());
    out.extend_from_slice(fields.event_type.as_bytes());
    out.extend_from_slice(&(fields.payload.len() as u32).to_le_bytes());
    out.extend_from_slice(fields.payload);
    let sum = checksum(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    debug_assert_eq!(out.len(), len);
    (out, sum)
}

/// Checks a stream id and an event type before anything is written.
pub fn validate_names(stream: &str, event_type: &str) -> Result<(), StorageError> {
    if stream.is_empty() || stream.len() > STREAM_LEN_MAX || stream.contains('\0') {
        return Err(StorageError::Invalid {
            field: "stream",
            reason: format!("must be 1..={STREAM_LEN_MAX} bytes without NUL"),
        });
    }
    if event_type.is_empty() || event_type.len() > EVENT_TYPE_LEN_MAX {
        return Err(StorageError::Invalid {
            field: "event_type",
            reason: format!("must be 1..={EVENT_TYPE_LEN_MAX} bytes"),
        });
    }
    Ok(())
}

/// Byte ranges of a decoded record's variable fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    pub position: u64,
    pub version: u64,
    pub timestamp_us: i64,
    pub prev_checksum: u64,
    pub checksum: u64,
    pub stream: (usize, usize),
    pub event_type: (usize, usize),
    pub payload: (usize, usize),
}

/// Why a record failed to decode. Turned into `StorageError::Corrupt` with its position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record of {0} bytes is shorter than the minimum")]
    TooShort(usize),
    #[error("checksum mismatch (stored {stored:#018x}, computed {computed:#018x})")]
    Checksum { stored: u64, computed: u64 },
    #[error("unknown format version {0}")]
    Version(u8),
    #[error("field {0} runs past the end of the record")]
    Truncated(&'static str),
    #[error("{0} trailing bytes after the payload")]
    Trailing(usize),
    #[error("field {0} is not UTF-8")]
    Utf8(&'static str),
    #[error("field {0} is out of range")]
    Range(&'static str),
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes in bounds"))
}

/// Decodes and verifies a record. Never panics, whatever the bytes.
pub(crate) fn decode(bytes: &[u8]) -> Result<Layout, RecordError> {
    if bytes.len() < RECORD_LEN_MIN {
        return Err(RecordError::TooShort(bytes.len()));
    }
    let body_len = bytes.len() - CHECKSUM_LEN;
    let stored = u64_at(bytes, body_len);
    let computed = checksum(&bytes[..body_len]);
    if stored != computed {
        return Err(RecordError::Checksum { stored, computed });
    }
    if bytes[0] != FORMAT_VERSION {
        return Err(RecordError::Version(bytes[0]));
    }
    let position = u64_at(bytes, 1);
    let version = u64_at(bytes, 9);
    let timestamp_us = u64_at(bytes, 17) as i64;
    let prev_checksum = u64_at(bytes, 25);
    if position == 0 {
        return Err(RecordError::Range("position"));
    }
    if version == 0 {
        return Err(RecordError::Range("version"));
    }
    let mut at = FIXED_HEADER_LEN;
    let mut field = |name: &'static str, len_bytes: usize| -> Result<(usize, usize), RecordError> {
        if at + len_bytes > body_len {
            return Err(RecordError::Truncated(name));
        }
        let mut len_buf = [0u8; 8];
        len_buf[..len_bytes].copy_from_slice(&bytes[at..at + len_bytes]);
        let len = u64::from_le_bytes(len_buf) as usize;
        let start = at + len_bytes;
        if len > body_len - start {
            return Err(RecordError::Truncated(name));
        }
        at = start + len;
        Ok((start, start + len))
    };
    let stream = field("stream", 2)?;
    let event_type = field("event_type", 2)?;
    let payload = field("payload", 4)?;
    if at != body_len {
        return Err(RecordError::Trailing(body_len - at));
    }
    for (name, (start, end), max) in [
        ("stream", stream, STREAM_LEN_MAX),
        ("event_type", event_type, EVENT_TYPE_LEN_MAX),
    ] {
        if end - start > max || end == start {
            return Err(RecordError::Range(name));
        }
        if std::str::from_utf8(&bytes[start..end]).is_err() {
            return Err(RecordError::Utf8(name));
        }
    }
    Ok(Layout {
        position,
        version,
        timestamp_us,
        prev_checksum,
        checksum: stored,
        stream,
        event_type,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<u8> {
        encode(&RecordFields {
            position: 42,
            version: 7,
            timestamp_us: 1_700_000_000_000_000,
            prev_checksum: 0xDEAD_BEEF,
            stream: "saga-1",
            event_type: "StepSucceeded",
            payload: b"payload bytes",
        })
        .0
    }

    #[test]
    fn encode_then_decode_gives_the_fields_back() {
        let bytes = sample();
        let layout = decode(&bytes).expect("valid record");
        assert_eq!(layout.position, 42);
        assert_eq!(layout.version, 7);
        assert_eq!(layout.prev_checksum, 0xDEAD_BEEF);
        assert_eq!(&bytes[layout.stream.0..layout.stream.1], b"saga-1");
        assert_eq!(&bytes[layout.event_type.0..layout.event_type.1], b"StepSucceeded");
        assert_eq!(&bytes[layout.payload.0..layout.payload.1], b"payload bytes");
        assert_eq!(layout.checksum, checksum(&bytes[..bytes.len() - 8]));
    }

    #[test]
    fn every_single_flipped_bit_is_detected() {
        let bytes = sample();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut bad = bytes.clone();
                bad[i] ^= 1 << bit;
                assert!(
                    decode(&bad).is_err(),
                    "flip of bit {bit} at byte {i} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn truncated_record_is_an_error() {
        let bytes = sample();
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err());
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn arbitrary_bytes_with_a_valid_checksum_never_panic(
            mut bytes in proptest::collection::vec(any::<u8>(), 0..256)
        ) {
            // Get past the checksum so the field parser itself is exercised.
            let sum = checksum(&bytes);
            bytes.extend_from_slice(&sum.to_le_bytes());
            let _ = decode(&bytes);
        }
    }
}

//! The payload codec: bincode 2 (pinned `=2.0.1`) through serde, standard configuration.
//!
//! Every payload encode and decode in the project goes through this module, so that the codec
//! can be replaced in one place (bincode is unmaintained; 3.0 is an empty release). A stored
//! payload's bytes are part of the on-disk format: changing this configuration is a format
//! change and needs a new record format version.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Upper bound of a decoded payload's size: a corrupt length prefix must not make the decoder
/// allocate gigabytes.
pub const PAYLOAD_LEN_MAX: usize = 1 << 20;

type Config = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<PAYLOAD_LEN_MAX>,
>;

const fn config() -> Config {
    bincode::config::standard().with_limit::<PAYLOAD_LEN_MAX>()
}

/// A payload could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("encode: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("decode: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("decode: {trailing} trailing bytes after the value")]
    TrailingBytes { trailing: usize },
}

/// Encodes a value as a payload.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    Ok(bincode::serde::encode_to_vec(value, config())?)
}

/// Decodes a payload; the whole slice must be one value. Never panics on arbitrary input.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, config())?;
    if used != bytes.len() {
        return Err(CodecError::TrailingBytes {
            trailing: bytes.len() - used,
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        id: String,
        quantity: i64,
        tags: Vec<String>,
    }

    #[test]
    fn round_trip_preserves_value() {
        let value = Sample {
            id: "p-1".into(),
            quantity: -3,
            tags: vec!["a".into(), "b".into()],
        };
        let bytes = encode(&value).expect("encodes");
        assert_eq!(decode::<Sample>(&bytes).expect("decodes"), value);
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut bytes = encode(&7u32).expect("encodes");
        bytes.push(0);
        assert!(matches!(
            decode::<u32>(&bytes),
            Err(CodecError::TrailingBytes { trailing: 1 })
        ));
    }

    #[test]
    fn huge_length_prefix_is_refused_not_allocated() {
        // A varint length of 2^40 for a string: must fail on the limit, not try to allocate.
        let bytes = [0xFD, 0, 0, 0, 0, 0x01, 0, 0, 0];
        assert!(decode::<String>(&bytes).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<Sample>(&bytes);
            let _ = decode::<Vec<String>>(&bytes);
        }
    }
}

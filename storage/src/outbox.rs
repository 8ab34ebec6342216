//! The transactional outbox: messages written in the same transaction as the events that
//! decide them, published later by a relay, deleted only after the broker acknowledged.
//!
//! Keys are `(position of the append's first event, index)`, big-endian, so listing the tree
//! gives entries in commit order. An entry is listed only once it is durable: a relay never
//! publishes a message whose deciding events could still be lost in a crash.

use serde::{Deserialize, Serialize};

/// Most outbox messages in one append.
pub const OUTBOX_PER_APPEND_MAX: usize = 256;

/// A message to publish: where, with which tag and key, and the body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxMessage {
    /// The destination topic.
    pub topic: String,
    /// The message tag (consumers filter on it).
    pub tag: String,
    /// The message key (consumers deduplicate on it).
    pub key: String,
    pub body: Vec<u8>,
}

/// The id of an outbox entry; stable across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OutboxId {
    /// Global position of the first event of the append that wrote the entry.
    pub position: u64,
    /// Index of the entry within that append.
    pub index: u16,
}

impl OutboxId {
    pub(crate) fn to_key(self) -> [u8; 10] {
        let mut key = [0u8; 10];
        key[..8].copy_from_slice(&self.position.to_be_bytes());
        key[8..].copy_from_slice(&self.index.to_be_bytes());
        key
    }

    pub(crate) fn from_key(key: &[u8]) -> Option<Self> {
        let key: &[u8; 10] = key.try_into().ok()?;
        Some(OutboxId {
            position: u64::from_be_bytes(key[..8].try_into().ok()?),
            index: u16::from_be_bytes(key[8..].try_into().ok()?),
        })
    }
}

/// A pending outbox entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    pub id: OutboxId,
    pub message: OutboxMessage,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Outbox entries are stored with the codec: a changed encoding of `OutboxMessage` would
    /// make the relay misread entries written before an upgrade.
    #[test]
    fn stored_outbox_messages_keep_their_encoding() {
        let message = OutboxMessage {
            topic: "t".into(),
            tag: "g".into(),
            key: "k".into(),
            body: vec![1, 2],
        };
        let hex: String = crate::codec::encode(&message)
            .expect("encodes")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, "01740167016b020102");
    }
}

//! The orchestrator's acknowledgement key: what makes an acknowledgement sent over gRPC
//! (`AcknowledgeCompensations`) trustworthy.
//!
//! Every compensation request names a token, `HMAC-SHA-256(key, saga id, step)` cut to 16
//! bytes, and the participant echoes it in its acknowledgement; the orchestrator accepts an
//! acknowledgement over gRPC only with the token of its step. So forging one needs a request read
//! from the broker, as forging one on the acknowledgement topic needs the right to publish
//! there: the gRPC route is no easier to abuse than the broker, although any client can reach
//! the API port. The key is random, made on the first start, and kept in the log's directory
//! (`ack-key`, 64 hex digits) so that tokens of requests sent before a restart stay valid.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use hmac::{KeyInit as _, Mac as _};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Bytes of a token (hex-encoded twice as long).
const TOKEN_LEN: usize = 16;
/// The key file's name in the log's directory.
pub const ACK_KEY_FILE: &str = "ack-key";

/// Why the key could not be read or made.
#[derive(Debug, thiserror::Error)]
pub enum AckKeyError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: expected 64 hex digits (the orchestrator's acknowledgement key)")]
    Malformed { path: PathBuf },
    #[error("no randomness for a new acknowledgement key: {0}")]
    Random(getrandom::Error),
}

/// The key; its `Debug` shows nothing of it.
#[derive(Clone)]
pub struct AckKey([u8; 32]);

impl std::fmt::Debug for AckKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AckKey(..)")
    }
}

impl AckKey {
    /// The key in `dir` (the log's directory), made and made durable first if there is none.
    /// Crash windows: the key is written to a temporary file, synced and renamed, then the
    /// directory synced, so a crash leaves no key (a new one is made, and no request named the
    /// lost one) or the whole key.
    pub fn load_or_create(dir: &Path) -> Result<AckKey, AckKeyError> {
        let path = dir.join(ACK_KEY_FILE);
        let io = |source| AckKeyError::Io {
            path: path.clone(),
            source,
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let mut key = [0u8; 32];
                hex::decode_to_slice(text.trim(), &mut key)
                    .map_err(|_| AckKeyError::Malformed { path: path.clone() })?;
                Ok(AckKey(key))
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                getrandom::fill(&mut key).map_err(AckKeyError::Random)?;
                std::fs::create_dir_all(dir).map_err(io)?;
                let temporary = dir.join(format!("{ACK_KEY_FILE}.tmp"));
                let mut file = std::fs::File::create(&temporary).map_err(io)?;
                file.write_all(hex::encode(key).as_bytes()).map_err(io)?;
                file.sync_all().map_err(io)?;
                std::fs::rename(&temporary, &path).map_err(io)?;
                std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
                Ok(AckKey(key))
            }
            Err(error) => Err(io(error)),
        }
    }

    fn mac(&self, saga_id: &str, step: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        mac.update(saga_id.as_bytes());
        mac.update(&[0]);
        mac.update(step.as_bytes());
        mac
    }

    /// The token of the compensation of `step` of `saga_id` (hex).
    pub fn token(&self, saga_id: &str, step: &str) -> String {
        hex::encode(&self.mac(saga_id, step).finalize().into_bytes()[..TOKEN_LEN])
    }

    /// Whether `token` is the token of that compensation (compared in constant time).
    pub fn verify(&self, saga_id: &str, step: &str, token: &str) -> bool {
        let mut bytes = [0u8; TOKEN_LEN];
        hex::decode_to_slice(token, &mut bytes).is_ok()
            && self.mac(saga_id, step).verify_truncated_left(&bytes).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_for_their_step_only_and_the_key_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = AckKey::load_or_create(dir.path()).expect("made");
        let token = key.token("ord-1", "reserve_stock");
        assert_eq!(token.len(), 2 * TOKEN_LEN);
        assert!(key.verify("ord-1", "reserve_stock", &token));
        assert!(!key.verify("ord-1", "lock_coupon", &token));
        assert!(!key.verify("ord-2", "reserve_stock", &token));
        assert!(!key.verify("ord-1", "reserve_stock", ""));
        assert!(!key.verify("ord-1", "reserve_stock", "zz"));
        // The separator keeps ("a", "bc") and ("ab", "c") apart.
        assert_ne!(key.token("a", "bc"), key.token("ab", "c"));
        let again = AckKey::load_or_create(dir.path()).expect("read back");
        assert!(again.verify("ord-1", "reserve_stock", &token));
        let other = AckKey::load_or_create(tempfile::tempdir().expect("tempdir").path()).expect("made");
        assert!(!other.verify("ord-1", "reserve_stock", &token));
        assert_eq!(format!("{key:?}"), "AckKey(..)");
    }

    #[test]
    fn a_malformed_key_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(ACK_KEY_FILE), "not hex").expect("writes");
        let error = AckKey::load_or_create(dir.path()).expect_err("refused");
        assert!(error.to_string().contains(ACK_KEY_FILE), "{error}");
    }
}

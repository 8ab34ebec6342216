//! The bearer token of admin RPCs, checked by every server of ours and sent by our clients.
//!
//! Admin RPCs change or expose what ordinary clients must not: the orchestrator's RetrySaga,
//! AbortSaga and ReplayEvents, the participants' Seed* calls and ConsumerAdmin. When a server
//! is given a token, each of them requires `authorization: Bearer <token>` and answers
//! UNAUTHENTICATED, before it reads or changes anything, to a call without it or with another
//! token. Both tokens are hashed (SHA-256) and the digests compared in constant time (`subtle`),
//! so the time taken says neither where the tokens differ nor how long the expected one is. The
//! token is never logged: [`AdminToken`]'s `Debug` prints `<redacted>`, and our clients mark
//! the header sensitive (HTTP/2 header compression never indexes it).
//!
//! A server given no token leaves admin RPCs open (the demo, and tests of other parts); the
//! binaries say so at start. Servers bind to 127.0.0.1 unless told otherwise.

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tonic::Status;
use tonic::metadata::{MetadataMap, MetadataValue};

/// The metadata key the token travels in.
pub const METADATA_KEY: &str = "authorization";
/// The scheme (RFC 7235: matched without regard to case) and its separator.
const BEARER: &str = "Bearer ";
/// The environment variable our binaries read a token from (a flag names a file instead, so
/// that the token does not show in the process list).
pub const TOKEN_ENV: &str = "SAGA_ADMIN_TOKEN";
/// Shortest token accepted, in bytes.
pub const TOKEN_LEN_MIN: usize = 16;
/// Longest token accepted, in bytes.
pub const TOKEN_LEN_MAX: usize = 4096;

/// Why a token cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the admin token must be {TOKEN_LEN_MIN}..={TOKEN_LEN_MAX} bytes, it is {0}")]
    Length(usize),
    #[error("the admin token must be printable ASCII without spaces")]
    NotPrintable,
}

/// A server's admin token (kept as its SHA-256 digest), or none (admin RPCs open). Cheap to
/// clone.
#[derive(Clone, Default)]
pub struct AdminToken(Option<[u8; 32]>);

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(_) => f.write_str("AdminToken(<redacted>)"),
            None => f.write_str("AdminToken(none)"),
        }
    }
}

/// Checks a token's form (the same rule on servers and clients).
pub fn check_token(token: &str) -> Result<(), TokenError> {
    if !(TOKEN_LEN_MIN..=TOKEN_LEN_MAX).contains(&token.len()) {
        return Err(TokenError::Length(token.len()));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TokenError::NotPrintable);
    }
    Ok(())
}

impl AdminToken {
    /// No token: admin RPCs are open.
    pub fn none() -> AdminToken {
        AdminToken(None)
    }

    /// Requires `token` (surrounding whitespace, such as a file's last newline, is trimmed).
    pub fn new(token: &str) -> Result<AdminToken, TokenError> {
        let token = token.trim();
        check_token(token)?;
        Ok(AdminToken(Some(digest(token.as_bytes()))))
    }

    /// The token a process is configured with: read from `file` (the `--admin-token-file`
    /// setting, named `file_source` in errors) if given, else from [`TOKEN_ENV`], else none.
    /// The error names the source.
    pub fn configured(file: Option<&std::path::Path>, file_source: &str) -> Result<AdminToken, String> {
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("{file_source} {}: {e}", path.display()))?;
            return AdminToken::new(&text).map_err(|e| format!("{file_source} {}: {e}", path.display()));
        }
        match std::env::var(TOKEN_ENV) {
            Ok(text) => AdminToken::new(&text).map_err(|e| format!("{TOKEN_ENV}: {e}")),
            Err(std::env::VarError::NotPresent) => Ok(AdminToken::none()),
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(format!("{TOKEN_ENV}: {}", TokenError::NotPrintable))
            }
        }
    }

    /// Whether admin RPCs need a token.
    pub fn is_required(&self) -> bool {
        self.0.is_some()
    }

    /// Admits an admin call: Ok when no token is required or the call carries this one;
    /// UNAUTHENTICATED otherwise (the status never holds either token).
    pub fn check(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let Some(expected) = &self.0 else {
            return Ok(());
        };
        let presented = metadata.get(METADATA_KEY).ok_or_else(|| {
            Status::unauthenticated("admin RPC: an `authorization: Bearer <token>` is required")
        })?;
        let presented = presented.as_bytes();
        let token = presented
            .get(..BEARER.len())
            .filter(|scheme| scheme.eq_ignore_ascii_case(BEARER.as_bytes()))
            .map(|_| &presented[BEARER.len()..])
            .ok_or_else(|| Status::unauthenticated("admin RPC: the authorization is not a bearer token"))?;
        if bool::from(digest(token).ct_eq(expected)) {
            Ok(())
        } else {
            Err(Status::unauthenticated(
                "admin RPC: the bearer token is not valid",
            ))
        }
    }
}

/// Adds `authorization: Bearer <token>` to a request of a client of ours.
pub fn authorize<T>(request: &mut tonic::Request<T>, token: &str) -> Result<(), TokenError> {
    check_token(token)?;
    let mut value =
        MetadataValue::try_from(format!("{BEARER}{token}")).map_err(|_| TokenError::NotPrintable)?;
    value.set_sensitive(true);
    request.metadata_mut().insert(METADATA_KEY, value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(token: &str) -> MetadataMap {
        let mut request = tonic::Request::new(());
        authorize(&mut request, token).expect("a valid token");
        request.metadata().clone()
    }

    #[test]
    fn only_the_configured_token_is_admitted() {
        let token = AdminToken::new("0123456789abcdef-secret\n").expect("valid");
        assert!(token.check(&with("0123456789abcdef-secret")).is_ok());
        let mut lower = MetadataMap::new();
        lower.insert(
            METADATA_KEY,
            "bearer 0123456789abcdef-secret".parse().expect("ascii"),
        );
        assert!(
            token.check(&lower).is_ok(),
            "the scheme is matched without regard to case"
        );
        assert!(
            with("0123456789abcdef-secret")
                .get(METADATA_KEY)
                .expect("set")
                .is_sensitive(),
            "our clients mark the token sensitive"
        );
        for metadata in [
            MetadataMap::new(),
            with("0123456789abcdef-secreT"),
            with("0123456789abcdef-secret-longer"),
            with("0123456789abcdef"),
        ] {
            let refused = token.check(&metadata).expect_err("refused");
            assert_eq!(refused.code(), tonic::Code::Unauthenticated);
            assert!(!refused.message().contains("secret"), "{}", refused.message());
        }
        let mut basic = MetadataMap::new();
        basic.insert(
            METADATA_KEY,
            "Basic 0123456789abcdef-secret".parse().expect("ascii"),
        );
        assert_eq!(
            token.check(&basic).expect_err("refused").code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn no_token_leaves_admin_calls_open_and_debug_never_shows_a_token() {
        assert!(AdminToken::none().check(&MetadataMap::new()).is_ok());
        let token = AdminToken::new("0123456789abcdef-secret").expect("valid");
        assert_eq!(format!("{token:?}"), "AdminToken(<redacted>)");
    }

    #[test]
    fn short_or_unprintable_tokens_are_refused() {
        assert_eq!(AdminToken::new("short").unwrap_err(), TokenError::Length(5));
        assert_eq!(
            AdminToken::new("0123456789 abcdef").unwrap_err(),
            TokenError::NotPrintable
        );
    }
}

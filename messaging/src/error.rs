//! Errors of the compensation transport, as variants a caller can act on.

/// Whatever went wrong talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum MessagingError {
    /// Our own settings are inconsistent: fix the configuration.
    #[error("messaging configuration: {0}")]
    Config(String),
    /// The broker or name server did not answer in time, or refused for now: retry later.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// Any other client error.
    #[error("rocketmq client: {0}")]
    Client(String),
    /// The embedded queue's own log cannot be opened (held by another process, lost tail):
    /// not a broker problem, and retrying does not help.
    #[error("the embedded queue's log: {0}")]
    Storage(String),
}

impl MessagingError {
    pub(crate) fn client(error: rocketmq_client_rust::ClientError) -> Self {
        MessagingError::Client(error.to_string())
    }
}

//! TLS for our gRPC servers and clients: rustls through tonic's TLS support (the aws-lc-rs
//! provider the RocketMQ client's rustls already builds), certificates and keys as PEM files.
//!
//! - A server with a certificate and key serves TLS only; a plaintext client's connection fails
//!   its handshake and is closed (the server goes on serving). With a client CA as well it
//!   requires a client certificate signed by that CA (mutual TLS): the orchestrator's calls to
//!   the participants, for example.
//! - A client given a CA verifies the server against that CA only (no system roots) and the
//!   server's name from the address (an IP address is checked against the certificate's IP
//!   SANs); with a certificate and key it presents them (mutual TLS).
//!
//! Files are read and checked at start: a missing file, a PEM that does not parse, or half a
//! pair (a certificate without its key) is an error naming the setting.

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// A server's TLS settings, the same on every server of ours (flattened into its options).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerTlsArgs {
    /// Serve TLS only, with this certificate (PEM; with --tls-key).
    #[arg(long)]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long)]
    pub tls_key: Option<std::path::PathBuf>,
    /// Require clients to present a certificate signed by this CA (PEM): mutual TLS (e.g. only
    /// the orchestrator may call a participant).
    #[arg(long)]
    pub tls_client_ca: Option<std::path::PathBuf>,
}

impl ServerTlsArgs {
    /// [`server_config`] of these settings.
    pub fn load(&self, name: &dyn Fn(&str) -> String) -> Result<Option<ServerTlsConfig>, String> {
        server_config(
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.tls_client_ca.as_deref(),
            name,
        )
    }
}

fn read(path: &Path, setting: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{setting} {}: {e}", path.display()))
}

/// The server side, from the `--tls-cert`, `--tls-key` and `--tls-client-ca` settings
/// (`name` names a setting by its id in errors, e.g. `config::Sources::name`). `None`:
/// plaintext.
pub fn server_config(
    cert: Option<&Path>,
    key: Option<&Path>,
    client_ca: Option<&Path>,
    name: &dyn Fn(&str) -> String,
) -> Result<Option<ServerTlsConfig>, String> {
    let (cert, key) = match (cert, key) {
        (Some(cert), Some(key)) => (cert, key),
        (None, None) => {
            return match client_ca {
                Some(_) => Err(format!(
                    "{} needs {} and {} (a server certificate)",
                    name("tls_client_ca"),
                    name("tls_cert"),
                    name("tls_key")
                )),
                None => Ok(None),
            };
        }
        (Some(_), None) => return Err(format!("{} needs {}", name("tls_cert"), name("tls_key"))),
        (None, Some(_)) => return Err(format!("{} needs {}", name("tls_key"), name("tls_cert"))),
    };
    let identity = Identity::from_pem(read(cert, &name("tls_cert"))?, read(key, &name("tls_key"))?);
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = client_ca {
        config = config.client_ca_root(Certificate::from_pem(read(ca, &name("tls_client_ca"))?));
    }
    // Built once here so that a bad PEM is refused at start, not at the first connection.
    tonic::transport::Server::builder()
        .tls_config(config.clone())
        .map_err(|e| {
            format!(
                "{} / {}{}: {}",
                name("tls_cert"),
                name("tls_key"),
                client_ca
                    .map(|_| format!(" / {}", name("tls_client_ca")))
                    .unwrap_or_default(),
                crate::tls::error_chain(&e)
            )
        })?;
    Ok(Some(config))
}

/// The client side, from a CA, and a certificate and key for mutual TLS, settings named
/// `{prefix}ca`, `{prefix}cert` and `{prefix}key`. `None`: plaintext.
pub fn client_config(
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
    prefix: &str,
    name: &dyn Fn(&str) -> String,
) -> Result<Option<ClientTlsConfig>, String> {
    let setting = |s: &str| name(&format!("{prefix}{s}"));
    let Some(ca) = ca else {
        return match (cert, key) {
            (None, None) => Ok(None),
            _ => Err(format!(
                "{} and {} need {} (the CA that signed the server's certificate)",
                setting("cert"),
                setting("key"),
                setting("ca")
            )),
        };
    };
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca, &setting("ca"))?));
    match (cert, key) {
        (Some(cert), Some(key)) => {
            config = config.identity(Identity::from_pem(
                read(cert, &setting("cert"))?,
                read(key, &setting("key"))?,
            ));
        }
        (None, None) => {}
        (Some(_), None) => return Err(format!("{} needs {}", setting("cert"), setting("key"))),
        (None, Some(_)) => return Err(format!("{} needs {}", setting("key"), setting("cert"))),
    }
    // Checked once here (a bad PEM is refused at start).
    tonic::transport::Endpoint::from_static("https://127.0.0.1:1")
        .tls_config(config.clone())
        .map_err(|e| format!("{} ({}): {}", setting("ca"), setting("cert"), error_chain(&e)))?;
    Ok(Some(config))
}

/// The scheme of a channel to an address, with or without TLS.
pub fn scheme(tls: Option<&ClientTlsConfig>) -> &'static str {
    if tls.is_some() { "https" } else { "http" }
}

/// An error and its sources on one line (tonic's transport errors say little at the top).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

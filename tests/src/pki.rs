//! Certificates for the TLS tests, made in the test with rcgen: a CA, a server certificate for
//! 127.0.0.1 and localhost, a client certificate of the same CA, and a client certificate of
//! another CA (a stranger to the server).

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// PEM files under one directory.
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// Signed by another CA.
    pub stranger_cert: PathBuf,
    pub stranger_key: PathBuf,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA")
}

/// Writes a certificate for `names` signed by `issuer` and its key to `dir/{stem}.pem` and
/// `dir/{stem}.key`.
fn leaf(
    dir: &Path,
    stem: &str,
    names: &[&str],
    issuer: &CertifiedIssuer<'static, KeyPair>,
) -> (PathBuf, PathBuf) {
    let params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("params");
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, issuer).expect("signs");
    let (cert_path, key_path) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}.key")));
    std::fs::write(&cert_path, cert.pem()).expect("writes");
    std::fs::write(&key_path, key.serialize_pem()).expect("writes");
    (cert_path, key_path)
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        let authority = ca("saga test CA");
        let other = ca("another CA");
        let ca_path = dir.join("ca.pem");
        std::fs::write(&ca_path, authority.pem()).expect("writes");
        let (server_cert, server_key) = leaf(dir, "server", &["127.0.0.1", "localhost"], &authority);
        let (client_cert, client_key) = leaf(dir, "client", &["orchestrator"], &authority);
        let (stranger_cert, stranger_key) = leaf(dir, "stranger", &["stranger"], &other);
        Pki {
            ca: ca_path,
            server_cert,
            server_key,
            client_cert,
            client_key,
            stranger_cert,
            stranger_key,
        }
    }
}

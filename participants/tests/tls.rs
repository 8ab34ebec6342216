//! Issue 12: a participant process serving TLS with client certificates required (mutual TLS,
//! certificates made in the test with rcgen): a client with a certificate of the CA is served;
//! a plaintext client, a client without a certificate and a client whose certificate another
//! CA signed are refused at the connection, cleanly (an error, and the server goes on serving).

use std::path::Path;
use std::time::Duration;

use saga_tests::Proc;
use saga_tests::pki::Pki;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

fn pem(path: &Path) -> Vec<u8> {
    std::fs::read(path).expect("reads a PEM file")
}

/// A health check over a new connection: the status, or the error's text.
async fn check(endpoint: Endpoint) -> Result<i32, String> {
    let channel: Channel = endpoint
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| saga_proto::tls::error_chain(&e))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|r| r.into_inner().status)
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

fn tls(addr: &str, config: ClientTlsConfig) -> Endpoint {
    Endpoint::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(config)
        .expect("tls config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_serves_the_known_client_and_refuses_the_others_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let arg = |p: &Path| p.to_string_lossy().into_owned();
    let args: Vec<String> = vec![
        "--role".into(),
        "stock".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        arg(&dir.path().join("stock")),
        "--tls-cert".into(),
        arg(&pki.server_cert),
        "--tls-key".into(),
        arg(&pki.server_key),
        "--tls-client-ca".into(),
        arg(&pki.ca),
    ];
    let proc = Proc::start("saga-participant", &args, &[]);
    let addr = proc.addr.clone();
    let ca = Certificate::from_pem(pem(&pki.ca));
    let known = ClientTlsConfig::new()
        .ca_certificate(ca.clone())
        .identity(Identity::from_pem(pem(&pki.client_cert), pem(&pki.client_key)));
    assert_eq!(
        check(tls(&addr, known.clone())).await,
        Ok(ServingStatus::Serving as i32),
        "the client with a certificate of the CA is served"
    );

    let plaintext = check(Endpoint::from_shared(format!("http://{addr}")).expect("uri")).await;
    assert!(plaintext.is_err(), "a plaintext client is refused: {plaintext:?}");
    let anonymous = check(tls(&addr, ClientTlsConfig::new().ca_certificate(ca.clone()))).await;
    assert!(
        anonymous.is_err(),
        "a client without a certificate is refused: {anonymous:?}"
    );
    let stranger = ClientTlsConfig::new()
        .ca_certificate(ca)
        .identity(Identity::from_pem(
            pem(&pki.stranger_cert),
            pem(&pki.stranger_key),
        ));
    let stranger = check(tls(&addr, stranger)).await;
    assert!(
        stranger.is_err(),
        "a certificate of another CA is refused: {stranger:?}"
    );

    assert_eq!(
        check(tls(&addr, known)).await,
        Ok(ServingStatus::Serving as i32),
        "the refusals left the server serving"
    );
    let status = tokio::task::spawn_blocking(move || proc.terminate(Duration::from_secs(30)))
        .await
        .expect("joins");
    assert!(status.success(), "{status:?}");
}

#[test]
fn half_a_key_pair_or_a_bad_pem_stops_the_participant_at_start_naming_the_setting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").expect("writes");
    let data = dir.path().join("stock");
    let run = |extra: &[&Path], flags: &[&str]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_saga-participant"));
        command
            .args(["--role", "stock", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data);
        for (flag, path) in flags.iter().zip(extra) {
            command.arg(flag).arg(path);
        }
        let out = command.output().expect("runs");
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stderr = run(&[&pki.server_cert], &["--tls-cert"]);
    assert!(stderr.contains("--tls-cert needs --tls-key"), "{stderr}");
    let stderr = run(&[&garbage, &pki.server_key], &["--tls-cert", "--tls-key"]);
    assert!(stderr.contains("--tls-cert"), "{stderr}");
    let stderr = run(&[&pki.ca], &["--tls-client-ca"]);
    assert!(
        stderr.contains("--tls-client-ca needs --tls-cert and --tls-key"),
        "{stderr}"
    );
}

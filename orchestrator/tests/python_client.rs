//! Issue 12's client conventions as a Python user meets them: `tests/python/client_conventions.py`
//! generates stubs from `proto/` with grpcio-tools, lists services through reflection v1alpha
//! (grpcio-reflection) on the orchestrator and every participant, and reads error details with
//! grpcio-status: a `BadRequest` naming the field for INVALID_ARGUMENT, an `ErrorInfo` and our
//! `BusinessRefusal` for a refusal. The Python environment comes from `scripts/py-env` (pinned
//! versions from PyPI, created once).

use std::path::PathBuf;
use std::process::Command;

use saga_orchestrator::dev::{Dev, DevOptions};
use saga_orchestrator::workload;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The python of `scripts/py-env` (which installs the environment if it is missing).
fn python() -> String {
    let out = Command::new(repo().join("scripts/py-env"))
        .output()
        .expect("runs scripts/py-env");
    assert!(
        out.status.success(),
        "scripts/py-env failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("a path").trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_grpcio_client_reads_reflection_and_rich_error_details() {
    let python = tokio::task::spawn_blocking(python).await.expect("joins");
    let dir = tempfile::tempdir().expect("tempdir");
    let system = Dev::start(dir.path(), "127.0.0.1:0", 100, DevOptions::default())
        .await
        .expect("starts");
    let p = &system.participants;
    let args: Vec<String> = [
        "--proto-dir".to_owned(),
        repo().join("proto").display().to_string(),
        "--orchestrator".to_owned(),
        system.api_addr.to_string(),
        "--product".to_owned(),
        workload::product_id(1),
    ]
    .into_iter()
    .chain(
        [
            ("order", &p.order),
            ("stock", &p.stock),
            ("coupon", &p.coupon),
            ("balance", &p.balance),
        ]
        .into_iter()
        .flat_map(|(role, addr)| ["--participant".to_owned(), format!("{role}={addr}")]),
    )
    .collect();
    let script = repo().join("tests/python/client_conventions.py");
    // Every call of the script has a 10 s deadline, so it ends on its own.
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&python)
            .arg(&script)
            .args(&args)
            .output()
            .expect("runs the Python client")
    })
    .await
    .expect("joins");
    system.shutdown().await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the Python client failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
}

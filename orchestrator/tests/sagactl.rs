//! `sagactl` as a process against the all-in-one system: used as a filter (`| head -1`), it
//! ends quietly when its reader goes away, instead of panicking on the closed pipe.

use std::io::Read;
use std::process::{Command, Stdio};

use saga_orchestrator::dev::{Dev, DevOptions};
use saga_orchestrator::workload;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let system = Dev::start(dir.path(), "127.0.0.1:0", 100, DevOptions::default())
        .await
        .expect("starts");
    let mut client = system.client().await.expect("connects");
    client
        .start_order(workload::order_request("pipe", 1))
        .await
        .expect("starts an order");
    let server = system.api_addr.to_string();
    let (status, stderr) = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sagactl"))
            .args(["--server", &server, "replay", "--from", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starts sagactl");
        // The reader is gone before sagactl writes (as after `head -1` had its line).
        drop(child.stdout.take());
        let status = child.wait().expect("waits");
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .expect("piped")
            .read_to_string(&mut stderr)
            .expect("reads stderr");
        (status, stderr)
    })
    .await
    .expect("join");
    system.shutdown().await;

    assert!(!stderr.contains("panicked"), "no panic: {stderr}");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGPIPE),
        "ended by SIGPIPE, as filters do: {status:?} {stderr}"
    );
}

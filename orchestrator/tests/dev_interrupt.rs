//! Issue 12: `saga-orchestrator dev --orders N` interrupted with Ctrl-C (SIGINT) stops the
//! system and removes its temporary data dir, instead of leaving it behind.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The dev run's temporary data dir under `tmp`, once its orchestrator log exists.
fn dev_dir(tmp: &std::path::Path) -> Option<std::path::PathBuf> {
    std::fs::read_dir(tmp)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("saga-dev-"))
                && p.join("orchestrator").join("db").exists()
        })
}

#[test]
fn ctrl_c_during_a_dev_run_removes_its_temporary_data_dir() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_saga-orchestrator"))
        .args(["dev", "--orders", "200000", "--listen", "127.0.0.1:0"])
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts saga-orchestrator dev");
    let began = Instant::now();
    let dir = loop {
        if let Some(dir) = dev_dir(tmp.path()) {
            break dir;
        }
        if began.elapsed() > Duration::from_secs(60) || child.try_wait().expect("polls").is_some() {
            let _ = child.kill();
            panic!("the dev run did not create its data dir");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // SAFETY: `kill` on the PID of our own child, which has not been waited for yet.
    #[allow(unsafe_code, reason = "libc::kill; see SAFETY")]
    let sent = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(sent, 0, "SIGINT sent");
    let status = loop {
        if let Some(status) = child.try_wait().expect("polls") {
            break status;
        }
        if began.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("the dev run did not stop after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("piped"), &mut stderr).expect("reads");
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(!dir.exists(), "{} was removed: {stderr}", dir.display());
}

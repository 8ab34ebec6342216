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

fn sagactl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sagactl"))
        .args(args)
        .output()
        .expect("runs sagactl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `sagactl watch --changes-only` prints the events of the full watch where the saga's state
/// changed, and no other: a compensated saga's running, compensating and compensated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_changes_only_prints_the_events_that_change_the_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let system = Dev::start(dir.path(), "127.0.0.1:0", 100, DevOptions::default())
        .await
        .expect("starts");
    let mut client = system.client().await.expect("connects");
    // Fail20: order 5's user has no balance, so the saga is compensated.
    let saga = workload::run_order(&mut client, workload::Scenario::Fail20, "watch", 5)
        .await
        .expect("runs an order");
    let server = system.api_addr.to_string();
    let (every, changes) = tokio::task::spawn_blocking(move || {
        let watch = |extra: &[&str]| {
            let mut args = vec![
                "--server",
                server.as_str(),
                "--json",
                "watch",
                saga.saga_id.as_str(),
            ];
            args.extend_from_slice(extra);
            let (code, stdout, stderr) = sagactl(&args);
            assert_eq!(code, 0, "{args:?}: {stderr}");
            stdout
                .lines()
                .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("a JSON line"))
                .collect::<Vec<_>>()
        };
        (watch(&[]), watch(&["--changes-only"]))
    })
    .await
    .expect("join");
    system.shutdown().await;

    let mut before = None;
    let expected: Vec<serde_json::Value> = every
        .iter()
        .filter(|e| before.replace(e["state"].clone()) != Some(e["state"].clone()))
        .cloned()
        .collect();
    assert_eq!(changes, expected);
    let states: Vec<&str> = changes
        .iter()
        .map(|e| e["state"].as_str().expect("a state"))
        .collect();
    assert_eq!(states.len(), 3, "{states:?}");
    assert!(every.len() > changes.len(), "{} events in all", every.len());
}

/// Issue 9: `sagactl audit` on the all-in-one system's data dirs: refused while the process
/// holds them, clean after, one saga's timeline across logs, JSON export, and a forged
/// projection is found with exit status 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verifies_correlates_exports_and_finds_a_forged_projection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let system = Dev::start(dir.path(), "127.0.0.1:0", 100, DevOptions::default())
        .await
        .expect("starts");
    let mut client = system.client().await.expect("connects");
    let scenario = workload::Scenario::parse("fail20").expect("known scenario");
    let mut sagas = Vec::new();
    for n in 1..=20u64 {
        let result = workload::run_order(&mut client, scenario, "audit", n)
            .await
            .expect("runs an order");
        sagas.push(result.saga_id);
    }
    let orchestrator = dir.path().join("orchestrator");
    let orchestrator_dir = orchestrator.to_string_lossy().into_owned();
    let (code, _, stderr) = sagactl(&["audit", "verify", "--data-dir", &orchestrator_dir]);
    assert_eq!(code, 2, "a dir held by a running process is refused: {stderr}");
    assert!(stderr.contains("held by another process"), "{stderr}");
    system.shutdown().await;

    let roles = ["orchestrator", "order", "stock", "coupon", "balance", "queue"];
    for role in roles {
        let data_dir = dir.path().join(role).to_string_lossy().into_owned();
        let (code, stdout, stderr) = sagactl(&["audit", "verify", "--data-dir", &data_dir]);
        assert_eq!(code, 0, "{role}: {stdout}{stderr}");
        assert!(stdout.starts_with("ok: "), "{stdout}");
    }

    // A balance deducted for a completed saga shows up in its timeline, with the user.
    let dirs: Vec<String> = roles[..5]
        .iter()
        .flat_map(|r| {
            [
                "--data-dir".to_owned(),
                dir.path().join(r).to_string_lossy().into_owned(),
            ]
        })
        .collect();
    let mut charged = 0;
    for saga in &sagas {
        let mut args = vec!["--json", "audit", "saga", saga.as_str()];
        args.extend(dirs.iter().map(String::as_str));
        let (code, stdout, stderr) = sagactl(&args);
        assert_eq!(code, 0, "{stderr}");
        let lines: Vec<serde_json::Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert_eq!(lines[0]["event_type"], "SagaStarted", "{stdout}");
        let times: Vec<i64> = lines
            .iter()
            .map(|l| l["timestamp_unix_us"].as_i64().unwrap())
            .collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "time order");
        let completed = lines.iter().any(|l| l["event_type"] == "SagaCompleted");
        let deducted = lines
            .iter()
            .find(|l| l["log"] == "balance" && l["event_type"] == "BalanceDeducted");
        assert_eq!(
            completed,
            deducted.is_some(),
            "charged exactly when completed: {stdout}"
        );
        if let Some(deducted) = deducted {
            assert!(deducted["payload"]["BalanceDeducted"]["user_id"].is_string());
            charged += 1;
        }
    }
    assert!(charged > 0, "some saga completed");

    let balance = dir.path().join("balance").to_string_lossy().into_owned();
    let (code, stdout, _) = sagactl(&["audit", "export", "--data-dir", &balance]);
    assert_eq!(code, 0);
    for line in stdout.lines() {
        let record: serde_json::Value = serde_json::from_str(line).expect("one JSON object per line");
        assert!(
            record["position"].as_u64().is_some() && !record["payload"].is_null(),
            "{line}"
        );
    }

    // Forge a balance: the replay disagrees, and verify says where.
    {
        let db = sled::open(dir.path().join("balance")).expect("opens sled");
        let projections = db.open_tree("projections").unwrap();
        let (key, mut value) = projections
            .scan_prefix("balance/")
            .next()
            .expect("a balance")
            .expect("reads");
        let mut forged = value.to_vec();
        *forged.last_mut().unwrap() ^= 1;
        value = forged.into();
        projections.insert(key, value).unwrap();
        db.flush().unwrap();
    }
    let (code, stdout, _) = sagactl(&["audit", "verify", "--data-dir", &balance]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("projection balance/"), "{stdout}");
}

//! A process appending to the log is killed with SIGKILL in the middle of its appends. On
//! reopen, every acknowledged event is there, in order, and nothing half-written is visible.
//!
//! The child is this same test binary, started again with `CRASH_CHILD_DIR` set: the test
//! `crash_child_appends_until_killed` then appends forever and prints one line per
//! acknowledged append; in a normal run it returns at once.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use saga_storage::{AppendRequest, EventLog, ExpectedVersion, LogConfig, NewEvent};
use saga_storage::{Position, StreamVersion};

const CHILD_ENV: &str = "CRASH_CHILD_DIR";
const STREAMS: usize = 8;
const EVENTS_PER_APPEND: u64 = 3;

#[test]
fn crash_child_appends_until_killed() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return; // Not the child: nothing to do.
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let log = EventLog::open(LogConfig::new(dir)).expect("child opens log");
        let tasks: Vec<_> = (0..STREAMS)
            .map(|s| {
                let log = log.clone();
                tokio::spawn(async move {
                    let stream = format!("stream-{s}");
                    let mut version = log.stream_version(&stream).await.expect("version");
                    loop {
                        // Each event's payload is its own version: checkable after the crash.
                        let request = AppendRequest::new(&stream, ExpectedVersion::at(version))
                            .events((1..=EVENTS_PER_APPEND).map(|i| {
                                NewEvent::encode("Counted", &(version.get() + i)).expect("encodes")
                            }));
                        let appended = log.append(request).await.expect("child appends");
                        version = appended.stream_version;
                        let mut out = std::io::stdout().lock();
                        writeln!(out, "ack {stream} {version}").expect("stdout");
                        out.flush().expect("stdout");
                    }
                })
            })
            .collect();
        // The tasks append until the parent kills this process; a panic in one ends the child.
        let first = tasks.into_iter().next().expect("at least one task");
        first.await.expect("child task");
    });
}

/// Runs the child until it has acknowledged `acks_before_kill` appends, then SIGKILLs it.
/// Returns the highest acknowledged version per stream.
fn run_child_and_kill(dir: &std::path::Path, acks_before_kill: usize) -> HashMap<String, u64> {
    let exe = std::env::current_exe().expect("test binary path");
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "crash_child_appends_until_killed",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawns child");
    // Kill the child whatever happens below (a failed assertion must not leave it running).
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().expect("piped");
    let mut child = KillOnDrop(child);
    let mut acked: HashMap<String, u64> = HashMap::new();
    let mut count = 0;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("reads child output");
        let Some(rest) = line.strip_prefix("ack ") else {
            continue;
        };
        let (stream, version) = rest.split_once(' ').expect("ack line has two fields");
        let version: u64 = version.parse().expect("version");
        let entry = acked.entry(stream.to_owned()).or_default();
        *entry = (*entry).max(version);
        count += 1;
        if count == acks_before_kill {
            // SIGKILL while the other tasks are mid-append.
            child.0.kill().expect("kills child");
            break;
        }
    }
    assert_eq!(count, acks_before_kill, "child stopped before it was killed");
    let status = child.0.wait().expect("waits");
    assert!(!status.success(), "the child was killed, not finished");
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_appending_loses_no_acknowledged_event_and_shows_nothing_half_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut acked_overall: HashMap<String, u64> = HashMap::new();
    // Three rounds: each reopens the log the previous kill left behind, so recovery of a
    // recovered log is exercised too.
    for (round, acks) in [400usize, 250, 600].into_iter().enumerate() {
        let acked = run_child_and_kill(dir.path(), acks);
        for (stream, version) in acked {
            let entry = acked_overall.entry(stream).or_default();
            *entry = (*entry).max(version);
        }
        let log = EventLog::open(LogConfig::new(dir.path())).expect("reopens after SIGKILL");
        let mut total = 0;
        for s in 0..STREAMS {
            let stream = format!("stream-{s}");
            let version = log.stream_version(&stream).await.expect("version");
            let acked = acked_overall.get(&stream).copied().unwrap_or(0);
            assert!(
                version >= acked,
                "round {round}: {stream} has v{version}, but v{acked} was acknowledged"
            );
            assert_eq!(
                version.get() % EVENTS_PER_APPEND,
                0,
                "round {round}: {stream} holds part of an append"
            );
            let records = log
                .read_stream(&stream, StreamVersion::new(1), 100_000)
                .await
                .expect("reads verified stream");
            assert_eq!(records.len() as u64, version.get());
            for (i, record) in records.iter().enumerate() {
                assert_eq!(
                    record.decode::<u64>().expect("payload decodes"),
                    i as u64 + 1,
                    "in order"
                );
            }
            total += records.len();
        }
        let all = log
            .read_all(Position::new(1), 100_000)
            .expect("whole log verifies");
        assert_eq!(all.len(), total, "round {round}: log and stream index agree");
        for (i, record) in all.iter().enumerate() {
            assert_eq!(
                record.position(),
                i as u64 + 1,
                "round {round}: gap-free positions"
            );
        }
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    for entry in std::fs::read_dir(from).expect("reads dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            std::fs::create_dir_all(&target).expect("mkdir");
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copies");
        }
    }
}

/// The sled file of `dir`, cut by `bytes` at its end (a lost tail).
fn cut_tail(dir: &std::path::Path, bytes: u64) {
    let path = dir.join("db");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("opens sled's file");
    let len = file.metadata().expect("metadata").len();
    file.set_len(len.saturating_sub(bytes)).expect("truncates");
}

/// Issue 9: a SIGKILLed log whose file lost its tail refuses to open and names what is missing;
/// an operator can accept the loss, which is then recorded as an event, and the log serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_tail_after_sigkill_is_refused_with_its_positions_unless_accepted() {
    let killed = tempfile::tempdir().expect("tempdir");
    let acked = run_child_and_kill(killed.path(), 300);
    // The file's last bytes may hold only appends that were never acknowledged (written, not
    // yet flushed when the kill came): losing those is no loss. So cut a copy of the killed
    // log by more and more until acknowledged records are gone; every open that succeeds on
    // the way must still hold all of them.
    let mut refusal = None;
    let mut dir = tempfile::tempdir().expect("tempdir");
    for cut in [1024, 4 * 1024, 16 * 1024, 64 * 1024, 128 * 1024, 256 * 1024] {
        dir = tempfile::tempdir().expect("tempdir");
        copy_dir(killed.path(), dir.path());
        cut_tail(dir.path(), cut);
        match EventLog::open(LogConfig::new(dir.path())) {
            Err(error) => {
                refusal = Some(error);
                break;
            }
            Ok(log) => {
                for (stream, version) in &acked {
                    let found = log.stream_version(stream).await.expect("version");
                    assert!(
                        found >= *version,
                        "cut {cut}: opened silently without acknowledged records: {stream} v{found} < v{version}"
                    );
                }
            }
        }
    }
    let refusal = refusal.expect("cutting 256 KiB lost acknowledged records");
    let saga_storage::StorageError::LostTail {
        mark_position,
        found_position,
        streams,
        ..
    } = &refusal
    else {
        panic!("expected LostTail, got {refusal}");
    };
    assert!(found_position < mark_position, "{refusal}");
    assert!(
        !streams.is_empty() && streams.iter().all(|s| s.starts_with("stream-")),
        "the refusal names the lost records' streams: {refusal}"
    );
    let text = refusal.to_string();
    assert!(
        text.contains(&format!(
            "positions {}..={mark_position} missing",
            found_position + 1
        )),
        "{text}"
    );
    // Refused again: the refusal did not change the data dir.
    assert!(matches!(
        EventLog::open(LogConfig::new(dir.path())),
        Err(saga_storage::StorageError::LostTail { .. })
    ));
    // Audit says the same, offline.
    {
        let audit = saga_storage::audit::AuditLog::open(dir.path()).expect("opens for audit");
        let report = audit.verify(None).expect("verifies");
        assert!(
            report
                .findings
                .iter()
                .any(|f| f.what.contains("lost acknowledged records")),
            "{:?}",
            report.findings
        );
    }
    let found_position = *found_position;
    let mut config = LogConfig::new(dir.path());
    config.accept_lost_tail = true;
    let log = EventLog::open(config).expect("opens with the loss accepted");
    let recorded = log
        .read_stream(saga_storage::LOG_STREAM, StreamVersion::new(1), 10)
        .await
        .expect("reads the log's own stream");
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].position(), found_position + 1);
    let accepted: saga_storage::LostTailAccepted = recorded[0].decode().expect("decodes");
    assert_eq!(accepted.found_position, found_position);
    assert!(accepted.refusal.contains("lost acknowledged records"));
    log.append(
        AppendRequest::new("after", ExpectedVersion::Any).event(NewEvent::encode("E", &1u64).unwrap()),
    )
    .await
    .expect("serves again");
    drop(log);
    let log = EventLog::open(LogConfig::new(dir.path())).expect("reopens without the flag once accepted");
    assert_eq!(log.durable_position(), found_position + 2);
}

/// Issue 9: a directory another process holds is refused with exactly that reason.
#[test]
fn a_data_dir_held_by_another_process_is_refused_as_such() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(std::env::current_exe().expect("test binary path"))
        .args([
            "--exact",
            "crash_child_appends_until_killed",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawns child");
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    // The child holds the log once it acknowledged an append.
    let first = lines.find(|line| line.as_ref().is_ok_and(|l| l.starts_with("ack ")));
    let result = EventLog::open(LogConfig::new(dir.path()));
    let _ = child.kill();
    let _ = child.wait();
    assert!(first.is_some(), "the child appended");
    match result {
        Err(error @ saga_storage::StorageError::Locked { .. }) => {
            assert!(error.to_string().contains("held by another process"), "{error}");
        }
        Err(other) => panic!("expected Locked, got {other}"),
        Ok(_) => panic!("opened a data dir another process holds"),
    }
}

//! `saga-participant`'s settings as a process sees them (saga_proto::config): flag >
//! environment > file > default, and a bad setting stops it at start naming the setting and
//! where its value came from. The repo's sample file parses.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_saga-participant");
const PATIENCE: Duration = Duration::from_secs(60);

/// The participant with `args` and `env`, and no SAGA_* variable of the test's environment.
fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(BIN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("SAGA_") {
            command.env_remove(name);
        }
    }
    command.args(args).envs(env.iter().copied());
    command
}

/// A started participant, killed and reaped when dropped (also when the test fails).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts it and returns once it printed `listening on ADDR`, with ADDR.
fn listening(args: &[&str], env: &[(&str, &str)]) -> (Running, String) {
    let mut child = command(args, env)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starts");
    let stdout = child.stdout.take().expect("piped");
    let running = Running(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("reads stdout");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("first line {line:?}"))
        .to_owned();
    (running, addr)
}

/// Runs it to its end (it must refuse to start); its exit code and standard error.
fn refused(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut child = command(args, env)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts");
    let began = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("polls") {
            break status;
        }
        if began.elapsed() > PATIENCE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running after {PATIENCE:?}: it should have refused to start");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("piped"), &mut stderr).expect("reads");
    (status.code().expect("exited, not signalled"), stderr)
}

fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).expect("writes");
    path.to_str().expect("utf-8").to_owned()
}

#[test]
fn a_flag_wins_over_the_environment_which_wins_over_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("from-file");
    let file = write(
        &dir.path().join("participant.toml"),
        &format!(
            "role = \"stock\"\nlisten = \"file-listen-is-not-used\"\ndata_dir = {:?}\ncache_mb = 4\n",
            data.to_str().expect("utf-8")
        ),
    );
    // The flag over the environment over the file.
    let (first, addr) = listening(
        &["--config", &file, "--listen", "127.0.0.1:0"],
        &[("SAGA_LISTEN", "env-listen-is-not-used")],
    );
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    assert!(data.exists(), "the data dir came from the file");
    drop(first);
    // The environment over the file; the file's name from SAGA_CONFIG.
    let (_second, addr) = listening(&[], &[("SAGA_CONFIG", &file), ("SAGA_LISTEN", "127.0.0.1:0")]);
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
}

#[test]
fn a_bad_setting_is_named_with_where_it_came_from() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8");
    let base = format!("role = \"stock\"\nlisten = \"127.0.0.1:0\"\ndata_dir = {data:?}\n");

    let file = write(
        &dir.path().join("bad.toml"),
        &format!("{base}cache_mb = \"lots\"\n"),
    );
    let (code, stderr) = refused(&["--config", &file], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(&format!("cache_mb in {file}")) && stderr.contains("lots"),
        "{stderr}"
    );

    let file = write(&dir.path().join("ok.toml"), &base);
    let (code, stderr) = refused(&["--config", &file], &[("SAGA_CACHE_MB", "lots")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("SAGA_CACHE_MB"), "{stderr}");

    let (code, stderr) = refused(&["--config", &file, "--cache-mb", "lots"], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--cache-mb"), "{stderr}");

    let file = write(&dir.path().join("unknown.toml"), &format!("{base}colour = 1\n"));
    let (code, stderr) = refused(&["--config", &file], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("unknown setting `colour`") && stderr.contains(&file),
        "{stderr}"
    );

    // Checked after parsing: the address cannot be bound; named with the file.
    let file = write(
        &dir.path().join("listen.toml"),
        &format!("role = \"stock\"\nlisten = \"nonsense\"\ndata_dir = {data:?}\n"),
    );
    let (code, stderr) = refused(&["--config", &file], &[]);
    assert_ne!(code, 0, "{stderr}");
    assert!(
        stderr.contains(&format!("listen in {file}: cannot bind nonsense")),
        "{stderr}"
    );
}

#[test]
fn the_sample_file_in_the_repo_parses() {
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/participant.toml");
    let sample = sample.to_str().expect("utf-8");
    // Every key of the sample is known and valid: the first error is the role the flag gives.
    let (code, stderr) = refused(&["--config", sample, "--role", "nonsense"], &[]);
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("--role"), "{stderr}");
    assert!(!stderr.contains(&format!("in {sample}")), "{stderr}");
}

//! The repo's sample settings files parse in the binaries they are for, and sagactl takes its
//! server from a file unless a flag or SAGACTL_SERVER says otherwise (saga_proto::config).

use std::path::Path;
use std::process::{Command, Output};

fn sample(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../config")
        .join(name)
        .to_str()
        .expect("utf-8")
        .to_owned()
}

/// `bin` with `args` and `env`, and no SAGA_* or SAGACTL_* variable of the test's environment.
fn run(bin: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(bin);
    for (name, _) in std::env::vars_os() {
        let name_text = name.to_string_lossy();
        if name_text.starts_with("SAGA_") || name_text.starts_with("SAGACTL_") {
            command.env_remove(&name);
        }
    }
    command
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("runs")
}

#[test]
fn the_orchestrator_sample_parses() {
    let sample = sample("orchestrator.toml");
    // Every key of the sample is known and valid: the first error is the flag's.
    let out = run(
        env!("CARGO_BIN_EXE_saga-orchestrator"),
        &["serve", "--config", &sample, "--participants", "nonsense"],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("--participants:"), "{stderr}");
    assert!(!stderr.contains(&format!("in {sample}")), "{stderr}");
}

#[test]
fn sagactl_takes_its_server_from_the_file_unless_the_environment_or_a_flag_says_otherwise() {
    let sample = sample("sagactl.toml");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("sagactl.toml");
    std::fs::write(&file, "server = \"127.0.0.1:1\"\ntimeout_ms = 500\n").expect("writes");
    let file = file.to_str().expect("utf-8");
    let sagactl = env!("CARGO_BIN_EXE_sagactl");
    let unreachable = |out: &Output, addr: &str| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(5), "unreachable: {stderr}");
        assert!(stderr.contains(addr), "{addr} in {stderr}");
    };
    unreachable(
        &run(sagactl, &["--config", file, "get", "ord-x"], &[]),
        "127.0.0.1:1",
    );
    unreachable(
        &run(
            sagactl,
            &["get", "ord-x", "--config", file],
            &[("SAGACTL_SERVER", "127.0.0.1:2")],
        ),
        "127.0.0.1:2",
    );
    unreachable(
        &run(
            sagactl,
            &["get", "ord-x", "--server", "127.0.0.1:3"],
            &[("SAGA_CONFIG", file), ("SAGACTL_SERVER", "127.0.0.1:2")],
        ),
        "127.0.0.1:3",
    );
    // The sample parses (its server is the default address, where nothing listens in tests
    // or something does: either way not a settings error).
    let out = run(
        sagactl,
        &["--config", &sample, "get", "ord-x", "--server", "127.0.0.1:1"],
        &[],
    );
    unreachable(&out, "127.0.0.1:1");
}

/// Issue 12: a bad setting names the setting and where it came from, for the global options
/// too (`otlp_endpoint`) and for sagactl's (its server, token and TLS files).
#[test]
fn a_bad_setting_names_its_source_in_the_orchestrator_and_in_sagactl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = |name: &str, text: &str| {
        let file = dir.path().join(name);
        std::fs::write(&file, text).expect("writes");
        file.to_str().expect("utf-8").to_owned()
    };
    let refused = |out: &Output, code: i32, wanted: &str| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{stderr}");
        assert!(stderr.contains(wanted), "{wanted:?} in {stderr}");
    };

    let orchestrator = env!("CARGO_BIN_EXE_saga-orchestrator");
    let data_dir = dir.path().join("data");
    let file = settings(
        "orchestrator.toml",
        &format!(
            "data_dir = {:?}\nparticipants = \"order=127.0.0.1:1,stock=127.0.0.1:1,coupon=127.0.0.1:1,balance=127.0.0.1:1\"\nrocketmq = \"127.0.0.1:1\"\n\
             otlp_endpoint = \"ftp://collector:4317\"\n",
            data_dir.to_str().expect("utf-8")
        ),
    );
    refused(
        &run(orchestrator, &["serve", "--config", &file], &[]),
        1,
        &format!("otlp_endpoint in {file}: \"ftp://collector:4317\": give http://host:port"),
    );
    refused(
        &run(
            orchestrator,
            &["dev", "--orders", "1"],
            &[("SAGA_OTLP_ENDPOINT", "collector")],
        ),
        1,
        "SAGA_OTLP_ENDPOINT: \"collector\"",
    );

    let sagactl = env!("CARGO_BIN_EXE_sagactl");
    let file = settings("sagactl.toml", "server = \"ftp://127.0.0.1:1\"\n");
    refused(
        &run(sagactl, &["--config", &file, "get", "ord-x"], &[]),
        2,
        &format!("server in {file}: \"ftp://127.0.0.1:1\""),
    );
    refused(
        &run(
            sagactl,
            &["get", "ord-x"],
            &[("SAGACTL_SERVER", "ftp://127.0.0.1:1")],
        ),
        2,
        "SAGACTL_SERVER: \"ftp://127.0.0.1:1\"",
    );
    let missing = dir.path().join("missing").to_str().expect("utf-8").to_owned();
    let file = settings(
        "sagactl-token.toml",
        &format!("server = \"127.0.0.1:1\"\ntoken_file = \"{missing}\"\n"),
    );
    refused(
        &run(sagactl, &["--config", &file, "replay"], &[]),
        2,
        &format!("token_file in {file}: {missing}"),
    );
    refused(
        &run(sagactl, &["get", "ord-x"], &[("SAGACTL_TLS_CA", &missing)]),
        2,
        "SAGACTL_TLS_CA",
    );
}

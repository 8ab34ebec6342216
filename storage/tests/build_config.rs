//! Build settings of the log's dependencies that cost memory or CPU when wrong, checked
//! against the resolved dependency graph (`cargo metadata`).

use std::process::Command;

/// The resolved dependency graph (`cargo metadata`) for this machine, and its sled package.
fn metadata_and_sled() -> (serde_json::Value, serde_json::Value) {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
    // The graph for this machine only: the packages of other platforms are not downloaded.
    let version = Command::new(env!("CARGO"))
        .arg("-vV")
        .output()
        .expect("run cargo -vV");
    let version = String::from_utf8_lossy(&version.stdout);
    let host = version
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("cargo -vV names the host");
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--locked",
            "--offline",
            "--filter-platform",
            host,
        ])
        .args(["--manifest-path", manifest])
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metadata: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");
    let sled = metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .find(|p| p["name"] == "sled")
        .expect("sled is a dependency")
        .clone();
    (metadata, sled)
}

/// sled 0.34.7 measures every tree and page-cache operation (an `rdtscp` pair and an atomic
/// histogram update each) into 41 histograms of 64 Ki counters (21.5 MB of heap per process)
/// unless its `no_metrics` feature is on. That feature is one of sled's defaults, which the
/// workspace turns off (`default-features = false`), so it must be named; nothing reads
/// those histograms.
#[test]
fn sled_is_built_without_its_operation_histograms() {
    let (metadata, sled) = metadata_and_sled();
    let node = metadata["resolve"]["nodes"]
        .as_array()
        .expect("resolve.nodes")
        .iter()
        .find(|n| n["id"] == sled["id"])
        .expect("sled is in the resolved graph");
    let features: Vec<&str> = node["features"]
        .as_array()
        .expect("features")
        .iter()
        .filter_map(|f| f.as_str())
        .collect();
    assert!(
        features.contains(&"no_metrics"),
        "sled is built with its operation histograms (features {features:?}): enable `no_metrics`"
    );
}

/// sled is the vendored copy with our flush-path changes (vendor/sled/PATCHES.md: one pool
/// thread woken per task, and an explicit flush writes its buffer itself), not the crates.io
/// package: dropping the `[patch.crates-io]` entry would silently bring back a wake-up of seven
/// threads per flush in every process.
#[test]
fn sled_is_the_vendored_copy_with_the_flush_changes() {
    let (_, sled) = metadata_and_sled();
    assert_eq!(sled["version"], "0.34.7");
    assert!(
        sled["source"].is_null(),
        "sled comes from {} instead of vendor/sled",
        sled["source"]
    );
    let manifest = sled["manifest_path"].as_str().expect("manifest_path");
    assert!(
        manifest.ends_with("vendor/sled/Cargo.toml"),
        "sled's manifest is {manifest}"
    );
    let dir = std::path::Path::new(manifest).parent().expect("sled's directory");
    let threadpool = std::fs::read_to_string(dir.join("src/threadpool.rs")).expect("threadpool.rs");
    assert!(
        threadpool.contains("self.cv.notify_one();") && !threadpool.contains("self.cv.notify_all();"),
        "the pool's send wakes one thread"
    );
    let iobuf = std::fs::read_to_string(dir.join("src/pagecache/iobuf.rs")).expect("iobuf.rs");
    assert!(
        iobuf.contains("seal_and_write_iobuf(iobufs, &iobuf, header, false, true)?;"),
        "make_stable writes its buffer on the flushing thread"
    );
}

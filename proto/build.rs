//! Generates the tonic/prost code for `saga.v1` with the protoc binary that ships inside the
//! `protoc-bin-vendored` crate, so a fresh machine needs no protoc of its own.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "saga/v1/common.proto",
    "saga/v1/orchestrator.proto",
    "saga/v1/participants.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment now.
    #[allow(unsafe_code, reason = "set_var is unsafe since edition 2024; see SAFETY")]
    unsafe {
        std::env::set_var("PROTOC", protoc)
    };

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("saga_v1_descriptor.bin"))
        .compile_protos(PROTOS, &["."])?;
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}

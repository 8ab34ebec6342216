//! The machine's ceiling for this design's calls: a no-op unary gRPC call (the standard health
//! check) from this process to a `saga-participant` process on loopback, at C calls in flight,
//! for a few seconds. With the storage benchmark's durable append rate it bounds the saga rate
//! (calls and appends per saga: BENCHMARKS.md).
//!
//! ```text
//! scripts/bench -- --ceiling            # C = 32 and 128, 5 s each
//! cargo bench -p saga-tests --bench ceiling -- --conc 32 --seconds 5
//! ```
//!
//! One line per concurrency:
//! `ceiling=grpc_noop conc=32 calls_per_s=... p50_us=... p99_us=...`

use std::time::{Duration, Instant};

use clap::Parser;
use saga_orchestrator::workload::percentile_ms;
use saga_tests::Proc;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

#[derive(Parser)]
struct Args {
    /// Calls in flight, comma-separated.
    #[arg(long, default_value = "32,128", value_delimiter = ',')]
    conc: Vec<usize>,
    /// Seconds measured per concurrency.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// cargo bench passes --bench; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let args_server: Vec<String> = [
        "--role",
        "stock",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &dir.path().to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let server = Proc::start("saga-participant", &args_server, &[]);
    let channel = server.channel().await;
    for conc in args.conc {
        let deadline = Instant::now() + Duration::from_secs(args.seconds);
        let tasks: Vec<_> = (0..conc.max(1))
            .map(|_| {
                let mut client = HealthClient::new(channel.clone());
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    while Instant::now() < deadline {
                        let began = Instant::now();
                        client
                            .check(HealthCheckRequest {
                                service: String::new(),
                            })
                            .await
                            .expect("health check");
                        latencies.push(began.elapsed());
                    }
                    latencies
                })
            })
            .collect();
        let began = Instant::now();
        let mut latencies = Vec::new();
        for task in tasks {
            latencies.extend(task.await?);
        }
        let elapsed = began.elapsed();
        latencies.sort_unstable();
        println!(
            "ceiling=grpc_noop conc={conc} calls_per_s={:.0} p50_us={:.0} p99_us={:.0}",
            latencies.len() as f64 / elapsed.as_secs_f64(),
            percentile_ms(&latencies, 50.0) * 1000.0,
            percentile_ms(&latencies, 99.0) * 1000.0,
        );
    }
    drop(server);
    Ok(())
}

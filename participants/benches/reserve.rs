//! Participant benchmark: durable ReserveStock calls/s and latency over gRPC against a
//! `saga-participant --role stock` process (separate process, loopback), C concurrent clients.
//!
//! ```text
//! cargo bench -p saga-participants --bench reserve -- [--clients 32] [--seconds 5] [--channels 4]
//! ```
//!
//! Every call is a new saga's reservation: a barrier read, one durable append (event, stream
//! index, stock projection guarded in the same transaction), a projection read for the answer.
//! Output: `participant-reserve clients=32 calls=... calls_per_s=... p50_us=... p99_us=... errors=0`

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use saga_proto::v1 as pb;
use tonic::transport::Channel;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} takes a number")))
        .unwrap_or(default)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    let clients = arg("--clients", 32) as usize;
    let seconds = arg("--seconds", 5);
    let channels = arg("--channels", 4) as usize;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_saga-participant"))
        .args(["--role", "stock", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starts saga-participant");
    let stdout = child.stdout.take().expect("piped");
    let child = Kill(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("reads");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect("listening line")
        .to_owned();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let mut pool = Vec::new();
        for _ in 0..channels.max(1) {
            let channel = Channel::from_shared(format!("http://{addr}"))
                .expect("uri")
                .timeout(Duration::from_secs(10))
                .connect()
                .await
                .expect("connects");
            pool.push(pb::stock_service_client::StockServiceClient::new(channel));
        }
        let mut seeder = pool[0].clone();
        seeder
            .seed_stock(pb::SeedStockRequest {
                stock: (0..100)
                    .map(|p| pb::ProductStock {
                        product_id: format!("p{p}"),
                        available: 1_000_000,
                        reserved: 0,
                    })
                    .collect(),
            })
            .await
            .expect("seeds");
        let started = Instant::now();
        let deadline = started + Duration::from_secs(seconds);
        let tasks: Vec<_> = (0..clients)
            .map(|c| {
                let mut client = pool[c % pool.len()].clone();
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let mut errors = 0u64;
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        let saga = format!("bench-{c}-{n}");
                        n += 1;
                        let t = Instant::now();
                        let result = client
                            .reserve_stock(pb::ReserveStockRequest {
                                key: Some(pb::StepKey {
                                    saga_id: saga.clone(),
                                    step: "reserve_stock".into(),
                                }),
                                order_id: saga,
                                items: vec![pb::OrderItem {
                                    product_id: format!("p{}", n % 100),
                                    quantity: 1,
                                }],
                            })
                            .await;
                        match result {
                            Ok(_) => latencies.push(t.elapsed().as_micros() as u64),
                            Err(_) => errors += 1,
                        }
                    }
                    (latencies, errors)
                })
            })
            .collect();
        let mut latencies = Vec::new();
        let mut errors = 0;
        for t in tasks {
            let (l, e) = t.await.expect("client task");
            latencies.extend(l);
            errors += e;
        }
        let elapsed = started.elapsed().as_secs_f64();
        latencies.sort_unstable();
        println!(
            "participant-reserve clients={clients} calls={} calls_per_s={:.0} p50_us={} p99_us={} errors={errors}",
            latencies.len(),
            latencies.len() as f64 / elapsed,
            percentile(&latencies, 0.50),
            percentile(&latencies, 0.99),
        );
    });
    drop(child);
}

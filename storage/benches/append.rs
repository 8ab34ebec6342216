//! Storage benchmark: durable appends/s and append latency with 1, 16 and 64 concurrent
//! writers. Each append is a real `EventLog::append` of one 200-byte event to the writer's own
//! stream (transaction, envelope, checksum, hash chain, flush).
//!
//! ```text
//! cargo bench -p saga-storage --bench append -- [--writers 1,16,64] [--seconds 5] [--event-bytes 200]
//!     [--fsync off] [--runtime-workers 2]
//! ```
//!
//! One line per writer count:
//! `storage-append writers=16 appends=... appends_per_s=... p50_us=... p99_us=... flushes=... fsync=on`

use std::time::{Duration, Instant};

use saga_storage::{
    AppendRequest, Durability, EventLog, ExpectedVersion, LogConfig, NewEvent, StreamVersion,
};

struct Args {
    writers: Vec<usize>,
    seconds: f64,
    event_bytes: usize,
    fsync: bool,
    runtime_workers: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        writers: vec![1, 16, 64],
        seconds: 5.0,
        event_bytes: 200,
        fsync: true,
        runtime_workers: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--writers" => {
                args.writers = value()?
                    .split(',')
                    .map(|w| w.parse().map_err(|e| format!("--writers: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--seconds" => args.seconds = value()?.parse().map_err(|e| format!("--seconds: {e}"))?,
            "--event-bytes" => {
                args.event_bytes = value()?.parse().map_err(|e| format!("--event-bytes: {e}"))?
            }
            "--fsync" => args.fsync = value()? != "off",
            "--runtime-workers" => {
                args.runtime_workers = value()?.parse().map_err(|e| format!("--runtime-workers: {e}"))?
            }
            "--bench" => {} // passed by `cargo bench`
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn run(writers: usize, args: &Args) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = LogConfig {
        durability: if args.fsync {
            Durability::Fsync
        } else {
            Durability::NoFsyncBenchmarkOnly
        },
        ..LogConfig::new(dir.path())
    };
    let log = EventLog::open(config).expect("opens");
    let payload = vec![0xAB; args.event_bytes];
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let log = log.clone();
            let payload = payload.clone();
            tokio::spawn(async move {
                let stream = format!("bench-{w}");
                let mut version = StreamVersion::NONE;
                let mut latencies_us = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let appended = log
                        .append(
                            AppendRequest::new(&stream, ExpectedVersion::at(version))
                                .event(NewEvent::new("BenchEvent", payload.clone())),
                        )
                        .await
                        .expect("appends");
                    latencies_us.push(t.elapsed().as_micros() as u64);
                    version = appended.stream_version;
                }
                latencies_us
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.expect("writer task"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let stats = log.stats();
    println!(
        "storage-append writers={writers} appends={} appends_per_s={:.0} p50_us={} p99_us={} flushes={} fsync={}",
        latencies.len(),
        latencies.len() as f64 / elapsed,
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        stats.flushes,
        if args.fsync { "on" } else { "off" },
    );
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("append bench: {e}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.runtime_workers)
        .enable_all()
        .build()
        .expect("runtime");
    for &writers in &args.writers {
        runtime.block_on(run(writers, &args));
    }
}

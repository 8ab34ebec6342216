//! The saga benchmark of shared/BENCH.md: the orchestrator and the four participants as
//! separate processes (optimised builds, one sled log each, full fsync), compensations through
//! the real RocketMQ broker of scripts/dev-env.
//!
//! ```text
//! scripts/bench [-- --scenario fail20,all_ok --conc 32,128 --n 2000 --warmup 200]
//! ```
//!
//! (`scripts/bench` builds the binaries in the `production` profile, starts the broker, runs
//! this and stops the broker.) For each scenario and concurrency: a fresh system (new data
//! directories, topics and consumer groups), BENCH.md's data seeded through the participants'
//! Seed calls, a warm-up of `--warmup` sagas, then `--n` sagas with C in flight. A saga's
//! latency runs from the client's StartOrder call to the final event seen on WatchSaga. One line
//! per run, the shape BENCH.md fixes:
//!
//! `peer=ours scenario=fail20 conc=32 n=2000 sagas_per_s=... p50_ms=... p95_ms=... p99_ms=... rss_mb=... correct=yes`
//!
//! With `--orchestrators K` (a scale run) K orchestrator nodes share the participants and the
//! broker, each with its own log, node id and acknowledgement group, the orders split evenly
//! between them; the line then says `peer=ours-<K>orch`, and the run is correct only if no node
//! reported an acknowledgement of another node's saga.
//!
//! `rss_mb` sums the peak resident memory (VmHWM) of the five processes; `correct=yes` only when
//! every saga (warm-up included) ended completed or compensated and the conservation checks
//! hold on the participants' own state.

use std::time::{Duration, Instant};

use clap::Parser;
use saga_orchestrator::order::ParticipantAddrs;
use saga_orchestrator::workload::{self, Scenario};
use saga_proto::v1 as pb;
use saga_tests::{System, SystemConfig};

#[derive(Parser)]
struct Args {
    /// Scenarios, comma-separated: fail20, all_ok.
    #[arg(long, default_value = "fail20", value_delimiter = ',')]
    scenario: Vec<String>,
    /// Sagas in flight, comma-separated.
    #[arg(long, default_value = "32", value_delimiter = ',')]
    conc: Vec<usize>,
    /// Measured sagas per run.
    #[arg(long, default_value_t = 2000)]
    n: u64,
    /// Sagas run before measuring.
    #[arg(long, default_value_t = 200)]
    warmup: u64,
    /// Orchestrator nodes sharing the participants and the broker; the orders are split evenly
    /// between them (a scale run: the line says `peer=ours-<k>orch`).
    #[arg(long, default_value_t = 1)]
    orchestrators: u32,
    /// Every process serves Prometheus metrics (`--metrics-listen` on a port of its own),
    /// so that their cost shows; the line ends with `metrics=on`.
    #[arg(long)]
    metrics: bool,
    /// How participants acknowledge compensations: `grpc` (the orchestrator runs with
    /// `--ack-endpoint listen`) or `topic` (through the broker; the line ends with
    /// `acks=topic`).
    #[arg(long, default_value = "grpc", value_parser = ["grpc", "topic"])]
    acks: String,
    /// cargo bench passes --bench; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Peak resident memory of a process in MiB (VmHWM of /proc/PID/status).
fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// CPU time (user + system, in microseconds) and minor page faults of a process so far
/// (/proc/PID/stat).
fn usage(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces): minflt is
    // the 8th, utime the 12th and stime the 13th of them (times in clock ticks).
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf only reads a configuration value.
    #[allow(unsafe_code)]
    let per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    ((field(11) + field(12)) * 1_000_000 / per_s, field(7))
}

async fn run(namesrv: &str, scenario: Scenario, conc: usize, args: &Args) -> anyhow::Result<String> {
    let (n, warmup) = (args.n, args.warmup);
    // Extra nodes would share the orchestrator's arguments, metrics port included.
    anyhow::ensure!(
        !(args.metrics && args.orchestrators > 1),
        "--metrics runs with one orchestrator only"
    );
    let config = if args.metrics {
        let port = || format!("127.0.0.1:{}", saga_tests::free_port());
        SystemConfig {
            participant_env: ["order", "stock", "coupon", "balance"]
                .into_iter()
                .map(|role| (role, "SAGA_METRICS_LISTEN".to_owned(), port()))
                .collect(),
            orchestrator_args: vec!["--metrics-listen".to_owned(), port()],
            ..SystemConfig::default()
        }
    } else {
        SystemConfig::default()
    };
    let mut config = config;
    if args.acks == "grpc" {
        // Each node names its own API address (extra nodes share these arguments).
        config
            .orchestrator_args
            .extend(["--ack-endpoint".to_owned(), "listen".to_owned()]);
    }
    let system = System::start(namesrv, config).await;
    let logs = tempfile::tempdir()?;
    // Further orchestrator nodes (scale runs): the same participants and topics, their own
    // logs, node ids and acknowledgement groups.
    let extra: Vec<saga_tests::Proc> = (2..=args.orchestrators)
        .map(|i| system.start_orchestrator_node(&format!("n{i}"), &logs.path().join(format!("n{i}.log"))))
        .collect();
    let addrs = ParticipantAddrs::parse(&system.participant_list())?;
    let apis: Vec<String> = system
        .orchestrator
        .iter()
        .chain(&extra)
        .map(|p| p.addr.clone())
        .collect();
    workload::seed(&addrs, 0..warmup + n, scenario).await?;

    let mut results = saga_tests::run_split(&apis, scenario, &system.run, 0..warmup, conc).await?;
    // Each process's CPU time over the measured sagas: the cost per saga, steadier from run to
    // run than the rate on a machine this small (diagnostics, on stderr).
    let orchestrators = system.orchestrator.iter().chain(&extra);
    let pids: Vec<(&str, u32)> = system
        .participants
        .iter()
        .map(|(role, p)| (role.as_str(), p.child.id()))
        .chain(orchestrators.map(|p| ("orchestrator", p.child.id())))
        .chain([("bench", std::process::id())])
        .collect();
    let before: Vec<(u64, u64)> = pids.iter().map(|&(_, pid)| usage(pid)).collect();
    let began = Instant::now();
    let measured = saga_tests::run_split(&apis, scenario, &system.run, warmup..warmup + n, conc).await?;
    let elapsed = began.elapsed();
    let used: Vec<(&str, u64, u64)> = pids
        .iter()
        .zip(&before)
        .map(|(&(name, pid), &(cpu, faults))| {
            let (cpu_now, faults_now) = usage(pid);
            (
                name,
                cpu_now.saturating_sub(cpu) / n.max(1),
                faults_now.saturating_sub(faults) / n.max(1),
            )
        })
        .collect();
    let cpu: Vec<(&str, u64)> = used.iter().map(|&(name, cpu, _)| (name, cpu)).collect();
    let faults: Vec<(&str, u64)> = used.iter().map(|&(name, _, faults)| (name, faults)).collect();
    eprintln!(
        "cpu us per saga: {cpu:?} total={}",
        cpu.iter().map(|(_, us)| us).sum::<u64>()
    );
    eprintln!(
        "minor page faults per saga: {faults:?} total={}",
        faults.iter().map(|(_, f)| f).sum::<u64>()
    );

    let mut latencies: Vec<Duration> = measured.iter().map(|r| r.latency).collect();
    latencies.sort_unstable();
    results.extend(measured);
    let mut problems = workload::check_conservation(&addrs, &results).await?;
    // Every acknowledgement reached its owner: a node that gets another's reports it.
    for entry in std::fs::read_dir(logs.path())? {
        let path = entry?.path();
        if std::fs::read_to_string(&path)?
            .contains("acknowledgement for a saga this orchestrator does not have")
        {
            problems.push(format!(
                "{} received another node's acknowledgement",
                path.display()
            ));
        }
    }
    for problem in &problems {
        eprintln!("check failed: {problem}");
    }
    let correct = problems.is_empty() && results.len() as u64 == warmup + n;
    let processes: Vec<(&str, f64)> = pids
        .iter()
        .filter(|(name, _)| *name != "bench")
        .map(|&(name, pid)| (name, peak_rss_mb(pid)))
        .collect();
    let rss_mb: f64 = processes.iter().map(|(_, mb)| mb).sum();
    eprintln!("peak RSS (MiB): {processes:?}");
    let completed = results
        .iter()
        .filter(|r| r.state == pb::SagaState::Completed)
        .count();
    eprintln!(
        "{}: {} sagas ({} completed, {} compensated) in {:.2} s",
        scenario.name(),
        results.len(),
        completed,
        results.len() - completed,
        elapsed.as_secs_f64()
    );
    // BENCH.md's shape; a run with more orchestrator nodes says so in `peer`.
    let peer = match args.orchestrators {
        1 => "ours".to_owned(),
        k => format!("ours-{k}orch"),
    };
    Ok(format!(
        "peer={peer} scenario={} conc={conc} n={n} sagas_per_s={:.1} p50_ms={:.1} p95_ms={:.1} p99_ms={:.1} rss_mb={:.0} correct={}",
        scenario.name(),
        n as f64 / elapsed.as_secs_f64(),
        workload::percentile_ms(&latencies, 50.0),
        workload::percentile_ms(&latencies, 95.0),
        workload::percentile_ms(&latencies, 99.0),
        rss_mb,
        if correct { "yes" } else { "no" }
    ) + if args.metrics { " metrics=on" } else { "" }
        + if args.acks == "topic" { " acks=topic" } else { "" })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let namesrv = std::env::var(saga_messaging::topics::NAMESRV_ENV).map_err(|_| {
        anyhow::anyhow!(
            "{} is not set: start the broker (scripts/dev-env start) or use scripts/bench",
            saga_messaging::topics::NAMESRV_ENV
        )
    })?;
    let scenarios = args
        .scenario
        .iter()
        .map(|s| {
            Scenario::parse(s).ok_or_else(|| anyhow::anyhow!("--scenario: unknown {s:?} (fail20, all_ok)"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut all_correct = true;
    for &scenario in &scenarios {
        for &conc in &args.conc {
            let line = runtime.block_on(run(&namesrv, scenario, conc, &args))?;
            all_correct &= line.contains(" correct=yes");
            println!("{line}");
        }
    }
    anyhow::ensure!(all_correct, "a run was not correct (see the check lines above)");
    Ok(())
}

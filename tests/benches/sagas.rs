//! The saga benchmark of shared/BENCH.md: the orchestrator and the four participants as
//! separate processes (release builds, one sled log each, full fsync), compensations through
//! the real RocketMQ broker of scripts/dev-env.
//!
//! ```text
//! scripts/bench [-- --scenario fail20,all_ok --conc 32,128 --n 2000 --warmup 200]
//! ```
//!
//! (`scripts/bench` builds the release binaries, starts the broker, runs this and stops the
//! broker.) For each scenario and concurrency: a fresh system (new data directories, topics and
//! consumer groups), BENCH.md's data seeded through the participants' Seed calls, a warm-up of
//! `--warmup` sagas, then `--n` sagas with C in flight. A saga's latency runs from the client's
//! StartOrder call to the final event seen on WatchSaga. One line per run, the shape BENCH.md
//! fixes:
//!
//! `peer=ours scenario=fail20 conc=32 n=2000 sagas_per_s=... p50_ms=... p95_ms=... p99_ms=... rss_mb=... correct=yes`
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

/// CPU time (user + system) a process has used so far, in microseconds (/proc/PID/stat).
fn cpu_us(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces): utime is the
    // 12th and stime the 13th of them, in clock ticks.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    // SAFETY: sysconf only reads a configuration value.
    #[allow(unsafe_code)]
    let per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    ticks * 1_000_000 / per_s
}

async fn run(namesrv: &str, scenario: Scenario, conc: usize, n: u64, warmup: u64) -> anyhow::Result<String> {
    let system = System::start(namesrv, SystemConfig::default()).await;
    let addrs = ParticipantAddrs::parse(&system.participant_list())?;
    let api = system.orchestrator.as_ref().expect("started").addr.clone();
    workload::seed(&addrs, 0..warmup + n, scenario).await?;

    let mut results = workload::run_orders(&api, scenario, &system.run, 0..warmup, conc, || {}).await?;
    // Each process's CPU time over the measured sagas: the cost per saga, steadier from run to
    // run than the rate on a machine this small (diagnostics, on stderr).
    let pids: Vec<(&str, u32)> = system
        .participants
        .iter()
        .map(|(role, p)| (role.as_str(), p.child.id()))
        .chain(
            system
                .orchestrator
                .as_ref()
                .map(|p| ("orchestrator", p.child.id())),
        )
        .chain([("bench", std::process::id())])
        .collect();
    let cpu_before: Vec<u64> = pids.iter().map(|&(_, pid)| cpu_us(pid)).collect();
    let began = Instant::now();
    let measured = workload::run_orders(&api, scenario, &system.run, warmup..warmup + n, conc, || {}).await?;
    let elapsed = began.elapsed();
    let cpu: Vec<(&str, u64)> = pids
        .iter()
        .zip(&cpu_before)
        .map(|(&(name, pid), before)| (name, cpu_us(pid).saturating_sub(*before) / n.max(1)))
        .collect();
    eprintln!(
        "cpu us per saga: {cpu:?} total={}",
        cpu.iter().map(|(_, us)| us).sum::<u64>()
    );

    let mut latencies: Vec<Duration> = measured.iter().map(|r| r.latency).collect();
    latencies.sort_unstable();
    results.extend(measured);
    let problems = workload::check_conservation(&addrs, &results).await?;
    for problem in &problems {
        eprintln!("check failed: {problem}");
    }
    let correct = problems.is_empty() && results.len() as u64 == warmup + n;
    let processes: Vec<(&str, f64)> = system
        .participants
        .iter()
        .map(|(role, p)| (role.as_str(), peak_rss_mb(p.child.id())))
        .chain(
            system
                .orchestrator
                .as_ref()
                .map(|p| ("orchestrator", peak_rss_mb(p.child.id()))),
        )
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
    Ok(format!(
        "peer=ours scenario={} conc={conc} n={n} sagas_per_s={:.1} p50_ms={:.1} p95_ms={:.1} p99_ms={:.1} rss_mb={:.0} correct={}",
        scenario.name(),
        n as f64 / elapsed.as_secs_f64(),
        workload::percentile_ms(&latencies, 50.0),
        workload::percentile_ms(&latencies, 95.0),
        workload::percentile_ms(&latencies, 99.0),
        rss_mb,
        if correct { "yes" } else { "no" }
    ))
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
            let line = runtime.block_on(run(&namesrv, scenario, conc, args.n, args.warmup))?;
            all_correct &= line.ends_with("correct=yes");
            println!("{line}");
        }
    }
    anyhow::ensure!(all_correct, "a run was not correct (see the check lines above)");
    Ok(())
}

//! The README's first command, as a process: `saga-orchestrator dev --orders 1000` (embedded
//! transport, no broker) reports every saga final and the conservation checks holding.

use std::process::Command;

#[test]
fn dev_command_runs_1000_orders_and_reports_correct() {
    let output = Command::new(saga_tests::bin_path("saga-orchestrator"))
        .args(["dev", "--orders", "1000", "--listen", "127.0.0.1:0"])
        .output()
        .expect("runs saga-orchestrator dev");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{:?}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    // BENCH.md's order n: users n % 1000, every 5th with no balance, so 200 compensate.
    assert_eq!(
        last, "orders=1000 completed=800 compensated=200 stuck=0 correct=yes",
        "{stdout}"
    );
}

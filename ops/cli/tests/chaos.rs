//! `ferry chaos all` at a small size: every fault scenario against real processes, nothing lost, doubled or reordered.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::process::Command;

/// Every scenario on its own fresh stack: a few thousand events, a SIGKILL
/// every second, 5-second outages, a dozen model answers. The seed is
/// random and printed, so a failure can be run again as it was.
#[test]
fn every_fault_scenario_loses_doubles_and_reorders_nothing() {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["chaos", "all", "--events", "2000", "--rate", "250", "--agents", "4", "--outage", "5s", "--chats", "12"])
        .args(["--kill-every", "1s", "--stall", "3m"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report = format!("status {}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    assert!(out.status.success(), "{report}");
    for scenario in ["worker-kill", "broker-restart", "agent-outage", "db-outage", "node-kill", "inference-kill"] {
        assert!(
            stdout.contains(&format!("{scenario}: passed: nothing lost, doubled or reordered")),
            "{scenario} did not pass: {report}"
        );
    }
    // The faults struck: replicas were restarted, the outage agent came back.
    assert!(stderr.contains("restarts: "), "no worker was restarted: {report}");
    assert!(stderr.contains("agent back after"), "{report}");
}

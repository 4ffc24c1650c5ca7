//! The agent's Windows side under Wine: `ferry-agent.exe probe` names notepad, then winver; idle time grows; DPAPI round-trips.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_stack::cargo::target_dir_of;
use ferry_stack::wine::{build_windows_agent, run_checked};
use ferry_stack::Wine;
use serde_json::Value;

/// The target dir this test was built in: the cross build goes there too,
/// so it is incremental from one run to the next.
fn target_dir() -> PathBuf {
    target_dir_of(Path::new(env!("CARGO_BIN_EXE_ferry-agent")))
        .expect("the agent binary lies in <target>/<profile>/")
        .to_path_buf()
}

/// Runs `ferry-agent.exe` with `args` under Wine; its stdout as JSON lines.
fn agent(wine: &Wine, exe: &Path, args: &[&str]) -> Vec<Value> {
    let mut cmd = wine.command(exe).unwrap();
    cmd.args(args);
    let out = run_checked(&mut cmd, "ferry-agent.exe under Wine", Duration::from_secs(60)).unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

/// Whether a probe sample names a window of `exe_name` (case-insensitive).
fn names(sample: &Value, exe_name: &str) -> bool {
    sample["exe"]
        .as_str()
        .is_some_and(|e| e.to_ascii_lowercase().ends_with(&exe_name.to_ascii_lowercase()))
}

/// Probes until the window in front belongs to `exe_name`; that sample.
fn wait_for_front(wine: &Wine, exe: &Path, exe_name: &str) -> Value {
    let mut last = Vec::new();
    wine.wait_for(&format!("a window of {exe_name} in front"), Duration::from_secs(30), || {
        last = agent(wine, exe, &["probe"]);
        last.first().filter(|s| names(s, exe_name)).cloned()
    })
    .unwrap_or_else(|e| panic!("{e}; the last probe printed {last:?}"))
}

#[test]
fn probe_names_the_window_in_front_under_wine() {
    let start = Instant::now();
    let exe = build_windows_agent(&target_dir()).unwrap();
    let built = start.elapsed();
    let work = tempfile::tempdir().unwrap();
    // Run a copy, so the ProcessPrng stand-in placed beside it never lands
    // in the build output.
    let exe = {
        let copy = work.path().join("ferry-agent.exe");
        std::fs::copy(&exe, &copy).unwrap();
        copy
    };
    let wine = Wine::start(work.path()).unwrap();
    eprintln!(
        "timings: cross build {built:.1?}, wineboot {:.1?}, ProcessPrng stand-in {:.1?}",
        wine.timings().wineboot,
        wine.timings().shim
    );

    // The platform layer's other parts first: DPAPI and the process's usage.
    let dpapi = agent(&wine, &exe, &["probe", "--dpapi-roundtrip"]);
    assert_eq!(dpapi.len(), 1, "{dpapi:?}");
    assert_eq!(dpapi[0]["roundtrip"], true, "{dpapi:?}");
    assert!(dpapi[0]["protected_len"].as_u64().unwrap() > 32, "{dpapi:?}");
    let usage = agent(&wine, &exe, &["probe", "--usage"]);
    assert!(usage[0]["rss_bytes"].as_u64().unwrap() > 1024 * 1024, "{usage:?}");

    let notepad = wine.spawn_program("notepad", &[]).unwrap();
    let first = wait_for_front(&wine, &exe, "notepad.exe");
    assert_eq!(first["title"], "Untitled - Notepad", "{first}");
    assert!(first["pid"].as_u64().unwrap() > 0, "{first}");

    let samples = agent(&wine, &exe, &["probe", "--samples", "3", "--every-ms", "500"]);
    assert_eq!(samples.len(), 3, "{samples:?}");
    for s in &samples {
        assert!(names(s, "notepad.exe"), "{s}");
        assert_eq!(s["title"], "Untitled - Notepad", "{s}");
    }
    // Nobody types under Xvfb: idle time only grows, by about the interval.
    let idle: Vec<u64> = samples.iter().map(|s| s["idle_ms"].as_u64().unwrap()).collect();
    assert!(idle.windows(2).all(|w| w[1] >= w[0] + 400), "{idle:?}");

    // A second program takes the foreground.
    let winver = wine.spawn_program("winver", &[]).unwrap();
    let second = wait_for_front(&wine, &exe, "winver.exe");
    assert_ne!(second["pid"], first["pid"], "{second}");
    assert!(second["title"].as_str().unwrap().contains("Wine"), "{second}");

    drop((winver, notepad));
    eprintln!("whole test: {:.1?}", start.elapsed());
}

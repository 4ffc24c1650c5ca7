//! `ferry down`: stop what `ferry up` started, including what a killed `ferry up` left running.

use std::path::Path;
use std::time::{Duration, Instant};

use clap::Args;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::data_dir::DataDir;

#[derive(Debug, Args)]
pub struct DownArgs {
    /// `ferry up`'s data dir.
    #[arg(long, default_value = crate::data_dir::DEFAULT)]
    data_dir: DataDir,
    /// How long to wait for `ferry up` to finish its in-flight work.
    #[arg(long, default_value_t = 180)]
    wait_secs: u64,
}

/// Whether `pid` is alive and runs a program whose command line contains `name`
/// (a pid file can outlive its process and the pid be reused).
pub(crate) fn running(pid: i32, name: &str) -> bool {
    pid > 0
        && kill(Pid::from_raw(pid), None).is_ok()
        && std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains(name))
            .unwrap_or(false)
}

pub(crate) fn pids(file: &Path) -> Vec<(String, i32)> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .filter_map(|(k, v)| Some((k.trim().to_string(), v.trim().parse().ok()?)))
        .collect()
}

/// Sends SIGTERM and waits; true when the process ended.
fn terminate(pid: i32, name: &str, wait: Duration) -> bool {
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    let start = Instant::now();
    let mut said = Instant::now();
    while running(pid, name) {
        if start.elapsed() > wait {
            return false;
        }
        if said.elapsed() > Duration::from_secs(5) {
            eprintln!("ferry: waiting for {name} (pid {pid}) to finish its in-flight work ...");
            said = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

pub fn run(args: DownArgs) -> anyhow::Result<()> {
    let file = args.data_dir.pid_file();
    let mut stopped = Vec::new();
    for (what, pid) in pids(&file) {
        let name = match what.as_str() {
            "ferry" => "ferry",
            "nats" => "nats-server",
            role if ferry_schema::topology::Role::ALL.iter().any(|r| r.as_str() == role) => "ferry-worker",
            _ => continue,
        };
        if running(pid, name) {
            eprintln!("ferry: stopping {name} (pid {pid}) ...");
            anyhow::ensure!(
                terminate(pid, name, Duration::from_secs(args.wait_secs)),
                "{name} (pid {pid}) did not stop within {}s; kill it with: kill -9 {pid}",
                args.wait_secs
            );
            // A worker by its role; the others by their program.
            stopped.push(if name == "ferry-worker" { what.clone() } else { name.to_string() });
        }
    }
    let _ = std::fs::remove_file(&file);
    if ferry_stack::postgres::stop_existing(&args.data_dir.postgres())? {
        stopped.push("PostgreSQL".to_string());
    }
    if stopped.is_empty() {
        eprintln!("ferry: nothing was running from {}", args.data_dir.display());
    } else {
        eprintln!("ferry: stopped {}", stopped.join(", "));
    }
    Ok(())
}

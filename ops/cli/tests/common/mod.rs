//! Helpers the CLI's integration tests share: running `ferry`, checking its exit, and starting `ferry up` on free ports.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // each test file uses a part; tests fail loudly

use std::path::Path;
use std::process::{Command, Output};

/// The `ferry` binary cargo built for these tests.
pub fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

/// Its stdout, after asserting it succeeded (both outputs in the panic).
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A data dir for `ferry up`. When tests run as root, PostgreSQL runs as
/// the `postgres` user, which must be able to enter it.
pub fn up_data_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Starts `ferry up --no-inference` on `data` and the given ports, with
/// `extra` flags (`--no-demo`, `--demo FILE`); returns once it runs.
pub fn up(data: &Path, port: u16, pg_port: u16, extra: &[&str]) -> std::process::Child {
    use std::io::BufRead;
    let mut child = ferry()
        .args(["up", "--no-inference", "--metrics-port", "0", "--data-dir"])
        .arg(data)
        .args(["--port", &port.to_string(), "--monitor-port", &ferry_stack::free_port().unwrap().to_string()])
        .args(["--pg-port", &pg_port.to_string()])
        .args(extra)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = String::new();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.starts_with("ferry: running") {
            // Keep reading, so its shutdown messages find an open pipe.
            std::thread::spawn(move || lines.for_each(drop));
            return child;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("ferry up did not start:\n{seen}");
}

//! Running cargo from inside a test or build script without disturbing the outer build.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The root of the checkout this process was started from: the nearest
/// directory holding a `Cargo.toml` with a `[workspace]` table, searched
/// upwards from `CARGO_MANIFEST_DIR` as cargo sets it when it runs a test or
/// a binary (else from the current directory); `None` outside a checkout.
///
/// Not `env!("CARGO_MANIFEST_DIR")`: that is where the code was compiled,
/// and a target dir shared by two checkouts (CI keeps it in
/// `~/.cache`) holds test binaries that cargo considers fresh whichever
/// checkout built them, so a compiled-in path can name the other checkout,
/// or one that no longer exists.
pub fn workspace_root() -> Option<PathBuf> {
    let start = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::current_dir().ok())?;
    start.ancestors().find(|dir| is_workspace_root(dir)).map(Path::to_path_buf)
}

fn is_workspace_root(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("Cargo.toml"))
        .is_ok_and(|toml| toml.lines().any(|l| l.trim() == "[workspace]"))
}

/// A `cargo` command (`$CARGO`, else `cargo` on `PATH`) with the
/// environment cargo set for the calling test removed:
///
/// - every `CARGO_*` variable except `CARGO_HOME`, every `__CARGO*` one,
///   and `OUT_DIR`: cargo compares a build script's `rerun-if-env-changed`
///   variables (ring and aws-lc watch `CARGO_MANIFEST_DIR`,
///   `CARGO_PKG_NAME`, `OUT_DIR`) in its own environment, so inheriting
///   them reran those scripts and rebuilt everything above them
///   (mistral.rs), here and again in the next outer run;
/// - `LD_LIBRARY_PATH` entries inside the target directory this process
///   runs from ([`current_target_dir`]; cargo adds its `deps` directories
///   for the test it runs): they are no business of the inner build and
///   change its fingerprints the same way.
pub fn cargo_command() -> Command {
    cargo_command_outside(current_target_dir().as_deref())
}

fn cargo_command_outside(target_dir: Option<&Path>) -> Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(program);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if (k.starts_with("CARGO_") && k != "CARGO_HOME") || k.starts_with("__CARGO") || k == "OUT_DIR" {
            cmd.env_remove(&k);
        }
    }
    if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
        let kept: Vec<PathBuf> = std::env::split_paths(&paths).filter(|p| !target_dir.is_some_and(|t| p.starts_with(t)))
            .collect();
        match std::env::join_paths(&kept) {
            Ok(joined) if !kept.is_empty() => {
                cmd.env("LD_LIBRARY_PATH", joined);
            }
            _ => {
                cmd.env_remove("LD_LIBRARY_PATH");
            }
        }
    }
    cmd
}

/// The cargo target directory this process's executable lies in: the
/// nearest ancestor holding the `CACHEDIR.TAG` cargo writes there. `None`
/// when this program was not run from a target directory.
pub fn current_target_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    exe.ancestors()
        .skip(1)
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .map(Path::to_path_buf)
}

/// The target directory a test binary was built into, from the path of one
/// of the package's binaries (`env!("CARGO_BIN_EXE_<name>")`):
/// `<target_dir>/<profile>/<name>`, so its grandparent. `None` for a path
/// too short to have one.
pub fn target_dir_of(bin_exe: &Path) -> Option<&Path> {
    bin_exe.parent()?.parent()
}

/// The workspace binary `name` (`ferry-worker`, `ferry-agent`) in the same
/// target dir and profile as `beside` (a binary of that build, e.g. the
/// running `ferry`), brought up to date first.
///
/// The build is the workspace's test build (`cargo test --workspace
/// --no-run`), the one `.ci/run` makes, so there it is a no-op. A narrower
/// `cargo build -p ferry-workers` resolves features differently and rebuilt
/// mistral.rs from scratch (about 13 minutes on 2 cores).
pub fn workspace_binary(beside: &Path, name: &str) -> Result<PathBuf, crate::StackError> {
    let failed = |status: String, output_tail: String| crate::StackError::Failed {
        what: format!("building {name}"),
        command: "cargo test --workspace --no-run".into(),
        status,
        output_tail,
    };
    let profile_dir = beside
        .parent()
        .ok_or_else(|| failed("not run".into(), format!("{} is not in a target dir", beside.display())))?;
    let target_dir = target_dir_of(beside)
        .ok_or_else(|| failed("not run".into(), format!("{} is not in a target dir", beside.display())))?;
    let root = workspace_root()
        .ok_or_else(|| failed("not run".into(), "not inside a Ferry checkout: build the binaries with cargo and pass their paths".into()))?;
    let mut build = cargo_command();
    build.args(["test", "--workspace", "--no-run", "--quiet", "--target-dir"]).arg(target_dir).current_dir(&root);
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some("release") => {
            build.arg("--release");
        }
        Some(other) => {
            build.args(["--profile", other]);
        }
        None => return Err(failed("not run".into(), format!("odd binary path {}", beside.display()))),
    }
    let status = build.status().map_err(|source| crate::StackError::Io { what: "running cargo".into(), source })?;
    let binary = profile_dir.join(name);
    if !status.success() || !binary.is_file() {
        return Err(failed(status.to_string(), format!("{} was not built", binary.display())));
    }
    Ok(binary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workspace_root_is_found_from_where_the_test_runs() {
        // cargo runs this test with CARGO_MANIFEST_DIR = ops/harness of the
        // checkout being tested, wherever the binary was compiled.
        let root = workspace_root().unwrap();
        assert!(root.join("ops/harness/Cargo.toml").is_file(), "{}", root.display());
        assert!(root.join("nats.conf").is_file(), "{}", root.display());
        assert!(!is_workspace_root(&root.join("ops/harness")));
    }

    #[test]
    fn cargo_variables_are_not_inherited() {
        // Cargo sets these for this very test process.
        assert!(std::env::var_os("CARGO_PKG_NAME").is_some());
        let cmd = cargo_command();
        let removed: Vec<String> = cmd
            .get_envs()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        assert!(removed.contains(&"CARGO_PKG_NAME".to_string()), "{removed:?}");
        assert!(removed.contains(&"CARGO_MANIFEST_DIR".to_string()), "{removed:?}");
        assert!(!removed.contains(&"CARGO_HOME".to_string()), "{removed:?}");
    }

    #[test]
    fn tests_run_from_a_target_dir() {
        let dir = current_target_dir().unwrap();
        assert!(std::env::current_exe().unwrap().starts_with(&dir));
    }

    #[test]
    fn target_dir_is_two_levels_up() {
        assert_eq!(
            target_dir_of(Path::new("/t/target/debug/ferry")),
            Some(Path::new("/t/target"))
        );
    }
}

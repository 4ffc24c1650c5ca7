//! Finding required programs, and installing their Debian packages when allowed.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::nats::StackError;

/// Directories searched besides `PATH` (Debian puts servers in `/usr/sbin`,
/// which is not on a normal user's `PATH`).
const EXTRA_DIRS: &[&str] = &["/usr/sbin", "/usr/local/sbin", "/usr/local/bin", "/usr/bin"];

/// Finds `program` on `PATH` or in the usual system directories.
pub fn find(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(EXTRA_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Finds `program`; when it is missing and this process runs as root with
/// `apt-get`, installs Debian's `package` (once, under a lock shared by all
/// processes, so parallel tests do not race apt). Otherwise fails with the
/// exact command to run.
pub fn ensure(program: &str, package: &str) -> Result<PathBuf, StackError> {
    ensure_package(package, program, || find(program))
}

/// Like [`ensure`], for a package whose programs are found by `locate`
/// rather than on `PATH` (PostgreSQL's live in `/usr/lib/postgresql/<v>/bin`).
/// `program` only names what is missing in the error.
pub fn ensure_package<T>(
    package: &str,
    program: &str,
    locate: impl Fn() -> Option<T>,
) -> Result<T, StackError> {
    if let Some(p) = locate() {
        return Ok(p);
    }
    let missing = || StackError::Missing {
        program: program.to_string(),
        command: format!("sudo apt-get install -y {package}"),
    };
    if !nix::unistd::Uid::effective().is_root() || find("apt-get").is_none() {
        return Err(missing());
    }
    let lock_path = std::env::temp_dir().join("ferry-apt.lock");
    let lock = std::fs::File::create(&lock_path).map_err(|source| StackError::Io {
        what: format!("create {}", lock_path.display()),
        source,
    })?;
    lock.lock().map_err(|source| StackError::Io {
        what: format!("lock {}", lock_path.display()),
        source,
    })?;
    // Another process may have installed it while we waited for the lock.
    if let Some(p) = locate() {
        return Ok(p);
    }
    tracing::info!(program, package, "installing missing program with apt-get");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
    };
    let ok = matches!(install(), Ok(s) if s.success()) || {
        // A fresh machine has no package lists yet.
        let _ = Command::new("apt-get").args(["update", "-q"]).status();
        matches!(install(), Ok(s) if s.success())
    };
    if !ok {
        return Err(missing());
    }
    locate().ok_or_else(missing)
}

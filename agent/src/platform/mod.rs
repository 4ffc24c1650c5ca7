//! What the agent needs from the operating system, one implementation per platform.
//!
//! Everything here that is not plain Rust lives behind these few functions:
//! the desktop collectors' two questions (which window is in front, how long
//! since the last input), the process's own CPU time and memory, protecting
//! the spool key at rest, and the per-user autostart entry. Windows uses the
//! Win32 API through `windows-sys` ([`windows`]); other systems have no
//! desktop collector (the agent runs on its portable sources there) and a
//! key file readable only by its owner ([`unix`]).

use std::path::PathBuf;
use std::time::Duration;

#[cfg(unix)]
mod unix;
#[cfg(unix)]
use unix as imp;
#[cfg(windows)]
mod windows;
#[cfg(windows)]
use windows as imp;

/// The window in front, as the desktop collector sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForegroundWindow {
    /// The window's title (may be empty).
    pub title: String,
    /// Id of the process that owns the window.
    pub pid: u32,
    /// Full path of that process's executable, when the system tells it
    /// (it may refuse for elevated processes).
    pub exe: Option<PathBuf>,
}

/// What the operating system could not do.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// A system call failed.
    #[error("{call} failed: {message}")]
    Call {
        /// The call, e.g. `GetLastInputInfo`.
        call: &'static str,
        /// The system's error text or code.
        message: String,
    },
    /// This platform has no such facility.
    #[error("{0} is not available on this platform")]
    Unsupported(&'static str),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// The desktop collectors' view of the interactive session.
pub trait Desktop: Send {
    /// The window in front; `Ok(None)` when there is none (lock screen,
    /// secure desktop of a UAC prompt): skipped, not an error.
    fn foreground(&mut self) -> Result<Option<ForegroundWindow>, PlatformError>;
    /// Time since the last keyboard or mouse input of this session.
    fn idle(&mut self) -> Result<Duration, PlatformError>;
}

/// The desktop of the session the agent runs in.
pub fn desktop() -> Result<Box<dyn Desktop>, PlatformError> {
    imp::desktop()
}

/// The agent process's own resource use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// CPU time used so far, user and kernel.
    pub cpu: Duration,
    /// Resident memory (Windows: working set).
    pub rss_bytes: u64,
}

/// This process's CPU time and resident memory.
pub fn process_usage() -> Result<Usage, PlatformError> {
    imp::process_usage()
}

/// Protects the spool's raw key for storage on disk: DPAPI for the current
/// user on Windows; unchanged elsewhere (the key file is then made readable
/// by its owner only, see [`write_private_file`]).
pub fn protect_key(raw: &[u8]) -> Result<Vec<u8>, PlatformError> {
    imp::protect_key(raw)
}

/// The inverse of [`protect_key`].
pub fn unprotect_key(stored: &[u8]) -> Result<Vec<u8>, PlatformError> {
    imp::unprotect_key(stored)
}

/// Writes `data` to `path` so that only the current user can read it
/// (mode 0600 on Unix; on Windows the file inherits the user profile's ACL,
/// and what is written there is already DPAPI-protected).
pub fn write_private_file(path: &std::path::Path, data: &[u8]) -> Result<(), PlatformError> {
    use std::io::Write as _;
    let io = |source| PlatformError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut f = options.open(path).map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Where autostart was registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutostartEntry {
    /// Human-readable location: a registry value or a file path.
    pub location: String,
}

/// Registers `command` (program and arguments) to start at this user's logon:
/// `HKCU\Software\Microsoft\Windows\CurrentVersion\Run` on Windows (a
/// service would run in session 0 and could not see the user's desktop),
/// an XDG autostart `.desktop` file elsewhere. Replaces an earlier entry.
pub fn install_autostart(command: &[String]) -> Result<AutostartEntry, PlatformError> {
    imp::install_autostart(command)
}

/// Removes the autostart entry; `Ok(None)` when there was none.
pub fn uninstall_autostart() -> Result<Option<AutostartEntry>, PlatformError> {
    imp::uninstall_autostart()
}

/// Name of the autostart entry (registry value name, `.desktop` file stem).
pub const AUTOSTART_NAME: &str = "FerryAgent";

/// Quotes one argument for a Windows command line (the `Run` key's value)
/// so that `CommandLineToArgvW` and the C runtime split it back unchanged:
/// arguments with spaces, tabs or quotes are wrapped in quotes, a quote
/// inside is escaped with a backslash, and backslashes are doubled where
/// they precede a quote (inside or the closing one). Plain in this module so
/// its tests run on every platform.
#[cfg(any(windows, test))]
fn quote_windows_arg(arg: &str) -> String {
    if !arg.is_empty() && !arg.contains([' ', '\t', '\n', '\u{b}', '"']) {
        return arg.to_string();
    }
    let mut s = String::from("\"");
    let mut backslashes = 0usize;
    for c in arg.chars() {
        match c {
            '\\' => backslashes += 1,
            '"' => {
                s.extend(std::iter::repeat_n('\\', backslashes * 2 + 1));
                s.push('"');
                backslashes = 0;
            }
            _ => {
                s.extend(std::iter::repeat_n('\\', backslashes));
                s.push(c);
                backslashes = 0;
            }
        }
    }
    s.extend(std::iter::repeat_n('\\', backslashes * 2));
    s.push('"');
    s
}

/// Idle time from a 64-bit tick count `now_ms` and the 32-bit tick count of
/// the last input (`GetLastInputInfo`'s `dwTime`), which wraps every 49.7
/// days: the difference is taken modulo 2^32, so an input just before a
/// wrap and a clock just after it give a small idle time, not a huge one.
pub fn idle_from_ticks(now_ms: u64, last_input_ms: u32) -> Duration {
    // Truncating `now` to 32 bits is the point: both sides wrap alike.
    let now32 = (now_ms & u64::from(u32::MAX)) as u32;
    Duration::from_millis(u64::from(now32.wrapping_sub(last_input_ms)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_ticks_handle_the_32_bit_wrap() {
        assert_eq!(idle_from_ticks(10_000, 4_000), Duration::from_millis(6_000));
        // Input 1 s before the wrap, now 2 s after it (GetTickCount64 past 2^32).
        let wrap = 1u64 << 32;
        assert_eq!(
            idle_from_ticks(wrap + 2_000, (wrap - 1_000) as u32),
            Duration::from_millis(3_000)
        );
        // After several wraps only the low 32 bits count.
        assert_eq!(idle_from_ticks(5 * wrap + 500, 100), Duration::from_millis(400));
        assert_eq!(idle_from_ticks(7, 7), Duration::ZERO);
    }

    #[test]
    fn windows_arguments_are_quoted() {
        assert_eq!(quote_windows_arg("--config"), "--config");
        assert_eq!(quote_windows_arg(r"C:\Ferry\agent.exe"), r"C:\Ferry\agent.exe");
        assert_eq!(
            quote_windows_arg(r"C:\Program Files\Ferry\agent.exe"),
            r#""C:\Program Files\Ferry\agent.exe""#
        );
        assert_eq!(quote_windows_arg(""), r#""""#);
        assert_eq!(quote_windows_arg(r#"say "hi""#), r#""say \"hi\"""#);
        // Backslashes before a quote, and before the closing quote, are doubled.
        assert_eq!(quote_windows_arg(r#"a\"b"#), r#""a\\\"b""#);
        assert_eq!(quote_windows_arg(r"C:\dir with space\"), r#""C:\dir with space\\""#);
    }
}

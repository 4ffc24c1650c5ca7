//! The agent's platform layer on Linux and other Unix systems: no desktop
//! collector, `/proc` and `getrusage` for usage, a 0600 key file, XDG autostart.

use std::path::PathBuf;
use std::time::Duration;

use super::{AutostartEntry, Desktop, PlatformError, Usage, AUTOSTART_NAME};

pub(super) fn desktop() -> Result<Box<dyn Desktop>, PlatformError> {
    Err(PlatformError::Unsupported(
        "the desktop collector (foreground window, idle time; Windows only: use a JSON-lines source here)",
    ))
}

pub(super) fn process_usage() -> Result<Usage, PlatformError> {
    use nix::sys::resource::{getrusage, UsageWho};
    let ru = getrusage(UsageWho::RUSAGE_SELF).map_err(|e| PlatformError::Call {
        call: "getrusage",
        message: e.to_string(),
    })?;
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(u64::try_from(t.tv_sec()).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec()).unwrap_or(0))
    };
    let cpu = tv(ru.user_time()) + tv(ru.system_time());
    Ok(Usage {
        cpu,
        rss_bytes: current_rss().unwrap_or(0),
    })
}

/// Current (not peak) resident set size from `/proc/self/status`.
fn current_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub(super) fn protect_key(raw: &[u8]) -> Result<Vec<u8>, PlatformError> {
    Ok(raw.to_vec())
}

pub(super) fn unprotect_key(stored: &[u8]) -> Result<Vec<u8>, PlatformError> {
    Ok(stored.to_vec())
}

fn autostart_file() -> Result<PathBuf, PlatformError> {
    let base = match std::env::var_os("XDG_CONFIG_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => match std::env::var_os("HOME") {
            Some(h) => PathBuf::from(h).join(".config"),
            None => return Err(PlatformError::Unsupported("autostart without $HOME or $XDG_CONFIG_HOME")),
        },
    };
    Ok(base.join("autostart").join(format!("{AUTOSTART_NAME}.desktop")))
}

/// Quotes one argument for a `.desktop` file's `Exec=` key.
fn desktop_quote(arg: &str) -> String {
    if !arg.is_empty() && arg.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,@".contains(c)) {
        return arg.to_string();
    }
    let mut s = String::from("\"");
    for c in arg.chars() {
        if matches!(c, '"' | '`' | '$' | '\\') {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('"');
    s
}

pub(super) fn install_autostart(command: &[String]) -> Result<AutostartEntry, PlatformError> {
    let path = autostart_file()?;
    let io = |source| PlatformError::Io {
        path: path.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let exec: Vec<String> = command.iter().map(|a| desktop_quote(a)).collect();
    let body = format!(
        "[Desktop Entry]\nType=Application\nName=Ferry agent\nComment=Publishes this desktop's activity and chat events to Ferry\nExec={}\nX-GNOME-Autostart-enabled=true\nNoDisplay=true\n",
        exec.join(" ")
    );
    std::fs::write(&path, body).map_err(io)?;
    Ok(AutostartEntry {
        location: path.display().to_string(),
    })
}

pub(super) fn uninstall_autostart() -> Result<Option<AutostartEntry>, PlatformError> {
    let path = autostart_file()?;
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(Some(AutostartEntry {
            location: path.display().to_string(),
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PlatformError::Io { path, source }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_read() {
        let u = process_usage().unwrap();
        assert!(u.rss_bytes > 1024 * 1024, "{u:?}");
    }

    #[test]
    fn exec_arguments_are_quoted() {
        assert_eq!(desktop_quote("--config"), "--config");
        assert_eq!(desktop_quote("/a b/c"), "\"/a b/c\"");
        assert_eq!(desktop_quote("x$y"), "\"x\\$y\"");
    }
}

//! `ferry-agent probe`: prints what the platform layer sees, to check it on a real (or Wine) desktop.
//!
//! Needs no agent id and no broker. Each sample is one JSON line:
//! `{"title":"Untitled - Notepad","pid":42,"exe":"C:\\windows\\notepad.exe","idle_ms":1200}`,
//! or `{"foreground":null,"idle_ms":1200}` when no window is in front.
//! The hidden `--dpapi-roundtrip` and `--usage` switches check the other
//! parts of [`crate::platform`] instead (tests under Wine use them).

use std::io::Write;
use std::time::Duration;

use serde_json::json;

use crate::platform::{self, Desktop, PlatformError};

/// Options of `ferry-agent probe`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProbeArgs {
    /// How many samples to print.
    #[arg(long, default_value_t = 1)]
    pub samples: u32,
    /// Milliseconds between samples.
    #[arg(long, default_value_t = 1000)]
    pub every_ms: u64,
    /// Instead of sampling: protect 32 random bytes as the spool key would
    /// be, unprotect them, print {"protected_len":..,"roundtrip":true}.
    #[arg(long, hide = true, conflicts_with = "usage")]
    pub dpapi_roundtrip: bool,
    /// Instead of sampling: print this process's {"cpu_ms":..,"rss_bytes":..}.
    #[arg(long, hide = true)]
    pub usage: bool,
}

/// Why the probe stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The platform layer failed.
    #[error(transparent)]
    Platform(#[from] PlatformError),
    /// Writing the output failed.
    #[error("writing the probe's output: {0}")]
    Output(#[from] std::io::Error),
    /// DPAPI gave back other bytes than it was given.
    #[error("the key did not survive protect + unprotect ({protected_len} protected bytes)")]
    RoundTrip {
        /// Length of the protected blob.
        protected_len: usize,
    },
}

/// Runs the probe as `args` say, writing JSON lines to `out`.
pub fn run(args: &ProbeArgs, out: &mut impl Write) -> Result<(), ProbeError> {
    if args.dpapi_roundtrip {
        return dpapi_roundtrip(out);
    }
    if args.usage {
        let u = platform::process_usage()?;
        let line = json!({ "cpu_ms": u.cpu.as_millis() as u64, "rss_bytes": u.rss_bytes });
        writeln!(out, "{line}")?;
        return Ok(out.flush()?);
    }
    let mut desktop = platform::desktop()?;
    for i in 0..args.samples {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(args.every_ms));
        }
        writeln!(out, "{}", sample(desktop.as_mut())?)?;
        out.flush()?;
    }
    Ok(())
}

/// One sample of the desktop as a JSON object.
pub fn sample(desktop: &mut dyn Desktop) -> Result<serde_json::Value, PlatformError> {
    let fg = desktop.foreground()?;
    let idle_ms = desktop.idle()?.as_millis() as u64;
    Ok(match fg {
        Some(w) => json!({
            "title": w.title,
            "pid": w.pid,
            "exe": w.exe.map(|p| p.display().to_string()),
            "idle_ms": idle_ms,
        }),
        None => json!({ "foreground": null, "idle_ms": idle_ms }),
    })
}

fn dpapi_roundtrip(out: &mut impl Write) -> Result<(), ProbeError> {
    let key = random_key();
    let protected = platform::protect_key(&key)?;
    let back = platform::unprotect_key(&protected)?;
    if back != key {
        return Err(ProbeError::RoundTrip {
            protected_len: protected.len(),
        });
    }
    writeln!(out, "{}", json!({ "protected_len": protected.len(), "roundtrip": true }))?;
    Ok(out.flush()?)
}

/// 32 bytes from std's randomly seeded hasher (the OS generator underneath);
/// enough for a round-trip check, not a real key.
fn random_key() -> [u8; 32] {
    use std::hash::{BuildHasher as _, Hasher as _};
    let state = std::collections::hash_map::RandomState::new();
    let mut key = [0u8; 32];
    for (i, chunk) in key.chunks_mut(8).enumerate() {
        let mut h = state.build_hasher();
        h.write_usize(i);
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::ForegroundWindow;

    struct Fake(Option<ForegroundWindow>);

    impl Desktop for Fake {
        fn foreground(&mut self) -> Result<Option<ForegroundWindow>, PlatformError> {
            Ok(self.0.clone())
        }
        fn idle(&mut self) -> Result<Duration, PlatformError> {
            Ok(Duration::from_millis(1500))
        }
    }

    #[test]
    fn samples_are_json_objects() {
        let w = ForegroundWindow {
            title: "Untitled - Notepad".into(),
            pid: 42,
            exe: Some(r"C:\windows\notepad.exe".into()),
        };
        assert_eq!(
            sample(&mut Fake(Some(w))).unwrap(),
            json!({"title":"Untitled - Notepad","pid":42,"exe":r"C:\windows\notepad.exe","idle_ms":1500})
        );
        assert_eq!(
            sample(&mut Fake(None)).unwrap(),
            json!({"foreground":null,"idle_ms":1500})
        );
    }

    #[test]
    fn dpapi_roundtrip_prints_one_line() {
        let mut out = Vec::new();
        dpapi_roundtrip(&mut out).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["roundtrip"], true);
    }
}

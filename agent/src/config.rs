//! The agent's config file (TOML); command-line flags override it.
//!
//! ```toml
//! id = "desk-7"
//! server = "nats://broker.example:4222"
//! nkey = 'C:\Users\desk\AppData\Local\Ferry\desk-7.nk'   # or user/password, or creds
//! tls_ca = 'C:\ProgramData\Ferry\ca.pem'   # TLS required; without it, tls:// trusts the system store
//! encoding = "msgpack"                  # or "json"
//!
//! [spool]
//! dir = 'C:\Users\desk\AppData\Local\Ferry\desk-7\spool'  # default: the user's local data dir
//! max_events = 1000000
//! max_mb = 256
//! when_full = "block"                   # or "drop-oldest"
//!
//! [collect]
//! desktop = true                        # default: true on Windows
//! poll = "1s"
//! pulsetime = "3s"
//! idle_timeout = "180s"
//!
//! [privacy]
//! exclude_apps = ['keepass\.exe']
//! exclude_titles = ['(?i)private browsing']
//! redact_titles = ['\d{11}']            # e.g. phone numbers
//!
//! [adapter]
//! enabled = true
//! listen = "127.0.0.1:7301"
//!
//! [timers]
//! heartbeat = "30s"
//! prediction = "60s"
//! recent = 20                           # activities per prediction request
//!
//! [metrics]
//! listen = "127.0.0.1:9470"             # Prometheus /metrics; off when absent
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::collect::privacy::{Privacy, PrivacyConfig};
use crate::collect::CollectSettings;
use crate::spool::{FullPolicy, SpoolConfig};

/// A config problem, naming the file and the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this config.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with its place.
        message: String,
    },
    /// A setting has a bad value.
    #[error("{setting} = {value:?}: {expected}")]
    Value {
        /// The setting, e.g. `collect.poll`.
        setting: &'static str,
        /// The value found.
        value: String,
        /// What was expected.
        expected: String,
    },
}

/// The file's contents; every field optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// The agent's id.
    pub id: Option<String>,
    /// NATS server URL(s), comma separated.
    pub server: Option<String>,
    /// NATS user.
    pub user: Option<String>,
    /// Its password.
    pub password: Option<String>,
    /// NATS credentials file.
    pub creds: Option<PathBuf>,
    /// nkey seed file.
    pub nkey: Option<PathBuf>,
    /// CA (PEM) of the broker's certificate; TLS is then required.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), for a broker that verifies clients.
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    pub tls_key: Option<PathBuf>,
    /// `msgpack` or `json`.
    pub encoding: Option<String>,
    /// `[spool]`.
    pub spool: SpoolSection,
    /// `[collect]`.
    pub collect: CollectSection,
    /// `[privacy]`.
    pub privacy: PrivacyConfig,
    /// `[adapter]`.
    pub adapter: AdapterSection,
    /// `[timers]`.
    pub timers: TimersSection,
    /// `[metrics]`.
    pub metrics: MetricsSection,
}

/// `[metrics]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// Serve Prometheus metrics on this address (off when absent).
    pub listen: Option<String>,
}

/// `[spool]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolSection {
    /// Directory.
    pub dir: Option<PathBuf>,
    /// Most events.
    pub max_events: Option<u64>,
    /// Most MiB.
    pub max_mb: Option<u64>,
    /// Policy when full.
    pub when_full: Option<FullPolicy>,
}

/// `[collect]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CollectSection {
    /// Run the desktop collector.
    pub desktop: Option<bool>,
    /// Sampling interval.
    pub poll: Option<String>,
    /// Merge window.
    pub pulsetime: Option<String>,
    /// AFK after this long without input.
    pub idle_timeout: Option<String>,
}

/// `[adapter]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdapterSection {
    /// Listen for chat adapters.
    pub enabled: Option<bool>,
    /// Loopback address.
    pub listen: Option<String>,
}

/// `[timers]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimersSection {
    /// Heartbeat interval (`0s`: none).
    pub heartbeat: Option<String>,
    /// Prediction request interval (`0s`: none).
    pub prediction: Option<String>,
    /// Activities per prediction request.
    pub recent: Option<usize>,
}

impl FileConfig {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })
    }
}

/// Parses a duration setting (`500ms`, `1s`, `3m`).
pub fn duration(setting: &'static str, value: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value).map_err(|e| ConfigError::Value {
        setting,
        value: value.to_string(),
        expected: format!("a duration like 500ms, 30s or 3m ({e})"),
    })
}

fn positive(setting: &'static str, value: &str) -> Result<Duration, ConfigError> {
    let d = duration(setting, value)?;
    if d.is_zero() {
        return Err(ConfigError::Value {
            setting,
            value: value.to_string(),
            expected: "a duration above zero".into(),
        });
    }
    Ok(d)
}

/// Parses an optional interval: `0s` turns the timer off.
fn interval(setting: &'static str, value: Option<&str>, default: Duration) -> Result<Option<Duration>, ConfigError> {
    match value {
        None => Ok(Some(default)),
        Some(v) => duration(setting, v).map(|d| (!d.is_zero()).then_some(d)),
    }
}

/// The desktop collector's settings and privacy rules from `[collect]` and `[privacy]`.
pub fn collect_settings(file: &FileConfig) -> Result<(CollectSettings, Privacy), ConfigError> {
    let mut s = CollectSettings::default();
    if let Some(v) = &file.collect.poll {
        s.poll = positive("collect.poll", v)?;
    }
    if let Some(v) = &file.collect.pulsetime {
        s.pulsetime = duration("collect.pulsetime", v)?;
    }
    if let Some(v) = &file.collect.idle_timeout {
        s.idle_timeout = positive("collect.idle_timeout", v)?;
    }
    if s.pulsetime < s.poll {
        return Err(ConfigError::Value {
            setting: "collect.pulsetime",
            value: humantime::format_duration(s.pulsetime).to_string(),
            expected: format!(
                "at least collect.poll ({}), or no two samples would ever merge",
                humantime::format_duration(s.poll)
            ),
        });
    }
    let privacy = Privacy::new(&file.privacy).map_err(|e| ConfigError::Value {
        setting: match e.field {
            "exclude_apps" => "privacy.exclude_apps",
            "exclude_titles" => "privacy.exclude_titles",
            _ => "privacy.redact_titles",
        },
        value: e.pattern.clone(),
        expected: format!("a regex (entry {}: {})", e.index, e.message),
    })?;
    Ok((s, privacy))
}

/// The spool's settings; `dir` defaults to [`default_spool_dir`].
pub fn spool_config(file: &FileConfig, agent: &str) -> Result<SpoolConfig, ConfigError> {
    let dir = match &file.spool.dir {
        Some(d) => d.clone(),
        None => default_spool_dir(agent).ok_or(ConfigError::Value {
            setting: "spool.dir",
            value: String::new(),
            expected: "a directory (no LOCALAPPDATA, XDG_DATA_HOME or HOME to put it under)".into(),
        })?,
    };
    let mut cfg = SpoolConfig::new(dir);
    if let Some(n) = file.spool.max_events {
        if n == 0 {
            return Err(ConfigError::Value {
                setting: "spool.max_events",
                value: n.to_string(),
                expected: "at least 1".into(),
            });
        }
        cfg.max_events = n;
    }
    if let Some(mb) = file.spool.max_mb {
        if mb == 0 {
            return Err(ConfigError::Value {
                setting: "spool.max_mb",
                value: mb.to_string(),
                expected: "at least 1".into(),
            });
        }
        cfg.max_bytes = mb * 1024 * 1024;
    }
    if let Some(p) = file.spool.when_full {
        cfg.when_full = p;
    }
    Ok(cfg)
}

/// The adapter's listen address, if the adapter is enabled.
pub fn adapter_listen(file: &FileConfig) -> Result<Option<SocketAddr>, ConfigError> {
    if file.adapter.enabled == Some(false) {
        return Ok(None);
    }
    if file.adapter.enabled.is_none() && file.adapter.listen.is_none() {
        return Ok(None);
    }
    let value = file.adapter.listen.as_deref().unwrap_or(crate::adapter::DEFAULT_LISTEN);
    let addr: SocketAddr = value.parse().map_err(|_| ConfigError::Value {
        setting: "adapter.listen",
        value: value.to_string(),
        expected: "an address and port like 127.0.0.1:7301".into(),
    })?;
    if !addr.ip().is_loopback() {
        return Err(ConfigError::Value {
            setting: "adapter.listen",
            value: value.to_string(),
            expected: "a loopback address (127.0.0.1 or [::1]): the protocol has no authentication".into(),
        });
    }
    Ok(Some(addr))
}

/// Heartbeat and prediction intervals, activities per request, metrics endpoint.
pub fn timers(file: &FileConfig) -> Result<crate::run::Options, ConfigError> {
    let d = crate::run::Options::default();
    let metrics_listen = match &file.metrics.listen {
        None => None,
        Some(v) => Some(v.parse::<SocketAddr>().map_err(|_| ConfigError::Value {
            setting: "metrics.listen",
            value: v.clone(),
            expected: "an address and port like 127.0.0.1:9470".into(),
        })?),
    };
    Ok(crate::run::Options {
        heartbeat: interval("timers.heartbeat", file.timers.heartbeat.as_deref(), Duration::from_secs(30))?,
        prediction: interval("timers.prediction", file.timers.prediction.as_deref(), Duration::from_secs(60))?,
        recent: file.timers.recent.unwrap_or(d.recent),
        metrics_listen,
    })
}

/// Where the spool lives by default: `%LOCALAPPDATA%\Ferry\<id>\spool` on
/// Windows, `$XDG_DATA_HOME/ferry/<id>/spool` (or `~/.local/share/...`) elsewhere.
pub fn default_spool_dir(agent: &str) -> Option<PathBuf> {
    let base = if cfg!(windows) {
        std::env::var_os("LOCALAPPDATA").map(|d| PathBuf::from(d).join("Ferry"))
    } else {
        match std::env::var_os("XDG_DATA_HOME") {
            Some(d) if !d.is_empty() => Some(PathBuf::from(d).join("ferry")),
            _ => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share/ferry")),
        }
    }?;
    Some(base.join(agent).join("spool"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(text: &str) -> FileConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn the_documented_example_parses() {
        let doc: String = include_str!("config.rs")
            .lines()
            .skip_while(|l| !l.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| format!("{}\n", l.trim_start_matches("//!").trim_start_matches(' ')))
            .collect();
        let f = parse(&doc);
        assert_eq!(f.id.as_deref(), Some("desk-7"));
        let (c, _) = collect_settings(&f).unwrap();
        assert_eq!(c.idle_timeout, Duration::from_secs(180));
        let s = spool_config(&f, "desk-7").unwrap();
        assert_eq!(s.max_bytes, 256 * 1024 * 1024);
        assert_eq!(adapter_listen(&f).unwrap(), Some("127.0.0.1:7301".parse().unwrap()));
        assert_eq!(timers(&f).unwrap().heartbeat, Some(Duration::from_secs(30)));
    }

    #[test]
    fn bad_values_name_the_setting() {
        let e = collect_settings(&parse("[collect]\npoll = \"1x\"")).unwrap_err().to_string();
        assert!(e.starts_with("collect.poll = \"1x\": expected a duration") || e.starts_with("collect.poll = \"1x\": a duration"), "{e}");
        let e = collect_settings(&parse("[collect]\npoll = \"2s\"\npulsetime = \"1s\"")).unwrap_err().to_string();
        assert!(e.contains("collect.pulsetime") && e.contains("at least collect.poll"), "{e}");
        let e = collect_settings(&parse("[privacy]\nexclude_apps = [\"(\"]")).unwrap_err().to_string();
        assert!(e.starts_with("privacy.exclude_apps = \"(\": a regex (entry 0"), "{e}");
        let e = adapter_listen(&parse("[adapter]\nlisten = \"0.0.0.0:7301\"")).unwrap_err().to_string();
        assert!(e.contains("a loopback address"), "{e}");
        let e = toml::from_str::<FileConfig>("[spool]\nwhen_full = \"panic\"").unwrap_err().to_string();
        assert!(e.contains("unknown variant `panic`") && e.contains("block") && e.contains("drop-oldest"), "{e}");
        let e = toml::from_str::<FileConfig>("idd = \"x\"").unwrap_err().to_string();
        assert!(e.contains("unknown field `idd`"), "{e}");
        assert_eq!(timers(&parse("[timers]\nheartbeat = \"0s\"")).unwrap().heartbeat, None);
    }
}

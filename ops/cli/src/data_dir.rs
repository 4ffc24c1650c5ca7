//! `DataDir`: the directory (`.ferry` by default) where `ferry up` keeps its state, and the one place its file names are spelled.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use ferry_schema::AgentId;

/// The data dir's default, relative to where `ferry` runs.
pub const DEFAULT: &str = ".ferry";

/// A data dir: `ferry up`, `down`, `agent`, `migrate` and `kb` agree on
/// what lies where in it through this type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir(PathBuf);

impl DataDir {
    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Generated passwords (`ferry up` makes them once, mode 0600).
    pub fn secrets(&self) -> PathBuf {
        self.0.join("secrets.env")
    }

    /// `ferry up`'s pids, read by `ferry down`.
    pub fn pid_file(&self) -> PathBuf {
        self.0.join("up.pid")
    }

    /// The broker's directory: its config, store and log.
    pub fn nats(&self) -> PathBuf {
        self.0.join("nats")
    }

    /// The broker's config, with the registered agents spliced in.
    pub fn nats_conf(&self) -> PathBuf {
        self.nats().join("nats.conf")
    }

    /// The broker's JetStream store.
    pub fn nats_store(&self) -> PathBuf {
        self.nats().join("store")
    }

    /// The local CA and server certificate of `ferry up --tls`.
    pub fn tls(&self) -> PathBuf {
        self.0.join("tls")
    }

    /// The local PostgreSQL cluster.
    pub fn postgres(&self) -> PathBuf {
        self.0.join("postgres")
    }

    /// `ferry backup`'s default folder.
    pub fn backups(&self) -> PathBuf {
        self.0.join("backups")
    }

    /// The workers' logs (`<role>.log`).
    pub fn logs(&self) -> PathBuf {
        self.0.join("logs")
    }

    /// Held while the registry is changed (`ferry agent`).
    pub fn registry_lock(&self) -> PathBuf {
        self.0.join("agents.lock")
    }

    /// The agent registry (`ferry agent add`).
    pub fn registry(&self) -> PathBuf {
        self.0.join("agents.toml")
    }

    /// The groups file the workers read (`--groups`).
    pub fn groups(&self) -> PathBuf {
        self.0.join(ferry_schema::groups::FILE_NAME)
    }

    /// Where `agent`'s nkey seed is kept (mode 0600).
    pub fn seed(&self, agent: &AgentId) -> PathBuf {
        self.0.join("agents").join(format!("{agent}.nk"))
    }

    /// The demo agent's spool.
    pub fn agent_spool(&self, agent: &AgentId) -> PathBuf {
        self.0.join("agent").join(agent.as_str()).join("spool")
    }

    /// The demo rules `ferry up` writes when given no `--rules`.
    pub fn demo_rules(&self) -> PathBuf {
        self.0.join("demo-rules.toml")
    }

    /// The demo alerts file `ferry up` writes when given no `--alerts`.
    pub fn demo_alerts(&self) -> PathBuf {
        self.0.join("demo-alerts.toml")
    }

    /// The demo inference config `ferry up` writes when given no `--inference-config`.
    pub fn demo_inference(&self) -> PathBuf {
        self.0.join("inference.toml")
    }
}

impl From<&OsStr> for DataDir {
    fn from(s: &OsStr) -> Self {
        Self(PathBuf::from(s))
    }
}

impl From<PathBuf> for DataDir {
    fn from(p: PathBuf) -> Self {
        Self(p)
    }
}

impl AsRef<Path> for DataDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl std::ops::Deref for DataDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_under_the_dir_and_none_collide() {
        let d = DataDir::from(PathBuf::from("/x/.ferry"));
        let id = AgentId::new("desk-1").unwrap();
        let all = [
            d.secrets(),
            d.pid_file(),
            d.nats_conf(),
            d.nats_store(),
            d.tls(),
            d.postgres(),
            d.logs(),
            d.registry(),
            d.groups(),
            d.seed(&id),
            d.agent_spool(&id),
            d.demo_rules(),
            d.demo_alerts(),
            d.demo_inference(),
        ];
        assert!(all.iter().all(|p| p.starts_with("/x/.ferry")));
        let unique: std::collections::BTreeSet<_> = all.iter().collect();
        assert_eq!(unique.len(), all.len());
        assert_eq!(d.seed(&id), PathBuf::from("/x/.ferry/agents/desk-1.nk"));
    }
}

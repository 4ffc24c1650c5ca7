//! The agent registry (`<data dir>/agents.toml`) and the files generated from it: the nkey users in `nats.conf` and the groups file.
//!
//! The registry is the source of truth. `ferry agent add|revoke` change it
//! and then regenerate, from the whole registry, the pool of agent accounts
//! between the `# BEGIN ferry agents` and `# END ferry agents` lines of
//! `nats.conf` (one account per slot, the agent's nkey user in the slot the
//! registry gave it), and `<data dir>/groups.toml`, which the rules and
//! inference workers read with `--groups`. Revoked agents stay in the
//! registry (with the time they were revoked) but get no user. A slot
//! whose user a reload took out (revoke, rotate, expire) is retired until
//! the broker restarts: nats-server 2.9.10 keeps counting the connections
//! that reload closed against the account's limit.

use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;
use chrono::{DateTime, SecondsFormat, Utc};
use ferry_schema::{topology, AgentId};
use serde::{Deserialize, Serialize};

/// Line that opens the generated block in `nats.conf`.
pub const BEGIN_MARKER: &str = "# BEGIN ferry agents";
/// Line that closes it.
pub const END_MARKER: &str = "# END ferry agents";

/// One agent as the registry records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentEntry {
    /// The agent id.
    pub id: String,
    /// Its group, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Public key of its nkey (`U...`): what `nats.conf` lists.
    pub public_key: String,
    /// When it was added.
    pub created: DateTime<Utc>,
    /// When it was revoked; revoked agents get no user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<DateTime<Utc>>,
    /// When its key was last replaced (`ferry agent rotate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated: Option<DateTime<Utc>>,
    /// When its key stops working (`--valid-for`): from then on the
    /// generated `nats.conf` has no user for it, and `ferry agent expire`
    /// applies that to the running brokers. `ferry agent rotate` renews it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<DateTime<Utc>>,
    /// Its slot in `nats.conf`'s pool of agent accounts (`AGENT_0007` for
    /// 7), held until it is revoked; given by [`Registry::add`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u32>,
}

impl AgentEntry {
    /// Whether it may connect now: not revoked and its key not expired.
    pub fn active(&self) -> bool {
        self.revoked.is_none() && !self.expired_at(Utc::now())
    }

    /// Whether its key had expired at `now` (a revoked agent's too).
    pub fn expired_at(&self, now: DateTime<Utc>) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }

    /// How long its key was given when it was made or last rotated, if it
    /// expires: what a rotation gives the new key unless told otherwise.
    pub fn validity(&self) -> Option<chrono::Duration> {
        Some(self.expires? - self.rotated.unwrap_or(self.created))
    }
}

/// Every agent ever added, in the order they were added.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// Slots whose user a reload took out since the broker last started
    /// (revoked, rotated away from, expired): not given again until
    /// `ferry agent slots` (then a restart) or `ferry up` clears them,
    /// because nats-server 2.9.10 keeps counting against the account's
    /// limit the connections such a reload closed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<u32>,
    /// The agents.
    #[serde(default, rename = "agent")]
    pub agents: Vec<AgentEntry>,
}

const REGISTRY_HEADER: &str = "# Ferry's agents, kept by `ferry agent add|list|revoke`. Edit with those commands:\n# nats.conf's agent users and groups.toml are generated from this file.\n\n";

impl Registry {
    /// Reads the registry; an empty one when the file does not exist.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let reg: Self =
            toml::from_str(&text).with_context(|| format!("agent registry {} is invalid", path.display()))?;
        for a in &reg.agents {
            AgentId::new(a.id.as_str()).with_context(|| format!("agent registry {}", path.display()))?;
        }
        let mut reg = reg;
        // A registry from before the slots: each agent not revoked takes
        // the lowest free one, in the order they were added.
        for i in 0..reg.agents.len() {
            if reg.agents[i].revoked.is_none() && reg.agents[i].slot.is_none() {
                reg.agents[i].slot = Some(reg.free_slot(u32::MAX)?);
            }
        }
        Ok(reg)
    }

    /// The lowest slot, from 1 to `slots`, that no agent holds (an agent
    /// holds its slot until it is revoked) and that is not retired.
    fn free_slot(&self, slots: u32) -> anyhow::Result<u32> {
        let held: std::collections::BTreeSet<u32> = self
            .agents
            .iter()
            .filter(|a| a.revoked.is_none())
            .filter_map(|a| a.slot)
            .chain(self.retired.iter().copied())
            .collect();
        (1..=slots).find(|s| !held.contains(s)).with_context(|| {
            format!(
                "all {slots} agent slots of nats.conf are taken ({} retired until the broker restarts): `ferry agent slots {}` grows the pool and frees the retired ones; then restart the broker",
                self.retired.len(),
                slots.saturating_mul(2)
            )
        })
    }

    /// Frees the retired slots: the broker is about to restart.
    pub fn clear_retired(&mut self) {
        self.retired.clear();
    }

    /// Retires `slot` (its user is taken out at the next reload).
    fn retire(&mut self, slot: Option<u32>) {
        if let Some(slot) = slot {
            if !self.retired.contains(&slot) {
                self.retired.push(slot);
                self.retired.sort_unstable();
            }
        }
    }

    /// The highest slot an agent holds (0 when none does).
    pub fn highest_slot(&self) -> u32 {
        self.agents.iter().filter(|a| a.revoked.is_none()).filter_map(|a| a.slot).max().unwrap_or(0)
    }

    /// Writes the registry (replacing the file in one rename).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let text = toml::to_string(self).context("serialising the agent registry")?;
        write_atomic(path, format!("{REGISTRY_HEADER}{text}").as_bytes(), 0o644)
    }

    /// The agents that may connect.
    pub fn active(&self) -> impl Iterator<Item = &AgentEntry> {
        self.agents.iter().filter(|a| a.active())
    }

    /// Adds `entry`, replacing a revoked entry of the same id, in the
    /// lowest free slot of a pool of `slots`. Fails when the id is already
    /// active or every slot is taken.
    pub fn add(&mut self, mut entry: AgentEntry, slots: u32) -> anyhow::Result<()> {
        if let Some(old) = self.agents.iter().position(|a| a.id == entry.id) {
            anyhow::ensure!(
                !self.agents[old].active(),
                "agent {} already exists (added {}); revoke it first to give it a new key",
                entry.id,
                rfc3339(&self.agents[old].created)
            );
            self.agents.remove(old);
        }
        entry.slot = Some(self.free_slot(slots)?);
        self.agents.push(entry);
        Ok(())
    }

    /// Gives agent `id` (not revoked; an expired one is renewed) the key
    /// `public_key`, valid for `valid_for` (else as long as its old key
    /// was, or for ever), in a new slot of a pool of `slots` (the old one
    /// is retired); its old key stops working at the next reload. Returns
    /// the old public key.
    pub fn rotate(
        &mut self,
        id: &str,
        public_key: String,
        at: DateTime<Utc>,
        valid_for: Option<chrono::Duration>,
        slots: u32,
    ) -> anyhow::Result<String> {
        self.active_entry(id, &format!("; `ferry agent add {id}` gives it a new key"))?;
        let slot = self.free_slot(slots)?;
        let entry = self.active_entry(id, "")?;
        entry.expires = valid_for.or_else(|| entry.validity()).map(|v| at + v);
        entry.rotated = Some(at);
        let old_slot = entry.slot.replace(slot);
        let old_key = std::mem::replace(&mut entry.public_key, public_key);
        self.retire(old_slot);
        Ok(old_key)
    }

    /// The agents, not revoked, whose key had expired at `now`.
    pub fn expired(&self, now: DateTime<Utc>) -> impl Iterator<Item = &AgentEntry> {
        self.agents.iter().filter(move |a| a.revoked.is_none() && a.expired_at(now))
    }

    /// Marks `id` revoked at `at`; returns its entry.
    pub fn revoke(&mut self, id: &str, at: DateTime<Utc>) -> anyhow::Result<&AgentEntry> {
        let entry = self.active_entry(id, "")?;
        entry.revoked = Some(at);
        let old = entry.slot.take();
        self.retire(old);
        self.entry(id)
    }

    fn entry(&self, id: &str) -> anyhow::Result<&AgentEntry> {
        self.agents.iter().find(|a| a.id == id).with_context(|| format!("agent {id} is not in the registry"))
    }

    /// The entry of `id`, which must be active (`why` ends the message
    /// when it was revoked).
    fn active_entry(&mut self, id: &str, why: &str) -> anyhow::Result<&mut AgentEntry> {
        let entry = self
            .agents
            .iter_mut()
            .find(|a| a.id == id)
            .with_context(|| format!("agent {id} is not in the registry (see `ferry agent list`)"))?;
        if let Some(when) = entry.revoked {
            anyhow::bail!("agent {id} was already revoked at {}{why}", rfc3339(&when));
        }
        Ok(entry)
    }

    /// The pool of `slots` agent accounts as `nats.conf` holds it, indented
    /// by `indent`: each active agent's nkey user in its slot, after a
    /// comment line naming it; the other slots empty.
    pub fn conf_accounts(&self, slots: u32, indent: &str) -> anyhow::Result<String> {
        let mut by_slot = std::collections::BTreeMap::new();
        for a in self.active() {
            if let Some(slot) = a.slot {
                by_slot.insert(slot, a);
            }
        }
        let mut out = String::new();
        for slot in 1..=slots {
            let account = topology::agent_account(slot);
            match by_slot.get(&slot) {
                Some(a) => {
                    let id = AgentId::new(a.id.as_str())?;
                    let group = a.group.as_deref().map(|g| format!(", group {g}")).unwrap_or_default();
                    out.push_str(&format!("{indent}# agent {id}{group}, added {}\n", rfc3339(&a.created)));
                    let credential = format!("nkey: {}", a.public_key);
                    let permissions = topology::agent_permissions(&id);
                    out.push_str(&topology::agent_account_conf(&account, Some((&credential, &permissions)), indent));
                }
                None => out.push_str(&topology::agent_account_conf(&account, None, indent)),
            }
        }
        Ok(out)
    }

    /// `nats.conf` text `conf` with its pool of agent accounts regenerated
    /// from this registry, keeping its number of slots. Fails when `conf`
    /// lacks the two marker lines or the pool, or an agent's slot is not in
    /// it (a reload cannot add an account: see [`Registry::splice_grown`]).
    pub fn splice_into(&self, conf: &str, origin: &str) -> anyhow::Result<String> {
        let (begin, end) = markers(conf, origin)?;
        let slots = pool_in(&conf[begin.end..end.start], origin)?;
        anyhow::ensure!(
            self.highest_slot() <= slots,
            "{origin} has {slots} agent slots but an agent holds slot {}: grow the pool with `ferry agent slots {}` and restart the broker",
            self.highest_slot(),
            self.highest_slot()
        );
        self.splice(conf, begin, end, slots)
    }

    /// Like [`Registry::splice_into`], with a pool of `slots` (at least
    /// every slot held): for a broker about to start, or restarted after.
    pub fn splice_grown(&self, conf: &str, origin: &str, slots: u32) -> anyhow::Result<String> {
        let (begin, end) = markers(conf, origin)?;
        pool_in(&conf[begin.end..end.start], origin)?;
        anyhow::ensure!(
            self.highest_slot() <= slots,
            "agent slot {} is taken: the pool cannot shrink below it",
            self.highest_slot()
        );
        self.splice(conf, begin, end, slots)
    }

    fn splice(&self, conf: &str, begin: std::ops::Range<usize>, end: std::ops::Range<usize>, slots: u32) -> anyhow::Result<String> {
        let line = &conf[begin.clone()];
        let indent = &line[..line.len() - line.trim_start().len()];
        let mut out = String::with_capacity(conf.len() + 512 * self.agents.len());
        out.push_str(&conf[..begin.end]);
        out.push('\n');
        out.push_str(&self.conf_accounts(slots, indent)?);
        out.push_str(&conf[end.start..]);
        Ok(out)
    }

    /// The groups file: `[groups]` with the active agents of each group.
    pub fn groups_toml(&self) -> anyhow::Result<String> {
        let mut file = ferry_schema::groups::GroupsFile::default();
        for a in self.active() {
            if let Some(g) = &a.group {
                file.groups.entry(g.clone()).or_default().push(a.id.clone());
            }
        }
        file.render().context("serialising the groups file")
    }
}

/// The byte ranges of the marker lines of `conf`.
fn markers(conf: &str, origin: &str) -> anyhow::Result<(std::ops::Range<usize>, std::ops::Range<usize>)> {
    let begin = line_with(conf, BEGIN_MARKER).with_context(|| {
        format!("{origin} has no `{BEGIN_MARKER}` line; add the two lines `{BEGIN_MARKER}` and `{END_MARKER}` inside its accounts block (see Ferry's nats.conf)")
    })?;
    let end = line_with(&conf[begin.end..], END_MARKER)
        .map(|r| (r.start + begin.end)..(r.end + begin.end))
        .with_context(|| format!("{origin} has `{BEGIN_MARKER}` but no `{END_MARKER}` line after it"))?;
    Ok((begin, end))
}

/// How many agent accounts (slots) `block`, the text between the markers, holds.
pub fn pool_in(block: &str, origin: &str) -> anyhow::Result<u32> {
    let slots = block
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| topology::agent_slot(name).is_some())
        .count();
    anyhow::ensure!(
        slots > 0,
        "{origin} has no agent accounts (AGENT_0001 ...) between its `{BEGIN_MARKER}` and `{END_MARKER}` lines: it predates one account per agent; start from Ferry's nats.conf"
    );
    u32::try_from(slots).context("too many agent slots")
}

/// How many agent slots `conf` has.
pub fn pool_size(conf: &str, origin: &str) -> anyhow::Result<u32> {
    let (begin, end) = markers(conf, origin)?;
    pool_in(&conf[begin.end..end.start], origin)
}

/// The byte range of the first line of `text` whose trimmed content is
/// `marker` (without its newline).
fn line_with(text: &str, marker: &str) -> Option<std::ops::Range<usize>> {
    let mut start = 0;
    for line in text.split_inclusive('\n') {
        let content = line.trim_end_matches(['\n', '\r']);
        if content.trim() == marker {
            return Some(start..start + content.len());
        }
        start += line.len();
    }
    None
}

/// A group name: letters, digits, `-` and `_`, at most 64 characters.
pub fn check_group(group: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !group.is_empty()
            && group.len() <= 64
            && group.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "group {group:?} is not valid: use 1 to 64 letters, digits, '-' or '_'"
    );
    Ok(())
}

/// A time as the registry and the listings show it (`2026-05-01T10:00:00Z`).
pub fn rfc3339(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Writes `bytes` to `path` through a temp file in the same dir and a
/// rename, so readers (nats-server on reload) never see half a file. The
/// new file gets `mode`, or the old file's mode when it existed.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mode = std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(mode);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

/// An exclusive lock on the registry, held while a command changes it, so
/// two operators' commands do not lose each other's changes.
#[derive(Debug)]
pub struct RegistryLock {
    /// Unlocked when closed.
    _file: std::fs::File,
}

impl RegistryLock {
    /// Takes the lock (`<data dir>/agents.lock`), waiting for another holder.
    pub fn take(data_dir: &crate::data_dir::DataDir) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir.path()).with_context(|| format!("creating {}", data_dir.display()))?;
        let path = data_dir.registry_lock();
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        f.lock().with_context(|| format!("locking {}", path.display()))?;
        Ok(Self { _file: f })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn entry(id: &str, group: Option<&str>) -> AgentEntry {
        AgentEntry {
            id: id.into(),
            group: group.map(Into::into),
            public_key: format!("UKEY{}", id.to_ascii_uppercase()),
            created: DateTime::parse_from_rfc3339("2026-05-01T10:00:00Z").unwrap().to_utc(),
            revoked: None,
            rotated: None,
            expires: None,
            slot: None,
        }
    }

    #[test]
    fn splices_the_active_agents_into_their_slots_between_the_markers() {
        let mut reg = Registry::default();
        reg.add(entry("desk-7", Some("support")), 3).unwrap();
        reg.add(entry("desk-8", None), 3).unwrap();
        reg.add(entry("desk-9", None), 3).unwrap();
        reg.revoke("desk-8", Utc::now()).unwrap();
        let empty = |n| topology::agent_account_conf(&topology::agent_account(n), None, "  ");
        let conf = format!("accounts {{\n  FERRY {{ }}\n  # BEGIN ferry agents\n{}{}{}  # END ferry agents\n  OTHER {{ }}\n}}\n", empty(1), empty(2), empty(3));
        let out = reg.splice_into(&conf, "test.conf").unwrap();
        // The accounts themselves are schema's (agent_account_conf, tested
        // there); this test is about the layout around them.
        let taken = |n, id: &str| {
            let p = topology::agent_permissions(&AgentId::new(id).unwrap());
            let key = format!("nkey: UKEY{}", id.to_ascii_uppercase());
            topology::agent_account_conf(&topology::agent_account(n), Some((&key, &p)), "  ")
        };
        assert_eq!(
            out,
            format!(
                "accounts {{\n  FERRY {{ }}\n  # BEGIN ferry agents\n  # agent desk-7, group support, added 2026-05-01T10:00:00Z\n{}{}  # agent desk-9, added 2026-05-01T10:00:00Z\n{}  # END ferry agents\n  OTHER {{ }}\n}}\n",
                taken(1, "desk-7"),
                empty(2),
                taken(3, "desk-9")
            )
        );
        assert!(!out.contains("desk-8"), "a revoked agent is left out: {out}");
        // Splicing again gives the same text: the block is regenerated, not appended.
        assert_eq!(reg.splice_into(&out, "test.conf").unwrap(), out);
        // desk-8's slot is retired until the broker restarts (2.9.10 keeps
        // counting the connections its reload closed): the pool is full,
        // and an add says how to grow it.
        assert_eq!(reg.retired, [2]);
        let err = reg.add(entry("desk-10", None), 3).unwrap_err().to_string();
        assert!(err.contains("all 3 agent slots of nats.conf are taken (1 retired") && err.contains("ferry agent slots 6"), "{err}");
        reg.add(entry("desk-10", None), 4).unwrap();
        assert_eq!(reg.agents.last().unwrap().slot, Some(4));
        // A rotation moves the agent to a free slot and retires its old one.
        reg.add(entry("desk-11", None), 6).unwrap();
        reg.rotate("desk-7", "UNEW7".into(), Utc::now(), None, 6).unwrap();
        assert_eq!(reg.agents[0].slot, Some(6));
        assert_eq!(reg.retired, [1, 2]);
        // After a restart the retired slots are free again.
        reg.clear_retired();
        reg.add(entry("desk-12", None), 6).unwrap();
        assert_eq!(reg.agents.last().unwrap().slot, Some(1));
        reg.revoke("desk-10", Utc::now()).unwrap();
        reg.revoke("desk-11", Utc::now()).unwrap();
        // A pool too small for the registry is refused, unless grown (a broker about to start).
        let small = format!("  # BEGIN ferry agents\n{}  # END ferry agents\n", empty(1));
        let err = reg.splice_into(&small, "small.conf").unwrap_err().to_string();
        assert!(err.contains("small.conf has 1 agent slots but an agent holds slot 6"), "{err}");
        let grown = reg.splice_grown(&small, "small.conf", 7).unwrap();
        assert_eq!(pool_size(&grown, "grown").unwrap(), 7);
        assert!(reg.splice_grown(&small, "small.conf", 5).is_err(), "cannot shrink below a held slot");
        let err = reg.splice_into("users: []", "x.conf").unwrap_err().to_string();
        assert!(err.contains("x.conf has no `# BEGIN ferry agents` line"), "{err}");
        let old = "users: [\n  # BEGIN ferry agents\n  # END ferry agents\n]\n";
        let err = reg.splice_into(old, "old.conf").unwrap_err().to_string();
        assert!(err.contains("old.conf has no agent accounts") && err.contains("predates"), "{err}");
    }

    #[test]
    fn a_registry_from_before_the_slots_gets_them_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agents.toml");
        let mut reg = Registry::default();
        reg.add(entry("desk-7", None), 10).unwrap();
        reg.add(entry("desk-8", None), 10).unwrap();
        reg.add(entry("desk-9", None), 10).unwrap();
        reg.revoke("desk-8", Utc::now()).unwrap();
        for a in &mut reg.agents {
            a.slot = None;
        }
        reg.retired.clear();
        reg.save(&path).unwrap();
        assert!(!std::fs::read_to_string(&path).unwrap().contains("slot"));
        let loaded = Registry::load(&path).unwrap();
        let slots: Vec<_> = loaded.agents.iter().map(|a| a.slot).collect();
        assert_eq!(slots, [Some(1), None, Some(2)]);
    }

    #[test]
    fn an_expired_key_gets_no_user_and_a_rotation_renews_it_for_as_long() {
        let t0 = DateTime::parse_from_rfc3339("2026-05-01T10:00:00Z").unwrap().to_utc();
        let mut reg = Registry::default();
        reg.add(AgentEntry { expires: Some(t0 + chrono::Duration::hours(1)), ..entry("desk-7", None) }, 10).unwrap();
        reg.add(AgentEntry { expires: Some(Utc::now() + chrono::Duration::days(30)), ..entry("desk-8", None) }, 10).unwrap();
        reg.add(entry("desk-9", None), 10).unwrap();
        reg.revoke("desk-9", t0).unwrap();
        // desk-7's hour is long over; desk-9 is revoked, not expired.
        let expired: Vec<&str> = reg.expired(Utc::now()).map(|a| a.id.as_str()).collect();
        assert_eq!(expired, ["desk-7"]);
        assert!(reg.expired(t0).next().is_none());
        let conf = reg.conf_accounts(10, "").unwrap();
        assert!(!conf.contains("desk-7") && conf.contains("desk-8") && !conf.contains("desk-9"), "{conf}");
        // A rotation renews it, for as long as it had (an hour) ...
        let now = Utc::now();
        reg.rotate("desk-7", "UNEW".into(), now, None, 10).unwrap();
        assert_eq!(reg.agents[0].expires, Some(now + chrono::Duration::hours(1)));
        assert!(reg.agents[0].active());
        // ... or as long as it is told.
        reg.rotate("desk-7", "UNEWER".into(), now, Some(chrono::Duration::days(7)), 10).unwrap();
        assert_eq!(reg.agents[0].expires, Some(now + chrono::Duration::days(7)));
        // A key that never expired never will after a rotation either.
        reg.add(entry("desk-10", None), 10).unwrap();
        reg.rotate("desk-10", "U10".into(), now, None, 10).unwrap();
        assert_eq!(reg.agents.last().map(|a| a.expires), Some(None));
        assert!(reg.rotate("desk-9", "U9".into(), now, None, 10).unwrap_err().to_string().contains("already revoked"));
    }

    #[test]
    fn the_committed_nats_conf_is_the_empty_pool_of_agent_slots() {
        let reg = Registry::default();
        assert_eq!(reg.splice_into(ferry_stack::NATS_CONF, "nats.conf").unwrap(), ferry_stack::NATS_CONF);
        assert_eq!(pool_size(ferry_stack::NATS_CONF, "nats.conf").unwrap(), ferry_schema::quota::AGENT_SLOTS);
    }

    #[test]
    fn registry_round_trips_and_refuses_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::data_dir::DataDir::from(dir.path().to_path_buf()).registry();
        assert_eq!(Registry::load(&path).unwrap(), Registry::default());
        let mut reg = Registry::default();
        reg.add(entry("desk-7", Some("support")), 10).unwrap();
        let err = reg.add(entry("desk-7", None), 10).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        reg.save(&path).unwrap();
        assert_eq!(Registry::load(&path).unwrap(), reg);
        reg.revoke("desk-7", Utc::now()).unwrap();
        assert!(reg.revoke("desk-7", Utc::now()).is_err());
        // A revoked id can be added again, with a new key.
        reg.add(entry("desk-7", None), 10).unwrap();
        assert_eq!(reg.agents.len(), 1);
        assert!(reg.agents[0].active());
    }

    #[test]
    fn groups_file_lists_active_members() {
        let mut reg = Registry::default();
        reg.add(entry("desk-7", Some("support")), 10).unwrap();
        reg.add(entry("desk-8", Some("support")), 10).unwrap();
        reg.add(entry("desk-9", Some("vip")), 10).unwrap();
        reg.revoke("desk-9", Utc::now()).unwrap();
        let text = reg.groups_toml().unwrap();
        assert!(text.contains("[groups]\nsupport = [\"desk-7\", \"desk-8\"]\n"), "{text}");
        assert!(!text.contains("vip"), "{text}");
        assert!(check_group("support").is_ok());
        assert!(check_group("a b").is_err());
    }
}

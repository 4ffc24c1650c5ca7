//! Agent groups from a config's `[groups]` table, shared by the rules and inference configs.
//!
//! A config's own `[groups]` can be completed by a groups file (`--groups`):
//! a `[groups]` table alone ([`ferry_schema::groups::GroupsFile`]), which
//! `ferry agent add --group` generates.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use ferry_schema::{AgentId, InvalidAgentId};

/// Which groups each agent belongs to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentGroups(HashMap<AgentId, Vec<String>>);

/// A `[groups]` member that is not a valid agent id.
#[derive(Debug, Clone, thiserror::Error)]
#[error("[groups] {group:?}: {source}")]
pub struct GroupError {
    /// The group.
    pub group: String,
    /// Why the member is invalid.
    #[source]
    pub source: InvalidAgentId,
}

impl AgentGroups {
    /// Builds the index from `group -> members`.
    pub fn parse(table: &BTreeMap<String, Vec<String>>) -> Result<Self, GroupError> {
        let mut index: HashMap<AgentId, Vec<String>> = HashMap::new();
        for (group, members) in table {
            for m in members {
                let agent = AgentId::new(m.as_str()).map_err(|source| GroupError {
                    group: group.clone(),
                    source,
                })?;
                index.entry(agent).or_default().push(group.clone());
            }
        }
        Ok(Self(index))
    }

    /// The groups `agent` belongs to (none when it is in no group).
    pub fn of(&self, agent: &AgentId) -> &[String] {
        self.0.get(agent).map_or(&[], Vec::as_slice)
    }

    /// Whether `agent` passes a filter of `agents` and `groups` (an empty
    /// filter passes everyone).
    pub fn admits(
        &self,
        agent: &AgentId,
        agents: &std::collections::HashSet<AgentId>,
        groups: &[String],
    ) -> bool {
        (agents.is_empty() || agents.contains(agent))
            && (groups.is_empty()
                || self
                    .0
                    .get(agent)
                    .is_some_and(|gs| gs.iter().any(|g| groups.contains(g))))
    }
}

/// A groups file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum GroupsFileError {
    /// The file could not be read.
    #[error("cannot read groups file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Not a TOML file holding only a `[groups]` table of string lists.
    #[error("groups file {path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
}

/// Reads a groups file: `group -> members`.
pub fn load_file(path: &Path) -> Result<BTreeMap<String, Vec<String>>, GroupsFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| GroupsFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let file = ferry_schema::groups::GroupsFile::parse(&text).map_err(|e| GroupsFileError::Syntax {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    })?;
    Ok(file.groups)
}

/// Adds the members of `extra`'s groups to `table` (a group in both gets
/// both member lists, each member once).
pub fn merge(table: &mut BTreeMap<String, Vec<String>>, extra: &BTreeMap<String, Vec<String>>) {
    for (group, members) in extra {
        let into = table.entry(group.clone()).or_default();
        for m in members {
            if !into.contains(m) {
                into.push(m.clone());
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_groups_file_completes_a_config_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("groups.toml");
        std::fs::write(&path, "# generated\n[groups]\nsupport = [\"desk-7\", \"desk-1\"]\nvip = [\"desk-8\"]\n").unwrap();
        let extra = load_file(&path).unwrap();
        let mut table = BTreeMap::from([("support".to_string(), vec!["desk-1".to_string()])]);
        merge(&mut table, &extra);
        assert_eq!(table["support"], ["desk-1", "desk-7"]);
        assert_eq!(table["vip"], ["desk-8"]);
        let groups = AgentGroups::parse(&table).unwrap();
        let none = std::collections::HashSet::new();
        assert!(groups.admits(&AgentId::new("desk-7").unwrap(), &none, &["support".to_string()]));

        std::fs::write(&path, "[rule]\nname = 1\n").unwrap();
        assert!(load_file(&path).unwrap_err().to_string().starts_with("groups file"));
        assert!(load_file(&dir.path().join("missing.toml")).is_err());
    }
}

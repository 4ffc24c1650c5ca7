//! Agent groups from a config's `[groups]` table, shared by the rules and inference configs.

use std::collections::{BTreeMap, HashMap};

use ferry_schema::{AgentId, InvalidAgentId};

/// Which groups each agent belongs to.
#[derive(Debug, Clone, Default)]
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

//! The rules role's configuration: [`RulesConfig`] and the rules file (TOML), parsed and validated into a [`RuleSet`](super::engine::RuleSet).
//!
//! ```toml
//! [groups]
//! support = ["desk-1", "desk-2"]
//!
//! [defaults]
//! unmatched_chat = "infer"      # infer | ignore | escalate
//!
//! [[rule]]
//! name = "greeting"
//! kinds = ["chat"]              # chat (default) or activity
//! groups = ["support"]          # optional: only these agent groups
//! agents = ["desk-1"]           # optional: only these agents
//! keywords = ["hello", "你好"]   # optional: any of them, case-insensitive
//! regex = "(?i)^hi\\b"           # optional: must also match
//! customer_tags = ["vip"]       # optional, chat only: the customer has one of these tags
//!                               # (needs the worker's --database-url)
//! action = "reply"              # chat: reply | escalate | ignore | infer; activity: alert | ignore
//! template = "Hello {sender}!"  # reply/escalate/alert text
//! confidence = 0.9              # optional, default 1.0
//! ```
//!
//! Rules are tried in file order; the first match wins.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_schema::codec::DEFAULT_MAX_PAYLOAD;
use ferry_schema::{AgentId, EventKind};
use serde::Deserialize;

use super::engine::{Action, Rule, RuleSet, Template, UnmatchedChat};
use crate::groups::AgentGroups;
use crate::runtime::ConsumeSettings;

/// What a rules worker replica needs.
#[derive(Debug, Clone)]
pub struct RulesConfig {
    /// The rules file.
    pub rules_path: PathBuf,
    /// Consume loop limits.
    pub consume: ConsumeSettings,
    /// Largest event payload decoded; larger ones are dead-lettered.
    pub max_payload: usize,
    /// PostgreSQL, for rules on customer tags (required when a rule has them).
    pub db: Option<crate::state::DbConfig>,
    /// A groups file completing the rules file's `[groups]` (`--groups`).
    pub groups_path: Option<PathBuf>,
    /// How often the rules and groups files are read again; a change that
    /// validates replaces the rules in use ([`reload`]). `None` or zero: read once.
    pub reload_every: Option<Duration>,
}

/// The default of [`RulesConfig::reload_every`].
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

impl RulesConfig {
    /// Defaults for a rules file.
    pub fn new(rules_path: impl Into<PathBuf>) -> Self {
        Self {
            rules_path: rules_path.into(),
            consume: ConsumeSettings::default(),
            max_payload: DEFAULT_MAX_PAYLOAD,
            db: None,
            groups_path: None,
            reload_every: Some(RELOAD_EVERY),
        }
    }
}

/// Why a rules file was rejected. The message names the file, the rule and
/// the field, and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// The file could not be read.
    #[error("cannot read rules file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has a field of the wrong type or name.
    #[error("rules file {path}: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A rule is well-formed TOML but makes no sense.
    #[error("rules file {path}: rule {index} ({name:?}): field `{field}`: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// 1-based position of the rule in the file.
        index: usize,
        /// The rule's name.
        name: String,
        /// The offending field.
        field: &'static str,
        /// What is wrong and what was expected.
        message: String,
    },
    /// The groups file (`--groups`) is unusable.
    #[error(transparent)]
    GroupsFile(#[from] crate::groups::GroupsFileError),
    /// The `[groups]` table is invalid.
    #[error("rules file {path}: [groups] {group:?}: {message}")]
    Group {
        /// The file.
        path: String,
        /// The group.
        group: String,
        /// What is wrong.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    groups: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    defaults: Defaults,
    #[serde(default, rename = "rule")]
    rules: Vec<RuleEntry>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Defaults {
    #[serde(default)]
    unmatched_chat: Option<UnmatchedName>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum UnmatchedName {
    Infer,
    Ignore,
    Escalate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ActionName {
    Reply,
    Escalate,
    Ignore,
    Infer,
    Alert,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleEntry {
    name: String,
    #[serde(default)]
    kinds: Vec<String>,
    #[serde(default)]
    agents: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    keywords: Vec<String>,
    regex: Option<String>,
    #[serde(default)]
    customer_tags: Vec<String>,
    action: ActionName,
    template: Option<String>,
    confidence: Option<f32>,
}

/// Reads and validates a rules file.
pub fn load(path: &Path) -> Result<RuleSet, RulesError> {
    load_with_groups(path, None)
}

/// Reads and validates a rules file, its `[groups]` completed by the
/// groups file `groups` (`--groups`, from `ferry agent add --group`).
pub fn load_with_groups(path: &Path, groups: Option<&Path>) -> Result<RuleSet, RulesError> {
    let extra = match groups {
        Some(g) => crate::groups::load_file(g)?,
        None => BTreeMap::new(),
    };
    let text = std::fs::read_to_string(path).map_err(|source| RulesError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_with_groups(&text, &path.display().to_string(), &extra)
}

/// Parses and validates rules from TOML text; `origin` names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<RuleSet, RulesError> {
    parse_with_groups(text, origin, &BTreeMap::new())
}

/// [`parse`], with `extra` groups added to the file's `[groups]`.
pub fn parse_with_groups(
    text: &str,
    origin: &str,
    extra: &BTreeMap<String, Vec<String>>,
) -> Result<RuleSet, RulesError> {
    let mut file: RulesFile = toml::from_str(text).map_err(|e| RulesError::Syntax {
        path: origin.to_string(),
        message: e.to_string().trim_end().to_string(),
    })?;
    crate::groups::merge(&mut file.groups, extra);

    let agent_groups = AgentGroups::parse(&file.groups).map_err(|e| RulesError::Group {
        path: origin.to_string(),
        group: e.group.clone(),
        message: e.source.to_string(),
    })?;

    let mut names = HashSet::new();
    let mut rules = Vec::with_capacity(file.rules.len());
    for (i, entry) in file.rules.into_iter().enumerate() {
        let invalid = |field: &'static str, message: String| RulesError::Invalid {
            path: origin.to_string(),
            index: i + 1,
            name: entry.name.clone(),
            field,
            message,
        };
        if entry.name.trim().is_empty() {
            return Err(invalid("name", "must not be empty".into()));
        }
        if !names.insert(entry.name.clone()) {
            return Err(invalid("name", "another rule already has this name".into()));
        }
        let kinds = if entry.kinds.is_empty() {
            vec![EventKind::Chat]
        } else {
            entry
                .kinds
                .iter()
                .map(|k| match EventKind::parse(k) {
                    Some(kind @ (EventKind::Chat | EventKind::Activity)) => Ok(kind),
                    _ => Err(invalid(
                        "kinds",
                        format!("{k:?} is not a kind rules apply to; expected \"chat\" or \"activity\""),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        let agents = entry
            .agents
            .iter()
            .map(|a| AgentId::new(a.as_str()).map_err(|e| invalid("agents", e.to_string())))
            .collect::<Result<HashSet<_>, _>>()?;
        for g in &entry.groups {
            if !file.groups.contains_key(g) {
                return Err(invalid(
                    "groups",
                    format!("group {g:?} is not defined in [groups]"),
                ));
            }
        }
        let regex = entry
            .regex
            .as_deref()
            .map(|r| regex::Regex::new(r).map_err(|e| invalid("regex", format!("invalid regex: {e}"))))
            .transpose()?;
        if !entry.customer_tags.is_empty() && kinds.contains(&EventKind::Activity) {
            return Err(invalid(
                "customer_tags",
                "applies to chat events only (activities have no customer)".into(),
            ));
        }
        if let Some(t) = entry.customer_tags.iter().find(|t| t.trim().is_empty()) {
            return Err(invalid("customer_tags", format!("{t:?}: a tag must not be empty")));
        }
        let chat_only = matches!(entry.action, ActionName::Reply | ActionName::Infer);
        let activity_only = matches!(entry.action, ActionName::Alert);
        if entry.action == ActionName::Escalate && kinds.contains(&EventKind::Activity) {
            return Err(invalid(
                "action",
                "\"escalate\" applies to chat events only; activity rules use \"alert\" or \"ignore\"".into(),
            ));
        }
        if chat_only && kinds.contains(&EventKind::Activity) {
            return Err(invalid(
                "action",
                format!("{:?} applies to chat events only, but `kinds` includes \"activity\"", entry.action),
            ));
        }
        if activity_only && kinds.contains(&EventKind::Chat) {
            return Err(invalid(
                "action",
                "\"alert\" applies to activity events only; use kinds = [\"activity\"]".into(),
            ));
        }
        let template = match (&entry.template, entry.action) {
            (None, ActionName::Reply | ActionName::Alert) => {
                return Err(invalid(
                    "template",
                    "is required for this action (the text to send)".into(),
                ))
            }
            (None, _) => None,
            (Some(t), _) => Some(Template::parse(t, &kinds).map_err(|m| invalid("template", m))?),
        };
        let confidence = entry.confidence.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&confidence) {
            return Err(invalid(
                "confidence",
                format!("{confidence} is outside 0.0..=1.0"),
            ));
        }
        let action = match (entry.action, template) {
            (ActionName::Reply, Some(t)) => Action::Reply(t),
            (ActionName::Alert, Some(t)) => Action::Alert(t),
            (ActionName::Escalate, t) => Action::Escalate(t),
            (ActionName::Ignore, _) => Action::Ignore,
            (ActionName::Infer, _) => Action::Infer,
            (ActionName::Reply | ActionName::Alert, None) => {
                return Err(invalid("template", "is required for this action".into()))
            }
        };
        rules.push(Rule {
            name: entry.name,
            kinds,
            agents,
            groups: entry.groups,
            keywords: entry.keywords.iter().map(|k| k.to_lowercase()).collect(),
            regex,
            customer_tags: entry.customer_tags,
            action,
            confidence,
        });
    }

    let unmatched_chat = match file.defaults.unmatched_chat {
        None | Some(UnmatchedName::Infer) => UnmatchedChat::Infer,
        Some(UnmatchedName::Ignore) => UnmatchedChat::Ignore,
        Some(UnmatchedName::Escalate) => UnmatchedChat::Escalate,
    };
    Ok(RuleSet::new(rules, agent_groups, unmatched_chat))
}

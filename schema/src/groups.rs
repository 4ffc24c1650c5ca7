//! The groups file (`<data dir>/groups.toml`): written by `ferry agent add --group`, read by the rules and inference workers (`--groups`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Its name in a data dir.
pub const FILE_NAME: &str = "groups.toml";

/// What the file says above its table.
const HEADER: &str = "# Agent groups from `ferry agent add --group`, generated from agents.toml; do not edit.\n# The rules and inference workers read it with --groups.\n\n";

/// A groups file: a `[groups]` table alone, `group -> member agent ids`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupsFile {
    /// Each group's members.
    #[serde(default)]
    pub groups: BTreeMap<String, Vec<String>>,
}

impl GroupsFile {
    /// The file's text, with a header saying where it comes from.
    pub fn render(&self) -> Result<String, toml::ser::Error> {
        Ok(format!("{HEADER}{}", toml::to_string(self)?))
    }

    /// Reads the file's text; anything but a `[groups]` table of string
    /// lists is refused, with the parser's line and column.
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn what_the_cli_writes_the_workers_read() {
        let mut f = GroupsFile::default();
        f.groups.insert("support".into(), vec!["desk-7".into(), "desk-8".into()]);
        let text = f.render().unwrap();
        assert!(text.starts_with("# Agent groups"), "{text}");
        assert!(text.contains("[groups]\nsupport = [\"desk-7\", \"desk-8\"]\n"), "{text}");
        assert_eq!(GroupsFile::parse(&text).unwrap(), f);
    }

    #[test]
    fn other_tables_are_refused() {
        assert!(GroupsFile::parse("[groups]\na = [\"x\"]\n[rules]\n").is_err());
        assert!(GroupsFile::parse("[groups]\na = \"x\"\n").is_err());
        assert!(GroupsFile::parse("").unwrap().groups.is_empty());
    }
}

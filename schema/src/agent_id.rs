//! Agent ids: the name of one agent, valid as a single NATS subject token.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest agent id accepted; keeps subjects and consumer names short.
pub const MAX_AGENT_ID_LEN: usize = 64;

/// An agent's id, e.g. `desk-7`. It is one subject token, so it appears as is
/// in `events.<id>.<kind>` and `replies.<id>`, and in consumer names.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentId(String);

/// Why a string is not a valid agent id; the message names the offending part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("agent id {id:?} is not a valid subject token ({reason})")]
pub struct InvalidAgentId {
    /// The rejected id, as given.
    pub id: String,
    /// What is wrong with it.
    pub reason: String,
}

impl AgentId {
    /// Validates `id`: non-empty, at most [`MAX_AGENT_ID_LEN`] bytes, and only
    /// ASCII letters, digits, `-` and `_` (so it is also a valid consumer
    /// name and file name on Windows).
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidAgentId> {
        let id = id.into();
        let fail = |reason: String| InvalidAgentId {
            id: id.clone(),
            reason,
        };
        if id.is_empty() {
            return Err(fail("it is empty".into()));
        }
        if id.len() > MAX_AGENT_ID_LEN {
            return Err(fail(format!(
                "{} bytes is longer than the {MAX_AGENT_ID_LEN}-byte limit",
                id.len()
            )));
        }
        // The common case, checked byte by byte; the slower scan below only
        // runs to describe what is wrong.
        if id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Ok(Self(id));
        }
        if let Some((pos, c)) = id
            .char_indices()
            .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            let what = match c {
                '.' => "'.' separates subject tokens".to_string(),
                '*' | '>' => format!("'{c}' is a subject wildcard"),
                c if c.is_whitespace() => format!("whitespace {c:?}"),
                c => format!("{c:?}"),
            };
            return Err(fail(format!(
                "{what} at byte {pos} is not allowed; use letters, digits, '-' and '_'"
            )));
        }
        Ok(Self(id))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AgentId({})", self.0)
    }
}

impl std::str::FromStr for AgentId {
    type Err = InvalidAgentId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl Serialize for AgentId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for AgentId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        AgentId::new(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(id: &str, expect: Result<(), &str>) {
        let got = AgentId::new(id).map(|_| ()).map_err(|e| e.to_string());
        assert_eq!(got, expect.map_err(str::to_string), "for {id:?}");
    }

    #[test]
    fn validation() {
        check("desk-7", Ok(()));
        check("DESK_7", Ok(()));
        check(
            "",
            Err(r#"agent id "" is not a valid subject token (it is empty)"#),
        );
        check(
            "desk 7",
            Err(
                r#"agent id "desk 7" is not a valid subject token (whitespace ' ' at byte 4 is not allowed; use letters, digits, '-' and '_')"#,
            ),
        );
        check(
            "desk.7",
            Err(
                r#"agent id "desk.7" is not a valid subject token ('.' separates subject tokens at byte 4 is not allowed; use letters, digits, '-' and '_')"#,
            ),
        );
        check(
            "desk*",
            Err(
                r#"agent id "desk*" is not a valid subject token ('*' is a subject wildcard at byte 4 is not allowed; use letters, digits, '-' and '_')"#,
            ),
        );
        check(
            ">",
            Err(
                r#"agent id ">" is not a valid subject token ('>' is a subject wildcard at byte 0 is not allowed; use letters, digits, '-' and '_')"#,
            ),
        );
        check(
            "桌子",
            Err(
                r#"agent id "桌子" is not a valid subject token ('桌' at byte 0 is not allowed; use letters, digits, '-' and '_')"#,
            ),
        );
        let long = "a".repeat(65);
        assert!(AgentId::new(long).is_err());
        assert!(AgentId::new("a".repeat(64)).is_ok());
    }
}

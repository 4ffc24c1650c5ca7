//! Events from JSON lines: the agent's portable source (a file or stdin).
//!
//! Each non-empty line is one event. The short form names only what
//! happened; the agent fills in the rest:
//!
//! ```json
//! {"kind":"chat","body":{"chat":"Alice","sender":"Alice","text":"hello"}}
//! ```
//!
//! A line may also carry `id`, `ts` and `agent` (a full envelope, e.g. one
//! printed by `ferry replay`); `agent`, if present, must be this agent's id.
//! Lines starting with `#` are comments.

use ferry_schema::codec::{decode_event, DEFAULT_MAX_PAYLOAD};
use ferry_schema::{AgentId, Encoding, Envelope, EventId, SCHEMA_VERSION};
use serde_json::{Map, Value};

/// A line that is not a valid event; names the line and the problem.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct SourceError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// Parses one line into an event for `agent`; `Ok(None)` for blank lines and comments.
pub fn parse_line(agent: &AgentId, line_no: usize, line: &str) -> Result<Option<Envelope>, SourceError> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let err = |message: String| SourceError {
        line: line_no,
        message,
    };
    let mut doc: Map<String, Value> = match serde_json::from_str(line) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err(err("expected a JSON object".into())),
        Err(e) => return Err(err(format!("not JSON: {e}"))),
    };
    match doc.get("agent") {
        None => {
            doc.insert("agent".into(), Value::String(agent.to_string()));
        }
        Some(Value::String(a)) if a == agent.as_str() => {}
        Some(other) => {
            return Err(err(format!(
                "agent is {other} but this agent is {agent:?}; an agent publishes only its own events"
            )))
        }
    }
    doc.entry("id")
        .or_insert_with(|| Value::String(EventId::new().to_string()));
    doc.entry("ts")
        .or_insert_with(|| Value::String(chrono::Utc::now().to_rfc3339()));
    doc.entry("v").or_insert(Value::from(SCHEMA_VERSION));
    let bytes = serde_json::to_vec(&doc).map_err(|e| err(e.to_string()))?;
    decode_event(&bytes, Encoding::Json, DEFAULT_MAX_PAYLOAD)
        .map(Some)
        .map_err(|e| err(e.to_string()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use ferry_schema::EventBody;

    fn agent() -> AgentId {
        AgentId::new("desk-1").unwrap()
    }

    #[test]
    fn short_form_is_completed() {
        let env = parse_line(&agent(), 1, r#"{"kind":"chat","body":{"chat":"A","sender":"A","text":"hi"}}"#)
            .unwrap()
            .unwrap();
        assert_eq!(env.agent, agent());
        assert!(matches!(env.body, EventBody::Chat(ref c) if c.text == "hi"));
    }

    #[test]
    fn full_form_keeps_id() {
        let line = r#"{"id":"0193f3a2-7c4e-7000-8000-000000000001","ts":"2026-11-22T10:00:00Z","agent":"desk-1","kind":"activity","body":{"app":"a","title":"t"}}"#;
        let env = parse_line(&agent(), 1, line).unwrap().unwrap();
        assert_eq!(env.id.to_string(), "0193f3a2-7c4e-7000-8000-000000000001");
    }

    #[track_caller]
    fn check_err(line: &str, expect: &str) {
        let e = parse_line(&agent(), 7, line).unwrap_err().to_string();
        assert!(e.starts_with("line 7: ") && e.contains(expect), "{e}");
    }

    #[test]
    fn errors_name_the_line() {
        assert!(parse_line(&agent(), 1, "  ").unwrap().is_none());
        assert!(parse_line(&agent(), 1, "# comment").unwrap().is_none());
        check_err("[1]", "expected a JSON object");
        check_err("{nope", "not JSON");
        check_err(r#"{"kind":"chat","body":{"chat":"A","sender":"A"}}"#, "required field `body.text` is missing");
        check_err(r#"{"kind":"chat","agent":"desk-2","body":{}}"#, "an agent publishes only its own events");
        check_err(r#"{"kind":"fax","body":{}}"#, "unknown kind \"fax\"");
    }
}

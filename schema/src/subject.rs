//! Every subject Ferry uses, built and parsed in one place.
//!
//! | subject                          | carries                                  |
//! |----------------------------------|------------------------------------------|
//! | `events.<agent>.<kind>`          | events from one agent (stream `EVENTS`)   |
//! | `replies.<agent>`                | replies to one agent (stream `REPLIES`)   |
//! | `work.inference.<kind>`          | rules → inference hand-off (stream `WORK`)|
//! | `deadletter.<stream>.<consumer>` | poison messages with reasons (`DEADLETTER`)|
//! | `ferry.svc.<role>.status`        | a worker's status endpoint (micro service)|

use async_nats::Subject;

use crate::{AgentId, EventKind};

/// Prefix of every event subject.
const EVENTS: &str = "events";
/// Prefix of every reply subject.
const REPLIES: &str = "replies";
/// Prefix of every work hand-off subject.
const WORK: &str = "work";
/// Prefix of every dead-letter subject.
const DEADLETTER: &str = "deadletter";

/// A subject that is not one Ferry recognises.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("subject {subject:?} is not an event subject: {reason}")]
pub struct SubjectError {
    /// The subject given.
    pub subject: String,
    /// What is wrong with it.
    pub reason: String,
}

/// `events.<agent>.<kind>`: where `agent` publishes events of `kind`.
pub fn event(agent: &AgentId, kind: EventKind) -> Subject {
    Subject::from(format!("{EVENTS}.{agent}.{kind}"))
}

/// `events.>`: every event.
pub fn all_events() -> Subject {
    Subject::from_static("events.>")
}

/// `events.*.<kind>`: every agent's events of one kind.
pub fn events_of_kind(kind: EventKind) -> Subject {
    Subject::from(format!("{EVENTS}.*.{kind}"))
}

/// `events.<agent>.>`: every event of one agent (its publish permission).
pub fn events_of_agent(agent: &AgentId) -> Subject {
    Subject::from(format!("{EVENTS}.{agent}.>"))
}

/// Parses `events.<agent>.<kind>` into its agent and kind.
pub fn parse_event(subject: &str) -> Result<(AgentId, EventKind), SubjectError> {
    let fail = |reason: String| SubjectError {
        subject: subject.to_string(),
        reason,
    };
    let mut parts = subject.split('.');
    let (Some(prefix), Some(agent), Some(kind), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(fail("expected three tokens, events.<agent>.<kind>".into()));
    };
    if prefix != EVENTS {
        return Err(fail(format!("expected it to start with {EVENTS:?}")));
    }
    let agent = AgentId::new(agent).map_err(|e| fail(e.to_string()))?;
    let kind = EventKind::parse(kind).ok_or_else(|| {
        fail(format!(
            "unknown kind {kind:?}, expected one of {}",
            EventKind::ALL.map(EventKind::as_str).join(", ")
        ))
    })?;
    Ok((agent, kind))
}

/// `replies.<agent>`: where replies to `agent` are published.
pub fn reply(agent: &AgentId) -> Subject {
    Subject::from(format!("{REPLIES}.{agent}"))
}

/// `replies.>`: every reply.
pub fn all_replies() -> Subject {
    Subject::from_static("replies.>")
}

/// The work queues through which one worker role hands work to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkQueue {
    /// Chat messages the rules worker hands to the inference worker.
    InferenceChat,
}

impl WorkQueue {
    /// The queue's subject.
    pub fn subject(self) -> Subject {
        match self {
            Self::InferenceChat => Subject::from(format!("{WORK}.inference.chat")),
        }
    }
}

/// `work.>`: every work hand-off.
pub fn all_work() -> Subject {
    Subject::from_static("work.>")
}

/// `deadletter.<stream>.<consumer>`: where `consumer` of `stream` parks poison.
pub fn dead_letter(stream: &str, consumer: &str) -> Subject {
    Subject::from(format!("{DEADLETTER}.{stream}.{consumer}"))
}

/// `deadletter.>`: every dead letter.
pub fn all_dead_letters() -> Subject {
    Subject::from_static("deadletter.>")
}

/// `ferry.svc.<role>.status`: the status endpoint of a worker role's micro service.
pub fn service_status(role: &str) -> Subject {
    Subject::from(format!("ferry.svc.{role}.status"))
}

/// `$SRV.STATS`: the NATS micro-service stats request every service
/// instance answers (`nats micro stats`); Ferry's workers put their
/// counters in each endpoint's `data`.
pub fn all_service_stats() -> Subject {
    Subject::from_static("$SRV.STATS")
}

/// `events.*.heartbeat`: every agent's heartbeats.
pub fn all_heartbeats() -> Subject {
    Subject::from_static("events.*.heartbeat")
}

/// Inbox prefix for an agent's connection (`_INBOX.<agent>`), so the broker
/// can allow each agent to subscribe to its own inboxes and nothing else.
pub fn agent_inbox_prefix(agent: &AgentId) -> String {
    format!("_INBOX.{agent}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn agent(s: &str) -> AgentId {
        AgentId::new(s).unwrap()
    }

    #[test]
    fn builds() {
        let a = agent("desk-7");
        assert_eq!(event(&a, EventKind::Chat).as_str(), "events.desk-7.chat");
        assert_eq!(reply(&a).as_str(), "replies.desk-7");
        assert_eq!(events_of_agent(&a).as_str(), "events.desk-7.>");
        assert_eq!(
            events_of_kind(EventKind::Predict).as_str(),
            "events.*.predict"
        );
        assert_eq!(
            dead_letter("EVENTS", "rules").as_str(),
            "deadletter.EVENTS.rules"
        );
        assert_eq!(
            WorkQueue::InferenceChat.subject().as_str(),
            "work.inference.chat"
        );
        assert_eq!(agent_inbox_prefix(&a), "_INBOX.desk-7");
    }

    #[test]
    fn parses_round_trip() {
        for kind in EventKind::ALL {
            let s = event(&agent("pc_1"), kind);
            assert_eq!(parse_event(s.as_str()).unwrap(), (agent("pc_1"), kind));
        }
    }

    #[track_caller]
    fn check_err(subject: &str, expect: &str) {
        assert_eq!(parse_event(subject).unwrap_err().to_string(), expect);
    }

    #[test]
    fn parse_errors() {
        check_err(
            "events.desk-7",
            r#"subject "events.desk-7" is not an event subject: expected three tokens, events.<agent>.<kind>"#,
        );
        check_err(
            "replies.desk-7.chat",
            r#"subject "replies.desk-7.chat" is not an event subject: expected it to start with "events""#,
        );
        check_err(
            "events.desk-7.fax",
            r#"subject "events.desk-7.fax" is not an event subject: unknown kind "fax", expected one of chat, activity, heartbeat, predict"#,
        );
    }
}

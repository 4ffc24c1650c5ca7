//! Every subject Ferry uses, built and parsed in one place.
//!
//! | subject                          | carries                                  |
//! |----------------------------------|------------------------------------------|
//! | `events.<agent>.<kind>`          | events from one agent (stream `EVENTS`)   |
//! | `replies.<agent>`                | replies to one agent (stream `REPLIES`)   |
//! | `live.replies.<agent>`           | each reply again once stored, with its stream position (the stream's RePublish; core NATS, what a connected agent reads) |
//! | `work.inference.<kind>`          | rules → inference hand-off (stream `WORK`)|
//! | `deadletter.<stream>.<consumer>` | poison messages with reasons (`DEADLETTER`)|
//! | `alerts.<rule>.<scope>.<value>`  | alerts, firing and resolved, JSON (stream `ALERTS`, [`crate::alert`]) |
//! | `ferry.svc.<role>.status`        | a worker's status endpoint (micro service)|
//! | `$JS.FERRY.API.…`               | an agent's JetStream API calls, imported from the `FERRY` account ([`AGENT_JS_API_PREFIX`]) |
//! | `shadow.<run>.<subject>`         | a shadow replay's output (`ferry replay --shadow`), core NATS only |
//! | `debug.replay`                   | default target of `ferry replay --to` (core NATS only) |

use async_nats::Subject;

use crate::{AgentId, EventKind};

/// Prefix of every event subject.
const EVENTS: &str = "events";
/// Prefix of every reply subject.
const REPLIES: &str = "replies";
/// Prefix the `REPLIES` stream puts before a reply's subject when it
/// republishes the stored reply.
const LIVE: &str = "live";
/// Prefix of every work hand-off subject.
const WORK: &str = "work";
/// Prefix of every dead-letter subject.
const DEADLETTER: &str = "deadletter";
/// Prefix of shadow replay output.
const SHADOW: &str = "shadow";
/// Prefix of every alert subject.
const ALERTS: &str = "alerts";
const ALERT_DELIVERIES: &str = "alert-deliveries";

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
    // `join`, not `format!`: a subject is made for every event and every reply.
    Subject::from([EVENTS, agent.as_str(), kind.as_str()].join("."))
}

/// `events.>`: every event.
pub fn all_events() -> Subject {
    Subject::from_static("events.>")
}

/// `events.*.<kind>`: every agent's events of one kind.
pub fn events_of_kind(kind: EventKind) -> Subject {
    Subject::from(format!("{EVENTS}.*.{kind}"))
}

/// `events.<agent>.>`: every event of one agent.
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
    Subject::from([REPLIES, agent.as_str()].join("."))
}

/// Whether `subject` is a reply subject (`replies.<agent>`).
pub fn is_reply(subject: &str) -> bool {
    subject.strip_prefix(REPLIES).is_some_and(|rest| rest.starts_with('.'))
}

/// `replies.>`: every reply.
pub fn all_replies() -> Subject {
    Subject::from_static("replies.>")
}

/// `live.replies.<agent>`: where the `REPLIES` stream republishes each reply
/// to `agent` once stored, with its stream sequence and the sequence of the
/// agent's previous reply (`Nats-Sequence`, `Nats-Last-Sequence`), so a
/// connected agent reads replies without a consumer and sees any it missed.
pub fn live_reply(agent: &AgentId) -> Subject {
    Subject::from(format!("{LIVE}.{REPLIES}.{agent}"))
}

/// `live.replies.>`: the destination of the `REPLIES` stream's RePublish
/// (each stored reply's subject with [`live_reply`]'s prefix).
pub fn all_live_replies() -> Subject {
    Subject::from_static("live.replies.>")
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

/// `$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>`: the
/// broker's notice that a message of that consumer used its last delivery
/// without an ack (its handler timed out, or its replica died every time).
pub fn max_deliveries_advisory(stream: &str, consumer: &str) -> Subject {
    Subject::from(format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{consumer}"))
}

/// `deadletter.>`: every dead letter.
pub fn all_dead_letters() -> Subject {
    Subject::from_static("deadletter.>")
}

/// `alerts.<rule>.<scope kind>.<scope token>`: one rule's alerts in one
/// scope (see [`crate::alert::Scope::token`]).
pub fn alert(rule: &str, scope: &crate::alert::Scope) -> Subject {
    Subject::from([ALERTS, rule, scope.kind.as_str(), &scope.token()].join("."))
}

/// `alerts.>`: every alert.
pub fn all_alerts() -> Subject {
    Subject::from_static("alerts.>")
}

/// `alert-deliveries.<rule>`: the webhook calls made for one rule's
/// alerts (the delivery log, [`crate::alert::Delivery`]), kept in `ALERTS`.
pub fn alert_delivery(rule: &str) -> Subject {
    Subject::from(format!("{ALERT_DELIVERIES}.{rule}"))
}

/// `alert-deliveries.>`: every webhook call's record.
pub fn all_alert_deliveries() -> Subject {
    Subject::from_static("alert-deliveries.>")
}

/// Whether `subject` is a delivery record's (`alert-deliveries.<rule>`),
/// not an alert's: both are kept in `ALERTS`.
pub fn is_alert_delivery(subject: &str) -> bool {
    subject.strip_prefix(ALERT_DELIVERIES).is_some_and(|rest| rest.starts_with('.'))
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

/// Whether a message published on `subject` is stored by one of Ferry's
/// streams (and so reaches workers or agents): `events.`, `replies.`,
/// `work.`, `deadletter.`, `alerts.`. `ferry replay --to` refuses such targets.
pub fn is_stored(subject: &str) -> bool {
    let first = subject.split('.').next().unwrap_or_default();
    [EVENTS, REPLIES, WORK, DEADLETTER, ALERTS].contains(&first) || first == "*" || first == ">"
}

/// `debug.replay`: where `ferry replay --to` sends events unless told otherwise.
pub fn replay_debug() -> Subject {
    Subject::from_static("debug.replay")
}

/// `shadow.<run>.<subject>`: where a worker in shadow mode publishes what it
/// would have published on `subject`. No stream captures `shadow.>`, so a
/// shadow run never reaches an agent or another worker.
pub fn shadow(run: &str, subject: &str) -> Subject {
    Subject::from(format!("{SHADOW}.{run}.{subject}"))
}

/// `shadow.<run>.>`: everything one shadow run published.
pub fn all_shadow(run: &str) -> Subject {
    Subject::from(format!("{SHADOW}.{run}.>"))
}

/// `shadow.<run>.end`: the marker a shadow replay publishes after its last
/// event. Messages from one connection arrive in order, so once a
/// subscriber of `shadow.<run>.>` sees it, it has seen the whole run.
pub fn shadow_end(run: &str) -> Subject {
    Subject::from(format!("{SHADOW}.{run}.end"))
}

/// The subject a shadow subject of `run` stands for, if it is one.
pub fn unshadow<'a>(run: &str, subject: &'a str) -> Option<&'a str> {
    subject
        .strip_prefix(SHADOW)?
        .strip_prefix('.')?
        .strip_prefix(run)?
        .strip_prefix('.')
}

/// Inbox prefix for an agent's connection (`_INBOX.<agent>`), so the broker
/// can allow each agent to subscribe to its own inboxes and nothing else.
pub fn agent_inbox_prefix(agent: &AgentId) -> String {
    format!("_INBOX.{agent}")
}

/// Inbox prefix for a worker role's connections (`_INBOX.<role>`), so the
/// broker can keep each role to its own inboxes.
pub fn role_inbox_prefix(role: &str) -> String {
    format!("_INBOX.{role}")
}

/// The micro-service name of a worker role (`ferry-rules`).
pub fn service_name(role: &str) -> String {
    format!("ferry-{role}")
}

/// The JetStream API prefix of an agent's connection. Each agent lives in
/// a NATS account of its own ([`crate::permissions::agent_account`] in
/// `nats.conf`), which has no JetStream: it
/// imports the few API calls an agent may make from the `FERRY` account
/// under this prefix (`$JS.FERRY.API.CONSUMER.MSG.NEXT.REPLIES.agent-<id>`
/// reaches `$JS.API.CONSUMER.MSG.NEXT.REPLIES.agent-<id>` there).
pub const AGENT_JS_API_PREFIX: &str = "$JS.FERRY.API";

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn agent(s: &str) -> AgentId {
        AgentId::new(s).unwrap()
    }

    #[test]
    fn shadow_subjects_round_trip_and_are_not_stored() {
        let s = shadow("r1", "replies.desk-7");
        assert_eq!(s.as_str(), "shadow.r1.replies.desk-7");
        assert_eq!(unshadow("r1", s.as_str()), Some("replies.desk-7"));
        assert_eq!(unshadow("r2", s.as_str()), None);
        assert_eq!(all_shadow("r1").as_str(), "shadow.r1.>");
        assert!(!is_stored(s.as_str()));
        assert!(!is_stored(replay_debug().as_str()));
        for stored in ["events.a.chat", "replies.a", "work.inference.chat", "deadletter.x.y", ">", "*.a"] {
            assert!(is_stored(stored), "{stored}");
        }
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
            r#"subject "events.desk-7.fax" is not an event subject: unknown kind "fax", expected one of chat, activity, heartbeat, predict, interaction"#,
        );
    }
}

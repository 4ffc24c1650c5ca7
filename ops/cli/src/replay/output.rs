//! What a worker did with one event, in a form two runs can be compared by: replies without their processing times, hand-offs with their rule.

use ferry_schema::codec::{self, Encoding, DEFAULT_MAX_PAYLOAD};
use ferry_schema::reply::ReplyId;
use ferry_schema::{headers, EventId};
use serde_json::{json, Value};

/// What a worker did with one event, in a form two runs can be compared by:
/// ids, timestamps and processing times left out.
#[derive(Debug, Clone)]
pub enum Output {
    /// A reply (its body as JSON, without `processing_ms`).
    Reply(Value),
    /// A hand-off to another role, with the rule that made it when known
    /// (a hand-off the inference worker already consumed from WORK is known
    /// by its reply, which does not name the rule).
    HandOff { subject: String, rule: Option<String> },
}

impl PartialEq for Output {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Reply(a), Self::Reply(b)) => a == b,
            (Self::HandOff { subject: s1, rule: r1 }, Self::HandOff { subject: s2, rule: r2 }) => {
                s1 == s2 && (r1 == r2 || r1.is_none() || r2.is_none())
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Reply(v) => write!(f, "reply {v}"),
            Self::HandOff { subject, rule: Some(rule) } => write!(f, "hand-off to {subject} (rule {rule})"),
            Self::HandOff { subject, rule: None } => write!(f, "hand-off to {subject} (answered by inference)"),
        }
    }
}

fn strip_times(v: &mut Value) {
    if let Value::Object(m) = v {
        m.remove("processing_ms");
        for x in m.values_mut() {
            strip_times(x);
        }
    }
}

/// A reply's comparable form and the event it answers.
pub(super) fn reply_output(h: Option<&async_nats::HeaderMap>, payload: &[u8]) -> Option<(EventId, ReplyId, Output)> {
    let enc = Encoding::of(h, payload).unwrap_or(Encoding::MsgPack);
    let reply = codec::decode_reply(payload, enc, DEFAULT_MAX_PAYLOAD).ok()?;
    let body = serde_json::from_str::<Value>(&codec::reply_body_json(&reply.body).ok()?).ok()?;
    let mut body = json!({ reply.kind().as_str(): body });
    strip_times(&mut body);
    Some((reply.in_reply_to, reply.id, Output::Reply(body)))
}

/// A hand-off's comparable form and the event it carries.
pub(super) fn handoff_output(subject_name: &str, h: Option<&async_nats::HeaderMap>) -> Option<(EventId, Output)> {
    let h = h?;
    let id = h.get(headers::MSG_ID)?.as_str().parse::<uuid::Uuid>().ok()?;
    let rule = h.get(headers::ROUTE_RULE).map(|v| v.to_string());
    Some((
        EventId(id),
        Output::HandOff {
            subject: subject_name.to_string(),
            rule,
        },
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn comparable_output_leaves_out_processing_time() {
        let mut v = json!({"chat": {"content": "hi", "processing_ms": 1.5, "answered_by": {"name": "r"}}});
        strip_times(&mut v);
        assert_eq!(v, json!({"chat": {"content": "hi", "answered_by": {"name": "r"}}}));
    }
}

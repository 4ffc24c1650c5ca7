//! Events typed by hand: the head fields a JSON event may leave out, filled in from its subject and its place in the stream.

use chrono::{DateTime, Utc};

use crate::{AgentId, EventId, EventKind, SCHEMA_VERSION};

/// Where a message sits in its stream, as JetStream delivered it: what the
/// `id` and `ts` of a JSON event typed by hand are made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamPosition {
    /// Its sequence in the stream.
    pub seq: u64,
    /// When the stream stored it.
    pub stored: DateTime<Utc>,
}

impl StreamPosition {
    /// The id of a hand-typed event stored here: a UUIDv7 whose time is
    /// `stored` (to the millisecond) and whose last 62 "random" bits hold
    /// `seq` (so any sequence below 2^62), so every consumer, and every
    /// redelivery, derives the same id, and ids still sort by time.
    pub fn event_id(&self) -> EventId {
        let millis = u64::try_from(self.stored.timestamp_millis()).unwrap_or(0);
        let mut tail = [0u8; 10];
        tail[2..].copy_from_slice(&self.seq.to_be_bytes());
        EventId(uuid::Builder::from_unix_timestamp_millis(millis, &tail).into_uuid())
    }
}

/// The head fields a JSON event may leave out.
pub(super) const FILLED: [&str; 5] = ["agent", "kind", "v", "id", "ts"];

/// A JSON event with the head fields it left out filled in (see
/// [`super::decode_event_message`]); `None` when it left none out that can be
/// filled, or is not a JSON object (the decoder then says what is wrong).
pub(super) fn fill_in(payload: &[u8], agent: &AgentId, kind: EventKind, at: Option<&StreamPosition>) -> Option<Vec<u8>> {
    let mut doc: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(payload).ok()?;
    let mut changed = false;
    let mut put = |field: &str, value: serde_json::Value| {
        if !doc.contains_key(field) {
            doc.insert(field.to_string(), value);
            changed = true;
        }
    };
    put("agent", agent.as_str().into());
    put("kind", kind.as_str().into());
    put("v", SCHEMA_VERSION.into());
    if let Some(at) = at {
        put("id", at.event_id().text().into());
        put("ts", at.stored.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true).into());
    }
    if !changed {
        return None;
    }
    serde_json::to_vec(&doc).ok()
}


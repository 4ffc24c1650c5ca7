//! Header names Ferry reads and writes, and helpers that build header maps.

use async_nats::header::IntoHeaderValue;
use async_nats::{HeaderMap, HeaderName};

use crate::Encoding;

/// Standard content type header; selects the codec.
pub const CONTENT_TYPE: &str = "Content-Type";
/// Content type for JSON payloads.
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// Content type for MessagePack payloads (also the default with no header).
pub const CONTENT_TYPE_MSGPACK: &str = "application/msgpack";
/// JetStream's de-duplication header; Ferry sets it to the event or reply id.
pub const MSG_ID: &str = "Nats-Msg-Id";
/// W3C trace context, carried from agent to reply.
pub const TRACEPARENT: &str = "traceparent";
/// Dead letters: the stable reason code (e.g. `missing_field`).
pub const DEAD_REASON_CODE: &str = "Ferry-Dead-Reason-Code";
/// Dead letters: the human-readable reason.
pub const DEAD_REASON: &str = "Ferry-Dead-Reason";
/// Dead letters: the stream the message came from.
pub const DEAD_STREAM: &str = "Ferry-Dead-Stream";
/// Dead letters: the consumer that gave up on it.
pub const DEAD_CONSUMER: &str = "Ferry-Dead-Consumer";
/// Dead letters: the original subject.
pub const DEAD_SUBJECT: &str = "Ferry-Dead-Subject";
/// Dead letters: the original stream sequence.
pub const DEAD_SEQUENCE: &str = "Ferry-Dead-Sequence";
/// Dead letters: how many times it was delivered.
pub const DEAD_DELIVERIES: &str = "Ferry-Dead-Deliveries";
/// Dead letters: the original body's size in bytes; when it is larger than
/// the dead letter's body, that body is only its first bytes
/// ([`crate::deadletter::EXCERPT_BYTES`]).
pub const DEAD_PAYLOAD_BYTES: &str = "Ferry-Dead-Payload-Bytes";
/// Every header a dead letter adds (so a re-drive can strip them).
pub const DEAD_HEADERS: [&str; 8] = [
    DEAD_REASON_CODE,
    DEAD_REASON,
    DEAD_STREAM,
    DEAD_CONSUMER,
    DEAD_SUBJECT,
    DEAD_SEQUENCE,
    DEAD_DELIVERIES,
    DEAD_PAYLOAD_BYTES,
];
/// Dead letters and re-drives: an original header in the broker's `Nats-`
/// namespace is kept under this prefix (`Ferry-Original-Nats-Msg-Id`).
pub const ORIGINAL_PREFIX: &str = "Ferry-Original-";

/// Whether the broker acts on header `name` (`Nats-Expected-Stream`,
/// `Nats-Msg-Id`, ...): header names are case-insensitive.
pub fn is_broker_header(name: &str) -> bool {
    name.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("Nats-"))
}

/// Set by a stream's RePublish: the message's sequence in the stream.
pub const STREAM_SEQUENCE: &str = "Nats-Sequence";
/// Set by a stream's RePublish: the sequence of the previous message stored
/// on the same subject (0 when there is none left).
pub const LAST_SUBJECT_SEQUENCE: &str = "Nats-Last-Sequence";

/// Where a republished message sits in its stream: its own sequence and
/// that of the previous message on its subject. `None` when the headers are
/// missing or malformed (the message was not republished by a stream).
pub fn republished_position(h: Option<&HeaderMap>) -> Option<(u64, u64)> {
    let h = h?;
    let seq = h.get(STREAM_SEQUENCE_NAME)?.as_str().parse().ok()?;
    let last = h.get(LAST_SUBJECT_SEQUENCE_NAME)?.as_str().parse().ok()?;
    Some((seq, last))
}

/// Work hand-offs: the rule that handed the event on.
pub const ROUTE_RULE: &str = "Ferry-Rule";

// The hot paths use these: async-nats validates a `&str` name, and
// allocates one it does not know, on every insert and every lookup.
pub(crate) const CONTENT_TYPE_NAME: HeaderName = HeaderName::from_static(CONTENT_TYPE);
const MSG_ID_NAME: HeaderName = HeaderName::from_static(MSG_ID);
const TRACEPARENT_NAME: HeaderName = HeaderName::from_static(TRACEPARENT);
const STREAM_SEQUENCE_NAME: HeaderName = HeaderName::from_static(STREAM_SEQUENCE);
const LAST_SUBJECT_SEQUENCE_NAME: HeaderName = HeaderName::from_static(LAST_SUBJECT_SEQUENCE);

/// Headers for a message Ferry publishes: its de-duplication id, its content
/// type when it is JSON, and the trace context when there is one.
///
/// MessagePack, the default, goes without `Content-Type`: every header is
/// parsed again by each process the message passes through (the broker
/// stores it, and rewrites it into the stream's republish), and leaving it
/// out cut CPU per event by about 5% in `ferry bench rules`.
pub fn for_publish(msg_id: impl IntoHeaderValue, enc: Encoding, traceparent: Option<&str>) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(MSG_ID_NAME, msg_id);
    if enc == Encoding::Json {
        h.insert(CONTENT_TYPE_NAME, enc.content_type());
    }
    if let Some(tp) = traceparent {
        h.insert(TRACEPARENT_NAME, tp);
    }
    h
}

/// The `traceparent` header of a message, if any.
pub fn traceparent(h: Option<&HeaderMap>) -> Option<&str> {
    h.and_then(|h| h.get(TRACEPARENT_NAME)).map(|v| v.as_str())
}

/// The trace id (32 hex digits) of a `traceparent` value, if it is well formed.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (Some(_version), Some(trace), Some(_span), Some(_flags)) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    (trace.len() == 32 && trace.bytes().all(|b| b.is_ascii_hexdigit())).then_some(trace)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod trace_tests {
    use super::*;

    #[test]
    fn a_republished_position_needs_both_sequences() {
        let mut h = HeaderMap::new();
        assert_eq!(republished_position(Some(&h)), None);
        h.insert(STREAM_SEQUENCE, "42");
        assert_eq!(republished_position(Some(&h)), None, "no previous sequence");
        h.insert(LAST_SUBJECT_SEQUENCE, "7");
        assert_eq!(republished_position(Some(&h)), Some((42, 7)));
        h.insert(LAST_SUBJECT_SEQUENCE, "seven");
        assert_eq!(republished_position(Some(&h)), None, "malformed");
        assert_eq!(republished_position(None), None);
    }

    #[test]
    fn published_headers_name_the_encoding_only_when_it_is_json() {
        for enc in [Encoding::Json, Encoding::MsgPack] {
            let h = for_publish("id-1", enc, Some("00-t-s-01"));
            assert_eq!(h.get(MSG_ID).map(|v| v.as_str()), Some("id-1"));
            assert_eq!(traceparent(Some(&h)), Some("00-t-s-01"));
            let ct = h.get(CONTENT_TYPE).map(|v| v.as_str());
            assert_eq!(ct, (enc == Encoding::Json).then_some(CONTENT_TYPE_JSON), "{enc:?}");
            // Whoever reads it back gets the encoding it was written in.
            assert_eq!(Encoding::from_headers(Some(&h)).unwrap(), enc);
        }
        assert_eq!(for_publish("id-2", Encoding::MsgPack, None).get(TRACEPARENT), None);
    }

    #[test]
    fn a_trace_id_is_read_from_a_well_formed_traceparent_only() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id(tp), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(trace_id("00-abc-def-01"), None);
        assert_eq!(trace_id("garbage"), None);
    }
}

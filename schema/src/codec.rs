//! Encoding and decoding of events and replies: MessagePack by default, JSON on request.
//!
//! On the wire an event is the map `{id, agent, kind, ts, v, body}` and a
//! reply is `{id, in_reply_to, agent, kind, ts, v, body}`. MessagePack uses
//! named fields (a map, like JSON), so both encodings carry the same document
//! and unknown fields are ignored in both.
//!
//! Decoding reads the document once (see `decode`): an unknown version is
//! reported as such even if the rest changed shape, and every other failure
//! gets its own typed error. MessagePack documents in Ferry's own field
//! order are read and written by a hand-written fast path (see `fast`) that
//! gives the same values and bytes and leaves everything else, errors
//! included, to that one general path. A JSON event typed by hand may leave
//! out its head fields, which are filled in from its subject and stream
//! position (see `by_hand`).

use async_nats::HeaderMap;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::reply::ReplyKind;
use crate::{
    headers, subject, AgentId, Envelope, EventBody, EventId, EventKind, InvalidAgentId, Reply,
    ReplyBody, ReplyId, SCHEMA_VERSION,
};

/// Default largest payload Ferry decodes (256 KiB). It sits below the
/// broker's `max_payload` so an oversized event reaches a worker and is
/// dead-lettered with a reason instead of being refused at publish time.
pub const DEFAULT_MAX_PAYLOAD: usize = 256 * 1024;

/// How a payload is encoded, chosen by the `Content-Type` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Encoding {
    /// MessagePack with named fields; the default when no `Content-Type` is set.
    #[default]
    MsgPack,
    /// JSON, when `Content-Type: application/json`.
    Json,
}

impl Encoding {
    /// The `Content-Type` value for this encoding.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::MsgPack => headers::CONTENT_TYPE_MSGPACK,
            Self::Json => headers::CONTENT_TYPE_JSON,
        }
    }

    /// Picks the encoding from a message's headers: JSON for
    /// `application/json` (parameters such as `; charset=utf-8` allowed),
    /// MessagePack when the header is absent or `application/msgpack`.
    pub fn from_headers(h: Option<&HeaderMap>) -> Result<Self, DecodeError> {
        let Some(value) = h.and_then(|h| h.get(headers::CONTENT_TYPE_NAME)) else {
            return Ok(Self::MsgPack);
        };
        let value = value.as_str();
        let mime = value.split(';').next().unwrap_or("").trim();
        let is = |m: &str| mime.eq_ignore_ascii_case(m);
        if is("application/json") {
            Ok(Self::Json)
        } else if is("application/msgpack") || is("application/x-msgpack") || is("application/vnd.msgpack") {
            Ok(Self::MsgPack)
        } else {
            Err(DecodeError::ContentType {
                value: value.to_string(),
            })
        }
    }
}

impl Encoding {
    /// The encoding of a message: from its `Content-Type` header when it
    /// has one (see [`Encoding::from_headers`]); without one, JSON when the
    /// payload's first byte other than whitespace is `{` (a document typed
    /// by hand, as `nats pub` sends it), else MessagePack. No Ferry
    /// MessagePack document starts with `{`: a map starts with a byte from
    /// 0x80 up, and 0x7b alone is the integer 123.
    pub fn of(h: Option<&HeaderMap>, payload: &[u8]) -> Result<Self, DecodeError> {
        if h.and_then(|h| h.get(headers::CONTENT_TYPE_NAME)).is_some() {
            return Self::from_headers(h);
        }
        let first = payload.iter().find(|b| !b.is_ascii_whitespace());
        Ok(if first == Some(&b'{') { Self::Json } else { Self::MsgPack })
    }
}

/// An event message decoded from its stream.
#[derive(Debug, Clone, PartialEq)]
pub struct EventMessage {
    /// The event.
    pub env: Envelope,
    /// The encoding it came in (replies go back in it).
    pub enc: Encoding,
    /// Whether fields were filled in from the subject and stream position
    /// (a JSON event typed by hand): its bytes are then not a whole event,
    /// and whoever passes it on encodes `env` instead.
    pub filled_in: bool,
}

/// Why a payload could not be turned into an event or reply. Each variant
/// has a stable [`code`](DecodeError::code) used as the dead-letter reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// The payload is larger than the configured limit.
    #[error("payload of {size} bytes exceeds the {limit}-byte limit")]
    TooLarge {
        /// Payload size.
        size: usize,
        /// The limit in force.
        limit: usize,
    },
    /// The `Content-Type` header names an encoding Ferry does not speak.
    #[error("unsupported Content-Type {value:?}: expected application/json or application/msgpack (or no header for MessagePack)")]
    ContentType {
        /// The header's value.
        value: String,
    },
    /// The bytes are not a document in the encoding at all.
    #[error("payload is not a {encoding} map: {detail}")]
    Malformed {
        /// Which encoding was tried.
        encoding: &'static str,
        /// The parser's complaint.
        detail: String,
    },
    /// A required field is absent.
    #[error("required field `{field}` is missing")]
    MissingField {
        /// Dotted path of the field, e.g. `body.text`.
        field: String,
    },
    /// A field is present but its value is of the wrong type or form.
    #[error("invalid field in {part}: {detail}")]
    InvalidField {
        /// `head` or `body`.
        part: &'static str,
        /// The parser's complaint, naming the field where it can.
        detail: String,
    },
    /// The schema version is not one this build understands.
    #[error("schema version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion {
        /// The version in the message.
        found: u64,
        /// The version this build reads.
        supported: u16,
    },
    /// The `kind` field names no known kind.
    #[error("unknown kind {kind:?}: expected one of {expected}")]
    UnknownKind {
        /// The kind given.
        kind: String,
        /// The accepted kinds.
        expected: String,
    },
    /// The `agent` field is not a valid agent id.
    #[error(transparent)]
    InvalidAgentId(#[from] InvalidAgentId),
    /// The subject and the body disagree about agent or kind.
    #[error("{field} in body is {body:?} but the subject {subject:?} says {expected:?}")]
    SubjectMismatch {
        /// `agent` or `kind`.
        field: &'static str,
        /// The value in the body.
        body: String,
        /// The value implied by the subject.
        expected: String,
        /// The subject.
        subject: String,
    },
    /// The subject is not an event subject.
    #[error(transparent)]
    Subject(#[from] subject::SubjectError),
}

impl DecodeError {
    /// The dead-letter reason code of the failure.
    pub fn reason(&self) -> crate::deadletter::ReasonCode {
        use crate::deadletter::ReasonCode as R;
        match self {
            Self::TooLarge { .. } => R::TooLarge,
            Self::ContentType { .. } => R::ContentType,
            Self::Malformed { .. } => R::Malformed,
            Self::MissingField { .. } => R::MissingField,
            Self::InvalidField { .. } => R::InvalidField,
            Self::UnsupportedVersion { .. } => R::UnsupportedVersion,
            Self::UnknownKind { .. } => R::UnknownKind,
            Self::InvalidAgentId(_) => R::InvalidAgentId,
            Self::SubjectMismatch { .. } => R::SubjectMismatch,
            Self::Subject(_) => R::BadSubject,
        }
    }

    /// The reason code as text (headers, metric labels).
    pub fn code(&self) -> &'static str {
        self.reason().as_str()
    }
}

/// Why a value could not be encoded. Ferry's own types always encode; this
/// exists so the rare failure (an oversized reply) is typed, not a panic.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// MessagePack serialisation failed.
    #[error("MessagePack encoding failed: {0}")]
    MsgPack(#[from] rmp_serde::encode::Error),
    /// JSON serialisation failed.
    #[error("JSON encoding failed: {0}")]
    Json(#[from] serde_json::Error),
}

/// Room for a typical event or reply, so encoding does not grow the buffer
/// several times.
const ENCODE_CAPACITY: usize = 512;

fn encode<T: Serialize>(value: &T, enc: Encoding) -> Result<Vec<u8>, EncodeError> {
    let mut buf = Vec::with_capacity(ENCODE_CAPACITY);
    match enc {
        Encoding::MsgPack => rmp_serde::encode::write_named(&mut buf, value)?,
        Encoding::Json => serde_json::to_writer(&mut buf, value)?,
    }
    Ok(buf)
}

#[derive(Serialize)]
struct WireEvent<'a, B> {
    id: EventId,
    agent: &'a AgentId,
    kind: EventKind,
    #[serde(serialize_with = "time::serialize")]
    ts: &'a DateTime<Utc>,
    v: u16,
    body: &'a B,
}

/// Which code reads and writes MessagePack documents: the fast path first
/// (always, outside tests), or the general serde path alone (tests compare
/// the two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Fast,
    #[cfg_attr(not(test), allow(dead_code))]
    General,
}

impl Route {
    fn fast(self, enc: Encoding) -> bool {
        self == Self::Fast && enc == Encoding::MsgPack
    }
}

/// Encodes an event in the given encoding.
pub fn encode_event(env: &Envelope, enc: Encoding) -> Result<Vec<u8>, EncodeError> {
    encode_event_by(env, enc, Route::Fast)
}

fn encode_event_by(env: &Envelope, enc: Encoding, route: Route) -> Result<Vec<u8>, EncodeError> {
    fn wire<'a, B>(env: &'a Envelope, body: &'a B) -> WireEvent<'a, B> {
        WireEvent {
            id: env.id,
            agent: &env.agent,
            kind: env.kind(),
            ts: &env.ts,
            v: SCHEMA_VERSION,
            body,
        }
    }
    fn encode_as<B: Serialize>(env: &Envelope, body: &B, enc: Encoding, route: Route) -> Result<Vec<u8>, EncodeError> {
        if route.fast(enc) {
            if let Some(done) = fast::write_event(env, body, ENCODE_CAPACITY) {
                return done;
            }
        }
        encode(&wire(env, body), enc)
    }
    match &env.body {
        EventBody::Chat(b) => encode_as(env, b, enc, route),
        EventBody::Activity(b) => encode_as(env, b, enc, route),
        EventBody::Heartbeat(b) => encode_as(env, b, enc, route),
        EventBody::Predict(b) => encode_as(env, b, enc, route),
        EventBody::Interaction(b) => encode_as(env, b, enc, route),
    }
}

/// An event's body alone as JSON text, the way the archive stores it
/// (`events.body`): the same fields as the `body` of the JSON encoding.
pub fn event_body_json(body: &EventBody) -> Result<String, EncodeError> {
    Ok(match body {
        EventBody::Chat(b) => serde_json::to_string(b)?,
        EventBody::Activity(b) => serde_json::to_string(b)?,
        EventBody::Heartbeat(b) => serde_json::to_string(b)?,
        EventBody::Predict(b) => serde_json::to_string(b)?,
        EventBody::Interaction(b) => serde_json::to_string(b)?,
    })
}

/// A reply's body alone as JSON text (`replies.body` in the archive).
pub fn reply_body_json(body: &ReplyBody) -> Result<String, EncodeError> {
    Ok(match body {
        ReplyBody::Chat(b) => serde_json::to_string(b)?,
        ReplyBody::Prediction(b) => serde_json::to_string(b)?,
        ReplyBody::Alert(b) => serde_json::to_string(b)?,
    })
}

#[derive(Serialize)]
struct WireReply<'a, B> {
    id: ReplyId,
    in_reply_to: EventId,
    agent: &'a AgentId,
    kind: ReplyKind,
    #[serde(serialize_with = "time::serialize")]
    ts: &'a DateTime<Utc>,
    v: u16,
    body: &'a B,
}

/// Encodes a reply in the given encoding (use the encoding of the event it answers).
pub fn encode_reply(r: &Reply, enc: Encoding) -> Result<Vec<u8>, EncodeError> {
    encode_reply_by(r, enc, Route::Fast)
}

fn encode_reply_by(r: &Reply, enc: Encoding, route: Route) -> Result<Vec<u8>, EncodeError> {
    fn wire<'a, B>(r: &'a Reply, body: &'a B) -> WireReply<'a, B> {
        WireReply {
            id: r.id,
            in_reply_to: r.in_reply_to,
            agent: &r.agent,
            kind: r.kind(),
            ts: &r.ts,
            v: SCHEMA_VERSION,
            body,
        }
    }
    fn encode_as<B: Serialize>(r: &Reply, body: &B, enc: Encoding, route: Route) -> Result<Vec<u8>, EncodeError> {
        if route.fast(enc) {
            if let Some(done) = fast::write_reply(r, body, ENCODE_CAPACITY) {
                return done;
            }
        }
        encode(&wire(r, body), enc)
    }
    match &r.body {
        ReplyBody::Chat(b) => encode_as(r, b, enc, route),
        ReplyBody::Prediction(b) => encode_as(r, b, enc, route),
        ReplyBody::Alert(b) => encode_as(r, b, enc, route),
    }
}

/// Where in the document a parse failed; decides how errors are classified.
#[derive(Clone, Copy)]
enum Part {
    /// The document itself or a key.
    Probe,
    Head,
    Body,
}

fn encoding_name(enc: Encoding) -> &'static str {
    match enc {
        Encoding::MsgPack => "MessagePack",
        Encoding::Json => "JSON",
    }
}

fn classify(enc: Encoding, part: Part, syntax: bool, msg: String) -> DecodeError {
    // Outside any field value (the document itself, a key) every error is
    // structural.
    if syntax || matches!(part, Part::Probe) {
        return DecodeError::Malformed {
            encoding: encoding_name(enc),
            detail: msg,
        };
    }
    // serde reports a missing field as "missing field `name`", whatever the format.
    if let Some(rest) = msg.strip_prefix("missing field `") {
        if let Some(field) = rest.split('`').next() {
            let field = match part {
                Part::Body if field != "body" => format!("body.{field}"),
                _ => field.to_string(),
            };
            return DecodeError::MissingField { field };
        }
    }
    DecodeError::InvalidField {
        part: match part {
            Part::Body => "body",
            _ => "head",
        },
        detail: msg,
    }
}

fn check_size(bytes: &[u8], limit: usize) -> Result<(), DecodeError> {
    if bytes.len() > limit {
        return Err(DecodeError::TooLarge {
            size: bytes.len(),
            limit,
        });
    }
    Ok(())
}

/// Decodes an event payload. `limit` is the largest accepted payload in bytes.
pub fn decode_event(bytes: &[u8], enc: Encoding, limit: usize) -> Result<Envelope, DecodeError> {
    decode_event_by(bytes, enc, limit, Route::Fast)
}

fn decode_event_by(bytes: &[u8], enc: Encoding, limit: usize, route: Route) -> Result<Envelope, DecodeError> {
    check_size(bytes, limit)?;
    if route.fast(enc) {
        if let Some(env) = fast::read_event(bytes) {
            return Ok(env);
        }
    }
    let doc = decode::read::<EventKind>(bytes, enc)?;
    let head = doc.validate(enc)?;
    let id = EventId(decode::uuid("id", head.id)?);
    Ok(Envelope {
        id,
        agent: AgentId::new(head.agent)?,
        ts: head.ts,
        body: head.body,
    })
}

/// Decodes an event message as it arrives from JetStream: picks the encoding
/// (see [`Encoding::of`]), decodes, and checks that the agent and kind in
/// the body are the ones the subject names (the subject is what the broker's
/// permissions vouch for).
///
/// A JSON event may leave out `agent` and `kind` (taken from the subject),
/// `v` (this build's version) and, given the message's position `at`, `id`
/// and `ts` ([`StreamPosition::event_id`], and the time the stream stored
/// it), so an event typed by hand needs only its `body`.
pub fn decode_event_message(
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: &[u8],
    limit: usize,
    at: Option<&StreamPosition>,
) -> Result<EventMessage, DecodeError> {
    let (agent, kind) = subject::parse_event(subject)?;
    let enc = Encoding::of(headers, payload)?;
    // A whole event is decoded once; only a JSON one that lacks a head
    // field is read again, completed.
    let (env, filled_in) = match decode_event(payload, enc, limit) {
        Ok(env) => (env, false),
        Err(DecodeError::MissingField { field }) if enc == Encoding::Json && by_hand::FILLED.contains(&field.as_str()) => {
            match by_hand::fill_in(payload, &agent, kind, at) {
                Some(doc) => (decode_event(&doc, enc, usize::MAX)?, true),
                None => return Err(DecodeError::MissingField { field }),
            }
        }
        Err(e) => return Err(e),
    };
    if env.agent != agent {
        return Err(DecodeError::SubjectMismatch {
            field: "agent",
            body: env.agent.to_string(),
            expected: agent.to_string(),
            subject: subject.to_string(),
        });
    }
    if env.kind() != kind {
        return Err(DecodeError::SubjectMismatch {
            field: "kind",
            body: env.kind().to_string(),
            expected: kind.to_string(),
            subject: subject.to_string(),
        });
    }
    Ok(EventMessage { env, enc, filled_in })
}

/// Decodes a reply payload.
pub fn decode_reply(bytes: &[u8], enc: Encoding, limit: usize) -> Result<Reply, DecodeError> {
    decode_reply_by(bytes, enc, limit, Route::Fast)
}

fn decode_reply_by(bytes: &[u8], enc: Encoding, limit: usize, route: Route) -> Result<Reply, DecodeError> {
    check_size(bytes, limit)?;
    if route.fast(enc) {
        if let Some(reply) = fast::read_reply(bytes) {
            return Ok(reply);
        }
    }
    let doc = decode::read::<ReplyKind>(bytes, enc)?;
    let head = doc.validate(enc)?;
    let id = ReplyId(decode::uuid("id", head.id)?);
    let in_reply_to = EventId(decode::uuid("in_reply_to", head.in_reply_to)?);
    Ok(Reply {
        id,
        in_reply_to,
        agent: AgentId::new(head.agent)?,
        ts: head.ts,
        body: head.body,
    })
}

mod by_hand;
mod decode;
mod fast;
mod time;

pub use by_hand::StreamPosition;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;

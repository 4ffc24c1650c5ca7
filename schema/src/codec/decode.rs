//! Single-pass decoding of events and replies, with typed errors.
//!
//! The document is read once, as a map. Head fields are read leniently
//! (a wrong type is remembered, not fatal) so that an unknown version is
//! reported as such even when the rest of the document changed shape. When
//! `v` and `kind` come before `body` (as Ferry writes them), the body is
//! decoded straight into its type; otherwise it is buffered and decoded once
//! the version and kind are known.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;

use chrono::{DateTime, Utc};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

use super::{classify, Encoding, Part};
use crate::event::{Activity, ChatMessage, Heartbeat, Interaction, PredictRequest};
use crate::reply::{AlertReply, ChatReply, PredictionReply, ReplyKind};
use crate::{DecodeError, EventBody, EventKind, ReplyBody, SCHEMA_VERSION};

/// The kinds of one document family (events or replies) and their bodies.
pub(super) trait Kinds: Copy {
    type Body;
    fn parse(s: &str) -> Option<Self>;
    fn expected() -> String;
    fn body<'de, D: Deserializer<'de>>(self, d: D) -> Result<Self::Body, D::Error>;
}

impl Kinds for EventKind {
    type Body = EventBody;
    fn parse(s: &str) -> Option<Self> {
        EventKind::parse(s)
    }
    fn expected() -> String {
        EventKind::ALL.map(EventKind::as_str).join(", ")
    }
    fn body<'de, D: Deserializer<'de>>(self, d: D) -> Result<EventBody, D::Error> {
        Ok(match self {
            EventKind::Chat => EventBody::Chat(ChatMessage::deserialize(d)?),
            EventKind::Activity => EventBody::Activity(Activity::deserialize(d)?),
            EventKind::Heartbeat => EventBody::Heartbeat(Heartbeat::deserialize(d)?),
            EventKind::Predict => EventBody::Predict(PredictRequest::deserialize(d)?),
            EventKind::Interaction => EventBody::Interaction(Interaction::deserialize(d)?),
        })
    }
}

impl Kinds for ReplyKind {
    type Body = ReplyBody;
    fn parse(s: &str) -> Option<Self> {
        ReplyKind::parse(s)
    }
    fn expected() -> String {
        ReplyKind::ALL.map(ReplyKind::as_str).join(", ")
    }
    fn body<'de, D: Deserializer<'de>>(self, d: D) -> Result<ReplyBody, D::Error> {
        Ok(match self {
            ReplyKind::Chat => ReplyBody::Chat(ChatReply::deserialize(d)?),
            ReplyKind::Prediction => ReplyBody::Prediction(PredictionReply::deserialize(d)?),
            ReplyKind::Alert => ReplyBody::Alert(AlertReply::deserialize(d)?),
        })
    }
}

/// A head value as read: the value, or what it was instead.
pub(super) enum Lenient<T> {
    Ok(T),
    Bad(String),
}

struct LenientStr;
impl<'de> Visitor<'de> for LenientStr {
    type Value = Lenient<Cow<'de, str>>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Lenient::Ok(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Lenient::Ok(Cow::Owned(v.to_string())))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Lenient::Ok(Cow::Owned(v)))
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Lenient::Bad(format!("boolean `{v}`")))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Lenient::Bad(format!("integer `{v}`")))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Lenient::Bad(format!("integer `{v}`")))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Lenient::Bad(format!("number `{v}`")))
    }
    fn visit_bytes<E>(self, _: &[u8]) -> Result<Self::Value, E> {
        Ok(Lenient::Bad("bytes".into()))
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Lenient::Bad("null".into()))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Lenient::Bad("null".into()))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Lenient::Bad("a sequence".into()))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Lenient::Bad("a map".into()))
    }
}

struct LenientStrSeed;
impl<'de> DeserializeSeed<'de> for LenientStrSeed {
    type Value = Lenient<Cow<'de, str>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(LenientStr)
    }
}

/// The version: an unsigned integer, anything else is remembered as bad.
struct LenientVersion;
impl<'de> DeserializeSeed<'de> for LenientVersion {
    type Value = Lenient<u64>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(LenientNumber)
    }
}

struct LenientNumber;
impl<'de> Visitor<'de> for LenientNumber {
    type Value = Lenient<u64>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an unsigned integer")
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Lenient::Ok(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(u64::try_from(v).map_or_else(|_| Lenient::Bad(format!("integer `{v}`")), Lenient::Ok))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Lenient::Bad(format!("number `{v}`")))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Lenient::Bad(format!("string {v:?}")))
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Lenient::Bad(format!("boolean `{v}`")))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Lenient::Bad("null".into()))
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Lenient::Bad("null".into()))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Lenient::Bad("a sequence".into()))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Lenient::Bad("a map".into()))
    }
}

enum Key {
    V,
    Id,
    InReplyTo,
    Agent,
    Kind,
    Ts,
    Body,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct K;
        impl Visitor<'_> for K {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E>(self, v: &str) -> Result<Key, E> {
                Ok(key(v))
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Key, E> {
                Ok(std::str::from_utf8(v).map_or(Key::Other, key))
            }
        }
        fn key(v: &str) -> Key {
            match v {
                "v" => Key::V,
                "id" => Key::Id,
                "in_reply_to" => Key::InReplyTo,
                "agent" => Key::Agent,
                "kind" => Key::Kind,
                "ts" => Key::Ts,
                "body" => Key::Body,
                _ => Key::Other,
            }
        }
        d.deserialize_identifier(K)
    }
}

enum BodyState<B> {
    Typed(B),
    Buffered(serde_json::Value),
}

/// Every top-level field of a document, as read.
pub(super) struct Doc<'de, K: Kinds> {
    v: Option<Lenient<u64>>,
    id: Option<Lenient<Cow<'de, str>>>,
    in_reply_to: Option<Lenient<Cow<'de, str>>>,
    agent: Option<Lenient<Cow<'de, str>>>,
    kind: Option<Lenient<Cow<'de, str>>>,
    ts: Option<Lenient<Cow<'de, str>>>,
    body: Option<BodyState<K::Body>>,
}

struct DocVisitor<'p, K> {
    part: &'p Cell<Part>,
    _k: PhantomData<K>,
}

impl<'de, K: Kinds> Visitor<'de> for DocVisitor<'_, K> {
    type Value = Doc<'de, K>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut doc = Doc::<K> {
            v: None,
            id: None,
            in_reply_to: None,
            agent: None,
            kind: None,
            ts: None,
            body: None,
        };
        loop {
            self.part.set(Part::Probe);
            let Some(key) = map.next_key::<Key>()? else {
                break;
            };
            self.part.set(Part::Head);
            match key {
                Key::V => doc.v = Some(map.next_value_seed(LenientVersion)?),
                Key::Id => doc.id = Some(map.next_value_seed(LenientStrSeed)?),
                Key::InReplyTo => doc.in_reply_to = Some(map.next_value_seed(LenientStrSeed)?),
                Key::Agent => doc.agent = Some(map.next_value_seed(LenientStrSeed)?),
                Key::Kind => doc.kind = Some(map.next_value_seed(LenientStrSeed)?),
                Key::Ts => doc.ts = Some(map.next_value_seed(LenientStrSeed)?),
                Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
                Key::Body => {
                    let kind = match (&doc.v, &doc.kind) {
                        (Some(Lenient::Ok(v)), Some(Lenient::Ok(k)))
                            if *v == u64::from(SCHEMA_VERSION) =>
                        {
                            K::parse(k)
                        }
                        _ => None,
                    };
                    self.part.set(Part::Body);
                    doc.body = Some(match kind {
                        Some(kind) => BodyState::Typed(map.next_value_seed(BodySeed(kind))?),
                        None => BodyState::Buffered(map.next_value()?),
                    });
                }
            }
        }
        Ok(doc)
    }
}

struct BodySeed<K>(K);
impl<'de, K: Kinds> DeserializeSeed<'de> for BodySeed<K> {
    type Value = K::Body;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<K::Body, D::Error> {
        self.0.body(d)
    }
}

/// Reads the whole document in one pass.
pub(super) fn read<'de, K: Kinds>(
    bytes: &'de [u8],
    enc: Encoding,
) -> Result<Doc<'de, K>, DecodeError> {
    let part = Cell::new(Part::Probe);
    let visitor = DocVisitor::<K> {
        part: &part,
        _k: PhantomData,
    };
    match enc {
        Encoding::Json => {
            let mut de = serde_json::Deserializer::from_slice(bytes);
            let doc = de
                .deserialize_map(visitor)
                .and_then(|d| de.end().map(|()| d));
            doc.map_err(|e| {
                let syntax = !matches!(e.classify(), serde_json::error::Category::Data);
                classify(enc, part.get(), syntax, e.to_string())
            })
        }
        Encoding::MsgPack => {
            let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
            de.deserialize_map(visitor).map_err(|e| {
                let syntax = !matches!(e, rmp_serde::decode::Error::Syntax(_));
                classify(enc, part.get(), syntax, e.to_string())
            })
        }
    }
}

fn required<T>(field: &str, v: Option<Lenient<T>>) -> Result<T, DecodeError> {
    match v {
        None => Err(DecodeError::MissingField {
            field: field.to_string(),
        }),
        Some(Lenient::Ok(t)) => Ok(t),
        Some(Lenient::Bad(what)) => Err(DecodeError::InvalidField {
            part: "head",
            detail: format!("`{field}`: invalid type: {what}, expected a string"),
        }),
    }
}

/// The validated common part of a document.
pub(super) struct Head<'de, K: Kinds> {
    /// The `id` field as read (parsed by the caller, whose id type it is).
    pub id: Option<Lenient<Cow<'de, str>>>,
    /// The `in_reply_to` field as read (replies only).
    pub in_reply_to: Option<Lenient<Cow<'de, str>>>,
    pub agent: Cow<'de, str>,
    pub ts: DateTime<Utc>,
    pub body: K::Body,
}

impl<'de, K: Kinds> Doc<'de, K> {
    /// Checks version, kind, time and body, in that order, and returns them.
    pub fn validate(self, enc: Encoding) -> Result<Head<'de, K>, DecodeError> {
        match self.v {
            None => return Err(DecodeError::MissingField { field: "v".into() }),
            Some(Lenient::Bad(what)) => {
                return Err(DecodeError::InvalidField {
                    part: "head",
                    detail: format!("`v`: invalid type: {what}, expected an unsigned integer"),
                })
            }
            Some(Lenient::Ok(v)) if v != u64::from(SCHEMA_VERSION) => {
                return Err(DecodeError::UnsupportedVersion {
                    found: v,
                    supported: SCHEMA_VERSION,
                })
            }
            Some(Lenient::Ok(_)) => {}
        }
        let agent = required("agent", self.agent)?;
        let kind_name = required("kind", self.kind)?;
        let kind = K::parse(&kind_name).ok_or_else(|| DecodeError::UnknownKind {
            kind: kind_name.to_string(),
            expected: K::expected(),
        })?;
        let ts_text = required("ts", self.ts)?;
        let ts = super::time::parse(&ts_text).map_err(|e| DecodeError::InvalidField {
                part: "head",
                detail: format!("`ts` {ts_text:?} is not an RFC 3339 time: {e}"),
            })?;
        let body = match self.body {
            None => {
                return Err(DecodeError::MissingField {
                    field: "body".into(),
                })
            }
            Some(BodyState::Typed(b)) => b,
            Some(BodyState::Buffered(value)) => kind.body(value).map_err(|e| {
                let syntax = !matches!(e.classify(), serde_json::error::Category::Data);
                classify(enc, Part::Body, syntax, e.to_string())
            })?,
        };
        Ok(Head {
            id: self.id,
            in_reply_to: self.in_reply_to,
            agent,
            ts,
            body,
        })
    }
}

/// Parses a required UUID field.
pub(super) fn uuid(
    field: &str,
    v: Option<Lenient<Cow<'_, str>>>,
) -> Result<uuid::Uuid, DecodeError> {
    let text = required(field, v)?;
    uuid::Uuid::parse_str(&text).map_err(|e| DecodeError::InvalidField {
        part: "head",
        detail: format!("{field} {text:?} is not a UUID: {e}"),
    })
}

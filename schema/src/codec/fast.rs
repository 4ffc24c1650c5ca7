//! MessagePack fast paths for documents in Ferry's own field order; anything else takes the serde path.
//!
//! Ferry writes every event as the map `{id, agent, kind, ts, v, body}` and
//! every reply as `{id, in_reply_to, agent, kind, ts, v, body}`, in that
//! order, keys as short strings and `v` as a one-byte integer. The serde
//! path reads any order, remembers a wrongly typed head field to report it
//! after the version, and names what is wrong; that generality cost about
//! half of a decode.
//!
//! Here the head is read and written by hand, and the body still goes
//! through serde (its derived types are the one definition of a body). The
//! contract is one-sided: [`read_event`] and [`read_reply`] return a value
//! only when the serde path would return the very same one, and `None` for
//! anything unexpected, valid or not, so the serde path decides it and
//! every error is exactly the one it gives. The writers produce the bytes
//! the serde path produces, byte for byte; the tests check both.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::decode::Kinds;
use super::{time, EncodeError};
use crate::reply::ReplyKind;
use crate::{AgentId, Envelope, EventId, EventKind, Reply, ReplyId, SCHEMA_VERSION};

/// MessagePack's marker of a map of `n` (< 16) entries.
const fn fixmap(n: u8) -> u8 {
    0x80 | n
}

/// The version as a MessagePack positive fixint, the one form `v` takes
/// here (the serde writer picks it for any value below 128).
const VERSION_BYTE: Option<u8> = if SCHEMA_VERSION < 0x80 {
    Some(SCHEMA_VERSION as u8)
} else {
    None
};

/// A document's head as read, before any field is checked.
struct Head<'a> {
    id: &'a str,
    in_reply_to: Option<&'a str>,
    agent: &'a str,
    kind: &'a str,
    ts: &'a str,
    /// The bytes from the body's value on.
    body: &'a [u8],
}

/// Skips `name` (written as a fixstr) at the front of `rest`.
fn key(rest: &mut &[u8], name: &str) -> Option<()> {
    let (&marker, after) = rest.split_first()?;
    let len = name.len();
    if len >= 32 || usize::from(marker) != 0xa0 | len || !after.starts_with(name.as_bytes()) {
        return None;
    }
    *rest = &after[len..];
    Some(())
}

/// Reads a string value at the front of `rest`.
fn string<'a>(rest: &mut &'a [u8]) -> Option<&'a str> {
    let (s, after) = rmp::decode::read_str_from_slice(*rest).ok()?;
    *rest = after;
    Some(s)
}

/// Reads `name` and its string value.
fn field<'a>(rest: &mut &'a [u8], name: &str) -> Option<&'a str> {
    key(rest, name)?;
    string(rest)
}

fn read_head(bytes: &[u8], reply: bool) -> Option<Head<'_>> {
    let (&marker, mut rest) = bytes.split_first()?;
    if marker != fixmap(if reply { 7 } else { 6 }) {
        return None;
    }
    let id = field(&mut rest, "id")?;
    let in_reply_to = if reply {
        Some(field(&mut rest, "in_reply_to")?)
    } else {
        None
    };
    let agent = field(&mut rest, "agent")?;
    let kind = field(&mut rest, "kind")?;
    let ts = field(&mut rest, "ts")?;
    key(&mut rest, "v")?;
    let (&v, after) = rest.split_first()?;
    if Some(v) != VERSION_BYTE {
        return None;
    }
    rest = after;
    key(&mut rest, "body")?;
    Some(Head {
        id,
        in_reply_to,
        agent,
        kind,
        ts,
        body: rest,
    })
}

/// The body, decoded by the same serde code as on the general path.
fn body<K: Kinds>(kind: K, bytes: &[u8]) -> Option<K::Body> {
    kind.body(&mut rmp_serde::Deserializer::from_read_ref(bytes)).ok()
}

/// An event in Ferry's field order, if it is one and valid; `None` sends it
/// down the serde path.
pub(super) fn read_event(bytes: &[u8]) -> Option<Envelope> {
    let head = read_head(bytes, false)?;
    let kind = EventKind::parse(head.kind)?;
    Some(Envelope {
        id: EventId(Uuid::parse_str(head.id).ok()?),
        agent: AgentId::new(head.agent).ok()?,
        ts: time::parse(head.ts).ok()?,
        body: body(kind, head.body)?,
    })
}

/// A reply in Ferry's field order, if it is one and valid; `None` sends it
/// down the serde path.
pub(super) fn read_reply(bytes: &[u8]) -> Option<Reply> {
    let head = read_head(bytes, true)?;
    let kind = ReplyKind::parse(head.kind)?;
    Some(Reply {
        id: ReplyId(Uuid::parse_str(head.id).ok()?),
        in_reply_to: EventId(Uuid::parse_str(head.in_reply_to?).ok()?),
        agent: AgentId::new(head.agent).ok()?,
        ts: time::parse(head.ts).ok()?,
        body: body(kind, head.body)?,
    })
}

/// Appends a string value as the serde writer does (the shortest header).
/// `None` past 255 bytes, which no head field reaches.
fn put_str(buf: &mut Vec<u8>, s: &str) -> Option<()> {
    let len = u8::try_from(s.len()).ok()?;
    if len < 32 {
        buf.push(0xa0 | len);
    } else {
        buf.extend_from_slice(&[0xd9, len]);
    }
    buf.extend_from_slice(s.as_bytes());
    Some(())
}

fn put_uuid(buf: &mut Vec<u8>, name: &str, id: &Uuid) -> Option<()> {
    put_str(buf, name)?;
    put_str(buf, id.hyphenated().encode_lower(&mut Uuid::encode_buffer()))
}

/// `agent`, `kind`, `ts`, `v` and the `body` key: the part every document shares.
fn put_common(buf: &mut Vec<u8>, agent: &AgentId, kind: &str, ts: &DateTime<Utc>) -> Option<()> {
    put_str(buf, "agent")?;
    put_str(buf, agent.as_str())?;
    put_str(buf, "kind")?;
    put_str(buf, kind)?;
    put_str(buf, "ts")?;
    let mut text = [0u8; time::MAX_LEN];
    let len = time::write(ts, &mut text)?;
    put_str(buf, std::str::from_utf8(&text[..len]).ok()?)?;
    put_str(buf, "v")?;
    buf.push(VERSION_BYTE?);
    put_str(buf, "body")
}

fn put_body<B: Serialize>(mut buf: Vec<u8>, body: &B) -> Result<Vec<u8>, EncodeError> {
    rmp_serde::encode::write_named(&mut buf, body)?;
    Ok(buf)
}

/// `env` with `body` (its body), as the serde writer writes it; `None` for
/// the rare head it leaves to that writer (a timestamp beyond year 9999).
pub(super) fn write_event<B: Serialize>(
    env: &Envelope,
    body: &B,
    capacity: usize,
) -> Option<Result<Vec<u8>, EncodeError>> {
    let mut buf = Vec::with_capacity(capacity);
    buf.push(fixmap(6));
    put_uuid(&mut buf, "id", &env.id.0)?;
    put_common(&mut buf, &env.agent, env.kind().as_str(), &env.ts)?;
    Some(put_body(buf, body))
}

/// `r` with `body` (its body), as the serde writer writes it; `None` for
/// the rare head it leaves to that writer.
pub(super) fn write_reply<B: Serialize>(r: &Reply, body: &B, capacity: usize) -> Option<Result<Vec<u8>, EncodeError>> {
    let mut buf = Vec::with_capacity(capacity);
    buf.push(fixmap(7));
    put_uuid(&mut buf, "id", &r.id.0)?;
    put_uuid(&mut buf, "in_reply_to", &r.in_reply_to.0)?;
    put_common(&mut buf, &r.agent, r.kind().as_str(), &r.ts)?;
    Some(put_body(buf, body))
}

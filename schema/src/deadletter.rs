//! Dead letters: a poison message's original bytes plus why it was given up.
//!
//! A dead letter is published to `deadletter.<stream>.<consumer>` (stored in
//! the `DEADLETTER` stream) with the original payload untouched up to
//! [`EXCERPT_BYTES`] (a larger one keeps its first bytes and its size; the
//! whole original stays in its stream, at the sequence the dead letter
//! names, while that stream keeps it), the original headers kept, and `Ferry-Dead-*` headers saying where it came from and why.
//! Original headers in the broker's `Nats-` namespace are renamed to
//! `Ferry-Original-Nats-*`: the broker acts on those names (a copied
//! `Nats-Expected-Stream: EVENTS` made `DEADLETTER` refuse the dead letter
//! for ever). Its `Nats-Msg-Id` is `<stream>:<sequence>:<consumer>`, so a
//! worker that dead-letters the same delivery twice stores it once.

use async_nats::HeaderMap;
use bytes::Bytes;

use crate::{headers, subject};

/// The most bytes of the original body a dead letter keeps. A flood of
/// large junk is dead-lettered once per consumer: kept whole, each would
/// cost `DEADLETTER` a copy of it.
pub const EXCERPT_BYTES: usize = 16 * 1024;

/// Why a message was given up: the `Ferry-Dead-Reason-Code` header of its
/// dead letter and the `code` label of the poison metrics. Stable: operators
/// filter on these (`ferry dlq --code`), and the table in
/// docs/wire-format.md lists exactly these (a test checks it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReasonCode {
    /// The payload is over the decode limit.
    TooLarge,
    /// `Content-Type` is neither JSON nor MessagePack.
    ContentType,
    /// Not a map in the chosen encoding.
    Malformed,
    /// A required field is absent.
    MissingField,
    /// A field has the wrong type or form.
    InvalidField,
    /// `v` is not a version this build reads.
    UnsupportedVersion,
    /// `kind` is not a known kind.
    UnknownKind,
    /// `agent` is not a valid agent id.
    InvalidAgentId,
    /// `agent` or `kind` in the body differs from the subject.
    SubjectMismatch,
    /// The subject is not an event subject.
    BadSubject,
    /// The worker could not encode its reply, or the archiver a body as JSON.
    Encode,
    /// A hand-off that is not the kind its queue carries.
    WrongKind,
    /// A retry was asked for on the last allowed delivery.
    MaxDeliver,
    /// PostgreSQL refused the data for good.
    Unstorable,
    /// The handler panicked.
    Panic,
    /// A webhook answered that it will never take this alert (a 4xx other than 429).
    WebhookRefused,
}

impl ReasonCode {
    /// Every code, in the order of the docs' table.
    pub const ALL: [Self; 16] = [
        Self::TooLarge,
        Self::ContentType,
        Self::Malformed,
        Self::MissingField,
        Self::InvalidField,
        Self::UnsupportedVersion,
        Self::UnknownKind,
        Self::InvalidAgentId,
        Self::SubjectMismatch,
        Self::BadSubject,
        Self::Encode,
        Self::WrongKind,
        Self::MaxDeliver,
        Self::Unstorable,
        Self::Panic,
        Self::WebhookRefused,
    ];

    /// The code as it appears in headers, metrics and the docs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::ContentType => "content_type",
            Self::Malformed => "malformed",
            Self::MissingField => "missing_field",
            Self::InvalidField => "invalid_field",
            Self::UnsupportedVersion => "unsupported_version",
            Self::UnknownKind => "unknown_kind",
            Self::InvalidAgentId => "invalid_agent_id",
            Self::SubjectMismatch => "subject_mismatch",
            Self::BadSubject => "bad_subject",
            Self::Encode => "encode",
            Self::WrongKind => "wrong_kind",
            Self::MaxDeliver => "max_deliver",
            Self::Unstorable => "unstorable",
            Self::Panic => "panic",
            Self::WebhookRefused => "webhook_refused",
        }
    }
}

impl std::fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a poison message came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Stream name.
    pub stream: String,
    /// Consumer name.
    pub consumer: String,
    /// Original subject.
    pub subject: String,
    /// Stream sequence.
    pub sequence: u64,
    /// Deliveries so far.
    pub deliveries: i64,
}

/// A dead letter ready to publish.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// `deadletter.<stream>.<consumer>`.
    pub subject: async_nats::Subject,
    /// Original headers plus the `Ferry-Dead-*` ones.
    pub headers: HeaderMap,
    /// The original payload, or its first [`EXCERPT_BYTES`].
    pub payload: Bytes,
}

impl DeadLetter {
    /// Builds the dead letter for `payload` (with its `original` headers) that
    /// failed with `code` / `reason`.
    pub fn new(
        origin: &Origin,
        original: Option<&HeaderMap>,
        payload: Bytes,
        code: ReasonCode,
        reason: &str,
    ) -> Self {
        let mut h = HeaderMap::new();
        if let Some(orig) = original {
            for (name, values) in orig.iter() {
                let name: &str = name.as_ref();
                let kept = match headers::is_broker_header(name) {
                    true => format!("{}{name}", headers::ORIGINAL_PREFIX),
                    false => name.to_string(),
                };
                for v in values {
                    h.append(kept.as_str(), v.clone());
                }
            }
        }
        h.insert(
            headers::MSG_ID,
            format!("{}:{}:{}", origin.stream, origin.sequence, origin.consumer).as_str(),
        );
        h.insert(headers::DEAD_REASON_CODE, code.as_str());
        // Header values are single lines.
        h.insert(
            headers::DEAD_REASON,
            reason.replace(['\r', '\n'], " ").as_str(),
        );
        h.insert(headers::DEAD_STREAM, origin.stream.as_str());
        h.insert(headers::DEAD_CONSUMER, origin.consumer.as_str());
        h.insert(headers::DEAD_SUBJECT, origin.subject.as_str());
        h.insert(headers::DEAD_SEQUENCE, origin.sequence.to_string().as_str());
        h.insert(
            headers::DEAD_DELIVERIES,
            origin.deliveries.to_string().as_str(),
        );
        h.insert(headers::DEAD_PAYLOAD_BYTES, payload.len().to_string().as_str());
        Self {
            subject: subject::dead_letter(&origin.stream, &origin.consumer),
            headers: h,
            payload: payload.slice(..payload.len().min(EXCERPT_BYTES)),
        }
    }
}

/// The body of a [`subject::max_deliveries_advisory`] that Ferry reads.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct MaxDeliveriesAdvisory {
    /// The stream.
    pub stream: String,
    /// The consumer.
    pub consumer: String,
    /// The message's stream sequence.
    pub stream_seq: u64,
    /// How often it was delivered.
    pub deliveries: i64,
}


#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn origin() -> Origin {
        Origin {
            stream: "EVENTS".into(),
            consumer: "rules".into(),
            subject: "events.desk-1.chat".into(),
            sequence: 7,
            deliveries: 1,
        }
    }

    /// The broker acts on `Nats-` headers: none of the original's may reach
    /// `DEADLETTER` under its own name, and none is lost.
    #[test]
    fn original_broker_headers_are_renamed_and_the_rest_kept() {
        let mut orig = HeaderMap::new();
        orig.insert("Nats-Expected-Stream", "EVENTS");
        orig.insert("Nats-Msg-Id", "0190-abc");
        orig.insert("nats-expected-last-sequence", "3");
        orig.insert("Content-Type", "application/json");
        orig.insert("traceparent", "00-abc-def-01");
        let dl = DeadLetter::new(&origin(), Some(&orig), Bytes::from_static(b"{"), ReasonCode::Malformed, "bad\nline");
        let h = &dl.headers;
        let get = |n: &str| h.get(n).map(|v| v.as_str().to_string());
        assert_eq!(get("Nats-Expected-Stream"), None);
        assert_eq!(get("nats-expected-last-sequence"), None);
        assert_eq!(get("Ferry-Original-Nats-Expected-Stream").as_deref(), Some("EVENTS"));
        assert_eq!(get("Ferry-Original-Nats-Msg-Id").as_deref(), Some("0190-abc"));
        assert_eq!(get("Ferry-Original-nats-expected-last-sequence").as_deref(), Some("3"));
        assert_eq!(get("Content-Type").as_deref(), Some("application/json"));
        assert_eq!(get("traceparent").as_deref(), Some("00-abc-def-01"));
        assert_eq!(get(headers::MSG_ID).as_deref(), Some("EVENTS:7:rules"));
        assert_eq!(get(headers::DEAD_REASON_CODE).as_deref(), Some("malformed"));
        let broker: Vec<String> = h
            .iter()
            .map(|(n, _)| AsRef::<str>::as_ref(n).to_string())
            .filter(|n| headers::is_broker_header(n))
            .collect();
        assert_eq!(broker, [headers::MSG_ID], "only the dead letter's own id is a broker header");
    }

    /// A large body is cut to its first bytes, with its size kept; a small
    /// one is kept whole.
    #[test]
    fn a_large_body_keeps_an_excerpt_and_its_size() {
        let big = Bytes::from(vec![b'x'; 1024 * 1024]);
        let dl = DeadLetter::new(&origin(), None, big, ReasonCode::TooLarge, "1 MiB");
        assert_eq!(dl.payload.len(), EXCERPT_BYTES);
        assert_eq!(dl.headers.get(headers::DEAD_PAYLOAD_BYTES).unwrap().as_str(), "1048576");
        let small = DeadLetter::new(&origin(), None, Bytes::from_static(b"{}"), ReasonCode::Malformed, "x");
        assert_eq!(&small.payload[..], b"{}");
        assert_eq!(small.headers.get(headers::DEAD_PAYLOAD_BYTES).unwrap().as_str(), "2");
    }

    /// The advisory as nats-server 2.9 and 2.10 write it.
    #[test]
    fn max_deliveries_advisory_parses() {
        let json = r#"{"type":"io.nats.jetstream.advisory.v1.max_deliver","id":"x","timestamp":"2026-12-04T01:00:00Z","stream":"EVENTS","consumer":"rules","stream_seq":42,"deliveries":5}"#;
        let a: MaxDeliveriesAdvisory = serde_json::from_str(json).unwrap();
        assert_eq!(a, MaxDeliveriesAdvisory { stream: "EVENTS".into(), consumer: "rules".into(), stream_seq: 42, deliveries: 5 });
    }
}

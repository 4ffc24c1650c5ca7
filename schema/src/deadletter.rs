//! Dead letters: a poison message's original bytes plus why it was given up.
//!
//! A dead letter is published to `deadletter.<stream>.<consumer>` (stored in
//! the `DEADLETTER` stream) with the original payload untouched, the original
//! headers kept, and `Ferry-Dead-*` headers saying where it came from and why.
//! Its `Nats-Msg-Id` is `<stream>:<sequence>:<consumer>`, so a worker that
//! dead-letters the same delivery twice stores it once.

use async_nats::HeaderMap;
use bytes::Bytes;

use crate::{headers, subject};

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
    /// The original payload.
    pub payload: Bytes,
}

impl DeadLetter {
    /// Builds the dead letter for `payload` (with its `original` headers) that
    /// failed with `code` / `reason`.
    pub fn new(
        origin: &Origin,
        original: Option<&HeaderMap>,
        payload: Bytes,
        code: &str,
        reason: &str,
    ) -> Self {
        let mut h = HeaderMap::new();
        if let Some(orig) = original {
            for (name, values) in orig.iter() {
                if AsRef::<str>::as_ref(name) == headers::MSG_ID {
                    continue;
                }
                for v in values {
                    h.append(name.clone(), v.clone());
                }
            }
        }
        h.insert(
            headers::MSG_ID,
            format!("{}:{}:{}", origin.stream, origin.sequence, origin.consumer).as_str(),
        );
        h.insert(headers::DEAD_REASON_CODE, code);
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
        Self {
            subject: subject::dead_letter(&origin.stream, &origin.consumer),
            headers: h,
            payload,
        }
    }
}

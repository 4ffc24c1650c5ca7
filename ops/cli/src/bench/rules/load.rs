//! The load of `ferry bench rules` and its measurement: the chats sent, their pacing, and the recorder that times each reply against its event's send.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_schema::event::{ChatMessage, ChatType, MessageType};
use ferry_schema::{headers, AgentId, Encoding, Envelope, EventBody, EventId};
use futures::{Stream, StreamExt};
use hdrhistogram::Histogram;

use super::Measured;

/// When each event still unanswered was sent.
pub(super) type Sent = Arc<Mutex<HashMap<EventId, Instant>>>;

/// `n` chats from `agent`, which the bench rules answer.
pub(super) fn events(n: usize, agent: &AgentId) -> Vec<Envelope> {
    (0..n)
        .map(|i| {
            Envelope::new(
                agent.clone(),
                EventBody::Chat(ChatMessage {
                    chat: "bench".into(),
                    chat_type: ChatType::Direct,
                    sender: "bench".into(),
                    text: format!("message number {i}"),
                    msg_type: MessageType::Text,
                }),
            )
        })
        .collect()
}

/// Yields `items` at `rate` per second (or as fast as taken), stamping each
/// one's event's send time in `sent` as it is yielded.
pub(super) fn paced<T: Send + 'static>(
    items: Vec<(EventId, T)>,
    rate: Option<f64>,
    sent: Sent,
) -> impl Stream<Item = T> + Send + 'static {
    // The clock starts at the first send, not when the stream is built.
    let start = Arc::new(std::sync::OnceLock::new());
    futures::stream::iter(items.into_iter().enumerate()).then(move |(i, (id, item))| {
        let (sent, start) = (sent.clone(), start.clone());
        async move {
            if let Some(r) = rate {
                let start = *start.get_or_init(Instant::now);
                let due = start + Duration::from_secs_f64(i as f64 / r);
                tokio::time::sleep_until(due.into()).await;
            }
            if let Ok(mut s) = sent.lock() {
                s.insert(id, Instant::now());
            }
            item
        }
    })
}

/// Records each reply where it is received: its latency from its event's
/// send, and the window from the first send to the last reply.
#[derive(Debug)]
pub(super) struct Recorder {
    sent: Sent,
    hist: Histogram<u64>,
    pub(super) received: usize,
    first: Option<Instant>,
    last: Instant,
}

impl Recorder {
    pub(super) fn new(sent: Sent) -> anyhow::Result<Self> {
        Ok(Self {
            sent,
            hist: Histogram::new(3)?,
            received: 0,
            first: None,
            last: Instant::now(),
        })
    }

    /// A reply to event `id` arrived now; one not sent (or answered twice) does not count.
    pub(super) fn record(&mut self, id: EventId) {
        let now = Instant::now();
        let start = self.sent.lock().ok().and_then(|mut s| s.remove(&id));
        if let Some(t) = start {
            let us = u64::try_from(now.duration_since(t).as_micros()).unwrap_or(u64::MAX);
            let _ = self.hist.record(us.max(1));
            self.received += 1;
            self.first.get_or_insert(t);
            self.last = now;
        }
    }

    /// Rate and latency so far; the CPU columns are the scenario's to fill.
    pub(super) fn result(&self) -> Measured {
        let elapsed = self
            .first
            .map(|f| self.last.duration_since(f).as_secs_f64())
            .unwrap_or(f64::INFINITY);
        Measured {
            events_per_s: self.received as f64 / elapsed,
            p50_ms: self.hist.value_at_quantile(0.5) as f64 / 1e3,
            p99_ms: self.hist.value_at_quantile(0.99) as f64 / 1e3,
            broker_us: f64::NAN,
            clients_us: f64::NAN,
            after: (f64::NAN, f64::NAN, f64::NAN),
        }
    }
}

/// The id of the event a reply on a plain subscription answers: (a)'s
/// republisher copies the event's `Nats-Msg-Id`; the rules worker's reply
/// says it in its body.
pub(super) fn answered_event(m: &async_nats::Message, from_worker: bool) -> Option<EventId> {
    if from_worker {
        let enc = Encoding::from_headers(m.headers.as_ref()).ok()?;
        return ferry_schema::codec::decode_reply(&m.payload, enc, ferry_schema::codec::DEFAULT_MAX_PAYLOAD)
            .ok()
            .map(|r| r.in_reply_to);
    }
    m.headers
        .as_ref()
        .and_then(|h| h.get(headers::MSG_ID))
        .and_then(|v| v.as_str().parse::<EventId>().ok())
}

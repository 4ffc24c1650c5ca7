//! Publishing from a handler: wait for JetStream's ack (or, in shadow mode, only publish under `shadow.<run>.`), turn failures into outcomes.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use ferry_schema::codec::{self, Encoding};
use ferry_schema::{headers, subject, Envelope, Reply, ReplyBody};

use super::Outcome;

/// How long to wait before retrying after a failed publish.
pub const PUBLISH_RETRY: Duration = Duration::from_millis(500);

/// Where a handler's replies and hand-offs go.
#[derive(Debug, Clone)]
pub enum Publisher {
    /// The real thing: publish to JetStream and wait for the stream's ack.
    JetStream(jetstream::Context),
    /// Shadow mode (`ferry replay --shadow`): every subject is rewritten to
    /// `shadow.<run>.<subject>` and published with core NATS. No stream
    /// captures those subjects, so nothing reaches an agent or a worker.
    Shadow {
        /// The connection to publish on.
        client: async_nats::Client,
        /// The replay run's name (one subject token).
        run: String,
    },
}

impl From<jetstream::Context> for Publisher {
    fn from(js: jetstream::Context) -> Self {
        Self::JetStream(js)
    }
}

impl Publisher {
    /// Publishes and, for JetStream, waits for the stream's ack: `Done` once
    /// stored, a retry otherwise (the message is redelivered and published
    /// again with the same `Nats-Msg-Id`, which the stream de-duplicates).
    pub async fn publish(&self, subject: async_nats::Subject, headers: async_nats::HeaderMap, payload: Bytes) -> Outcome {
        // Boxed: async-nats's publish futures are most of a kilobyte, and
        // every async caller up the chain would otherwise hold (and move) a
        // copy of them.
        Box::pin(self.publish_unboxed(subject, headers, payload)).await
    }

    async fn publish_unboxed(&self, subject: async_nats::Subject, headers: async_nats::HeaderMap, payload: Bytes) -> Outcome {
        match self {
            Self::JetStream(js) => match js.publish_with_headers(subject, headers, payload).await {
                Ok(ack) => match ack.await {
                    Ok(_) => Outcome::Done,
                    Err(e) => Outcome::retry(PUBLISH_RETRY, format!("publish not acknowledged: {e}")),
                },
                Err(e) => Outcome::retry(PUBLISH_RETRY, format!("publish failed: {e}")),
            },
            Self::Shadow { client, run } => {
                let shadow = subject::shadow(run, subject.as_str());
                match client.publish_with_headers(shadow, headers, payload).await {
                    Ok(()) => Outcome::Done,
                    Err(e) => Outcome::retry(PUBLISH_RETRY, format!("shadow publish failed: {e}")),
                }
            }
        }
    }
}

/// A message ready to publish: subject, headers, payload.
#[derive(Debug)]
pub struct Outgoing {
    /// Where it goes.
    pub subject: async_nats::Subject,
    /// Its headers (`Nats-Msg-Id`, `Content-Type`, trace context).
    pub headers: async_nats::HeaderMap,
    /// The encoded body.
    pub payload: Bytes,
}

impl Outgoing {
    /// `responder`'s reply to `env`, for the agent's reply subject, in the
    /// event's encoding, carrying its trace context; a poison outcome when
    /// the reply cannot be encoded.
    pub fn reply(
        responder: &str,
        env: &Envelope,
        enc: Encoding,
        traceparent: Option<&str>,
        body: ReplyBody,
    ) -> Result<Self, Outcome> {
        let reply = Reply::new(responder, env.id, env.agent.clone(), body);
        let payload = codec::encode_reply(&reply, enc).map_err(|e| Outcome::Poison {
            code: ferry_schema::deadletter::ReasonCode::Encode,
            reason: e.to_string(),
        })?;
        Ok(Self {
            subject: subject::reply(&env.agent),
            headers: headers::for_publish(reply.id.text(), enc, traceparent),
            payload: payload.into(),
        })
    }

    /// Publishes it through `publisher`.
    pub async fn publish(self, publisher: &Publisher) -> Outcome {
        publisher.publish(self.subject, self.headers, self.payload).await
    }
}

/// Publishes `responder`'s reply to `env` on the agent's reply subject, in
/// the event's encoding, carrying its trace context.
pub async fn reply(
    publisher: &Publisher,
    responder: &str,
    env: &Envelope,
    enc: Encoding,
    traceparent: Option<&str>,
    body: ReplyBody,
) -> Outcome {
    match Outgoing::reply(responder, env, enc, traceparent, body) {
        Ok(out) => out.publish(publisher).await,
        Err(poison) => poison,
    }
}

/// Milliseconds since `started`, as replies record them: whole
/// microseconds, so a reply shows `0.02` or `7543.843`, not
/// `0.019976999999999998`.
pub fn elapsed_ms(started: Instant) -> f64 {
    micros_as_ms(started.elapsed())
}

/// `d` in milliseconds, rounded as [`elapsed_ms`] rounds.
pub fn ms(d: Duration) -> f64 {
    micros_as_ms(d)
}

/// How long `msg` waited in its stream before this worker took it up,
/// milliseconds: now less the time the broker stored it (0 when the
/// broker's clock is ahead, or the message has no JetStream metadata).
pub fn queued_ms(msg: &async_nats::jetstream::Message) -> f64 {
    let Ok(info) = msg.info() else { return 0.0 };
    let waited = time::OffsetDateTime::now_utc() - info.published;
    waited.try_into().map_or(0.0, micros_as_ms)
}

fn micros_as_ms(d: Duration) -> f64 {
    // Exact below 2^53 µs (285 years); the division gives the shortest
    // decimal that reads back as the same f64.
    d.as_micros() as f64 / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processing_time_is_whole_microseconds() {
        let ms = micros_as_ms(Duration::from_nanos(19_976_999));
        assert_eq!(ms, 19.976);
        assert_eq!(ms.to_string(), "19.976");
        assert_eq!(micros_as_ms(Duration::from_nanos(7_543_843_263_000)).to_string(), "7543843.263");
        assert_eq!(micros_as_ms(Duration::from_nanos(999)), 0.0);
    }
}

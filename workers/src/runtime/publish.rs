//! Publishing from a handler: wait for JetStream's ack, turn failures into outcomes.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use ferry_schema::codec::{self, Encoding};
use ferry_schema::{headers, subject, Envelope, Reply, ReplyBody};

use super::Outcome;

/// How long to wait before retrying after a failed publish.
pub const PUBLISH_RETRY: Duration = Duration::from_millis(500);

/// Publishes and waits for the stream's ack: `Done` once stored, a retry
/// otherwise (the message is redelivered and published again with the same
/// `Nats-Msg-Id`, which the stream de-duplicates).
pub async fn publish(
    js: &jetstream::Context,
    subject: async_nats::Subject,
    headers: async_nats::HeaderMap,
    payload: Bytes,
) -> Outcome {
    match js.publish_with_headers(subject, headers, payload).await {
        Ok(ack) => match ack.await {
            Ok(_) => Outcome::Done,
            Err(e) => Outcome::retry(PUBLISH_RETRY, format!("publish not acknowledged: {e}")),
        },
        Err(e) => Outcome::retry(PUBLISH_RETRY, format!("publish failed: {e}")),
    }
}

/// Publishes `responder`'s reply to `env` on the agent's reply subject, in
/// the event's encoding, carrying its trace context.
pub async fn reply(
    js: &jetstream::Context,
    responder: &str,
    env: &Envelope,
    enc: Encoding,
    traceparent: Option<&str>,
    body: ReplyBody,
) -> Outcome {
    let reply = Reply::new(responder, env.id, env.agent.clone(), body);
    let payload = match codec::encode_reply(&reply, enc) {
        Ok(p) => p,
        Err(e) => {
            return Outcome::Poison {
                code: "encode",
                reason: e.to_string(),
            }
        }
    };
    let h = headers::for_publish(&reply.id.to_string(), enc, traceparent);
    publish(js, subject::reply(&env.agent), h, payload.into()).await
}

/// Milliseconds since `started`, as replies record them.
pub fn elapsed_ms(started: Instant) -> f64 {
    started.elapsed().as_secs_f64() * 1e3
}

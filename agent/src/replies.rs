//! Receiving replies: the agent's own durable consumer, de-duplicated by reply id.
//!
//! Replies live in the `REPLIES` stream, so those published while the agent
//! was offline wait in its consumer `agent-<id>`. Replies are handed on in
//! stream order and acked only after that, cumulatively (the consumer's ack
//! policy is `All`): every few replies (at most 32), or when no more
//! are waiting. One delivered again (ack lost, agent restarted) is
//! recognised by its id and not handed on twice.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use async_nats::jetstream::{consumer::pull, AckKind};
use ferry_schema::codec::{decode_reply, DEFAULT_MAX_PAYLOAD};
use ferry_schema::topology::{agent_replies_consumer_name, REPLIES_STREAM};
use ferry_schema::{Encoding, Reply, ReplyId};
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::Agent;

/// How many reply ids the agent remembers for de-duplication.
pub const SEEN_CAPACITY: usize = 10_000;

/// Why the reply receiver stopped.
#[derive(Debug, thiserror::Error)]
pub enum RepliesError {
    /// The agent's reply consumer does not exist or may not be read.
    #[error("cannot open reply consumer {consumer:?}: {source} (run `ferry provision` or `ferry agent add`)")]
    Consumer {
        /// Consumer name.
        consumer: String,
        /// The broker's answer.
        #[source]
        source: async_nats::jetstream::stream::ConsumerError,
    },
    /// Pulling failed for good.
    #[error("pulling replies failed: {0}")]
    Pull(String),
}

/// A bounded memory of reply ids already handed on (oldest forgotten first).
#[derive(Debug, Default)]
pub struct Seen {
    order: VecDeque<ReplyId>,
    set: HashSet<ReplyId>,
}

impl Seen {
    /// Records `id`; false when it was already there.
    pub fn insert(&mut self, id: ReplyId) -> bool {
        if !self.set.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > SEEN_CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

impl Agent {
    /// Pulls this agent's replies until `shutdown`, sending each new one to
    /// `tx` (a bounded channel: a slow consumer slows the pulling) and
    /// acking it after the send.
    pub async fn receive_replies(
        &self,
        tx: mpsc::Sender<Reply>,
        shutdown: CancellationToken,
    ) -> Result<(), RepliesError> {
        self.handle_replies(
            move |reply| {
                let tx = tx.clone();
                Box::pin(async move { tx.send(reply).await.is_ok() })
            },
            shutdown,
        )
        .await
    }

    /// Pulls this agent's replies until `shutdown`, awaiting `handle` for
    /// each new one before it counts for the ack, so a reply is acked only
    /// after it was acted on. `handle` returns false to stop (the reply it
    /// was given is then left for next time).
    pub async fn handle_replies<H>(&self, mut handle: H, shutdown: CancellationToken) -> Result<(), RepliesError>
    where
        H: FnMut(Reply) -> futures::future::BoxFuture<'static, bool> + Send,
    {
        let name = agent_replies_consumer_name(&self.cfg.agent);
        let consumer = self
            .js
            .get_consumer_from_stream::<pull::Config, _, _>(&name, REPLIES_STREAM)
            .await
            .map_err(|source| RepliesError::Consumer {
                consumer: name.clone(),
                source,
            })?;
        let mut seen = Seen::default();
        // Well below the consumer's max_ack_pending, so acks never stall delivery.
        let ack_every = (self.cfg.reply_batch / 4).clamp(1, 32);
        let mut unacked = 0usize;
        let mut last: Option<async_nats::jetstream::Message> = None;
        'pulling: while !shutdown.is_cancelled() {
            let mut messages = match consumer
                .stream()
                .max_messages_per_batch(self.cfg.reply_batch.max(1))
                .expires(Duration::from_secs(30))
                .heartbeat(Duration::from_secs(5))
                .messages()
                .await
            {
                Ok(m) => m,
                Err(error) => {
                    tracing::warn!(%error, "cannot pull replies; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break 'pulling,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'pulling,
                    }
                }
            };
            // A message taken early to see whether more were waiting.
            let mut ready = None;
            loop {
                let next = match ready.take() {
                    Some(n) => n,
                    None => tokio::select! {
                        _ = shutdown.cancelled() => break 'pulling,
                        n = messages.next() => n,
                    },
                };
                let msg = match next {
                    Some(Ok(m)) => m,
                    Some(Err(error)) => {
                        use async_nats::jetstream::consumer::pull::MessagesErrorKind as K;
                        if matches!(error.kind(), K::ConsumerDeleted) {
                            ack_latest(&mut last, &mut unacked).await;
                            return Err(RepliesError::Pull(error.to_string()));
                        }
                        tracing::warn!(%error, "reply pull error; continuing");
                        continue;
                    }
                    None => continue 'pulling,
                };
                let decoded = Encoding::from_headers(msg.headers.as_ref())
                    .and_then(|enc| decode_reply(&msg.payload, enc, DEFAULT_MAX_PAYLOAD));
                match decoded {
                    Err(error) => {
                        // Terminated on its own, so the cumulative ack of a
                        // later reply cannot hide it.
                        tracing::error!(%error, subject = %msg.subject, "undecodable reply dropped");
                        if let Err(error) = msg.ack_with(AckKind::Term).await {
                            tracing::warn!(%error, "term of undecodable reply failed");
                        }
                        continue;
                    }
                    Ok(reply) if !seen.insert(reply.id) => {
                        tracing::debug!(reply = %reply.id, "duplicate reply ignored");
                    }
                    Ok(reply) => {
                        if !handle(reply).await {
                            // Nobody takes replies any more: what was handed on
                            // is acked below; this one is left for next time.
                            break 'pulling;
                        }
                    }
                }
                unacked += 1;
                last = Some(msg);
                // Ack cumulatively every `ack_every` replies or when
                // nothing more is waiting, so a quiet agent acks at once.
                ready = messages.next().now_or_never();
                if unacked >= ack_every || ready.is_none() {
                    ack_latest(&mut last, &mut unacked).await;
                }
            }
        }
        ack_latest(&mut last, &mut unacked).await;
        Ok(())
    }
}

/// Acks `last` (the consumer's ack policy is `All`, so this acks every
/// reply before it too).
async fn ack_latest(last: &mut Option<async_nats::jetstream::Message>, unacked: &mut usize) {
    if let Some(msg) = last.take() {
        if let Err(error) = msg.ack().await {
            tracing::warn!(%error, "reply ack failed; they will be redelivered and de-duplicated");
        }
    }
    *unacked = 0;
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn seen_is_bounded_and_dedups() {
        let mut s = Seen::default();
        let first = ReplyId(uuid_from(0));
        assert!(s.insert(first));
        assert!(!s.insert(first));
        for i in 1..=SEEN_CAPACITY as u128 {
            assert!(s.insert(ReplyId(uuid_from(i))));
        }
        assert_eq!(s.order.len(), SEEN_CAPACITY);
        // The oldest was forgotten to keep memory bounded.
        assert!(s.insert(first));
    }

    fn uuid_from(i: u128) -> uuid::Uuid {
        uuid::Uuid::from_u128(i)
    }
}

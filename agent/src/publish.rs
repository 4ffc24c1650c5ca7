//! Publishing events: `Nats-Msg-Id` = event id, a bounded ack window, retry until acked.
//!
//! A publish counts only when JetStream acknowledges it. Until then it is
//! retried with back-off (through reconnects), with the same `Nats-Msg-Id`,
//! so a retry of a publish whose ack was lost is dropped by the stream's
//! duplicate window instead of stored twice.

use std::time::Duration;

use ferry_schema::codec::{encode_event, EncodeError};
use ferry_schema::connect::reconnect_delay;
use ferry_schema::{headers, subject, Envelope, EventId};
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::Agent;

/// A publish JetStream acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The event.
    pub id: EventId,
    /// Its sequence in the stream.
    pub sequence: u64,
    /// True when the stream already had it (a re-publish inside the duplicate window).
    pub duplicate: bool,
    /// Publish attempts it took.
    pub attempts: u32,
}

/// Why an event was not published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The event could not be encoded.
    #[error("event {id}: {source}")]
    Encode {
        /// The event.
        id: EventId,
        /// The encoder's error.
        #[source]
        source: EncodeError,
    },
    /// Shutdown was requested before JetStream acknowledged the event.
    #[error("event {id} not acknowledged before shutdown")]
    Cancelled {
        /// The event.
        id: EventId,
    },
}

impl Agent {
    /// Publishes one event and waits for JetStream's ack, retrying with
    /// back-off until it is acked or `shutdown` is cancelled.
    pub async fn publish(
        &self,
        env: &Envelope,
        shutdown: &CancellationToken,
    ) -> Result<Published, PublishError> {
        let enc = self.cfg.encoding;
        let payload: bytes::Bytes = encode_event(env, enc)
            .map_err(|source| PublishError::Encode { id: env.id, source })?
            .into();
        let subject = subject::event(&env.agent, env.kind());
        // Built again only for a retry: a header map is several allocations.
        let mut first = Some(headers::for_publish(env.id.text(), enc, None));
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let hdrs = first.take().unwrap_or_else(|| headers::for_publish(env.id.text(), enc, None));
            let result = match self
                .js
                .publish_with_headers(subject.clone(), hdrs, payload.clone())
                .await
            {
                Ok(ack) => ack.await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match result {
                Ok(ack) => {
                    return Ok(Published {
                        id: env.id,
                        sequence: ack.sequence,
                        duplicate: ack.duplicate,
                        attempts: attempt,
                    })
                }
                Err(error) => {
                    let delay = reconnect_delay(attempt as usize).max(Duration::from_millis(50));
                    tracing::warn!(event = %env.id, attempt, %error, ?delay, "publish not acknowledged; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Err(PublishError::Cancelled { id: env.id }),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Publishes `events` with at most `publish_window` awaiting acks,
    /// calling `on_published` for each acknowledged one (in ack order). Events
    /// are sent in input order, so the stream stores them in that order
    /// unless a retry is needed. Stops at the first error (an unencodable
    /// event, or shutdown).
    pub async fn publish_all<S, F>(
        &self,
        events: S,
        shutdown: &CancellationToken,
        mut on_published: F,
    ) -> Result<u64, PublishError>
    where
        S: Stream<Item = Envelope>,
        F: FnMut(&Envelope, &Published),
    {
        let window = self.cfg.publish_window.max(1);
        let results = events
            .map(|env| async move {
                let r = self.publish(&env, shutdown).await;
                (env, r)
            })
            .buffer_unordered(window);
        let mut results = std::pin::pin!(results);
        let mut count = 0;
        while let Some((env, r)) = results.next().await {
            let p = r?;
            on_published(&env, &p);
            count += 1;
        }
        Ok(count)
    }
}

//! The baseline of `ferry bench rules`: a raw JetStream publisher and a raw republisher, no application logic between them.

use std::sync::Arc;

use async_nats::jetstream::{self, consumer::pull};
use ferry_schema::codec::encode_event;
use ferry_schema::topology::{self, EVENTS_STREAM};
use ferry_schema::{headers, subject, AgentId, Encoding, Envelope};
use futures::{Stream, StreamExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// (a)'s publisher: each event with its `Nats-Msg-Id`, at most `window`
/// awaiting JetStream's ack.
pub(super) async fn raw_publish(conn: async_nats::Client, input: impl Stream<Item = Envelope>, window: usize) -> anyhow::Result<()> {
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(window)
        .backpressure_on_inflight(true)
        .build(conn);
    input
        .map(|e| {
            let js = js.clone();
            async move {
                let payload = encode_event(&e, Encoding::MsgPack)?;
                let h = headers::for_publish(e.id.text(), Encoding::MsgPack, None);
                js.publish_with_headers(subject::event(&e.agent, e.kind()), h, payload.into())
                    .await?
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(window)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(())
}

/// The baseline's "worker": pull, republish the payload to the agent's reply
/// subject (awaiting the stream's ack), ack. Same concurrency bound as the
/// rules worker; no decoding, no rules.
pub(super) async fn raw_republisher(
    client: async_nats::Client,
    concurrency: usize,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(concurrency * 2)
        .backpressure_on_inflight(true)
        .build(client);
    let mut def = topology::rules_consumer();
    def.config.durable_name = Some("bench-raw".into());
    topology::ensure_consumer(&js, &def).await?;
    let consumer = js
        .get_consumer_from_stream::<pull::Config, _, _>("bench-raw", EVENTS_STREAM)
        .await?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(concurrency)
        .messages()
        .await?;
    let permits = Arc::new(Semaphore::new(concurrency));
    let agent = AgentId::new("desk-1")?;
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            p = permits.clone().acquire_owned() => p?,
        };
        let msg = tokio::select! {
            _ = stop.cancelled() => break,
            m = messages.next() => match m {
                Some(Ok(m)) => m,
                Some(Err(_)) => continue,
                None => break,
            },
        };
        let js = js.clone();
        let subject = subject::reply(&agent);
        tasks.spawn(async move {
            let mut h = async_nats::HeaderMap::new();
            if let Some(id) = msg.headers.as_ref().and_then(|h| h.get(headers::MSG_ID)) {
                h.insert(headers::MSG_ID, id.clone());
            }
            if let Ok(ack) = js.publish_with_headers(subject, h, msg.payload.clone()).await {
                if ack.await.is_ok() {
                    let _ = msg.ack().await;
                }
            }
            drop(permit);
        });
    }
    tasks.close();
    tasks.wait().await;
    Ok(())
}

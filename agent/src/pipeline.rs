//! From sources to JetStream through the spool: the spool writer (group
//! commit of whatever the sources queued) and the drainer (publishes in
//! spool order, removes what JetStream acknowledged).
//!
//! ```text
//! collectors, adapter, heartbeat ──► intake (bounded) ──► writer ──► spool ──► drainer ──► events.<id>.<kind>
//! ```
//!
//! Nothing is published before it is on disk, and nothing leaves the disk
//! before its publish is acknowledged. The drainer sends in spool order with
//! a bounded window of unacknowledged publishes, on a connection of its own
//! that never reconnects; at the first failure it drops that connection
//! (with whatever of the window it still held, which would otherwise go out
//! after a reconnect, ahead of what the failure lost), backs off, and starts
//! again after the last event acknowledged in order, on a new connection,
//! one event at a time until one is acknowledged, then with the full window.
//! Events of the failed window that had reached the stream are dropped by
//! its duplicate window (`Nats-Msg-Id` = event id), so every event arrives
//! once. Order holds as long as a stream that fails a publish does not
//! store a later one of the same connection: true of a broker that is down
//! or restarting (`the_drain_keeps_its_order_through_broker_crashes`); a
//! change of a cluster stream's leader in the middle of a window could
//! still break it, and so could a quota refusal (`EVENTS` full, or this
//! agent at its cap: `ferry_schema::quota`) followed by a later publish of
//! the window that finds room the keeper freed in between.

use std::time::Duration;

use ferry_schema::connect::reconnect_delay;
use ferry_schema::{headers, subject, Encoding, Envelope, EventId, EventKind};
use std::collections::VecDeque;

use async_nats::jetstream::context::PublishAckFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::spool::{self, FullPolicy, Record, RefKey, Spool, SpoolError};
use crate::Agent;

/// Events queued between the sources and the spool writer.
pub const INTAKE_QUEUE: usize = 4096;
/// Most events in one spool transaction.
pub const MAX_BATCH: usize = 4096;
/// Events read from the spool at a time by the drainer.
const CHUNK: usize = 2048;
/// Name of the spool component in the heartbeat.
pub const SPOOL_COMPONENT: &str = "spool";
/// Name of the broker connection in the heartbeat.
pub const BROKER_COMPONENT: &str = "broker";

/// Writes what the sources queue into the spool until every sender is
/// gone, in batches: it waits for one event and takes whatever else is
/// queued with it, so a burst costs one fsync, not one per event. The
/// adapter references `refs_of` names for a batch are remembered in its
/// transaction; each batch is passed to `observe` once it is durable.
pub async fn write_spool(
    spool: Spool,
    encoding: Encoding,
    mut rx: mpsc::Receiver<Envelope>,
    health: Health,
    refs_of: impl Fn(&[Envelope]) -> Vec<(RefKey, EventId)> + Send,
    mut observe: impl FnMut(&[Envelope]) + Send,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(env) => batch.push(env),
                Err(_) => break,
            }
        }
        if spool.policy() == FullPolicy::Block {
            let mut warned = false;
            // Room for the batch, with an estimate of its size.
            while !spool.has_room(batch.len() as u64, batch.len() as u64 * 256) {
                if !warned {
                    let depth = spool.depth();
                    tracing::warn!(events = depth.events, bytes = depth.bytes, policy = "block", "spool full; sources wait");
                    health.set(SPOOL_COMPONENT, false, Some("full: sources wait (policy block)".into()));
                    warned = true;
                }
                let freed = spool.wait_for_room();
                // A removal may have happened between the check and the wait.
                let _ = tokio::time::timeout(Duration::from_millis(500), freed).await;
            }
        }
        let mut attempt = 0;
        loop {
            let events = std::mem::take(&mut batch);
            let s = spool.clone();
            let refs = refs_of(&events);
            let appended = move || (s.append_with_refs(&events, encoding, &refs), events);
            let (result, events) = match tokio::task::spawn_blocking(appended).await {
                Ok(done) => done,
                Err(join) => {
                    // The batch went down with the task: its events were
                    // not acknowledged to anyone, but they are lost.
                    tracing::error!(error = %join, "spool writer task failed");
                    break;
                }
            };
            match result {
                Ok(appended) => {
                    let depth = spool.depth();
                    if depth.dropped > 0 {
                        health.set(
                            SPOOL_COMPONENT,
                            false,
                            Some(format!("{} events dropped unsent (policy drop-oldest)", depth.dropped)),
                        );
                    } else {
                        health.set(SPOOL_COMPONENT, true, None);
                    }
                    tracing::trace!(written = appended.written, "spooled");
                    observe(&events);
                    batch = events;
                    batch.clear();
                    break;
                }
                Err(error @ (SpoolError::TooBig { id, .. } | SpoolError::TooLarge { id, .. })) => {
                    // Cannot ever fit or be sent: say so and go on without it.
                    tracing::error!(event = %id, %error, "event dropped");
                    batch = events.into_iter().filter(|e| e.id != id).collect();
                    if batch.is_empty() {
                        break;
                    }
                }
                Err(error) => {
                    attempt += 1;
                    health.set(SPOOL_COMPONENT, false, Some(error.to_string()));
                    let delay = reconnect_delay(attempt).max(Duration::from_millis(100));
                    tracing::error!(%error, ?delay, "cannot write the spool; retrying");
                    tokio::time::sleep(delay).await;
                    batch = events;
                }
            }
        }
    }
}

/// An event JetStream acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// The event.
    pub id: EventId,
    /// Its kind.
    pub kind: EventKind,
}

/// The drainer's own connection (see `NatsConfig::connect_once`): when it
/// breaks, what was queued on it dies with it, and the drainer opens a new
/// one. Publishes of a broken window therefore never reach the stream after
/// the break, out of order.
struct Publisher {
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
}

impl Publisher {
    fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}

/// Sends one spooled event; the returned future resolves with JetStream's ack.
async fn send_record(
    js: &async_nats::jetstream::Context,
    agent: &ferry_schema::AgentId,
    r: &Record,
) -> Result<async_nats::jetstream::context::PublishAckFuture, String> {
    let subject = subject::event(agent, r.kind);
    let hdrs = headers::for_publish(r.id.text(), r.encoding, None);
    js.publish_with_headers(subject, hdrs, r.payload.clone())
        .await
        .map_err(|e| e.to_string())
}

impl Agent {
    async fn publisher(&self) -> Result<Publisher, ferry_schema::connect::ConnectError> {
        let client = self.cfg.nats.connect_once().await?;
        let js = async_nats::jetstream::ContextBuilder::new()
            .api_prefix(ferry_schema::subject::AGENT_JS_API_PREFIX)
            .max_ack_inflight(self.cfg.publish_window.max(1))
            .backpressure_on_inflight(true)
            .build(client.clone());
        Ok(Publisher { client, js })
    }

    /// Publishes the spool's events in order until `shutdown`, removing
    /// each run of acknowledged events, and reports each to `delivered`.
    /// A spool that cannot be read or changed is tried again, backing off,
    /// with the spool reported unhealthy: the drainer ends only at shutdown.
    pub async fn drain_spool(
        &self,
        spool: &Spool,
        health: &Health,
        delivered: Option<mpsc::Sender<Delivered>>,
        shutdown: &CancellationToken,
    ) {
        let window = self.cfg.publish_window.max(1);
        // Everything up to `cursor` is acknowledged (and removed or being removed).
        let mut cursor = 0u64;
        let mut failures = 0usize;
        // Until a publish has been acknowledged (at start, after a failure),
        // events go one at a time: a stream that is coming back (JetStream
        // still loading after a restart) may refuse the first events of a
        // window and store later ones, which would break their order.
        let mut confirmed = false;
        let mut publisher: Option<Publisher> = None;
        while !shutdown.is_cancelled() {
            let appended = spool.appended().notified();
            tokio::pin!(appended);
            appended.as_mut().enable();
            let chunk = if confirmed { CHUNK } else { 1 };
            let Some(records) = with_retries(spool, health, shutdown, "read", move |s| s.read_after(cursor, chunk)).await
            else {
                break;
            };
            if records.is_empty() {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = &mut appended => {}
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
                continue;
            }
            // A connection that broke is not used again (see `Publisher`).
            if !publisher.as_ref().is_some_and(Publisher::is_connected) {
                publisher = None;
                match self.publisher().await {
                    Ok(p) => publisher = Some(p),
                    Err(error) => {
                        failures += 1;
                        confirmed = false;
                        let delay = reconnect_delay(failures).max(Duration::from_millis(100));
                        health.set(BROKER_COMPONENT, false, Some(error.to_string()));
                        tracing::warn!(%error, ?delay, spooled = spool.depth().events, "cannot connect to publish; events stay spooled");
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(delay) => {}
                        }
                        continue;
                    }
                }
            }
            let Some(js) = publisher.as_ref().map(|p| p.js.clone()) else { continue };
            let mut acked: Option<u64> = None;
            let mut failed = None;
            {
                // Sent one after another, in spool order; acks awaited in
                // the same order, at most `window` outstanding.
                let mut inflight: VecDeque<(Record, PublishAckFuture)> = VecDeque::with_capacity(window);
                let mut records = records.into_iter();
                loop {
                    let next = if inflight.len() < window { records.next() } else { None };
                    let step = match next {
                        Some(r) => tokio::select! {
                            _ = shutdown.cancelled() => break,
                            sent = send_record(&js, &self.cfg.agent, &r) => match sent {
                                Ok(ack) => {
                                    inflight.push_back((r, ack));
                                    continue;
                                }
                                Err(error) => Err((r.id, error)),
                            },
                        },
                        None => {
                            let Some((r, ack)) = inflight.pop_front() else { break };
                            tokio::select! {
                                _ = shutdown.cancelled() => break,
                                result = ack => match result {
                                    Ok(_) => Ok(r),
                                    Err(error) => Err((r.id, error.to_string())),
                                },
                            }
                        }
                    };
                    match step {
                        Ok(r) => {
                            acked = Some(r.seq);
                            if let Some(tx) = &delivered {
                                let _ = tx.send(Delivered { id: r.id, kind: r.kind }).await;
                            }
                        }
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
            }
            if let Some(seq) = acked {
                // Until the removal is done the events stay; published again
                // after a restart, the stream's duplicate window drops them.
                if with_retries(spool, health, shutdown, "removal", move |s| s.remove_through(seq)).await.is_none() {
                    break;
                }
                cursor = seq;
            }
            match failed {
                None => {
                    if failures > 0 {
                        tracing::info!("publishing again");
                    }
                    failures = 0;
                    confirmed = acked.is_some();
                    health.set(BROKER_COMPONENT, true, None);
                }
                Some((id, error)) => {
                    failures += 1;
                    confirmed = false;
                    // Whatever of this window is still queued must not be
                    // sent later, on another connection: drop this one.
                    publisher = None;
                    let delay = reconnect_delay(failures).max(Duration::from_millis(100));
                    let depth = spool.depth();
                    health.set(BROKER_COMPONENT, false, Some(error.clone()));
                    tracing::warn!(event = %id, %error, spooled = depth.events, ?delay, "publish not acknowledged; events stay spooled");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

/// Runs `op` on the spool until it succeeds, backing off between tries and
/// reporting the spool unhealthy meanwhile; `None` on shutdown.
async fn with_retries<T: Send + 'static>(
    spool: &Spool,
    health: &Health,
    shutdown: &CancellationToken,
    what: &'static str,
    op: impl Fn(&Spool) -> Result<T, SpoolError> + Clone + Send + 'static,
) -> Option<T> {
    let mut failures = 0usize;
    loop {
        match spool::blocking(spool, op.clone()).await {
            Ok(v) => {
                if failures > 0 {
                    tracing::info!(what, failures, "spool works again");
                    health.set(SPOOL_COMPONENT, true, None);
                }
                return Some(v);
            }
            Err(error) => {
                failures += 1;
                let delay = reconnect_delay(failures).max(Duration::from_millis(100));
                tracing::error!(%error, what, ?delay, "spool failed for the drainer; trying again");
                health.set(SPOOL_COMPONENT, false, Some(error.to_string()));
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

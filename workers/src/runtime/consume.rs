//! The consume loop: pull, handle with bounded concurrency, ack by outcome, shut down in two phases.
//!
//! Phase one (running): a permit from a semaphore of `max_in_flight` is taken
//! *before* the next message, so at most that many messages are being
//! handled, and the pull batch is the same size up to [`MAX_PULL_BATCH`], so
//! the client never buffers much more than it can run (and never more than a
//! subscription holds). Phase two (on cancel): stop pulling, nak what
//! was delivered but not started (another replica takes it at once), wait
//! for in-flight handlers to finish and ack, then return.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{
    self,
    consumer::{pull, PullConsumer},
    AckKind,
};
use ferry_schema::deadletter::{DeadLetter, MaxDeliveriesAdvisory, Origin, ReasonCode};
use ferry_schema::topology::ConsumerDef;
use futures::{FutureExt, StreamExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Handler, Outcome, Stats};

/// The largest pull batch. The client may hold about one and a half
/// batches that no handler has taken yet, and a subscription holds 8192
/// messages ([`ferry_schema::connect::NatsConfig`]); beyond that it drops
/// them and they come back only after `ack_wait`. So a loop with more in
/// flight (the archiver's 8192) pulls in several batches.
pub const MAX_PULL_BATCH: usize = 2048;

/// Limits of one consume loop; every one is explicit.
#[derive(Debug, Clone)]
pub struct ConsumeSettings {
    /// Messages handled at once by this replica; also the pull batch size
    /// (up to [`MAX_PULL_BATCH`]) and so the bound on JetStream publish acks
    /// the handlers wait for.
    pub max_in_flight: usize,
    /// How long one pull request waits on the server for messages.
    pub pull_expires: Duration,
    /// Idle heartbeat of pull requests (detects a dead connection).
    pub pull_heartbeat: Duration,
    /// Send an in-progress ack this often while a handler runs (slow roles
    /// such as inference); `None` for fast roles. Never less often than a
    /// third of the consumer's `ack_wait`.
    pub progress_every: Option<Duration>,
    /// How long phase two waits for in-flight handlers before giving up (the
    /// unfinished messages are redelivered after the consumer's `ack_wait`).
    pub shutdown_grace: Duration,
    /// Delay of the nak when a dead letter could not be published.
    pub dead_letter_retry: Duration,
    /// How often the loop reads its consumer's info for the lag metrics.
    pub lag_every: Duration,
    /// How long the loop tries to get its consumer back (re-binding, or
    /// re-creating it from its definition) after the broker says it was
    /// deleted or JetStream does not answer. Past this the loop fails, the
    /// role's other loops stop, and the process exits non-zero, so its
    /// supervisor restarts it rather than leaving it half dead.
    pub rebind_within: Duration,
    /// A retry's delay doubles with every delivery of the message, from the
    /// handler's own delay up to this: a dependency that is away for a
    /// while (PostgreSQL restarting) is waited out within the consumer's
    /// `max_deliver` instead of being blamed on the message.
    pub retry_backoff_max: Duration,
}

impl Default for ConsumeSettings {
    fn default() -> Self {
        Self {
            max_in_flight: 256,
            pull_expires: Duration::from_secs(30),
            pull_heartbeat: Duration::from_secs(5),
            progress_every: None,
            shutdown_grace: Duration::from_secs(30),
            dead_letter_retry: Duration::from_secs(1),
            lag_every: Duration::from_secs(5),
            rebind_within: Duration::from_secs(120),
            retry_backoff_max: Duration::from_secs(30),
        }
    }
}

/// Why the consume loop stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    /// The role's durable consumer does not exist.
    #[error("consumer {consumer:?} on stream {stream:?} does not exist: run `ferry provision` (or `ferry up`) first ({source})")]
    ConsumerMissing {
        /// Stream name.
        stream: String,
        /// Consumer name.
        consumer: String,
        /// The broker's answer.
        #[source]
        source: jetstream::stream::ConsumerError,
    },
    /// The consumer was lost (deleted, or JetStream stopped answering) and
    /// could not be had back within `rebind_within`.
    #[error("lost consumer {stream}/{consumer} and could not get it back within {within:?}: {reason}")]
    Lost {
        /// Stream name.
        stream: String,
        /// Consumer name.
        consumer: String,
        /// How long it tried.
        within: Duration,
        /// The last failure.
        reason: String,
    },
    /// `max_in_flight` is zero.
    #[error("max_in_flight must be at least 1")]
    ZeroConcurrency,
}

/// Runs `handler` over the durable pull consumer `def` until `shutdown` is
/// cancelled, then shuts down in two phases.
pub async fn consume<H: Handler>(
    js: &jetstream::Context,
    def: &ConsumerDef,
    handler: Arc<H>,
    settings: &ConsumeSettings,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> Result<(), ConsumeError> {
    let (stream, consumer) = (def.stream, def.name());
    if settings.max_in_flight == 0 {
        return Err(ConsumeError::ZeroConcurrency);
    }
    let mut pull: PullConsumer = js
        .get_consumer_from_stream::<pull::Config, _, _>(consumer, stream)
        .await
        .map_err(|source| ConsumeError::ConsumerMissing {
            stream: stream.to_string(),
            consumer: consumer.to_string(),
            source,
        })?;
    let max_deliver = pull.cached_info().config.max_deliver;
    let ack_wait = pull.cached_info().config.ack_wait;
    let mut settings = settings.clone();
    if let Some(every) = settings.progress_every {
        settings.progress_every = Some(every.min(ack_wait / 3).max(std::time::Duration::from_millis(100)));
    }
    let settings = &settings;
    let permits = Arc::new(Semaphore::new(settings.max_in_flight));
    let tracker = TaskTracker::new();
    let metrics = stats.for_loop(consumer);
    // The consumer's ack floor as last read: where a re-created consumer starts.
    let ack_floor = Arc::new(AtomicU64::new(pull.cached_info().ack_floor.stream_sequence));
    let lag = tokio::spawn(watch_lag(
        pull.clone(),
        metrics.clone(),
        ack_floor.clone(),
        settings.lag_every,
        shutdown.clone(),
    ));
    let ctx = Arc::new(Ctx {
        tally: super::stats::Tally::new(metrics.clone()),
        metrics,
        js: js.clone(),
        stream: stream.to_string(),
        consumer: consumer.to_string(),
        max_deliver,
        settings: settings.clone(),
    });
    let exhausted = tokio::spawn(watch_exhausted(ctx.clone(), shutdown.clone()));
    ctx.metrics.set_up(true);
    tracing::info!(
        stream,
        consumer,
        max_in_flight = settings.max_in_flight,
        max_deliver,
        "consuming"
    );

    let mut failures = 0u32;
    'pulling: while !shutdown.is_cancelled() {
        let messages = pull
            .stream()
            .max_messages_per_batch(settings.max_in_flight.min(MAX_PULL_BATCH))
            .expires(settings.pull_expires)
            .heartbeat(settings.pull_heartbeat)
            .messages()
            .await;
        let mut messages = match messages {
            Ok(m) => m,
            Err(error) => {
                failures += 1;
                let delay = ferry_schema::connect::reconnect_delay(failures as usize);
                tracing::warn!(%error, stream, consumer, ?delay, "cannot start pulling; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break 'pulling,
                    _ = tokio::time::sleep(delay) => continue 'pulling,
                }
            }
        };
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => {
                    nak_buffered(&mut messages).await;
                    break 'pulling;
                }
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break 'pulling, // semaphore closed: never happens, we own it
                },
            };
            let next = tokio::select! {
                _ = shutdown.cancelled() => {
                    nak_buffered(&mut messages).await;
                    break 'pulling;
                }
                next = messages.next() => next,
            };
            match next {
                Some(Ok(msg)) => {
                    failures = 0;
                    let handler = handler.clone();
                    let ctx = ctx.clone();
                    // Boxed: a handler's future is kilobytes, and spawning
                    // moves a future several times; a box is moved as a pointer.
                    tracker.spawn(Box::pin(async move {
                        ctx.handle_one(&*handler, msg).await;
                        drop(permit);
                    }));
                }
                Some(Err(error)) => {
                    use jetstream::consumer::pull::MessagesErrorKind as K;
                    match error.kind() {
                        K::ConsumerDeleted | K::NoResponders => {
                            tracing::warn!(%error, stream, consumer, "consumer lost; getting it back");
                            ctx.metrics.set_up(false);
                            match rebind(js, def, ack_floor.load(Ordering::Relaxed), settings.rebind_within, &shutdown).await {
                                Ok(Some(again)) => {
                                    tracing::info!(stream, consumer, "consumer back; pulling again");
                                    ctx.metrics.set_up(true);
                                    pull = again;
                                    continue 'pulling;
                                }
                                Ok(None) => break 'pulling,
                                Err(error) => {
                                    lag.abort();
                                    exhausted.abort();
                                    return Err(error);
                                }
                            }
                        }
                        K::MissingHeartbeat => {
                            // async-nats would wait out `expires` and more before
                            // pulling again; a fresh pull finds out at once.
                            tracing::warn!(%error, stream, consumer, "pull heartbeat missed; starting a new pull");
                            nak_buffered(&mut messages).await;
                            continue 'pulling;
                        }
                        _ => tracing::warn!(%error, stream, consumer, "pull error; continuing"),
                    }
                }
                None => {
                    tracing::warn!(stream, consumer, "pull stream ended; starting a new one");
                    continue 'pulling;
                }
            }
        }
    }

    // Phase two: nothing new is pulled; let in-flight handlers finish.
    lag.abort();
    ctx.metrics.set_up(false);
    tracker.close();
    let in_flight = tracker.len();
    tracing::info!(stream, consumer, in_flight, "stopping: waiting for in-flight messages");
    if tokio::time::timeout(settings.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            stream,
            consumer,
            left = tracker.len(),
            "in-flight messages did not finish in time; the broker redelivers them after ack_wait"
        );
    }
    exhausted.abort();
    Ok(())
}

/// How long a loop waits before it looks for its lost consumer: a delete
/// is told to the loop before the broker has finished it, and nats-server
/// 2.9 fails the delete ("directory not empty") when a re-create refills
/// the consumer's directory meanwhile; an operator re-provisioning also
/// gets to go first.
const REBIND_PAUSE: Duration = Duration::from_secs(1);

/// Gets the loop's consumer back after the broker said it was deleted (or
/// JetStream did not answer): binds to it again, or re-creates it from `def`
/// starting after `ack_floor` (so nothing unacked is skipped, and what was
/// acked since the floor was read is redelivered to idempotent handlers),
/// retrying with back-off for up to `within`. `Ok(None)` on shutdown.
async fn rebind(
    js: &jetstream::Context,
    def: &ConsumerDef,
    ack_floor: u64,
    within: Duration,
    shutdown: &CancellationToken,
) -> Result<Option<PullConsumer>, ConsumeError> {
    let (stream, consumer) = (def.stream, def.name());
    let deadline = Instant::now() + within;
    tokio::select! {
        _ = shutdown.cancelled() => return Ok(None),
        _ = tokio::time::sleep(REBIND_PAUSE) => {}
    }
    let mut attempt = 0usize;
    loop {
        let failure = match js.get_consumer_from_stream::<pull::Config, _, _>(consumer, stream).await {
            Ok(pull) => return Ok(Some(pull)),
            Err(error) if is_not_found(&error) => {
                let mut config = def.config.clone();
                if ack_floor > 0 {
                    config.deliver_policy = jetstream::consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: ack_floor + 1,
                    };
                }
                match js.create_consumer_on_stream(config, stream).await {
                    Ok(pull) => {
                        tracing::warn!(stream, consumer, from_sequence = ack_floor + 1, "re-created the missing consumer from its definition");
                        return Ok(Some(pull));
                    }
                    // Another replica may have re-created it first (from
                    // another floor): the next round binds to that one.
                    Err(error) => format!("re-creating it failed: {error}"),
                }
            }
            Err(error) => error.to_string(),
        };
        attempt += 1;
        let delay = ferry_schema::connect::reconnect_delay(attempt);
        if Instant::now() + delay > deadline {
            return Err(ConsumeError::Lost {
                stream: stream.to_string(),
                consumer: consumer.to_string(),
                within,
                reason: failure,
            });
        }
        tracing::warn!(stream, consumer, reason = %failure, ?delay, "consumer not back yet; retrying");
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Whether the broker said the consumer does not exist.
fn is_not_found(error: &jetstream::stream::ConsumerError) -> bool {
    matches!(error.kind(), jetstream::stream::ConsumerErrorKind::JetStream(e)
        if e.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND)
}

/// Keeps the lag gauges of one consume loop current: the consumer's
/// pending, ack-pending and redelivered counts, as the broker reports them,
/// and its ack floor for [`rebind`].
async fn watch_lag(
    mut pull: PullConsumer,
    m: crate::metrics::LoopMetrics,
    ack_floor: Arc<AtomicU64>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match pull.info().await {
            Ok(info) => {
                m.pending.set(i64::try_from(info.num_pending).unwrap_or(i64::MAX));
                m.ack_pending.set(i64::try_from(info.num_ack_pending).unwrap_or(i64::MAX));
                m.redelivered.set(i64::try_from(info.num_redelivered).unwrap_or(i64::MAX));
                ack_floor.store(info.ack_floor.stream_sequence, Ordering::Relaxed);
            }
            Err(error) => tracing::debug!(%error, "consumer info for the lag metrics failed"),
        }
    }
}

/// The nak delay of a retry on delivery `delivered` (1 = first): the
/// handler's `delay`, doubled for each delivery before this one, at most
/// `max` (or `delay` itself when that is longer).
fn retry_delay(delay: Duration, delivered: i64, max: Duration) -> Duration {
    let doublings = u32::try_from(delivered.saturating_sub(1).clamp(0, 16)).unwrap_or(16);
    delay.saturating_mul(1 << doublings).min(max.max(delay))
}

/// The poison outcome for a handler that panicked with `panic`.
fn panicked(panic: &(dyn std::any::Any + Send)) -> Outcome {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with a non-text payload".into());
    Outcome::Poison {
        code: ReasonCode::Panic,
        reason: format!("the handler panicked: {message}"),
    }
}

/// Naks messages the client already holds but has not started, so another
/// replica gets them now rather than after `ack_wait`.
async fn nak_buffered(messages: &mut jetstream::consumer::pull::Stream) {
    let mut returned = 0usize;
    while let Some(Some(Ok(msg))) = messages.next().now_or_never() {
        if msg.ack_with(AckKind::Nak(None)).await.is_ok() {
            returned += 1;
        }
    }
    if returned > 0 {
        tracing::info!(returned, "returned buffered messages to the broker");
    }
}

struct Ctx {
    /// The loop's lag and liveness gauges.
    metrics: crate::metrics::LoopMetrics,
    /// Every message counted once, into the loop's series (also the replica's stats).
    tally: super::stats::Tally,
    js: jetstream::Context,
    stream: String,
    consumer: String,
    max_deliver: i64,
    settings: ConsumeSettings,
}

impl Ctx {
    async fn handle_one<H: Handler>(&self, handler: &H, msg: jetstream::Message) {
        let started = Instant::now();
        self.tally.started();
        // Parsed from the ack subject only when an outcome needs it (the
        // common `Done` does not): (deliveries so far, stream sequence).
        let position = || {
            msg.info()
                .map(|i| (i.delivered, i.stream_sequence))
                .unwrap_or((1, 0))
        };

        // A panicking handler poisons its message, not the loop: the panic
        // becomes a dead letter with its message, and the loop goes on.
        let work = std::panic::AssertUnwindSafe(handler.handle(&msg))
            .catch_unwind()
            .map(|r| r.unwrap_or_else(|panic| panicked(&*panic)));
        let outcome = match self.settings.progress_every {
            None => work.await,
            Some(every) => {
                tokio::pin!(work);
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                loop {
                    tokio::select! {
                        outcome = &mut work => break outcome,
                        _ = tick.tick() => {
                            if let Err(error) = msg.ack_with(AckKind::Progress).await {
                                tracing::warn!(%error, sequence = position().1, "in-progress ack failed");
                            }
                        }
                    }
                }
            }
        };

        // A retry on the last allowed delivery would leave the message
        // stranded; it becomes a dead letter with the last reason instead.
        let outcome = match outcome {
            Outcome::RetryAfter { reason, .. } if self.max_deliver > 0 && position().0 >= self.max_deliver => {
                Outcome::Poison {
                    code: ReasonCode::MaxDeliver,
                    reason: format!("gave up after {} deliveries: {reason}", position().0),
                }
            }
            other => other,
        };

        let ack = match &outcome {
            Outcome::Done => AckKind::Ack,
            Outcome::RetryAfter { delay, reason } => {
                let (delivered, sequence) = position();
                let delay = retry_delay(*delay, delivered, self.settings.retry_backoff_max);
                tracing::warn!(sequence, delivered, reason = %reason, ?delay, "retrying later");
                AckKind::Nak(Some(delay))
            }
            Outcome::Poison { code, reason } => {
                let (delivered, sequence) = position();
                match self.dead_letter(&msg, sequence, delivered, *code, reason).await {
                    Ok(()) => {
                        tracing::warn!(sequence, subject = %msg.subject, code = code.as_str(), reason = %reason, "dead-lettered");
                        AckKind::Term
                    }
                    Err(error) => {
                        tracing::error!(%error, sequence, code = code.as_str(), "cannot publish dead letter; retrying later");
                        AckKind::Nak(Some(self.settings.dead_letter_retry))
                    }
                }
            }
        };
        if let Err(error) = msg.ack_with(ack).await {
            // The broker redelivers after ack_wait; handlers are idempotent.
            self.tally.ack_failed();
            tracing::warn!(%error, sequence = position().1, "ack failed; the message will be redelivered");
        }
        let elapsed = started.elapsed();
        self.tally.finished(&outcome, elapsed);
    }

    async fn dead_letter(
        &self,
        msg: &jetstream::Message,
        sequence: u64,
        deliveries: i64,
        code: ReasonCode,
        reason: &str,
    ) -> Result<(), async_nats::Error> {
        let origin = Origin {
            stream: self.stream.clone(),
            consumer: self.consumer.clone(),
            subject: msg.subject.to_string(),
            sequence,
            deliveries,
        };
        self.publish_dead_letter(DeadLetter::new(&origin, msg.headers.as_ref(), msg.payload.clone(), code, reason))
            .await
    }

    async fn publish_dead_letter(&self, dl: DeadLetter) -> Result<(), async_nats::Error> {
        self.js
            .publish_with_headers(dl.subject, dl.headers, dl.payload)
            .await?
            .await?;
        Ok(())
    }

    /// Dead-letters the message the broker gave up on in `advisory`: read
    /// back from its stream, it gets code `max_deliver`. Its id
    /// (`<stream>:<sequence>:<consumer>`) makes a second copy (another
    /// replica, a redelivered advisory) a duplicate the stream drops.
    async fn dead_letter_exhausted(&self, advisory: &MaxDeliveriesAdvisory) -> Result<(), String> {
        let stream = self.js.get_stream_no_info(&self.stream).await.map_err(|e| e.to_string())?;
        let msg = stream
            .get_raw_message(advisory.stream_seq)
            .await
            .map_err(|e| format!("cannot read message {} back: {e}", advisory.stream_seq))?;
        let origin = Origin {
            stream: self.stream.clone(),
            consumer: self.consumer.clone(),
            subject: msg.subject.to_string(),
            sequence: advisory.stream_seq,
            deliveries: advisory.deliveries,
        };
        let reason = format!(
            "delivered {} times and never acknowledged: its handler did not finish within the consumer's ack_wait, or its replica died each time",
            advisory.deliveries
        );
        let dl = DeadLetter::new(&origin, Some(&msg.headers), msg.payload, ReasonCode::MaxDeliver, &reason);
        self.publish_dead_letter(dl).await.map_err(|e| e.to_string())
    }
}

/// How often a dead letter for an exhausted message is tried before it is
/// only logged.
const EXHAUSTED_TRIES: usize = 5;

/// Dead-letters what the broker gives up on without any handler's word (a
/// message whose last delivery timed out would otherwise vanish): listens
/// to the consumer's max-deliveries advisories in a queue group, so one
/// replica of the role takes each. An advisory sent while no replica runs
/// is lost (core NATS); the message then stays in its stream for `ferry
/// replay`.
async fn watch_exhausted(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let client = ctx.js.client();
    let subject = ferry_schema::subject::max_deliveries_advisory(&ctx.stream, &ctx.consumer);
    let mut advisories = match client.queue_subscribe(subject, format!("ferry.{}", ctx.consumer)).await {
        Ok(s) => s,
        Err(error) => {
            tracing::error!(%error, consumer = ctx.consumer, "cannot listen for max-deliveries advisories; exhausted messages will not be dead-lettered");
            return;
        }
    };
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = advisories.next() => match m {
                Some(m) => m,
                None => break,
            },
        };
        let advisory: MaxDeliveriesAdvisory = match serde_json::from_slice(&msg.payload) {
            Ok(a) => a,
            Err(error) => {
                tracing::warn!(%error, "unreadable max-deliveries advisory");
                continue;
            }
        };
        for attempt in 1..=EXHAUSTED_TRIES {
            match ctx.dead_letter_exhausted(&advisory).await {
                Ok(()) => {
                    tracing::warn!(sequence = advisory.stream_seq, deliveries = advisory.deliveries, consumer = ctx.consumer, "dead-lettered a message whose deliveries ran out");
                    break;
                }
                Err(error) if attempt == EXHAUSTED_TRIES => {
                    tracing::error!(%error, sequence = advisory.stream_seq, "cannot dead-letter an exhausted message; it stays in its stream")
                }
                Err(error) => {
                    tracing::warn!(%error, sequence = advisory.stream_seq, attempt, "dead letter of an exhausted message failed; retrying");
                    tokio::time::sleep(ctx.settings.dead_letter_retry).await;
                }
            }
        }
    }
    let _ = advisories.unsubscribe().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_backs_off_per_delivery_up_to_the_cap() {
        let s = Duration::from_secs;
        let delays: Vec<Duration> = (1..=8).map(|n| retry_delay(s(1), n, s(30))).collect();
        assert_eq!(delays, [s(1), s(2), s(4), s(8), s(16), s(30), s(30), s(30)]);
        assert_eq!(retry_delay(s(60), 3, s(30)), s(60), "a handler's longer delay stands");
        assert_eq!(retry_delay(s(1), 0, s(30)), s(1), "an unknown delivery count is the first");
        assert_eq!(retry_delay(s(1), i64::MAX, s(30)), s(30));
    }
}

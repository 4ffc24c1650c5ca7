//! Receiving replies: live from the `REPLIES` stream's republication, what was missed from the agent's durable consumer.
//!
//! `REPLIES` republishes every stored reply on `live.replies.<id>`, with
//! its stream sequence and the sequence of the agent's previous reply
//! (`Nats-Sequence`, `Nats-Last-Sequence`). A connected agent reads those:
//! one core message per reply, as cheap as a plain subscription, and
//! nothing to ack. It keeps a *cursor*, the highest stream sequence it
//! handed on. A live reply whose previous sequence is past the cursor shows
//! that one was missed (the agent was offline, its connection dropped, its
//! buffer overflowed), and the agent *catches up* through its durable
//! consumer `agent-<id>`, which holds every reply to it: it fetches in
//! stream order, acks what is at or below the cursor without handing it on
//! again, hands on the rest and acks each.
//!
//! A catch-up also runs when the receiver starts (replies published while
//! the agent was away), after every reconnect, while the consumer still has
//! unacked deliveries (a fetch cut off by a dropped connection: they come
//! back after `ack_wait`), and once replies have been quiet for
//! [`SWEEP_IDLE`] after some arrived live: that pass finds a missed *last*
//! reply, which no later one would reveal, and acks in the consumer what
//! was handed on live, so a later start has little to skip. And it runs
//! every `catch_up_every` (30 s by default) in any case, so replies still
//! arrive, late, if live ones never do (a broker user from before live
//! replies, without `live.replies.<id>`: the pass then says so in a
//! warning). On shutdown a last pass acks what was handed on, without
//! handing on more.
//!
//! Replies are handed on in stream order, except one whose delivery was cut
//! off, which comes when the consumer delivers it again. A reply seen twice
//! (live and fetched, or fetched again after a restart) is recognised by its
//! id and not handed on twice.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, consumer::PullConsumer, AckKind};
use ferry_schema::codec::{decode_reply, DEFAULT_MAX_PAYLOAD};
use ferry_schema::connect::reconnect_delay;
use ferry_schema::topology::{agent_replies_consumer_name, REPLIES_STREAM};
use ferry_schema::{headers, subject, AgentId, Encoding, Reply, ReplyId};
use futures::future::BoxFuture;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Counts;
use crate::Agent;

/// How many reply ids the agent remembers for de-duplication.
pub const SEEN_CAPACITY: usize = 10_000;

/// How long live replies must be quiet before a catch-up pass acks them in
/// the consumer (and finds a missed last one).
pub const SWEEP_IDLE: Duration = Duration::from_secs(2);

/// How often the receiver checks for a reconnect, a quiet spell or an owed
/// catch-up.
const TICK: Duration = Duration::from_millis(250);

/// Longest wait for the broker's answer to one reply fetch, or for its
/// next message; past it the fetch is given up and tried again.
pub const FETCH_WAIT: Duration = Duration::from_secs(10);

/// Wait before another catch-up after one failed or left deliveries unacked.
const CATCH_UP_RETRY: Duration = Duration::from_secs(2);

/// How long the last pass on shutdown may take; what it leaves is skipped
/// (by reply id) at the next start.
const SHUTDOWN_PASS: Duration = Duration::from_secs(5);

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
    /// The live subscription could not be made.
    #[error("cannot subscribe to live replies on {subject}: {reason}")]
    Live {
        /// The subject.
        subject: String,
        /// What went wrong.
        reason: String,
    },
    /// The live subscription ended (the connection was closed for good).
    #[error("the live reply subscription on {0} ended")]
    LiveEnded(String),
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
    /// Receives this agent's replies until `shutdown`, sending each new one
    /// to `tx` (a bounded channel: a slow consumer slows the receiving).
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

    /// Opens the reply consumer and subscribes to live replies; also returns
    /// the client's connect count from before the subscription.
    async fn bind_replies(
        &self,
        name: &str,
        live_subject: &async_nats::Subject,
    ) -> Result<(PullConsumer, async_nats::Subscriber, u64), RepliesError> {
        let consumer = self
            .js
            .get_consumer_from_stream::<pull::Config, _, _>(name, REPLIES_STREAM)
            .await
            .map_err(|source| RepliesError::Consumer {
                consumer: name.to_string(),
                source,
            })?;
        let live_error = |e: &dyn std::fmt::Display| RepliesError::Live {
            subject: live_subject.to_string(),
            reason: e.to_string(),
        };
        let connects = self.client.statistics().connects.load(Ordering::Relaxed);
        let live = self
            .client
            .subscribe(live_subject.clone())
            .await
            .map_err(|e| live_error(&e))?;
        // The broker has the subscription before the first catch-up, so no
        // reply falls between the two.
        self.client.flush().await.map_err(|e| live_error(&e))?;
        Ok((consumer, live, connects))
    }

    /// Receives this agent's replies until `shutdown`, awaiting `handle` for
    /// each new one, in stream order (see the module docs). A reply counts
    /// as received, and is acked in the consumer, only after `handle`
    /// returned. `handle` returns false to stop; the reply it was given is
    /// then left for next time.
    pub async fn handle_replies<H>(&self, handle: H, shutdown: CancellationToken) -> Result<(), RepliesError>
    where
        H: FnMut(Reply) -> BoxFuture<'static, bool> + Send,
    {
        let name = agent_replies_consumer_name(&self.cfg.agent);
        let live_subject = subject::live_reply(&self.cfg.agent);
        // An agent that starts offline, or before its consumer is
        // provisioned, waits for both rather than running without replies.
        let mut attempt = 0usize;
        let (consumer, mut live, connects) = loop {
            match self.bind_replies(&name, &live_subject).await {
                Ok(bound) => break bound,
                Err(error) => {
                    attempt += 1;
                    let delay = reconnect_delay(attempt).max(Duration::from_millis(100));
                    tracing::warn!(%error, ?delay, "cannot receive replies yet; trying again");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        };
        if attempt > 0 {
            tracing::info!(consumer = %name, "receiving replies");
        }

        // At most half a subscription's buffer per fetch, so the client
        // never drops a fetched reply.
        let batch = self
            .cfg
            .reply_batch
            .clamp(1, (self.cfg.nats.subscription_capacity / 2).max(1));
        // Every reply up to the consumer's ack floor was handed on before.
        let cursor = consumer.cached_info().ack_floor.stream_sequence;
        let mut rx = Receiver {
            agent: self.cfg.agent.clone(),
            counts: self.counts.clone(),
            consumer,
            shutdown: shutdown.clone(),
            handle,
            batch,
            seen: Seen::default(),
            cursor,
            unswept: 0,
            last_live: Instant::now(),
            last_pass: Instant::now(),
            live_received: 0,
            periodic: false,
            owed: true,
            retry_at: Instant::now(),
            connects,
        };
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ended = loop {
            if rx.owed && Instant::now() >= rx.retry_at {
                if rx.catch_up(Pass::Deliver).await == Caught::Stopped {
                    break None;
                }
                continue;
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break None,
                m = live.next() => match m {
                    Some(m) => {
                        if rx.on_live(m).await == Caught::Stopped {
                            break None;
                        }
                    }
                    None => break Some(RepliesError::LiveEnded(live_subject.to_string())),
                },
                _ = tick.tick() => {
                    let connects = self.client.statistics().connects.load(Ordering::Relaxed);
                    if connects != rx.connects {
                        // The client subscribed again on the new connection;
                        // the flush makes sure the broker has it first.
                        rx.connects = connects;
                        if let Err(error) = self.client.flush().await {
                            tracing::debug!(%error, "flush after a reconnect failed");
                        }
                        tracing::info!(cursor = rx.cursor, "reconnected; catching up on replies");
                        rx.owed_now();
                    } else if rx.unswept > 0 && rx.last_live.elapsed() >= SWEEP_IDLE {
                        rx.owed_now();
                    } else if rx.last_pass.elapsed() >= self.cfg.catch_up_every {
                        rx.periodic = true;
                        rx.owed_now();
                    }
                }
            }
        };
        // Ack what was handed on; hand on nothing more.
        if tokio::time::timeout(SHUTDOWN_PASS, rx.catch_up(Pass::AckOnly)).await.is_err() {
            tracing::info!("the last reply pass did not finish; the next start skips what it left by reply id");
        }
        match ended {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// One catch-up pass: hand on what is new, or (on shutdown) only ack what
/// was handed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    Deliver,
    AckOnly,
}

/// How a pass or a live reply ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caught {
    /// Carry on.
    Done,
    /// The handler asked to stop.
    Stopped,
}

/// What became of one reply offered to the handler.
enum Offered {
    /// Handed on, or already handed on before (same id).
    Taken,
    /// It cannot be decoded, or it is addressed to another agent (which
    /// the broker's accounts should make impossible); it is dropped with an
    /// error log and counted.
    Refused,
    /// The handler asked to stop; the reply was not taken.
    Stop,
}

struct Receiver<H> {
    /// The agent whose replies these are.
    agent: AgentId,
    counts: Counts,
    consumer: PullConsumer,
    shutdown: CancellationToken,
    handle: H,
    /// Replies per fetch.
    batch: usize,
    seen: Seen,
    /// The highest stream sequence handed on.
    cursor: u64,
    /// Replies handed on live since the last completed catch-up.
    unswept: usize,
    last_live: Instant,
    /// When the last catch-up pass ended.
    last_pass: Instant,
    /// Replies that came live since the receiver started.
    live_received: u64,
    /// The pass that is owed is only the periodic one.
    periodic: bool,
    /// A catch-up is due (at `retry_at`).
    owed: bool,
    retry_at: Instant,
    /// The client's connect count when last looked at.
    connects: u64,
}

impl<H> Receiver<H>
where
    H: FnMut(Reply) -> BoxFuture<'static, bool> + Send,
{
    fn owed_now(&mut self) {
        self.owed = true;
        self.retry_at = Instant::now();
    }

    fn owed_later(&mut self) {
        self.owed = true;
        self.retry_at = Instant::now() + CATCH_UP_RETRY;
    }

    async fn offer(&mut self, headers: Option<&async_nats::HeaderMap>, payload: &[u8]) -> Offered {
        let decoded = Encoding::from_headers(headers).and_then(|enc| decode_reply(payload, enc, DEFAULT_MAX_PAYLOAD));
        match decoded {
            Err(error) => {
                tracing::error!(%error, "undecodable reply dropped");
                self.counts.refused();
                Offered::Refused
            }
            Ok(reply) if reply.agent != self.agent => {
                tracing::error!(reply = %reply.id, addressed_to = %reply.agent, "reply to another agent dropped");
                self.counts.refused();
                Offered::Refused
            }
            Ok(reply) if self.seen.set.contains(&reply.id) => {
                tracing::debug!(reply = %reply.id, "duplicate reply ignored");
                Offered::Taken
            }
            Ok(reply) => {
                let id = reply.id;
                if (self.handle)(reply).await {
                    self.seen.insert(id);
                    Offered::Taken
                } else {
                    Offered::Stop
                }
            }
        }
    }

    /// A reply republished by the stream.
    async fn on_live(&mut self, msg: async_nats::Message) -> Caught {
        let Some((seq, previous)) = headers::republished_position(msg.headers.as_ref()) else {
            tracing::warn!(subject = %msg.subject, "live reply without its stream position ignored");
            return Caught::Done;
        };
        if seq <= self.cursor {
            return Caught::Done; // a catch-up handed it on already
        }
        if previous > self.cursor {
            tracing::info!(cursor = self.cursor, seq, previous, "a reply was missed; catching up");
            if self.catch_up(Pass::Deliver).await == Caught::Stopped {
                return Caught::Stopped;
            }
            if seq <= self.cursor {
                return Caught::Done;
            }
            if previous > self.cursor {
                // The consumer still holds it and the one missed; the next
                // catch-up hands both on, in order.
                self.owed_later();
                return Caught::Done;
            }
        }
        match self.offer(msg.headers.as_ref(), &msg.payload).await {
            Offered::Stop => return Caught::Stopped,
            Offered::Taken | Offered::Refused => {}
        }
        self.cursor = seq;
        self.unswept += 1;
        self.live_received += 1;
        self.last_live = Instant::now();
        Caught::Done
    }

    /// Fetches from the consumer until it has nothing more, acking each
    /// reply once handed on (or known to be).
    async fn catch_up(&mut self, pass: Pass) -> Caught {
        self.owed = false;
        let periodic = std::mem::take(&mut self.periodic);
        let caught = self.fetch_all(pass, periodic).await;
        self.last_pass = Instant::now();
        caught
    }

    /// [`Self::catch_up`]'s work.
    async fn fetch_all(&mut self, pass: Pass, periodic: bool) -> Caught {
        let mut handed = 0u64;
        loop {
            let mut fetched = match tokio::time::timeout(FETCH_WAIT, self.consumer.fetch().max_messages(self.batch).messages()).await {
                Ok(Ok(m)) => m,
                Ok(Err(error)) => {
                    tracing::warn!(%error, "cannot fetch replies; trying again shortly");
                    self.owed_later();
                    return Caught::Done;
                }
                Err(_) => {
                    tracing::warn!(waited = ?FETCH_WAIT, "a reply fetch got no answer; trying again shortly");
                    self.owed_later();
                    return Caught::Done;
                }
            };
            let mut count = 0usize;
            loop {
                // A fetch whose request was lost (the consumer's leader died
                // with it, a cluster node killed) is never answered: without
                // this bound the receiver waited on it for ever and stopped
                // handing on replies (found by `ferry chaos node-kill`).
                let Ok(next) = tokio::time::timeout(FETCH_WAIT, fetched.next()).await else {
                    tracing::warn!(waited = ?FETCH_WAIT, "a reply fetch stopped answering; trying again shortly");
                    self.owed_later();
                    return Caught::Done;
                };
                let Some(next) = next else { break };
                let msg = match next {
                    Ok(m) => m,
                    Err(error) => {
                        tracing::warn!(%error, "fetching replies failed; trying again shortly");
                        self.owed_later();
                        return Caught::Done;
                    }
                };
                count += 1;
                let Ok(info) = msg.info().map(|i| (i.stream_sequence, i.delivered)) else {
                    tracing::warn!(subject = %msg.subject, "reply without delivery info; left for redelivery");
                    continue;
                };
                let (seq, delivered) = info;
                // A first delivery at or below the cursor was handed on live.
                // A redelivery is offered again: it may be one whose first
                // delivery was cut off, and the reply id tells a repeat.
                let known = seq <= self.cursor && delivered == 1;
                if !known {
                    let offered = match pass {
                        Pass::AckOnly => Offered::Stop,
                        Pass::Deliver => self.offer(msg.headers.as_ref(), &msg.payload).await,
                    };
                    match offered {
                        Offered::Stop => {
                            // Left, at once, for whoever receives next.
                            ack(&msg, AckKind::Nak(None)).await;
                            while let Some(Ok(rest)) = fetched.next().await {
                                ack(&rest, AckKind::Nak(None)).await;
                            }
                            return match pass {
                                Pass::AckOnly => Caught::Done,
                                Pass::Deliver => Caught::Stopped,
                            };
                        }
                        Offered::Refused => {
                            ack(&msg, AckKind::Term).await;
                            self.cursor = self.cursor.max(seq);
                            continue;
                        }
                        Offered::Taken => {
                            handed += 1;
                            self.cursor = self.cursor.max(seq);
                        }
                    }
                }
                ack(&msg, AckKind::Ack).await;
            }
            if count < self.batch {
                break;
            }
            if pass == Pass::Deliver && self.shutdown.is_cancelled() {
                return Caught::Done;
            }
        }
        self.unswept = 0;
        if handed > 0 && periodic && self.live_received == 0 {
            tracing::warn!(
                handed,
                "replies arrive only through the consumer, none live: may this agent's broker user subscribe to its live.replies.<id>? (`ferry agent add` writes it; older entries lack it)"
            );
        } else if handed > 0 {
            tracing::info!(handed, cursor = self.cursor, "caught up on replies");
        }
        // Deliveries nobody acked are ones a dropped connection cut off (or a
        // previous run left); they come back after ack_wait.
        match self.consumer.info().await {
            Ok(info) if info.num_ack_pending > 0 => {
                tracing::info!(unacked = info.num_ack_pending, "replies await redelivery; catching up again shortly");
                self.owed_later();
            }
            Ok(_) => {}
            Err(error) => {
                tracing::debug!(%error, "reply consumer info failed");
                self.owed_later();
            }
        }
        Caught::Done
    }
}

async fn ack(msg: &jetstream::Message, kind: AckKind) {
    if let Err(error) = msg.ack_with(kind).await {
        tracing::warn!(%error, "reply ack failed; the consumer delivers it again and its id tells the repeat");
    }
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

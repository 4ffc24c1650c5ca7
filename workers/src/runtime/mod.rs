//! The runtime every worker role shares: outcome, consume loop, service, shutdown.
//!
//! # Layout
//!
//! - [`serve`]: a role, declared ([`Role`]), run from start to a two-phase stop.
//! - `consume`: the consume loop: bounded in flight, outcome to ack, dead letters.
//! - [`decode`]: the one decode step of every handler.
//! - [`publish`]: replies and hand-offs, published and acknowledged.
//! - [`service`]: the NATS micro service and its status endpoint.
//! - `stats`: a replica's counters.

mod consume;
pub mod decode;
pub mod publish;
pub mod serve;
pub mod service;
mod stats;

use std::time::Duration;

pub use consume::{consume, ConsumeError, ConsumeSettings};
pub use serve::{serve, Ctx, Description, Role, RunError, Wiring};

use async_nats::jetstream;

/// A JetStream context for a worker: publish acks bounded by the consume
/// loop's `max_in_flight` (publishers wait rather than fail when it is full).
pub fn jetstream_for(client: async_nats::Client, consume: &ConsumeSettings) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .max_ack_inflight(consume.max_in_flight.max(1) * 2)
        .backpressure_on_inflight(true)
        .build(client)
}

/// How long the last step of a shutdown may wait for the broker. Without
/// a bound, a replica whose broker is gone waited on SIGTERM for a
/// reconnect that never came (`workers/tests/rules.rs::a_worker_whose_broker_is_gone_still_stops_on_sigterm`);
/// what it still buffers then is acks and service messages, which the
/// broker's redelivery and the service's absence make up for.
pub const FINISH_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// The last step of every role's shutdown: leave the micro service, then
/// flush what the client still buffers, for at most [`FINISH_WITHIN`].
async fn finish(svc: async_nats::service::Service, client: &async_nats::Client) {
    let done = tokio::time::timeout(FINISH_WITHIN, async {
        if let Err(error) = svc.stop().await {
            tracing::debug!(%error, "micro service stop failed");
        }
        if let Err(error) = client.flush().await {
            tracing::warn!(%error, "flush on shutdown failed");
        }
    })
    .await;
    if done.is_err() {
        tracing::warn!(within = ?FINISH_WITHIN, "the broker did not take the last messages; stopping anyway");
    }
}
pub use stats::{Stats, StatsSnapshot};

/// What a handler decided about one message; [`consume`] turns it into the ack.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Fully handled and its effect is durable (the reply's publish was
    /// acknowledged by JetStream): ack.
    Done,
    /// A passing failure (broker busy, downstream down): nak with this delay
    /// so this or another replica tries again. After the consumer's
    /// `max_deliver`, the message is dead-lettered with the last reason.
    RetryAfter {
        /// How long the broker waits before redelivering.
        delay: Duration,
        /// Why, for logs and the eventual dead letter.
        reason: String,
    },
    /// The message can never succeed: publish it to the dead-letter subject
    /// with this reason, then terminate it.
    Poison {
        /// Stable reason code (e.g. `missing_field`).
        code: ferry_schema::deadletter::ReasonCode,
        /// Human-readable reason.
        reason: String,
    },
}

impl Outcome {
    /// A retry after `delay` because of `reason`.
    pub fn retry(delay: Duration, reason: impl std::fmt::Display) -> Self {
        Self::RetryAfter {
            delay,
            reason: reason.to_string(),
        }
    }
}

/// One worker role's message handler.
pub trait Handler: Send + Sync + 'static {
    /// Handles one message and says what became of it. Must not ack.
    fn handle(
        &self,
        msg: &async_nats::jetstream::Message,
    ) -> impl std::future::Future<Output = Outcome> + Send;
}

/// Resolves when the process receives SIGINT or SIGTERM; binaries cancel
/// their shutdown token with it.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the worker");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

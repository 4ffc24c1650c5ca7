//! Ferry's stateless workers.
//!
//! Every worker role has the same shape, so reading one teaches all. A role
//! is a folder with the same files:
//!
//! - `config.rs`: the role's config type with the library's defaults,
//!   validated at start with errors that name the field;
//! - `handler.rs`: turns one JetStream message into an
//!   [`Outcome`](runtime::Outcome): `Done`, `RetryAfter(delay)` or
//!   `Poison(reason)`. It never acks itself;
//! - `mod.rs`: the [`runtime::Role`] declaration: what the role loads at
//!   start, its consume limits, how it describes itself, and which handler
//!   runs on which consumer.
//!
//! One [`runtime::serve`] runs every role: the shared consume loop
//! ([`runtime::consume`]) with a bounded number of messages in flight, the
//! outcome-to-ack mapping (poison goes to the dead-letter subject first), a
//! micro service ([`runtime::service`]) so `nats micro ls` and `nats micro
//! stats` show every replica, and the two-phase shutdown.
//!
//! # Layout
//!
//! - [`groups`]: agent groups from a config's `[groups]` table.
//! - [`runtime`]: outcome, consume loop, dead letters, shutdown, service.
//! - [`rules`]: keyword/regex rules, auto-replies, escalation, hand-off to inference.
//! - `inference`: model replies and predictions on mistral.rs, with a fallback
//!   chain (cargo feature `inference`, on by default).
//! - [`archiver`]: every event, reply and alert into PostgreSQL, in batches.
//! - [`alerts`]: rules over interactions and heartbeats raise alerts;
//!   webhooks. Every replica reads every event (see the module for why).
//! - [`state`]: what workers read and write in PostgreSQL: customers,
//!   conversations, the knowledge base.
//! - [`metrics`]: the Prometheus registry and the `/metrics` and `/health`
//!   endpoint (`--metrics-listen`).
//!
//! Workers hold no state between messages that another replica would need:
//! any replica can handle any event, and a killed replica loses nothing
//! (the alerts role's windows are rebuilt from the streams).

pub mod alerts;
pub mod archiver;
pub mod groups;
#[cfg(feature = "inference")]
pub mod inference;
pub mod metrics;
pub mod rules;
pub mod runtime;
pub mod state;

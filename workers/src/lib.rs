//! Ferry's stateless workers.
//!
//! Every worker role has the same shape, so reading one teaches all:
//!
//! - a **config** (`<role>::config`): what the role needs, validated at start
//!   with errors that name the field;
//! - a **handler** (`<role>::handler`): turns one JetStream message into an
//!   [`Outcome`](runtime::Outcome): `Done`, `RetryAfter(delay)` or
//!   `Poison(reason)`. It never acks itself;
//! - the shared **consume loop** ([`runtime::consume`]): pulls from the
//!   role's durable consumer with a bounded number of messages in flight,
//!   runs the handler, maps its outcome to the ack (poison goes to the
//!   dead-letter subject first), and shuts down in two phases;
//! - a **micro service** ([`runtime::service`]) so `nats micro ls` and
//!   `nats micro stats` show every replica.
//!
//! # Layout
//!
//! - [`groups`]: agent groups from a config's `[groups]` table.
//! - [`runtime`]: outcome, consume loop, dead letters, shutdown, service.
//! - [`rules`]: keyword/regex rules, auto-replies, escalation, hand-off to inference.
//! - [`inference`]: model replies and predictions on mistral.rs, with a fallback chain.
//! - [`archiver`]: every event and reply into PostgreSQL, in batches.
//! - [`state`]: what workers read and write in PostgreSQL: customers,
//!   conversations, the knowledge base.
//! - [`metrics`]: the Prometheus registry and the `/metrics` and `/health`
//!   endpoint (`--metrics-listen`).
//!
//! Workers hold no state between messages that another replica would need:
//! any replica can handle any event, and a killed replica loses nothing.

pub mod archiver;
pub mod groups;
pub mod inference;
pub mod metrics;
pub mod rules;
pub mod runtime;
pub mod state;

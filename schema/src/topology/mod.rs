//! Streams and consumers as code, and idempotent provisioning of both.
//!
//! Every limit is written out here rather than left to server defaults, so a
//! reader can see what each role may have in flight and how long the broker
//! waits before redelivering.
//!
//! # Layout
//!
//! The definitions are data and know nothing of a server; only
//! `provision` talks to one.
//!
//! - `streams`: the five streams ([`all_streams`]) and the
//!   [`StreamSettings`] that shape them.
//! - `consumers`: the worker [`Role`]s, their durable consumers
//!   ([`Role::consumers`]) and each agent's reply consumer
//!   ([`agent_replies_consumer`]), as [`ConsumerDef`]s.
//! - `diff`: the fields provisioning compares, and the `field: old -> new`
//!   lines it reports.
//! - `provision`: [`provision`], [`ensure_stream`], [`ensure_consumer`] and
//!   [`remove_agent_consumer`]: the broker I/O, and its [`ProvisionError`].
//! - `tests`: the definitions checked against the broker's limits.
//!
//! What each user may do at the broker follows from these definitions:
//! see [`crate::permissions`] (re-exported here).

mod consumers;
mod diff;
mod provision;
mod streams;
#[cfg(test)]
mod tests;

pub use consumers::{
    agent_replies_consumer, agent_replies_consumer_name, alerts_notify_consumer, archiver_alerts_consumer,
    archiver_events_consumer, archiver_replies_consumer, inference_chat_consumer, inference_predict_consumer, rules_consumer, worker_consumers, ConsumerDef, Role, ARCHIVER_ACK_WAIT,
    INFERENCE_ACK_WAIT,
};
pub use provision::{ensure_consumer, ensure_stream, provision, remove_agent_consumer, Change, ProvisionError, Provisioned};
pub use streams::{
    alerts_stream, all_streams, deadletter_stream, events_stream, replies_stream, work_stream, StreamSettings,
    ALERTS_STREAM, DEADLETTER_STREAM, EVENTS_STREAM, REPLIES_STREAM, WORK_STREAM,
};

pub use crate::permissions::{agent_account, agent_account_conf, agent_permissions, agent_slot, role_permissions, Permissions};

//! Ferry's wire contract: event and reply types, subjects, streams, consumers, codecs.
//!
//! Every other Ferry crate talks to NATS through the names and types defined
//! here; no other crate spells a subject, a stream name or a header name.
//!
//! # Layout
//!
//! - [`alert`]: [`alert::Alert`], what the alerts role raises, and its dedup id.
//! - [`agent_id`]: [`AgentId`], an agent's name validated as one subject token.
//! - [`event`]: the event [`Envelope`] and its bodies (chat, activity,
//!   heartbeat, prediction request), plus [`EventId`] (UUIDv7, also the
//!   `Nats-Msg-Id`).
//! - [`reply`]: [`Reply`] and its bodies (chat reply, prediction), addressed by
//!   the id of the event they answer.
//! - [`codec`]: MessagePack (default) and JSON (`Content-Type:
//!   application/json`) encoding, size limit, typed [`DecodeError`]s.
//! - [`groups`]: the groups file the CLI writes and the workers read.
//! - [`status`]: a worker replica's status, as its micro service serves it.
//! - [`subject`]: builders and parsers for every subject Ferry uses.
//! - [`headers`]: header names and the header maps Ferry attaches.
//! - [`topology`]: streams and consumers as code, and idempotent provisioning.
//! - [`permissions`]: what each agent and worker role may do at the broker,
//!   generated from the topology.
//! - [`quota`]: what one agent may put into the broker, and the keeper that
//!   frees processed history.
//! - [`deadletter`]: what a dead letter carries and how it is published.
//! - [`connect`]: connection settings shared by agent, workers and CLI.
//! - [`metrics`]: the name of every Prometheus metric a Ferry process
//!   exports, workers' and agent's.
//! - `db` (feature `db`): the PostgreSQL migrations (`schema/migrations/`),
//!   applying them, and the schema check workers run at start.
//!
//! Start reading at [`event::Envelope`] and [`codec::decode_event`].

pub mod agent_id;
pub mod alert;
pub mod codec;
pub mod connect;
#[cfg(feature = "db")]
pub mod db;
pub mod deadletter;
pub mod event;
pub mod groups;
pub mod headers;
pub mod metrics;
pub mod permissions;
pub mod quota;
pub mod reply;
pub mod status;
pub mod subject;
pub mod topology;

pub use agent_id::{AgentId, InvalidAgentId};
pub use codec::{DecodeError, Encoding};
pub use event::{Envelope, EventBody, EventId, EventKind};
pub use reply::{Reply, ReplyBody, ReplyId, Responder};

/// The schema version written into every envelope and the only one accepted.
pub const SCHEMA_VERSION: u16 = 1;

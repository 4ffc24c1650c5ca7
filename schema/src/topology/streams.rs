//! The streams: their names, the settings that shape them, and their configurations.

use std::time::Duration;

use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};

use crate::subject;

/// Stream of every event (`events.>`), kept for replay.
pub const EVENTS_STREAM: &str = "EVENTS";
/// Stream of every reply (`replies.>`), so offline agents get theirs later.
pub const REPLIES_STREAM: &str = "REPLIES";
/// Work-queue stream for hand-offs between worker roles (`work.>`).
pub const WORK_STREAM: &str = "WORK";
/// Stream of dead letters (`deadletter.>`).
pub const DEADLETTER_STREAM: &str = "DEADLETTER";
/// Stream of alerts, firing and resolved (`alerts.>`).
pub const ALERTS_STREAM: &str = "ALERTS";

/// Settings that shape the streams; the defaults suit one node.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// Stream replicas (1 on one node, 3 on a 3-node cluster).
    pub replicas: usize,
    /// How long events are kept for replay.
    pub events_max_age: Duration,
    /// How long replies wait for an offline agent.
    pub replies_max_age: Duration,
    /// How long dead letters are kept.
    pub deadletter_max_age: Duration,
    /// Window in which a repeated `Nats-Msg-Id` is dropped.
    pub duplicate_window: Duration,
    /// Largest message a stream accepts (the broker's `max_payload` is the
    /// hard cap; Ferry's codec limit is lower, see [`crate::codec`]).
    pub max_message_size: i32,
    /// Bytes the events stream may use; beyond them, on a server that
    /// enforces quotas, new events are refused (agents keep them spooled),
    /// else the oldest are discarded (see [`crate::quota`]).
    pub events_max_bytes: i64,
    /// Events one agent may have in `EVENTS` per kind, where the server can
    /// refuse beyond it (see [`crate::quota`]); 0 for no cap.
    pub agent_kind_max_msgs: i64,
    /// Bytes the replies stream may use before the oldest are discarded.
    pub replies_max_bytes: i64,
    /// Bytes the work queue may hold; beyond it a hand-off is refused (and
    /// retried by the worker that makes it), never an unprocessed one evicted.
    pub work_max_bytes: i64,
    /// Bytes the dead letters may use before the oldest are discarded.
    pub deadletter_max_bytes: i64,
    /// How long alerts are kept (their history, and each rule's last state
    /// that an alerts replica reads at start).
    pub alerts_max_age: Duration,
    /// Bytes the alerts may use before the oldest are discarded.
    pub alerts_max_bytes: i64,
}

const GIB: i64 = 1024 * 1024 * 1024;

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            replicas: 1,
            events_max_age: Duration::from_secs(7 * 24 * 3600),
            replies_max_age: Duration::from_secs(7 * 24 * 3600),
            deadletter_max_age: Duration::from_secs(30 * 24 * 3600),
            duplicate_window: Duration::from_secs(10 * 60),
            max_message_size: 1024 * 1024,
            // Together 18 GiB, under the broker's 20 GB `max_file_store`
            // (nats.conf), so no stream can take another's room.
            events_max_bytes: 10 * GIB,
            // A week of history at 1.6 events a second per kind; a busier
            // agent nears it only if the keeper (run by the archiver)
            // cannot free processed events; past it, an agent waits with
            // its events in its spool (crate::quota).
            agent_kind_max_msgs: 1_000_000,
            replies_max_bytes: 4 * GIB,
            work_max_bytes: 2 * GIB,
            deadletter_max_bytes: GIB,
            alerts_max_age: Duration::from_secs(90 * 24 * 3600),
            alerts_max_bytes: GIB,
        }
    }
}

fn base_stream(name: &str, subjects: Vec<String>, s: &StreamSettings) -> stream::Config {
    stream::Config {
        name: name.to_string(),
        subjects,
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        num_replicas: s.replicas,
        duplicate_window: s.duplicate_window,
        max_message_size: s.max_message_size,
        // -1 (no limit) as the server stores it, so a re-run compares equal.
        max_bytes: -1,
        max_messages: -1,
        max_messages_per_subject: -1,
        discard: DiscardPolicy::Old,
        ..Default::default()
    }
}

/// `EVENTS`: all events, limits retention, kept `events_max_age` for replay.
/// Full, it discards its oldest; on a server that can enforce the agents'
/// quotas (2.10 and later), [`provision`](super::provision) makes it refuse new events
/// instead and caps each agent ([`crate::quota::apply`]).
pub fn events_stream(s: &StreamSettings) -> stream::Config {
    stream::Config {
        description: Some("Every event from every agent; replayable.".into()),
        max_age: s.events_max_age,
        max_bytes: s.events_max_bytes,
        ..base_stream(EVENTS_STREAM, vec![subject::all_events().to_string()], s)
    }
}

/// `REPLIES`: all replies, kept until they age out. Each stored reply is
/// also republished on `live.replies.<agent>` with its stream position: a
/// connected agent reads those, and its durable consumer only for what it
/// missed (see the agent's `replies` module).
pub fn replies_stream(s: &StreamSettings) -> stream::Config {
    stream::Config {
        description: Some("Replies to agents, kept while agents are offline.".into()),
        max_age: s.replies_max_age,
        max_bytes: s.replies_max_bytes,
        republish: Some(stream::Republish {
            source: subject::all_replies().to_string(),
            destination: subject::all_live_replies().to_string(),
            headers_only: false,
        }),
        ..base_stream(REPLIES_STREAM, vec![subject::all_replies().to_string()], s)
    }
}

/// `WORK`: hand-offs between roles; a message leaves when a worker acks it.
pub fn work_stream(s: &StreamSettings) -> stream::Config {
    stream::Config {
        description: Some("Work handed from one worker role to another.".into()),
        retention: RetentionPolicy::WorkQueue,
        max_age: s.events_max_age,
        max_bytes: s.work_max_bytes,
        // Full: refuse the new hand-off (the rules worker retries it) rather
        // than evict one nobody has processed yet.
        discard: DiscardPolicy::New,
        ..base_stream(WORK_STREAM, vec![subject::all_work().to_string()], s)
    }
}

/// `DEADLETTER`: poison messages with their reasons.
pub fn deadletter_stream(s: &StreamSettings) -> stream::Config {
    stream::Config {
        description: Some("Messages a worker gave up on, with the reason.".into()),
        max_age: s.deadletter_max_age,
        max_bytes: s.deadletter_max_bytes,
        ..base_stream(
            DEADLETTER_STREAM,
            vec![subject::all_dead_letters().to_string()],
            s,
        )
    }
}

/// `ALERTS`: every alert transition the alerts role raised, and each
/// webhook call made for one (`alert-deliveries.<rule>`), JSON. Its
/// `duplicate_window` is what drops the copy a second alerts replica
/// publishes of the same transition ([`crate::alert::Alert::dedup_key`]).
pub fn alerts_stream(s: &StreamSettings) -> stream::Config {
    stream::Config {
        description: Some("Alerts raised by the alerts role, firing and resolved.".into()),
        max_age: s.alerts_max_age,
        max_bytes: s.alerts_max_bytes,
        ..base_stream(ALERTS_STREAM, vec![subject::all_alerts().to_string(), subject::all_alert_deliveries().to_string()], s)
    }
}

/// Every stream Ferry needs.
pub fn all_streams(s: &StreamSettings) -> Vec<stream::Config> {
    vec![
        events_stream(s),
        replies_stream(s),
        work_stream(s),
        deadletter_stream(s),
        alerts_stream(s),
    ]
}

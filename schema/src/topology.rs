//! Streams and consumers as code, and idempotent provisioning of both.
//!
//! Every limit is written out here rather than left to server defaults, so a
//! reader can see what each role may have in flight and how long the broker
//! waits before redelivering.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{self, pull, AckPolicy, DeliverPolicy},
    stream::{self, DiscardPolicy, RetentionPolicy, StorageType},
};

use crate::{subject, AgentId, EventKind};

/// Stream of every event (`events.>`), kept for replay.
pub const EVENTS_STREAM: &str = "EVENTS";
/// Stream of every reply (`replies.>`), so offline agents get theirs later.
pub const REPLIES_STREAM: &str = "REPLIES";
/// Work-queue stream for hand-offs between worker roles (`work.>`).
pub const WORK_STREAM: &str = "WORK";
/// Stream of dead letters (`deadletter.>`).
pub const DEADLETTER_STREAM: &str = "DEADLETTER";

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
            // Together 17 GiB, under the broker's 20 GB `max_file_store`
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
/// quotas (2.10 and later), [`provision`] makes it refuse new events
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

/// Every stream Ferry needs.
pub fn all_streams(s: &StreamSettings) -> Vec<stream::Config> {
    vec![
        events_stream(s),
        replies_stream(s),
        work_stream(s),
        deadletter_stream(s),
    ]
}

/// A worker role: durable consumers shared by all replicas of the role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Keyword/regex rules, auto-replies, routing.
    Rules,
    /// Model replies and next-activity predictions.
    Inference,
    /// Every event and reply into PostgreSQL.
    Archiver,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 3] = [Role::Rules, Role::Inference, Role::Archiver];

    /// The role's name (also its service name suffix).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rules => "rules",
            Self::Inference => "inference",
            Self::Archiver => "archiver",
        }
    }

    /// The durable consumers every replica of this role pulls from.
    pub fn consumers(self) -> Vec<ConsumerDef> {
        match self {
            Self::Rules => vec![rules_consumer()],
            Self::Inference => vec![inference_chat_consumer(), inference_predict_consumer()],
            Self::Archiver => vec![archiver_events_consumer(), archiver_replies_consumer()],
        }
    }
}

/// `EVENTS/rules`: every event, for the rules worker.
pub fn rules_consumer() -> ConsumerDef {
    ConsumerDef {
        stream: EVENTS_STREAM,
        config: pull::Config {
            durable_name: Some("rules".into()),
            description: Some("Rules worker: chat and activity rules.".into()),
            // Rules look at every kind (chat and activity now; metric rules
            // over heartbeats later) and ack the rest at once. No filter
            // rather than `events.>` (the stream's own subject): the same
            // messages, but nats-server 2.9 delivers to unfiltered consumers
            // about 3.5x faster (measured with `ferry bench archiver`).
            filter_subject: String::new(),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            // A rule takes microseconds; 30 s only covers a stalled reply
            // publish before another replica gets the event.
            ack_wait: Duration::from_secs(30),
            // A retry (PostgreSQL away for a customer-tag rule, a reply
            // publish not acknowledged) waits 1 s, doubling per delivery up
            // to 30 s (the workers' `retry_backoff_max`): ten deliveries
            // span about 2.5 minutes, so a PostgreSQL restart or a short
            // outage does not turn chats into dead letters; a replica killed
            // with messages in hand costs each of them one delivery.
            max_deliver: 10,
            // Shared by all replicas: the most events the role holds
            // unacknowledged at once. A killed replica's events (up to its
            // `--concurrency`, 256) count here until `ack_wait` passes: with
            // a kill every 2 s (`ferry chaos worker-kill`) that is up to
            // 15 x 256 = 3840 stranded, so 8192 leaves the live replicas
            // room instead of stalling the role.
            max_ack_pending: 8192,
            max_waiting: 512,
            ..Default::default()
        },
    }
}

/// How long the broker waits for an inference ack. A live replica sends
/// in-progress acks every third of it while it generates (however long a
/// generation takes), so this only bounds how long the chats of a replica
/// that died wait before another replica gets them: with 300 s, one SIGKILL
/// held its chats back five minutes (`ferry chaos inference-kill`).
pub const INFERENCE_ACK_WAIT: Duration = Duration::from_secs(30);

fn inference_consumer(name: &str, stream: &'static str, filter: String, what: &str) -> ConsumerDef {
    ConsumerDef {
        stream,
        config: pull::Config {
            durable_name: Some(name.into()),
            description: Some(format!("Inference worker: {what}.")),
            filter_subject: filter,
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: INFERENCE_ACK_WAIT,
            // A delivery is spent by each crash of the replica holding the
            // message (a model timeout is answered with the apology, not
            // retried). Three did not survive replicas killed every few
            // seconds; ten does, and a message that kills every replica that
            // takes it still reaches dead letters (`max_deliver`).
            max_deliver: 10,
            // Generation is slow: few messages out at once across replicas.
            max_ack_pending: 64,
            max_waiting: 64,
            ..Default::default()
        },
    }
}

/// `WORK/inference-chat`: chats the rules worker handed to inference.
pub fn inference_chat_consumer() -> ConsumerDef {
    inference_consumer(
        "inference-chat",
        WORK_STREAM,
        subject::WorkQueue::InferenceChat.subject().to_string(),
        "chat replies",
    )
}

/// `EVENTS/inference-predict`: prediction requests from agents.
pub fn inference_predict_consumer() -> ConsumerDef {
    inference_consumer(
        "inference-predict",
        EVENTS_STREAM,
        subject::events_of_kind(EventKind::Predict).to_string(),
        "next-activity predictions",
    )
}

/// How long the broker waits for an archiver ack. A batch commits in
/// milliseconds; while PostgreSQL is down the archiver holds its messages
/// and sends in-progress acks, so this only bounds how long a dead replica's
/// messages wait before another replica gets them.
pub const ARCHIVER_ACK_WAIT: Duration = Duration::from_secs(60);

fn archiver_consumer(name: &str, stream: &'static str, filter: String, what: &str) -> ConsumerDef {
    ConsumerDef {
        stream,
        config: pull::Config {
            durable_name: Some(name.into()),
            description: Some(format!("Archiver: {what} into PostgreSQL.")),
            filter_subject: filter,
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: ARCHIVER_ACK_WAIT,
            // Redeliveries come from crashed replicas, not from PostgreSQL
            // outages (the archiver waits those out holding the messages), so
            // ten deliveries means the message itself kills the archiver.
            max_deliver: 10,
            // Shared by all replicas: two replicas at their default 8192
            // in flight each (four full batches each).
            max_ack_pending: 16384,
            max_waiting: 64,
            ..Default::default()
        },
    }
}

/// `EVENTS/archiver-events`: every event, for the archive.
pub fn archiver_events_consumer() -> ConsumerDef {
    // No filter: every event, served faster than `events.>` (see `rules_consumer`).
    archiver_consumer("archiver-events", EVENTS_STREAM, String::new(), "every event")
}

/// `REPLIES/archiver-replies`: every reply, for the archive.
pub fn archiver_replies_consumer() -> ConsumerDef {
    archiver_consumer("archiver-replies", REPLIES_STREAM, String::new(), "every reply")
}

/// A consumer definition: which stream and with what settings.
#[derive(Debug, Clone)]
pub struct ConsumerDef {
    /// The stream the consumer reads.
    pub stream: &'static str,
    /// Its configuration; always durable.
    pub config: pull::Config,
}

impl ConsumerDef {
    /// The consumer's durable name.
    pub fn name(&self) -> &str {
        self.config.durable_name.as_deref().unwrap_or("")
    }
}

/// Durable consumer name of an agent's replies (`agent-<id>`).
pub fn agent_replies_consumer_name(agent: &AgentId) -> String {
    format!("agent-{agent}")
}

/// The durable consumer through which `agent` reads its replies, including
/// those published while it was offline. Only that agent may pull from it.
pub fn agent_replies_consumer(agent: &AgentId) -> ConsumerDef {
    ConsumerDef {
        stream: REPLIES_STREAM,
        config: pull::Config {
            durable_name: Some(agent_replies_consumer_name(agent)),
            description: Some(format!("Replies to agent {agent}.")),
            filter_subject: subject::reply(agent).to_string(),
            deliver_policy: DeliverPolicy::All,
            // The agent reads replies live (`live.replies.<id>`) and this
            // consumer only to catch up; each reply is acked on its own, so
            // a delivery cut off by a dropped connection stays unacked and
            // comes back, rather than being covered by a later ack.
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            // A reply must reach its agent; the agent de-duplicates by reply id.
            max_deliver: -1,
            max_ack_pending: 1024,
            max_waiting: 16,
            ..Default::default()
        },
    }
}

pub use crate::permissions::{agent_permissions, role_permissions, Permissions};

/// What provisioning did to one stream or consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// It did not exist and was created.
    Created,
    /// It existed with the wanted settings.
    Unchanged,
    /// It existed and these fields were updated (`field: old -> new`).
    Updated(Vec<String>),
}

/// One line of a provisioning report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioned {
    /// `stream EVENTS` or `consumer EVENTS/rules`.
    pub what: String,
    /// What happened to it.
    pub change: Change,
}

/// Why provisioning failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The broker refused or did not answer.
    #[error("{what}: {action} failed: {source}")]
    Broker {
        /// The stream or consumer.
        what: String,
        /// `create`, `update` or `look up`.
        action: &'static str,
        /// The broker's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The existing object differs in a way the broker will not update.
    #[error("{what} exists with different settings the broker would not update ({diff}): {source}; delete it (`{delete}`, which drops what it holds) and provision again, or restore the old settings")]
    Incompatible {
        /// The stream or consumer.
        what: String,
        /// The `nats` command that deletes it.
        delete: String,
        /// The differing fields.
        diff: String,
        /// The broker's refusal.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn diff_fields(pairs: &[(&str, String, String)]) -> Vec<String> {
    pairs
        .iter()
        .filter(|(_, have, want)| have != want)
        .map(|(name, have, want)| format!("{name}: {have} -> {want}"))
        .collect()
}

fn republish_text(r: Option<&stream::Republish>) -> String {
    match r {
        None => "none".into(),
        Some(r) => format!("{} -> {}{}", r.source, r.destination, if r.headers_only { " (headers only)" } else { "" }),
    }
}

fn stream_diff(have: &stream::Config, want: &stream::Config) -> Vec<String> {
    diff_fields(&[
        (
            "subjects",
            format!("{:?}", have.subjects),
            format!("{:?}", want.subjects),
        ),
        (
            "republish",
            republish_text(have.republish.as_ref()),
            republish_text(want.republish.as_ref()),
        ),
        (
            "retention",
            format!("{:?}", have.retention),
            format!("{:?}", want.retention),
        ),
        (
            "storage",
            format!("{:?}", have.storage),
            format!("{:?}", want.storage),
        ),
        (
            "max_age",
            format!("{:?}", have.max_age),
            format!("{:?}", want.max_age),
        ),
        (
            "max_bytes",
            have.max_bytes.to_string(),
            want.max_bytes.to_string(),
        ),
        (
            "duplicate_window",
            format!("{:?}", have.duplicate_window),
            format!("{:?}", want.duplicate_window),
        ),
        (
            "max_message_size",
            have.max_message_size.to_string(),
            want.max_message_size.to_string(),
        ),
        (
            "discard",
            format!("{:?}", have.discard),
            format!("{:?}", want.discard),
        ),
        (
            "max_msgs_per_subject",
            // 0 and -1 both mean no limit.
            if have.max_messages_per_subject > 0 { have.max_messages_per_subject } else { -1 }.to_string(),
            if want.max_messages_per_subject > 0 { want.max_messages_per_subject } else { -1 }.to_string(),
        ),
        (
            "discard_new_per_subject",
            have.discard_new_per_subject.to_string(),
            want.discard_new_per_subject.to_string(),
        ),
        (
            "num_replicas",
            have.num_replicas.max(1).to_string(),
            want.num_replicas.max(1).to_string(),
        ),
    ])
}

fn consumer_diff(have: &consumer::Config, want: &pull::Config) -> Vec<String> {
    diff_fields(&[
        (
            "filter_subject",
            have.filter_subject.clone(),
            want.filter_subject.clone(),
        ),
        (
            "deliver_policy",
            format!("{:?}", have.deliver_policy),
            format!("{:?}", want.deliver_policy),
        ),
        (
            "ack_policy",
            format!("{:?}", have.ack_policy),
            format!("{:?}", want.ack_policy),
        ),
        (
            "ack_wait",
            format!("{:?}", have.ack_wait),
            format!("{:?}", want.ack_wait),
        ),
        (
            "max_deliver",
            have.max_deliver.to_string(),
            want.max_deliver.to_string(),
        ),
        (
            "max_ack_pending",
            have.max_ack_pending.to_string(),
            want.max_ack_pending.to_string(),
        ),
        (
            "backoff",
            format!("{:?}", have.backoff),
            format!("{:?}", want.backoff),
        ),
    ])
}

fn boxed<E: std::error::Error + Send + Sync + 'static>(
    e: E,
) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(e)
}

/// Creates `want` or brings an existing stream of that name in line with it.
pub async fn ensure_stream(
    js: &jetstream::Context,
    want: &stream::Config,
) -> Result<Provisioned, ProvisionError> {
    let what = format!("stream {}", want.name);
    let existing = match js.get_stream(&want.name).await {
        Ok(mut s) => Some(
            s.info()
                .await
                .map_err(|e| ProvisionError::Broker {
                    what: what.clone(),
                    action: "look up",
                    source: boxed(e),
                })?
                .config
                .clone(),
        ),
        Err(e) => match e.kind() {
            jetstream::context::GetStreamErrorKind::JetStream(js_err)
                if js_err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                None
            }
            _ => {
                return Err(ProvisionError::Broker {
                    what,
                    action: "look up",
                    source: boxed(e),
                })
            }
        },
    };
    let Some(have) = existing else {
        js.create_stream(want.clone())
            .await
            .map_err(|e| ProvisionError::Broker {
                what: what.clone(),
                action: "create",
                source: boxed(e),
            })?;
        return Ok(Provisioned {
            what,
            change: Change::Created,
        });
    };
    let diff = stream_diff(&have, want);
    if diff.is_empty() {
        return Ok(Provisioned {
            what,
            change: Change::Unchanged,
        });
    }
    js.update_stream(want.clone())
        .await
        .map_err(|e| ProvisionError::Incompatible {
            what: what.clone(),
            delete: format!("nats stream rm {} -f", want.name),
            diff: diff.join(", "),
            source: boxed(e),
        })?;
    Ok(Provisioned {
        what,
        change: Change::Updated(diff),
    })
}

/// Creates the consumer `def` or brings an existing one in line with it.
pub async fn ensure_consumer(
    js: &jetstream::Context,
    def: &ConsumerDef,
) -> Result<Provisioned, ProvisionError> {
    let what = format!("consumer {}/{}", def.stream, def.name());
    let stream = js
        .get_stream_no_info(def.stream)
        .await
        .map_err(|e| ProvisionError::Broker {
            what: what.clone(),
            action: "look up stream",
            source: boxed(e),
        })?;
    let existing = match stream.consumer_info(def.name()).await {
        Ok(info) => Some(info.config.clone()),
        Err(e) => match e.kind() {
            jetstream::context::ConsumerInfoErrorKind::NotFound => None,
            _ => {
                return Err(ProvisionError::Broker {
                    what,
                    action: "look up",
                    source: boxed(e),
                })
            }
        },
    };
    let change = match existing {
        None => Change::Created,
        Some(have) => {
            let diff = consumer_diff(&have, &def.config);
            if diff.is_empty() {
                return Ok(Provisioned {
                    what,
                    change: Change::Unchanged,
                });
            }
            Change::Updated(diff)
        }
    };
    let created = stream.create_consumer(def.config.clone()).await;
    match (created, change) {
        (Ok(_), change) => Ok(Provisioned { what, change }),
        (Err(e), Change::Updated(diff)) => Err(ProvisionError::Incompatible {
            what,
            delete: format!("nats consumer rm {} {} -f", def.stream, def.name()),
            diff: diff.join(", "),
            source: boxed(e),
        }),
        (Err(e), _) => Err(ProvisionError::Broker {
            what,
            action: "create",
            source: boxed(e),
        }),
    }
}

/// Deletes `agent`'s reply consumer (`REPLIES/agent-<id>`), with the replies
/// it still held for the agent; `Ok(false)` when it did not exist.
pub async fn remove_agent_consumer(
    js: &jetstream::Context,
    agent: &AgentId,
) -> Result<bool, ProvisionError> {
    let name = agent_replies_consumer_name(agent);
    let what = format!("consumer {REPLIES_STREAM}/{name}");
    let stream = js
        .get_stream_no_info(REPLIES_STREAM)
        .await
        .map_err(|e| ProvisionError::Broker {
            what: what.clone(),
            action: "look up stream",
            source: boxed(e),
        })?;
    match stream.delete_consumer(&name).await {
        Ok(_) => Ok(true),
        Err(e) => match e.kind() {
            jetstream::stream::ConsumerErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND =>
            {
                Ok(false)
            }
            _ => Err(ProvisionError::Broker {
                what,
                action: "delete",
                source: boxed(e),
            }),
        },
    }
}

/// Provisions every stream, every role's consumer, and the reply consumer of
/// each agent in `agents`. Safe to run any number of times. The per-agent
/// cap on `EVENTS` follows the version of the server `js` is connected to.
pub async fn provision(
    js: &jetstream::Context,
    settings: &StreamSettings,
    agents: &[AgentId],
) -> Result<Vec<Provisioned>, ProvisionError> {
    let mut report = Vec::new();
    let version = js.client().server_info().version;
    for mut s in all_streams(settings) {
        if s.name == EVENTS_STREAM {
            crate::quota::apply(&mut s, settings, &version);
        }
        report.push(ensure_stream(js, &s).await?);
    }
    for role in Role::ALL {
        for def in role.consumers() {
            report.push(ensure_consumer(js, &def).await?);
        }
    }
    for agent in agents {
        report.push(ensure_consumer(js, &agent_replies_consumer(agent)).await?);
    }
    Ok(report)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// Every stream is bounded in bytes and age, together within the
    /// broker's file store (nats.conf's `max_file_store: 20GB`, read in
    /// decimal gigabytes, the smaller reading), and the work queue refuses
    /// new hand-offs rather than evicting unprocessed ones (the events do
    /// where the server enforces quotas: `crate::quota`'s tests).
    #[test]
    fn every_stream_is_bounded_and_all_fit_the_broker_store() {
        let s = StreamSettings::default();
        let mut total = 0i64;
        for c in all_streams(&s) {
            assert!(c.max_bytes > 0, "{} has no byte cap", c.name);
            assert!(c.max_age > Duration::ZERO, "{} has no age cap", c.name);
            total += c.max_bytes;
        }
        let conf = include_str!("../../nats.conf");
        assert!(conf.contains("max_file_store: 20GB"));
        assert!(total <= 20_000_000_000, "{total} bytes of streams in a 20 GB store");
        assert_eq!(work_stream(&s).discard, DiscardPolicy::New);
        assert_eq!(events_stream(&s).discard, DiscardPolicy::Old);
    }
}

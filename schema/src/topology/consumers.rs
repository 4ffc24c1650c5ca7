//! The consumers: each worker role's durable consumers and each agent's reply consumer.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};

use super::{ALERTS_STREAM, EVENTS_STREAM, REPLIES_STREAM, WORK_STREAM};
use crate::{subject, AgentId, EventKind};

/// A worker role: durable consumers shared by all replicas of the role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Keyword/regex rules, auto-replies, routing.
    Rules,
    /// Model replies and next-activity predictions.
    Inference,
    /// Every event, reply and alert into PostgreSQL.
    Archiver,
    /// Alert rules over interactions and heartbeats; webhooks.
    Alerts,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 4] = [Role::Rules, Role::Inference, Role::Archiver, Role::Alerts];

    /// The role's name (also its service name suffix).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rules => "rules",
            Self::Inference => "inference",
            Self::Archiver => "archiver",
            Self::Alerts => "alerts",
        }
    }

    /// The durable consumers every replica of this role pulls from.
    pub fn consumers(self) -> Vec<ConsumerDef> {
        match self {
            Self::Rules => vec![rules_consumer()],
            Self::Inference => vec![inference_chat_consumer(), inference_predict_consumer()],
            Self::Archiver => vec![
                archiver_events_consumer(),
                archiver_replies_consumer(),
                archiver_alerts_consumer(),
            ],
            // Its rules read EVENTS through ordered consumers of their own
            // (every replica sees every event: see the alerts module).
            Self::Alerts => vec![alerts_notify_consumer()],
        }
    }
}

/// Every worker role's durable consumers, each once, in role order: what
/// a consumer-lag alert rule can watch.
pub fn worker_consumers() -> Vec<ConsumerDef> {
    Role::ALL.into_iter().flat_map(Role::consumers).collect()
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

/// `ALERTS/archiver-alerts`: every alert, for the `alert_log` table.
pub fn archiver_alerts_consumer() -> ConsumerDef {
    archiver_consumer("archiver-alerts", ALERTS_STREAM, String::new(), "every alert")
}

/// `ALERTS/alerts-notify`: every alert, for its webhooks; shared by the
/// alerts replicas, so each alert is delivered by one of them.
pub fn alerts_notify_consumer() -> ConsumerDef {
    ConsumerDef {
        stream: ALERTS_STREAM,
        config: pull::Config {
            durable_name: Some("alerts-notify".into()),
            description: Some("Alerts: deliver each alert to the webhooks.".into()),
            filter_subject: String::new(),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            // A delivery tries every webhook once (each bounded by the
            // webhook timeout, 10 s) and naks what failed with a back-off
            // of 1 s doubling to 30 s: twelve deliveries span about five
            // minutes of a receiver being away before the alert is a dead
            // letter (with the receiver's last answer as the reason).
            ack_wait: Duration::from_secs(60),
            max_deliver: 12,
            max_ack_pending: 256,
            max_waiting: 64,
            ..Default::default()
        },
    }
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

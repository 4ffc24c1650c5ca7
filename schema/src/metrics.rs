//! The name of every Prometheus metric a Ferry process exports, in this one module.
//!
//! Workers (`ferry-worker --metrics-listen`, served by `ferry_workers::metrics`):
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `ferry_worker_messages_total` | counter | role, consumer, replica, outcome | messages handled, by outcome (`done`, `retry`, `poison`) |
//! | `ferry_worker_handling_seconds` | histogram | role, consumer, replica | time from delivery to ack decision |
//! | `ferry_worker_busy_seconds_total` | counter | role, consumer, replica | seconds spent handling, summed over messages (the micro service's average handling time is this over the messages) |
//! | `ferry_worker_in_flight` | gauge | role, consumer, replica | messages being handled now |
//! | `ferry_worker_ack_failures_total` | counter | role, consumer, replica | acks that did not reach the broker |
//! | `ferry_worker_model_tokens_total` | counter | role, model, replica | tokens generated (inference) |
//! | `ferry_worker_consumer_pending` | gauge | role, consumer | messages not yet delivered (lag), as the worker last saw it |
//! | `ferry_worker_consumer_ack_pending` | gauge | role, consumer | delivered, not yet acknowledged |
//! | `ferry_worker_consumer_redelivered` | gauge | role, consumer | delivered more than once, not yet acknowledged |
//! | `ferry_worker_loop_up` | gauge | role, consumer, replica | 1 while the consume loop pulls, 0 while it gets its consumer back |
//!
//! `replica` is the replica's number in its process: `0` in a deployment
//! (one replica per process), `0`, `1`, ... where tests run several. A
//! replica's series are also its micro-service counters (`ferry stats`).
//!
//! The agent (`ferry-agent run --metrics-listen`, served by `ferry_agent::metrics`):
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `ferry_agent_spool_events` | gauge | | events in the spool, waiting for JetStream |
//! | `ferry_agent_spool_bytes` | gauge | | bytes of sealed records in the spool |
//! | `ferry_agent_spool_oldest_unsent_seconds` | gauge | | age of the oldest event in the spool (0 when empty) |
//! | `ferry_agent_spool_dropped_total` | counter | | events deleted unsent because the spool was full (`drop-oldest`) |
//! | `ferry_agent_published_total` | counter | | events JetStream acknowledged |
//! | `ferry_agent_replies_total` | counter | | replies acted on |
//! | `ferry_agent_component_up` | gauge | component | 1 when `desktop`, `chat-adapter`, `broker` or `spool` is fine |
//!
//! Counters are named without `_total`: the encoder adds it.

/// Messages handled, by outcome.
pub const WORKER_MESSAGES: &str = "ferry_worker_messages";
/// Handling time.
pub const WORKER_HANDLING_SECONDS: &str = "ferry_worker_handling_seconds";
/// Time spent handling, summed over messages (busy time).
pub const WORKER_BUSY_SECONDS: &str = "ferry_worker_busy_seconds";
/// Messages in flight.
pub const WORKER_IN_FLIGHT: &str = "ferry_worker_in_flight";
/// Acks that failed.
pub const WORKER_ACK_FAILURES: &str = "ferry_worker_ack_failures";
/// Model tokens generated.
pub const WORKER_MODEL_TOKENS: &str = "ferry_worker_model_tokens";
/// Consumer lag: not yet delivered.
pub const WORKER_CONSUMER_PENDING: &str = "ferry_worker_consumer_pending";
/// Delivered, not yet acknowledged.
pub const WORKER_CONSUMER_ACK_PENDING: &str = "ferry_worker_consumer_ack_pending";
/// Redelivered, not yet acknowledged.
pub const WORKER_CONSUMER_REDELIVERED: &str = "ferry_worker_consumer_redelivered";
/// Gauge per consume loop: 1 while it is bound to its consumer and pulling,
/// 0 while it is getting a lost consumer back.
pub const WORKER_LOOP_UP: &str = "ferry_worker_loop_up";

/// Events in the agent's spool.
pub const AGENT_SPOOL_EVENTS: &str = "ferry_agent_spool_events";
/// Bytes in the agent's spool.
pub const AGENT_SPOOL_BYTES: &str = "ferry_agent_spool_bytes";
/// Age of the oldest unsent event, seconds.
pub const AGENT_SPOOL_OLDEST_SECONDS: &str = "ferry_agent_spool_oldest_unsent_seconds";
/// Events dropped unsent (`drop-oldest`).
pub const AGENT_SPOOL_DROPPED: &str = "ferry_agent_spool_dropped";
/// Events JetStream acknowledged.
pub const AGENT_PUBLISHED: &str = "ferry_agent_published";
/// Replies acted on.
pub const AGENT_REPLIES: &str = "ferry_agent_replies";
/// Replies dropped unread: not addressed to this agent, or undecodable.
pub const AGENT_REPLIES_REFUSED: &str = "ferry_agent_replies_refused";
/// 1 when a component is fine.
pub const AGENT_COMPONENT_UP: &str = "ferry_agent_component_up";

//! What one agent may put into the broker, and the keeper that frees processed history so a quota counts unprocessed events.
//!
//! Three limits, each enforced by the broker:
//!
//! - **Size of one message and connections** (every server): each agent
//!   has an account of its own (a slot of `nats.conf`'s pool) whose
//!   `max_payload` is [`AGENT_MAX_PAYLOAD`], so the broker closes the
//!   connection of an agent that sends more, and whose `max_connections`,
//!   [`AGENT_MAX_CONNECTIONS`], bounds what one agent (or its stolen key)
//!   can hold; all [`AGENT_SLOTS`] together stay below the server's limit,
//!   so the workers and operators always get in.
//! - **Events per agent and kind** (nats-server 2.10 and later, see
//!   [`enforced`]): `EVENTS` keeps at most
//!   `StreamSettings::agent_kind_max_msgs` messages on each
//!   `events.<agent>.<kind>` and refuses the next one
//!   (`discard_new_per_subject`). Agents may publish only the five kinds'
//!   subjects ([`agent_event_subjects`]), so the cap bounds each agent.
//! - **The store** (2.10 and later): `EVENTS` is `discard: new`, so a full
//!   stream refuses new events instead of evicting old ones that no worker
//!   has processed.
//!
//! A refused agent keeps its events in its spool and tries again with
//! back-off. Because `EVENTS` also keeps history for replay, a cap on what
//! is stored would in time refuse an agent whose events were long
//! processed; the keeper ([`trim_processed`], run by the archiver) purges,
//! from any subject near its cap and from the whole stream when it nears
//! its byte limit, the events every Ferry consumer has already acked. What
//! counts against a quota is then what the workers have not yet processed,
//! plus whatever history there is room for.
//!
//! On an older server (Debian's 2.9.10) none of the last two can be had
//! safely: a per-subject limit there deletes the subject's oldest message
//! (maybe unprocessed) instead of refusing, and a purge moves consumers
//! past messages they were still to get (`a_flooding_agent_...` in
//! `agent/tests/quotas.rs` lost 33 events that way). There `EVENTS` keeps
//! `discard: old`, with no cap and no keeper: a flood can evict others'
//! unprocessed events.

use std::collections::HashMap;

use async_nats::jetstream::{self, stream};
use futures::TryStreamExt;

use crate::codec::DEFAULT_MAX_PAYLOAD;
use crate::topology::{self, StreamSettings, EVENTS_STREAM};
use crate::{subject, AgentId, EventKind};

/// The largest message an agent may send (`max_payload` of
/// `AGENT_LIMITS` in `nats.conf`, every agent account's limits): Ferry's
/// codec limit plus room for headers.
pub const AGENT_MAX_PAYLOAD: usize = DEFAULT_MAX_PAYLOAD + 4 * 1024;

/// Connections one agent may hold at once (`max_connections` of
/// `AGENT_LIMITS`). nats-server limits connections per account, not per
/// user, so each agent has an account of its own. An agent needs one; the
/// rest is room for reconnects while the broker has yet to notice the old
/// connection is dead.
pub const AGENT_MAX_CONNECTIONS: u32 = 8;

/// Agent accounts in the committed `nats.conf` (`AGENT_0001` ...): how many
/// agents a broker takes before `ferry agent slots` must grow the pool. The
/// slots exist from the broker's start because an account that a config
/// reload adds gets no working imports (nats-server 2.9.10 to 2.15.1) until
/// a restart, and `ferry agent add` must not restart the broker.
pub const AGENT_SLOTS: u32 = 1000;

/// Connections kept for the workers and operators: however many
/// connections every agent slot holds, at most
/// `SERVER_MAX_CONNECTIONS - WORKER_CONNECTIONS`.
pub const WORKER_CONNECTIONS: u32 = 1000;

/// The server's `max_connections` in `nats.conf`.
pub const SERVER_MAX_CONNECTIONS: u32 = 10_000;

// Every agent slot at its limit still leaves the workers theirs.
const _: () = assert!(AGENT_SLOTS * AGENT_MAX_CONNECTIONS + WORKER_CONNECTIONS <= SERVER_MAX_CONNECTIONS);

/// The keeper frees processed history from a subject holding this share
/// (percent) of its cap, and from `EVENTS` once it holds this share of its
/// bytes.
pub const TRIM_AT_PERCENT: u64 = 80;

/// The subjects `agent` may publish its events on: one per kind, so the
/// per-subject cap bounds the agent as a whole.
pub fn agent_event_subjects(agent: &AgentId) -> Vec<String> {
    EventKind::ALL.iter().map(|k| subject::event(agent, *k).to_string()).collect()
}

/// True for a nats-server that can enforce the agents' quotas (2.10 and
/// later): one that refuses a message beyond a subject's limit
/// (`discard_new_per_subject`) rather than deleting the subject's oldest,
/// and whose filtered purge leaves consumers where they were.
pub fn enforced(server_version: &str) -> bool {
    let mut parts = server_version.trim_start_matches('v').split(['.', '-']);
    let major = parts.next().and_then(|p| p.parse::<u32>().ok());
    let minor = parts.next().and_then(|p| p.parse::<u32>().ok());
    matches!((major, minor), (Some(m), Some(n)) if m > 2 || (m == 2 && n >= 10))
}

/// Applies the agents' quotas to `EVENTS`' config for a server of
/// `server_version`: refuse when full, and cap each agent and kind. On an
/// older server (see [`enforced`]) the config stays as it is.
pub fn apply(events: &mut stream::Config, settings: &StreamSettings, server_version: &str) {
    if enforced(server_version) {
        events.discard = stream::DiscardPolicy::New;
        if settings.agent_kind_max_msgs > 0 {
            events.max_messages_per_subject = settings.agent_kind_max_msgs;
            events.discard_new_per_subject = true;
        }
    }
}

/// Where one consumer stands, as far as the keeper cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerPosition {
    /// Its filter (empty: every subject of the stream).
    pub filter: String,
    /// Messages it has not been delivered yet.
    pub num_pending: u64,
    /// Messages delivered and not yet acked.
    pub num_ack_pending: usize,
    /// Every message at or below this stream sequence is acked.
    pub ack_floor: u64,
}

/// The first stream sequence that some consumer covering `subject` (a
/// subject or a filter with wildcards) has not processed: everything on
/// `subject` below it is processed by all. `last_seq` is the stream's last
/// sequence, read *before* the positions, so a message stored after it is
/// never below the result.
pub fn processed_below(subject: &str, last_seq: u64, consumers: &[ConsumerPosition]) -> u64 {
    consumers
        .iter()
        .filter(|c| overlaps(&c.filter, subject))
        .map(|c| {
            if c.num_pending == 0 && c.num_ack_pending == 0 {
                last_seq + 1
            } else {
                c.ack_floor + 1
            }
        })
        .fold(last_seq + 1, u64::min)
}

/// Whether the filter `filter` (empty: all) can match a message that
/// `subject` can match; wildcards on either side count as matching.
fn overlaps(filter: &str, subject: &str) -> bool {
    if filter.is_empty() {
        return true;
    }
    let (mut f, mut s) = (filter.split('.'), subject.split('.'));
    loop {
        match (f.next(), s.next()) {
            (None, None) => return true,
            (Some(">"), _) | (_, Some(">")) => return true,
            (Some(a), Some(b)) if a == "*" || b == "*" || a == b => {}
            _ => return false,
        }
    }
}

/// One purge the keeper makes: the messages on `filter` below `below`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trim {
    /// A subject or a per-kind filter (`events.*.chat`).
    pub filter: String,
    /// The first sequence kept.
    pub below: u64,
}

/// What the keeper should purge, from the stream's state and the
/// consumers' positions: every subject at `TRIM_AT_PERCENT` of `cap`, and
/// every kind when the stream holds `TRIM_AT_PERCENT` of `max_bytes`.
/// Nothing at all while a consumer's position is unknown (`None`).
pub fn plan(
    bytes: u64,
    max_bytes: i64,
    last_seq: u64,
    cap: i64,
    subject_counts: &HashMap<String, u64>,
    consumers: Option<&[ConsumerPosition]>,
) -> Vec<Trim> {
    let Some(consumers) = consumers else { return Vec::new() };
    let mut trims = Vec::new();
    let near = |have: u64, limit: i64| limit > 0 && have * 100 >= limit as u64 * TRIM_AT_PERCENT;
    if near(bytes, max_bytes) {
        for kind in EventKind::ALL {
            let filter = subject::events_of_kind(kind).to_string();
            trims.push(Trim { below: processed_below(&filter, last_seq, consumers), filter });
        }
    } else {
        let mut hot: Vec<_> = subject_counts.iter().filter(|(_, n)| near(**n, cap)).collect();
        hot.sort();
        for (s, _) in hot {
            trims.push(Trim { below: processed_below(s, last_seq, consumers), filter: s.clone() });
        }
    }
    // A purge below the first sequence removes nothing.
    trims.retain(|t| t.below > 1);
    trims
}

/// What one pass of the keeper did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trimmed {
    /// Purges made.
    pub purges: usize,
    /// Messages they removed.
    pub messages: u64,
}

/// Why a keeper pass failed (it is tried again on the next tick).
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    /// The broker refused or did not answer.
    #[error("{action}: {source}")]
    Broker {
        /// What was asked.
        action: String,
        /// The broker's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn broker<E: std::error::Error + Send + Sync + 'static>(action: impl Into<String>) -> impl FnOnce(E) -> KeeperError {
    let action = action.into();
    move |e| KeeperError::Broker { action, source: Box::new(e) }
}

/// One pass of the keeper: purges from `EVENTS` what every Ferry consumer
/// of it has processed, where [`plan`] says so; nothing on a server that
/// does not enforce quotas. Safe to run from several replicas at once: a
/// purge only removes what all consumers acked.
pub async fn trim_processed(js: &jetstream::Context) -> Result<Trimmed, KeeperError> {
    if !enforced(&js.client().server_info().version) {
        // No quotas to serve, and purges there are not safe (see above).
        return Ok(Trimmed::default());
    }
    let stream = js.get_stream(EVENTS_STREAM).await.map_err(broker("EVENTS info"))?;
    let info = stream.cached_info().clone();
    let cap = info.config.max_messages_per_subject;
    let near_cap = cap > 0 && info.state.messages * 100 >= cap as u64 * TRIM_AT_PERCENT;
    let mut counts = HashMap::new();
    if near_cap {
        // Only then can a subject be near its cap: one stream-info page
        // listing per-subject counts, not one per tick.
        let mut subjects = stream
            .info_with_subjects(subject::all_events().as_str())
            .await
            .map_err(broker("EVENTS subjects"))?;
        while let Some((s, n)) = subjects.try_next().await.map_err(broker("EVENTS subjects"))? {
            counts.insert(s, n as u64);
        }
    }
    let mut positions = Vec::new();
    for def in events_consumers() {
        match stream.consumer_info(def.name()).await {
            Ok(c) => positions.push(ConsumerPosition {
                filter: c.config.filter_subject.clone(),
                num_pending: c.num_pending,
                num_ack_pending: c.num_ack_pending,
                ack_floor: c.ack_floor.stream_sequence,
            }),
            Err(e) => {
                // Without every position nothing can be called processed.
                tracing::debug!(consumer = def.name(), error = %e, "consumer position unknown; not trimming");
                return Ok(Trimmed::default());
            }
        }
    }
    let trims = plan(info.state.bytes, info.config.max_bytes, info.state.last_sequence, cap, &counts, Some(&positions));
    let mut done = Trimmed::default();
    for t in trims {
        let purged = stream
            .purge()
            .filter(t.filter.clone())
            .sequence(t.below)
            .await
            .map_err(broker(format!("purge {} below {}", t.filter, t.below)))?;
        if purged.purged > 0 {
            tracing::info!(filter = %t.filter, below = t.below, purged = purged.purged, "processed history trimmed");
        }
        done.purges += 1;
        done.messages += purged.purged;
    }
    Ok(done)
}

/// What the keeper (the archiver's user) may do besides its consumers:
/// read `EVENTS`' state and its consumers' positions, and purge it.
pub fn keeper_publish() -> Vec<String> {
    let mut allow = vec![
        format!("$JS.API.STREAM.INFO.{EVENTS_STREAM}"),
        format!("$JS.API.STREAM.PURGE.{EVENTS_STREAM}"),
    ];
    for def in events_consumers() {
        allow.push(format!("$JS.API.CONSUMER.INFO.{EVENTS_STREAM}.{}", def.name()));
    }
    allow
}

/// Every role's consumers of `EVENTS`: whose positions say what is processed.
fn events_consumers() -> impl Iterator<Item = topology::ConsumerDef> {
    topology::Role::ALL
        .into_iter()
        .flat_map(|role| role.consumers())
        .filter(|d| d.stream == EVENTS_STREAM)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pos(filter: &str, pending: u64, ack_pending: usize, floor: u64) -> ConsumerPosition {
        ConsumerPosition { filter: filter.into(), num_pending: pending, num_ack_pending: ack_pending, ack_floor: floor }
    }

    #[test]
    fn only_2_10_and_later_enforce_quotas() {
        for (v, want) in [("2.9.10", false), ("2.9.25", false), ("2.10.0", true), ("2.10.26", true), ("2.15.1", true), ("v2.11.0-RC.1", true), ("3.0.0", true), ("", false), ("garbage", false)] {
            assert_eq!(enforced(v), want, "{v}");
        }
    }

    #[test]
    fn quotas_are_applied_only_where_the_server_refuses_rather_than_evicts() {
        let s = StreamSettings::default();
        let mut old = topology::events_stream(&s);
        apply(&mut old, &s, "2.9.10");
        assert_eq!(
            (old.discard, old.max_messages_per_subject, old.discard_new_per_subject),
            (stream::DiscardPolicy::Old, -1, false)
        );
        let mut new = topology::events_stream(&s);
        apply(&mut new, &s, "2.10.26");
        assert_eq!(
            (new.discard, new.max_messages_per_subject, new.discard_new_per_subject),
            (stream::DiscardPolicy::New, s.agent_kind_max_msgs, true)
        );
    }

    #[test]
    fn the_agent_account_limits_in_nats_conf_are_the_ones_here() {
        let conf = include_str!("../../nats.conf");
        assert!(conf.contains(&format!(
            "\nAGENT_LIMITS = {{ max_payload: {AGENT_MAX_PAYLOAD}, max_connections: {AGENT_MAX_CONNECTIONS} }}\n"
        )));
        assert!(conf.contains(&format!("\nmax_connections: {SERVER_MAX_CONNECTIONS}\n")));
        let slots = conf.lines().filter(|l| l.trim_start().starts_with("AGENT_") && l.contains("limits: $AGENT_LIMITS")).count();
        assert_eq!(slots, AGENT_SLOTS as usize, "one account per slot, each with the agents' limits");
    }

    #[test]
    fn an_agent_may_publish_only_one_subject_per_kind() {
        let a = AgentId::new("desk-1").unwrap();
        assert_eq!(
            agent_event_subjects(&a),
            [
                "events.desk-1.chat",
                "events.desk-1.activity",
                "events.desk-1.heartbeat",
                "events.desk-1.predict",
                "events.desk-1.interaction"
            ]
        );
    }

    #[test]
    fn processed_means_acked_by_every_consumer_that_covers_the_subject() {
        let c = [pos("", 5, 2, 100), pos("", 0, 0, 40), pos("events.*.predict", 3, 0, 7)];
        // rules at 100, archiver idle (all processed), predict not covering chat.
        assert_eq!(processed_below("events.desk-1.chat", 500, &c), 101);
        // predict covers predict events: its floor holds them.
        assert_eq!(processed_below("events.desk-1.predict", 500, &c), 8);
        assert_eq!(processed_below("events.*.predict", 500, &c), 8);
        // An idle consumer holds nothing back; none at all: everything so far.
        assert_eq!(processed_below("events.desk-1.chat", 500, &[pos("", 0, 0, 3)]), 501);
        // Unacked deliveries hold the floor even with nothing pending.
        assert_eq!(processed_below("events.desk-1.chat", 500, &[pos("", 0, 1, 3)]), 4);
    }

    #[test]
    fn the_plan_trims_hot_subjects_or_every_kind_and_nothing_without_positions() {
        let c = [pos("", 10, 0, 300)];
        let counts: HashMap<String, u64> =
            [("events.a.chat".to_string(), 80), ("events.b.chat".to_string(), 79)].into();
        assert_eq!(
            plan(0, 1000, 400, 100, &counts, Some(&c)),
            vec![Trim { filter: "events.a.chat".into(), below: 301 }]
        );
        // The store near full: every kind, whatever the subjects.
        let all = plan(800, 1000, 400, 100, &HashMap::new(), Some(&c));
        assert_eq!(all.len(), EventKind::ALL.len());
        assert!(all.iter().all(|t| t.below == 301 && t.filter.starts_with("events.*.")));
        // Nothing processed yet, or a position unknown: no purge.
        assert!(plan(800, 1000, 400, 100, &counts, Some(&[pos("", 10, 0, 0)])).is_empty());
        assert!(plan(800, 1000, 400, 100, &counts, None).is_empty());
        // No cap: subjects are never hot.
        assert!(plan(0, 1000, 400, -1, &counts, Some(&c)).is_empty());
    }
}

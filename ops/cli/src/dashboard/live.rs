//! What the dashboard knows now: agents and their last heartbeat, traffic per second by kind, reply latency, interactions, inference, the pipeline's lag and dead letters, alerts; and the snapshot a page gets.

use std::collections::{BTreeMap, HashMap, VecDeque};

use chrono::{DateTime, Utc};
use ferry_schema::alert::{Alert, AlertState};
use ferry_schema::codec;
use ferry_schema::event::Interaction;
use ferry_schema::reply::ResponderKind;
use ferry_schema::{headers, Encoding, EventBody, EventKind, ReplyBody};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::stats::ConsumerLag;

/// An agent with no heartbeat for this long shows as offline (three
/// missed heartbeats at the agent's default 30 s).
pub const OFFLINE_AFTER: chrono::Duration = chrono::Duration::seconds(90);
/// Seconds of per-second traffic a snapshot carries (the live chart).
pub const SERIES_SECONDS: usize = 300;
/// Alerts kept for the history list.
pub const RECENT_ALERTS: usize = 50;
/// Response times and reply latencies kept for the percentiles.
pub const SAMPLES: usize = 1000;
/// Events remembered while their reply is awaited (for the reply latency);
/// the oldest are forgotten beyond it.
pub const AWAITING: usize = 100_000;
/// Seconds over which tokens per second are averaged.
pub const TOKENS_OVER_SECONDS: usize = 10;
/// The event kinds the dashboard reads one by one (`events.*.<kind>`):
/// those a person acts on or reads whole, at human pace. Activity samples,
/// the collectors' steady volume, are not read: they are counted from
/// `EVENTS`' last sequence ([`Live::stored_through`]), so the dashboard
/// costs the broker and itself nothing per activity event.
pub const READ_KINDS: [EventKind; 4] = [EventKind::Chat, EventKind::Heartbeat, EventKind::Predict, EventKind::Interaction];
/// The kind counted from the stream's state instead of read.
pub const COUNTED_KIND: EventKind = EventKind::Activity;

#[derive(Debug, Default, Clone)]
struct Agent {
    last_seen: Option<DateTime<Utc>>,
    last_heartbeat: Option<DateTime<Utc>>,
    version: String,
    cpu_percent: f32,
    rss_bytes: u64,
    spool_depth: u64,
    components: Vec<Value>,
}

/// Counts of one second.
#[derive(Debug, Default, Clone)]
struct Second {
    at: i64,
    events: u64,
    replies: u64,
    interactions: u64,
    failed: u64,
    response_ms: f64,
    tokens: u64,
}

/// Interactions of one intent, model, agent or tool.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    total: u64,
    failed: u64,
    sum_ms: f64,
}

impl Tally {
    fn add(&mut self, i: &Interaction) {
        self.total += 1;
        self.failed += u64::from(!i.success);
        self.sum_ms += i.response_time_ms;
    }

    fn json(&self, key: &str, name: &str) -> Value {
        json!({key: name, "total": self.total, "failed": self.failed,
               "mean_ms": if self.total == 0 { 0.0 } else { self.sum_ms / self.total as f64 }})
    }
}

/// A bounded window of samples and its percentiles.
#[derive(Debug, Default)]
struct Samples(VecDeque<f64>);

impl Samples {
    fn push(&mut self, v: f64) {
        self.0.push_back(v);
        while self.0.len() > SAMPLES {
            self.0.pop_front();
        }
    }

    fn percentiles(&self) -> Value {
        let mut v: Vec<f64> = self.0.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        let at = |p: f64| if v.is_empty() { Value::Null } else { json!(v[((v.len() - 1) as f64 * p).round() as usize]) };
        json!({"p50": at(0.5), "p95": at(0.95), "p99": at(0.99), "n": v.len()})
    }
}

/// What the dashboard has seen.
#[derive(Debug, Default)]
pub struct Live {
    agents: BTreeMap<String, Agent>,
    by_kind: BTreeMap<&'static str, u64>,
    replies: u64,
    interactions: Tally,
    by_intent: BTreeMap<String, Tally>,
    by_model: BTreeMap<String, Tally>,
    by_agent: BTreeMap<String, Tally>,
    by_tool: BTreeMap<String, u64>,
    by_error: BTreeMap<String, u64>,
    response_ms: Samples,
    /// Events awaiting their reply: id and when seen, oldest first.
    awaiting: HashMap<Uuid, DateTime<Utc>>,
    awaiting_order: VecDeque<Uuid>,
    latency_ms: Samples,
    /// Replies by the step that answered (`model`, `kb_template`, ...).
    by_step: BTreeMap<&'static str, u64>,
    seconds: VecDeque<Second>,
    dead_by_reason: BTreeMap<String, u64>,
    consumers: Vec<ConsumerLag>,
    replicas: BTreeMap<String, u64>,
    firing: BTreeMap<String, Alert>,
    recent: VecDeque<Alert>,
    acknowledged: HashMap<Uuid, (String, DateTime<Utc>)>,
    /// `EVENTS`' last sequence when last looked at, and when.
    stream_last: Option<(u64, DateTime<Utc>)>,
    /// Events read one by one since then.
    read_since_look: u64,
}

impl Live {
    fn second(&mut self, now: DateTime<Utc>) -> &mut Second {
        let at = now.timestamp();
        if self.seconds.back().is_none_or(|s| s.at < at) {
            self.seconds.push_back(Second { at, ..Second::default() });
            while self.seconds.len() > SERIES_SECONDS {
                self.seconds.pop_front();
            }
        }
        // A time taken just before a later one was counted (threads race
        // for the lock) goes to its second, or the next one kept; never
        // out of order. Not empty: pushed above when it was.
        let i = self.seconds.partition_point(|s| s.at < at).min(self.seconds.len() - 1);
        &mut self.seconds[i]
    }

    /// The counts of second `at` (Unix seconds), made in its place when
    /// missing; `None` when it is older than the series keeps.
    fn second_at(&mut self, at: i64) -> Option<&mut Second> {
        let i = self.seconds.partition_point(|s| s.at < at);
        if self.seconds.get(i).is_none_or(|s| s.at != at) {
            if i == 0 && self.seconds.len() >= SERIES_SECONDS {
                return None;
            }
            self.seconds.insert(i, Second { at, ..Second::default() });
            if self.seconds.len() > SERIES_SECONDS {
                self.seconds.pop_front();
                return self.seconds.get_mut(i.checked_sub(1)?);
            }
        }
        self.seconds.get_mut(i)
    }

    /// `EVENTS`' last sequence is `last_seq` at `now`: the events stored
    /// since the last look that were not read one by one are the counted
    /// kind's ([`COUNTED_KIND`]), spread evenly over the seconds between
    /// the two looks. The first look only sets where counting starts.
    pub fn stored_through(&mut self, last_seq: u64, now: DateTime<Utc>) {
        let read = std::mem::take(&mut self.read_since_look);
        let Some((prev, at)) = self.stream_last.replace((last_seq, now)) else { return };
        let counted = last_seq.saturating_sub(prev).saturating_sub(read);
        if counted == 0 {
            return;
        }
        *self.by_kind.entry(COUNTED_KIND.as_str()).or_default() += counted;
        let (from, to) = (at.timestamp(), now.timestamp().max(at.timestamp()));
        let n = u64::try_from(to - from).unwrap_or(0).max(1);
        let first = if to > from { from + 1 } else { to };
        for k in 0..n {
            let share = counted * (k + 1) / n - counted * k / n;
            if let Some(s) = self.second_at(first + k as i64) {
                s.events += share;
            }
        }
    }

    /// An event as the broker delivered it on `subject`.
    pub fn event(&mut self, subject: &str, headers: Option<&async_nats::HeaderMap>, payload: &[u8], now: DateTime<Utc>) {
        let Ok((agent, kind)) = ferry_schema::subject::parse_event(subject) else { return };
        *self.by_kind.entry(kind.as_str()).or_default() += 1;
        self.read_since_look += 1;
        self.second(now).events += 1;
        if let Some(id) = headers.and_then(|h| h.get(headers::MSG_ID)).and_then(|v| Uuid::parse_str(v.as_str()).ok()) {
            self.await_reply(id, now);
        }
        let a = self.agents.entry(agent.as_str().to_string()).or_default();
        a.last_seen = Some(now);
        if !matches!(kind, EventKind::Heartbeat | EventKind::Interaction) {
            return;
        }
        let Ok(m) = codec::decode_event_message(subject, headers, payload, codec::DEFAULT_MAX_PAYLOAD, None) else { return };
        match m.env.body {
            EventBody::Heartbeat(h) => {
                a.last_heartbeat = Some(now);
                a.version = h.version;
                a.cpu_percent = h.cpu_percent;
                a.rss_bytes = h.rss_bytes;
                a.spool_depth = h.spool_depth;
                a.components = h.components.iter().map(|c| serde_json::to_value(c).unwrap_or(Value::Null)).collect();
            }
            EventBody::Interaction(i) => self.interaction(agent.as_str(), &i, now),
            _ => {}
        }
    }

    fn await_reply(&mut self, id: Uuid, now: DateTime<Utc>) {
        if self.awaiting.insert(id, now).is_none() {
            self.awaiting_order.push_back(id);
        }
        while self.awaiting_order.len() > AWAITING {
            if let Some(old) = self.awaiting_order.pop_front() {
                self.awaiting.remove(&old);
            }
        }
    }

    /// An interaction of `agent`: an assistant's, or Ferry's own answer.
    fn interaction(&mut self, agent: &str, i: &Interaction, now: DateTime<Utc>) {
        self.interactions.add(i);
        self.by_intent.entry(i.intent.clone().unwrap_or_else(|| "(none)".into())).or_default().add(i);
        if let Some(m) = &i.model {
            self.by_model.entry(m.clone()).or_default().add(i);
        }
        self.by_agent.entry(agent.to_string()).or_default().add(i);
        for t in &i.tools_used {
            *self.by_tool.entry(t.clone()).or_default() += 1;
        }
        if let Some(e) = &i.error_type {
            *self.by_error.entry(e.clone()).or_default() += 1;
        }
        self.response_ms.push(i.response_time_ms);
        let s = self.second(now);
        s.interactions += 1;
        s.failed += u64::from(!i.success);
        s.response_ms += i.response_time_ms;
    }

    /// A reply as the broker delivered it.
    pub fn reply(&mut self, headers: Option<&async_nats::HeaderMap>, payload: &[u8], now: DateTime<Utc>) {
        let Ok(enc) = Encoding::of(headers, payload) else { return };
        self.replies += 1;
        self.second(now).replies += 1;
        let Ok(r) = codec::decode_reply(payload, enc, codec::DEFAULT_MAX_PAYLOAD) else { return };
        if let Some(seen) = self.awaiting.remove(&r.in_reply_to.0) {
            self.latency_ms.push((now - seen).num_microseconds().unwrap_or(0) as f64 / 1000.0);
        }
        let step = match &r.body {
            ReplyBody::Chat(c) => c.answered_by.kind,
            ReplyBody::Prediction(_) => ResponderKind::Model,
            ReplyBody::Alert(_) => ResponderKind::Rule,
        };
        *self.by_step.entry(step.as_str()).or_default() += 1;
        let i = r.as_interaction();
        if let Some(t) = i.tokens {
            self.second(now).tokens += u64::from(t);
        }
        self.interaction(r.agent.as_str(), &i, now);
    }

    /// A dead letter, with the reason code its headers carry.
    pub fn dead_letter(&mut self, headers: Option<&async_nats::HeaderMap>) {
        let code = headers
            .and_then(|h| h.get(headers::DEAD_REASON_CODE))
            .map_or_else(|| "(no reason)".to_string(), |v| v.as_str().to_string());
        *self.dead_by_reason.entry(code).or_default() += 1;
    }

    /// The consumers' positions and the replicas online per service, as
    /// last asked of the broker.
    pub fn pipeline(&mut self, consumers: Vec<ConsumerLag>, services: impl IntoIterator<Item = String>) {
        self.consumers = consumers;
        self.replicas.clear();
        for name in services {
            *self.replicas.entry(name).or_default() += 1;
        }
    }

    /// An alert, firing or resolved.
    pub fn alert(&mut self, a: Alert) {
        let key = format!("{} {}", a.rule, a.scope);
        match a.state {
            AlertState::Firing => {
                self.firing.insert(key, a.clone());
            }
            AlertState::Resolved => {
                self.firing.remove(&key);
            }
        }
        if !self.recent.iter().any(|r| r.id == a.id) {
            self.recent.push_front(a);
            self.recent.truncate(RECENT_ALERTS);
        }
    }

    /// An alert acknowledged by `by` at `at`.
    pub fn acknowledge(&mut self, id: Uuid, by: &str, at: DateTime<Utc>) {
        self.acknowledged.insert(id, (by.to_string(), at));
    }

    fn alert_json(&self, a: &Alert) -> Value {
        let mut v = serde_json::to_value(a).unwrap_or(Value::Null);
        if let (Some((by, at)), Some(o)) = (self.acknowledged.get(&a.id), v.as_object_mut()) {
            o.insert("acknowledged_by".into(), json!(by));
            o.insert("acknowledged_at".into(), json!(at));
        }
        v
    }

    /// The snapshot a page gets at `now`.
    pub fn snapshot(&mut self, now: DateTime<Utc>) -> Value {
        self.second(now);
        let agents: Vec<Value> = self
            .agents
            .iter()
            .map(|(id, a)| {
                let online = a.last_heartbeat.is_some_and(|t| now - t < OFFLINE_AFTER);
                json!({
                    "id": id,
                    "online": online,
                    "last_heartbeat": a.last_heartbeat,
                    "last_seen": a.last_seen,
                    "version": a.version,
                    "cpu_percent": a.cpu_percent,
                    "rss_bytes": a.rss_bytes,
                    "spool_depth": a.spool_depth,
                    "components": a.components,
                })
            })
            .collect();
        let pct = self.response_ms.percentiles();
        // The last whole seconds, not the one still filling.
        let recent: Vec<&Second> = self.seconds.iter().rev().skip(1).take(TOKENS_OVER_SECONDS).collect();
        let tokens_per_s = recent.iter().map(|s| s.tokens).sum::<u64>() as f64 / TOKENS_OVER_SECONDS as f64;
        let inference_queue: u64 = self
            .consumers
            .iter()
            .filter(|c| c.consumer.starts_with("inference"))
            .map(|c| c.pending + c.ack_pending as u64)
            .sum();
        let series = |f: fn(&Second) -> Value| self.seconds.iter().map(f).collect::<Vec<_>>();
        json!({
            "now": now,
            "agents": agents,
            "events_by_kind": self.by_kind,
            "events": self.by_kind.values().sum::<u64>(),
            "replies": self.replies,
            "latency_ms": self.latency_ms.percentiles(),
            "series": {
                "at": series(|s| json!(s.at)),
                "events": series(|s| json!(s.events)),
                "replies": series(|s| json!(s.replies)),
                "interactions": series(|s| json!(s.interactions)),
                "failed": series(|s| json!(s.failed)),
                "response_ms": series(|s| if s.interactions == 0 { Value::Null } else { json!(s.response_ms / s.interactions as f64) }),
            },
            "interactions": {
                "total": self.interactions.total,
                "failed": self.interactions.failed,
                "by_intent": self.by_intent.iter().map(|(k, t)| t.json("intent", k)).collect::<Vec<_>>(),
                "by_model": self.by_model.iter().map(|(k, t)| t.json("model", k)).collect::<Vec<_>>(),
                "by_agent": self.by_agent.iter().map(|(k, t)| t.json("agent", k)).collect::<Vec<_>>(),
                "by_tool": self.by_tool,
                "by_error": self.by_error,
                "response_ms_p50": pct["p50"],
                "response_ms_p95": pct["p95"],
            },
            "inference": {
                "tokens_per_s": tokens_per_s,
                "queue": inference_queue,
                "steps": self.by_step,
            },
            "pipeline": {
                "consumers": self.consumers.iter().filter(|c| c.durable).map(|c| json!({"stream": c.stream, "consumer": c.consumer,
                    "pending": c.pending, "ack_pending": c.ack_pending, "redelivered": c.redelivered})).collect::<Vec<_>>(),
                "replicas": self.replicas,
                "dead_letters": self.dead_by_reason,
            },
            "alerts": {
                "firing": self.firing.values().map(|a| self.alert_json(a)).collect::<Vec<_>>(),
                "recent": self.recent.iter().map(|a| self.alert_json(a)).collect::<Vec<_>>(),
            },
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use ferry_schema::alert::{Check, Scope};

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    /// Events stored but not read (activity samples) are counted from the
    /// stream's last sequence, less those read one by one, spread over the
    /// seconds between two looks.
    #[test]
    fn unread_events_are_counted_from_the_stream_and_spread_over_the_seconds() {
        let mut live = Live::default();
        let desk = ferry_schema::AgentId::new("desk-1").unwrap();
        let chat = ferry_schema::subject::event(&desk, EventKind::Chat).to_string();
        live.stored_through(100, t(0));
        live.event(&chat, None, b"junk", t(1));
        live.event(&chat, None, b"junk", t(1));
        // 2 chats read, 10 events stored in 2 s: 8 activities, 4 a second.
        live.stored_through(110, t(2));
        let s = live.snapshot(t(2));
        assert_eq!(s["events_by_kind"]["chat"], 2);
        assert_eq!(s["events_by_kind"]["activity"], 8);
        assert_eq!(s["events"], 10);
        let series: Vec<u64> = s["series"]["events"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(series.iter().sum::<u64>(), 10);
        assert_eq!(series[series.len() - 2..], [6, 4], "second 1: 2 chats and 4 activities; second 2: 4 activities");
        // A stream made again (its sequence lower) counts nothing.
        live.stored_through(5, t(3));
        assert_eq!(live.snapshot(t(3))["events"], 10);
    }

    #[test]
    fn an_agent_goes_offline_after_its_heartbeats_stop_and_alerts_resolve() {
        let mut live = Live::default();
        let hb = serde_json::json!({"id": ferry_schema::EventId::new().to_string(), "agent": "desk-1", "kind": "heartbeat",
            "ts": "2026-12-01T00:00:00Z", "v": 1, "body": {"version": "1.2.3", "cpu_percent": 3.5}});
        let mut h = async_nats::HeaderMap::new();
        h.insert(ferry_schema::headers::CONTENT_TYPE, ferry_schema::headers::CONTENT_TYPE_JSON);
        let desk = ferry_schema::AgentId::new("desk-1").unwrap();
        let subject = |k| ferry_schema::subject::event(&desk, k).to_string();
        live.event(&subject(EventKind::Heartbeat), Some(&h), hb.to_string().as_bytes(), t(0));
        live.event(&subject(EventKind::Chat), None, b"junk", t(0));
        let s = live.snapshot(t(10));
        assert_eq!(s["agents"][0]["online"], true);
        assert_eq!(s["agents"][0]["version"], "1.2.3");
        assert_eq!(s["events_by_kind"]["chat"], 1);
        assert_eq!(live.snapshot(t(100))["agents"][0]["online"], false);

        let mut a = Alert {
            id: uuid::Uuid::new_v4(),
            rule: "errors".into(),
            check: Check::ErrorRate,
            scope: Scope::all(),
            state: AlertState::Firing,
            ts: t(1),
            fired_at: t(1),
            value: 60.0,
            threshold: 20.0,
            message: "m".into(),
            trigger_seq: 3,
        };
        live.alert(a.clone());
        assert_eq!(live.snapshot(t(2))["alerts"]["firing"].as_array().unwrap().len(), 1);
        a.state = AlertState::Resolved;
        a.id = uuid::Uuid::new_v4();
        live.alert(a);
        let s = live.snapshot(t(3));
        assert!(s["alerts"]["firing"].as_array().unwrap().is_empty());
        assert_eq!(s["alerts"]["recent"].as_array().unwrap().len(), 2);
    }

    /// A model's answer to an event seen 250 ms before: the reply latency,
    /// the step that answered, tokens per second, and the answer as an
    /// interaction of its model and agent; a dead letter by its reason; the
    /// replicas per service.
    #[test]
    fn replies_give_latency_steps_tokens_and_interactions() {
        use ferry_schema::reply::{AnsweredBy, ChatAction, ChatReply};
        let mut live = Live::default();
        let desk = ferry_schema::AgentId::new("desk-1").unwrap();
        let id = ferry_schema::EventId::new();
        let h = headers::for_publish(id.text().as_str(), Encoding::MsgPack, None);
        let subject = ferry_schema::subject::event(&desk, EventKind::Chat).to_string();
        live.event(&subject, Some(&h), b"not decoded for a chat", t(0));
        let reply = ferry_schema::Reply::new(
            "inference",
            id,
            desk.clone(),
            ReplyBody::Chat(ChatReply {
                chat: "Alice".into(),
                action: ChatAction::Reply,
                content: Some("hi".into()),
                confidence: 0.9,
                answered_by: AnsweredBy { kind: ResponderKind::Model, name: "qwen".into() },
                processing_ms: 200.0,
                tokens: Some(40),
                timings: None,
            }),
        );
        let bytes = codec::encode_reply(&reply, Encoding::MsgPack).unwrap();
        live.reply(None, &bytes, t(0) + chrono::Duration::milliseconds(250));
        let mut dead = async_nats::HeaderMap::new();
        dead.insert(headers::DEAD_REASON_CODE, "malformed");
        live.dead_letter(Some(&dead));
        live.dead_letter(None);
        live.pipeline(Vec::new(), ["ferry-rules".to_string(), "ferry-rules".to_string(), "ferry-archiver".to_string()]);

        let s = live.snapshot(t(2));
        assert_eq!(s["latency_ms"]["p50"], 250.0);
        assert_eq!(s["latency_ms"]["n"], 1);
        assert_eq!(s["inference"]["steps"]["model"], 1);
        assert_eq!(s["inference"]["tokens_per_s"], 4.0, "40 tokens over the last 10 seconds");
        assert_eq!(s["interactions"]["by_model"][0]["model"], "qwen");
        assert_eq!(s["interactions"]["by_agent"][0]["agent"], "desk-1");
        assert_eq!(s["interactions"]["by_tool"]["model"], 1);
        assert_eq!(s["pipeline"]["dead_letters"]["malformed"], 1);
        assert_eq!(s["pipeline"]["dead_letters"]["(no reason)"], 1);
        assert_eq!(s["pipeline"]["replicas"]["ferry-rules"], 2);
        // A second reply to the same event adds no latency sample.
        live.reply(None, &bytes, t(3));
        assert_eq!(live.snapshot(t(4))["latency_ms"]["n"], 1);
    }
}

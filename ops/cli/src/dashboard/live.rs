//! What the dashboard knows now: agents and their last heartbeat, traffic per second by kind, interactions, alerts; and the snapshot a page gets.

use std::collections::{BTreeMap, VecDeque};

use chrono::{DateTime, Utc};
use ferry_schema::alert::{Alert, AlertState};
use ferry_schema::codec;
use ferry_schema::{EventBody, EventKind, Encoding};
use serde_json::{json, Value};

/// An agent with no heartbeat for this long shows as offline (three
/// missed heartbeats at the agent's default 30 s).
pub const OFFLINE_AFTER: chrono::Duration = chrono::Duration::seconds(90);
/// Seconds of per-second traffic a snapshot carries (the live chart).
pub const SERIES_SECONDS: usize = 300;
/// Alerts kept for the history list.
pub const RECENT_ALERTS: usize = 50;

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
}

/// What the dashboard has seen.
#[derive(Debug, Default)]
pub struct Live {
    agents: BTreeMap<String, Agent>,
    by_kind: BTreeMap<&'static str, u64>,
    replies: u64,
    interactions: u64,
    failed: u64,
    by_intent: BTreeMap<String, (u64, u64)>,
    response_ms: VecDeque<f64>,
    seconds: VecDeque<Second>,
    firing: BTreeMap<String, Alert>,
    recent: VecDeque<Alert>,
}

impl Live {
    fn second(&mut self, now: DateTime<Utc>) -> &mut Second {
        let at = now.timestamp();
        if self.seconds.back().is_none_or(|s| s.at != at) {
            self.seconds.push_back(Second { at, ..Second::default() });
            while self.seconds.len() > SERIES_SECONDS {
                self.seconds.pop_front();
            }
        }
        // Just pushed when empty.
        let last = self.seconds.len() - 1;
        &mut self.seconds[last]
    }

    /// An event as the broker delivered it on `subject`.
    pub fn event(&mut self, subject: &str, headers: Option<&async_nats::HeaderMap>, payload: &[u8], now: DateTime<Utc>) {
        let Ok((agent, kind)) = ferry_schema::subject::parse_event(subject) else { return };
        *self.by_kind.entry(kind.as_str()).or_default() += 1;
        self.second(now).events += 1;
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
            EventBody::Interaction(i) => {
                self.interactions += 1;
                self.failed += u64::from(!i.success);
                let e = self.by_intent.entry(i.intent.unwrap_or_else(|| "(none)".into())).or_default();
                e.0 += 1;
                e.1 += u64::from(!i.success);
                self.response_ms.push_back(i.response_time_ms);
                while self.response_ms.len() > 1000 {
                    self.response_ms.pop_front();
                }
            }
            _ => {}
        }
    }

    /// A reply as the broker delivered it.
    pub fn reply(&mut self, headers: Option<&async_nats::HeaderMap>, payload: &[u8], now: DateTime<Utc>) {
        if Encoding::of(headers, payload).is_err() {
            return;
        }
        self.replies += 1;
        self.second(now).replies += 1;
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
        let mut ms: Vec<f64> = self.response_ms.iter().copied().collect();
        ms.sort_by(f64::total_cmp);
        let pct = |p: f64| if ms.is_empty() { Value::Null } else { json!(ms[((ms.len() - 1) as f64 * p).round() as usize]) };
        json!({
            "now": now,
            "agents": agents,
            "events_by_kind": self.by_kind,
            "events": self.by_kind.values().sum::<u64>(),
            "replies": self.replies,
            "series": {
                "at": self.seconds.iter().map(|s| s.at).collect::<Vec<_>>(),
                "events": self.seconds.iter().map(|s| s.events).collect::<Vec<_>>(),
                "replies": self.seconds.iter().map(|s| s.replies).collect::<Vec<_>>(),
            },
            "interactions": {
                "total": self.interactions,
                "failed": self.failed,
                "by_intent": self.by_intent.iter().map(|(k, (n, f))| json!({"intent": k, "total": n, "failed": f})).collect::<Vec<_>>(),
                "response_ms_p50": pct(0.5),
                "response_ms_p95": pct(0.95),
            },
            "alerts": {
                "firing": self.firing.values().collect::<Vec<_>>(),
                "recent": self.recent,
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
}

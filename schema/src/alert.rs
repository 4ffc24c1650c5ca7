//! Alerts the alerts role raises: the wire type (JSON on `alerts.<rule>.<scope>.<value>`), its states and scopes, and its dedup id.
//!
//! An alert is a transition, firing or resolved, of one rule in one scope.
//! Every alerts replica evaluates the same events in the same order, so each
//! computes the same transitions with the same [`Alert::dedup_key`]; the
//! `ALERTS` stream keeps the first and drops the copies (`Nats-Msg-Id`).
//! A consumer-lag rule judges what each replica polls, not events: its
//! transitions are named by the rule and scope's previous alert in
//! `ALERTS` (its stream sequence), which every replica reads alike.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Whether the condition started or stopped holding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    /// The condition holds (and the rule's cooldown had passed).
    Firing,
    /// The condition no longer holds.
    Resolved,
}

impl AlertState {
    /// `firing` or `resolved`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Firing => "firing",
            Self::Resolved => "resolved",
        }
    }
}

/// What a rule watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// Share of failed interactions in the window, in percent.
    ErrorRate,
    /// Mean or 95th-percentile response time in the window, milliseconds.
    ResponseTime,
    /// Failed interactions in a row.
    ConsecutiveErrors,
    /// Seconds since an agent's last heartbeat.
    AgentOffline,
    /// Events waiting in an agent's spool, as its last heartbeat reports.
    SpoolBacklog,
    /// Dead letters a minute, over the window.
    DeadLetters,
    /// Messages a worker consumer has yet to finish (pending and awaiting
    /// acknowledgement), as its consumer info reports.
    ConsumerLag,
}

impl Check {
    /// Every check.
    pub const ALL: [Check; 7] = [
        Self::ErrorRate,
        Self::ResponseTime,
        Self::ConsecutiveErrors,
        Self::AgentOffline,
        Self::SpoolBacklog,
        Self::DeadLetters,
        Self::ConsumerLag,
    ];

    /// Whether it watches heartbeats (per agent), not interactions.
    pub fn watches_heartbeats(self) -> bool {
        matches!(self, Self::AgentOffline | Self::SpoolBacklog)
    }

    /// The check's name, as in the alerts config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ErrorRate => "error_rate",
            Self::ResponseTime => "response_time",
            Self::ConsecutiveErrors => "consecutive_errors",
            Self::AgentOffline => "agent_offline",
            Self::SpoolBacklog => "spool_backlog",
            Self::DeadLetters => "dead_letters",
            Self::ConsumerLag => "consumer_lag",
        }
    }

    /// Parses a check name; `None` when it is not one of [`Check::ALL`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// Over what a rule is evaluated: every interaction together, or each
/// agent's, model's or intent's apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScopeKind {
    /// Everything together.
    All,
    /// Each agent apart.
    Agent,
    /// Each model apart (interactions that name one).
    Model,
    /// Each intent apart (interactions that name one).
    Intent,
    /// Each agent group apart: an interaction counts in every group of
    /// its agent (the alerts file's `[groups]` and the `--groups` file).
    Group,
    /// Each worker consumer apart, by its durable name (consumer-lag rules).
    Consumer,
}

impl ScopeKind {
    /// Every scope kind.
    pub const ALL: [ScopeKind; 6] = [Self::All, Self::Agent, Self::Model, Self::Intent, Self::Group, Self::Consumer];

    /// The scope kind's name, as in the alerts config and the subject.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Agent => "agent",
            Self::Model => "model",
            Self::Intent => "intent",
            Self::Group => "group",
            Self::Consumer => "consumer",
        }
    }

    /// Parses a scope kind; `None` when it is not one of [`ScopeKind::ALL`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// One scope: its kind and the agent, model, intent, group or consumer (`""` for `all`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Scope {
    /// What kind of scope.
    pub kind: ScopeKind,
    /// Which agent, model, intent or group; empty for [`ScopeKind::All`].
    pub value: String,
}

impl Scope {
    /// The scope of everything.
    pub fn all() -> Self {
        Self {
            kind: ScopeKind::All,
            value: String::new(),
        }
    }

    /// The value as one subject token: itself when it is made of letters,
    /// digits, `-` and `_` (every agent id is), else those characters kept,
    /// the others as `_`, and a hash of the whole value after a `-`, so two
    /// values never share a subject. `all` for [`ScopeKind::All`].
    pub fn token(&self) -> String {
        if self.kind == ScopeKind::All {
            return "all".into();
        }
        let clean = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if !self.value.is_empty() && self.value.len() <= 64 && self.value.chars().all(clean) {
            return self.value.clone();
        }
        let kept: String = self.value.chars().take(48).map(|c| if clean(c) { c } else { '_' }).collect();
        format!("{kept}-{:08x}", fnv1a(self.value.as_bytes()))
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ScopeKind::All => f.write_str("all"),
            k => write!(f, "{}={}", k.as_str(), self.value),
        }
    }
}

/// 32-bit FNV-1a: a stable, dependency-free hash for subject tokens.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
}

/// One alert: a rule's condition started (firing) or stopped (resolved)
/// holding in one scope. JSON on the wire, so a webhook receiver, `nats sub
/// 'alerts.>'` and the dashboard read it as is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Alert {
    /// The alert's id: a UUIDv5 of [`Alert::dedup_key`], the same from every replica.
    pub id: Uuid,
    /// The rule's name in the alerts config.
    pub rule: String,
    /// What the rule watches.
    pub check: Check,
    /// Where it held.
    pub scope: Scope,
    /// Firing or resolved.
    pub state: AlertState,
    /// When: the stream time of the event that made the transition, or
    /// the evaluation time for a time-based one (no heartbeat, an empty window).
    pub ts: DateTime<Utc>,
    /// When the firing this alert belongs to began (for a firing alert, `ts`):
    /// what a rule's cooldown counts from.
    pub fired_at: DateTime<Utc>,
    /// The value observed (percent, milliseconds, a count, seconds).
    pub value: f64,
    /// The rule's threshold, in the same unit.
    pub threshold: f64,
    /// One line for a person.
    pub message: String,
    /// `EVENTS` sequence of the event that made the rule fire (for a
    /// resolved alert, that of the firing it ends): with rule, scope and
    /// state, what makes the alert one and the same on every replica. For
    /// a consumer-lag rule, the `ALERTS` sequence of the rule and scope's
    /// alert before the firing (0 for its first).
    pub trigger_seq: u64,
}

/// Namespace of the alert ids (UUIDv5).
const ALERT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6b1f_2d0e_8c1a_4d55_9a3e_5f0c_a1e7_d2b4);

impl Alert {
    /// `<rule>/<scope kind>/<scope token>/<state>/<trigger_seq>`: the
    /// `Nats-Msg-Id` that makes the stream drop a second replica's copy.
    pub fn dedup_key(&self) -> String {
        format!(
            "{}/{}/{}/{}/{}",
            self.rule,
            self.scope.kind.as_str(),
            self.scope.token(),
            self.state.as_str(),
            self.trigger_seq
        )
    }

    /// The id an alert with these fields has.
    pub fn id_for(dedup_key: &str) -> Uuid {
        Uuid::new_v5(&ALERT_ID_NAMESPACE, dedup_key.as_bytes())
    }

    /// Its subject: `alerts.<rule>.<scope kind>.<scope token>`.
    pub fn subject(&self) -> async_nats::Subject {
        crate::subject::alert(&self.rule, &self.scope)
    }

    /// The JSON body.
    pub fn to_json(&self) -> Vec<u8> {
        // An Alert is plain data (strings, numbers, a timestamp): nothing
        // in it can fail to serialize.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a JSON body.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// The most characters of a receiver's answer a delivery record keeps.
pub const MAX_DELIVERY_DETAIL: usize = 512;

/// What one webhook call came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryOutcome {
    /// A 2xx: the receiver took the alert.
    Took,
    /// A timeout, a refused connection, a 5xx or a 429: tried again.
    Failed,
    /// Any other 4xx: the receiver will never take it (a dead letter).
    Refused,
}

impl DeliveryOutcome {
    /// `took`, `failed` or `refused`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Took => "took",
            Self::Failed => "failed",
            Self::Refused => "refused",
        }
    }
}

/// One webhook call for one alert: a line of the delivery log. JSON on
/// `alert-deliveries.<rule>` in `ALERTS`; the archiver keeps it in
/// `alert_deliveries`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delivery {
    /// A UUIDv5 of the alert, the webhook and the attempt: a record
    /// published twice is stored once.
    pub id: Uuid,
    /// The alert delivered.
    pub alert_id: Uuid,
    /// Its rule.
    pub rule: String,
    /// The webhook, without user, password or query (where tokens hide).
    pub url: String,
    /// Which delivery of the alert this was (1 for the first).
    pub attempt: u64,
    /// What it came to.
    pub outcome: DeliveryOutcome,
    /// The receiver's HTTP status, when it answered.
    pub status: Option<u16>,
    /// The answer or the error, at most [`MAX_DELIVERY_DETAIL`] characters.
    pub detail: String,
    /// When the call ended.
    pub ts: DateTime<Utc>,
    /// How long the call took, milliseconds.
    pub elapsed_ms: f64,
}

impl Delivery {
    /// The id of the record of `attempt` of `alert_id` to `url`.
    pub fn id_for(alert_id: Uuid, url: &str, attempt: u64) -> Uuid {
        Uuid::new_v5(&alert_id, format!("{url} {attempt}").as_bytes())
    }

    /// `detail` cut to [`MAX_DELIVERY_DETAIL`] characters.
    pub fn bounded(detail: &str) -> String {
        detail.chars().take(MAX_DELIVERY_DETAIL).collect()
    }

    /// Its subject: `alert-deliveries.<rule>`.
    pub fn subject(&self) -> async_nats::Subject {
        crate::subject::alert_delivery(&self.rule)
    }

    /// The JSON body.
    pub fn to_json(&self) -> Vec<u8> {
        // Plain data: nothing in it can fail to serialize.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a JSON body.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// Why the last alerts could not be read from `ALERTS`.
#[derive(Debug, thiserror::Error)]
#[error("reading the last alerts from {stream}: {reason}")]
pub struct ReadError {
    /// The stream (`ALERTS`).
    pub stream: &'static str,
    /// What went wrong.
    pub reason: String,
}

/// Each rule's last alert per scope, as `ALERTS` holds it now (an ordered
/// consumer delivering the last message per subject; nothing is changed).
/// A message that is not an alert is logged and skipped. Needs only the
/// unnamed consumer create on `ALERTS` (no stream info), which the alerts
/// role's user has.
pub async fn read_last(js: &async_nats::jetstream::Context) -> Result<Vec<Alert>, ReadError> {
    use async_nats::jetstream::consumer::{push::OrderedConfig, DeliverPolicy};
    use futures::StreamExt as _;
    let stream = crate::topology::ALERTS_STREAM;
    let err = |reason: String| ReadError { stream, reason };
    let consumer = js
        .get_stream_no_info(stream)
        .await
        .map_err(|e| err(e.to_string()))?
        .create_consumer(OrderedConfig {
            deliver_subject: js.client().new_inbox(),
            filter_subject: crate::subject::all_alerts().to_string(),
            deliver_policy: DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .map_err(|e| err(e.to_string()))?;
    let pending = consumer.cached_info().num_pending;
    let mut out = Vec::new();
    if pending == 0 {
        return Ok(out);
    }
    let mut messages = consumer.messages().await.map_err(|e| err(e.to_string()))?;
    for _ in 0..pending {
        let m = tokio::time::timeout(std::time::Duration::from_secs(30), messages.next())
            .await
            .map_err(|_| err("no message for 30 s".into()))?
            .ok_or_else(|| err("the reader ended".into()))?
            .map_err(|e| err(e.to_string()))?;
        match Alert::from_json(&m.payload) {
            Ok(a) => out.push(a),
            Err(error) => tracing::warn!(%error, subject = %m.subject, "not an alert in ALERTS; skipped"),
        }
    }
    Ok(out)
}

/// Whether `name` can be a rule's name: 1 to 64 of `a-z`, `0-9`, `_`, `-`
/// (it is a subject token and a key).
pub fn valid_rule_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn alert(scope: Scope, state: AlertState) -> Alert {
        let mut a = Alert {
            id: Uuid::nil(),
            rule: "errors".into(),
            check: Check::ErrorRate,
            scope,
            state,
            ts: DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
            fired_at: DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
            value: 60.0,
            threshold: 20.0,
            message: "m".into(),
            trigger_seq: 42,
        };
        a.id = Alert::id_for(&a.dedup_key());
        a
    }

    #[test]
    fn tokens_are_single_subject_tokens_and_distinct() {
        let s = |k, v: &str| Scope { kind: k, value: v.into() };
        assert_eq!(s(ScopeKind::Agent, "desk-1").token(), "desk-1");
        assert_eq!(Scope::all().token(), "all");
        let a = s(ScopeKind::Model, "gpt-4.1 mini").token();
        let b = s(ScopeKind::Model, "gpt-4_1 mini").token();
        assert_ne!(a, b);
        for t in [&a, &b, &s(ScopeKind::Intent, "").token(), &s(ScopeKind::Intent, "a>*").token()] {
            assert!(!t.is_empty() && !t.contains(['.', ' ', '*', '>']), "{t}");
        }
    }

    #[test]
    fn the_same_transition_has_the_same_id_and_json_round_trips() {
        let a = alert(Scope::all(), AlertState::Firing);
        let b = alert(Scope::all(), AlertState::Firing);
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, alert(Scope::all(), AlertState::Resolved).id);
        assert_eq!(Alert::from_json(&a.to_json()).unwrap(), a);
        assert_eq!(a.subject().as_str(), "alerts.errors.all.all");
        let json: serde_json::Value = serde_json::from_slice(&a.to_json()).unwrap();
        assert_eq!(json["state"], "firing");
        assert_eq!(json["scope"]["kind"], "all");
    }

    #[test]
    fn a_delivery_record_round_trips_and_its_id_names_alert_webhook_and_attempt() {
        let a = alert(Scope::all(), AlertState::Firing);
        let d = Delivery {
            id: Delivery::id_for(a.id, "http://h/x", 1),
            alert_id: a.id,
            rule: a.rule.clone(),
            url: "http://h/x".into(),
            attempt: 1,
            outcome: DeliveryOutcome::Failed,
            status: Some(503),
            detail: Delivery::bounded(&"x".repeat(2000)),
            ts: a.ts,
            elapsed_ms: 3.5,
        };
        assert_eq!(d.detail.len(), MAX_DELIVERY_DETAIL);
        assert_eq!(Delivery::from_json(&d.to_json()).unwrap(), d);
        assert_eq!(d.subject().as_str(), "alert-deliveries.errors");
        assert!(crate::subject::is_alert_delivery(&d.subject()) && !crate::subject::is_alert_delivery(&a.subject()));
        assert_eq!(d.id, Delivery::id_for(a.id, "http://h/x", 1));
        assert_ne!(d.id, Delivery::id_for(a.id, "http://h/x", 2));
        assert_ne!(d.id, Delivery::id_for(a.id, "http://h/y", 1));
        // Not an alert: the readers of `alerts.>` never see one.
        assert!(Alert::from_json(&d.to_json()).is_err());
    }

    #[test]
    fn rule_names_are_tokens() {
        assert!(valid_rule_name("error_rate-5m"));
        for bad in ["", "Errors", "a.b", "a b", &"x".repeat(65)] {
            assert!(!valid_rule_name(bad), "{bad}");
        }
    }
}

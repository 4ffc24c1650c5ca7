//! What the dashboard reads from the archive: traffic and interactions over a time range, an agent's recent events and replies, and acknowledging an alert.

use std::time::Duration;

use anyhow::Context as _;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tokio::sync::Mutex;
use uuid::Uuid;

/// Buckets a time range is drawn in.
pub const BUCKETS: i32 = 60;
/// Rows of an agent's recent events, and of its replies.
pub const RECENT_ROWS: i64 = 20;
/// Acknowledged alerts read back at start.
pub const ACKNOWLEDGED_AT_START: i64 = 500;

/// A time range the page offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// The last 15 minutes.
    Minutes15,
    /// The last hour.
    Hour,
    /// The last 24 hours.
    Day,
    /// The last 7 days.
    Week,
}

impl Range {
    /// `15m`, `1h`, `24h` or `7d`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "15m" => Self::Minutes15,
            "1h" => Self::Hour,
            "24h" => Self::Day,
            "7d" => Self::Week,
            _ => return None,
        })
    }

    /// How long it is.
    pub fn length(self) -> Duration {
        Duration::from_secs(match self {
            Self::Minutes15 => 15 * 60,
            Self::Hour => 3600,
            Self::Day => 24 * 3600,
            Self::Week => 7 * 24 * 3600,
        })
    }
}

/// The archive, connected on first use and again after a lost connection.
pub struct Archive {
    url: String,
    client: Mutex<Option<tokio_postgres::Client>>,
}

impl Archive {
    /// The archive at `url` (not connected yet).
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            client: Mutex::new(None),
        }
    }

    async fn query(&self, sql: &str, params: &[&(dyn tokio_postgres::types::ToSql + Sync)]) -> anyhow::Result<Vec<tokio_postgres::Row>> {
        let mut guard = self.client.lock().await;
        let client = match guard.take() {
            Some(c) if !c.is_closed() => c,
            _ => ferry_workers::state::connect_one(&self.url).await?,
        };
        let rows = client.query(sql, params).await;
        *guard = Some(client);
        Ok(rows.context("archive query")?)
    }

    /// Traffic and interactions over `range` ending at `now`, in
    /// [`BUCKETS`] buckets, with reply latency percentiles and interactions
    /// per model, agent and error type.
    pub async fn history(&self, range: Range, now: DateTime<Utc>) -> anyhow::Result<Value> {
        let hi = now.timestamp() as f64;
        let lo = hi - range.length().as_secs_f64();
        let per_bucket = |rows: &[tokio_postgres::Row], col: usize| -> Vec<Value> {
            let mut v = vec![json!(0); BUCKETS as usize];
            for r in rows {
                let b: i32 = r.get(0);
                if (1..=BUCKETS).contains(&b) {
                    v[(b - 1) as usize] = match r.try_get::<_, i64>(col) {
                        Ok(n) => json!(n),
                        Err(_) => json!(r.get::<_, Option<f64>>(col)),
                    };
                }
            }
            v
        };
        let bucket = |table: &str| {
            format!(
                "SELECT width_bucket(extract(epoch FROM ts)::float8, $1, $2, {BUCKETS}), count(*)
                   FROM {table} WHERE ts >= to_timestamp($1) AND ts < to_timestamp($2) GROUP BY 1"
            )
        };
        let events = self.query(&bucket("events"), &[&lo, &hi]).await?;
        let replies = self.query(&bucket("replies"), &[&lo, &hi]).await?;
        let inter = self
            .query(
                &format!(
                    "SELECT width_bucket(extract(epoch FROM ts)::float8, $1, $2, {BUCKETS}), count(*),
                            count(*) FILTER (WHERE NOT success), avg(response_time_ms)
                       FROM interactions WHERE ts >= to_timestamp($1) AND ts < to_timestamp($2) GROUP BY 1"
                ),
                &[&lo, &hi],
            )
            .await?;
        let group = |col: &str| {
            format!(
                "SELECT coalesce({col}, '(none)'), count(*), count(*) FILTER (WHERE NOT success), avg(response_time_ms)
                   FROM interactions WHERE ts >= to_timestamp($1) AND ts < to_timestamp($2)
                  GROUP BY 1 ORDER BY 2 DESC LIMIT 20"
            )
        };
        let mut groups = serde_json::Map::new();
        for (name, col) in [("by_model", "model"), ("by_agent", "agent"), ("by_error", "error_type"), ("by_intent", "intent")] {
            let rows = self.query(&group(col), &[&lo, &hi]).await?;
            let list: Vec<Value> = rows
                .iter()
                .map(|r| json!({"name": r.get::<_, String>(0), "total": r.get::<_, i64>(1), "failed": r.get::<_, i64>(2),
                                "mean_ms": r.get::<_, Option<f64>>(3)}))
                .collect();
            groups.insert(name.into(), Value::Array(list));
        }
        let latency = self
            .query(
                "SELECT percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY extract(epoch FROM r.ts - e.ts)::float8 * 1000)
                   FROM replies r JOIN events e ON e.id = r.in_reply_to
                  WHERE r.ts >= to_timestamp($1) AND r.ts < to_timestamp($2)",
                &[&lo, &hi],
            )
            .await?;
        let p: Option<Vec<f64>> = latency.first().and_then(|r| r.get(0));
        let p = p.unwrap_or_default();
        Ok(json!({
            "from": DateTime::<Utc>::from_timestamp(lo as i64, 0),
            "to": now,
            "buckets": BUCKETS,
            "events": per_bucket(&events, 1),
            "replies": per_bucket(&replies, 1),
            "interactions": per_bucket(&inter, 1),
            "failed": per_bucket(&inter, 2),
            "response_ms": per_bucket(&inter, 3),
            "latency_ms": {"p50": p.first(), "p95": p.get(1), "p99": p.get(2)},
            "groups": groups,
        }))
    }

    /// `agent`'s last events and replies, newest first.
    pub async fn agent(&self, agent: &str) -> anyhow::Result<Value> {
        let events = self
            .query(
                "SELECT ts, kind, coalesce(body ->> 'text', body ->> 'title', body ->> 'user_input', '')
                   FROM events WHERE agent = $1 ORDER BY ts DESC LIMIT $2",
                &[&agent, &RECENT_ROWS],
            )
            .await?;
        let replies = self
            .query(
                "SELECT ts, kind, coalesce(answered_by_kind, ''), coalesce(answered_by, ''), coalesce(content, action, '')
                   FROM replies WHERE agent = $1 ORDER BY ts DESC LIMIT $2",
                &[&agent, &RECENT_ROWS],
            )
            .await?;
        Ok(json!({
            "agent": agent,
            "events": events.iter().map(|r| json!({"ts": r.get::<_, DateTime<Utc>>(0), "kind": r.get::<_, String>(1),
                                                    "text": r.get::<_, String>(2)})).collect::<Vec<_>>(),
            "replies": replies.iter().map(|r| json!({"ts": r.get::<_, DateTime<Utc>>(0), "kind": r.get::<_, String>(1),
                                                      "step": r.get::<_, String>(2), "by": r.get::<_, String>(3),
                                                      "text": r.get::<_, String>(4)})).collect::<Vec<_>>(),
        }))
    }

    /// Marks alert `id` acknowledged by `by`; returns who acknowledged it
    /// and when (the first to do so), or `None` when the archive does not
    /// hold it (yet).
    pub async fn acknowledge(&self, id: Uuid, by: &str) -> anyhow::Result<Option<(String, DateTime<Utc>)>> {
        let rows = self
            .query(
                "UPDATE alerts SET acknowledged_at = coalesce(acknowledged_at, now()),
                                   acknowledged_by = coalesce(acknowledged_by, $2)
                  WHERE id = $1 RETURNING acknowledged_by, acknowledged_at",
                &[&id, &by],
            )
            .await?;
        Ok(rows.first().map(|r| (r.get(0), r.get(1))))
    }

    /// The alerts acknowledged so far (the newest [`ACKNOWLEDGED_AT_START`]).
    pub async fn acknowledged(&self) -> anyhow::Result<Vec<(Uuid, String, DateTime<Utc>)>> {
        let rows = self
            .query(
                "SELECT id, acknowledged_by, acknowledged_at FROM alerts
                  WHERE acknowledged_at IS NOT NULL ORDER BY ts DESC LIMIT $1",
                &[&ACKNOWLEDGED_AT_START],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get::<_, Option<String>>(1).unwrap_or_default(), r.get(2))).collect())
    }
}

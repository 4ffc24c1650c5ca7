//! What the archiver writes: events and replies as rows, and the typed tables derived from them.
//!
//! Every statement is idempotent on the event id or reply id: the base
//! insert stores only ids not stored yet and returns them ([`insert_new`]),
//! and only those fan out into chats, interactions, predictions and rule alerts; alerts
//! from the alerts role are keyed by their own id. A replayed or
//! redelivered message therefore changes nothing. Activities need no table
//! of their own: `activities` is a view over `events` (migration V1).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use ferry_schema::reply::ChatAction;
use ferry_schema::{Envelope, EventBody, Reply, ReplyBody};
use uuid::Uuid;

use super::batch::Sink;
use crate::state::{conversations, customers};

/// One event to archive.
#[derive(Debug, Clone)]
pub struct EventRow {
    /// The decoded event.
    pub env: Envelope,
    /// Its body as JSON text (`events.body`).
    pub body_json: String,
    /// Its sequence in `EVENTS`.
    pub stream_seq: i64,
}

/// One reply to archive.
#[derive(Debug, Clone)]
pub struct ReplyRow {
    /// The decoded reply.
    pub reply: Reply,
    /// Its body as JSON text (`replies.body`).
    pub body_json: String,
    /// Its sequence in `REPLIES`.
    pub stream_seq: i64,
}

/// One alert to archive.
#[derive(Debug, Clone)]
pub struct AlertRow {
    /// The decoded alert.
    pub alert: ferry_schema::alert::Alert,
    /// Its sequence in `ALERTS`.
    pub stream_seq: i64,
}

/// Writes alerts (table `alerts`), idempotent on the alert's id.
#[derive(Debug, Clone, Default)]
pub struct AlertSink;

impl Sink for AlertSink {
    type Row = AlertRow;

    async fn write(&self, client: &mut deadpool_postgres::ClientWrapper, rows: &[AlertRow]) -> Result<(), tokio_postgres::Error> {
        let tx = client.transaction().await?;
        let insert = tx
            .prepare_cached(
                "INSERT INTO alerts (id, rule, check_kind, scope_kind, scope_value, state, ts, value, threshold,
                                     message, trigger_seq, stream_seq)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT (id) DO NOTHING",
            )
            .await?;
        for r in first_of_each(rows, |r| r.alert.id) {
            let a = &r.alert;
            let trigger = i64::try_from(a.trigger_seq).unwrap_or(i64::MAX);
            tx.execute(
                &insert,
                &[
                    &a.id,
                    &a.rule,
                    &a.check.as_str(),
                    &a.scope.kind.as_str(),
                    &a.scope.value,
                    &a.state.as_str(),
                    &a.ts,
                    &a.value,
                    &a.threshold,
                    &a.message,
                    &trigger,
                    &r.stream_seq,
                ],
            )
            .await?;
        }
        tx.commit().await
    }
}

/// One webhook call's record to archive.
#[derive(Debug, Clone)]
pub struct DeliveryRow {
    /// The decoded record.
    pub delivery: ferry_schema::alert::Delivery,
    /// Its sequence in `ALERTS`.
    pub stream_seq: i64,
}

/// Writes the delivery log (table `alert_deliveries`), idempotent on the
/// record's id.
#[derive(Debug, Clone, Default)]
pub struct DeliverySink;

impl Sink for DeliverySink {
    type Row = DeliveryRow;

    async fn write(&self, client: &mut deadpool_postgres::ClientWrapper, rows: &[DeliveryRow]) -> Result<(), tokio_postgres::Error> {
        let tx = client.transaction().await?;
        let insert = tx
            .prepare_cached(
                "INSERT INTO alert_deliveries (id, alert_id, rule, url, attempt, outcome, status, detail, ts, elapsed_ms, stream_seq)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (id) DO NOTHING",
            )
            .await?;
        for r in first_of_each(rows, |r| r.delivery.id) {
            let d = &r.delivery;
            let attempt = i64::try_from(d.attempt).unwrap_or(i64::MAX);
            let status = d.status.map(i32::from);
            tx.execute(
                &insert,
                &[&d.id, &d.alert_id, &d.rule, &d.url, &attempt, &d.outcome.as_str(), &status, &d.detail, &d.ts, &d.elapsed_ms, &r.stream_seq],
            )
            .await?;
        }
        tx.commit().await
    }
}

/// Writes events (and agents, chats with their customers and
/// conversations).
#[derive(Debug, Clone)]
pub struct EventSink {
    /// Idle time after which a chat opens a new conversation.
    pub conversation_idle: Duration,
}

/// Writes replies (and predictions, rule alerts, and each reply as Ferry's
/// own interaction).
#[derive(Debug, Clone, Default)]
pub struct ReplySink;

/// An insert of rows not stored yet: `{CHECK}` in `sql` becomes the
/// idempotency clause on `key`, the table's primary key (see [`insert_new`]).
struct InsertNew {
    sql: &'static str,
    key: &'static str,
}

/// Stores events whose id is not stored yet.
const INSERT_EVENTS: InsertNew = InsertNew {
    key: "id",
    sql: "INSERT INTO events (id, agent, kind, ts, body, stream_seq)
     SELECT i, a, k, t, b::jsonb, s
       FROM unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[], $5::text[], $6::int8[])
            AS u(i, a, k, t, b, s)
      {CHECK}
     RETURNING id",
};

/// The same for replies: their key holds the partition key, the event's id
/// (schema/migrations/V7__partitions.sql), and is unique exactly when `id` is.
const INSERT_REPLIES: InsertNew = InsertNew {
    key: "id, in_reply_to",
    sql: "INSERT INTO replies (id, in_reply_to, agent, kind, ts, answered_by_kind, answered_by, action,
                          content, confidence, processing_ms, tokens, body, stream_seq)
     SELECT i, e, a, k, t, bk, bn, ac, c, cf, ms, tk, b::jsonb, s
       FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::timestamptz[], $6::text[],
                   $7::text[], $8::text[], $9::text[], $10::real[], $11::float8[], $12::int4[],
                   $13::text[], $14::int8[])
            AS u(i, e, a, k, t, bk, bn, ac, c, cf, ms, tk, b, s)
      {CHECK}
     RETURNING id",
};

/// Runs an insert of rows not stored yet and returns the ids it stored.
///
/// The fast form is a plain insert: the primary key refuses a duplicate, and
/// a duplicate is rare (a redelivery after a crash, a replay). Plain inserts
/// measured 1.4x faster than `ON CONFLICT DO NOTHING` (a speculative
/// insertion per row) and faster than a `WHERE NOT EXISTS` probe. When the
/// batch holds an id that is already stored (or being stored by another
/// transaction), the insert fails with a unique violation, the savepoint is
/// rolled back, and the `ON CONFLICT DO NOTHING` form stores the rest.
async fn insert_new(
    tx: &mut deadpool_postgres::Transaction<'_>,
    insert: &InsertNew,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let fast = insert.sql.replace("{CHECK}", "");
    let sp = tx.savepoint("ferry_fast_insert").await?;
    let stmt = sp.prepare_cached(&fast).await?;
    match sp.query(&stmt, params).await {
        Ok(rows) => {
            sp.commit().await?;
            Ok(rows)
        }
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
            sp.rollback().await?;
            tracing::debug!("batch holds an id already stored; using ON CONFLICT");
            let check = format!("ON CONFLICT ({}) DO NOTHING", insert.key);
            let safe = tx.prepare_cached(&insert.sql.replace("{CHECK}", &check)).await?;
            tx.query(&safe, params).await
        }
        Err(e) => Err(e),
    }
}

fn first_of_each<T>(rows: &[T], id: impl Fn(&T) -> Uuid) -> Vec<&T> {
    let mut seen = HashSet::with_capacity(rows.len());
    rows.iter().filter(|r| seen.insert(id(r))).collect()
}

#[derive(Default)]
struct AgentSeen<'a> {
    first: Option<DateTime<Utc>>,
    last: Option<DateTime<Utc>>,
    heartbeat: Option<DateTime<Utc>>,
    version: Option<&'a str>,
}

impl Sink for EventSink {
    type Row = EventRow;

    async fn write(&self, client: &mut deadpool_postgres::ClientWrapper, rows: &[EventRow]) -> Result<(), tokio_postgres::Error> {
        let rows = first_of_each(rows, |r| r.env.id.0);
        let mut tx = client.transaction().await?;

        let ids: Vec<Uuid> = rows.iter().map(|r| r.env.id.0).collect();
        let agents: Vec<&str> = rows.iter().map(|r| r.env.agent.as_str()).collect();
        let kinds: Vec<&str> = rows.iter().map(|r| r.env.kind().as_str()).collect();
        let ts: Vec<DateTime<Utc>> = rows.iter().map(|r| r.env.ts).collect();
        let bodies: Vec<&str> = rows.iter().map(|r| r.body_json.as_str()).collect();
        let seqs: Vec<i64> = rows.iter().map(|r| r.stream_seq).collect();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] = [&ids, &agents, &kinds, &ts, &bodies, &seqs];
        let inserted: HashSet<Uuid> = insert_new(&mut tx, &INSERT_EVENTS, &params)
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();

        // Agents, in id order so concurrent replicas lock them in one order.
        let mut seen: BTreeMap<&str, AgentSeen<'_>> = BTreeMap::new();
        for r in &rows {
            let a = seen.entry(r.env.agent.as_str()).or_default();
            a.first = Some(a.first.map_or(r.env.ts, |f| f.min(r.env.ts)));
            a.last = Some(a.last.map_or(r.env.ts, |l| l.max(r.env.ts)));
            if let EventBody::Heartbeat(h) = &r.env.body {
                if a.heartbeat.is_none_or(|t| r.env.ts >= t) {
                    a.heartbeat = Some(r.env.ts);
                    a.version = Some(h.version.as_str());
                }
            }
        }
        let a_ids: Vec<&str> = seen.keys().copied().collect();
        let a_first: Vec<Option<DateTime<Utc>>> = seen.values().map(|a| a.first).collect();
        let a_last: Vec<Option<DateTime<Utc>>> = seen.values().map(|a| a.last).collect();
        let a_hb: Vec<Option<DateTime<Utc>>> = seen.values().map(|a| a.heartbeat).collect();
        let a_ver: Vec<Option<&str>> = seen.values().map(|a| a.version).collect();
        // Most batches only confirm agents already known: insert unknown
        // ones without touching the rest, and move `last_seen` at most once
        // a minute, so concurrent writers seldom wait on an agent's row lock
        // (one upsert per batch made them take turns).
        let insert_agents = tx
            .prepare_cached(
                "INSERT INTO agents (id, first_seen, last_seen)
                 SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[])
                 ON CONFLICT (id) DO NOTHING",
            )
            .await?;
        tx.execute(&insert_agents, &[&a_ids, &a_first, &a_last]).await?;
        let touch_agents = tx
            .prepare_cached(
                "UPDATE agents a SET last_seen = GREATEST(a.last_seen, u.l), first_seen = LEAST(a.first_seen, u.f)
                   FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[]) AS u(i, f, l)
                  WHERE a.id = u.i AND (a.last_seen < u.l - interval '1 minute' OR a.first_seen > u.f)",
            )
            .await?;
        tx.execute(&touch_agents, &[&a_ids, &a_first, &a_last]).await?;
        if a_hb.iter().any(Option::is_some) {
            tx.execute(
                "UPDATE agents a SET last_heartbeat = u.h, version = u.v
                   FROM unnest($1::text[], $2::timestamptz[], $3::text[]) AS u(i, h, v)
                  WHERE a.id = u.i AND u.h IS NOT NULL AND (a.last_heartbeat IS NULL OR a.last_heartbeat < u.h)",
                &[&a_ids, &a_hb, &a_ver],
            )
            .await?;
        }

        let fresh: Vec<&EventRow> = rows.into_iter().filter(|r| inserted.contains(&r.env.id.0)).collect();
        self.write_chats(&tx, &fresh).await?;
        write_event_interactions(&tx, &fresh).await?;
        tx.commit().await
    }
}

/// One interaction row: its id (the event's, or for Ferry's own the
/// reply's), agent, time, and the interaction.
type InteractionRow<'a> = (Uuid, &'a str, DateTime<Utc>, &'a ferry_schema::event::Interaction);

/// The interactions among newly stored events, in one insert.
async fn write_event_interactions(tx: &deadpool_postgres::Transaction<'_>, rows: &[&EventRow]) -> Result<(), tokio_postgres::Error> {
    let found: Vec<InteractionRow<'_>> = rows
        .iter()
        .filter_map(|r| match &r.env.body {
            EventBody::Interaction(i) => Some((r.env.id.0, r.env.agent.as_str(), r.env.ts, i)),
            _ => None,
        })
        .collect();
    write_interactions(tx, &found, "assistant").await
}

/// `found` into `interactions`, reported by `reported_by` (`assistant`
/// or `ferry`), in one insert; only rows just stored come here, so each
/// id is new.
async fn write_interactions(
    tx: &deadpool_postgres::Transaction<'_>,
    found: &[InteractionRow<'_>],
    reported_by: &str,
) -> Result<(), tokio_postgres::Error> {
    if found.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = found.iter().map(|r| r.0).collect();
    let agents: Vec<&str> = found.iter().map(|r| r.1).collect();
    let ts: Vec<DateTime<Utc>> = found.iter().map(|r| r.2).collect();
    let sessions: Vec<&str> = found.iter().map(|r| r.3.session_id.as_str()).collect();
    let inputs: Vec<&str> = found.iter().map(|r| r.3.user_input.as_str()).collect();
    let intents: Vec<Option<&str>> = found.iter().map(|r| r.3.intent.as_deref()).collect();
    // text[] per row does not fit through unnest: each row's tools travel
    // as a JSON array and become text[] in SQL.
    let tools: Vec<String> = found
        .iter()
        .map(|r| serde_json::to_string(&r.3.tools_used).unwrap_or_else(|_| "[]".into()))
        .collect();
    let times: Vec<f64> = found.iter().map(|r| r.3.response_time_ms).collect();
    let success: Vec<bool> = found.iter().map(|r| r.3.success).collect();
    let errors: Vec<Option<&str>> = found.iter().map(|r| r.3.error_type.as_deref()).collect();
    let models: Vec<Option<&str>> = found.iter().map(|r| r.3.model.as_deref()).collect();
    let tokens: Vec<Option<i32>> = found.iter().map(|r| r.3.tokens.map(|t| i32::try_from(t).unwrap_or(i32::MAX))).collect();
    let stmt = tx
        .prepare_cached(
            "INSERT INTO interactions (id, agent, ts, session_id, user_input, intent, tools_used,
                                       response_time_ms, success, error_type, model, tokens, reported_by)
             SELECT i, a, t, s, u, n, ARRAY(SELECT jsonb_array_elements_text(tj::jsonb)), ms, ok, e, m, tk, $13
               FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::text[], $5::text[], $6::text[],
                           $7::text[], $8::float8[], $9::bool[], $10::text[], $11::text[], $12::int4[])
                    AS x(i, a, t, s, u, n, tj, ms, ok, e, m, tk)",
        )
        .await?;
    tx.execute(
        &stmt,
        &[&ids, &agents, &ts, &sessions, &inputs, &intents, &tools, &times, &success, &errors, &models, &tokens, &reported_by],
    )
    .await?;
    Ok(())
}

impl EventSink {
    /// Chats, set-wise: customers in one go, conversations in one go (for
    /// each customer whose chats in this batch have no idle gap; the rare
    /// others are filed one chat at a time, in time order), then the
    /// messages in one insert.
    async fn write_chats(&self, tx: &deadpool_postgres::Transaction<'_>, rows: &[&EventRow]) -> Result<(), tokio_postgres::Error> {
        let mut chats: Vec<(String, &EventRow, &ferry_schema::event::ChatMessage)> = rows
            .iter()
            .filter_map(|r| match &r.env.body {
                EventBody::Chat(c) => Some((customers::normalise(&c.sender), *r, c)),
                _ => None,
            })
            .collect();
        if chats.is_empty() {
            return Ok(());
        }
        // Grouped by customer (in lock order), in time order within one.
        chats.sort_by(|a, b| (a.1.env.agent.as_str(), &a.0, a.1.env.ts).cmp(&(b.1.env.agent.as_str(), &b.0, b.1.env.ts)));
        let groups: Vec<&[(String, &EventRow, &ferry_schema::event::ChatMessage)]> = chats
            .chunk_by(|a, b| a.1.env.agent == b.1.env.agent && a.0 == b.0)
            .collect();
        let seen: Vec<customers::Seen<'_>> = groups
            .iter()
            .map(|g| customers::Seen {
                agent: g[0].1.env.agent.as_str(),
                key: &g[0].0,
                display: &g[0].2.sender,
                first: g[0].1.env.ts,
                last: g[g.len() - 1].1.env.ts,
            })
            .collect();
        let ids = customers::identify_many(tx, &seen).await?;
        let customer_of = |g: &[(String, &EventRow, &ferry_schema::event::ChatMessage)]| {
            ids.get(&(g[0].1.env.agent.to_string(), g[0].0.clone())).copied()
        };
        let idle = self.conversation_idle;
        let gapless = |g: &[(String, &EventRow, &ferry_schema::event::ChatMessage)]| {
            g.windows(2).all(|w| (w[1].1.env.ts - w[0].1.env.ts).to_std().unwrap_or_default() <= idle)
        };
        let mut spans = Vec::new();
        let mut conversation_of_event = std::collections::HashMap::new();
        for g in &groups {
            let Some(cid) = customer_of(g) else { continue };
            if gapless(g) {
                spans.push(conversations::Span {
                    customer_id: cid,
                    agent: g[0].1.env.agent.as_str(),
                    chat: &g[0].2.chat,
                    first: g[0].1.env.ts,
                    last: g[g.len() - 1].1.env.ts,
                });
            } else {
                for (_, r, c) in g.iter() {
                    let conv = conversations::record_chat(&**tx, cid, r.env.agent.as_str(), &c.chat, r.env.ts, idle).await?;
                    conversation_of_event.insert(r.env.id.0, conv);
                }
            }
        }
        let by_customer = conversations::record_spans(tx, &spans, idle).await?;

        let mut ev = Vec::with_capacity(chats.len());
        let (mut agents, mut chat, mut chat_type, mut sender, mut msg_type, mut text, mut ts, mut cust, mut conv) =
            (vec![], vec![], vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        for g in &groups {
            let cid = customer_of(g);
            for (_, r, c) in g.iter() {
                ev.push(r.env.id.0);
                agents.push(r.env.agent.as_str());
                chat.push(c.chat.as_str());
                chat_type.push(enum_str(&c.chat_type));
                sender.push(c.sender.as_str());
                msg_type.push(enum_str(&c.msg_type));
                text.push(c.text.as_str());
                ts.push(r.env.ts);
                cust.push(cid);
                conv.push(
                    conversation_of_event
                        .get(&r.env.id.0)
                        .copied()
                        .or_else(|| cid.and_then(|c| by_customer.get(&c).copied())),
                );
            }
        }
        // A plain insert: these events were inserted by this transaction, so
        // no message row can exist for them (its foreign key needs the
        // event), and a concurrent insert of the same event waits on the
        // events key first.
        let insert = tx
            .prepare_cached(
                "INSERT INTO chat_messages (event_id, agent, chat, chat_type, sender, msg_type, text, ts, customer_id, conversation_id)
                 SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                                      $8::timestamptz[], $9::int8[], $10::int8[])",
            )
            .await?;
        tx.execute(
            &insert,
            &[&ev, &agents, &chat, &chat_type, &sender, &msg_type, &text, &ts, &cust, &conv],
        )
        .await?;
        Ok(())
    }
}

/// The wire name of a unit enum (`direct`, `text`, ...): the same text the
/// JSON encoding uses, so the archive and the wire never disagree.
fn enum_str<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|j| j.as_str().map(str::to_string))
        .unwrap_or_default()
}


fn action(a: ChatAction) -> &'static str {
    match a {
        ChatAction::Reply => "reply",
        ChatAction::Escalate => "escalate",
        ChatAction::Ignore => "ignore",
    }
}

impl Sink for ReplySink {
    type Row = ReplyRow;

    async fn write(&self, client: &mut deadpool_postgres::ClientWrapper, rows: &[ReplyRow]) -> Result<(), tokio_postgres::Error> {
        let rows = first_of_each(rows, |r| r.reply.id.0);
        let mut tx = client.transaction().await?;
        let n = rows.len();
        let mut by_kind = Vec::with_capacity(n);
        let mut by_name = Vec::with_capacity(n);
        let mut actions = Vec::with_capacity(n);
        let mut contents = Vec::with_capacity(n);
        let mut confidence = Vec::with_capacity(n);
        let mut ms = Vec::with_capacity(n);
        let mut tokens = Vec::with_capacity(n);
        for r in &rows {
            match &r.reply.body {
                ReplyBody::Chat(c) => {
                    by_kind.push(Some(c.answered_by.kind.as_str()));
                    by_name.push(Some(c.answered_by.name.as_str()));
                    actions.push(Some(action(c.action)));
                    contents.push(c.content.as_deref());
                    confidence.push(Some(c.confidence));
                    ms.push(Some(c.processing_ms));
                    tokens.push(c.tokens.map(|t| i32::try_from(t).unwrap_or(i32::MAX)));
                }
                ReplyBody::Prediction(p) => {
                    by_kind.push(Some("model"));
                    by_name.push(Some(p.model.as_str()));
                    actions.push(None);
                    contents.push(Some(p.prediction.as_str()));
                    confidence.push(Some(p.confidence));
                    ms.push(Some(p.processing_ms));
                    tokens.push(None);
                }
                ReplyBody::Alert(a) => {
                    by_kind.push(Some("rule"));
                    by_name.push(Some(a.rule.as_str()));
                    actions.push(None);
                    contents.push(Some(a.message.as_str()));
                    confidence.push(None);
                    ms.push(Some(a.processing_ms));
                    tokens.push(None);
                }
            }
        }
        let ids: Vec<Uuid> = rows.iter().map(|r| r.reply.id.0).collect();
        let to: Vec<Uuid> = rows.iter().map(|r| r.reply.in_reply_to.0).collect();
        let agents: Vec<&str> = rows.iter().map(|r| r.reply.agent.as_str()).collect();
        let kinds: Vec<&str> = rows.iter().map(|r| r.reply.kind().as_str()).collect();
        let ts: Vec<DateTime<Utc>> = rows.iter().map(|r| r.reply.ts).collect();
        let bodies: Vec<&str> = rows.iter().map(|r| r.body_json.as_str()).collect();
        let seqs: Vec<i64> = rows.iter().map(|r| r.stream_seq).collect();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 14] = [
            &ids, &to, &agents, &kinds, &ts, &by_kind, &by_name, &actions, &contents, &confidence, &ms, &tokens, &bodies,
            &seqs,
        ];
        let inserted: HashSet<Uuid> = insert_new(&mut tx, &INSERT_REPLIES, &params)
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for r in rows.iter().filter(|r| inserted.contains(&r.reply.id.0)) {
            let rep = &r.reply;
            match &rep.body {
                ReplyBody::Prediction(p) => {
                    tx.execute(
                        "INSERT INTO predictions (reply_id, event_id, agent, ts, prediction, confidence, model)
                         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (reply_id) DO NOTHING",
                        &[&rep.id.0, &rep.in_reply_to.0, &rep.agent.as_str(), &rep.ts, &p.prediction, &p.confidence, &p.model],
                    )
                    .await?;
                }
                ReplyBody::Alert(a) => {
                    tx.execute(
                        "INSERT INTO rule_alerts (reply_id, event_id, agent, ts, rule, message)
                         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (reply_id) DO NOTHING",
                        &[&rep.id.0, &rep.in_reply_to.0, &rep.agent.as_str(), &rep.ts, &a.rule, &a.message],
                    )
                    .await?;
                }
                ReplyBody::Chat(_) => {}
            }
        }
        // Ferry's own work, as interactions (`Reply::as_interaction`).
        let own: Vec<_> = rows
            .iter()
            .filter(|r| inserted.contains(&r.reply.id.0))
            .map(|r| (r.reply.id.0, r.reply.agent.as_str(), r.reply.ts, r.reply.as_interaction()))
            .collect();
        let own: Vec<InteractionRow<'_>> = own.iter().map(|(i, a, t, x)| (*i, *a, *t, x)).collect();
        write_interactions(&tx, &own, "ferry").await?;
        tx.commit().await
    }
}

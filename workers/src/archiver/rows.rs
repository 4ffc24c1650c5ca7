//! What the archiver writes: events and replies as rows, and the typed tables derived from them.
//!
//! Every statement is idempotent on the event id or reply id: the base
//! insert uses `ON CONFLICT DO NOTHING ... RETURNING id`, and only rows it
//! actually inserted fan out into chats, activities, predictions and alerts.
//! A replayed or redelivered message therefore changes nothing.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use ferry_schema::reply::{ChatAction, ResponderKind};
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

/// Writes events (and agents, activities, chats with their customers and
/// conversations).
#[derive(Debug, Clone)]
pub struct EventSink {
    /// Idle time after which a chat opens a new conversation.
    pub conversation_idle: Duration,
}

/// Writes replies (and predictions, alerts).
#[derive(Debug, Clone, Default)]
pub struct ReplySink;

fn first_of_each<'a, T>(rows: &'a [T], id: impl Fn(&T) -> Uuid) -> Vec<&'a T> {
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

    async fn write(&self, client: &mut tokio_postgres::Client, rows: &[EventRow]) -> Result<(), tokio_postgres::Error> {
        let rows = first_of_each(rows, |r| r.env.id.0);
        let tx = client.transaction().await?;

        let ids: Vec<Uuid> = rows.iter().map(|r| r.env.id.0).collect();
        let agents: Vec<&str> = rows.iter().map(|r| r.env.agent.as_str()).collect();
        let kinds: Vec<&str> = rows.iter().map(|r| r.env.kind().as_str()).collect();
        let ts: Vec<DateTime<Utc>> = rows.iter().map(|r| r.env.ts).collect();
        let bodies: Vec<&str> = rows.iter().map(|r| r.body_json.as_str()).collect();
        let seqs: Vec<i64> = rows.iter().map(|r| r.stream_seq).collect();
        let inserted: HashSet<Uuid> = tx
            .query(
                "INSERT INTO events (id, agent, kind, ts, body, stream_seq)
                 SELECT i, a, k, t, b::jsonb, s
                   FROM unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[], $5::text[], $6::int8[])
                        AS u(i, a, k, t, b, s)
                 ON CONFLICT (id) DO NOTHING
                 RETURNING id",
                &[&ids, &agents, &kinds, &ts, &bodies, &seqs],
            )
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
        tx.execute(
            "INSERT INTO agents (id, first_seen, last_seen, last_heartbeat, version)
             SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::timestamptz[], $5::text[])
             ON CONFLICT (id) DO UPDATE SET
                first_seen = LEAST(agents.first_seen, EXCLUDED.first_seen),
                last_seen = GREATEST(agents.last_seen, EXCLUDED.last_seen),
                last_heartbeat = GREATEST(agents.last_heartbeat, EXCLUDED.last_heartbeat),
                version = CASE WHEN EXCLUDED.last_heartbeat >= agents.last_heartbeat
                                 OR agents.last_heartbeat IS NULL
                               THEN COALESCE(EXCLUDED.version, agents.version)
                               ELSE agents.version END",
            &[&a_ids, &a_first, &a_last, &a_hb, &a_ver],
        )
        .await?;

        let fresh: Vec<&EventRow> = rows.into_iter().filter(|r| inserted.contains(&r.env.id.0)).collect();
        write_activities(&tx, &fresh).await?;
        self.write_chats(&tx, &fresh).await?;
        tx.commit().await
    }
}

async fn write_activities(tx: &tokio_postgres::Transaction<'_>, rows: &[&EventRow]) -> Result<(), tokio_postgres::Error> {
    let acts: Vec<(&EventRow, &ferry_schema::event::Activity)> = rows
        .iter()
        .filter_map(|r| match &r.env.body {
            EventBody::Activity(a) => Some((*r, a)),
            _ => None,
        })
        .collect();
    if acts.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = acts.iter().map(|(r, _)| r.env.id.0).collect();
    let agents: Vec<&str> = acts.iter().map(|(r, _)| r.env.agent.as_str()).collect();
    let ts: Vec<DateTime<Utc>> = acts.iter().map(|(r, _)| r.env.ts).collect();
    let apps: Vec<&str> = acts.iter().map(|(_, a)| a.app.as_str()).collect();
    let titles: Vec<&str> = acts.iter().map(|(_, a)| a.title.as_str()).collect();
    let exes: Vec<Option<&str>> = acts.iter().map(|(_, a)| a.exe.as_deref()).collect();
    let sites: Vec<Option<&str>> = acts.iter().map(|(_, a)| a.site.as_deref()).collect();
    let afk: Vec<bool> = acts.iter().map(|(_, a)| a.afk).collect();
    let dur: Vec<i64> = acts
        .iter()
        .map(|(_, a)| i64::try_from(a.duration_ms).unwrap_or(i64::MAX))
        .collect();
    tx.execute(
        "INSERT INTO activities (event_id, agent, ts, app, title, exe, site, afk, duration_ms)
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::text[], $5::text[],
                              $6::text[], $7::text[], $8::bool[], $9::int8[])
         ON CONFLICT (event_id) DO NOTHING",
        &[&ids, &agents, &ts, &apps, &titles, &exes, &sites, &afk, &dur],
    )
    .await?;
    Ok(())
}

impl EventSink {
    /// Chats one by one, grouped by customer and in time order within a
    /// customer: identify the customer, file the chat in its conversation,
    /// store the message.
    async fn write_chats(&self, tx: &tokio_postgres::Transaction<'_>, rows: &[&EventRow]) -> Result<(), tokio_postgres::Error> {
        let mut chats: Vec<(String, &EventRow, &ferry_schema::event::ChatMessage)> = rows
            .iter()
            .filter_map(|r| match &r.env.body {
                EventBody::Chat(c) => Some((customers::normalise(&c.sender), *r, c)),
                _ => None,
            })
            .collect();
        chats.sort_by(|a, b| (a.1.env.agent.as_str(), &a.0, a.1.env.ts).cmp(&(b.1.env.agent.as_str(), &b.0, b.1.env.ts)));
        for (_, r, c) in chats {
            let agent = r.env.agent.as_str();
            let customer = customers::identify(tx, agent, &c.sender, r.env.ts).await?;
            let conversation =
                conversations::record_chat(tx, customer.id, agent, &c.chat, r.env.ts, self.conversation_idle).await?;
            tx.execute(
                "INSERT INTO chat_messages (event_id, agent, chat, chat_type, sender, msg_type, text, ts, customer_id, conversation_id)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (event_id) DO NOTHING",
                &[
                    &r.env.id.0,
                    &agent,
                    &c.chat,
                    &enum_str(&c.chat_type),
                    &c.sender,
                    &enum_str(&c.msg_type),
                    &c.text,
                    &r.env.ts,
                    &customer.id,
                    &conversation,
                ],
            )
            .await?;
        }
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

fn responder_kind(k: ResponderKind) -> &'static str {
    match k {
        ResponderKind::Rule => "rule",
        ResponderKind::Model => "model",
        ResponderKind::KbTemplate => "kb_template",
        ResponderKind::Apology => "apology",
    }
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

    async fn write(&self, client: &mut tokio_postgres::Client, rows: &[ReplyRow]) -> Result<(), tokio_postgres::Error> {
        let rows = first_of_each(rows, |r| r.reply.id.0);
        let tx = client.transaction().await?;
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
                    by_kind.push(Some(responder_kind(c.answered_by.kind)));
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
        let inserted: HashSet<Uuid> = tx
            .query(
                "INSERT INTO replies (id, in_reply_to, agent, kind, ts, answered_by_kind, answered_by, action,
                                      content, confidence, processing_ms, tokens, body, stream_seq)
                 SELECT i, e, a, k, t, bk, bn, ac, c, cf, ms, tk, b::jsonb, s
                   FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::timestamptz[], $6::text[],
                               $7::text[], $8::text[], $9::text[], $10::real[], $11::float8[], $12::int4[],
                               $13::text[], $14::int8[])
                        AS u(i, e, a, k, t, bk, bn, ac, c, cf, ms, tk, b, s)
                 ON CONFLICT (id) DO NOTHING
                 RETURNING id",
                &[
                    &ids, &to, &agents, &kinds, &ts, &by_kind, &by_name, &actions, &contents, &confidence, &ms,
                    &tokens, &bodies, &seqs,
                ],
            )
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
                        "INSERT INTO alerts (reply_id, event_id, agent, ts, rule, message)
                         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (reply_id) DO NOTHING",
                        &[&rep.id.0, &rep.in_reply_to.0, &rep.agent.as_str(), &rep.ts, &a.rule, &a.message],
                    )
                    .await?;
                }
                ReplyBody::Chat(_) => {}
            }
        }
        tx.commit().await
    }
}

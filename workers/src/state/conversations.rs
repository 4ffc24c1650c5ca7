//! Conversations: a customer's chat with one agent, opened and closed by idle time, and its last turns.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;
use uuid::Uuid;

/// How long a conversation may be idle before the next chat opens a new one.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(30 * 60);

/// Who spoke a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaker {
    /// The customer (a chat message).
    Customer,
    /// The desk (a reply Ferry sent, by rule or model).
    Agent,
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    /// Who said it.
    pub speaker: Speaker,
    /// What was said.
    pub text: String,
    /// When.
    pub ts: DateTime<Utc>,
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Files a chat at `ts` under the customer's open conversation: closes the
/// open one first when it has been idle longer than `idle`, opens one when
/// none is open, and moves `last_activity` forward. Returns the
/// conversation id. Call it in the transaction that stores the message.
pub async fn record_chat<C: GenericClient>(
    client: &C,
    customer_id: i64,
    agent: &str,
    chat: &str,
    ts: DateTime<Utc>,
    idle: Duration,
) -> Result<i64, tokio_postgres::Error> {
    client
        .execute(
            "UPDATE conversations SET status = 'closed', closed_at = last_activity
              WHERE customer_id = $1 AND status = 'open'
                AND last_activity < $2::timestamptz - make_interval(secs => $3::float8)",
            &[&customer_id, &ts, &secs(idle)],
        )
        .await?;
    let row = client
        .query_one(
            "INSERT INTO conversations (customer_id, agent, chat, status, opened_at, last_activity)
             VALUES ($1, $2, $3, 'open', $4, $4)
             ON CONFLICT (customer_id) WHERE status = 'open' DO UPDATE
                SET last_activity = GREATEST(conversations.last_activity, EXCLUDED.last_activity)
             RETURNING id",
            &[&customer_id, &agent, &chat, &ts],
        )
        .await?;
    Ok(row.get(0))
}

/// One customer's chats in a batch, with no gap longer than the idle time
/// between them.
#[derive(Debug, Clone)]
pub struct Span<'a> {
    /// The customer.
    pub customer_id: i64,
    /// The agent.
    pub agent: &'a str,
    /// The chat (of the first message).
    pub chat: &'a str,
    /// First message time.
    pub first: DateTime<Utc>,
    /// Last message time.
    pub last: DateTime<Utc>,
}

/// [`record_chat`] for many customers at once: each span closes its
/// customer's conversation when idle before `first`, then opens one or
/// moves `last_activity` to `last` (to the minute). A few statements
/// whatever the number of customers (each customer at most once). Returns
/// conversation ids by customer id.
pub async fn record_spans<C: deadpool_postgres::GenericClient + Sync>(
    client: &C,
    spans: &[Span<'_>],
    idle: Duration,
) -> Result<std::collections::HashMap<i64, i64>, tokio_postgres::Error> {
    let ids: Vec<i64> = spans.iter().map(|s| s.customer_id).collect();
    let first: Vec<DateTime<Utc>> = spans.iter().map(|s| s.first).collect();
    let last: Vec<DateTime<Utc>> = spans.iter().map(|s| s.last).collect();
    client
        .execute(
            &client.prepare_cached("UPDATE conversations c SET status = 'closed', closed_at = c.last_activity
               FROM unnest($1::int8[], $2::timestamptz[]) AS u(cid, f)
              WHERE c.customer_id = u.cid AND c.status = 'open'
                AND c.last_activity < u.f - make_interval(secs => $3::float8)").await?,
            &[&ids, &first, &secs(idle)],
        )
        .await?;
    // Most customers have an open conversation: read those, open the
    // missing ones (ON CONFLICT covers a concurrent batch opening the same),
    // and move `last_activity` only when it advanced by a minute (idle time
    // is counted in tens of minutes), so a batch seldom rewrites rows.
    let select = client
        .prepare_cached(
            "SELECT c.customer_id, c.id FROM conversations c
               JOIN unnest($1::int8[]) AS u(cid) ON c.customer_id = u.cid AND c.status = 'open'",
        )
        .await?;
    let mut rows = client.query(&select, &[&ids]).await?;
    if rows.len() < spans.len() {
        let open: std::collections::HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
        let new: Vec<&Span<'_>> = spans.iter().filter(|s| !open.contains(&s.customer_id)).collect();
        let n_ids: Vec<i64> = new.iter().map(|s| s.customer_id).collect();
        let n_agents: Vec<&str> = new.iter().map(|s| s.agent).collect();
        let n_chats: Vec<&str> = new.iter().map(|s| s.chat).collect();
        let n_first: Vec<DateTime<Utc>> = new.iter().map(|s| s.first).collect();
        let n_last: Vec<DateTime<Utc>> = new.iter().map(|s| s.last).collect();
        let insert = client
            .prepare_cached(
                "INSERT INTO conversations (customer_id, agent, chat, status, opened_at, last_activity)
                 SELECT cid, a, ch, 'open', f, l
                   FROM unnest($1::int8[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[]) AS u(cid, a, ch, f, l)
                 ON CONFLICT (customer_id) WHERE status = 'open' DO NOTHING",
            )
            .await?;
        client.execute(&insert, &[&n_ids, &n_agents, &n_chats, &n_first, &n_last]).await?;
        rows.extend(client.query(&select, &[&n_ids]).await?);
    }
    let touch = client
        .prepare_cached(
            "UPDATE conversations c SET last_activity = u.l
               FROM unnest($1::int8[], $2::timestamptz[]) AS u(cid, l)
              WHERE c.customer_id = u.cid AND c.status = 'open' AND c.last_activity < u.l - interval '1 minute'",
        )
        .await?;
    client.execute(&touch, &[&ids, &last]).await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The last `n` turns (oldest first) before the chat `event` sent at `ts`
/// by `sender` to `agent`, from the conversation that chat belongs to: the
/// customer's latest conversation opened at or before `ts` and active
/// within `idle` of it. Works whether or not the archiver has stored the
/// chat itself yet; the chat is never one of its own turns.
pub async fn context<C: GenericClient>(
    client: &C,
    agent: &str,
    sender: &str,
    event: Uuid,
    ts: DateTime<Utc>,
    idle: Duration,
    n: usize,
) -> Result<Vec<Turn>, tokio_postgres::Error> {
    let key = super::customers::normalise(sender);
    let limit = i64::try_from(n).unwrap_or(i64::MAX);
    let rows = client
        .query(
            "WITH conv AS (
                SELECT c.id FROM conversations c JOIN customers k ON k.id = c.customer_id
                 WHERE k.agent = $1 AND k.sender_key = $2
                   AND c.opened_at <= $3 AND c.last_activity >= $3::timestamptz - make_interval(secs => $4::float8)
                 ORDER BY c.opened_at DESC LIMIT 1
             ), msgs AS (
                SELECT m.event_id, m.text, m.ts FROM chat_messages m, conv
                 WHERE m.conversation_id = conv.id AND m.ts <= $3 AND m.event_id <> $5
             )
             SELECT speaker, text, ts FROM (
                SELECT 0 AS speaker, text, ts, event_id AS k FROM msgs
                UNION ALL
                SELECT 1, r.content, r.ts, r.id FROM replies r JOIN msgs ON msgs.event_id = r.in_reply_to
                 WHERE r.kind = 'chat' AND r.action = 'reply' AND r.content IS NOT NULL
             ) t ORDER BY ts DESC, k DESC LIMIT $6",
            &[&agent, &key, &ts, &secs(idle), &event, &limit],
        )
        .await?;
    let mut turns: Vec<Turn> = rows
        .iter()
        .map(|r| Turn {
            speaker: if r.get::<_, i32>(0) == 0 { Speaker::Customer } else { Speaker::Agent },
            text: r.get(1),
            ts: r.get(2),
        })
        .collect();
    turns.reverse();
    Ok(turns)
}

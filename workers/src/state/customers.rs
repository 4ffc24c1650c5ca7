//! Customers: a chat sender as one agent sees it, found or created on the first chat.

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;
use unicode_normalization::UnicodeNormalization;

/// A customer as the workers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Customer {
    /// Database id.
    pub id: i64,
    /// Tags set by operators (rules can match on them).
    pub tags: Vec<String>,
}

/// The key a sender is known by: NFKC (full-width letters and digits become
/// ASCII, compatibility forms fold), trimmed, inner whitespace collapsed to
/// one space, lower case. "  Ａlice　Chen " and "alice chen" are one customer.
pub fn normalise(sender: &str) -> String {
    let folded: String = sender.nfkc().collect::<String>().to_lowercase();
    folded.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Finds the customer `sender` of `agent`, creating it on first sight, and
/// moves its `last_seen` forward to `ts`. Idempotent and safe under
/// concurrency (one upsert on the `(agent, sender_key)` key).
pub async fn identify<C: GenericClient>(
    client: &C,
    agent: &str,
    sender: &str,
    ts: DateTime<Utc>,
) -> Result<Customer, tokio_postgres::Error> {
    let row = client
        .query_one(
            "INSERT INTO customers (agent, sender_key, display_name, first_seen, last_seen)
             VALUES ($1, $2, $3, $4, $4)
             ON CONFLICT (agent, sender_key) DO UPDATE
                SET last_seen = GREATEST(customers.last_seen, EXCLUDED.last_seen),
                    first_seen = LEAST(customers.first_seen, EXCLUDED.first_seen)
             RETURNING id, tags",
            &[&agent, &normalise(sender), &sender.trim(), &ts],
        )
        .await?;
    Ok(Customer {
        id: row.get(0),
        tags: row.get(1),
    })
}

/// One sender seen in a batch of chats.
#[derive(Debug, Clone)]
pub struct Seen<'a> {
    /// The agent.
    pub agent: &'a str,
    /// [`normalise`]d sender.
    pub key: &'a str,
    /// The sender as first written (the display name of a new customer).
    pub display: &'a str,
    /// Earliest chat time in the batch.
    pub first: DateTime<Utc>,
    /// Latest chat time in the batch.
    pub last: DateTime<Utc>,
}

/// [`identify`] for many senders at once (the archiver's batches), in three
/// statements whatever their number, each prepared once per pooled
/// connection. New customers are created; known ones
/// get `last_seen` moved at most once a minute, so concurrent batches seldom
/// wait on a customer's row lock. Returns the ids by `(agent, key)`.
pub async fn identify_many<C: deadpool_postgres::GenericClient + Sync>(
    client: &C,
    seen: &[Seen<'_>],
) -> Result<std::collections::HashMap<(String, String), i64>, tokio_postgres::Error> {
    let agents: Vec<&str> = seen.iter().map(|s| s.agent).collect();
    let keys: Vec<&str> = seen.iter().map(|s| s.key).collect();
    let first: Vec<DateTime<Utc>> = seen.iter().map(|s| s.first).collect();
    let last: Vec<DateTime<Utc>> = seen.iter().map(|s| s.last).collect();
    let select = client
        .prepare_cached(
            "SELECT c.id, c.agent, c.sender_key FROM customers c
               JOIN unnest($1::text[], $2::text[]) AS u(a, k) ON c.agent = u.a AND c.sender_key = u.k",
        )
        .await?;
    let mut rows = client.query(&select, &[&agents, &keys]).await?;
    // Most senders are known: insert only the others (ON CONFLICT covers a
    // concurrent batch creating the same customer), then read them too.
    if rows.len() < seen.len() {
        let known: std::collections::HashSet<(String, String)> =
            rows.iter().map(|r| (r.get(1), r.get(2))).collect();
        let new: Vec<&Seen<'_>> =
            seen.iter().filter(|s| !known.contains(&(s.agent.to_string(), s.key.to_string()))).collect();
        let n_agents: Vec<&str> = new.iter().map(|s| s.agent).collect();
        let n_keys: Vec<&str> = new.iter().map(|s| s.key).collect();
        let n_names: Vec<&str> = new.iter().map(|s| s.display.trim()).collect();
        let n_first: Vec<DateTime<Utc>> = new.iter().map(|s| s.first).collect();
        let n_last: Vec<DateTime<Utc>> = new.iter().map(|s| s.last).collect();
        let insert = client
            .prepare_cached(
                "INSERT INTO customers (agent, sender_key, display_name, first_seen, last_seen)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[])
                 ON CONFLICT (agent, sender_key) DO NOTHING",
            )
            .await?;
        client.execute(&insert, &[&n_agents, &n_keys, &n_names, &n_first, &n_last]).await?;
        rows.extend(client.query(&select, &[&n_agents, &n_keys]).await?);
    }
    let touch = client
        .prepare_cached(
            "UPDATE customers c SET last_seen = GREATEST(c.last_seen, u.l), first_seen = LEAST(c.first_seen, u.f)
               FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[]) AS u(a, k, f, l)
              WHERE c.agent = u.a AND c.sender_key = u.k
                AND (c.last_seen < u.l - interval '1 minute' OR c.first_seen > u.f)",
        )
        .await?;
    client.execute(&touch, &[&agents, &keys, &first, &last]).await?;
    Ok(rows.iter().map(|r| ((r.get(1), r.get(2)), r.get(0))).collect())
}

/// Looks a customer up without creating it.
pub async fn find<C: GenericClient>(
    client: &C,
    agent: &str,
    sender: &str,
) -> Result<Option<Customer>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT id, tags FROM customers WHERE agent = $1 AND sender_key = $2",
            &[&agent, &normalise(sender)],
        )
        .await?;
    Ok(row.map(|r| Customer {
        id: r.get(0),
        tags: r.get(1),
    }))
}

/// Replaces a customer's tags (operators; tests).
pub async fn set_tags<C: GenericClient>(
    client: &C,
    id: i64,
    tags: &[String],
) -> Result<(), tokio_postgres::Error> {
    client
        .execute("UPDATE customers SET tags = $2 WHERE id = $1", &[&id, &tags])
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::normalise;

    #[test]
    fn senders_normalise() {
        for (raw, key) in [
            ("Alice", "alice"),
            ("  Ａlice　Chen ", "alice chen"),
            ("alice\tchen", "alice chen"),
            ("王小明", "王小明"),
            (" 王小明 ", "王小明"),
            ("ＶＩＰ客户０１", "vip客户01"),
        ] {
            assert_eq!(normalise(raw), key, "{raw:?}");
        }
    }
}

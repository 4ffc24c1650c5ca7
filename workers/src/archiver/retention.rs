//! Day partitions and retention: making tomorrow's partitions, and dropping the days older than each table keeps.
//!
//! `events`, `replies` and `interactions` are partitioned by UTC day
//! (`schema/migrations/V7__partitions.sql` says by which key and why), so
//! clean-up drops a day's partition instead of deleting its rows. Every
//! archiver replica runs the upkeep ([`upkeep`]) at start and then every
//! [`UPKEEP_EVERY`]: it makes the partitions of yesterday to the day after
//! tomorrow, then, with a [`Retention`], removes what is older than it
//! keeps. One replica acts at a time (an advisory lock); the others skip the
//! pass. What it removed is logged, and returned as [`Removed`].

use std::time::Duration;

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use tokio_postgres::Client;

/// The tables partitioned by day, in the order they are kept up.
pub const PARTITIONED: [&str; 3] = ["events", "replies", "interactions"];

/// How often a replica makes the coming days' partitions and applies the
/// retention. A day's partitions exist two days ahead, so a replica that
/// is down for under two days never leaves rows to the default partition.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(3600);

/// Advisory lock key held by the replica that applies the retention.
/// ASCII "ferryret".
pub const RETENTION_LOCK: i64 = 0x6665_7272_7972_6574;

/// How long a drop or delete waits for a lock before the pass gives up (and
/// the next pass tries again): writers are not held up behind it.
const LOCK_TIMEOUT: &str = "10s";

/// How long each table keeps its rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    /// Events (by the day of their id; stragglers in the default partition
    /// by `archived_at`).
    pub events: Duration,
    /// Replies (by the day of the event they answer), with their
    /// predictions and rule alerts.
    pub replies: Duration,
    /// Interactions (by `ts`).
    pub interactions: Duration,
    /// Alerts raised by the alerts role (by `ts`).
    pub alerts: Duration,
}

/// A day.
const DAY: Duration = Duration::from_secs(86_400);

impl Default for Retention {
    /// Events, replies and interactions 30 days, alerts 90 days.
    fn default() -> Self {
        Self {
            events: DAY * 30,
            replies: DAY * 30,
            interactions: DAY * 30,
            alerts: DAY * 90,
        }
    }
}

/// Why a retention given as text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// A table that retention does not know.
    #[error("retention: unknown table `{0}` (expected events, replies, interactions or alerts)")]
    UnknownTable(String),
    /// An item that is not `TABLE=DAYS`.
    #[error("retention: `{0}` is not TABLE=DAYS with DAYS a whole number of days from 1 to 36500")]
    BadItem(String),
}

impl Retention {
    /// Reads `events=30,alerts=90` (days; the tables not named keep their
    /// defaults) or `forever` (keep everything: `None`).
    pub fn parse(spec: &str) -> Result<Option<Self>, SpecError> {
        let spec = spec.trim();
        if spec.eq_ignore_ascii_case("forever") {
            return Ok(None);
        }
        let mut keep = Self::default();
        for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let bad = || SpecError::BadItem(item.to_string());
            let (table, days) = item.split_once('=').ok_or_else(bad)?;
            let days: u32 = days.trim().parse().map_err(|_| bad())?;
            if !(1..=36_500).contains(&days) {
                return Err(bad());
            }
            let slot = match table.trim() {
                "events" => &mut keep.events,
                "replies" => &mut keep.replies,
                "interactions" => &mut keep.interactions,
                "alerts" => &mut keep.alerts,
                other => return Err(SpecError::UnknownTable(other.to_string())),
            };
            *slot = DAY * days;
        }
        Ok(Some(keep))
    }
}

impl std::fmt::Display for Retention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let days = |d: Duration| d.as_secs() / DAY.as_secs();
        write!(
            f,
            "events={},replies={},interactions={},alerts={}",
            days(self.events),
            days(self.replies),
            days(self.interactions),
            days(self.alerts)
        )
    }
}

/// What one retention pass removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removed {
    /// The partitions dropped, each with the rows it held.
    pub partitions: Vec<(String, u64)>,
    /// Rows deleted one by one (default partitions, unpartitioned tables),
    /// per table; only tables that lost rows.
    pub rows: Vec<(String, u64)>,
}

impl Removed {
    /// Rows removed in all.
    pub fn total(&self) -> u64 {
        self.partitions.iter().chain(&self.rows).map(|(_, n)| n).sum()
    }
}

/// Why an upkeep pass failed (the next pass tries again).
#[derive(Debug, thiserror::Error)]
pub enum UpkeepError {
    /// A statement failed (a lock not had within its timeout among them).
    #[error("partition upkeep: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// No connection could be had.
    #[error("partition upkeep: {0}")]
    Connect(#[from] crate::state::StateError),
}

/// Makes the partitions of each partitioned table for the days from the
/// day before `today` to two days after it; returns how many it made.
pub async fn make_partitions(client: &Client, today: NaiveDate) -> Result<u32, UpkeepError> {
    let stmt = client.prepare("SELECT ferry_add_day_partition($1, $2)").await?;
    let mut made = 0;
    for offset in -1..=2 {
        let day = today + TimeDelta::days(offset);
        for table in PARTITIONED {
            if client.query_one(&stmt, &[&table, &day]).await?.get::<_, bool>(0) {
                made += 1;
            }
        }
    }
    Ok(made)
}

/// Removes what `keep` no longer keeps, as of `now`. Returns `None` when
/// another replica holds the retention lock (it is doing the same).
///
/// `client` must be a connection of its own: the lock is held by its
/// session and released when the pass ends (or the connection closes).
pub async fn apply(client: &Client, keep: &Retention, now: DateTime<Utc>) -> Result<Option<Removed>, UpkeepError> {
    let got: bool = client.query_one("SELECT pg_try_advisory_lock($1)", &[&RETENTION_LOCK]).await?.get(0);
    if !got {
        return Ok(None);
    }
    let removed = remove(client, keep, now).await;
    let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&RETENTION_LOCK]).await;
    let removed = removed?;
    unlocked?;
    Ok(Some(removed))
}

async fn remove(client: &Client, keep: &Retention, now: DateTime<Utc>) -> Result<Removed, UpkeepError> {
    client.batch_execute(&format!("SET lock_timeout = '{LOCK_TIMEOUT}'")).await?;
    let mut removed = Removed::default();
    // A retention longer than the calendar keeps everything.
    let cutoff = |d: Duration| {
        TimeDelta::from_std(d)
            .ok()
            .and_then(|d| now.checked_sub_signed(d))
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    };

    for (table, kept) in [("events", keep.events), ("replies", keep.replies), ("interactions", keep.interactions)] {
        let before = cutoff(kept);
        for (name, day) in day_partitions(client, table).await? {
            // Its last instant is before the cutoff: the whole day is out.
            let end = (day + TimeDelta::days(1)).and_hms_opt(0, 0, 0).map(|t| t.and_utc());
            if end.is_some_and(|end| end <= before) {
                let rows: i64 = client.query_one(&format!("SELECT count(*) FROM {name}"), &[]).await?.get(0);
                client.batch_execute(&format!("DROP TABLE {name}")).await?;
                removed.partitions.push((name, u64::try_from(rows).unwrap_or(0)));
            }
        }
        // Stragglers: rows whose day had no partition.
        let column = if table == "interactions" { "ts" } else { "archived_at" };
        let sql = format!("DELETE FROM {table}_default WHERE {column} < $1");
        deleted(&mut removed, &format!("{table}_default"), client.execute(&sql, &[&before]).await?);
    }
    let replies_before = cutoff(keep.replies);
    for table in ["predictions", "rule_alerts"] {
        let n = client.execute(&format!("DELETE FROM {table} WHERE ts < $1"), &[&replies_before]).await?;
        deleted(&mut removed, table, n);
    }
    let n = client.execute("DELETE FROM alerts WHERE ts < $1", &[&cutoff(keep.alerts)]).await?;
    deleted(&mut removed, "alerts", n);
    let n = client.execute("DELETE FROM alert_deliveries WHERE ts < $1", &[&cutoff(keep.alerts)]).await?;
    deleted(&mut removed, "alert_deliveries", n);
    Ok(removed)
}

fn deleted(removed: &mut Removed, table: &str, n: u64) {
    if n > 0 {
        removed.rows.push((table.to_string(), n));
    }
}

/// The day partitions of `table` (`<table>_pYYYYMMDD`), oldest first.
async fn day_partitions(client: &Client, table: &str) -> Result<Vec<(String, NaiveDate)>, UpkeepError> {
    let rows = client
        .query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
              WHERE i.inhparent = $1::text::regclass AND c.relkind = 'r' ORDER BY 1",
            &[&table],
        )
        .await?;
    let prefix = format!("{table}_p");
    Ok(rows
        .iter()
        .filter_map(|r| {
            let name: String = r.get(0);
            let day = NaiveDate::parse_from_str(name.strip_prefix(&prefix)?, "%Y%m%d").ok()?;
            Some((name, day))
        })
        .collect())
}

/// One upkeep pass on a connection of its own: the coming days'
/// partitions, then, with `keep`, the retention. Logs what it did.
pub async fn upkeep(url: &str, keep: Option<&Retention>) -> Result<Option<Removed>, UpkeepError> {
    let client = crate::state::connect_one(url).await?;
    let now = Utc::now();
    let made = make_partitions(&client, now.date_naive()).await?;
    if made > 0 {
        tracing::info!(partitions = made, "made the coming days' partitions");
    }
    let Some(keep) = keep else { return Ok(None) };
    let removed = apply(&client, keep, now).await?;
    match &removed {
        Some(r) if r.total() > 0 || !r.partitions.is_empty() => tracing::info!(
            partitions = ?r.partitions,
            rows = ?r.rows,
            total = r.total(),
            "retention removed old data"
        ),
        Some(_) => tracing::debug!("retention: nothing old enough to remove"),
        None => tracing::debug!("retention: another replica is applying it"),
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retention_reads_as_days_per_table() {
        let keep = Retention::parse("events=7, alerts=365").unwrap().unwrap();
        assert_eq!(keep.events, DAY * 7);
        assert_eq!(keep.replies, DAY * 30, "a table not named keeps its default");
        assert_eq!(keep.alerts, DAY * 365);
        assert_eq!(keep.to_string(), "events=7,replies=30,interactions=30,alerts=365");
        assert_eq!(Retention::parse(&Retention::default().to_string()).unwrap(), Some(Retention::default()));
        assert_eq!(Retention::parse("forever").unwrap(), None);
        assert_eq!(Retention::parse("").unwrap(), Some(Retention::default()));
    }

    #[test]
    fn a_bad_retention_says_which_item() {
        assert_eq!(Retention::parse("event=7"), Err(SpecError::UnknownTable("event".into())));
        assert_eq!(Retention::parse("events=0"), Err(SpecError::BadItem("events=0".into())));
        assert_eq!(Retention::parse("events=7d"), Err(SpecError::BadItem("events=7d".into())));
        assert_eq!(Retention::parse("events"), Err(SpecError::BadItem("events".into())));
        assert!(Retention::parse("events=7d").unwrap_err().to_string().contains("`events=7d`"));
    }
}

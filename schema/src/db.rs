//! The PostgreSQL schema: embedded SQL migrations, applying them, and the check a worker runs at start.
//!
//! The migrations are the files in `schema/migrations/` (`V<n>__<name>.sql`),
//! compiled into every binary that enables the `db` feature. `ferry migrate`
//! (and `ferry up`) apply them with [`migrate`]; a worker calls [`check`] at
//! start and refuses to run against a database that lacks a migration it
//! needs.

use tokio_postgres::Client;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Refinery's history table (its default name).
const HISTORY_TABLE: &str = "refinery_schema_history";

/// Advisory lock key held while migrating, so two `ferry migrate` (or a
/// migrate and a `ferry up`) never apply the same migration at once.
/// ASCII "ferrymig".
const MIGRATE_LOCK: i64 = 0x6665_7272_796d_6967;

/// One migration, as compiled into this binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationName {
    /// Its version (the `n` in `V<n>__`).
    pub version: i64,
    /// Its name (after the `__`).
    pub name: String,
}

impl std::fmt::Display for MigrationName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "V{}__{}", self.version, self.name)
    }
}

/// Why migrating or checking the schema failed.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The database lacks migrations this binary needs.
    #[error(
        "the database schema is older than this program needs: missing {} (run `ferry migrate` against this database)",
        list(.missing)
    )]
    TooOld {
        /// The migrations not applied, oldest first.
        missing: Vec<MigrationName>,
    },
    /// A migration failed or the applied ones diverge from this binary's.
    #[error("migrating the database failed: {0}")]
    Migrate(#[from] refinery::Error),
    /// The database could not be queried.
    #[error("reading the schema history failed: {0}")]
    Query(#[from] tokio_postgres::Error),
}

fn list(m: &[MigrationName]) -> String {
    m.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// Every migration compiled into this binary, oldest first.
pub fn migrations() -> Vec<MigrationName> {
    let mut all: Vec<MigrationName> = embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| MigrationName {
            version: i64::from(m.version()),
            name: m.name().to_string(),
        })
        .collect();
    all.sort_by_key(|m| m.version);
    all
}

/// The newest migration version this binary knows.
pub fn latest_version() -> i64 {
    migrations().last().map_or(0, |m| m.version)
}

/// Applies every migration not yet applied (up to `target` when given) under
/// an advisory lock, and returns the ones it applied.
pub async fn migrate(client: &mut Client, target: Option<i64>) -> Result<Vec<MigrationName>, SchemaError> {
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATE_LOCK]).await?;
    let mut runner = embedded::migrations::runner();
    if let Some(t) = target {
        let t = i32::try_from(t).unwrap_or(i32::MAX);
        runner = runner.set_target(refinery::Target::Version(t));
    }
    let result = runner.run_async(client).await;
    // Unlock whatever happened; a lost connection releases it anyway.
    let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATE_LOCK]).await;
    let report = result?;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| MigrationName {
            version: i64::from(m.version()),
            name: m.name().to_string(),
        })
        .collect())
}

/// The versions applied to the database, oldest first (empty for a fresh
/// database).
pub async fn applied(client: &Client) -> Result<Vec<i64>, SchemaError> {
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&HISTORY_TABLE])
        .await?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    let rows = client
        .query(&format!("SELECT version::bigint FROM {HISTORY_TABLE} ORDER BY version"), &[])
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Checks that every migration up to `needed` (this binary's newest when
/// `None`) is applied. Migrations newer than this binary are fine: they only
/// ever add.
pub async fn check(client: &Client, needed: Option<i64>) -> Result<(), SchemaError> {
    let applied = applied(client).await?;
    let needed = needed.unwrap_or_else(latest_version);
    let missing: Vec<MigrationName> = migrations()
        .into_iter()
        .filter(|m| m.version <= needed && !applied.contains(&m.version))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(SchemaError::TooOld { missing })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_from_one_without_gaps() {
        let all = migrations();
        assert!(!all.is_empty());
        for (i, m) in all.iter().enumerate() {
            assert_eq!(m.version, i as i64 + 1, "{m}");
        }
        assert_eq!(latest_version(), all.len() as i64);
    }

    #[test]
    fn too_old_names_the_missing_migrations() {
        let e = SchemaError::TooOld {
            missing: vec![MigrationName { version: 3, name: "knowledge_base".into() }],
        };
        assert_eq!(
            e.to_string(),
            "the database schema is older than this program needs: missing V3__knowledge_base (run `ferry migrate` against this database)"
        );
    }
}

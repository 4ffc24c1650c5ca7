//! The state workers share through PostgreSQL: pool, schema check, customers, conversations, knowledge base.
//!
//! Workers keep no state of their own; what they know about a customer, a
//! conversation or the knowledge base they read here, per message.
//!
//! - [`connect`]: a `deadpool-postgres` pool from a `DATABASE_URL`, checked
//!   against the migrations this binary needs.
//! - [`customers`]: sender normalisation and identify-or-create.
//! - [`conversations`]: open/close by idle time, and the last N turns.
//! - [`kb`]: the Chinese/English term scheme, article upserts and top-k search.

pub mod conversations;
pub mod customers;
pub mod kb;

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use ferry_schema::db;

/// What a worker needs to reach the database.
#[derive(Debug, Clone)]
pub struct DbConfig {
    /// A libpq-style URL: `postgres://user:password@host:port/db`.
    pub url: String,
    /// Connections in this replica's pool: the most queries it runs at once.
    pub pool_size: usize,
    /// How long a query waits for a free connection before it fails.
    pub wait_timeout: Duration,
}

impl DbConfig {
    /// Defaults for `url`: 8 connections, 5 s wait.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            pool_size: 8,
            wait_timeout: Duration::from_secs(5),
        }
    }
}

/// Why the database could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// `DATABASE_URL` did not parse.
    #[error("DATABASE_URL is not a valid PostgreSQL URL ({reason}); expected postgres://user:password@host:port/database")]
    BadUrl {
        /// What the parser said.
        reason: String,
    },
    /// The pool could not be built.
    #[error("cannot build the PostgreSQL pool: {0}")]
    Pool(String),
    /// No connection could be had.
    #[error("cannot connect to PostgreSQL at {target}: {reason}")]
    Connect {
        /// Host and port (no password).
        target: String,
        /// What failed.
        reason: String,
    },
    /// The schema is missing migrations or unreadable.
    #[error(transparent)]
    Schema(#[from] db::SchemaError),
    /// A query failed.
    #[error("PostgreSQL query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
    /// `sslmode=require` was asked for, but the CA to trust is unusable.
    #[error("{ROOT_CERT_VAR}={path}: {reason}")]
    RootCert {
        /// The file named.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The CA (PEM) a `sslmode=require` connection trusts for the server's
/// certificate, as libpq names it; unset: the system's roots.
pub const ROOT_CERT_VAR: &str = "PGSSLROOTCERT";

/// The TLS connector of a `sslmode=require` URL: rustls, verifying the
/// server's certificate and name against [`ROOT_CERT_VAR`]'s CA, or the
/// system's roots. (Stricter than libpq's `require`, which checks nothing:
/// what `verify-full` does there.) Other modes connect in plaintext, as
/// before: `prefer` never verified anything either.
fn tls_connector() -> Result<tokio_postgres_rustls::MakeRustlsConnect, StateError> {
    use async_nats::rustls;
    ferry_schema::connect::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    match std::env::var(ROOT_CERT_VAR) {
        Ok(path) if !path.is_empty() => {
            let bad = |reason: String| StateError::RootCert { path: path.clone(), reason };
            let pem = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
            let mut found = 0;
            use rustls::pki_types::pem::PemObject as _;
            for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
                roots.add(cert.map_err(|e| bad(e.to_string()))?).map_err(|e| bad(e.to_string()))?;
                found += 1;
            }
            if found == 0 {
                return Err(bad("no certificate in it".into()));
            }
        }
        _ => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

fn wants_tls(pg: &tokio_postgres::Config) -> bool {
    pg.get_ssl_mode() == tokio_postgres::config::SslMode::Require
}

impl From<deadpool_postgres::PoolError> for StateError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Self::Connect {
            target: "the pool".into(),
            reason: e.to_string(),
        }
    }
}

/// Host and port of a URL, for messages (never the password).
pub fn describe(pg: &tokio_postgres::Config) -> String {
    let host = pg
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(s) => s.clone(),
            #[cfg(unix)]
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let db = pg.get_dbname().unwrap_or("(default)");
    format!("{host}:{port}/{db}")
}

/// Parses a URL into a client config.
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, StateError> {
    let mut pg = tokio_postgres::Config::from_str(url).map_err(|e| StateError::BadUrl {
        reason: e.to_string(),
    })?;
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(Duration::from_secs(5));
    }
    Ok(pg)
}

/// Builds a pool without connecting (connections are made on first use,
/// and again after the server comes back).
pub fn pool(cfg: &DbConfig) -> Result<Pool, StateError> {
    let pg = parse_url(&cfg.url)?;
    let manager = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let mgr = match wants_tls(&pg) {
        true => Manager::from_config(pg, tls_connector()?, manager),
        false => Manager::from_config(pg, tokio_postgres::NoTls, manager),
    };
    Pool::builder(mgr)
        .max_size(cfg.pool_size.max(1))
        .wait_timeout(Some(cfg.wait_timeout))
        .create_timeout(Some(Duration::from_secs(10)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| StateError::Pool(e.to_string()))
}

/// Builds a pool, connects once, and checks that every migration this
/// binary needs is applied: a worker calls this before it consumes anything.
pub async fn connect_checked(cfg: &DbConfig) -> Result<Pool, StateError> {
    let pg = parse_url(&cfg.url)?;
    let pool = pool(cfg)?;
    let client = pool.get().await.map_err(|e| StateError::Connect {
        target: describe(&pg),
        reason: e.to_string(),
    })?;
    db::check(&client, None).await?;
    drop(client);
    Ok(pool)
}

/// One plain connection (no pool) with its driver task spawned: for the
/// CLI and migrations.
pub async fn connect_one(url: &str) -> Result<tokio_postgres::Client, StateError> {
    let pg = parse_url(url)?;
    let failed = |e: tokio_postgres::Error| StateError::Connect {
        target: describe(&pg),
        reason: e.to_string(),
    };
    let client = match wants_tls(&pg) {
        true => {
            let (client, conn) = pg.connect(tls_connector()?).await.map_err(failed)?;
            tokio::spawn(drive(conn));
            client
        }
        false => {
            let (client, conn) = pg.connect(tokio_postgres::NoTls).await.map_err(failed)?;
            tokio::spawn(drive(conn));
            client
        }
    };
    Ok(client)
}

/// Runs a connection's driver until it ends.
async fn drive<F: std::future::Future<Output = Result<(), tokio_postgres::Error>>>(conn: F) {
    if let Err(error) = conn.await {
        tracing::debug!(%error, "PostgreSQL connection ended");
    }
}

/// How a failed query should be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The server, the connection, a lock or the deployment: try the same
    /// thing again later.
    Transient,
    /// This data can never be stored: retrying it would wait for ever.
    Data,
}

/// SQLSTATE classes that blame the data (PostgreSQL's manual, appendix A):
/// - `22` data exception (a NUL in jsonb, a number out of range, bad UTF-8);
/// - `23` integrity constraint violation;
/// - `54` program limit exceeded: a value too large for an index (`54000`,
///   "index row size exceeds btree maximum", from a chat sender of 1,500
///   CJK characters) or a statement too large for its parameters, which
///   splitting the batch also cures.
pub const DATA_CLASSES: [&str; 3] = ["22", "23", "54"];

/// Classifies an error by its SQLSTATE class: [`DATA_CLASSES`] are the
/// row's fault. Everything else is retried rather than blamed on the
/// message: no SQLSTATE (the connection), `08` connection exception, `53`
/// insufficient resources (disk full, too many connections), `57` operator
/// intervention (shutdown, restart), `40` rollback (deadlock, serialization),
/// `55` lock not available, `58`/`XX` system and internal errors, and `42`
/// or `3D` (a missing table or database after a botched deploy, which an
/// operator fixes without touching the message).
pub fn classify(e: &tokio_postgres::Error) -> Failure {
    match e.code() {
        Some(code) if DATA_CLASSES.iter().any(|class| code.code().starts_with(class)) => Failure::Data,
        _ => Failure::Transient,
    }
}

/// PostgreSQL's own message (with its SQLSTATE) rather than the driver's
/// generic "db error".
pub fn db_reason(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

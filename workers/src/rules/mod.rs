//! The rules worker: keyword/regex rules, auto-replies, escalation, routing to inference.
//!
//! - [`config`]: the TOML rules file and its validation.
//! - [`engine`]: matching and templates (pure).
//! - [`handler`]: one event in, one reply (or hand-off) out.
//! - [`reload`]: the rule set in use, replaced when its files change and validate.
//! - [`run`]: wires them to the shared consume loop and micro service.

pub mod config;
pub mod engine;
pub mod handler;
pub mod reload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferry_schema::codec::DEFAULT_MAX_PAYLOAD;
use ferry_schema::topology::{self, Role};
use tokio_util::sync::CancellationToken;

use crate::runtime::{self, service, ConsumeSettings, Stats};

/// What a rules worker replica needs.
#[derive(Debug, Clone)]
pub struct RulesConfig {
    /// The rules file.
    pub rules_path: PathBuf,
    /// Consume loop limits.
    pub consume: ConsumeSettings,
    /// Largest event payload decoded; larger ones are dead-lettered.
    pub max_payload: usize,
    /// PostgreSQL, for rules on customer tags (required when a rule has them).
    pub db: Option<crate::state::DbConfig>,
    /// A groups file completing the rules file's `[groups]` (`--groups`).
    pub groups_path: Option<PathBuf>,
    /// How often the rules and groups files are read again; a change that
    /// validates replaces the rules in use ([`reload`]). `None` or zero: read once.
    pub reload_every: Option<Duration>,
}

/// The default of [`RulesConfig::reload_every`].
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

impl RulesConfig {
    /// Defaults for a rules file.
    pub fn new(rules_path: impl Into<PathBuf>) -> Self {
        Self {
            rules_path: rules_path.into(),
            consume: ConsumeSettings::default(),
            max_payload: DEFAULT_MAX_PAYLOAD,
            db: None,
            groups_path: None,
            reload_every: Some(RELOAD_EVERY),
        }
    }
}

/// Why a rules worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The rules file is unusable.
    #[error(transparent)]
    Rules(#[from] config::RulesError),
    /// The consume loop failed.
    #[error(transparent)]
    Consume(#[from] runtime::ConsumeError),
    /// The micro service could not be registered.
    #[error("cannot register the micro service: {0}")]
    Service(async_nats::Error),
    /// A rule matches on customer tags but no database was given.
    #[error("rules file {0}: a rule uses `customer_tags`, which needs PostgreSQL: pass --database-url or set DATABASE_URL")]
    NeedsDatabase(String),
    /// The database is unusable.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
}

/// Runs one rules worker replica on `client` until `shutdown` is cancelled.
/// Returns the replica's counters.
pub async fn run(
    client: async_nats::Client,
    cfg: &RulesConfig,
    shutdown: CancellationToken,
) -> Result<Arc<Stats>, RunError> {
    let reload_every = cfg.reload_every.filter(|d| !d.is_zero());
    let seen = reload_every.map(|_| reload::Seen::read(&cfg.rules_path, cfg.groups_path.as_deref()));
    let rules = Arc::new(config::load_with_groups(&cfg.rules_path, cfg.groups_path.as_deref())?);
    let customers = match (&cfg.db, rules.needs_customers()) {
        (Some(db), true) => Some(crate::state::connect_checked(db).await?),
        (None, true) => return Err(RunError::NeedsDatabase(cfg.rules_path.display().to_string())),
        (_, false) => None,
    };
    tracing::info!(rules = rules.len(), path = %cfg.rules_path.display(), "rules loaded");
    let js = runtime::jetstream_for(client.clone(), &cfg.consume);
    let stats = Arc::new(Stats::for_role(Role::Rules.as_str()));
    let svc = service::register(
        &client,
        Role::Rules.as_str(),
        "Ferry rules worker: keyword/regex rules, auto-replies, routing",
        serde_json::json!({ "rules": rules.len(), "rules_file": cfg.rules_path.display().to_string() }),
        stats.clone(),
    )
    .await
    .map_err(RunError::Service)?;
    let has_database = customers.is_some();
    let mut handler = handler::RulesHandler::new(js.clone(), rules.clone(), cfg.max_payload);
    if let Some(pool) = customers {
        handler = handler.with_customers(pool);
    }
    let handler = Arc::new(handler);
    let reloader = reload_every.zip(seen).map(|(every, seen)| {
        let (rules_path, groups_path) = (&cfg.rules_path, cfg.groups_path.as_deref());
        let r = reload::Reloader::new(rules_path, groups_path, has_database, handler.live_rules(), seen);
        tokio::spawn(r.watch(every, shutdown.clone()))
    });
    let result = runtime::consume(
        &js,
        &topology::rules_consumer(),
        handler,
        &cfg.consume,
        stats.clone(),
        shutdown,
    )
    .await;
    if let Some(r) = reloader {
        r.abort();
    }
    runtime::finish(svc, &client).await;
    result?;
    Ok(stats)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;

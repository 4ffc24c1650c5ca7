//! The rules worker: keyword/regex rules, auto-replies, escalation, routing to inference.
//!
//! # Layout
//!
//! - [`config`]: [`RulesConfig`] and the TOML rules file with its validation.
//! - [`engine`]: matching and templates (pure).
//! - [`handler`]: one event in, one reply (or hand-off) out.
//! - [`reload`]: the rule set in use, replaced when its files change and validate.
//!
//! [`Rules`] declares the role to [`runtime::serve`]; [`run`] serves it.

pub mod config;
pub mod engine;
pub mod handler;
pub mod reload;

use std::sync::Arc;

use ferry_schema::topology;
use tokio_util::sync::CancellationToken;

use crate::runtime::{self, ConsumeSettings, Ctx, Description, Stats, Wiring};

pub use config::{RulesConfig, RELOAD_EVERY};

/// Why a rules worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The rules file is unusable.
    #[error(transparent)]
    Rules(#[from] config::RulesError),
    /// A rule matches on customer tags but no database was given.
    #[error("rules file {0}: a rule uses `customer_tags`, which needs PostgreSQL: pass --database-url or set DATABASE_URL")]
    NeedsDatabase(String),
    /// The database is unusable.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
}

/// Why a rules worker stopped with an error.
pub type RunError = runtime::RunError<StartError>;

/// The rules role, loaded: its rule set, the customers' database if a rule
/// needs it, and what the reloader compares against.
#[derive(Debug)]
pub struct Rules {
    rules: Arc<engine::RuleSet>,
    customers: Option<deadpool_postgres::Pool>,
    seen: Option<reload::Seen>,
}

impl runtime::Role for Rules {
    const ROLE: topology::Role = topology::Role::Rules;
    type Config = RulesConfig;
    type StartError = StartError;

    async fn prepare(cfg: &RulesConfig) -> Result<Self, StartError> {
        let seen = reload_every(cfg).map(|_| reload::Seen::read(&cfg.rules_path, cfg.groups_path.as_deref()));
        let rules = Arc::new(config::load_with_groups(&cfg.rules_path, cfg.groups_path.as_deref())?);
        let customers = match (&cfg.db, rules.needs_customers()) {
            (Some(db), true) => Some(crate::state::connect_checked(db).await?),
            (None, true) => return Err(StartError::NeedsDatabase(cfg.rules_path.display().to_string())),
            (_, false) => None,
        };
        tracing::info!(rules = rules.len(), path = %cfg.rules_path.display(), "rules loaded");
        Ok(Self { rules, customers, seen })
    }

    fn consume_settings(&self, cfg: &RulesConfig) -> ConsumeSettings {
        cfg.consume.clone()
    }

    fn describe(&self, cfg: &RulesConfig) -> Description {
        Description {
            text: "Ferry rules worker: keyword/regex rules, auto-replies, routing".into(),
            info: serde_json::json!({ "rules": self.rules.len(), "rules_file": cfg.rules_path.display().to_string() }),
        }
    }

    fn wire(self, cfg: &RulesConfig, ctx: &Ctx) -> Wiring {
        let has_database = self.customers.is_some();
        let mut handler = handler::RulesHandler::new(ctx.js.clone(), self.rules, cfg.max_payload);
        if let Some(pool) = self.customers {
            handler = handler.with_customers(pool);
        }
        let handler = Arc::new(handler);
        let mut wiring = Wiring::default();
        if let (Some(every), Some(seen)) = (reload_every(cfg), self.seen) {
            let (rules_path, groups_path) = (&cfg.rules_path, cfg.groups_path.as_deref());
            let r = reload::Reloader::new(rules_path, groups_path, has_database, handler.live_rules(), seen);
            wiring = wiring.beside(tokio::spawn(r.watch(every, ctx.loops.clone())));
        }
        wiring.consume(ctx.consume(topology::rules_consumer(), handler))
    }
}

fn reload_every(cfg: &RulesConfig) -> Option<std::time::Duration> {
    cfg.reload_every.filter(|d| !d.is_zero())
}

/// Runs one rules worker replica on `client` until `shutdown` is cancelled.
/// Returns the replica's counters.
pub async fn run(client: async_nats::Client, cfg: &RulesConfig, shutdown: CancellationToken) -> Result<Arc<Stats>, RunError> {
    runtime::serve::<Rules>(client, cfg, shutdown).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;

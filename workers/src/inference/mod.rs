//! The inference worker: chat replies and next-activity predictions on mistral.rs.
//!
//! # Layout
//!
//! - [`config`]: [`InferenceConfig`] and its TOML file: models, routes with
//!   sampling, templates, apology.
//! - [`prompt`]: events to prompts (pure).
//! - [`engine`]: the models on mistral.rs; a failed load marks the alias broken.
//! - [`weights`]: a GGUF re-quantized once into the format candle runs fastest.
//! - [`fallback`]: primary, backup, knowledge-base template, apology.
//! - [`handler`]: chat hand-offs and prediction requests in, replies out.
//!
//! [`Inference`] declares the role to [`runtime::serve`]; [`run`] serves it.

pub mod config;
pub mod engine;
pub mod fallback;
pub mod handler;
pub mod prompt;
pub mod weights;

use std::sync::Arc;

use ferry_schema::topology;
use tokio_util::sync::CancellationToken;

use crate::runtime::{self, ConsumeSettings, Ctx, Description, Stats, Wiring};

pub use config::InferenceConfig;

/// Why an inference worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config is unusable.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The database is unusable.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
}

/// Why an inference worker stopped with an error.
pub type RunError = runtime::RunError<StartError>;

/// The inference role, loaded: its settings, models and database.
#[derive(Debug)]
pub struct Inference {
    settings: Arc<config::InferenceSettings>,
    engine: Arc<engine::Engine>,
    db: Option<deadpool_postgres::Pool>,
}

impl runtime::Role for Inference {
    const ROLE: topology::Role = topology::Role::Inference;
    type Config = InferenceConfig;
    type StartError = StartError;

    async fn prepare(cfg: &InferenceConfig) -> Result<Self, StartError> {
        let settings = Arc::new(config::load_with_groups(&cfg.config_path, cfg.groups_path.as_deref())?);
        let db = match &cfg.db {
            Some(db) => Some(crate::state::connect_checked(db).await?),
            None => None,
        };
        let engine = Arc::new(engine::Engine::load(&settings.models, settings.concurrency).await);
        let loaded = engine.loaded();
        if loaded.is_empty() {
            let why = engine
                .status()
                .into_iter()
                .filter_map(|(a, s)| s.err().map(|e| format!("{a}: {e}")))
                .collect::<Vec<_>>()
                .join("; ");
            tracing::warn!(%why, "no model loaded; every chat is answered by a template or the apology");
        }
        tracing::info!(
            models = ?loaded,
            routes = settings.routes.len(),
            concurrency = settings.concurrency,
            grounding = if db.is_some() { "conversation context and knowledge base from PostgreSQL" } else { "none: no --database-url, prompts hold the message only" },
            "inference ready"
        );
        Ok(Self { settings, engine, db })
    }

    fn consume_settings(&self, cfg: &InferenceConfig) -> ConsumeSettings {
        ConsumeSettings {
            max_in_flight: self.settings.concurrency,
            progress_every: Some(cfg.progress_every),
            shutdown_grace: cfg.shutdown_grace,
            ..ConsumeSettings::default()
        }
    }

    fn describe(&self, _cfg: &InferenceConfig) -> Description {
        Description {
            text: format!("Ferry inference worker on mistral.rs; models: {}", self.engine.loaded().join(", ")),
            info: serde_json::json!({
                "models": self.engine.status().into_iter().map(|(alias, s)| serde_json::json!({
                    "alias": alias,
                    "loaded": s.is_ok(),
                    "error": s.err(),
                })).collect::<Vec<_>>(),
                "concurrency": self.settings.concurrency,
                "engine_threads": engine::threads(),
                "routes": self.settings.routes.iter().map(|r| r.name.clone()).collect::<Vec<_>>(),
            }),
        }
    }

    fn wire(self, cfg: &InferenceConfig, ctx: &Ctx) -> Wiring {
        let shared = handler::Shared {
            publisher: ctx.js.clone().into(),
            engine: self.engine,
            settings: self.settings,
            stats: ctx.stats.clone(),
            max_payload: cfg.max_payload,
            db: self.db,
        };
        Wiring::default()
            .consume(ctx.consume(topology::inference_chat_consumer(), Arc::new(handler::ChatHandler(shared.clone()))))
            .consume(ctx.consume(topology::inference_predict_consumer(), Arc::new(handler::PredictHandler(shared))))
    }
}

/// Runs one inference replica until `shutdown`; returns its counters.
pub async fn run(client: async_nats::Client, cfg: &InferenceConfig, shutdown: CancellationToken) -> Result<Arc<Stats>, RunError> {
    runtime::serve::<Inference>(client, cfg, shutdown).await
}

//! The inference worker: chat replies and next-activity predictions on mistral.rs.
//!
//! - [`config`]: models, routes with sampling, templates, apology (TOML).
//! - [`prompt`]: events to prompts (pure).
//! - [`engine`]: the models on mistral.rs; a failed load marks the alias broken.
//! - [`fallback`]: primary, backup, knowledge-base template, apology.
//! - [`handler`]: chat hand-offs and prediction requests in, replies out.
//! - [`run`]: both consume loops, the micro service, shutdown.

pub mod config;
pub mod engine;
pub mod fallback;
pub mod handler;
pub mod prompt;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferry_schema::codec::DEFAULT_MAX_PAYLOAD;
use ferry_schema::topology::{self, Role};
use tokio_util::sync::CancellationToken;

use crate::runtime::{self, service, ConsumeSettings, Stats};

/// What an inference worker replica needs.
#[derive(Debug, Clone)]
pub struct InferenceConfig {
    /// The inference config file.
    pub config_path: PathBuf,
    /// Largest event payload decoded.
    pub max_payload: usize,
    /// In-progress ack interval while generating (capped at a third of the
    /// consumer's ack_wait).
    pub progress_every: Duration,
    /// How long shutdown waits for generations in flight.
    pub shutdown_grace: Duration,
    /// PostgreSQL for conversation context and the knowledge base; without
    /// it prompts hold the message only.
    pub db: Option<crate::state::DbConfig>,
    /// A groups file completing the config's `[groups]` (`--groups`).
    pub groups_path: Option<PathBuf>,
}

impl InferenceConfig {
    /// Defaults for a config file.
    pub fn new(config_path: impl Into<PathBuf>) -> Self {
        Self {
            config_path: config_path.into(),
            max_payload: DEFAULT_MAX_PAYLOAD,
            progress_every: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(120),
            db: None,
            groups_path: None,
        }
    }
}

/// Why an inference worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The config is unusable.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// A consume loop failed.
    #[error(transparent)]
    Consume(#[from] runtime::ConsumeError),
    /// The micro service could not be registered.
    #[error("cannot register the micro service: {0}")]
    Service(async_nats::Error),
    /// The database is unusable.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
}

/// Runs one inference replica until `shutdown`; returns its counters.
pub async fn run(
    client: async_nats::Client,
    cfg: &InferenceConfig,
    shutdown: CancellationToken,
) -> Result<Arc<Stats>, RunError> {
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
    let consume = ConsumeSettings {
        max_in_flight: settings.concurrency,
        progress_every: Some(cfg.progress_every),
        shutdown_grace: cfg.shutdown_grace,
        ..ConsumeSettings::default()
    };
    let js = runtime::jetstream_for(client.clone(), &consume);
    let stats = Arc::new(Stats::for_role(Role::Inference.as_str()));
    let svc = service::register(
        &client,
        Role::Inference.as_str(),
        &format!("Ferry inference worker on mistral.rs; models: {}", loaded.join(", ")),
        serde_json::json!({
            "models": engine.status().into_iter().map(|(alias, s)| serde_json::json!({
                "alias": alias,
                "loaded": s.is_ok(),
                "error": s.err(),
            })).collect::<Vec<_>>(),
            "concurrency": settings.concurrency,
            "routes": settings.routes.iter().map(|r| r.name.clone()).collect::<Vec<_>>(),
        }),
        stats.clone(),
    )
    .await
    .map_err(RunError::Service)?;
    let shared = handler::Shared {
        publisher: js.clone().into(),
        engine,
        settings,
        stats: stats.clone(),
        max_payload: cfg.max_payload,
        db,
    };
    let loops = shutdown.child_token();
    let chat_def = topology::inference_chat_consumer();
    let predict_def = topology::inference_predict_consumer();
    let chat = runtime::consume(
        &js,
        &chat_def,
        Arc::new(handler::ChatHandler(shared.clone())),
        &consume,
        stats.clone(),
        loops.clone(),
    );
    let predict = runtime::consume(
        &js,
        &predict_def,
        Arc::new(handler::PredictHandler(shared)),
        &consume,
        stats.clone(),
        loops.clone(),
    );
    let result = runtime::both(&loops, chat, predict).await;
    runtime::finish(svc, &client).await;
    result?;
    Ok(stats)
}

//! The archiver: every event and reply into PostgreSQL, in batches, idempotent, acked after commit.
//!
//! - [`batch`]: the batch writer (one transaction per batch, back-off while
//!   PostgreSQL is away, row-by-row on bad data).
//! - [`rows`]: the SQL: events, agents, activities, chats with customers and
//!   conversations; replies, predictions, alerts.
//! - [`handler`]: decode, submit, return the commit's outcome.
//! - [`run`]: the pool and schema check, both consume loops, the service,
//!   and the keeper ([`ferry_schema::quota::trim_processed`]), which frees
//!   from `EVENTS` what every consumer has processed, so a per-agent cap
//!   counts unprocessed events.

pub mod batch;
pub mod handler;
pub mod rows;

use std::sync::Arc;
use std::time::Duration;

use ferry_schema::codec::DEFAULT_MAX_PAYLOAD;
use ferry_schema::topology::{self, Role};
use tokio_util::sync::CancellationToken;

use crate::runtime::{self, service, ConsumeSettings, Stats};
use crate::state::{self, conversations, DbConfig};

/// What an archiver replica needs.
#[derive(Debug, Clone)]
pub struct ArchiverConfig {
    /// The database.
    pub db: DbConfig,
    /// Consume loop limits (per consumer); `max_in_flight` bounds the rows
    /// waiting for a commit.
    pub consume: ConsumeSettings,
    /// Batch writer limits (per consumer).
    pub batch: batch::BatchSettings,
    /// Idle time after which a chat opens a new conversation.
    pub conversation_idle: Duration,
    /// Largest payload decoded; larger ones are dead-lettered.
    pub max_payload: usize,
    /// How often the keeper looks at `EVENTS`; `None`: no keeper.
    pub keeper_every: Option<Duration>,
}

/// How often the keeper looks at `EVENTS` by default: one stream and three
/// consumer infos a second, and in a second an agent can add at most its
/// cap per kind before the next trim.
pub const KEEPER_EVERY: Duration = Duration::from_secs(1);

impl ArchiverConfig {
    /// Defaults for `database_url`.
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            db: DbConfig::new(database_url),
            consume: ConsumeSettings {
                // Four full batches (2000 rows each): three being written
                // while the fourth fills. Fewer stall the pull while batches
                // commit (`ferry bench archiver`: 4096 beat 2048 by about 11% with
                // batches of 1000; 8192 with batches of 2000 beat that by
                // about 8%).
                max_in_flight: 8192,
                // Held messages (PostgreSQL away) stay ours: progress well
                // inside the consumer's 60 s ack_wait.
                progress_every: Some(Duration::from_secs(15)),
                ..ConsumeSettings::default()
            },
            batch: batch::BatchSettings::default(),
            conversation_idle: conversations::DEFAULT_IDLE,
            max_payload: DEFAULT_MAX_PAYLOAD,
            keeper_every: Some(KEEPER_EVERY),
        }
    }
}

/// Why an archiver stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The database is unusable (bad URL, unreachable at start, old schema).
    #[error(transparent)]
    State(#[from] state::StateError),
    /// A consume loop failed.
    #[error(transparent)]
    Consume(#[from] runtime::ConsumeError),
    /// The micro service could not be registered.
    #[error("cannot register the micro service: {0}")]
    Service(async_nats::Error),
}

/// Runs one archiver replica until `shutdown` is cancelled.
pub async fn run(
    client: async_nats::Client,
    cfg: &ArchiverConfig,
    shutdown: CancellationToken,
) -> Result<Arc<Stats>, RunError> {
    let pool = state::connect_checked(&cfg.db).await?;
    tracing::info!(database = %state::parse_url(&cfg.db.url).map(|c| state::describe(&c)).unwrap_or_default(),
        pool = cfg.db.pool_size, batch = cfg.batch.max_rows, "archiver ready");
    let js = runtime::jetstream_for(client.clone(), &cfg.consume);
    let stats = Arc::new(Stats::for_role(Role::Archiver.as_str()));
    let svc = service::register(
        &client,
        Role::Archiver.as_str(),
        "Ferry archiver: every event and reply into PostgreSQL",
        serde_json::json!({
            "batch_rows": cfg.batch.max_rows,
            "pool": cfg.db.pool_size,
            "schema_version": ferry_schema::db::latest_version(),
        }),
        stats.clone(),
    )
    .await
    .map_err(RunError::Service)?;
    // The writers outlive the consume loops: they finish the batches the
    // handlers still wait on during phase two of shutdown, and stop when the
    // handlers (holding the senders) are dropped.
    let (events, events_writer) = batch::Batcher::spawn(
        pool.clone(),
        Arc::new(rows::EventSink {
            conversation_idle: cfg.conversation_idle,
        }),
        cfg.batch.clone(),
        shutdown.clone(),
        "events",
    );
    let (replies, replies_writer) =
        batch::Batcher::spawn(pool, Arc::new(rows::ReplySink), cfg.batch.clone(), shutdown.clone(), "replies");
    let loops = shutdown.child_token();
    let (ev_def, rp_def) = (topology::archiver_events_consumer(), topology::archiver_replies_consumer());
    let ev = runtime::consume(
        &js,
        &ev_def,
        Arc::new(handler::EventHandler {
            batcher: events,
            max_payload: cfg.max_payload,
        }),
        &cfg.consume,
        stats.clone(),
        loops.clone(),
    );
    let rp = runtime::consume(
        &js,
        &rp_def,
        Arc::new(handler::ReplyHandler {
            batcher: replies,
            max_payload: cfg.max_payload,
        }),
        &cfg.consume,
        stats.clone(),
        loops.clone(),
    );
    let keeper = cfg.keeper_every.map(|every| tokio::spawn(keep(js.clone(), every, loops.clone())));
    let result = runtime::both(&loops, ev, rp).await;
    loops.cancel();
    if let Some(k) = keeper {
        let _ = k.await;
    }
    // The handlers (and their senders) are gone: the writers drain and stop.
    let _ = tokio::join!(events_writer, replies_writer);
    runtime::finish(svc, &client).await;
    result?;
    Ok(stats)
}

/// The keeper's loop: a pass every `every` until `stop`; a failed pass is
/// logged and tried again on the next tick.
async fn keep(js: async_nats::jetstream::Context, every: Duration, stop: CancellationToken) {
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match ferry_schema::quota::trim_processed(&js).await {
            Ok(t) => {
                if failing {
                    tracing::info!("keeper works again");
                }
                failing = false;
                tracing::debug!(purges = t.purges, messages = t.messages, "keeper pass");
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(%error, "keeper pass failed; trying again");
                }
                failing = true;
            }
        }
    }
}

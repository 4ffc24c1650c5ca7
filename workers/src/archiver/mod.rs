//! The archiver: every event and reply into PostgreSQL, in batches, idempotent, acked after commit.
//!
//! # Layout
//!
//! - [`config`]: [`ArchiverConfig`] and its defaults.
//! - [`batch`]: the batch writer (one transaction per batch, back-off while
//!   PostgreSQL is away, row-by-row on bad data).
//! - [`rows`]: the SQL: events, agents, activities, chats with customers and
//!   conversations; replies, predictions, rule alerts; the alerts role's alerts.
//! - [`handler`]: decode, submit, return the commit's outcome.
//! - [`retention`]: the day partitions, and dropping the days a table no
//!   longer keeps.
//!
//! [`Archiver`] declares the role to [`runtime::serve`]: the pool and schema
//! check, both consume loops, their batch writers, and the keeper
//! ([`ferry_schema::quota::trim_processed`]), which frees from `EVENTS` what
//! every consumer has processed, so a per-agent cap counts unprocessed events,
//! and the partition upkeep ([`retention::upkeep`]).

pub mod batch;
pub mod config;
pub mod handler;
pub mod retention;
pub mod rows;

use std::sync::Arc;
use std::time::Duration;

use ferry_schema::topology;
use tokio_util::sync::CancellationToken;

use crate::runtime::{self, ConsumeSettings, Ctx, Description, Stats, Wiring};
use crate::state;

pub use config::{ArchiverConfig, KEEPER_EVERY};

/// Why an archiver could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The database is unusable (bad URL, unreachable at start, old schema).
    #[error(transparent)]
    State(#[from] state::StateError),
    /// The coming days' partitions could not be made.
    #[error(transparent)]
    Upkeep(#[from] retention::UpkeepError),
}

/// Why an archiver stopped with an error.
pub type RunError = runtime::RunError<StartError>;

/// The archiver role, connected: its database pool.
#[derive(Debug)]
pub struct Archiver {
    pool: deadpool_postgres::Pool,
}

impl runtime::Role for Archiver {
    const ROLE: topology::Role = topology::Role::Archiver;
    type Config = ArchiverConfig;
    type StartError = StartError;

    async fn prepare(cfg: &ArchiverConfig) -> Result<Self, StartError> {
        let pool = state::connect_checked(&cfg.db).await?;
        // Today's partitions before the first row, so no row of today
        // waits in a default partition for the first upkeep pass.
        let client = state::connect_one(&cfg.db.url).await?;
        retention::make_partitions(&client, chrono::Utc::now().date_naive()).await?;
        drop(client);
        tracing::info!(database = %state::parse_url(&cfg.db.url).map(|c| state::describe(&c)).unwrap_or_default(),
            pool = cfg.db.pool_size, batch = cfg.batch.max_rows, "archiver ready");
        Ok(Self { pool })
    }

    fn consume_settings(&self, cfg: &ArchiverConfig) -> ConsumeSettings {
        cfg.consume.clone()
    }

    fn describe(&self, cfg: &ArchiverConfig) -> Description {
        Description {
            text: "Ferry archiver: every event, reply and alert into PostgreSQL".into(),
            info: serde_json::json!({
                "batch_rows": cfg.batch.max_rows,
                "pool": cfg.db.pool_size,
                "schema_version": ferry_schema::db::latest_version(),
            }),
        }
    }

    fn wire(self, cfg: &ArchiverConfig, ctx: &Ctx) -> Wiring {
        // The writers outlive the consume loops: they finish the batches the
        // handlers still wait on during phase two of shutdown, and stop when
        // the handlers (holding the senders) are dropped.
        let event_sink = Arc::new(rows::EventSink {
            conversation_idle: cfg.conversation_idle,
        });
        let (events, events_writer) =
            batch::Batcher::spawn(self.pool.clone(), event_sink, cfg.batch.clone(), ctx.shutdown.clone(), "events");
        let (replies, replies_writer) = batch::Batcher::spawn(
            self.pool.clone(),
            Arc::new(rows::ReplySink),
            cfg.batch.clone(),
            ctx.shutdown.clone(),
            "replies",
        );
        let (alerts, alerts_writer) =
            batch::Batcher::spawn(self.pool.clone(), Arc::new(rows::AlertSink), cfg.batch.clone(), ctx.shutdown.clone(), "alerts");
        let (deliveries, deliveries_writer) = batch::Batcher::spawn(
            self.pool.clone(),
            Arc::new(rows::DeliverySink),
            cfg.batch.clone(),
            ctx.shutdown.clone(),
            "alert_deliveries",
        );
        let events = handler::EventHandler {
            batcher: events,
            max_payload: cfg.max_payload,
        };
        let replies = handler::ReplyHandler {
            batcher: replies,
            max_payload: cfg.max_payload,
        };
        let mut wiring = Wiring::default()
            .consume(ctx.consume(topology::archiver_events_consumer(), Arc::new(events)))
            .consume(ctx.consume(topology::archiver_replies_consumer(), Arc::new(replies)))
            .consume(ctx.consume(
                topology::archiver_alerts_consumer(),
                Arc::new(handler::AlertHandler { batcher: alerts, deliveries }),
            ))
            .drain(events_writer)
            .drain(replies_writer)
            .drain(alerts_writer)
            .drain(deliveries_writer);
        if let Some(every) = cfg.keeper_every {
            wiring = wiring.beside(tokio::spawn(keep(ctx.js.clone(), every, ctx.loops.clone())));
        }
        wiring.beside(tokio::spawn(upkeep(
            cfg.db.url.clone(),
            cfg.retention.clone(),
            cfg.upkeep_every,
            ctx.loops.clone(),
        )))
    }
}

/// Runs one archiver replica until `shutdown` is cancelled.
pub async fn run(client: async_nats::Client, cfg: &ArchiverConfig, shutdown: CancellationToken) -> Result<Arc<Stats>, RunError> {
    runtime::serve::<Archiver>(client, cfg, shutdown).await
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

/// The partition upkeep's loop: a pass at start and every `every` until
/// `stop`; a failed pass is logged and tried again on the next tick.
async fn upkeep(url: String, keep: Option<retention::Retention>, every: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = retention::upkeep(&url, keep.as_ref()) => {
                if let Err(error) = r {
                    tracing::warn!(%error, "partition upkeep failed; trying again on the next pass");
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

//! One shape for every role: [`serve`] runs any [`Role`] from start to a two-phase stop.
//!
//! A role only says what is particular to it: what it loads at start
//! ([`Role::prepare`]), how it describes itself, its consume limits, and
//! which handlers run on which consumers with which tasks beside them
//! ([`Role::wire`]). Everything else (JetStream context, counters, the
//! micro service, running the loops so that one failing stops the others,
//! the order of shutdown) is here, once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use async_nats::jetstream;
use ferry_schema::topology::{self, ConsumerDef};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{consume, service, ConsumeError, ConsumeSettings, Handler, Stats};

/// Why a role's replica stopped with an error: the same for every role,
/// with the role's own start error inside.
#[derive(Debug, thiserror::Error)]
pub enum RunError<E: std::error::Error + 'static> {
    /// The role could not start (its config, files, database).
    #[error(transparent)]
    Start(E),
    /// A consume loop failed.
    #[error(transparent)]
    Consume(#[from] ConsumeError),
    /// The micro service could not be registered.
    #[error("cannot register the micro service: {0}")]
    Service(async_nats::Error),
}

/// How a role appears in `nats micro ls/info` and its status endpoint.
#[derive(Debug, Clone)]
pub struct Description {
    /// One line for `nats micro ls`.
    pub text: String,
    /// What the replica loaded at start (status `info`).
    pub info: serde_json::Value,
}

/// A worker role, declared: [`serve`] does the rest.
pub trait Role: Sized + Send + 'static {
    /// The role's name and consumers in `schema`.
    const ROLE: topology::Role;
    /// What an operator configures (with the library's defaults).
    type Config: Sync;
    /// Why the role could not start.
    type StartError: std::error::Error + Send + Sync + 'static;

    /// Loads what the role needs (files, database, models) before anything
    /// is registered, so a bad config fails before the replica shows up.
    fn prepare(cfg: &Self::Config) -> impl Future<Output = Result<Self, Self::StartError>> + Send;

    /// The consume limits of every loop of this replica.
    fn consume_settings(&self, cfg: &Self::Config) -> ConsumeSettings;

    /// How the replica describes itself.
    fn describe(&self, cfg: &Self::Config) -> Description;

    /// Its handlers on their consumers, and the tasks beside them.
    fn wire(self, cfg: &Self::Config, ctx: &Ctx) -> Wiring;
}

/// What [`Role::wire`] gets to build its handlers and tasks with.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The replica's JetStream context (publish acks bounded by the consume limits).
    pub js: jetstream::Context,
    /// The replica's counters.
    pub stats: Arc<Stats>,
    /// Cancelled when the consume loops stop (shutdown, or one loop
    /// failed): tasks beside the loops watch it.
    pub loops: CancellationToken,
    /// The replica's shutdown: cancelled only from outside.
    pub shutdown: CancellationToken,
    settings: ConsumeSettings,
}

type LoopFuture = Pin<Box<dyn Future<Output = Result<(), ConsumeError>> + Send>>;

impl Ctx {
    /// A consume loop of `handler` on the durable consumer `def`.
    pub fn consume<H: Handler>(&self, def: ConsumerDef, handler: Arc<H>) -> Loop {
        let (js, settings, stats, stop) = (self.js.clone(), self.settings.clone(), self.stats.clone(), self.loops.clone());
        Loop(Box::pin(async move { consume(&js, &def, handler, &settings, stats, stop).await }))
    }
}

/// One consume loop, made by [`Ctx::consume`].
pub struct Loop(LoopFuture);

impl std::fmt::Debug for Loop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Loop")
    }
}

/// A role's running parts, in the order [`serve`] stops them.
#[derive(Debug, Default)]
pub struct Wiring {
    loops: Vec<Loop>,
    beside: Vec<JoinHandle<()>>,
    drains: Vec<JoinHandle<()>>,
}

impl Wiring {
    /// Adds a consume loop.
    pub fn consume(mut self, l: Loop) -> Self {
        self.loops.push(l);
        self
    }

    /// Adds a task that runs beside the loops and stops when
    /// [`Ctx::loops`] is cancelled; awaited once the loops have stopped.
    pub fn beside(mut self, task: JoinHandle<()>) -> Self {
        self.beside.push(task);
        self
    }

    /// Adds a task that finishes the work the handlers handed it (a batch
    /// writer) and stops once the handlers are dropped; awaited last.
    pub fn drain(mut self, task: JoinHandle<()>) -> Self {
        self.drains.push(task);
        self
    }
}

/// Runs one replica of role `R` on `client` until `shutdown` is cancelled
/// or a loop fails; returns its counters.
///
/// Shutdown, in order: the loops stop taking messages and finish the ones
/// they hold (two phases, [`consume`]); the tasks beside them stop; the
/// handlers are dropped, so the drains finish and stop; the micro service
/// leaves; the client flushes.
pub async fn serve<R: Role>(
    client: async_nats::Client,
    cfg: &R::Config,
    shutdown: CancellationToken,
) -> Result<Arc<Stats>, RunError<R::StartError>> {
    let role = R::prepare(cfg).await.map_err(RunError::Start)?;
    let settings = role.consume_settings(cfg);
    let js = super::jetstream_for(client.clone(), &settings);
    let stats = Arc::new(Stats::for_role(R::ROLE.as_str()));
    let description = role.describe(cfg);
    let svc = service::register(&client, R::ROLE.as_str(), &description.text, description.info, stats.clone())
        .await
        .map_err(RunError::Service)?;
    let loops = shutdown.child_token();
    let ctx = Ctx {
        js,
        stats: stats.clone(),
        loops: loops.clone(),
        shutdown,
        settings,
    };
    let Wiring { loops: running, beside, drains } = role.wire(cfg, &ctx);
    drop(ctx);
    let result = all(&loops, running).await;
    loops.cancel();
    for task in beside {
        let _ = task.await;
    }
    for task in drains {
        let _ = task.await;
    }
    super::finish(svc, &client).await;
    result?;
    Ok(stats)
}

/// Runs the loops so that none outlives another's failure: the first error
/// cancels `loops`, which all of them watch, so the others stop in two
/// phases too. A role half dead (one loop gone, the process up and looking
/// healthy) is how work stalled unseen. The first error is returned; each
/// loop (and its handler) is dropped as soon as it ends.
async fn all(loops: &CancellationToken, running: Vec<Loop>) -> Result<(), ConsumeError> {
    let watched = running.into_iter().map(|Loop(f)| async move {
        let r = f.await;
        if r.is_err() {
            loops.cancel();
        }
        r
    });
    futures::future::join_all(watched).await.into_iter().collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_failing_loop_stops_the_others_and_its_error_is_returned() {
        let token = CancellationToken::new();
        let failing = Loop(Box::pin(async { Err(ConsumeError::ZeroConcurrency) }));
        let t = token.clone();
        let waiting = Loop(Box::pin(async move {
            t.cancelled().await;
            Ok(())
        }));
        let r = all(&token, vec![waiting, failing]).await;
        assert!(matches!(r, Err(ConsumeError::ZeroConcurrency)), "{r:?}");
        assert!(token.is_cancelled());
    }

    #[tokio::test]
    async fn loops_that_end_well_leave_the_token_alone() {
        let token = CancellationToken::new();
        let ok = || Loop(Box::pin(async { Ok(()) }));
        all(&token, vec![ok(), ok()]).await.unwrap();
        assert!(!token.is_cancelled());
    }
}

//! Batching for the archiver: many handlers submit rows, one writer commits them together and answers each.
//!
//! A handler submits its row and waits; the writer gathers up to `max_rows`
//! rows (or whatever arrived within `max_wait` of the first), writes them
//! in one transaction through a [`Sink`], and only after the commit answers
//! every handler `Done`, so the consume loop acks after the commit.
//!
//! - PostgreSQL unreachable (or any error that is not the data's fault):
//!   the writer keeps the batch and retries with back-off. The handlers keep
//!   waiting (the consume loop sends in-progress acks), their permits stay
//!   taken, so the consume loop stops pulling until the database is back.
//! - A data error ([`classify`]: the row's own fault, such as a value too
//!   long for an index): the batch is split in halves until the refused rows
//!   stand alone; each is answered `Poison` with PostgreSQL's reason and goes
//!   to dead letters, the others commit.
//! - Shutdown while retrying: the batch is answered `RetryAfter` (a nak), so
//!   another replica takes it at once.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::runtime::Outcome;
use crate::state::{classify, db_reason, Failure};

/// Writes a batch of rows in one transaction of its own.
pub trait Sink: Send + Sync + 'static {
    /// One row.
    type Row: Send + Sync + 'static;
    /// Writes `rows` and commits; an error leaves nothing written. The
    /// client is a pooled one, so statements can be prepared once per
    /// connection (`prepare_cached`).
    fn write(
        &self,
        client: &mut deadpool_postgres::ClientWrapper,
        rows: &[Self::Row],
    ) -> impl std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send;
}

/// The writer's limits; every one explicit.
#[derive(Debug, Clone)]
pub struct BatchSettings {
    /// Most rows in one transaction.
    pub max_rows: usize,
    /// How long the first row of a batch waits for company.
    pub max_wait: Duration,
    /// Rows waiting for the writer (the channel's bound).
    pub queue: usize,
    /// First retry delay after a failed write; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Transactions in flight at once: while one writer commits, another
    /// gathers the next batch (each needs a pooled connection).
    pub writers: usize,
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self {
            max_rows: 2000,
            max_wait: Duration::from_millis(20),
            queue: 4096,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            // Measured with `ferry bench archiver` on 2 cores: 3 writers of
            // 1000 rows beat 2 of 500 by ~13%, and 3 of 2000 (with 8192
            // messages in flight) beat 3 of 1000 by ~8%.
            writers: 3,
        }
    }
}

struct Item<R> {
    row: R,
    done: oneshot::Sender<Outcome>,
}

/// The handlers' side: submit a row, get its outcome after the commit.
#[derive(Debug)]
pub struct Batcher<R> {
    tx: mpsc::Sender<Item<R>>,
}

impl<R> std::fmt::Debug for Item<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Item")
    }
}

/// How long a handler's message waits before redelivery when the writer is gone.
const WRITER_GONE_RETRY: Duration = Duration::from_secs(1);

impl<R: Send + Sync + 'static> Batcher<R> {
    /// Starts the writer task. It runs until every `Batcher` clone is
    /// dropped and the queue is empty.
    pub fn spawn<S: Sink<Row = R>>(
        pool: Pool,
        sink: Arc<S>,
        settings: BatchSettings,
        shutdown: CancellationToken,
        what: &'static str,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(settings.queue.max(1));
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let writer = Arc::new(Writer {
            pool,
            sink,
            settings,
            shutdown,
            what,
        });
        let tasks: Vec<_> = (0..writer.settings.writers.max(1))
            .map(|_| tokio::spawn(writer.clone().run(rx.clone())))
            .collect();
        let all = tokio::spawn(async move {
            for t in tasks {
                let _ = t.await;
            }
        });
        (Self { tx }, all)
    }

    /// Submits `row` and waits until it is committed (`Done`), can never be
    /// stored (`Poison`), or should be redelivered (`RetryAfter`).
    pub async fn submit(&self, row: R) -> Outcome {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Item { row, done }).await.is_err() {
            return Outcome::retry(WRITER_GONE_RETRY, "archive writer stopped");
        }
        rx.await
            .unwrap_or_else(|_| Outcome::retry(WRITER_GONE_RETRY, "archive writer stopped"))
    }
}

struct Writer<S: Sink> {
    pool: Pool,
    sink: Arc<S>,
    settings: BatchSettings,
    shutdown: CancellationToken,
    what: &'static str,
}

enum WriteError {
    Transient(String),
    Data(String),
}

impl<S: Sink> Writer<S> {
    /// One writer: takes the queue, gathers a batch, lets the queue go,
    /// writes the batch; until the queue is closed and empty.
    async fn run(self: Arc<Self>, rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Item<S::Row>>>>) {
        let max = self.settings.max_rows.max(1);
        let mut rows = Vec::with_capacity(max);
        let mut dones = Vec::with_capacity(max);
        loop {
            {
                let mut rx = rx.lock().await;
                let Some(first) = rx.recv().await else { break };
                rows.push(first.row);
                dones.push(first.done);
                let deadline = Instant::now() + self.settings.max_wait;
                while rows.len() < max {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(item)) => {
                            rows.push(item.row);
                            dones.push(item.done);
                        }
                        Ok(None) | Err(_) => break,
                    }
                }
            }
            let started = Instant::now();
            let outcomes = self.flush(&rows).await;
            tracing::debug!(what = self.what, rows = rows.len(), ms = started.elapsed().as_millis() as u64, "batch written");
            for (done, outcome) in dones.drain(..).zip(outcomes) {
                // A handler that gave up (shutdown grace over) just drops its end.
                let _ = done.send(outcome);
            }
            rows.clear();
        }
    }

    async fn write_once(&self, rows: &[S::Row]) -> Result<(), WriteError> {
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| WriteError::Transient(format!("no PostgreSQL connection: {e}")))?;
        match self.sink.write(&mut client, rows).await {
            Ok(()) => Ok(()),
            Err(e) => match classify(&e) {
                Failure::Data => Err(WriteError::Data(db_reason(&e))),
                Failure::Transient => Err(WriteError::Transient(db_reason(&e))),
            },
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let d = self.settings.backoff_min.saturating_mul(2u32.saturating_pow(attempt.min(16)));
        d.min(self.settings.backoff_max)
    }

    /// Waits out a back-off; false when shutdown cut it short.
    async fn wait(&self, attempt: u32) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(self.backoff(attempt)) => !self.shutdown.is_cancelled(),
            _ = self.shutdown.cancelled() => false,
        }
    }

    /// Writes `rows`, retrying transient failures, and returns each row's
    /// outcome. A part refused for its data is split in halves, each in a
    /// transaction of its own, until the refused rows stand alone: a batch
    /// of 2000 with one bad row costs about 22 transactions, not 2000.
    async fn flush(&self, rows: &[S::Row]) -> Vec<Outcome> {
        let mut out: Vec<Option<Outcome>> = vec![None; rows.len()];
        // Ranges still to write; the first half is popped first.
        let mut todo = Vec::with_capacity(16);
        todo.push(0..rows.len());
        while let Some(range) = todo.pop() {
            let outcome = match self.write_retrying(&rows[range.clone()]).await {
                Ok(()) => Outcome::Done,
                Err(Stop::Data(reason)) if range.len() > 1 => {
                    tracing::warn!(what = self.what, rows = range.len(), %reason, "batch refused for its data; splitting it to find the rows at fault");
                    let mid = range.start + range.len() / 2;
                    todo.push(mid..range.end);
                    todo.push(range.start..mid);
                    continue;
                }
                Err(Stop::Data(reason)) => unstorable(reason),
                Err(Stop::Shutdown) => {
                    // This part and everything not yet written go back.
                    let back = Outcome::retry(WRITER_GONE_RETRY, "shutting down while PostgreSQL is unavailable");
                    for r in std::iter::once(range).chain(todo.drain(..)) {
                        out[r].fill(Some(back.clone()));
                    }
                    break;
                }
            };
            out[range].fill(Some(outcome));
        }
        out.into_iter()
            .map(|o| o.unwrap_or_else(|| Outcome::retry(WRITER_GONE_RETRY, "archive writer skipped the row")))
            .collect()
    }

    /// Writes `rows` in one transaction, retrying transient failures with
    /// back-off until it commits, the data is refused, or shutdown.
    async fn write_retrying(&self, rows: &[S::Row]) -> Result<(), Stop> {
        let mut attempt = 0;
        loop {
            match self.write_once(rows).await {
                Ok(()) => {
                    if attempt > 0 {
                        tracing::info!(what = self.what, rows = rows.len(), attempts = attempt + 1, "archive write succeeded after retries");
                    }
                    return Ok(());
                }
                Err(WriteError::Data(reason)) => return Err(Stop::Data(reason)),
                Err(WriteError::Transient(reason)) => {
                    tracing::warn!(what = self.what, rows = rows.len(), attempt, %reason, "archive write failed; holding the batch and retrying");
                    if !self.wait(attempt).await {
                        return Err(Stop::Shutdown);
                    }
                    attempt += 1;
                }
            }
        }
    }
}

/// Why [`Writer::write_retrying`] gave up on a part of a batch.
enum Stop {
    /// Refused for its data (PostgreSQL's reason).
    Data(String),
    /// Shutdown came while PostgreSQL was away.
    Shutdown,
}

fn unstorable(reason: String) -> Outcome {
    Outcome::Poison {
        code: ferry_schema::deadletter::ReasonCode::Unstorable,
        reason,
    }
}

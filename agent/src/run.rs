//! Running the agent: sources into the spool, the spool to JetStream, replies to their actions.
//!
//! Sources (JSON lines, the desktop collector, the chat adapter server, the
//! heartbeat and prediction timers) queue events on one bounded intake; the
//! spool writer makes them durable; the drainer publishes them. Replies are
//! pulled from the agent's consumer and acted on: a chat reply goes to the
//! chat adapter until it confirms the send, and only then does the spool
//! remember its reply id (so it is not handed on again), escalations,
//! predictions and alerts go to every local listener; every reply is also
//! handed to `out` (the command line prints them).
//!
//! Shutdown has two phases: the sources stop and everything they queued is
//! spooled; then the drainer gets a grace period to publish what is spooled
//! and stops. Whatever is left waits in the spool for the next start.

use std::collections::HashSet;
use std::time::Duration;

use ferry_schema::reply::{ChatAction, ReplyBody};
use ferry_schema::{EventId, EventKind, Reply};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::adapter::{AdapterServer, Clients, ToClient, SEND_CONFIRM_TIMEOUT, SEND_TRIES};
use crate::collect::{run_desktop, Collector};
use crate::health::Health;
use crate::heartbeat::{run_heartbeat, run_predictions, RecentLog};
use crate::pipeline::{write_spool, Delivered, INTAKE_QUEUE};
use crate::platform::Desktop;
use crate::replies::RepliesError;
use crate::source::{parse_line, SourceError};
use crate::spool::{Spool, SpoolError};
use crate::Agent;

/// How a run ends.
#[derive(Debug, Clone, Copy)]
pub enum Until {
    /// Run until shutdown (a real agent).
    Shutdown,
    /// Return once the input is exhausted, everything spooled is published
    /// and every chat and prediction request got a reply, or after this long
    /// without progress (demo and scripts).
    Answered {
        /// Give up waiting after this long without progress.
        idle_timeout: Duration,
    },
}

/// What a run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RunReport {
    /// Events JetStream acknowledged.
    pub published: u64,
    /// Replies handed on.
    pub replies: u64,
    /// Chat events and prediction requests still without a reply when the run ended.
    pub unanswered: usize,
    /// Events still in the spool when the run ended.
    pub spooled: u64,
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A line of the input is invalid.
    #[error("input {0}")]
    Source(#[from] SourceError),
    /// Reading the input failed.
    #[error("reading input: {0}")]
    Read(#[from] std::io::Error),
    /// The spool failed.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// Receiving replies failed.
    #[error(transparent)]
    Replies(#[from] RepliesError),
    /// The metrics endpoint could not start.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// A part that runs for the agent's whole life (the spool drainer, the
    /// reply receiver) ended before shutdown: the run stops, so that the
    /// process exits non-zero and its supervisor starts it again, instead
    /// of running on half dead.
    #[error("the {part} ended while the agent was running ({why})")]
    Ended {
        /// The part.
        part: &'static str,
        /// How it ended.
        why: String,
    },
}

/// How a task that should have run until shutdown ended.
fn ended<E: std::fmt::Display>(part: &'static str, r: Result<Result<(), E>, tokio::task::JoinError>) -> RunError {
    let why = match r {
        Ok(Ok(())) => "without an error".to_string(),
        Ok(Err(e)) => e.to_string(),
        Err(join) => join.to_string(),
    };
    RunError::Ended { part, why }
}

/// Where events come from.
#[derive(Default)]
pub struct Sources {
    /// JSON lines (a file or stdin).
    pub lines: Option<Box<dyn AsyncBufRead + Unpin + Send>>,
    /// The desktop collector.
    pub desktop: Option<(Box<dyn Desktop>, Collector)>,
    /// The chat adapter server.
    pub adapter: Option<AdapterServer>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources")
            .field("lines", &self.lines.is_some())
            .field("desktop", &self.desktop.is_some())
            .field("adapter", &self.adapter)
            .finish()
    }
}

/// The periodic events and the metrics endpoint.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Heartbeat interval (none: no heartbeats).
    pub heartbeat: Option<Duration>,
    /// Prediction request interval (none: no requests).
    pub prediction: Option<Duration>,
    /// Activities a prediction request carries.
    pub recent: usize,
    /// Serve Prometheus metrics here (none: no endpoint).
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            heartbeat: Some(Duration::from_secs(30)),
            prediction: Some(Duration::from_secs(60)),
            recent: 20,
            metrics_listen: None,
        }
    }
}

/// How long the drainer may go on publishing after the sources stopped.
pub const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Publishes every event of `input` (through `spool`) and sends every reply
/// to `out`, until `until` says stop or `shutdown` is cancelled.
pub async fn run_lines<R>(
    agent: &Agent,
    spool: Spool,
    input: R,
    until: Until,
    out: mpsc::Sender<Reply>,
    shutdown: CancellationToken,
) -> Result<RunReport, RunError>
where
    R: AsyncBufRead + Unpin + Send + 'static,
{
    let sources = Sources {
        lines: Some(Box::new(input)),
        ..Sources::default()
    };
    let periodic = Options {
        heartbeat: None,
        prediction: None,
        recent: 0,
        metrics_listen: None,
    };
    run(agent, spool, sources, periodic, until, Some(out), shutdown).await
}

/// Runs the agent on `sources` (see the module docs).
pub async fn run(
    agent: &Agent,
    spool: Spool,
    sources: Sources,
    periodic: Options,
    until: Until,
    out: Option<mpsc::Sender<Reply>>,
    shutdown: CancellationToken,
) -> Result<RunReport, RunError> {
    let id = agent.config().agent.clone();
    // What a previous run left in the spool is published before the input.
    let left_over = spool.depth().events;
    let health = Health::default();
    let recent = RecentLog::new(periodic.recent);
    let sources_stop = CancellationToken::new();
    let (intake, intake_rx) = mpsc::channel(INTAKE_QUEUE);
    let counts = agent.counts().clone();
    let _metrics = match periodic.metrics_listen {
        Some(addr) => {
            let server = crate::metrics::serve(addr, spool.clone(), health.clone(), counts.clone())?;
            tracing::info!(listen = %server.addr(), "serving metrics at /metrics");
            Some(server)
        }
        None => None,
    };

    let spooled = sources.adapter.as_ref().map(AdapterServer::spooled);
    let writer = {
        let (spool, health, recent) = (spool.clone(), health.clone(), recent.clone());
        let refs = spooled.clone();
        let refs_of = move |b: &[ferry_schema::Envelope]| refs.as_ref().map(|r| r.refs_of(b)).unwrap_or_default();
        tokio::spawn(write_spool(spool, agent.config().encoding, intake_rx, health, refs_of, move |b| {
            recent.observe(b);
            // Adapters answer `accepted` only now that the batch is durable.
            if let Some(spooled) = &spooled {
                spooled.committed(b);
            }
        }))
    };

    let mut lines_task: Option<JoinHandle<Result<u64, RunError>>> = None;
    if let Some(input) = sources.lines {
        let (intake, id, stop) = (intake.clone(), id.clone(), sources_stop.clone());
        lines_task = Some(tokio::spawn(async move {
            let mut lines = input.lines();
            let mut n = 0usize;
            let mut queued = 0u64;
            loop {
                let line = tokio::select! {
                    _ = stop.cancelled() => break,
                    l = lines.next_line() => l?,
                };
                let Some(line) = line else { break };
                n += 1;
                if let Some(env) = parse_line(&id, n, &line)? {
                    if intake.send(env).await.is_err() {
                        break;
                    }
                    queued += 1;
                }
            }
            Ok(queued)
        }));
    }
    let mut background: Vec<JoinHandle<()>> = Vec::new();
    if let Some((desktop, collector)) = sources.desktop {
        background.push(tokio::spawn(run_desktop(
            desktop,
            collector,
            id.clone(),
            spool.clone(),
            intake.clone(),
            health.clone(),
            sources_stop.clone(),
        )));
    }
    let clients: Option<Clients> = sources.adapter.as_ref().map(AdapterServer::clients);
    if let Some(server) = sources.adapter {
        background.push(tokio::spawn(server.run(id.clone(), spool.clone(), intake.clone(), health.clone(), sources_stop.clone())));
    }
    if let Some(every) = periodic.heartbeat {
        background.push(tokio::spawn(run_heartbeat(
            id.clone(),
            every,
            spool.clone(),
            health.clone(),
            intake.clone(),
            sources_stop.clone(),
        )));
    }
    if let Some(every) = periodic.prediction {
        background.push(tokio::spawn(run_predictions(
            id.clone(),
            every,
            recent.clone(),
            intake.clone(),
            sources_stop.clone(),
        )));
    }
    // Only the sources hold the intake now: the writer ends after them.
    drop(intake);

    let drain_stop = CancellationToken::new();
    let (delivered_tx, mut delivered_rx) = mpsc::channel::<Delivered>(INTAKE_QUEUE);
    let mut drainer = Some({
        let (agent, spool, health, stop) = (agent.clone(), spool.clone(), health.clone(), drain_stop.clone());
        tokio::spawn(async move { agent.drain_spool(&spool, &health, Some(delivered_tx), &stop).await })
    });

    let replies_stop = CancellationToken::new();
    let (acted_tx, mut acted_rx) = mpsc::channel::<Reply>(agent.config().reply_batch.max(1));
    let mut receiver = Some({
        let (agent, spool, stop) = (agent.clone(), spool.clone(), replies_stop.clone());
        let clients = clients.clone();
        tokio::spawn(async move {
            let handler_stop = stop.clone();
            agent
                .handle_replies(
                    move |reply| {
                        let (spool, clients, acted_tx, stop) =
                            (spool.clone(), clients.clone(), acted_tx.clone(), handler_stop.clone());
                        Box::pin(async move { act(reply, &spool, clients.as_ref(), &acted_tx, &stop).await })
                    },
                    stop,
                )
                .await
        })
    });

    let mut pending: HashSet<EventId> = HashSet::new();
    let mut answered_early: HashSet<EventId> = HashSet::new();
    let idle = match until {
        Until::Answered { idle_timeout } => idle_timeout,
        Until::Shutdown => Duration::MAX,
    };
    let answered_mode = matches!(until, Until::Answered { .. });
    let mut input_done = lines_task.is_none();
    // Events the input queued, plus those a previous run left in the spool:
    // a run until answered waits until all of them are published.
    let mut queued = 0u64;
    let result: Result<(), RunError> = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            Some(d) = delivered_rx.recv() => {
                counts.published();
                if matches!(d.kind, EventKind::Chat | EventKind::Predict) && !answered_early.remove(&d.id) {
                    pending.insert(d.id);
                }
            }
            Some(reply) = acted_rx.recv() => {
                if !pending.remove(&reply.in_reply_to) {
                    answered_early.insert(reply.in_reply_to);
                }
                counts.reply();
                if let Some(out) = &out {
                    if out.send(reply).await.is_err() {
                        break Ok(());
                    }
                }
            }
            r = async {
                match lines_task.as_mut() {
                    Some(t) => t.await,
                    None => std::future::pending().await,
                }
            }, if !input_done => {
                input_done = true;
                lines_task = None;
                match r {
                    Ok(Ok(n)) => queued = n,
                    Ok(Err(e)) => break Err(e),
                    Err(join) => break Err(RunError::Read(std::io::Error::other(join.to_string()))),
                }
            }
            r = until_done(&mut drainer) => {
                let e = ended("spool drainer", r.map(Ok::<(), SpoolError>));
                tracing::error!(error = %e, "stopping");
                break Err(e);
            }
            r = until_done(&mut receiver) => {
                let e = ended("reply receiver", r);
                tracing::error!(error = %e, "stopping");
                break Err(e);
            }
            _ = tokio::time::sleep(idle), if input_done && answered_mode => break Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(100)), if input_done && answered_mode => {}
        }
        if answered_mode && input_done && pending.is_empty() && counts.published_so_far() >= queued + left_over {
            break Ok(());
        }
    };

    // Phase 1: stop the sources; the writer spools what they queued.
    sources_stop.cancel();
    if let Some(t) = lines_task {
        t.abort();
    }
    for t in background {
        let _ = t.await;
    }
    let _ = writer.await;
    // Phase 2: a grace period to publish what is spooled.
    let deadline = tokio::time::Instant::now() + DRAIN_GRACE;
    while spool.depth().events > 0 && tokio::time::Instant::now() < deadline {
        tokio::select! {
            Some(_) = delivered_rx.recv() => counts.published(),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    drain_stop.cancel();
    replies_stop.cancel();
    while let Ok(_d) = delivered_rx.try_recv() {
        counts.published();
    }
    if let Some(t) = drainer {
        let _ = t.await;
    }
    let received = match receiver {
        Some(t) => t.await,
        None => Ok(Ok(())),
    };
    result?;
    if let Ok(Err(e)) = received {
        return Err(e.into());
    }
    let report = RunReport {
        published: counts.published_so_far(),
        replies: counts.replies_so_far(),
        unanswered: pending.len(),
        spooled: spool.depth().events,
    };
    Ok(report)
}

/// Waits for the task in `slot` to end and takes it out; pending forever
/// when there is none.
async fn until_done<T>(slot: &mut Option<JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match slot.as_mut() {
        Some(t) => {
            let r = t.await;
            *slot = None;
            r
        }
        None => std::future::pending().await,
    }
}

/// Acts on one reply; false to stop receiving.
///
/// The reply is recorded as acted on only after its effect: for a chat
/// reply, the adapter's `sent`. An agent killed in between hands it on
/// again after its restart, with the same `reply_id`, which the adapter
/// protocol tells adapters to send once.
async fn act(
    reply: Reply,
    spool: &Spool,
    clients: Option<&Clients>,
    acted: &mpsc::Sender<Reply>,
    stop: &CancellationToken,
) -> bool {
    let id = reply.id;
    match crate::spool::blocking(spool, move |s| s.has_acted(id)).await {
        Ok(true) => {
            tracing::info!(reply = %id, "reply already acted on; not again");
            return true;
        }
        Ok(false) => {}
        Err(error) => tracing::warn!(%error, reply = %id, "cannot look up the reply; acting on it"),
    }
    if let Some(clients) = clients {
        let reply_id = id.to_string();
        let event_id = reply.in_reply_to;
        match &reply.body {
            ReplyBody::Chat(c) => match c.action {
                ChatAction::Reply => {
                    if !send_chat(&reply, c, clients, stop).await {
                        return false;
                    }
                }
                ChatAction::Escalate => {
                    let line = ToClient::Escalation {
                        reply_id,
                        event_id,
                        chat: c.chat.clone(),
                        reason: c.content.clone().unwrap_or_default(),
                    };
                    clients.broadcast(line).await;
                }
                ChatAction::Ignore => {}
            },
            ReplyBody::Prediction(p) => {
                let line = ToClient::Prediction {
                    reply_id,
                    event_id,
                    prediction: p.prediction.clone(),
                    confidence: p.confidence,
                };
                clients.broadcast(line).await;
            }
            ReplyBody::Alert(a) => {
                let line = ToClient::Alert {
                    reply_id,
                    rule: a.rule.clone(),
                    message: a.message.clone(),
                };
                clients.broadcast(line).await;
            }
        }
    }
    loop {
        match crate::spool::blocking(spool, move |s| s.mark_acted(id)).await {
            Ok(_) => break,
            Err(error) => {
                tracing::error!(%error, reply = %id, "cannot record the reply as acted on; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return false,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
    tokio::select! {
        _ = stop.cancelled() => false,
        r = acted.send(reply) => r.is_ok(),
    }
}

/// Gives a chat reply to the adapter until it confirms the send. A failed
/// or unconfirmed send is tried again, backing off, [`SEND_TRIES`] times;
/// then the reply goes to every client as an escalation, for a person to
/// send. False on shutdown (the reply is then not recorded, and comes again
/// after the restart).
async fn send_chat(reply: &Reply, c: &ferry_schema::reply::ChatReply, clients: &Clients, stop: &CancellationToken) -> bool {
    let reply_id = reply.id.to_string();
    let text = c.content.clone().unwrap_or_default();
    let line = ToClient::Send {
        reply_id: reply_id.clone(),
        event_id: reply.in_reply_to,
        chat: c.chat.clone(),
        text: text.clone(),
    };
    let mut last = String::new();
    for attempt in 1..=SEND_TRIES {
        if !clients.has_sender() {
            tracing::info!(reply = %reply_id, "waiting for a chat adapter to send the reply");
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = clients.wait_for_sender() => {}
            }
        }
        let sent = tokio::select! {
            _ = stop.cancelled() => return false,
            r = clients.send_confirmed(&reply_id, line.clone(), SEND_CONFIRM_TIMEOUT) => r,
        };
        match sent {
            Ok(()) => return true,
            Err(error) => {
                tracing::warn!(%error, reply = %reply_id, chat = %c.chat, attempt, "chat reply not sent; trying again");
                last = error.to_string();
            }
        }
        if attempt < SEND_TRIES {
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = tokio::time::sleep(ferry_schema::connect::reconnect_delay(attempt as usize)) => {}
            }
        }
    }
    tracing::error!(reply = %reply_id, chat = %c.chat, tries = SEND_TRIES, error = %last, "chat reply could not be sent; escalating it to a person");
    let line = ToClient::Escalation {
        reply_id,
        event_id: reply.in_reply_to,
        chat: c.chat.clone(),
        reason: format!("the reply could not be sent after {SEND_TRIES} tries ({last}); please send it by hand: {text}"),
    };
    clients.broadcast(line).await;
    true
}

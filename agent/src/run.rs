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
use ferry_schema::{AgentId, EventId, EventKind, Reply};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::adapter::{AdapterServer, Clients, Spooled, ToClient, SEND_CONFIRM_TIMEOUT, SEND_TRIES};
use crate::collect::{run_desktop, Collector};
use crate::health::Health;
use crate::heartbeat::{run_heartbeat, run_predictions, RecentLog};
use crate::metrics::Counts;
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
    // What a previous run left in the spool is published before the input.
    let left_over = spool.depth().events;
    let health = Health::default();
    let counts = agent.counts().clone();
    let _metrics = match periodic.metrics_listen {
        Some(addr) => {
            let server = crate::metrics::serve(addr, spool.clone(), health.clone(), counts.clone())?;
            tracing::info!(listen = %server.addr(), "serving metrics at /metrics");
            Some(server)
        }
        None => None,
    };
    let mut tasks = Tasks::start(agent, &spool, sources, &periodic, &health);
    let mut progress = Progress {
        input_done: tasks.lines.is_none(),
        ..Progress::default()
    };
    let result = progress
        .watch(&mut tasks, &counts, until, left_over, out.as_ref(), &shutdown)
        .await;
    let received = tasks.stop(&spool, &counts).await;
    result?;
    if let Ok(Err(e)) = received {
        return Err(e.into());
    }
    let report = RunReport {
        published: counts.published_so_far(),
        replies: counts.replies_so_far(),
        unanswered: progress.pending.len(),
        spooled: spool.depth().events,
    };
    Ok(report)
}

/// The tasks of one run, and the tokens and channels that tie them together.
struct Tasks {
    /// Stops the sources (phase 1 of shutdown).
    sources_stop: CancellationToken,
    /// The spool writer; ends after the sources, when the intake closes.
    writer: JoinHandle<()>,
    /// The JSON lines source, until its input is exhausted; the events it queued.
    lines: Option<JoinHandle<Result<u64, RunError>>>,
    /// The other sources (desktop, adapter server, heartbeats, predictions).
    background: Vec<JoinHandle<()>>,
    /// Stops the drainer (phase 2 of shutdown).
    drain_stop: CancellationToken,
    /// The spool drainer, until it ends.
    drainer: Option<JoinHandle<()>>,
    /// The events the drainer had acknowledged.
    delivered: mpsc::Receiver<Delivered>,
    /// Stops the reply receiver.
    replies_stop: CancellationToken,
    /// The reply receiver, until it ends.
    receiver: Option<JoinHandle<Result<(), RepliesError>>>,
    /// The replies acted on.
    acted: mpsc::Receiver<Reply>,
}

impl Tasks {
    /// Starts the spool writer, the sources, the drainer and the reply
    /// receiver, in that order.
    fn start(agent: &Agent, spool: &Spool, sources: Sources, periodic: &Options, health: &Health) -> Self {
        let id = agent.config().agent.clone();
        let recent = RecentLog::new(periodic.recent);
        let sources_stop = CancellationToken::new();
        let (intake, intake_rx) = mpsc::channel(INTAKE_QUEUE);
        let writer = spawn_writer(agent, spool, health, &recent, intake_rx, sources.adapter.as_ref().map(AdapterServer::spooled));

        let lines = sources.lines.map(|input| spawn_lines(input, intake.clone(), id.clone(), sources_stop.clone()));
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
            background.push(tokio::spawn(run_predictions(id, every, recent, intake.clone(), sources_stop.clone())));
        }
        // Only the sources hold the intake now: the writer ends after them.
        drop(intake);

        let drain_stop = CancellationToken::new();
        let (delivered_tx, delivered) = mpsc::channel::<Delivered>(INTAKE_QUEUE);
        let drainer = {
            let (agent, spool, health, stop) = (agent.clone(), spool.clone(), health.clone(), drain_stop.clone());
            tokio::spawn(async move { agent.drain_spool(&spool, &health, Some(delivered_tx), &stop).await })
        };
        let replies_stop = CancellationToken::new();
        let (acted_tx, acted) = mpsc::channel::<Reply>(agent.config().reply_batch.max(1));
        let receiver = spawn_receiver(agent, spool, clients, acted_tx, replies_stop.clone());
        Self {
            sources_stop,
            writer,
            lines,
            background,
            drain_stop,
            drainer: Some(drainer),
            delivered,
            replies_stop,
            receiver: Some(receiver),
            acted,
        }
    }

    /// Stops in two phases (see the module docs); returns how the reply
    /// receiver ended.
    async fn stop(mut self, spool: &Spool, counts: &Counts) -> Result<Result<(), RepliesError>, tokio::task::JoinError> {
        // Phase 1: stop the sources; the writer spools what they queued.
        self.sources_stop.cancel();
        if let Some(t) = self.lines {
            t.abort();
        }
        for t in self.background {
            let _ = t.await;
        }
        let _ = self.writer.await;
        // Phase 2: a grace period to publish what is spooled.
        let deadline = tokio::time::Instant::now() + DRAIN_GRACE;
        while spool.depth().events > 0 && tokio::time::Instant::now() < deadline {
            tokio::select! {
                Some(_) = self.delivered.recv() => counts.published(),
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        self.drain_stop.cancel();
        self.replies_stop.cancel();
        while let Ok(_d) = self.delivered.try_recv() {
            counts.published();
        }
        if let Some(t) = self.drainer {
            let _ = t.await;
        }
        match self.receiver {
            Some(t) => t.await,
            None => Ok(Ok(())),
        }
    }
}

/// Starts the spool writer on `intake`. With an adapter server, the writer
/// stores each batch's message references and reports its commits to
/// `spooled`.
fn spawn_writer(
    agent: &Agent,
    spool: &Spool,
    health: &Health,
    recent: &RecentLog,
    intake: mpsc::Receiver<ferry_schema::Envelope>,
    spooled: Option<Spooled>,
) -> JoinHandle<()> {
    let (spool, health, recent) = (spool.clone(), health.clone(), recent.clone());
    let refs = spooled.clone();
    let refs_of = move |b: &[ferry_schema::Envelope]| refs.as_ref().map(|r| r.refs_of(b)).unwrap_or_default();
    tokio::spawn(write_spool(spool, agent.config().encoding, intake, health, refs_of, move |b| {
        recent.observe(b);
        // Adapters answer `accepted` only now that the batch is durable.
        if let Some(spooled) = &spooled {
            spooled.committed(b);
        }
    }))
}

/// Queues the events of `input`'s lines on `intake` until the input ends
/// or `stop`; returns how many it queued.
fn spawn_lines(
    input: Box<dyn AsyncBufRead + Unpin + Send>,
    intake: mpsc::Sender<ferry_schema::Envelope>,
    id: AgentId,
    stop: CancellationToken,
) -> JoinHandle<Result<u64, RunError>> {
    tokio::spawn(async move {
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
    })
}

/// Receives the agent's replies and acts on each (see [`act`]), handing
/// those acted on to `acted`, until `stop`.
fn spawn_receiver(
    agent: &Agent,
    spool: &Spool,
    clients: Option<Clients>,
    acted: mpsc::Sender<Reply>,
    stop: CancellationToken,
) -> JoinHandle<Result<(), RepliesError>> {
    let (agent, spool) = (agent.clone(), spool.clone());
    tokio::spawn(async move {
        let handler_stop = stop.clone();
        agent
            .handle_replies(
                move |reply| {
                    let (spool, clients, acted, stop) = (spool.clone(), clients.clone(), acted.clone(), handler_stop.clone());
                    Box::pin(async move { act(reply, &spool, clients.as_ref(), &acted, &stop).await })
                },
                stop,
            )
            .await
    })
}

/// What the run watches while the agent runs: which requests still wait
/// for their reply, and whether the input is done.
#[derive(Debug, Default)]
struct Progress {
    /// Chat events and prediction requests published and not answered yet.
    pending: HashSet<EventId>,
    /// Replies acted on before their event's publish was counted.
    answered_early: HashSet<EventId>,
    /// The JSON lines input is exhausted (or there is none).
    input_done: bool,
    /// Events the input queued, known once it is done.
    queued: u64,
}

impl Progress {
    /// Counts publishes and replies, and hands replies to `out`, until
    /// `shutdown`, until `until` is met, or until a part that should run
    /// for the agent's whole life ends. `left_over` events were in the
    /// spool at the start: a run until answered waits for them too.
    async fn watch(
        &mut self,
        tasks: &mut Tasks,
        counts: &Counts,
        until: Until,
        left_over: u64,
        out: Option<&mpsc::Sender<Reply>>,
        shutdown: &CancellationToken,
    ) -> Result<(), RunError> {
        let idle = match until {
            Until::Answered { idle_timeout } => idle_timeout,
            Until::Shutdown => Duration::MAX,
        };
        let answered_mode = matches!(until, Until::Answered { .. });
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                Some(d) = tasks.delivered.recv() => {
                    counts.published();
                    if matches!(d.kind, EventKind::Chat | EventKind::Predict) && !self.answered_early.remove(&d.id) {
                        self.pending.insert(d.id);
                    }
                }
                Some(reply) = tasks.acted.recv() => {
                    if !self.pending.remove(&reply.in_reply_to) {
                        self.answered_early.insert(reply.in_reply_to);
                    }
                    counts.reply();
                    if let Some(out) = out {
                        if out.send(reply).await.is_err() {
                            return Ok(());
                        }
                    }
                }
                r = until_done(&mut tasks.lines), if !self.input_done => {
                    self.input_done = true;
                    match r {
                        Ok(Ok(n)) => self.queued = n,
                        Ok(Err(e)) => return Err(e),
                        Err(join) => return Err(RunError::Read(std::io::Error::other(join.to_string()))),
                    }
                }
                r = until_done(&mut tasks.drainer) => {
                    let e = ended("spool drainer", r.map(Ok::<(), SpoolError>));
                    tracing::error!(error = %e, "stopping");
                    return Err(e);
                }
                r = until_done(&mut tasks.receiver) => {
                    let e = ended("reply receiver", r);
                    tracing::error!(error = %e, "stopping");
                    return Err(e);
                }
                _ = tokio::time::sleep(idle), if self.input_done && answered_mode => return Ok(()),
                _ = tokio::time::sleep(Duration::from_millis(100)), if self.input_done && answered_mode => {}
            }
            if answered_mode
                && self.input_done
                && self.pending.is_empty()
                && counts.published_so_far() >= self.queued + left_over
            {
                return Ok(());
            }
        }
    }
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
        if !hand_on(&reply, clients, stop).await {
            return false;
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

/// Hands `reply` to the local clients: a chat reply to the adapter (see
/// [`send_chat`]), anything else to every client. False on shutdown.
async fn hand_on(reply: &Reply, clients: &Clients, stop: &CancellationToken) -> bool {
    let reply_id = reply.id.to_string();
    let event_id = reply.in_reply_to;
    match &reply.body {
        ReplyBody::Chat(c) => match c.action {
            ChatAction::Reply => {
                if !send_chat(reply, c, clients, stop).await {
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
    true
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

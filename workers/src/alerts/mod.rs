//! The alerts role: rules over interactions and heartbeats raise alerts on `ALERTS`; the replicas share the webhook deliveries.
//!
//! # Layout
//!
//! - [`config`]: the alerts file (rules, webhooks, the seed's fields).
//! - [`eval`]: the [`eval::Evaluator`], pure: windows, runs, firing state.
//! - [`lag`]: the [`lag::LagJudge`], pure: consumer-lag rules over polled
//!   consumer info, their state read from `ALERTS`.
//! - [`handler`]: the handler that POSTs each alert to the webhooks.
//!
//! # Why every replica evaluates everything
//!
//! A window per scope needs every interaction of that scope, so the
//! evaluation cannot be split over a shared consumer. Each replica reads
//! all interactions and heartbeats itself, through ordered consumers of
//! `EVENTS` (and every reply on `REPLIES`, Ferry's own interactions; a rule
//! counts one of the two, so its state follows one stream's order), and so
//! computes the same transitions with the same
//! `Nats-Msg-Id` ([`ferry_schema::alert::Alert::dedup_key`]); `ALERTS`
//! keeps the first copy and drops the others (its duplicate window). A
//! replica that starts (or takes over from a killed one) reads each rule's
//! last alert from `ALERTS`, then rebuilds its windows from the stream,
//! twice the longest window back, publishing nothing judged on a window it
//! has not seen whole. Consumer lag is polled, not read from a stream: each
//! replica follows `ALERTS` and names a lag transition by the rule and
//! scope's alert before it, so the copies again share a `Nats-Msg-Id`. The
//! window state lives nowhere but in the streams, so there is no second
//! copy to keep right. Replicas add availability, not
//! speed. Deliveries are split: `ALERTS/alerts-notify` is shared, so each
//! alert reaches the webhooks from one replica (again if a call failed:
//! receivers de-duplicate on the alert's `id`).

pub mod config;
pub mod eval;
pub mod handler;
pub mod lag;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::push::OrderedConfig, consumer::DeliverPolicy};
use chrono::{DateTime, Utc};
use ferry_schema::alert::Alert;
use ferry_schema::topology::{self, ALERTS_STREAM, DEADLETTER_STREAM, EVENTS_STREAM, REPLIES_STREAM};
use ferry_schema::{codec, headers, subject, EventBody, EventKind};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::runtime::{self, ConsumeSettings, Ctx, Description, Stats, Wiring};
use config::Source;

pub use config::{AlertsFile, ConfigError};

/// How an alerts replica runs.
#[derive(Debug, Clone)]
pub struct AlertsConfig {
    /// The alerts file (TOML, see [`config`]).
    pub file: PathBuf,
    /// A groups file completing the alerts file's `[groups]` (`--groups`),
    /// read again with it.
    pub groups: Option<PathBuf>,
    /// The notify loop's limits.
    pub consume: ConsumeSettings,
    /// How often the file is read for changes (`None`: never).
    pub reload_every: Option<Duration>,
    /// How often time-based rules (offline agents, emptied windows) are
    /// judged.
    pub tick_every: Duration,
    /// How often consumer-lag rules read their consumers' info.
    pub lag_every: Duration,
    /// Largest event payload decoded.
    pub max_payload: usize,
}

impl AlertsConfig {
    /// The defaults, with `file`.
    pub fn new(file: impl Into<PathBuf>) -> Self {
        Self {
            file: file.into(),
            groups: None,
            consume: ConsumeSettings {
                max_in_flight: 16,
                ..ConsumeSettings::default()
            },
            reload_every: Some(Duration::from_secs(2)),
            tick_every: Duration::from_secs(1),
            lag_every: DEFAULT_LAG_EVERY,
            max_payload: codec::DEFAULT_MAX_PAYLOAD,
        }
    }
}

/// How often consumer-lag rules read their consumers' info unless set:
/// one consumer-info request per watched consumer per replica each time.
pub const DEFAULT_LAG_EVERY: Duration = Duration::from_secs(5);

/// Why an alerts replica could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The alerts file is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The HTTP client could not be built.
    #[error("cannot build the webhook client: {0}")]
    Http(String),
}

/// Why an alerts replica stopped with an error.
pub type RunError = runtime::RunError<StartError>;

/// The alerts file in use, replaced whole on a valid change.
#[derive(Debug)]
pub struct LiveFile(RwLock<Arc<AlertsFile>>);

impl LiveFile {
    /// Starts with `file`.
    pub fn new(file: AlertsFile) -> Self {
        Self(RwLock::new(Arc::new(file)))
    }

    /// The file in use now.
    pub fn current(&self) -> Arc<AlertsFile> {
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn replace(&self, f: AlertsFile) {
        match self.0.write() {
            Ok(mut g) => *g = Arc::new(f),
            Err(p) => *p.into_inner() = Arc::new(f),
        }
    }
}

/// The alerts role, prepared: its file and webhook client.
#[derive(Debug)]
pub struct Alerts {
    live: Arc<LiveFile>,
    http: reqwest::Client,
}

impl runtime::Role for Alerts {
    const ROLE: topology::Role = topology::Role::Alerts;
    type Config = AlertsConfig;
    type StartError = StartError;

    async fn prepare(cfg: &AlertsConfig) -> Result<Self, StartError> {
        let file = config::load(&cfg.file, cfg.groups.as_deref())?;
        tracing::info!(rules = file.rules.len(), webhooks = file.webhooks.len(), enabled = file.enabled, "alerts ready");
        let http = reqwest::Client::builder()
            .user_agent(concat!("ferry-alerts/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| StartError::Http(e.to_string()))?;
        Ok(Self {
            live: Arc::new(LiveFile::new(file)),
            http,
        })
    }

    fn consume_settings(&self, cfg: &AlertsConfig) -> ConsumeSettings {
        cfg.consume.clone()
    }

    fn describe(&self, cfg: &AlertsConfig) -> Description {
        let f = self.live.current();
        Description {
            text: "Ferry alerts: rules over interactions and heartbeats, webhooks".into(),
            info: serde_json::json!({
                "file": cfg.file.display().to_string(),
                "enabled": f.enabled,
                "rules": f.rules.iter().map(|r| r.name.clone()).collect::<Vec<_>>(),
                "webhooks": f.webhooks.len(),
            }),
        }
    }

    fn wire(self, cfg: &AlertsConfig, ctx: &Ctx) -> Wiring {
        let notify = handler::NotifyHandler {
            live: self.live.clone(),
            http: self.http,
            js: ctx.js.clone(),
        };
        let task = Evaluation {
            js: ctx.js.clone(),
            live: self.live,
            cfg: cfg.clone(),
            stop: ctx.loops.clone(),
        };
        Wiring::default()
            .consume(ctx.consume(topology::alerts_notify_consumer(), Arc::new(notify)))
            .beside(tokio::spawn(task.run()))
    }
}

/// Runs one alerts replica until `shutdown` is cancelled.
pub async fn run(client: async_nats::Client, cfg: &AlertsConfig, shutdown: CancellationToken) -> Result<Arc<Stats>, RunError> {
    runtime::serve::<Alerts>(client, cfg, shutdown).await
}

/// Why one evaluation run ended before its stop.
#[derive(Debug, thiserror::Error)]
enum EvalError {
    #[error("{0}")]
    Broker(String),
}

fn broker(what: &'static str) -> impl Fn(String) -> EvalError {
    move |e| EvalError::Broker(format!("{what}: {e}"))
}

struct Evaluation {
    js: jetstream::Context,
    live: Arc<LiveFile>,
    cfg: AlertsConfig,
    stop: CancellationToken,
}

/// What a reader reads.
#[derive(Debug, Clone, Copy)]
enum Input {
    /// Assistants' interaction events.
    Interaction,
    /// Agents' heartbeats.
    Heartbeat,
    /// Ferry's replies, each an interaction of Ferry's own.
    Reply,
    /// Dead letters, of every stream.
    DeadLetter,
}

/// A reader of one stream, and whether it has reached the end it had at start.
struct Reader {
    messages: jetstream::consumer::push::Ordered,
    caught_up: bool,
}

impl Evaluation {
    /// Evaluates until stopped; a run broken by the broker starts over
    /// (restoring and rebuilding again) after a back-off.
    async fn run(self) {
        let mut backoff = Duration::from_secs(1);
        loop {
            match self.once().await {
                Ok(()) => return,
                Err(error) => tracing::warn!(%error, retry_in = ?backoff, "alert evaluation interrupted; starting over"),
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    async fn once(&self) -> Result<(), EvalError> {
        let file = self.live.current();
        let mut seen_bytes = self.files_bytes();
        let mut ev = eval::Evaluator::new(if file.enabled { file.rules.clone() } else { Vec::new() });
        let mut lag = lag::LagJudge::new(if file.enabled { &file.rules } else { &[] });
        ev.set_groups(file.groups.clone());
        let restored = self.restore(&mut ev).await?;
        let started = Utc::now();
        let horizon = chrono::Duration::from_std(file.horizon() * 2).unwrap_or_default();
        let replay_from = started - horizon;
        ev.seen_from(replay_from);
        let events = |kind| subject::events_of_kind(kind).to_string();
        let from = || Self::since(replay_from);
        let mut interactions = self.reader(EVENTS_STREAM, events(EventKind::Interaction), from()?).await?;
        let mut heartbeats = self.reader(EVENTS_STREAM, events(EventKind::Heartbeat), from()?).await?;
        let mut replies = self.reader(REPLIES_STREAM, subject::all_replies().to_string(), from()?).await?;
        let mut dead = self.reader(DEADLETTER_STREAM, subject::all_dead_letters().to_string(), from()?).await?;
        // Each rule and scope's last alert, then every new one: the state
        // of the consumer-lag rules.
        let mut stored = self.reader(ALERTS_STREAM, subject::all_alerts().to_string(), DeliverPolicy::LastPerSubject).await?;
        let mut lag_tick = tokio::time::interval(self.cfg.lag_every);
        lag_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!(restored, firing = ev.firing().len(), from = %replay_from, "alert evaluation started");
        let mut tick = tokio::time::interval(self.cfg.tick_every);
        let mut reload = tokio::time::interval(self.cfg.reload_every.unwrap_or(Duration::from_secs(3600)));
        loop {
            let out = tokio::select! {
                _ = self.stop.cancelled() => return Ok(()),
                m = interactions.messages.next() => self.step(&mut ev, m, &mut interactions, Input::Interaction)?,
                m = heartbeats.messages.next() => self.step(&mut ev, m, &mut heartbeats, Input::Heartbeat)?,
                m = replies.messages.next() => self.step(&mut ev, m, &mut replies, Input::Reply)?,
                m = dead.messages.next() => self.step(&mut ev, m, &mut dead, Input::DeadLetter)?,
                m = stored.messages.next() => {
                    Self::follow(&mut lag, m, &mut stored)?;
                    Vec::new()
                }
                _ = lag_tick.tick(), if stored.caught_up && !lag.is_empty() => self.lags(&lag).await,
                _ = tick.tick() => {
                    let caught_up = interactions.caught_up && heartbeats.caught_up && replies.caught_up && dead.caught_up;
                    if caught_up { ev.tick(Utc::now()) } else { Vec::new() }
                }
                _ = reload.tick(), if self.cfg.reload_every.is_some() => {
                    if let Some(f) = self.reload(&mut seen_bytes) {
                        ev.set_rules(if f.enabled { f.rules.clone() } else { Vec::new() });
                        lag.set_rules(if f.enabled { &f.rules } else { &[] });
                        ev.set_groups(f.groups.clone());
                    }
                    Vec::new()
                }
            };
            for a in out {
                if let Some(seq) = self.publish(&a).await? {
                    lag.stored(seq, &a);
                }
            }
        }
    }

    /// The bytes of the alerts file and the groups file, to notice a change.
    fn files_bytes(&self) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        let groups = self.cfg.groups.as_ref().and_then(|g| std::fs::read(g).ok());
        (std::fs::read(&self.cfg.file).ok(), groups)
    }

    /// Re-reads the files when their bytes changed; the new file when valid.
    fn reload(&self, seen: &mut (Option<Vec<u8>>, Option<Vec<u8>>)) -> Option<Arc<AlertsFile>> {
        let now = self.files_bytes();
        if now == *seen {
            return None;
        }
        *seen = now;
        match config::load(&self.cfg.file, self.cfg.groups.as_deref()) {
            Ok(f) => {
                tracing::info!(rules = f.rules.len(), webhooks = f.webhooks.len(), enabled = f.enabled, "alerts file reloaded");
                self.live.replace(f);
                Some(self.live.current())
            }
            Err(error) => {
                tracing::warn!(%error, "alerts file changed but is not valid; the rules in use stay");
                None
            }
        }
    }

    /// Each rule's last alert per scope, from `ALERTS`.
    async fn restore(&self, ev: &mut eval::Evaluator) -> Result<usize, EvalError> {
        let last = ferry_schema::alert::read_last(&self.js).await.map_err(|e| EvalError::Broker(e.to_string()))?;
        for a in &last {
            ev.restore(a);
        }
        Ok(last.len())
    }

    /// Where a reader starting at `from` starts.
    fn since(from: DateTime<Utc>) -> Result<DeliverPolicy, EvalError> {
        let start_time = time::OffsetDateTime::from_unix_timestamp(from.timestamp()).map_err(|e| EvalError::Broker(e.to_string()))?;
        Ok(DeliverPolicy::ByStartTime { start_time })
    }

    /// An ordered reader of `stream`'s messages on `filter`, from where
    /// `deliver_policy` says.
    async fn reader(&self, stream: &'static str, filter: String, deliver_policy: DeliverPolicy) -> Result<Reader, EvalError> {
        let stream = self.js.get_stream_no_info(stream).await.map_err(|e| broker(stream)(e.to_string()))?;
        let consumer = stream
            .create_consumer(OrderedConfig {
                deliver_subject: self.js.client().new_inbox(),
                filter_subject: filter,
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| broker("creating a reader")(e.to_string()))?;
        let caught_up = consumer.cached_info().num_pending == 0;
        let messages = consumer.messages().await.map_err(|e| broker("reading")(e.to_string()))?;
        Ok(Reader { messages, caught_up })
    }

    /// One message from a reader into the evaluator.
    fn step(
        &self,
        ev: &mut eval::Evaluator,
        m: Option<Result<jetstream::Message, jetstream::consumer::push::OrderedError>>,
        reader: &mut Reader,
        input: Input,
    ) -> Result<Vec<Alert>, EvalError> {
        let m = match m {
            None => return Err(EvalError::Broker(format!("the {input:?} reader ended"))),
            Some(Err(e)) => return Err(broker("reading")(e.to_string())),
            Some(Ok(m)) => m,
        };
        let Ok(info) = m.info() else { return Ok(Vec::new()) };
        let (seq, pending) = (info.stream_sequence, info.pending);
        let ts = DateTime::from_timestamp(info.published.unix_timestamp(), info.published.nanosecond()).unwrap_or_default();
        if pending == 0 {
            reader.caught_up = true;
        }
        // What does not decode is dead-lettered by the roles that own it.
        Ok(match input {
            Input::Reply => match runtime::decode::reply(&m, self.cfg.max_payload) {
                Ok(r) => ev.interaction(Source::Ferry, seq, ts, &r.agent, &r.as_interaction()),
                Err(_) => Vec::new(),
            },
            Input::Heartbeat => match subject::parse_event(m.subject.as_str()) {
                Ok((agent, _)) => {
                    let depth = match runtime::decode::event(&m, self.cfg.max_payload).map(|e| e.env.body) {
                        Ok(EventBody::Heartbeat(h)) => Some(h.spool_depth),
                        _ => None,
                    };
                    ev.heartbeat(seq, ts, &agent, depth)
                }
                Err(_) => Vec::new(),
            },
            Input::DeadLetter => {
                // The original's subject names its agent when it was an event.
                let original = m.headers.as_ref().and_then(|h| h.get(headers::DEAD_SUBJECT)).map(|v| v.as_str().to_string());
                let agent = original.and_then(|s| subject::parse_event(&s).ok()).map(|(a, _)| a);
                ev.dead_letter(seq, ts, agent.as_ref())
            }
            Input::Interaction => match runtime::decode::event(&m, self.cfg.max_payload) {
                Ok(e) => match &e.env.body {
                    EventBody::Interaction(i) => ev.interaction(Source::Assistant, seq, ts, &e.env.agent, i),
                    _ => Vec::new(),
                },
                Err(_) => Vec::new(),
            },
        })
    }

    /// One alert read back from `ALERTS` into the consumer-lag state.
    fn follow(
        lag: &mut lag::LagJudge,
        m: Option<Result<jetstream::Message, jetstream::consumer::push::OrderedError>>,
        reader: &mut Reader,
    ) -> Result<(), EvalError> {
        let m = match m {
            None => return Err(EvalError::Broker("the ALERTS reader ended".into())),
            Some(Err(e)) => return Err(broker("reading ALERTS")(e.to_string())),
            Some(Ok(m)) => m,
        };
        let Ok(info) = m.info() else { return Ok(()) };
        if info.pending == 0 {
            reader.caught_up = true;
        }
        match Alert::from_json(&m.payload) {
            Ok(a) => lag.stored(info.stream_sequence, &a),
            Err(error) => tracing::warn!(%error, subject = %m.subject, "not an alert in ALERTS; skipped"),
        }
        Ok(())
    }

    /// Reads the info of every consumer a consumer-lag rule watches; the
    /// transitions the lags call for. A consumer whose info cannot be read
    /// (deleted, the broker busy) is judged at the next poll.
    async fn lags(&self, lag: &lag::LagJudge) -> Vec<Alert> {
        let defs = topology::worker_consumers();
        let mut out = Vec::new();
        for name in lag.consumers() {
            let Some(def) = defs.iter().find(|d| d.name() == name) else { continue };
            let info = match self.js.get_stream_no_info(def.stream).await {
                Ok(stream) => stream.consumer_info(&name).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match info {
                Ok(info) => {
                    let unfinished = info.num_pending.saturating_add(info.num_ack_pending as u64);
                    out.extend(lag.observe(Utc::now(), &name, unfinished));
                }
                Err(error) => tracing::warn!(%error, consumer = %name, "cannot read the consumer's lag; judged at the next poll"),
            }
        }
        out
    }

    /// Publishes `a` with its dedup id, retrying until JetStream stores it
    /// (or the replica stops: another replica, or this one restarted,
    /// raises it from the stream). The sequence it is stored at (that of
    /// the copy kept, for a duplicate); `None` when stopped first.
    async fn publish(&self, a: &Alert) -> Result<Option<u64>, EvalError> {
        let mut backoff = Duration::from_millis(200);
        loop {
            let mut h = async_nats::HeaderMap::new();
            h.insert(headers::MSG_ID, a.dedup_key().as_str());
            h.insert(headers::CONTENT_TYPE, headers::CONTENT_TYPE_JSON);
            let sent = match self.js.publish_with_headers(a.subject(), h, a.to_json().into()).await {
                Ok(ack) => ack.await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match sent {
                Ok(ack) => {
                    tracing::info!(alert = %a.id, rule = %a.rule, scope = %a.scope, state = a.state.as_str(),
                        duplicate = ack.duplicate, seq = ack.sequence, value = a.value, "alert");
                    return Ok(Some(ack.sequence));
                }
                Err(error) => tracing::warn!(%error, alert = %a.id, "alert not stored yet; retrying"),
            }
            tokio::select! {
                _ = self.stop.cancelled() => return Ok(None),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
}

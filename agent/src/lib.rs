//! Ferry's agent: turns local events into JetStream messages and replies into actions.
//!
//! # Layout
//!
//! - [`run`]: the whole agent: sources into the spool, the spool to
//!   JetStream, replies to actions, two-phase shutdown. Start here.
//! - [`collect`]: the desktop collector (foreground window, idle), merged
//!   into activity spans, with privacy rules and browser-title rules.
//! - [`adapter`]: the chat adapter protocol (JSON lines on loopback TCP).
//! - [`spool`]: the encrypted, crash-safe outbox (redb, AES-256-GCM).
//! - [`pipeline`]: the spool writer (group commit) and the drainer (in-order
//!   publish, removal after the ack).
//! - [`heartbeat`]: heartbeats and prediction requests.
//! - [`replies`]: receives the agent's replies live (the `REPLIES`
//!   stream republishes them) and catches up on missed ones from its own
//!   durable consumer.
//! - [`platform`]: everything Win32 (and its Unix stand-ins).
//! - [`config`]: the TOML config file; [`metrics`]: the Prometheus endpoint;
//!   [`health`]: component states for both.
//! - [`source`]: events from JSON lines (a file or stdin), the portable
//!   source used on Linux, in tests and in the demo.
//! - [`probe`]: `ferry-agent probe`, which prints what [`platform`] sees.
//! - [`Agent`]: the connection, with the agent's own credentials and inbox.

pub mod adapter;
pub mod collect;
pub mod config;
pub mod health;
pub mod heartbeat;
pub mod metrics;
pub mod pipeline;
pub mod platform;
pub mod probe;
pub mod replies;
pub mod run;
pub mod source;
pub mod spool;

use async_nats::jetstream;
use ferry_schema::connect::{ConnectError, NatsConfig};
use ferry_schema::{subject, topology, AgentId, Encoding};

/// Settings of one agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The agent's id; also its NATS user name in the demo config.
    pub agent: AgentId,
    /// Connection settings (the inbox prefix is set from `agent`).
    pub nats: NatsConfig,
    /// Encoding of published events (replies come back in the same one).
    pub encoding: Encoding,
    /// Most publishes awaiting a JetStream ack at once.
    pub publish_window: usize,
    /// Most replies fetched per request when catching up.
    pub reply_batch: usize,
    /// Catch up through the reply consumer at least this often, even when
    /// nothing says a reply was missed.
    pub catch_up_every: std::time::Duration,
}

impl AgentConfig {
    /// Defaults for `agent` connecting with `nats`.
    pub fn new(agent: AgentId, nats: NatsConfig) -> Self {
        Self {
            agent,
            nats,
            encoding: Encoding::MsgPack,
            publish_window: 256,
            reply_batch: 64,
            catch_up_every: std::time::Duration::from_secs(30),
        }
    }
}

/// A connected agent.
#[derive(Debug, Clone)]
pub struct Agent {
    cfg: AgentConfig,
    client: async_nats::Client,
    js: jetstream::Context,
    counts: metrics::Counts,
}

impl Agent {
    /// Connects with the agent's credentials, confined to its own inbox prefix.
    pub async fn connect(mut cfg: AgentConfig) -> Result<Self, ConnectError> {
        cfg.nats.inbox_prefix = Some(subject::agent_inbox_prefix(&cfg.agent));
        let client = cfg.nats.connect().await?;
        let js = jetstream::ContextBuilder::new()
            .api_prefix(subject::AGENT_JS_API_PREFIX)
            .max_ack_inflight(cfg.publish_window.max(1))
            .backpressure_on_inflight(true)
            .build(client.clone());
        Ok(Self {
            cfg,
            client,
            js,
            counts: metrics::Counts::default(),
        })
    }

    /// The agent's settings.
    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    /// What this agent counted: events published, replies acted on and
    /// replies refused; shared by its clones.
    pub fn counts(&self) -> &metrics::Counts {
        &self.counts
    }

    /// The underlying client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The JetStream context used for publishing and pulling replies.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Proves what the agent needs from the broker: its reply consumer can
    /// be read, and an event on its own subject (a heartbeat) is stored.
    pub async fn check_access(&self) -> Result<(), String> {
        let name = topology::agent_replies_consumer_name(&self.cfg.agent);
        self.js
            .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(&name, topology::REPLIES_STREAM)
            .await
            .map_err(|e| format!("reply consumer {name}: {e} (run `ferry agent add` or `ferry provision`)"))?;
        let hb = heartbeat::heartbeat(
            &self.cfg.agent,
            &mut heartbeat::CpuMeter::new(),
            spool::Depth::default(),
            &health::Health::default(),
        );
        let payload = ferry_schema::codec::encode_event(&hb, self.cfg.encoding).map_err(|e| e.to_string())?;
        let subject = subject::event(&self.cfg.agent, hb.kind());
        let hdrs = ferry_schema::headers::for_publish(hb.id.text(), self.cfg.encoding, None);
        self.js
            .publish_with_headers(subject.clone(), hdrs, payload.into())
            .await
            .map_err(|e| format!("publish on {subject}: {e}"))?
            .await
            .map_err(|e| format!("publish on {subject}: {e}"))?;
        self.check_live_replies().await
    }

    /// Proves the broker lets this agent subscribe to its live replies. A
    /// refused subscription is only reported asynchronously, so this listens
    /// on a connection of its own for a moment after a round trip.
    async fn check_live_replies(&self) -> Result<(), String> {
        let live = subject::live_reply(&self.cfg.agent);
        let (tx, mut errors) = tokio::sync::mpsc::channel(4);
        let probe = self
            .cfg
            .nats
            .connect_reporting(move |e| {
                let _ = tx.try_send(e);
            })
            .await
            .map_err(|e| format!("second connection for the live-reply check: {e}"))?;
        let _sub = probe
            .subscribe(live.clone())
            .await
            .map_err(|e| format!("subscribe to {live}: {e}"))?;
        probe.flush().await.map_err(|e| format!("subscribe to {live}: {e}"))?;
        match tokio::time::timeout(std::time::Duration::from_millis(500), errors.recv()).await {
            Ok(Some(e)) if e.contains(live.as_str()) => Err(format!(
                "may not subscribe to {live}, where replies arrive live ({e}); they still come, late, through the catch-up every {} s: add {live} to this agent's subscribe permissions in nats.conf (`ferry agent add` writes it)",
                self.cfg.catch_up_every.as_secs()
            )),
            _ => Ok(()),
        }
    }
}

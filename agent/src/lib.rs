//! Ferry's agent: turns local events into JetStream messages and replies into actions.
//!
//! This is the agent's portable core; the Windows collectors, the chat
//! adapter and the encrypted spool build on it.
//!
//! # Layout
//!
//! - [`source`]: events from JSON lines (a file or stdin), the portable
//!   source used on Linux, in tests and in the demo.
//! - [`publish`]: publishes events with their id as `Nats-Msg-Id`, a bounded
//!   window of unacknowledged publishes, and retry until JetStream acks.
//! - [`replies`]: pulls the agent's replies from its own durable consumer
//!   (so replies published while it was offline arrive when it is back),
//!   drops redelivered ones by reply id, and hands them on.
//! - [`platform`]: what the agent needs from the operating system (the
//!   foreground window, idle time, key protection, autostart); Win32 on
//!   Windows, the only place with `unsafe`.
//! - [`probe`]: `ferry-agent probe`, which prints what [`platform`] sees.
//! - [`Agent`]: the connection, with the agent's own credentials and inbox.

pub mod platform;
pub mod probe;
pub mod publish;
pub mod replies;
pub mod run;
pub mod source;

use async_nats::jetstream;
use ferry_schema::connect::{ConnectError, NatsConfig};
use ferry_schema::{subject, AgentId, Encoding};

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
    /// Most replies pulled per request.
    pub reply_batch: usize,
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
        }
    }
}

/// A connected agent.
#[derive(Debug, Clone)]
pub struct Agent {
    cfg: AgentConfig,
    client: async_nats::Client,
    js: jetstream::Context,
}

impl Agent {
    /// Connects with the agent's credentials, confined to its own inbox prefix.
    pub async fn connect(mut cfg: AgentConfig) -> Result<Self, ConnectError> {
        cfg.nats.inbox_prefix = Some(subject::agent_inbox_prefix(&cfg.agent));
        let client = cfg.nats.connect().await?;
        let js = jetstream::ContextBuilder::new()
            .max_ack_inflight(cfg.publish_window.max(1))
            .backpressure_on_inflight(true)
            .build(client.clone());
        Ok(Self { cfg, client, js })
    }

    /// The agent's settings.
    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    /// The underlying client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The JetStream context used for publishing and pulling replies.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }
}

//! Shared fixtures of the workers' integration tests: a real broker, provisioned, plus replicas.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // shared by several test files


use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use ferry_schema::codec::encode_event;
use ferry_schema::event::{ChatMessage, ChatType, MessageType};
use ferry_schema::topology::{self, StreamSettings};
use ferry_schema::{headers, subject, AgentId, Encoding, Envelope, EventBody};
use ferry_stack::NatsServer;
use ferry_workers::rules::{self, RulesConfig};
use ferry_workers::runtime::Stats;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const RULES: &str = r#"
[[rule]]
name = "refund"
keywords = ["refund"]
action = "escalate"
template = "refund for {sender}"

[[rule]]
name = "echo"
action = "reply"
template = "echo: {text}"
"#;

pub struct Stack {
    pub nats: NatsServer,
    pub op: async_nats::Client,
    pub js: jetstream::Context,
    pub rules_file: tempfile::NamedTempFile,
    pub _dir: tempfile::TempDir,
}

/// A broker with Ferry's nats.conf, streams and consumers provisioned; the
/// rules consumer gets `ack_wait` so redelivery tests finish quickly.
pub async fn stack(rules: &str, ack_wait: Duration) -> Stack {
    let nats = NatsServer::start_temp().expect("nats-server starts");
    let op = nats.operator("test-operator").connect().await.expect("operator connects");
    let js = jetstream::new(op.clone());
    let agents = [AgentId::new("desk-1").unwrap(), AgentId::new("desk-2").unwrap()];
    topology::provision(&js, &StreamSettings::default(), &agents)
        .await
        .expect("provision");
    let mut def = topology::rules_consumer();
    def.config.ack_wait = ack_wait;
    topology::ensure_consumer(&js, &def).await.expect("consumer");
    let mut rules_file = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut rules_file, rules.as_bytes()).unwrap();
    Stack {
        nats,
        op,
        js,
        rules_file,
        _dir: tempfile::tempdir().unwrap(),
    }
}

pub struct Replica {
    pub stop: CancellationToken,
    pub task: JoinHandle<Result<Arc<Stats>, rules::RunError>>,
}

impl Stack {
    /// Starts one rules worker replica with its own connection as `workers`.
    pub async fn replica(&self, max_in_flight: usize) -> Replica {
        let client = self.nats.role(ferry_schema::topology::Role::Rules, "test-rules").connect().await.expect("workers connect");
        let mut cfg = RulesConfig::new(self.rules_file.path());
        cfg.consume.max_in_flight = max_in_flight;
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move { rules::run(client, &cfg, token).await });
        Replica { stop, task }
    }
}

pub fn chat(agent: &str, text: &str) -> Envelope {
    Envelope::new(
        AgentId::new(agent).unwrap(),
        EventBody::Chat(ChatMessage {
            chat: "Alice".into(),
            chat_type: ChatType::Direct,
            sender: "Alice".into(),
            text: text.into(),
            msg_type: MessageType::Text,
        }),
    )
}

/// Publishes `env` the way a plain client (`nats pub`) would, with its id as
/// `Nats-Msg-Id` when `msg_id` is set, and waits for the stream's ack.
pub async fn publish(
    js: &jetstream::Context,
    env: &Envelope,
    enc: Encoding,
    msg_id: bool,
) -> jetstream::publish::PublishAck {
    let mut h = async_nats::HeaderMap::new();
    if enc == Encoding::Json {
        h.insert(headers::CONTENT_TYPE, "application/json");
    }
    if msg_id {
        h.insert(headers::MSG_ID, env.id.to_string().as_str());
    }
    let payload = encode_event(env, enc).unwrap();
    js.publish_with_headers(subject::event(&env.agent, env.kind()), h, payload.into())
        .await
        .unwrap()
        .await
        .unwrap()
}

/// Publishes `json` on `subject` as `nats pub SUBJECT 'JSON'` does (core
/// NATS, no headers, no id, no time), waits until `EVENTS` stored it, and
/// returns the id the workers derive for it from its place there.
pub async fn publish_by_hand(op: &async_nats::Client, js: &jetstream::Context, subject: &str, json: &str) -> ferry_schema::EventId {
    op.publish(subject.to_string(), json.to_string().into()).await.unwrap();
    op.flush().await.unwrap();
    let stream = js.get_stream(topology::EVENTS_STREAM).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(m) = stream.get_last_raw_message_by_subject(subject).await {
            if m.payload.as_ref() == json.as_bytes() {
                let stored = chrono::DateTime::from_timestamp(m.time.unix_timestamp(), m.time.nanosecond()).unwrap();
                return ferry_schema::codec::StreamPosition { seq: m.sequence, stored }.event_id();
            }
        }
        assert!(std::time::Instant::now() < deadline, "{subject}: {json} not stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A throwaway PostgreSQL with Ferry's migrations applied.
pub async fn migrated_pg() -> ferry_stack::PgServer {
    let pg = tokio::task::spawn_blocking(ferry_stack::PgServer::start_temp)
        .await
        .unwrap()
        .expect("PostgreSQL starts");
    let mut c = ferry_workers::state::connect_one(&pg.url()).await.unwrap();
    ferry_schema::db::migrate(&mut c, None).await.unwrap();
    pg
}

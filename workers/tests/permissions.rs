//! Least privilege at a real broker: each worker role and each agent may do only its own part, and is refused the rest.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::time::Duration;

use async_nats::jetstream;
use ferry_schema::connect::NatsConfig;
use ferry_schema::topology::{self, Role, StreamSettings, DEADLETTER_STREAM, EVENTS_STREAM, REPLIES_STREAM};
use ferry_schema::{subject, AgentId};
use ferry_stack::NatsServer;
use tokio::sync::mpsc;

/// A connection that reports each error the server sends it.
struct Probe {
    client: async_nats::Client,
    errors: mpsc::UnboundedReceiver<String>,
}

impl Probe {
    async fn connect(cfg: &NatsConfig) -> Self {
        let (tx, errors) = mpsc::unbounded_channel();
        let client = cfg
            .connect_reporting(move |e| {
                let _ = tx.send(e);
            })
            .await
            .unwrap();
        Self { client, errors }
    }

    /// The server's next complaint; it must be a permission violation
    /// naming `what` (a subject).
    async fn refused(&mut self, what: &str) {
        self.client.flush().await.unwrap();
        let e = tokio::time::timeout(Duration::from_secs(10), self.errors.recv())
            .await
            .unwrap_or_else(|_| panic!("the broker allowed {what}"))
            .unwrap();
        assert!(e.contains("Permissions Violation") && e.contains(what), "{what}: {e}");
    }

    async fn publish_refused(&mut self, subject: &str) {
        self.client.publish(subject.to_string(), "{}".into()).await.unwrap();
        self.refused(subject).await;
    }

    async fn subscribe_refused(&mut self, subject: &str) -> async_nats::Subscriber {
        let sub = self.client.subscribe(subject.to_string()).await.unwrap();
        self.refused(subject).await;
        sub
    }

    /// Nothing refused so far (a round trip after the last action).
    async fn nothing_refused(&mut self) {
        self.client.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(self.errors.try_recv().is_err(), "an allowed action was refused");
    }
}

async fn broker() -> (NatsServer, jetstream::Context) {
    let nats = NatsServer::start_temp().unwrap();
    let js = jetstream::new(nats.operator("test").connect().await.unwrap());
    let agents = [AgentId::new("desk-1").unwrap(), AgentId::new("desk-2").unwrap()];
    topology::provision(&js, &StreamSettings::default(), &agents).await.unwrap();
    (nats, js)
}

/// Each role reads its own consumers, and is refused a pull, an ack and a
/// subscription that are not its own: an agent's reply consumer, another
/// role's consumer, the events themselves, other inboxes, stream changes.
#[tokio::test]
async fn each_role_is_refused_what_is_not_its_own() {
    let (nats, _js) = broker().await;
    for role in Role::ALL {
        let mut p = Probe::connect(&nats.role(role, "permissions test")).await;
        let own = jetstream::new(p.client.clone());
        for def in role.consumers() {
            own.get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(def.name(), def.stream)
                .await
                .unwrap_or_else(|e| panic!("{}: its own consumer {}: {e}", role.as_str(), def.name()));
        }
        p.nothing_refused().await;

        let other = Role::ALL.into_iter().find(|r| *r != role).unwrap().consumers().remove(0);
        // Pulls.
        p.publish_refused(&format!("$JS.API.CONSUMER.MSG.NEXT.{REPLIES_STREAM}.agent-desk-1")).await;
        p.publish_refused(&format!("$JS.API.CONSUMER.MSG.NEXT.{}.{}", other.stream, other.name())).await;
        // Acks.
        p.publish_refused(&format!("$JS.ACK.{REPLIES_STREAM}.agent-desk-1.1.1.1.1.0")).await;
        p.publish_refused(&format!("$JS.ACK.{}.{}.1.1.1.1.0", other.stream, other.name())).await;
        // Subscriptions.
        p.subscribe_refused("_INBOX.>").await;
        p.subscribe_refused("_INBOX.desk-1.x").await;
        p.subscribe_refused(subject::all_events().as_str()).await;
        p.subscribe_refused(&subject::live_reply(&AgentId::new("desk-1").unwrap())).await;
        // The operator's work.
        p.publish_refused(&format!("$JS.API.STREAM.DELETE.{EVENTS_STREAM}")).await;
        p.publish_refused(&format!("$JS.API.STREAM.PURGE.{DEADLETTER_STREAM}")).await;
        // Only the archiver's keeper may purge, and only EVENTS.
        p.publish_refused(&format!("$JS.API.STREAM.PURGE.{REPLIES_STREAM}")).await;
        if role != Role::Archiver {
            p.publish_refused(&format!("$JS.API.STREAM.PURGE.{EVENTS_STREAM}")).await;
        }
        p.publish_refused("$JS.API.STREAM.CREATE.MINE").await;
        p.publish_refused(&format!("$JS.API.CONSUMER.DELETE.{}.{}", other.stream, other.name())).await;
        // Speaking for an agent.
        p.publish_refused("events.desk-1.chat").await;
    }
}

/// An agent may publish its own events and read its own replies; every
/// other door is shut: stream and consumer administration, reading any
/// stream directly, others' events, replies and inboxes, any reply subject,
/// others' acks. And a connection without credentials is refused.
#[tokio::test]
async fn an_agent_is_refused_everything_but_its_own() {
    let (nats, js) = broker().await;
    let desk1 = AgentId::new("desk-1").unwrap();
    let mut p = Probe::connect(&nats.agent(&desk1).unwrap()).await;
    let api = subject::AGENT_JS_API_PREFIX;
    for s in [
        format!("{api}.STREAM.CREATE.MINE"),
        "$JS.API.STREAM.CREATE.MINE".to_string(),
        format!("{api}.STREAM.DELETE.{EVENTS_STREAM}"),
        format!("$JS.API.STREAM.PURGE.{EVENTS_STREAM}"),
        format!("$JS.API.CONSUMER.CREATE.{EVENTS_STREAM}.mine"),
        format!("{api}.CONSUMER.CREATE.{EVENTS_STREAM}.mine"),
        format!("$JS.API.STREAM.MSG.GET.{EVENTS_STREAM}"),
        format!("{api}.STREAM.MSG.GET.{REPLIES_STREAM}"),
        "events.desk-2.chat".to_string(),
        // Only one subject per kind: the per-agent cap counts subjects.
        "events.desk-1.junk".to_string(),
        "events.desk-1.chat.more".to_string(),
        "replies.desk-1".to_string(),
        "replies.desk-2".to_string(),
        "live.replies.desk-2".to_string(),
        format!("$JS.ACK.{REPLIES_STREAM}.agent-desk-2.1.1.1.1.0"),
        format!("$JS.ACK.{EVENTS_STREAM}.rules.1.1.1.1.0"),
    ] {
        p.publish_refused(&s).await;
    }
    for s in ["events.>", "_INBOX.desk-2.x", "_INBOX.>", "replies.desk-1", "live.replies.desk-2", "$JS.ACK.>"] {
        let _sub = p.subscribe_refused(s).await;
    }
    // Its own part still works.
    let own = jetstream::ContextBuilder::new().api_prefix(api).build(p.client.clone());
    own.publish("events.desk-1.chat", "x".into()).await.unwrap().await.unwrap();
    own.get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>("agent-desk-1", REPLIES_STREAM)
        .await
        .unwrap();
    p.nothing_refused().await;
    assert_eq!(ferry_stack::inspect::count(&js, EVENTS_STREAM).await.unwrap(), 1, "only its own event was stored");

    // No credentials: no connection.
    let anonymous = async_nats::ConnectOptions::new()
        .max_reconnects(1)
        .connection_timeout(Duration::from_secs(2))
        .connect(nats.url())
        .await;
    assert!(anonymous.is_err(), "an anonymous client got in");
}

/// Each agent holds at most its own account's connections: however many
/// one agent opens (or a stolen key does), the other agents, the workers
/// and the operator still get in. Run with the agents' limit lowered to 2
/// (the committed 8 per agent, times the slots, is checked against the
/// server's limit in `schema::quota`). Before each agent had an account of
/// its own, desk-1's two connections locked desk-2 out.
#[tokio::test]
async fn one_agent_cannot_take_the_connections_of_the_others_or_the_workers() {
    let dir = tempfile::tempdir().unwrap();
    let committed = format!("max_connections: {} }}", ferry_schema::quota::AGENT_MAX_CONNECTIONS);
    let demo = ferry_stack::nats::demo_nats_conf();
    assert!(demo.contains(&format!("AGENT_LIMITS = {{ max_payload: {}, {committed}", ferry_schema::quota::AGENT_MAX_PAYLOAD)));
    let conf = dir.path().join("nats.conf");
    let text = demo.replacen(&committed, "max_connections: 2 }", 1);
    std::fs::write(&conf, ferry_stack::nats::with_store_dir(&text, &dir.path().join("store"))).unwrap();
    let nats = NatsServer::start(ferry_stack::NatsServerOptions {
        data_dir: Some(dir.path().join("run")),
        conf: Some(conf),
        ..Default::default()
    })
    .unwrap();
    let (desk1, desk2) = (AgentId::new("desk-1").unwrap(), AgentId::new("desk-2").unwrap());
    let _first = nats.agent(&desk1).unwrap().connect().await.unwrap();
    let _second = nats.agent(&desk1).unwrap().connect().await.unwrap();
    let third = nats.agent(&desk1).unwrap().connect().await;
    assert!(third.is_err(), "a third connection of desk-1 got past its limit of 2");
    // The server's log says why.
    let why = "maximum account active connections exceeded";
    for _ in 0..50 {
        if nats.log_tail(50).contains(why) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(nats.log_tail(50).contains(why), "{}", nats.log_tail(50));
    // desk-2 has its own account and limit, and its events are stored as ever.
    let other = nats.agent(&desk2).unwrap().connect().await.expect("desk-2 locked out by desk-1's connections");
    let _other_too = nats.agent(&desk2).unwrap().connect().await.unwrap();
    let op = jetstream::new(nats.operator("test").connect().await.unwrap());
    topology::provision(&op, &StreamSettings::default(), &[desk1.clone(), desk2.clone()]).await.unwrap();
    let own = jetstream::ContextBuilder::new().api_prefix(subject::AGENT_JS_API_PREFIX).build(other);
    own.publish("events.desk-2.chat", "x".into()).await.unwrap().await.unwrap();
    // Workers and the operator are in FERRY, outside the agents' limits.
    for role in Role::ALL {
        nats.role(role, "after the agents").connect().await.unwrap();
    }
    nats.operator("after the agents").connect().await.unwrap();
}

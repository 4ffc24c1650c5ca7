//! The agent against a real nats-server and rules worker: confinement, offline replies, reconnect, CLI.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

mod common;

use std::time::Duration;

use async_nats::jetstream;
use ferry_agent::run::{run_lines, Until};
use ferry_agent::spool::{Spool, SpoolConfig};
use ferry_agent::{Agent, AgentConfig};
use ferry_schema::codec::encode_event;
use ferry_schema::reply::ChatAction;
use ferry_schema::topology::{self, StreamSettings, EVENTS_STREAM, REPLIES_STREAM};
use ferry_schema::{headers, subject, AgentId, Encoding, Envelope, EventBody, ReplyBody};
use ferry_schema::connect::NatsConfig;
use ferry_stack::{inspect, NatsServer};
use ferry_workers::rules::{self, RulesConfig};
use common::{chat, desk, raw_agent_client};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const DEMO_RULES: &str = include_str!("../../ops/demo/rules.toml");
const DEMO_LINES: &str = include_str!("../../ops/demo/chat.jsonl");
/// The agent tests run no inference worker: a catch-all answers what the
/// demo hands to the model, and the prediction request is left out.
const CATCH_ALL: &str = "\n[[rule]]\nname = \"catch-all\"\naction = \"reply\"\ntemplate = \"Thanks {sender}, we will answer shortly.\"\n";

fn demo_chat() -> String {
    DEMO_LINES
        .lines()
        .filter(|l| !l.contains("\"kind\":\"predict\""))
        .map(|l| format!("{l}\n"))
        .collect()
}
const WAIT: Duration = Duration::from_secs(60);


struct Stack {
    nats: NatsServer,
    js: jetstream::Context,
    rules_file: tempfile::NamedTempFile,
}

async fn stack() -> Stack {
    stack_on(NatsServer::start_temp().expect("nats-server starts")).await
}

async fn stack_on(nats: NatsServer) -> Stack {
    let op = nats.operator("test-operator").connect().await.unwrap();
    let js = jetstream::new(op);
    topology::provision(&js, &StreamSettings::default(), &[desk(1), desk(2)])
        .await
        .unwrap();
    let mut rules_file = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut rules_file, format!("{DEMO_RULES}{CATCH_ALL}").as_bytes()).unwrap();
    Stack { nats, js, rules_file }
}

impl Stack {
    async fn rules_worker(&self) -> CancellationToken {
        let client = self.nats.role(topology::Role::Rules, "test-rules").connect().await.unwrap();
        let cfg = RulesConfig::new(self.rules_file.path());
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move { rules::run(client, &cfg, token).await });
        stop
    }

    async fn agent(&self, id: &AgentId) -> Agent {
        let nats = self.nats.agent(id).expect("demo agent has a user");
        Agent::connect(AgentConfig::new(id.clone(), nats)).await.unwrap()
    }
}


/// Starts `agent`'s reply receiver; replies come out of the returned
/// channel (of `capacity`). Cancel the token and await the handle to stop it.
fn receiving(
    agent: &Agent,
    capacity: usize,
) -> (
    mpsc::Receiver<ferry_schema::Reply>,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), ferry_agent::replies::RepliesError>>,
) {
    let (tx, rx) = mpsc::channel(capacity);
    let stop = CancellationToken::new();
    let handle = tokio::spawn({
        let (agent, stop) = (agent.clone(), stop.clone());
        async move { agent.receive_replies(tx, stop).await }
    });
    (rx, stop, handle)
}

async fn next_error(errors: &mut mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(Duration::from_secs(10), errors.recv())
        .await
        .expect("the server reports the violation")
        .unwrap()
}

#[tokio::test]
async fn broker_confines_an_agent_to_its_own_subjects() {
    let s = stack().await;
    // A plain client with desk-1's credentials, as a misbehaving agent would use.
    let (client, mut errors) = raw_agent_client(&s.nats, &desk(1)).await;

    // Its own subject works.
    let js = jetstream::new(client.clone());
    let own = encode_event(&chat(&desk(1), "mine"), Encoding::MsgPack).unwrap();
    js.publish(subject::event(&desk(1), ferry_schema::EventKind::Chat), own.into())
        .await
        .unwrap()
        .await
        .unwrap();

    // Another agent's subject is refused.
    let theirs = encode_event(&chat(&desk(2), "spoofed"), Encoding::MsgPack).unwrap();
    client
        .publish(subject::event(&desk(2), ferry_schema::EventKind::Chat), theirs.into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let e = next_error(&mut errors).await;
    assert!(e.contains("Permissions Violation for Publish to \"events.desk-2.chat\""), "{e}");

    // So is listening to another agent's replies.
    let _sub = client.subscribe(subject::reply(&desk(2))).await.unwrap();
    client.flush().await.unwrap();
    let e = next_error(&mut errors).await;
    assert!(e.contains("Permissions Violation for Subscription to \"replies.desk-2\""), "{e}");

    // Or to the live copies of them.
    let _live = client.subscribe(subject::live_reply(&desk(2))).await.unwrap();
    client.flush().await.unwrap();
    let e = next_error(&mut errors).await;
    assert!(e.contains("Permissions Violation for Subscription to \"live.replies.desk-2\""), "{e}");

    // And so is pulling from another agent's reply consumer.
    let other = jetstream::ContextBuilder::new()
        .api_prefix(subject::AGENT_JS_API_PREFIX)
        .timeout(Duration::from_secs(2))
        .build(client.clone());
    let pulled = other
        .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
            topology::agent_replies_consumer_name(&desk(2)),
            REPLIES_STREAM,
        )
        .await;
    assert!(pulled.is_err());
    let e = next_error(&mut errors).await;
    assert!(e.contains("Permissions Violation for Publish to \"$JS.FERRY.API.CONSUMER.INFO.REPLIES.agent-desk-2\""), "{e}");

    // Only the allowed publish reached the stream.
    assert_eq!(inspect::count(&s.js, EVENTS_STREAM).await.unwrap(), 1);
}


/// NATS publish permissions do not cover the reply-to subject a client
/// chooses, and JetStream answers to it: an agent must not be able to make
/// the broker publish into another agent's `replies.<id>` (where `REPLIES`
/// would store it and hand it to that agent), neither with the publish
/// acknowledgement of its own event nor with a pull request that sends one
/// of its own replies (whose text it can steer through a rule) there.
#[tokio::test]
async fn a_client_chosen_reply_to_cannot_reach_another_agents_replies() {
    let s = stack().await;
    let (client, _errors) = raw_agent_client(&s.nats, &desk(1)).await;
    let victim = subject::reply(&desk(2));

    // Vector 1: its own event, with the victim's reply subject as reply-to.
    let event = chat(&desk(1), "inject the ack");
    client
        .publish_with_reply_and_headers(
            subject::event(&desk(1), ferry_schema::EventKind::Chat),
            victim.clone(),
            headers::for_publish(event.id.text(), Encoding::MsgPack, None),
            encode_event(&event, Encoding::MsgPack).unwrap().into(),
        )
        .await
        .unwrap();
    client.flush().await.unwrap();
    inspect::wait_for_count(&s.js, EVENTS_STREAM, 1, WAIT).await.unwrap();

    // Vector 2: a pull request on its own reply consumer, delivering to the
    // victim's subject.
    publish_reply(&s.js, &desk(1), "steered text").await;
    let next = format!(
        "{}.CONSUMER.MSG.NEXT.{REPLIES_STREAM}.{}",
        subject::AGENT_JS_API_PREFIX,
        topology::agent_replies_consumer_name(&desk(1))
    );
    client
        .publish_with_reply(next, victim.clone(), r#"{"batch":1,"expires":2000000000}"#.into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    // Across the accounts the request is answered on a reply subject the
    // server made up, which leads back to the requester's account and not
    // into FERRY's REPLIES; with nobody listening there the server may drop
    // the request instead. Either way: give it a moment to be served ...
    let mut consumer = replies_consumer(&s.js, &desk(1)).await;
    for _ in 0..50 {
        if consumer.info().await.unwrap().num_ack_pending > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... and an acknowledged publish after both is stored after anything
    // they could have put into REPLIES.
    publish_reply(&s.js, &desk(1), "marker").await;

    let stored = inspect::read_all(&s.js, REPLIES_STREAM, "").await.unwrap();
    let subjects: Vec<&str> = stored.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(subjects, ["replies.desk-1", "replies.desk-1"], "nothing reached desk-2's replies");
}

#[tokio::test]
async fn offline_agent_gets_its_replies_after_reconnecting() {
    let s = stack().await;
    let _rules = s.rules_worker().await;
    // desk-1 is offline: its events are published (say, by a previous run)
    // and answered while nobody is listening.
    let mut sent = Vec::new();
    for i in 0..5 {
        let e = chat(&desk(1), &format!("question {i}"));
        s.js.publish_with_headers(
            subject::event(&desk(1), ferry_schema::EventKind::Chat),
            headers::for_publish(e.id.text(), Encoding::MsgPack, None),
            encode_event(&e, Encoding::MsgPack).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        sent.push(e.id);
    }
    inspect::wait_for_count(&s.js, REPLIES_STREAM, 5, WAIT).await.unwrap();

    // The agent connects and receives all five.
    let agent = s.agent(&desk(1)).await;
    let (mut rx, stop, receiver) = receiving(&agent, 16);
    let mut got = Vec::new();
    for _ in 0..5 {
        let r = tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap();
        got.push(r.in_reply_to);
    }
    assert_eq!(got, sent, "all replies, in order");
    stop.cancel();
    receiver.await.unwrap().unwrap();

    // They were acked: a new connection gets nothing again.
    let again = s.agent(&desk(1)).await;
    let (tx, mut rx) = mpsc::channel(16);
    let stop = CancellationToken::new();
    let h = tokio::spawn({
        let stop = stop.clone();
        async move { again.receive_replies(tx, stop).await }
    });
    assert!(tokio::time::timeout(Duration::from_secs(2), rx.recv()).await.is_err());
    stop.cancel();
    h.await.unwrap().unwrap();
}

/// An agent may start before its reply consumer exists (provisioning comes
/// later, or the broker is still loading it): the receiver waits for it
/// instead of ending, which left the agent running without replies.
#[tokio::test]
async fn a_receiver_started_before_its_consumer_exists_gets_replies_once_it_does() {
    let s = stack().await;
    let name = topology::agent_replies_consumer_name(&desk(1));
    s.js.get_stream(REPLIES_STREAM).await.unwrap().delete_consumer(&name).await.unwrap();

    let agent = s.agent(&desk(1)).await;
    let (mut rx, stop, receiver) = receiving(&agent, 16);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!receiver.is_finished(), "the receiver gave up: {:?}", receiver.await);

    topology::provision(&s.js, &StreamSettings::default(), &[desk(1)]).await.unwrap();
    let event = publish_reply(&s.js, &desk(1), "late consumer").await;
    let r = tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    assert_eq!(r.in_reply_to, event);
    stop.cancel();
    receiver.await.unwrap().unwrap();
}

/// A reply on this agent's subject that is addressed to another agent (the
/// broker's accounts keep agents from putting one there; a misconfigured
/// worker could) or that does not decode is dropped and counted, never
/// acted on.
#[tokio::test]
async fn an_agent_drops_and_counts_replies_that_are_not_its_own() {
    let s = stack().await;
    let agent = s.agent(&desk(1)).await;
    let (mut rx, stop, receiver) = receiving(&agent, 16);
    publish_reply_to(&s.js, &desk(1), &desk(2), "for desk-2").await;
    s.js.publish_with_headers(
        subject::reply(&desk(1)),
        headers::for_publish("junk-1", Encoding::MsgPack, None),
        vec![0xc1, 0xff, 0x00].into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let own = publish_reply(&s.js, &desk(1), "mine").await;
    // Replies are handed on in stream order: the two before were looked at.
    let r = tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    assert_eq!(r.in_reply_to, own);
    assert_eq!(r.agent, desk(1));
    assert_eq!(agent.counts().refused_so_far(), 2);
    stop.cancel();
    receiver.await.unwrap().unwrap();
    assert!(rx.try_recv().is_err(), "only its own reply was handed on");
}

/// `agent`'s reply consumer, read as the operator.
async fn replies_consumer(js: &jetstream::Context, agent: &AgentId) -> jetstream::consumer::PullConsumer {
    js.get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
        topology::agent_replies_consumer_name(agent),
        REPLIES_STREAM,
    )
    .await
    .unwrap()
}

/// A reply to `agent`'s event, as a worker publishes it: on the agent's
/// reply subject, with its id as `Nats-Msg-Id`.
async fn publish_reply(js: &jetstream::Context, agent: &AgentId, text: &str) -> ferry_schema::EventId {
    publish_reply_to(js, agent, agent, text).await
}

/// A reply published on `on`'s reply subject but addressed to `to`.
async fn publish_reply_to(js: &jetstream::Context, on: &AgentId, to: &AgentId, text: &str) -> ferry_schema::EventId {
    let agent = on;
    let event = chat(to, text);
    let reply = ferry_schema::Reply::new(
        "test",
        event.id,
        to.clone(),
        ReplyBody::Chat(ferry_schema::reply::ChatReply {
            chat: "Bob".into(),
            action: ChatAction::Reply,
            content: Some(format!("re: {text}")),
            confidence: 1.0,
            answered_by: ferry_schema::reply::AnsweredBy {
                kind: ferry_schema::reply::ResponderKind::Rule,
                name: "test".into(),
            },
            processing_ms: 0.0,
            tokens: None,
            timings: None,
        }),
    );
    let payload = ferry_schema::codec::encode_reply(&reply, Encoding::MsgPack).unwrap();
    js.publish_with_headers(
        subject::reply(agent),
        headers::for_publish(reply.id.text(), Encoding::MsgPack, None),
        payload.into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    event.id
}

/// Replies arrive live, on the stream's republication. An agent too slow
/// for them loses some from its small client buffer; it notices the gap in
/// the stream sequences and fetches what it missed from its consumer. Every
/// reply is handed on once, in order, and on shutdown the consumer is left
/// with nothing pending.
#[tokio::test]
async fn a_slow_agent_that_drops_live_replies_still_gets_each_once_in_order() {
    let s = stack().await;
    let mut nats = s.nats.agent(&desk(1)).unwrap();
    nats.subscription_capacity = 4;
    let mut cfg = AgentConfig::new(desk(1), nats);
    cfg.reply_batch = 2;
    let agent = Agent::connect(cfg).await.unwrap();
    let (mut rx, stop, receiver) = receiving(&agent, 1);
    // One reply first, so the live subscription is known to be up.
    let mut sent = vec![publish_reply(&s.js, &desk(1), "first").await];
    assert_eq!(tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap().in_reply_to, sent[0]);

    // 200 more while the agent takes one every 5 ms: its 4-message buffer overflows.
    let publisher = tokio::spawn({
        let js = s.js.clone();
        async move {
            let mut ids = Vec::new();
            for i in 0..200 {
                ids.push(publish_reply(&js, &desk(1), &format!("burst {i}")).await);
            }
            ids
        }
    });
    let mut got = Vec::new();
    while got.len() < 200 {
        let r = tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap();
        got.push(r.in_reply_to);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sent.extend(publisher.await.unwrap());
    assert_eq!(got, sent[1..], "every reply once, in order");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), rx.recv()).await.is_err(),
        "nothing handed on twice"
    );
    stop.cancel();
    receiver.await.unwrap().unwrap();

    let mut consumer = replies_consumer(&s.js, &desk(1)).await;
    // The broker applies acks in the background: wait for the last ones.
    let mut info = consumer.info().await.unwrap().clone();
    let deadline = std::time::Instant::now() + WAIT;
    while (info.num_pending, info.num_ack_pending) != (0, 0) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        info = consumer.info().await.unwrap().clone();
    }
    assert!(
        info.delivered.consumer_sequence > 0,
        "missed replies were fetched from the consumer"
    );
    assert_eq!(
        (info.num_pending, info.num_ack_pending),
        (0, 0),
        "the last pass acked every reply handed on"
    );
}

/// Replies published while the broker was away from the agent (it was
/// restarted) arrive after the agent reconnects, once each.
#[tokio::test]
async fn replies_published_across_a_broker_restart_arrive_once() {
    let mut s = stack().await;
    let agent = s.agent(&desk(1)).await;
    let (mut rx, stop, receiver) = receiving(&agent, 16);
    let first = publish_reply(&s.js, &desk(1), "before").await;
    assert_eq!(tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap().in_reply_to, first);

    s.nats.kill();
    s.nats.restart().unwrap();
    // A fresh connection publishes at once; the agent's comes back after
    // its back-off, so these are stored before it can hear them live.
    let js = jetstream::new(s.nats.operator("after restart").connect().await.unwrap());
    let mut sent = Vec::new();
    for i in 0..3 {
        sent.push(publish_reply(&js, &desk(1), &format!("after {i}")).await);
    }
    let mut got = Vec::new();
    for _ in 0..3 {
        match tokio::time::timeout(WAIT, rx.recv()).await {
            Ok(Some(reply)) => got.push(reply.in_reply_to),
            // It failed this way once in a full parallel run (and never
            // alone): say what the agent's connection and consumer were
            // doing, and what the broker logged.
            other => {
                let consumer = js
                    .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
                        topology::agent_replies_consumer_name(&desk(1)),
                        REPLIES_STREAM,
                    )
                    .await
                    .map(|mut c| async move { c.info().await.map(|i| format!("{i:?}")) });
                let consumer = match consumer {
                    Ok(info) => format!("{:?}", info.await),
                    Err(e) => e.to_string(),
                };
                panic!(
                    "{other:?} after {got:?} of {sent:?}; agent connection {:?}, connects {}\nconsumer: {consumer}\nbroker log:\n{}",
                    agent.client().connection_state(),
                    agent.client().statistics().connects.load(std::sync::atomic::Ordering::Relaxed),
                    s.nats.log_tail(40)
                );
            }
        }
    }
    assert_eq!(got, sent);
    assert!(tokio::time::timeout(Duration::from_secs(3), rx.recv()).await.is_err(), "no repeats");
    stop.cancel();
    receiver.await.unwrap().unwrap();
}

/// An agent whose broker user predates live replies (its entry lacks
/// `live.replies.<id>`) still gets every reply, through the periodic
/// catch-up from its consumer.
#[tokio::test]
async fn an_agent_without_the_live_permission_still_gets_its_replies() {
    let dir = tempfile::tempdir().unwrap();
    let demo = ferry_stack::nats::demo_nats_conf();
    let old_conf = demo.replace(", \"live.replies.desk-1\"", "");
    assert_ne!(old_conf, demo, "the demo config gives desk-1 its live replies");
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, ferry_stack::nats::with_store_dir(&old_conf, &dir.path().join("store"))).unwrap();
    let nats = NatsServer::start(ferry_stack::NatsServerOptions {
        data_dir: Some(dir.path().join("run")),
        conf: Some(conf),
        ..Default::default()
    })
    .unwrap();
    let js = jetstream::new(nats.operator("t").connect().await.unwrap());
    topology::provision(&js, &StreamSettings::default(), &[desk(1)]).await.unwrap();
    let mut cfg = AgentConfig::new(desk(1), nats.agent(&desk(1)).unwrap());
    cfg.catch_up_every = Duration::from_millis(500);
    let agent = Agent::connect(cfg).await.unwrap();
    // `ferry-agent check` says what is missing.
    let e = agent.check_access().await.unwrap_err();
    assert!(e.contains("may not subscribe to live.replies.desk-1"), "{e}");
    let (mut rx, stop, receiver) = receiving(&agent, 16);
    let first = publish_reply(&js, &desk(1), "first").await;
    assert_eq!(tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap().in_reply_to, first);
    // Quiet for longer than any pass the first reply set off (a start, a
    // retry), so only the periodic one can bring the next.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let second = publish_reply(&js, &desk(1), "second").await;
    assert_eq!(tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap().in_reply_to, second);
    stop.cancel();
    receiver.await.unwrap().unwrap();
}

/// On a broker that requires TLS: a plaintext client is refused, and so is
/// a client that trusts another CA; an agent and a rules worker that trust
/// the broker's CA carry the demo chat end to end.
#[tokio::test]
async fn on_a_tls_broker_only_clients_that_trust_its_ca_get_in() {
    let certs = tempfile::tempdir().unwrap();
    let ca = ferry_stack::tls::Ca::open_or_create(certs.path()).unwrap();
    ca.server(&[]).unwrap();
    let nats = NatsServer::start(ferry_stack::NatsServerOptions {
        tls: Some(certs.path().to_path_buf()),
        ..Default::default()
    })
    .unwrap();

    // Plaintext, speaking the protocol by hand with good credentials.
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", nats.port())).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut info = String::new();
    let mut reader = std::io::BufReader::new(raw.try_clone().unwrap());
    std::io::BufRead::read_line(&mut reader, &mut info).unwrap();
    assert!(info.contains("\"tls_required\":true"), "{info}");
    let connect = format!(
        "CONNECT {{\"user\":\"operator\",\"pass\":\"{}\",\"verbose\":false}}\r\nPING\r\n",
        nats.secrets().operator
    );
    std::io::Write::write_all(&mut raw, connect.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = std::io::Read::read_to_string(&mut reader, &mut answer);
    assert!(!answer.contains("PONG"), "a plaintext client got in: {answer}");

    // TLS, but trusting another CA.
    let other = tempfile::tempdir().unwrap();
    let other_ca = ferry_stack::tls::Ca::open_or_create(other.path()).unwrap();
    let mut wrong = NatsConfig::new(nats.url(), "wrong CA").with_user("operator", &nats.secrets().operator);
    wrong.tls = Some(ferry_schema::connect::TlsFiles { ca: Some(other_ca.cert_path()), ..Default::default() });
    let refused = wrong.connect().await;
    assert!(refused.is_err(), "a client trusting another CA got in");

    // The right CA: the whole path works.
    assert!(nats.tls_ca().is_some());
    let s = stack_on(nats).await;
    let _rules = s.rules_worker().await;
    let agent = s.agent(&desk(1)).await;
    let (report, mut rx) = run_demo_chat(&agent).await;
    assert_eq!(report.unanswered, 0);
    assert!(rx.try_recv().is_ok(), "replies arrived over TLS");
}

/// Mutual TLS with `verify_and_map`: the client certificate chooses the
/// user (by its DNS name) and that user's password is still checked, so a
/// password without its certificate is refused, and so are a certificate
/// for a name with no user and a certificate for one user with another's
/// password. A user logged in that way has its own permissions; an agent
/// and a rules worker logged in that way carry the demo chat.
#[tokio::test]
async fn with_verify_and_map_the_certificate_chooses_the_user() {
    let certs = tempfile::tempdir().unwrap();
    let ca = ferry_stack::tls::Ca::open_or_create(certs.path()).unwrap();
    ca.server(&[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nats.conf");
    let text = ferry_stack::nats::with_store_dir(&ferry_stack::nats::demo_nats_conf(), &dir.path().join("store"));
    std::fs::write(&conf, text + &ferry_stack::tls::mapped_server_block(certs.path())).unwrap();
    let nats = NatsServer::start(ferry_stack::NatsServerOptions {
        data_dir: Some(dir.path().join("run")),
        conf: Some(conf),
        tls: Some(certs.path().to_path_buf()),
        ..Default::default()
    })
    .unwrap();
    let with_cert = |mut c: NatsConfig, name: &str| {
        let (cert, key) = ca.client(name).unwrap();
        c.tls = Some(ferry_schema::connect::TlsFiles { ca: Some(ca.cert_path()), cert: Some(cert), key: Some(key) });
        c
    };

    let refused = [
        ("a password without a certificate", nats.operator("no cert")),
        ("a certificate for no user", with_cert(nats.operator("intruder"), "intruder")),
        ("desk-1's certificate with the operator's password", with_cert(nats.operator("desk-1 as operator"), "desk-1")),
    ];
    for (what, c) in refused {
        assert!(c.connect_once().await.is_err(), "{what} got in");
    }

    // The operator's certificate and password provision; desk-1's are
    // confined as desk-1.
    let js = jetstream::new(with_cert(nats.operator("operator"), "operator").connect().await.unwrap());
    topology::provision(&js, &StreamSettings::default(), &[desk(1)]).await.unwrap();
    let as_desk1 = with_cert(nats.agent(&desk(1)).unwrap(), "desk-1");
    let (tx, mut errors) = mpsc::unbounded_channel();
    let raw = as_desk1
        .connect_reporting(move |e| {
            let _ = tx.send(e);
        })
        .await
        .unwrap();
    raw.publish(subject::event(&desk(2), ferry_schema::EventKind::Chat), "spoofed".into()).await.unwrap();
    raw.flush().await.unwrap();
    let e = next_error(&mut errors).await;
    assert!(e.contains("Permissions Violation for Publish to \"events.desk-2.chat\""), "{e}");

    // An agent and a rules worker, each with its certificate, carry the chat.
    let rules_conn = with_cert(nats.role(topology::Role::Rules, "rules"), "rules");
    let mut rules_file = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut rules_file, format!("{DEMO_RULES}{CATCH_ALL}").as_bytes()).unwrap();
    let cfg = RulesConfig::new(rules_file.path());
    let stop = CancellationToken::new();
    let rules_client = rules_conn.connect().await.unwrap();
    tokio::spawn({
        let stop = stop.clone();
        async move { rules::run(rules_client, &cfg, stop).await }
    });
    let agent = Agent::connect(AgentConfig::new(desk(1), as_desk1)).await.unwrap();
    let (report, _rx) = run_demo_chat(&agent).await;
    assert_eq!(report.unanswered, 0);
    stop.cancel();
}

/// `agent` sends the demo chat from a fresh spool until every line is
/// answered: its report, and the replies it got.
async fn run_demo_chat(agent: &Agent) -> (ferry_agent::run::RunReport, mpsc::Receiver<ferry_schema::Reply>) {
    let (tx, rx) = mpsc::channel(64);
    let spool_dir = tempfile::tempdir().unwrap();
    let report = run_lines(
        agent,
        Spool::open(SpoolConfig::new(spool_dir.path())).unwrap(),
        std::io::Cursor::new(demo_chat().into_bytes()),
        Until::Answered { idle_timeout: WAIT },
        tx,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    (report, rx)
}

#[tokio::test]
async fn demo_lines_get_rule_replies_in_both_encodings() {
    let s = stack().await;
    let _rules = s.rules_worker().await;
    for enc in [Encoding::MsgPack, Encoding::Json] {
        let nats = s.nats.agent(&desk(2)).unwrap();
        let mut cfg = AgentConfig::new(desk(2), nats);
        cfg.encoding = enc;
        let agent = Agent::connect(cfg).await.unwrap();
        let (report, mut rx) = run_demo_chat(&agent).await;
        let lines = demo_chat().lines().filter(|l| !l.trim().is_empty()).count() as u64;
        assert_eq!(report.published, lines);
        assert_eq!(report.unanswered, 0);
        let mut actions = Vec::new();
        while let Ok(r) = rx.try_recv() {
            if let ReplyBody::Chat(c) = r.body {
                actions.push((c.answered_by.name, c.action));
            }
        }
        for expected in [
            ("greeting".to_string(), ChatAction::Reply),
            ("refund".to_string(), ChatAction::Escalate),
            ("spam".to_string(), ChatAction::Ignore),
            ("catch-all".to_string(), ChatAction::Reply),
        ] {
            assert!(actions.contains(&expected), "{enc:?}: {expected:?} missing from {actions:?}");
        }
    }
}

/// An event spooled while the broker is down waits in the spool, and the
/// drainer publishes it, once, when the broker is back. (The agent
/// publishes only through its spool; this test replaced the one of the
/// one-off publish with retry it used to offer benchmarks.)
#[tokio::test]
async fn agent_publishes_through_a_broker_restart() {
    let mut s = stack().await;
    let agent = s.agent(&desk(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(SpoolConfig::new(dir.path())).unwrap();
    let stop = CancellationToken::new();
    let (delivered_tx, mut delivered) = mpsc::channel(16);
    let drainer = tokio::spawn({
        let (agent, spool, stop) = (agent.clone(), spool.clone(), stop.clone());
        async move { agent.drain_spool(&spool, &ferry_agent::health::Health::default(), Some(delivered_tx), &stop).await }
    });
    let before = chat(&desk(1), "before");
    spool.append(std::slice::from_ref(&before), Encoding::MsgPack).unwrap();
    assert_eq!(tokio::time::timeout(WAIT, delivered.recv()).await.unwrap().unwrap().id, before.id);

    s.nats.kill();
    let during = chat(&desk(1), "during outage");
    spool.append(std::slice::from_ref(&during), Encoding::MsgPack).unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(delivered.try_recv().is_err(), "nothing can ack while the broker is down");
    assert_eq!(spool.depth().events, 1, "the unacknowledged event stays in the spool");
    s.nats.restart().unwrap();
    assert_eq!(tokio::time::timeout(WAIT, delivered.recv()).await.unwrap().unwrap().id, during.id);
    stop.cancel();
    drainer.await.unwrap();
    let js = jetstream::new(s.nats.operator("after").connect().await.unwrap());
    assert_eq!(inspect::count(&js, EVENTS_STREAM).await.unwrap(), 2);
}

/// The drainer keeps the spool's order in the stream through broker
/// crashes mid-drain. A publish the client had queued when its connection
/// broke used to go out on the next connection, ahead of the earlier ones
/// the crash lost (the chaos suite's broker-restart found it: activities
/// 979-1043 stored before 788-978).
#[tokio::test]
async fn the_drain_keeps_its_order_through_broker_crashes() {
    const EVENTS: usize = 40_000;
    let mut s = stack().await;
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(SpoolConfig::new(dir.path())).unwrap();
    let events: Vec<Envelope> = (0..EVENTS)
        .map(|i| {
            Envelope::new(
                desk(1),
                EventBody::Activity(ferry_schema::event::Activity {
                    app: "a.exe".into(),
                    title: i.to_string(),
                    exe: None,
                    pid: None,
                    site: None,
                    afk: false,
                    duration_ms: 1,
                }),
            )
        })
        .collect();
    for batch in events.chunks(4096) {
        spool.append(batch, Encoding::MsgPack).unwrap();
    }
    let agent = s.agent(&desk(1)).await;
    let stop = CancellationToken::new();
    let drainer = tokio::spawn({
        let (agent, spool, stop) = (agent.clone(), spool.clone(), stop.clone());
        async move { agent.drain_spool(&spool, &ferry_agent::health::Health::default(), None, &stop).await }
    });
    // SIGKILL the broker four times while the drain runs at full speed.
    for crash in 1..=4u64 {
        let at = crash * EVENTS as u64 / 6;
        let deadline = std::time::Instant::now() + WAIT;
        while (spool.depth().events as u64) > EVENTS as u64 - at {
            assert!(std::time::Instant::now() < deadline, "the drain stalled before crash {crash}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        s.nats.kill();
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.nats.restart().unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while spool.depth().events > 0 {
        assert!(std::time::Instant::now() < deadline, "{} events left in the spool", spool.depth().events);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    drainer.await.unwrap();

    let js = jetstream::new(s.nats.operator("check").connect().await.unwrap());
    let stored = inspect::read_all(&js, EVENTS_STREAM, "").await.unwrap();
    let order: Vec<usize> = stored
        .iter()
        .map(|m| {
            let e = ferry_schema::codec::decode_event(&m.payload, Encoding::MsgPack, 1 << 20).unwrap();
            let EventBody::Activity(a) = e.body else { panic!("not an activity") };
            a.title.parse().unwrap()
        })
        .collect();
    let out_of_order: Vec<(usize, usize)> = order.windows(2).filter(|w| w[1] < w[0]).map(|w| (w[0], w[1])).take(5).collect();
    assert!(out_of_order.is_empty(), "stored out of the spool's order (after, before): {out_of_order:?}");
    assert_eq!(order, (0..EVENTS).collect::<Vec<_>>(), "every event once, in order");
}

#[tokio::test]
async fn cli_prints_replies_as_json_lines() {
    let s = stack().await;
    let _rules = s.rules_worker().await;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("chat.jsonl");
    std::fs::write(&input, demo_chat()).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry-agent"))
        .args(["--id", "desk-1", "--server", &s.nats.url()])
        .args(["--password", s.nats.secrets().agent("desk-1").unwrap()])
        .arg("--spool")
        .arg(dir.path().join("spool"))
        .args(["run", "--until-answered", "--idle-timeout", "60", "--input"])
        .arg(&input)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let replies: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let chats = replies.iter().filter(|r| r["kind"] == "chat").count();
    assert_eq!(chats, 6, "{replies:#?}");
    assert!(replies.iter().all(|r| r["agent"] == "desk-1"));

    // A bad id is refused before connecting, naming the problem.
    let bad = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry-agent"))
        .args(["--id", "desk 1", "run"])
        .output()
        .await
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains(r#"agent id "desk 1" is not a valid subject token"#), "{err}");
}

/// `ferry-agent` as desk-1 against `s`, with its spool in `spool`.
fn agent_command(s: &Stack, spool: &std::path::Path) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry-agent"));
    c.args(["--id", "desk-1", "--server", &s.nats.url()])
        .args(["--password", s.nats.secrets().agent("desk-1").unwrap()])
        .arg("--spool")
        .arg(spool)
        .kill_on_drop(true);
    c
}

#[tokio::test]
async fn spooled_events_survive_sigkill_and_an_outage_and_arrive_once_in_order() {
    let mut s = stack().await;
    let js = s.js.clone();
    s.nats.kill();
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    let input = dir.path().join("events.jsonl");
    let mut lines = String::new();
    for i in 0..200_000 {
        if i % 10 == 0 {
            lines.push_str(&format!(
                "{{\"kind\":\"chat\",\"body\":{{\"chat\":\"C\",\"sender\":\"C\",\"text\":\"SECRET-CHAT-{i}\"}}}}\n"
            ));
        } else {
            lines.push_str(&format!(
                "{{\"kind\":\"activity\",\"body\":{{\"app\":\"a.exe\",\"title\":\"SECRET-TITLE-{i}\",\"duration_ms\":1}}}}\n"
            ));
        }
    }
    std::fs::write(&input, lines).unwrap();

    // Broker down: the agent spools; it is killed while still reading input.
    let mut first = agent_command(&s, &spool_dir)
        .args(["run", "--no-adapter", "--heartbeat", "0s", "--prediction", "0s", "--input"])
        .arg(&input)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let db = spool_dir.join("spool.redb");
    // Kill it while it is spooling (1 s in, on this input, here).
    tokio::time::sleep(Duration::from_secs(1)).await;
    first.start_kill().unwrap(); // SIGKILL
    first.wait().await.unwrap();

    // What the spool holds now is what must arrive: read it as the agent would.
    let spooled: Vec<String> = {
        let spool = Spool::open(SpoolConfig::new(&spool_dir)).unwrap();
        spool.read_after(0, usize::MAX).unwrap().iter().map(|r| r.id.to_string()).collect()
    };
    assert!(!spooled.is_empty());
    eprintln!("{} of 200000 events spooled when the agent was killed", spooled.len());
    let raw = std::fs::read(&db).unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(!text.contains("SECRET-"), "plaintext found in the spool file");

    // Restarted while the broker is still down, then the broker comes back.
    let mut second = agent_command(&s, &spool_dir)
        .args(["run", "--no-adapter", "--heartbeat", "0s", "--prediction", "0s"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.nats.restart().unwrap();
    inspect::wait_for_count(&js, EVENTS_STREAM, spooled.len() as u64, WAIT)
        .await
        .unwrap();
    // Nothing more arrives: no duplicates.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stored = inspect::read_all(&js, EVENTS_STREAM, "").await.unwrap();
    let ids: Vec<String> = stored
        .iter()
        .map(|m| m.headers.as_ref().unwrap().get(headers::MSG_ID).unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), spooled.len(), "every spooled event exactly once");
    if let Some(i) = ids.iter().zip(&spooled).position(|(a, b)| a != b) {
        let pos = |id: &String| spooled.iter().position(|x| x == id);
        panic!(
            "not in spool order from stream position {i}: stream has spool items {:?}",
            ids[i.saturating_sub(2)..(i + 5).min(ids.len())].iter().map(pos).collect::<Vec<_>>()
        );
    }
    second.start_kill().unwrap();
    second.wait().await.unwrap();
    let spool = Spool::open(SpoolConfig::new(&spool_dir)).unwrap();
    assert_eq!(spool.depth().events, 0, "acknowledged events leave the spool");
}

#[tokio::test]
async fn scripted_adapter_gets_its_replies_through_the_agent_once() {
    let s = stack().await;
    let _rules = s.rules_worker().await;
    let dir = tempfile::tempdir().unwrap();
    let port = ferry_stack::free_port().unwrap();
    let script = dir.path().join("script.jsonl");
    std::fs::write(
        &script,
        "{\"chat\":\"Alice\",\"sender\":\"Alice\",\"content\":\"Hello, is anyone there?\"}\n\
         {\"chat\":\"王芳\",\"sender\":\"王芳\",\"content\":\"你好，我想问一下订单\"}\n\
         {\"chat\":\"Bob\",\"sender\":\"Bob\",\"content\":\"I want my money back for order 1234\"}\n",
    )
    .unwrap();
    let metrics_port = ferry_stack::free_port().unwrap();
    let mut agent = agent_command(&s, &dir.path().join("spool"))
        .args(["run", "--no-desktop", "--heartbeat", "0s", "--prediction", "0s", "--adapter"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--metrics-listen")
        .arg(format!("127.0.0.1:{metrics_port}"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let out = scripted_adapter(port, &dir.path().join("spool"), &script).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let of = |t: &str| lines.iter().filter(|l| l["type"] == t).cloned().collect::<Vec<_>>();
    assert_eq!(of("accepted").len(), 3, "{lines:#?}");
    let sends = of("send");
    assert_eq!(sends.len(), 2, "{lines:#?}");
    assert!(sends.iter().any(|l| l["chat"] == "Alice"));
    assert!(sends.iter().any(|l| l["chat"] == "王芳" && l["text"].as_str().unwrap().contains('王')));
    let esc = of("escalation");
    assert_eq!(esc.len(), 1);
    assert_eq!(esc[0]["chat"], "Bob");

    // Its metrics endpoint counts what happened (a reply counts once the
    // adapter's `sent` is in, a moment after the adapter exits).
    let expected = [
        "ferry_agent_published_total 3",
        "ferry_agent_replies_total 3",
        "ferry_agent_spool_events 0",
        "ferry_agent_component_up{component=\"broker\"} 1",
        "ferry_agent_component_up{component=\"spool\"} 1",
    ];
    let start = std::time::Instant::now();
    loop {
        let scrape = http_get(metrics_port, "/metrics").await;
        match expected.iter().find(|e| !scrape.contains(**e)) {
            None => break,
            Some(e) => assert!(start.elapsed() < WAIT, "{e} missing from {scrape}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The agent restarts: replies are redelivered only if unacked, and any
    // redelivered one is known as acted on; the adapter gets nothing twice.
    agent.start_kill().unwrap();
    agent.wait().await.unwrap();
    let _again = agent_command(&s, &dir.path().join("spool"))
        .args(["run", "--no-desktop", "--heartbeat", "0s", "--prediction", "0s", "--adapter"])
        .arg(format!("127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The same replies again under new message ids (as a replay or a
    // redelivery would bring them): the restarted agent reads them, knows
    // their reply ids from its spool, and sends nothing.
    let stored = inspect::read_all(&s.js, REPLIES_STREAM, "replies.desk-1").await.unwrap();
    assert_eq!(stored.len(), 3);
    for m in &stored {
        let mut h = async_nats::HeaderMap::new();
        for (k, v) in m.headers.as_ref().unwrap().iter() {
            if AsRef::<str>::as_ref(k) != headers::MSG_ID {
                for v in v {
                    h.append(k.clone(), v.clone());
                }
            }
        }
        s.js.publish_with_headers(m.subject.clone(), h, m.payload.clone()).await.unwrap().await.unwrap();
    }
    let consumer_name = topology::agent_replies_consumer_name(&desk(1));
    let start = std::time::Instant::now();
    loop {
        let mut c: jetstream::consumer::PullConsumer =
            s.js.get_consumer_from_stream(&consumer_name, REPLIES_STREAM).await.unwrap();
        let info = c.info().await.unwrap();
        if info.ack_floor.stream_sequence >= 6 {
            break;
        }
        assert!(start.elapsed() < WAIT, "the restarted agent never took the repeated replies: {info:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let quiet = tokio::process::Command::new("python3")
        .arg(adapters_dir().join("scripted_adapter.py"))
        .args(["--port", &port.to_string(), "--expect", "1", "--timeout", "3", "--script"])
        .arg(&empty)
        .arg("--token-file")
        .arg(dir.path().join("spool").join(ferry_agent::adapter::TOKEN_FILE))
        .output()
        .await
        .unwrap();
    assert!(!quiet.status.success(), "no second send may arrive: {}", String::from_utf8_lossy(&quiet.stdout));
    assert!(String::from_utf8_lossy(&quiet.stdout).trim().is_empty());
}

/// An adapter as the test plays it: the protocol over TCP, line by line.
struct TestAdapter {
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>>,
    write: tokio::net::tcp::OwnedWriteHalf,
}

impl TestAdapter {
    /// Connects (waiting for the agent to listen) and says hello as a client
    /// that sends, with the token the agent keeps in `spool`.
    async fn connect(port: u16, spool: &std::path::Path) -> Self {
        use tokio::io::AsyncBufReadExt;
        let start = std::time::Instant::now();
        let stream = loop {
            match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                Ok(s) => break s,
                Err(e) => assert!(start.elapsed() < WAIT, "the agent never listened on {port}: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (read, write) = stream.into_split();
        let mut a = Self {
            lines: tokio::io::BufReader::new(read).lines(),
            write,
        };
        // The agent writes its token before it listens.
        let token = std::fs::read_to_string(spool.join(ferry_agent::adapter::TOKEN_FILE)).unwrap();
        a.line(serde_json::json!({"type": "hello", "v": 1, "token": token.trim(), "name": "test", "sends": true})).await;
        assert_eq!(a.next().await.unwrap()["type"], "welcome");
        a
    }

    async fn line(&mut self, v: serde_json::Value) {
        use tokio::io::AsyncWriteExt;
        self.write.write_all(format!("{v}\n").as_bytes()).await.unwrap();
    }

    /// The next line within `WAIT`; `None` when the agent closed.
    async fn next(&mut self) -> Option<serde_json::Value> {
        let line = tokio::time::timeout(WAIT, self.lines.next_line()).await.expect("a line from the agent");
        line.unwrap().map(|l| serde_json::from_str(&l).unwrap())
    }

    /// The next line of type `kind`, skipping others.
    async fn next_of(&mut self, kind: &str) -> serde_json::Value {
        loop {
            let line = self.next().await.unwrap_or_else(|| panic!("the agent closed before a {kind}"));
            if line["type"] == kind {
                return line;
            }
        }
    }
}

/// The last hop loses nothing when the agent is killed at its worst
/// moments. `accepted` comes only once the chat is in the spool, so a
/// SIGKILL right after it loses nothing. And a chat reply counts as acted on
/// only after the adapter's `sent`: killed between `send` and `sent`, the
/// agent sends it again (same `reply_id`) after its restart, where it used
/// to record the reply before sending and never send it again.
#[tokio::test]
async fn the_last_hop_survives_sigkill_at_its_worst_moments() {
    let s = stack().await;
    let _rules = s.rules_worker().await;
    let dir = tempfile::tempdir().unwrap();
    let port = ferry_stack::free_port().unwrap();
    let spawn = || adapter_agent(&s, &dir.path().join("spool"), port);

    let agent = spawn();
    let mut a = TestAdapter::connect(port, &dir.path().join("spool")).await;
    a.line(serde_json::json!({"type": "message", "chat": "Alice", "sender": "Alice", "content": "hello?", "ref": "1"})).await;
    let accepted = a.next_of("accepted").await;
    sigkill(agent).await;

    let agent = spawn();
    let mut a = TestAdapter::connect(port, &dir.path().join("spool")).await;
    let send = a.next_of("send").await;
    assert_eq!(send["event_id"], accepted["event_id"], "the accepted chat was answered");
    sigkill(agent).await;

    let agent = spawn();
    let mut a = TestAdapter::connect(port, &dir.path().join("spool")).await;
    let again = a.next_of("send").await;
    assert_eq!(again["reply_id"], send["reply_id"], "an unconfirmed send comes again");
    a.line(serde_json::json!({"type": "sent", "reply_id": again["reply_id"]})).await;
    // Time to record it, then one more restart: confirmed, it stays sent.
    tokio::time::sleep(Duration::from_secs(2)).await;
    sigkill(agent).await;

    let agent = spawn();
    let mut a = TestAdapter::connect(port, &dir.path().join("spool")).await;
    let quiet = tokio::time::timeout(Duration::from_secs(5), a.next_of("send")).await;
    assert!(quiet.is_err(), "a confirmed reply is not sent again: {quiet:?}");
    sigkill(agent).await;
}

/// A chat the agent spooled but did not get to answer `accepted` for (it
/// was killed in between) is offered again by its adapter after the
/// restart. The agent knows it by its `ref` and answers `accepted` with the
/// first event id, where it used to spool it again, and the customer got
/// two answers.
#[tokio::test]
async fn a_message_offered_again_after_a_restart_is_spooled_once() {
    let s = stack().await;
    let _rules = s.rules_worker().await;
    let dir = tempfile::tempdir().unwrap();
    let port = ferry_stack::free_port().unwrap();
    let spawn = || adapter_agent(&s, &dir.path().join("spool"), port);
    let message = |r: &str| serde_json::json!({"type": "message", "chat": "Alice", "sender": "Alice", "content": "hello?", "ref": r});

    let agent = spawn();
    let mut a = TestAdapter::connect(port, &dir.path().join("spool")).await;
    a.line(message("m-1")).await;
    let first = a.next_of("accepted").await;
    sigkill(agent).await;

    let agent = spawn();
    let mut a = TestAdapter::connect(port, &dir.path().join("spool")).await;
    a.line(message("m-1")).await;
    a.line(message("m-2")).await;
    let again = a.next_of("accepted").await;
    assert_eq!(again["event_id"], first["event_id"], "the same message is the same event");
    let second = a.next_of("accepted").await;
    assert_eq!(second["ref"], "m-2");
    assert_ne!(second["event_id"], first["event_id"]);
    inspect::wait_for_count(&s.js, EVENTS_STREAM, 2, WAIT).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(inspect::count(&s.js, EVENTS_STREAM).await.unwrap(), 2, "m-1 was published twice");
    sigkill(agent).await;
}

/// `ferry-agent run` with its chat adapter server on `port` and no timers.
fn adapter_agent(s: &Stack, spool: &std::path::Path, port: u16) -> tokio::process::Child {
    agent_command(s, spool)
        .args(["run", "--no-desktop", "--heartbeat", "0s", "--prediction", "0s", "--adapter"])
        .arg(format!("127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

async fn sigkill(mut agent: tokio::process::Child) {
    agent.start_kill().unwrap(); // SIGKILL on Unix
    agent.wait().await.unwrap();
}

fn adapters_dir() -> std::path::PathBuf {
    ferry_harness::cargo::workspace_root().unwrap().join("agent/adapters")
}

async fn scripted_adapter(port: u16, spool: &std::path::Path, script: &std::path::Path) -> std::process::Output {
    tokio::process::Command::new("python3")
        .arg(adapters_dir().join("scripted_adapter.py"))
        .args(["--port", &port.to_string(), "--timeout", "60", "--script"])
        .arg(script)
        .arg("--token-file")
        .arg(spool.join(ferry_agent::adapter::TOKEN_FILE))
        .output()
        .await
        .unwrap()
}

/// The body of `GET path` on 127.0.0.1:`port`.
async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    c.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).await.unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).await.unwrap();
    text
}

#[tokio::test]
async fn install_writes_an_xdg_autostart_entry_and_uninstall_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("agent.toml");
    std::fs::write(&conf, "id = \"desk-1\"\nserver = \"nats://127.0.0.1:1\"\n").unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ferry-agent"))
            .env("XDG_CONFIG_HOME", dir.path())
            .args(args)
            .output()
            .unwrap()
    };
    let conf_s = conf.to_str().unwrap();
    let out = run(&["--config", conf_s, "install"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let entry = std::fs::read_to_string(dir.path().join("autostart/FerryAgent.desktop")).unwrap();
    let exec = entry.lines().find(|l| l.starts_with("Exec=")).unwrap();
    assert!(exec.contains(env!("CARGO_BIN_EXE_ferry-agent")) && exec.contains(conf_s) && exec.ends_with(" run"), "{exec}");
    assert!(String::from_utf8_lossy(&run(&["uninstall"]).stdout).contains("removed the logon entry"));
    assert!(!dir.path().join("autostart/FerryAgent.desktop").exists());
    // `check` says what is wrong: here, no broker on that port.
    let checked = run(&["--config", conf_s, "--spool", dir.path().join("spool").to_str().unwrap(), "check"]);
    assert!(!checked.status.success());
    let report = String::from_utf8_lossy(&checked.stdout);
    assert!(report.contains("ok      config: agent desk-1") && report.contains("ok      spool:"), "{report}");
    assert!(report.contains("PROBLEM broker"), "{report}");
    // A config that cannot work is refused before anything is registered.
    std::fs::write(&conf, "id = \"desk 1\"\n").unwrap();
    let bad = run(&["--config", conf_s, "install"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not a valid subject token"), "{}", String::from_utf8_lossy(&bad.stderr));
    assert!(!dir.path().join("autostart/FerryAgent.desktop").exists());
}

#[tokio::test]
async fn a_run_until_answered_also_publishes_what_an_earlier_run_left_spooled() {
    let s = stack().await;
    let _rules = s.rules_worker().await;
    let dir = tempfile::tempdir().unwrap();
    // An earlier run spooled three activities and stopped before publishing
    // them. They expect no reply, so only the count of published events
    // tells the run to wait for them.
    let left: Vec<Envelope> = (0..3)
        .map(|i| {
            Envelope::new(
                desk(1),
                EventBody::Activity(ferry_schema::event::Activity {
                    app: "a.exe".into(),
                    title: format!("left over {i}"),
                    exe: None,
                    pid: None,
                    site: None,
                    afk: false,
                    duration_ms: 1,
                }),
            )
        })
        .collect();
    {
        let spool = Spool::open(SpoolConfig::new(dir.path())).unwrap();
        spool.append(&left, Encoding::MsgPack).unwrap();
    }
    let spool = Spool::open(SpoolConfig::new(dir.path())).unwrap();
    let agent = s.agent(&desk(1)).await;
    let (tx, mut rx) = mpsc::channel(64);
    let input = "{\"kind\":\"chat\",\"body\":{\"chat\":\"A\",\"sender\":\"A\",\"text\":\"new\"}}\n";
    let report = run_lines(
        &agent,
        spool.clone(),
        std::io::Cursor::new(input.as_bytes().to_vec()),
        Until::Answered { idle_timeout: WAIT },
        tx,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(report.published, 4, "{report:?}");
    assert_eq!((report.unanswered, report.spooled), (0, 0), "{report:?}");
    let mut answered = 0;
    while rx.try_recv().is_ok() {
        answered += 1;
    }
    assert_eq!(answered, 1, "the new chat is answered");
    let js = jetstream::new(s.nats.operator("check").connect().await.unwrap());
    assert_eq!(inspect::count(&js, EVENTS_STREAM).await.unwrap(), 4);
}

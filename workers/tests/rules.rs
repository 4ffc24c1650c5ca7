//! The rules worker against a real nats-server: replies, encodings, dedup, replicas, poison.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::{chat, publish, publish_by_hand, stack, RULES};
use ferry_schema::codec::{decode_reply, DEFAULT_MAX_PAYLOAD};
use ferry_schema::reply::{ChatAction, ResponderKind};
use ferry_schema::topology::{self, DEADLETTER_STREAM, EVENTS_STREAM, REPLIES_STREAM};
use ferry_schema::{headers, subject, AgentId, Encoding, EventId, ReplyBody};
use ferry_stack::inspect;
use ferry_workers::runtime::{consume, ConsumeSettings, Handler, Outcome, Stats};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);

/// Every reply stored in REPLIES, decoded, with how often each event was answered.
async fn stored_replies(js: &async_nats::jetstream::Context) -> HashMap<EventId, usize> {
    let mut answered = HashMap::new();
    for m in inspect::read_all(js, REPLIES_STREAM, "").await.unwrap() {
        let enc = Encoding::from_headers(m.headers.as_ref()).unwrap();
        let r = decode_reply(&m.payload, enc, DEFAULT_MAX_PAYLOAD).unwrap();
        *answered.entry(r.in_reply_to).or_insert(0) += 1;
    }
    answered
}

/// A `traceparent` that comes with an event (from a tracer upstream of the
/// agent) goes on its reply unchanged; an event without one (the agent's
/// own: its trace id would be the event id, which `Nats-Msg-Id` carries)
/// gets a reply without one.
#[tokio::test]
async fn an_event_traceparent_goes_on_its_reply() {
    let s = stack(RULES, Duration::from_secs(30)).await;
    let agent = AgentId::new("desk-1").unwrap();
    let mut replies = s.op.subscribe(subject::reply(&agent)).await.unwrap();
    let _worker = s.replica(16).await;
    const UPSTREAM: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    for tp in [Some(UPSTREAM), None] {
        let event = chat("desk-1", "hello");
        let h = headers::for_publish(event.id.text(), Encoding::MsgPack, tp);
        let payload = ferry_schema::codec::encode_event(&event, Encoding::MsgPack).unwrap();
        s.js.publish_with_headers(subject::event(&agent, event.kind()), h, payload.into())
            .await
            .unwrap()
            .await
            .unwrap();
        let msg = tokio::time::timeout(WAIT, replies.next()).await.unwrap().unwrap();
        let reply = decode_reply(&msg.payload, Encoding::MsgPack, DEFAULT_MAX_PAYLOAD).unwrap();
        assert_eq!(reply.in_reply_to, event.id);
        assert_eq!(headers::traceparent(msg.headers.as_ref()), tp);
    }
}

#[tokio::test]
async fn json_event_gets_json_reply_and_msgpack_gets_msgpack() {
    let s = stack(RULES, Duration::from_secs(30)).await;
    let agent = AgentId::new("desk-1").unwrap();
    let mut replies = s.op.subscribe(subject::reply(&agent)).await.unwrap();
    let _worker = s.replica(16).await;

    for enc in [Encoding::Json, Encoding::MsgPack] {
        let event = chat("desk-1", &format!("hello in {enc:?}"));
        publish(&s.js, &event, enc, true).await;
        let msg = tokio::time::timeout(WAIT, replies.next()).await.unwrap().unwrap();
        // JSON says so in `Content-Type`; MessagePack, the default, has none.
        let ct = msg.headers.as_ref().and_then(|h| h.get(headers::CONTENT_TYPE));
        assert_eq!(ct.map(|v| v.as_str()), (enc == Encoding::Json).then_some(headers::CONTENT_TYPE_JSON));
        assert_eq!(Encoding::from_headers(msg.headers.as_ref()).unwrap(), enc);
        if enc == Encoding::Json {
            // A person reading `nats sub 'replies.>'` sees plain JSON.
            let doc: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
            assert_eq!(doc["in_reply_to"], event.id.to_string());
            assert_eq!(doc["body"]["content"], "echo: hello in Json");
        }
        let reply = decode_reply(&msg.payload, enc, DEFAULT_MAX_PAYLOAD).unwrap();
        assert_eq!(reply.in_reply_to, event.id);
        let ReplyBody::Chat(body) = reply.body else { panic!("not a chat reply") };
        assert_eq!(body.action, ChatAction::Reply);
        assert_eq!(body.content.as_deref(), Some(format!("echo: hello in {enc:?}").as_str()));
        assert_eq!(body.answered_by.kind, ResponderKind::Rule);
        assert_eq!(body.answered_by.name, "echo");
    }
}

/// `nats pub events.desk-1.chat '{"body": {...}}'`: no Content-Type, no
/// id, time, agent or kind. The event is answered, in JSON, under the id
/// made from its place in the stream; an interaction typed by hand is
/// taken and needs no answer. Before, both were dead-lettered as malformed.
#[tokio::test]
async fn events_typed_by_hand_are_answered_in_json() {
    let s = stack(RULES, Duration::from_secs(30)).await;
    let agent = AgentId::new("desk-1").unwrap();
    let mut replies = s.op.subscribe(subject::reply(&agent)).await.unwrap();
    let _worker = s.replica(16).await;

    let id = publish_by_hand(&s.op, &s.js, "events.desk-1.chat", r#"{"body": {"chat": "Ann", "sender": "Ann", "text": "typed by hand"}}"#).await;
    let msg = tokio::time::timeout(WAIT, replies.next()).await.unwrap().unwrap();
    let ct = msg.headers.as_ref().and_then(|h| h.get(headers::CONTENT_TYPE));
    assert_eq!(ct.map(|v| v.as_str()), Some(headers::CONTENT_TYPE_JSON));
    let doc: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(doc["in_reply_to"], id.to_string(), "{doc}");
    assert_eq!(doc["body"]["content"], "echo: typed by hand", "{doc}");

    publish_by_hand(
        &s.op,
        &s.js,
        "events.desk-1.interaction",
        r#"{"body": {"session_id": "s-1", "user_input": "refund?", "response_time_ms": 950, "success": false, "error_type": "timeout"}}"#,
    )
    .await;
    // A chat after it is answered, so the interaction was handled before it.
    let after = chat("desk-1", "after the interaction");
    publish(&s.js, &after, Encoding::MsgPack, true).await;
    let msg = tokio::time::timeout(WAIT, replies.next()).await.unwrap().unwrap();
    let reply = decode_reply(&msg.payload, Encoding::MsgPack, DEFAULT_MAX_PAYLOAD).unwrap();
    assert_eq!(reply.in_reply_to, after.id);
    assert_eq!(inspect::count(&s.js, DEADLETTER_STREAM).await.unwrap(), 0);
    assert_eq!(inspect::count(&s.js, REPLIES_STREAM).await.unwrap(), 2);
}

#[tokio::test]
async fn same_event_id_twice_yields_one_reply() {
    let s = stack(RULES, Duration::from_secs(30)).await;
    let _worker = s.replica(16).await;

    // With Nats-Msg-Id, as the agent publishes: the stream keeps one copy.
    let a = chat("desk-1", "first");
    let first = publish(&s.js, &a, Encoding::MsgPack, true).await;
    let again = publish(&s.js, &a, Encoding::MsgPack, true).await;
    assert!(!first.duplicate);
    assert!(again.duplicate);

    // Without the header (a careless `nats pub`): the stream stores both,
    // the worker handles both, and the deterministic reply id makes
    // REPLIES keep one reply.
    let b = chat("desk-1", "second");
    publish(&s.js, &b, Encoding::Json, false).await;
    publish(&s.js, &b, Encoding::Json, false).await;
    assert_eq!(inspect::count(&s.js, EVENTS_STREAM).await.unwrap(), 3);

    // A sentinel published last: once it is answered, the others were handled.
    let sentinel = chat("desk-1", "sentinel");
    publish(&s.js, &sentinel, Encoding::MsgPack, true).await;
    inspect::wait_for_count(&s.js, REPLIES_STREAM, 3, WAIT).await.unwrap();
    // Give a wrongly duplicated reply time to show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let answered = stored_replies(&s.js).await;
    assert_eq!(answered.get(&a.id), Some(&1));
    assert_eq!(answered.get(&b.id), Some(&1));
    assert_eq!(answered.get(&sentinel.id), Some(&1));
    assert_eq!(answered.len(), 3);
}

#[tokio::test]
async fn three_replicas_split_ten_thousand_events() {
    const N: usize = 10_000;
    let s = stack(RULES, Duration::from_secs(30)).await;
    let replicas = [s.replica(64).await, s.replica(64).await, s.replica(64).await];

    let events: Vec<_> = (0..N)
        .map(|i| chat(if i % 2 == 0 { "desk-1" } else { "desk-2" }, &format!("message {i}")))
        .collect();
    let payloads = futures::stream::iter(events.iter())
        .map(|e| publish(&s.js, e, Encoding::MsgPack, true))
        .buffer_unordered(256);
    let acks: Vec<_> = payloads.collect().await;
    assert_eq!(acks.len(), N);

    inspect::wait_for_count(&s.js, REPLIES_STREAM, N as u64, Duration::from_secs(180))
        .await
        .unwrap();
    let mut done = Vec::new();
    for r in replicas {
        r.stop.cancel();
        let stats = r.task.await.unwrap().unwrap();
        done.push(stats.snapshot().done);
    }
    let answered = stored_replies(&s.js).await;
    assert_eq!(answered.len(), N, "every event answered");
    assert!(answered.values().all(|&n| n == 1), "no event answered twice");
    let ids: HashSet<_> = events.iter().map(|e| e.id).collect();
    assert!(answered.keys().all(|id| ids.contains(id)));
    assert!(done.iter().all(|&d| d > 0), "each replica did some: {done:?}");
    assert!(done.iter().sum::<u64>() >= N as u64, "{done:?}");
}

#[tokio::test]
async fn killed_replica_process_loses_nothing() {
    const N: usize = 3_000;
    // Short ack_wait: what the killed replica held is redelivered quickly.
    let s = stack(RULES, Duration::from_secs(2)).await;
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_ferry-worker"))
            .args(["--server", &s.nats.url(), "--user", "rules"])
            .args(["--password", s.nats.secrets().role(topology::Role::Rules)])
            .args(["rules", "--concurrency", "32", "--rules"])
            .arg(s.rules_file.path())
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("ferry-worker starts")
    };
    let mut victim = spawn();
    let mut survivors = [spawn(), spawn()];

    let events: Vec<_> = (0..N).map(|i| chat("desk-1", &format!("m{i}"))).collect();
    futures::stream::iter(events.iter())
        .map(|e| publish(&s.js, e, Encoding::MsgPack, true))
        .buffer_unordered(128)
        .collect::<Vec<_>>()
        .await;
    // Kill one replica mid-run, with work in its hands.
    inspect::wait_for_count(&s.js, REPLIES_STREAM, (N / 10) as u64, WAIT).await.unwrap();
    victim.kill().unwrap();
    victim.wait().unwrap();

    inspect::wait_for_count(&s.js, REPLIES_STREAM, N as u64, Duration::from_secs(120))
        .await
        .unwrap();
    let answered = stored_replies(&s.js).await;
    assert_eq!(answered.len(), N);
    assert!(answered.values().all(|&n| n == 1));
    for c in &mut survivors {
        // SIGTERM: the graceful path exits 0.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        assert!(c.wait().unwrap().success());
    }
}

#[tokio::test]
async fn poison_goes_to_dead_letters_with_distinct_reasons() {
    let s = stack(RULES, Duration::from_secs(30)).await;
    let _worker = s.replica(8).await;
    let raw = |subject: &str, json: bool, payload: Vec<u8>| {
        let js = s.js.clone();
        let subject = subject.to_string();
        async move {
            let mut h = async_nats::HeaderMap::new();
            if json {
                h.insert(headers::CONTENT_TYPE, "application/json");
            }
            js.publish_with_headers(subject, h, payload.into()).await.unwrap().await.unwrap();
        }
    };
    let valid = || serde_json::json!({
        "id": EventId::new().to_string(), "agent": "desk-1", "kind": "chat",
        "ts": "2026-11-22T10:00:00Z", "v": 1,
        "body": {"chat": "c", "sender": "s", "text": "t"}
    });
    raw("events.desk-1.chat", false, b"\xc1\xff garbage \x00\x01".to_vec()).await;
    let mut missing = valid();
    missing["body"].as_object_mut().unwrap().remove("text");
    raw("events.desk-1.chat", true, serde_json::to_vec(&missing).unwrap()).await;
    let mut version = valid();
    version["v"] = 42.into();
    raw("events.desk-1.chat", true, serde_json::to_vec(&version).unwrap()).await;
    let mut big = valid();
    big["padding"] = "x".repeat(DEFAULT_MAX_PAYLOAD + 10).into();
    raw("events.desk-1.chat", true, serde_json::to_vec(&big).unwrap()).await;
    let mut bad_agent = valid();
    bad_agent["agent"] = "desk.1".into();
    raw("events.desk-1.chat", true, serde_json::to_vec(&bad_agent).unwrap()).await;

    // Valid events after the poison are still answered.
    let after: Vec<_> = (0..5).map(|i| chat("desk-1", &format!("after {i}"))).collect();
    for e in &after {
        publish(&s.js, e, Encoding::MsgPack, true).await;
    }
    inspect::wait_for_count(&s.js, REPLIES_STREAM, 5, WAIT).await.unwrap();
    inspect::wait_for_count(&s.js, DEADLETTER_STREAM, 5, WAIT).await.unwrap();

    let dead = inspect::read_all(&s.js, DEADLETTER_STREAM, "").await.unwrap();
    let mut codes = Vec::new();
    for m in &dead {
        assert_eq!(m.subject.as_str(), "deadletter.EVENTS.rules");
        let h = m.headers.as_ref().unwrap();
        codes.push(h.get(headers::DEAD_REASON_CODE).unwrap().to_string());
        assert!(!h.get(headers::DEAD_REASON).unwrap().as_str().is_empty());
        assert_eq!(h.get(headers::DEAD_SUBJECT).unwrap().as_str(), "events.desk-1.chat");
    }
    assert_eq!(
        codes,
        ["malformed", "missing_field", "unsupported_version", "too_large", "invalid_agent_id"]
    );
    let reason = |i: usize| dead[i].headers.as_ref().unwrap().get(headers::DEAD_REASON).unwrap().to_string();
    assert_eq!(reason(1), "required field `body.text` is missing");
    assert!(reason(3).contains("exceeds the 262144-byte limit"), "{}", reason(3));
    // The original bytes are kept for re-driving after a fix.
    assert_eq!(&dead[0].payload[..], b"\xc1\xff garbage \x00\x01");

    let answered = stored_replies(&s.js).await;
    assert!(after.iter().all(|e| answered.get(&e.id) == Some(&1)));
}

#[tokio::test]
async fn shutdown_finishes_in_flight_and_exits() {
    let s = stack(RULES, Duration::from_secs(30)).await;
    let worker = s.replica(64).await;
    let events: Vec<_> = (0..500).map(|i| chat("desk-2", &format!("m{i}"))).collect();
    futures::stream::iter(events.iter())
        .map(|e| publish(&s.js, e, Encoding::MsgPack, true))
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    inspect::wait_for_count(&s.js, REPLIES_STREAM, 50, WAIT).await.unwrap();
    worker.stop.cancel();
    let stats = worker.task.await.unwrap().unwrap().snapshot();
    assert_eq!(stats.in_flight, 0, "phase two waited for in-flight work");
    // What the stopped replica did not finish, a new one does.
    let _next = s.replica(64).await;
    inspect::wait_for_count(&s.js, REPLIES_STREAM, 500, WAIT).await.unwrap();
    let answered = stored_replies(&s.js).await;
    assert_eq!(answered.len(), 500);
    assert!(answered.values().all(|&n| n == 1));
}

#[tokio::test]
async fn rules_match_customer_tags_from_postgres() {
    let rules = r#"
[[rule]]
name = "vip"
customer_tags = ["vip"]
action = "escalate"
template = "VIP {sender}"

[[rule]]
name = "everyone"
action = "reply"
template = "hi {sender}"
"#;
    let s = stack(rules, Duration::from_secs(30)).await;
    let pg = common::migrated_pg().await;
    let c = ferry_workers::state::connect_one(&pg.url()).await.unwrap();
    // 王芳 is a known VIP (any spelling of her name); Alice is new.
    let vip = ferry_workers::state::customers::identify(&c, "desk-1", "王芳", chrono::Utc::now()).await.unwrap();
    ferry_workers::state::customers::set_tags(&c, vip.id, &["vip".to_string()]).await.unwrap();

    // Without a database the worker refuses to start, saying why.
    let client = s.nats.role(topology::Role::Rules, "t").connect().await.unwrap();
    let cfg = ferry_workers::rules::RulesConfig::new(s.rules_file.path());
    let err = ferry_workers::rules::run(client, &cfg, tokio_util::sync::CancellationToken::new()).await.unwrap_err();
    assert!(err.to_string().contains("needs PostgreSQL: pass --database-url"), "{err}");

    let client = s.nats.role(topology::Role::Rules, "t").connect().await.unwrap();
    let mut cfg = ferry_workers::rules::RulesConfig::new(s.rules_file.path());
    cfg.db = Some(ferry_workers::state::DbConfig::new(pg.url()));
    let stop = tokio_util::sync::CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move { ferry_workers::rules::run(client, &cfg, token).await });
    let mut from_vip = chat("desk-1", "在吗");
    if let ferry_schema::EventBody::Chat(m) = &mut from_vip.body {
        m.sender = " 王芳 ".into();
    }
    let from_new = chat("desk-1", "hello");
    publish(&s.js, &from_vip, Encoding::Json, true).await;
    publish(&s.js, &from_new, Encoding::Json, true).await;
    inspect::wait_for_count(&s.js, REPLIES_STREAM, 2, WAIT).await.unwrap();
    let mut by = HashMap::new();
    for m in inspect::read_all(&s.js, REPLIES_STREAM, "").await.unwrap() {
        let r = decode_reply(&m.payload, Encoding::Json, DEFAULT_MAX_PAYLOAD).unwrap();
        if let ReplyBody::Chat(c) = r.body {
            by.insert(r.in_reply_to, c.answered_by.name);
        }
    }
    assert_eq!(by[&from_vip.id], "vip");
    assert_eq!(by[&from_new.id], "everyone");
    // The first chat from Alice created her customer record.
    assert!(ferry_workers::state::customers::find(&c, "desk-1", "alice").await.unwrap().is_some());
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// Editing the rules file changes the replies of a running worker; an edit
/// that does not validate is refused and the rules in use stay; the next
/// valid edit is taken again.
#[tokio::test]
async fn rules_are_reloaded_when_the_file_changes_and_validates() {
    use ferry_workers::rules::{self, RulesConfig};
    let s = stack(RULES, Duration::from_secs(30)).await;
    let agent = AgentId::new("desk-1").unwrap();
    let mut replies = s.op.subscribe(subject::reply(&agent)).await.unwrap();
    s.op.flush().await.unwrap();
    let client = s.nats.role(topology::Role::Rules, "test-rules").connect().await.unwrap();
    let mut cfg = RulesConfig::new(s.rules_file.path());
    cfg.reload_every = Some(Duration::from_millis(100));
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn({
        let stop = stop.clone();
        async move { rules::run(client, &cfg, stop).await }
    });

    // Sends a chat and returns the content of its reply.
    async fn answer(js: &async_nats::jetstream::Context, replies: &mut async_nats::Subscriber) -> String {
        let event = chat("desk-1", "hi");
        publish(js, &event, Encoding::MsgPack, true).await;
        loop {
            let msg = tokio::time::timeout(WAIT, replies.next()).await.unwrap().unwrap();
            let reply = decode_reply(&msg.payload, Encoding::MsgPack, DEFAULT_MAX_PAYLOAD).unwrap();
            if reply.in_reply_to == event.id {
                let ReplyBody::Chat(body) = reply.body else { panic!("not a chat reply") };
                return body.content.unwrap_or_default();
            }
        }
    }
    // Writes the rules file the way editors do: a new file renamed over it.
    let path = s.rules_file.path().to_path_buf();
    let write = |text: &str| {
        let tmp = path.with_extension("new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    };
    let rules_with = |template: &str| format!("[[rule]]\nname = \"echo\"\naction = \"reply\"\ntemplate = \"{template}\"\n");

    assert!(answer(&s.js, &mut replies).await.starts_with("echo: hi"));

    // Asks until the replies follow `new`; until then they must follow `old`.
    async fn until_replies_follow(
        js: &async_nats::jetstream::Context,
        replies: &mut async_nats::Subscriber,
        old: &str,
        new: &str,
    ) {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let content = answer(js, replies).await;
            if content.starts_with(new) {
                return;
            }
            assert!(content.starts_with(old), "{content}");
            assert!(std::time::Instant::now() < deadline, "the rules giving {new:?} were never used");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    write(&rules_with("v2: {text}"));
    until_replies_follow(&s.js, &mut replies, "echo: hi", "v2: hi").await;

    // A reply rule without a template does not validate.
    write("[[rule]]\nname = \"broken\"\naction = \"reply\"\n");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(answer(&s.js, &mut replies).await.starts_with("v2: hi"), "an invalid file replaced the rules");

    write(&rules_with("v3: {text}"));
    until_replies_follow(&s.js, &mut replies, "v2: hi", "v3: hi").await;
    stop.cancel();
    worker.await.unwrap().unwrap();
}

/// A malformed event published with `Nats-Expected-Stream: EVENTS` (which
/// the broker honours on the original publish) still reaches dead letters:
/// copied under its own name, the header made `DEADLETTER` refuse the dead
/// letter for ever, and the worker logged an error every second.
#[tokio::test]
async fn poison_with_broker_headers_still_reaches_dead_letters() {
    let s = stack(RULES, Duration::from_secs(30)).await;
    let _worker = s.replica(8).await;
    let mut h = async_nats::HeaderMap::new();
    h.insert("Nats-Expected-Stream", EVENTS_STREAM);
    h.insert(headers::MSG_ID, "hand-made-1");
    s.js.publish_with_headers("events.desk-1.chat", h, "not an event".into())
        .await
        .unwrap()
        .await
        .unwrap();
    publish(&s.js, &chat("desk-1", "after"), Encoding::MsgPack, true).await;
    inspect::wait_for_count(&s.js, DEADLETTER_STREAM, 1, WAIT).await.unwrap();
    let dead = inspect::read_all(&s.js, DEADLETTER_STREAM, "").await.unwrap();
    let h = dead[0].headers.as_ref().unwrap();
    assert_eq!(h.get(headers::DEAD_REASON_CODE).unwrap().as_str(), "malformed");
    assert_eq!(h.get("Ferry-Original-Nats-Expected-Stream").unwrap().as_str(), EVENTS_STREAM);
    assert_eq!(h.get("Ferry-Original-Nats-Msg-Id").unwrap().as_str(), "hand-made-1");
    assert_eq!(&dead[0].payload[..], b"not an event");
    inspect::wait_for_count(&s.js, REPLIES_STREAM, 1, WAIT).await.unwrap();
}

/// `handler` on the rules consumer in a consume loop of its own, as the
/// `rules` user: its counters, its stop token and its task.
async fn consume_loop<H: Handler>(
    s: &common::Stack,
    handler: H,
    settings: ConsumeSettings,
) -> (
    Arc<Stats>,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), ferry_workers::runtime::ConsumeError>>,
) {
    let client = s.nats.role(topology::Role::Rules, "test-loop").connect().await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stats = Arc::new(Stats::for_role("rules"));
    let stop = CancellationToken::new();
    let task = {
        let (stats, stop) = (stats.clone(), stop.clone());
        tokio::spawn(async move { consume(&js, &topology::rules_consumer(), Arc::new(handler), &settings, stats, stop).await })
    };
    (stats, stop, task)
}

/// A handler that panics on some messages.
struct Panicky;

impl Handler for Panicky {
    async fn handle(&self, msg: &async_nats::jetstream::Message) -> Outcome {
        if &msg.payload[..] == b"boom" {
            panic!("boom in the handler");
        }
        Outcome::Done
    }
}

/// A handler's panic becomes a dead letter with reason `panic` and the
/// panic's message; the loop goes on with the next messages.
#[tokio::test]
async fn a_handler_panic_is_dead_lettered_and_the_loop_goes_on() {
    let s = stack(RULES, Duration::from_secs(30)).await;
    let settings = ConsumeSettings {
        max_in_flight: 4,
        ..ConsumeSettings::default()
    };
    let (stats, stop, task) = consume_loop(&s, Panicky, settings).await;
    for payload in ["one", "boom", "two", "boom", "three"] {
        s.js.publish("events.desk-1.chat", payload.into()).await.unwrap().await.unwrap();
    }
    inspect::wait_for_count(&s.js, DEADLETTER_STREAM, 2, WAIT).await.unwrap();
    let dead = inspect::read_all(&s.js, DEADLETTER_STREAM, "").await.unwrap();
    for m in &dead {
        let h = m.headers.as_ref().unwrap();
        assert_eq!(h.get(headers::DEAD_REASON_CODE).unwrap().as_str(), "panic");
        let reason = h.get(headers::DEAD_REASON).unwrap().to_string();
        assert!(reason.contains("boom in the handler"), "{reason}");
        assert_eq!(&m.payload[..], b"boom");
    }
    let start = std::time::Instant::now();
    while stats.snapshot().done < 3 {
        assert!(start.elapsed() < WAIT, "the loop stopped after the panic: {:?}", stats.snapshot());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stats.snapshot().poisoned, 2);
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// A consumer deleted under a running worker (an operator's mistake, a
/// botched re-provision) ended the consume loop, and the process went on
/// looking healthy. Now the loop re-creates its consumer from its
/// definition, starting after the ack floor, and every event published
/// before and after is answered exactly once.
#[tokio::test]
async fn a_deleted_consumer_is_recreated_and_every_event_answered_once() {
    let s = stack(RULES, Duration::from_secs(30)).await;
    let worker = s.replica(8).await;
    let before: Vec<_> = (0..20).map(|i| chat("desk-1", &format!("before {i}"))).collect();
    for e in &before {
        publish(&s.js, e, Encoding::MsgPack, true).await;
    }
    inspect::wait_for_count(&s.js, REPLIES_STREAM, 20, WAIT).await.unwrap();
    let events = s.js.get_stream(EVENTS_STREAM).await.unwrap();
    events.delete_consumer("rules").await.unwrap();
    let after: Vec<_> = (0..20).map(|i| chat("desk-2", &format!("after {i}"))).collect();
    for e in &after {
        publish(&s.js, e, Encoding::MsgPack, true).await;
    }
    inspect::wait_for_count(&s.js, REPLIES_STREAM, 40, WAIT).await.unwrap();
    // Re-answers of events acked before the floor was read are the same
    // replies (same ids), which REPLIES de-duplicates.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let answered = stored_replies(&s.js).await;
    for e in before.iter().chain(&after) {
        assert_eq!(answered.get(&e.id), Some(&1), "event {} answered once", e.id);
    }
    assert_eq!(answered.len(), 40);
    let info = events.consumer_info("rules").await.unwrap();
    assert_eq!(info.num_pending, 0);
    assert!(!worker.task.is_finished(), "the worker keeps running");
    worker.stop.cancel();
    worker.task.await.unwrap().unwrap();
}

/// A consumer that cannot be had back (its stream is gone) stops the
/// worker with an error within `rebind_within`, so the process exits
/// non-zero and its supervisor restarts it, instead of idling unseen.
#[tokio::test]
async fn a_consumer_that_cannot_come_back_stops_the_worker_with_an_error() {
    use ferry_workers::rules::{self, RulesConfig};
    let s = stack(RULES, Duration::from_secs(30)).await;
    let client = s.nats.role(topology::Role::Rules, "test-rules").connect().await.unwrap();
    let mut cfg = RulesConfig::new(s.rules_file.path());
    cfg.consume.rebind_within = Duration::from_secs(3);
    let stop = CancellationToken::new();
    let worker = tokio::spawn({
        let stop = stop.clone();
        async move { rules::run(client, &cfg, stop).await }
    });
    publish(&s.js, &chat("desk-1", "hi"), Encoding::MsgPack, true).await;
    inspect::wait_for_count(&s.js, REPLIES_STREAM, 1, WAIT).await.unwrap();
    s.js.delete_stream(EVENTS_STREAM).await.unwrap();
    let result = tokio::time::timeout(WAIT, worker).await.expect("the worker stops by itself").unwrap();
    let error = result.expect_err("a lost consumer is an error").to_string();
    assert!(error.contains("lost consumer EVENTS/rules"), "{error}");
    assert!(!stop.is_cancelled());
}

/// A handler that never finishes on some messages.
struct Stuck;

impl Handler for Stuck {
    async fn handle(&self, msg: &async_nats::jetstream::Message) -> Outcome {
        if &msg.payload[..] == b"stuck" {
            std::future::pending::<()>().await;
        }
        Outcome::Done
    }
}

/// A message whose every delivery times out (no handler ever answers)
/// used to vanish after `max_deliver`; the broker's max-deliveries advisory
/// now makes it a dead letter with code `max_deliver`, and the others pass.
#[tokio::test]
async fn a_message_whose_deliveries_all_time_out_is_dead_lettered() {
    // ack_wait 1 s: the broker gives up after about max_deliver seconds.
    let s = stack(RULES, Duration::from_secs(1)).await;
    let settings = ConsumeSettings {
        max_in_flight: 16,
        shutdown_grace: Duration::from_millis(200),
        ..ConsumeSettings::default()
    };
    let (stats, stop, task) = consume_loop(&s, Stuck, settings).await;
    let mut h = async_nats::HeaderMap::new();
    h.insert("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
    s.js.publish_with_headers("events.desk-1.chat", h, "stuck".into()).await.unwrap().await.unwrap();
    for payload in ["fine", "also fine"] {
        s.js.publish("events.desk-2.chat", payload.into()).await.unwrap().await.unwrap();
    }
    inspect::wait_for_count(&s.js, DEADLETTER_STREAM, 1, WAIT).await.unwrap();
    let dead = inspect::read_all(&s.js, DEADLETTER_STREAM, "").await.unwrap();
    let h = dead[0].headers.as_ref().unwrap();
    assert_eq!(h.get(headers::DEAD_REASON_CODE).unwrap().as_str(), "max_deliver");
    let max_deliver = topology::rules_consumer().config.max_deliver.to_string();
    assert_eq!(h.get(headers::DEAD_DELIVERIES).unwrap().as_str(), max_deliver);
    assert_eq!(h.get(headers::DEAD_SUBJECT).unwrap().as_str(), "events.desk-1.chat");
    assert_eq!(h.get(headers::DEAD_SEQUENCE).unwrap().as_str(), "1");
    assert!(h.get("traceparent").is_some(), "the original's headers are kept");
    assert_eq!(&dead[0].payload[..], b"stuck");
    assert_eq!(stats.snapshot().done, 2);
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// With a customer-tag rule, every chat needs PostgreSQL. A 10 s outage
/// used to dead-letter the chats that came meanwhile (5 deliveries, 1 s
/// apart); now a retry's delay doubles per delivery, and they are answered
/// once PostgreSQL is back, none dead-lettered.
#[tokio::test]
async fn a_postgres_outage_does_not_dead_letter_customer_tag_chats() {
    let rules = "[[rule]]\nname = \"vip\"\ncustomer_tags = [\"vip\"]\naction = \"escalate\"\ntemplate = \"VIP\"\n\n[[rule]]\nname = \"everyone\"\naction = \"reply\"\ntemplate = \"hi {sender}\"\n";
    let s = stack(rules, Duration::from_secs(30)).await;
    let mut pg = common::migrated_pg().await;
    let client = s.nats.role(topology::Role::Rules, "t").connect().await.unwrap();
    let mut cfg = ferry_workers::rules::RulesConfig::new(s.rules_file.path());
    cfg.db = Some(ferry_workers::state::DbConfig::new(pg.url()));
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { ferry_workers::rules::run(client, &cfg, stop).await }
    });
    publish(&s.js, &chat("desk-1", "before"), Encoding::MsgPack, true).await;
    inspect::wait_for_count(&s.js, REPLIES_STREAM, 1, WAIT).await.unwrap();

    pg.kill();
    let during: Vec<_> = (0..20).map(|i| chat("desk-2", &format!("during {i}"))).collect();
    for e in &during {
        publish(&s.js, e, Encoding::MsgPack, true).await;
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    pg.restart().unwrap();
    inspect::wait_for_count(&s.js, REPLIES_STREAM, 21, WAIT).await.unwrap();
    let answered = stored_replies(&s.js).await;
    assert!(during.iter().all(|e| answered.get(&e.id) == Some(&1)), "{answered:?}");
    assert_eq!(inspect::count(&s.js, DEADLETTER_STREAM).await.unwrap(), 0, "an outage poisons nothing");
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// A worker whose broker went away still stops on SIGTERM: its last step
/// (leaving the micro service, flushing the client) waits for a broker
/// only so long, rather than for a reconnect that never comes.
#[tokio::test]
async fn a_worker_whose_broker_is_gone_still_stops_on_sigterm() {
    let mut s = stack(RULES, Duration::from_secs(30)).await;
    let mut worker = std::process::Command::new(env!("CARGO_BIN_EXE_ferry-worker"))
        .args(["--server", &s.nats.url(), "--user", "rules"])
        .args(["--password", s.nats.secrets().role(topology::Role::Rules)])
        .args(["rules", "--rules"])
        .arg(s.rules_file.path())
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("ferry-worker starts");
    // Running: it answers a chat.
    publish(&s.js, &chat("desk-1", "hello"), Encoding::MsgPack, true).await;
    let answered = inspect::wait_for_count(&s.js, REPLIES_STREAM, 1, WAIT).await;
    s.nats.stop();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(worker.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = worker.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if status.is_none() {
        let _ = worker.kill();
        let _ = worker.wait();
    }
    answered.unwrap();
    assert!(status.is_some(), "the worker still ran a minute after SIGTERM, its broker gone");
}

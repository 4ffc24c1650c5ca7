//! `ferry replay` against a real broker: selection by subject, sequence and time, re-sending, shadow mode and tracing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::process::Command;
use std::time::Duration;

use async_nats::jetstream;
use ferry_schema::event::{Activity, ChatMessage};
use ferry_schema::{codec, headers, subject, topology, AgentId, Encoding, Envelope, EventBody};
use ferry_stack::NatsServer;
use futures::StreamExt;

const RULES: &str = r#"
[defaults]
unmatched_chat = "infer"

[[rule]]
name = "greeting"
keywords = ["hello"]
action = "reply"
template = "Hello {sender}!"

[[rule]]
name = "refund"
keywords = ["refund"]
action = "escalate"
template = "Refund: a person takes over."
"#;

fn chat(agent: &str, text: &str) -> Envelope {
    Envelope::new(
        AgentId::new(agent).unwrap(),
        EventBody::Chat(ChatMessage {
            chat: "Ann".into(),
            chat_type: Default::default(),
            sender: "Ann".into(),
            text: text.into(),
            msg_type: Default::default(),
        }),
    )
}

fn activity(agent: &str) -> Envelope {
    Envelope::new(
        AgentId::new(agent).unwrap(),
        EventBody::Activity(Activity {
            app: "excel.exe".into(),
            title: "Book1 - Excel".into(),
            exe: None,
            pid: None,
            site: None,
            afk: false,
            duration_ms: 1000,
        }),
    )
}

/// Publishes as the agent does: msg id and content type (no `traceparent`:
/// `--trace` follows an event by its id).
async fn publish(js: &jetstream::Context, e: &Envelope) -> u64 {
    let h = headers::for_publish(e.id.text(), Encoding::MsgPack, None);
    let p = codec::encode_event(e, Encoding::MsgPack).unwrap();
    js.publish_with_headers(subject::event(&e.agent, e.kind()), h, p.into())
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence
}

struct Fixture {
    nats: NatsServer,
    js: jetstream::Context,
    op: async_nats::Client,
    /// (seq, event) in publish order.
    events: Vec<(u64, Envelope)>,
    rules: tempfile::NamedTempFile,
}

impl Fixture {
    /// Runs `ferry ARGS` off the test's runtime thread; returns (status ok, stdout, stderr).
    async fn ferry(&self, args: &[&str]) -> (bool, String, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
        cmd.args(args).args(["--quiet", "--server", &self.nats.url(), "--password", &self.nats.secrets().operator]);
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap();
        (
            out.status.success(),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    }

    /// Stream sequences `ferry replay ARGS` prints.
    async fn seqs(&self, args: &[&str]) -> Vec<u64> {
        let mut all = vec!["replay"];
        all.extend_from_slice(args);
        let (ok, out, err) = self.ferry(&all).await;
        assert!(ok, "{args:?}: {err}");
        out.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"].as_u64().unwrap())
            .collect()
    }

    fn seqs_where(&self, f: impl Fn(&Envelope) -> bool) -> Vec<u64> {
        self.events.iter().filter(|(_, e)| f(e)).map(|(s, _)| *s).collect()
    }

    async fn stream_time(&self, seq: u64) -> String {
        let stream = self.js.get_stream(topology::EVENTS_STREAM).await.unwrap();
        let m = stream.get_raw_message(seq).await.unwrap();
        m.time.format(&time::format_description::well_known::Rfc3339).unwrap()
    }

    async fn messages(&self, stream: &str) -> u64 {
        self.js.get_stream(stream).await.unwrap().info().await.unwrap().state.messages
    }
}

/// A broker with six events (two batches), answered by a real rules worker.
async fn fixture() -> Fixture {
    let nats = NatsServer::start_temp().unwrap();
    let op = nats.operator("t").connect().await.unwrap();
    let js = jetstream::new(op.clone());
    topology::provision(&js, &topology::StreamSettings::default(), &[]).await.unwrap();
    let mut rules = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut rules, RULES.as_bytes()).unwrap();

    let client = nats.role(topology::Role::Rules, "t").connect().await.unwrap();
    let cfg = ferry_workers::rules::RulesConfig::new(rules.path());
    let stop = tokio_util::sync::CancellationToken::new();
    let token = stop.clone();
    let worker = tokio::spawn(async move { ferry_workers::rules::run(client, &cfg, token).await });

    let mut events = Vec::new();
    for e in [
        chat("desk-1", "hello there"),
        chat("desk-1", "I want a refund"),
        chat("desk-2", "where is my order?"),
        activity("desk-1"),
        chat("desk-2", "hello again"),
        activity("desk-2"),
    ] {
        let seq = publish(&js, &e).await;
        events.push((seq, e));
    }
    // Two replies (greeting twice... once per agent), one escalation, one hand-off.
    ferry_stack::inspect::wait_for_count(&js, topology::REPLIES_STREAM, 3, Duration::from_secs(30)).await.unwrap();
    ferry_stack::inspect::wait_for_count(&js, topology::WORK_STREAM, 1, Duration::from_secs(30)).await.unwrap();
    stop.cancel();
    worker.await.unwrap().unwrap();
    Fixture {
        nats,
        js,
        op,
        events,
        rules,
    }
}

#[tokio::test]
async fn replay_selects_by_subject_sequence_and_time() {
    let f = fixture().await;
    let all: Vec<u64> = f.events.iter().map(|(s, _)| *s).collect();
    assert_eq!(f.seqs(&[]).await, all);
    assert_eq!(f.seqs(&["--agent", "desk-1"]).await, f.seqs_where(|e| e.agent.as_str() == "desk-1"));
    assert_eq!(f.seqs(&["--kind", "chat"]).await, f.seqs_where(|e| e.kind().as_str() == "chat"));
    assert_eq!(
        f.seqs(&["--agent", "desk-2", "--kind", "activity"]).await,
        f.seqs_where(|e| e.agent.as_str() == "desk-2" && e.kind().as_str() == "activity")
    );
    assert_eq!(f.seqs(&["--subject", "events.*.chat", "--limit", "2"]).await, all[..2].to_vec());
    assert_eq!(f.seqs(&["--from-seq", "2", "--to-seq", "4"]).await, vec![2, 3, 4]);
    assert_eq!(f.seqs(&["--from-seq", "5", "--kind", "chat"]).await, vec![5]);
    // Time: from the stream time of message 5 on, and up to that of message 3.
    let t5 = f.stream_time(5).await;
    let t3 = f.stream_time(3).await;
    assert_eq!(f.seqs(&["--from", &t5]).await, vec![5, 6]);
    assert_eq!(f.seqs(&["--from", "2000-01-01T00:00", "--until", &t3]).await, vec![1, 2, 3]);
    assert_eq!(f.seqs(&["--since", "1h", "--agent", "desk-2"]).await, vec![3, 5, 6]);
    assert!(f.seqs(&["--from", "2999-01-01"]).await.is_empty());
    // Replies by agent.
    let replies = f.seqs(&["--stream", "REPLIES", "--agent", "desk-1"]).await;
    assert_eq!(replies.len(), 2, "greeting and refund answered desk-1");
    // The printed line is the decoded event.
    let (ok, out, _) = f.ferry(&["replay", "--from-seq", "1", "--limit", "1", "--headers"]).await;
    assert!(ok);
    let line: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(line["data"]["body"]["text"], "hello there");
    assert_eq!(line["headers"][headers::MSG_ID], f.events[0].1.id.to_string());
    // Bad input is named.
    let (ok, _, err) = f.ferry(&["replay", "--kind", "chats"]).await;
    assert!(!ok && err.contains("--kind \"chats\": expected one of"), "{err}");
    let (ok, _, err) = f.ferry(&["replay", "--from", "yesterday"]).await;
    assert!(!ok && err.contains("is not a time"), "{err}");
}

#[tokio::test]
async fn replay_resends_to_a_debug_subject_but_never_into_a_stream() {
    let f = fixture().await;
    let (ok, _, err) = f.ferry(&["replay", "--to", "replies.desk-1"]).await;
    assert!(!ok && err.contains("one of Ferry's streams stores that subject"), "{err}");
    let before = f.messages(topology::EVENTS_STREAM).await;

    let mut debug = f.op.subscribe(subject::replay_debug()).await.unwrap();
    f.op.flush().await.unwrap();
    let (ok, _, err) = f.ferry(&["replay", "--kind", "chat", "--to", subject::replay_debug().as_str(), "--rate", "200"]).await;
    assert!(ok, "{err}");
    assert!(err.contains("sent to debug.replay 4 messages"), "{err}");
    let mut got = Vec::new();
    for _ in 0..4 {
        let m = tokio::time::timeout(Duration::from_secs(10), debug.next()).await.unwrap().unwrap();
        let env = codec::decode_event(&m.payload, Encoding::MsgPack, codec::DEFAULT_MAX_PAYLOAD).unwrap();
        got.push(env.id);
    }
    let chats: Vec<_> = f.events.iter().filter(|(_, e)| e.kind().as_str() == "chat").map(|(_, e)| e.id).collect();
    assert_eq!(got, chats);
    assert_eq!(f.messages(topology::EVENTS_STREAM).await, before);
}

#[tokio::test]
async fn shadow_rules_diff_against_recorded_replies_and_never_reach_agents() {
    let f = fixture().await;
    let (replies, work) = (f.messages(topology::REPLIES_STREAM).await, f.messages(topology::WORK_STREAM).await);
    // Anything on a reply or work subject during the shadow runs is a failure.
    let mut leaked = f.op.subscribe(subject::all_replies()).await.unwrap();
    let mut leaked_work = f.op.subscribe(subject::all_work()).await.unwrap();
    f.op.flush().await.unwrap();

    // The same rules: the same replies.
    let rules = f.rules.path().to_str().unwrap().to_string();
    let (ok, out, err) = f.ferry(&["replay", "--shadow", "rules", "--rules", &rules]).await;
    assert!(ok, "{err}");
    assert!(out.contains("shadow rules: 6 events, 6 same, 0 changed, 0 not handled"), "{out}");

    // A changed greeting and a new rule for orders: exactly those differ.
    let mut next = tempfile::NamedTempFile::new().unwrap();
    let changed = RULES.replace("Hello {sender}!", "Hi {sender}, welcome back!")
        + "\n[[rule]]\nname = \"orders\"\nkeywords = [\"order\"]\naction = \"reply\"\ntemplate = \"Your order is on its way.\"\n";
    std::io::Write::write_all(&mut next, changed.as_bytes()).unwrap();
    let (ok, out, err) = f
        .ferry(&["replay", "--shadow", "rules", "--rules", next.path().to_str().unwrap(), "--run", "try-2"])
        .await;
    assert!(ok, "{err}");
    assert!(out.contains("shadow rules: 6 events, 3 same, 3 changed, 0 not handled"), "{out}");
    assert!(out.contains("Hi Ann, welcome back!"), "{out}");
    assert!(out.contains("hand-off to work.inference.chat (rule"), "{out}");
    assert!(out.contains("Your order is on its way."), "{out}");
    for (_, e) in f.events.iter().filter(|(_, e)| e.kind().as_str() == "chat") {
        let text = match &e.body {
            EventBody::Chat(c) => c.text.as_str(),
            _ => unreachable!(),
        };
        assert_eq!(out.contains(&e.id.to_string()), text != "I want a refund", "{text}: {out}");
    }
    // Only one agent's chats: only those are compared.
    let (ok, out, err) = f
        .ferry(&["replay", "--agent", "desk-1", "--kind", "chat", "--shadow", "rules", "--rules", next.path().to_str().unwrap()])
        .await;
    assert!(ok, "{err}");
    assert!(out.contains("shadow rules: 2 events, 1 same, 1 changed"), "{out}");

    f.op.flush().await.unwrap();
    assert!(leaked.next().now_or_never_is_none(), "a shadow run published on a reply subject");
    assert!(leaked_work.next().now_or_never_is_none(), "a shadow run published on a work subject");
    assert_eq!(f.messages(topology::REPLIES_STREAM).await, replies);
    assert_eq!(f.messages(topology::WORK_STREAM).await, work);
}

#[tokio::test]
async fn trace_follows_an_event_through_its_hops() {
    let f = fixture().await;
    // The greeting: the event, then the rules' reply.
    let hello = &f.events[0].1;
    let (ok, out, err) = f.ferry(&["replay", "--trace", &hello.id.to_string()]).await;
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].contains("EVENTS") && lines[0].contains("events.desk-1.chat"), "{out}");
    assert!(lines[1].contains("REPLIES") && lines[1].contains("Hello Ann!"), "{out}");
    // The unmatched chat: the event, then its hand-off to inference.
    let order = &f.events[2].1;
    let (ok, out, _) = f.ferry(&["replay", "--trace", &order.id.to_string()]).await;
    assert!(ok);
    assert!(out.lines().nth(1).is_some_and(|l| l.contains("WORK") && l.contains("hand-off")), "{out}");
    // An id nobody sent.
    let (ok, _, err) = f.ferry(&["replay", "--trace", &ferry_schema::EventId::new().to_string()]).await;
    assert!(!ok && err.contains("no message of event"), "{err}");
}

/// `next().now_or_never()` on a subscription, as "nothing is waiting".
trait NothingWaiting {
    fn now_or_never_is_none(self) -> bool;
}

impl<F: std::future::Future<Output = Option<async_nats::Message>>> NothingWaiting for F {
    fn now_or_never_is_none(self) -> bool {
        futures::FutureExt::now_or_never(self).is_none()
    }
}

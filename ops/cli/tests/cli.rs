//! The `ferry` command as an operator runs it: `up --once` and idempotent `provision`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::process::Command;
use std::time::Duration;

use async_nats::jetstream;
use ferry_schema::topology;
use ferry_stack::{free_port, NatsServer};

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

/// A data dir for `ferry up`. When tests run as root, PostgreSQL runs as
/// the `postgres` user, which must be able to enter it.
fn data_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[test]
fn migrate_kb_and_down_after_a_killed_up() {
    use std::io::BufRead;
    let dir = data_dir();
    let (port, pg_port) = (free_port().unwrap(), free_port().unwrap());
    let mut up = ferry()
        .args(["up", "--no-inference", "--no-demo", "--data-dir"])
        .arg(dir.path())
        .args(["--port", &port.to_string(), "--monitor-port", &free_port().unwrap().to_string()])
        .args(["--pg-port", &pg_port.to_string()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(up.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.starts_with("ferry: running") {
            break;
        }
    }
    assert!(seen.contains("ferry: archiver running"), "{seen}");
    // The workers are the shipped binary, one process per role, as deployed.
    let worker_pids: Vec<u32> = seen
        .lines()
        .filter(|l| l.starts_with("ferry: ") && l.contains(" running (pid "))
        .map(|l| l.split("(pid ").nth(1).and_then(|r| r.split(',').next()).unwrap().parse().unwrap())
        .collect();
    assert_eq!(worker_pids.len(), 3, "archiver, rules and alerts: {seen}");
    for pid in &worker_pids {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        assert_eq!(exe.file_name().unwrap(), "ferry-worker", "{}", exe.display());
    }
    let db = |args: &[&str]| {
        let out = ferry()
            .args(args)
            .args(["--data-dir"])
            .arg(dir.path())
            .args(["--pg-port", &pg_port.to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let status = db(&["migrate", "--status"]);
    assert_eq!(status.lines().count(), ferry_schema::db::migrations().len(), "{status}");
    assert!(status.lines().all(|l| l.ends_with(": applied")), "{status}");
    assert!(db(&["migrate"]).starts_with("schema up to date"));
    let kb_dir = ferry_harness::cargo::workspace_root().unwrap().join("ops/demo/kb");
    let kb_dir = kb_dir.to_str().unwrap();
    assert_eq!(
        db(&["kb", "import", kb_dir]).trim(),
        format!("6 articles from {kb_dir}: 0 created, 0 updated, 6 unchanged")
    );
    let top = db(&["kb", "search", "退款多久到账"]);
    assert!(top.lines().next().unwrap().contains("refunds"), "{top}");

    // A crash of `ferry up` leaves its workers, broker and database running ...
    up.kill().unwrap();
    up.wait().unwrap();
    assert!(port_open(port) && port_open(pg_port));
    assert!(worker_pids.iter().all(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists()));
    // ... and `ferry down` stops them, the workers before the broker.
    let out = ferry().args(["down", "--data-dir"]).arg(dir.path()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("stopped archiver, rules, alerts, nats-server, PostgreSQL"), "{err}");
    assert!(!port_open(port) && !port_open(pg_port));
    for pid in &worker_pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        assert!(status.is_empty() || status.contains("State:\tZ"), "worker {pid} still runs");
    }
    let again = ferry().args(["down", "--data-dir"]).arg(dir.path()).output().unwrap();
    assert!(String::from_utf8_lossy(&again.stderr).contains("nothing was running"));
    // Without a database URL or a local cluster's password: a clear error.
    let out = ferry().args(["migrate", "--data-dir", "/nonexistent"]).env_remove("DATABASE_URL").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no --database-url (or DATABASE_URL) given"));
}

#[test]
fn up_stops_with_the_workers_log_when_a_worker_cannot_start() {
    // A worker binary that exits at once, as a broken install would.
    let dir = data_dir();
    let fake = dir.path().join("ferry-worker");
    std::fs::write(&fake, "#!/bin/sh\necho \"worker says: cannot start ($*)\" >&2\nexit 3\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (port, pg_port) = (free_port().unwrap(), free_port().unwrap());
    let out = ferry()
        .args(["up", "--no-inference", "--no-demo", "--once", "--data-dir"])
        .arg(dir.path())
        .arg("--worker-bin")
        .arg(&fake)
        .args(["--port", &port.to_string(), "--monitor-port", &free_port().unwrap().to_string()])
        .args(["--pg-port", &pg_port.to_string(), "--metrics-port", "0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("the archiver worker exited at start"), "{err}");
    // The end of its log, with the command line `ferry up` gave it.
    assert!(err.contains("worker says: cannot start (--metrics-listen 127.0.0.1:0 archiver)"), "{err}");
    // What it had started is stopped again.
    assert!(!port_open(port), "nats-server still listens on {port}");
    assert!(!port_open(pg_port), "PostgreSQL still listens on {pg_port}");
}

#[test]
fn up_once_runs_the_whole_demo_pipeline() {
    let dir = data_dir();
    let out = ferry()
        .args(["up", "--once", "--data-dir"])
        .arg(dir.path())
        .args(["--port", &free_port().unwrap().to_string()])
        .args(["--monitor-port", &free_port().unwrap().to_string()])
        .args(["--pg-port", &free_port().unwrap().to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("stream EVENTS: created"), "{stderr}");
    assert!(stderr.contains("0 chats or predictions unanswered"), "{stderr}");
    assert!(stderr.contains("demo knowledge base: 6 articles (6 new)"), "{stderr}");
    // The archive filled as the agent talked: every event and reply of the
    // demo (9 events; 8 replies: 6 chats, an alert, a prediction), its 6 chats
    // and their 6 senders, its assistant's interaction, and each reply as
    // an interaction of Ferry's own.
    assert!(
        stderr.contains(
            "archive: 9 events, 8 replies, 6 chat messages, 6 customers, 6 conversations, 1 interactions reported and 8 of Ferry's own"
        ),
        "{stderr}"
    );
    let replies: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each reply is a JSON line"))
        .collect();
    let chats: Vec<_> = replies.iter().filter(|r| r["kind"] == "chat").collect();
    assert_eq!(chats.len(), 6, "{replies:#?}");
    assert!(chats
        .iter()
        .any(|r| r["body"]["answered_by"]["name"] == "refund" && r["body"]["action"] == "escalate"));
    // Chats no rule matches are answered by the real model.
    let model = chats
        .iter()
        .find(|r| r["body"]["answered_by"]["kind"] == "model")
        .expect("a model reply");
    assert_eq!(model["body"]["answered_by"]["name"], "smollm2");
    assert!(model["body"]["tokens"].as_u64().unwrap() > 0);
    assert!(!model["body"]["content"].as_str().unwrap().trim().is_empty());
    // And the demo's prediction request gets a prediction.
    let prediction = replies.iter().find(|r| r["kind"] == "prediction").expect("a prediction");
    assert_eq!(prediction["body"]["model"], "smollm2");
    // Secrets were generated once, private to the user.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("secrets.env")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test]
async fn provision_is_idempotent_and_reports_changes() {
    let nats = NatsServer::start_temp().unwrap();
    let provision = || {
        let out = ferry()
            .args(["provision", "--server", &nats.url(), "--agent", "desk-1"])
            .args(["--password", &nats.secrets().operator])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let first = provision();
    let all = [
        "stream EVENTS",
        "stream REPLIES",
        "stream WORK",
        "stream DEADLETTER",
        "stream ALERTS",
        "consumer EVENTS/rules",
        "consumer WORK/inference-chat",
        "consumer EVENTS/inference-predict",
        "consumer REPLIES/agent-desk-1",
        "consumer EVENTS/archiver-events",
        "consumer REPLIES/archiver-replies",
        "consumer ALERTS/archiver-alerts",
        "consumer ALERTS/alerts-notify",
    ];
    for what in all {
        assert!(first.contains(&format!("{what}: created")), "{first}");
    }
    let second = provision();
    assert_eq!(second.lines().count(), all.len(), "{second}");
    assert!(second.lines().all(|l| l.ends_with(": unchanged")), "{second}");

    // Someone changed the rules consumer by hand: provision puts it back and says so.
    let js = jetstream::new(nats.operator("t").connect().await.unwrap());
    let mut def = topology::rules_consumer();
    def.config.ack_wait = Duration::from_secs(10);
    topology::ensure_consumer(&js, &def).await.unwrap();
    let third = provision();
    assert!(third.contains("consumer EVENTS/rules: updated (ack_wait: 10s -> 30s)"), "{third}");

    // Wrong password: a clear failure, not a hang.
    let out = ferry()
        .args(["provision", "--server", &nats.url(), "--password", "wrong"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect to NATS at"), "{err}");
}

/// A `REPLIES` stream from before the live replies (no RePublish, which
/// nats-server 2.9 cannot add to a stream) is reported, with what differs.
#[tokio::test]
async fn provision_reports_a_replies_stream_without_republish() {
    let nats = NatsServer::start_temp().unwrap();
    let js = jetstream::new(nats.operator("t").connect().await.unwrap());
    let mut old = topology::replies_stream(&topology::StreamSettings::default());
    old.republish = None;
    js.create_stream(old).await.unwrap();
    let out = ferry()
        .args(["provision", "--server", &nats.url(), "--password", &nats.secrets().operator])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("stream REPLIES exists with different settings the broker would not update (republish: none -> replies.> -> live.replies.>)")
            && err.contains("`nats stream rm REPLIES -f`"),
        "{err}"
    );
}

#[tokio::test]
async fn tap_decodes_live_events_and_dlq_lists_and_redrives() {
    use ferry_schema::event::{ChatMessage, ChatType, MessageType};
    use ferry_schema::{codec, subject, AgentId, Encoding, Envelope, EventBody};
    let nats = NatsServer::start_temp().unwrap();
    let op = nats.operator("t").connect().await.unwrap();
    let js = jetstream::new(op.clone());
    topology::provision(&js, &topology::StreamSettings::default(), &[]).await.unwrap();
    let conn = |cmd: &mut Command| {
        cmd.args(["--server", &nats.url(), "--password", &nats.secrets().operator]);
    };

    // tap: a MessagePack event comes out as its JSON form.
    let mut tap = ferry();
    tap.args(["tap", "events.>", "--count", "1", "--headers"]).stdout(std::process::Stdio::piped());
    conn(&mut tap);
    let tap = tap.spawn().unwrap();
    let env = Envelope::new(
        AgentId::new("desk-1").unwrap(),
        EventBody::Chat(ChatMessage {
            chat: "Alice".into(),
            chat_type: ChatType::Direct,
            sender: "Alice".into(),
            text: "你好 tap".into(),
            msg_type: MessageType::Text,
        }),
    );
    let payload = codec::encode_event(&env, Encoding::MsgPack).unwrap();
    let tapper = tokio::task::spawn_blocking(move || tap.wait_with_output().unwrap());
    // Publish until the tap (which may still be subscribing) has its message.
    for _ in 0..100 {
        op.publish(subject::event(&env.agent, env.kind()), payload.clone().into()).await.unwrap();
        op.flush().await.unwrap();
        if tapper.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = tapper.await.unwrap();
    assert!(out.status.success());
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["subject"], "events.desk-1.chat");
    assert_eq!(line["data"]["body"]["text"], "你好 tap");
    assert_eq!(line["data"]["id"], env.id.to_string());

    // dlq: a rules worker dead-letters a truncated event. (JSON without its
    // Content-Type served here once; a payload starting with `{` is JSON now.)
    let mut rules = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut rules, include_bytes!("../../demo/rules.toml")).unwrap();
    let client = nats.role(topology::Role::Rules, "t").connect().await.unwrap();
    let cfg = ferry_workers::rules::RulesConfig::new(rules.path());
    let stop = tokio_util::sync::CancellationToken::new();
    let token = stop.clone();
    let worker = tokio::spawn(async move { ferry_workers::rules::run(client, &cfg, token).await });
    let truncated = payload[..payload.len() / 2].to_vec();
    js.publish(subject::event(&env.agent, env.kind()), truncated.into()).await.unwrap().await.unwrap();
    let dl = topology::DEADLETTER_STREAM;
    ferry_stack::inspect::wait_for_count(&js, dl, 1, Duration::from_secs(30)).await.unwrap();
    let run = |args: &[&str]| {
        let mut c = ferry();
        c.args(args);
        conn(&mut c);
        let out = c.output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let list = run(&["dlq", "list"]);
    let first = list.lines().next().unwrap();
    assert!(first.contains("malformed") && first.contains("EVENTS/rules") && first.contains("events.desk-1.chat"), "{list}");
    let seq = first.split_whitespace().next().unwrap().to_string();
    assert_eq!(run(&["dlq", "list", "--code", "max_deliver"]).trim(), "no dead letters");
    // Re-driven: back on its subject, out of DEADLETTER, and through the
    // worker again (which dead-letters it again: it is still malformed).
    let events_before = ferry_stack::inspect::count(&js, topology::EVENTS_STREAM).await.unwrap();
    assert!(run(&["dlq", "redrive", "--seq", &seq]).contains(&format!("re-drove {seq} (malformed) to events.desk-1.chat")));
    assert_eq!(ferry_stack::inspect::count(&js, topology::EVENTS_STREAM).await.unwrap(), events_before + 1);
    ferry_stack::inspect::wait_for_count(&js, dl, 1, Duration::from_secs(30)).await.unwrap();
    let again = run(&["dlq", "list"]);
    assert_eq!(again.lines().count(), 1, "{again}");
    assert!(!again.starts_with(&format!("{seq:>6} ")), "the old letter is gone: {again}");
    let mut bad = ferry();
    bad.args(["dlq", "redrive"]);
    conn(&mut bad);
    let err = bad.output().unwrap();
    assert!(String::from_utf8_lossy(&err.stderr).contains("say which dead letters"));
    stop.cancel();
    worker.await.unwrap().unwrap();
}

/// A rules worker, as the `rules` user, answering every chat "echo": the
/// rules file (keep it while the worker runs), its stop token and its task.
async fn echo_rules_worker(
    nats: &NatsServer,
) -> (
    tempfile::NamedTempFile,
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<Result<(), String>>,
) {
    let mut rules = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut rules, b"[[rule]]\nname = \"echo\"\naction = \"reply\"\ntemplate = \"echo\"\n").unwrap();
    let client = nats.role(topology::Role::Rules, "t").connect().await.unwrap();
    let cfg = ferry_workers::rules::RulesConfig::new(rules.path());
    let stop = tokio_util::sync::CancellationToken::new();
    let token = stop.clone();
    let worker = tokio::spawn(async move {
        ferry_workers::rules::run(client, &cfg, token).await.map(|_| ()).map_err(|e| e.to_string())
    });
    (rules, stop, worker)
}

/// A body larger than a dead letter keeps (a flooder's junk) is stored in
/// DEADLETTER as its first bytes and its size, not a full copy; a re-drive
/// reads the whole original back from EVENTS.
#[tokio::test]
async fn a_large_dead_letter_keeps_an_excerpt_and_redrives_the_whole_original() {
    let nats = NatsServer::start_temp().unwrap();
    let js = jetstream::new(nats.operator("t").connect().await.unwrap());
    topology::provision(&js, &topology::StreamSettings::default(), &[]).await.unwrap();
    let (_rules, stop, worker) = echo_rules_worker(&nats).await;

    let junk: Vec<u8> = (0..300 * 1024).map(|i| (i % 251) as u8).collect();
    js.publish("events.desk-1.chat", junk.clone().into()).await.unwrap().await.unwrap();
    let dl = topology::DEADLETTER_STREAM;
    ferry_stack::inspect::wait_for_count(&js, dl, 1, Duration::from_secs(30)).await.unwrap();
    stop.cancel();
    worker.await.unwrap().unwrap();
    let letter = &ferry_stack::inspect::read_all(&js, dl, "").await.unwrap()[0];
    assert_eq!(letter.payload.len(), ferry_schema::deadletter::EXCERPT_BYTES);
    assert_eq!(&letter.payload[..], &junk[..letter.payload.len()]);
    let h = letter.headers.as_ref().unwrap();
    assert_eq!(h.get(ferry_schema::headers::DEAD_PAYLOAD_BYTES).unwrap().as_str(), (300 * 1024).to_string());

    let out = ferry()
        .args(["dlq", "redrive", "--code", h.get(ferry_schema::headers::DEAD_REASON_CODE).unwrap().as_str()])
        .args(["--server", &nats.url(), "--password", &nats.secrets().operator])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let events = ferry_stack::inspect::read_all(&js, topology::EVENTS_STREAM, "").await.unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(&events[1].payload[..], &junk[..], "the whole original went back");
}

#[tokio::test]
async fn stats_match_what_was_published_and_consumed() {
    use ferry_schema::event::Heartbeat;
    use ferry_schema::{codec, subject, AgentId, Encoding, Envelope, EventBody};
    let nats = NatsServer::start_temp().unwrap();
    let op = nats.operator("t").connect().await.unwrap();
    let js = jetstream::new(op.clone());
    topology::provision(&js, &topology::StreamSettings::default(), &[AgentId::new("desk-1").unwrap()]).await.unwrap();
    let (_rules, stop, worker) = echo_rules_worker(&nats).await;

    let chat = |text: &str| {
        Envelope::new(
            AgentId::new("desk-1").unwrap(),
            EventBody::Chat(ferry_schema::event::ChatMessage {
                chat: "A".into(),
                chat_type: Default::default(),
                sender: "A".into(),
                text: text.into(),
                msg_type: Default::default(),
            }),
        )
    };
    let hb = Envelope::new(
        AgentId::new("desk-2").unwrap(),
        EventBody::Heartbeat(Heartbeat {
            version: "1".into(),
            cpu_percent: 0.0,
            rss_bytes: 0,
            spool_depth: 0,
            oldest_unsent_ms: None,
            components: vec![],
        }),
    );
    for e in [chat("a"), chat("b"), hb.clone()] {
        let p = codec::encode_event(&e, Encoding::MsgPack).unwrap();
        js.publish(subject::event(&e.agent, e.kind()), p.into()).await.unwrap().await.unwrap();
    }
    ferry_stack::inspect::wait_for_count(&js, topology::REPLIES_STREAM, 2, Duration::from_secs(30)).await.unwrap();
    // The rules consumer has acked all three (the heartbeat without a reply).
    let start = std::time::Instant::now();
    let text = loop {
        // Off the test's runtime thread: the rules worker on it must answer.
        let mut cmd = ferry();
        cmd.args(["stats", "--server", &nats.url(), "--password", &nats.secrets().operator]);
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        if text.contains(" done         3") || start.elapsed() > Duration::from_secs(20) {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let line = |prefix: &str| text.lines().find(|l| l.trim_start().starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix:?} in\n{text}")).to_string();
    assert!(line("EVENTS").contains(" 3 msgs"), "{text}");
    assert!(line("REPLIES").contains(" 2 msgs"), "{text}");
    assert!(line("rules ").contains("pending        0  ack pending      0"), "{text}");
    assert!(line("agent-desk-1").contains("pending        2"), "replies wait for the agent: {text}");
    assert!(text.contains("workers online: 1"), "{text}");
    let rules_line = line("ferry-rules");
    assert!(rules_line.contains(" done         3") && rules_line.contains("poisoned     0"), "{text}");
    assert!(text.contains("agents with heartbeats: 1"), "{text}");
    assert!(line("desk-2").contains(&format!("last heartbeat {}", hb.ts.to_rfc3339())), "{text}");
    stop.cancel();
    worker.await.unwrap().unwrap();
}

/// `ferry bench rules` runs end to end on its own brokers and reports both
/// verdicts. A smoke run, tiny on purpose: no number it prints is judged
/// here (timed assertions do not belong in tests), only that every
/// scenario answered all its events and the ratios were computed.
#[test]
fn bench_rules_runs_both_paths_and_prints_the_verdicts() {
    let out = ferry()
        .args(["bench", "rules", "--events", "300", "--repeat", "1", "--decompose"])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for line in [
        "| (a) raw JetStream round trip | full |",
        "| (b) agent + rules worker | full |",
        "| (b) agent + rules worker | half (",
        "throughput (b)/(a) at full rate: ",
        "p99 latency (b)/(a) at half rate: ",
        "(w) vs (a): throughput ",
    ] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }
    // A ratio is a number, whatever it is: an unmeasured side would print NaN or inf.
    let ratio = stdout
        .lines()
        .find_map(|l| l.strip_prefix("throughput (b)/(a) at full rate: "))
        .and_then(|rest| rest.split('x').next())
        .and_then(|r| r.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    assert!(ratio.is_finite() && ratio > 0.0, "{stdout}");
}

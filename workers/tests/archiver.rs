//! The archiver against a real nats-server and a real PostgreSQL: exactly once, through replays, crashes and outages.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{chat, publish, publish_by_hand, stack, Stack, RULES};
use ferry_schema::event::{Activity, Heartbeat, Interaction};
use ferry_schema::topology::{self, DEADLETTER_STREAM};
use ferry_schema::{headers, subject, AgentId, Encoding, Envelope, EventBody, EventId};
use ferry_stack::{inspect, PgServer};
use ferry_workers::archiver::retention::{self, Removed, Retention};
use ferry_workers::archiver::{self, ArchiverConfig};
use ferry_workers::runtime::Stats;
use ferry_workers::state;
use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(90);

struct Db {
    pg: PgServer,
}

async fn db() -> Db {
    // Logs of the in-process workers show up in a failing test's output.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let pg = tokio::task::spawn_blocking(PgServer::start_temp).await.unwrap().expect("PostgreSQL starts");
    let mut c = state::connect_one(&pg.url()).await.unwrap();
    ferry_schema::db::migrate(&mut c, None).await.unwrap();
    Db { pg }
}

impl Db {
    async fn client(&self) -> tokio_postgres::Client {
        state::connect_one(&self.pg.url()).await.unwrap()
    }

    async fn count(&self, sql: &str) -> i64 {
        self.client().await.query_one(sql, &[]).await.unwrap().get(0)
    }

    async fn ids(&self, sql: &str) -> HashSet<Uuid> {
        self.client().await.query(sql, &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
    }

    /// Waits until `sql` (a count) reaches `n`, then checks it stays there.
    async fn wait_count(&self, sql: &str, n: i64) {
        let start = Instant::now();
        loop {
            let got = match state::connect_one(&self.pg.url()).await {
                Ok(c) => c.query_one(sql, &[]).await.map(|r| r.get::<_, i64>(0)).unwrap_or(-1),
                Err(_) => -1,
            };
            if got == n {
                return;
            }
            assert!(got <= n, "{sql}: {got} rows, more than the {n} published");
            assert!(start.elapsed() < WAIT, "{sql}: {got} of {n} rows after {WAIT:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

struct Archiver {
    stop: CancellationToken,
    task: JoinHandle<Result<Arc<Stats>, archiver::RunError>>,
}

impl Archiver {
    async fn stop(self) -> Arc<Stats> {
        self.stop.cancel();
        self.task.await.unwrap().unwrap()
    }
}

async fn archiver(s: &Stack, db: &Db) -> Archiver {
    archiver_with(s, db, |_| {}).await
}

async fn archiver_with(s: &Stack, db: &Db, tweak: impl FnOnce(&mut ArchiverConfig)) -> Archiver {
    let client = s.nats.role(topology::Role::Archiver, "test-archiver").connect().await.unwrap();
    let mut cfg = ArchiverConfig::new(db.pg.url());
    cfg.batch.backoff_max = Duration::from_millis(500);
    tweak(&mut cfg);
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move { archiver::run(client, &cfg, token).await });
    Archiver { stop, task }
}

fn activity(agent: &str, i: usize) -> Envelope {
    Envelope::new(
        AgentId::new(agent).unwrap(),
        EventBody::Activity(Activity {
            app: "excel.exe".into(),
            title: format!("Book{i}.xlsx"),
            exe: None,
            pid: Some(42),
            site: None,
            afk: false,
            duration_ms: 1000 + i as u64,
        }),
    )
}

fn heartbeat(agent: &str) -> Envelope {
    Envelope::new(
        AgentId::new(agent).unwrap(),
        EventBody::Heartbeat(Heartbeat {
            version: "0.1.0".into(),
            cpu_percent: 1.0,
            rss_bytes: 1 << 20,
            spool_depth: 0,
            oldest_unsent_ms: None,
            components: vec![],
        }),
    )
}

/// `n` events over two agents: every third a chat (the rules worker answers
/// it), the rest activities, plus one heartbeat each.
fn mixed(n: usize) -> Vec<Envelope> {
    let mut v: Vec<Envelope> = (0..n)
        .map(|i| {
            let agent = if i.is_multiple_of(2) { "desk-1" } else { "desk-2" };
            if i % 3 == 0 {
                let mut e = chat(agent, &format!("message {i}"));
                if let EventBody::Chat(c) = &mut e.body {
                    c.sender = format!("customer-{}", i % 7);
                }
                e
            } else {
                activity(agent, i)
            }
        })
        .collect();
    v.push(heartbeat("desk-1"));
    v.push(heartbeat("desk-2"));
    v
}

async fn publish_all(s: &Stack, events: &[Envelope], enc: Encoding, msg_id: bool) {
    futures::stream::iter(events.iter())
        .map(|e| publish(&s.js, e, enc, msg_id))
        .buffer_unordered(128)
        .collect::<Vec<_>>()
        .await;
}

fn chats(events: &[Envelope]) -> usize {
    events.iter().filter(|e| matches!(e.body, EventBody::Chat(_))).count()
}

async fn consumer_info(s: &Stack, def: &topology::ConsumerDef) -> async_nats::jetstream::consumer::Info {
    s.js.get_stream(def.stream)
        .await
        .unwrap()
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>(def.name())
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone()
}

async fn consumer_drained(s: &Stack, def: &topology::ConsumerDef) {
    let start = Instant::now();
    loop {
        let info = consumer_info(s, def).await;
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            return;
        }
        assert!(start.elapsed() < WAIT, "{} not drained: {info:?}", def.name());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn every_event_and_reply_stored_once_across_replays() {
    let s = stack(RULES, Duration::from_secs(30)).await;
    let db = db().await;
    let _rules = s.replica(64).await;
    let a = archiver(&s, &db).await;

    let events = mixed(1500);
    let n = events.len() as i64;
    let n_chats = chats(&events) as i64;
    // Half in each encoding.
    let (js_half, mp_half) = events.split_at(events.len() / 2);
    publish_all(&s, js_half, Encoding::Json, true).await;
    publish_all(&s, mp_half, Encoding::MsgPack, true).await;

    db.wait_count("SELECT count(*) FROM events", n).await;
    db.wait_count("SELECT count(*) FROM replies", n_chats).await;
    let want: HashSet<Uuid> = events.iter().map(|e| e.id.0).collect();
    assert_eq!(db.ids("SELECT id FROM events").await, want);
    assert_eq!(db.count("SELECT count(*) FROM chat_messages").await, n_chats);
    assert_eq!(
        db.count("SELECT count(*) FROM interactions WHERE reported_by = 'ferry' AND 'rule' = ANY(tools_used) AND success").await,
        n_chats,
        "each rules reply is also Ferry's own interaction"
    );
    assert_eq!(db.count("SELECT count(*) FROM activities").await, n - n_chats - 2);
    assert_eq!(db.count("SELECT count(*) FROM agents WHERE last_heartbeat IS NOT NULL AND version = '0.1.0'").await, 2);
    assert_eq!(db.count("SELECT count(*) FROM customers").await, 14, "7 senders on each of 2 agents");
    assert_eq!(
        db.count("SELECT count(*) FROM replies r JOIN chat_messages m ON m.event_id = r.in_reply_to").await,
        n_chats,
        "every reply links to the chat it answers"
    );

    // The same events again without Nats-Msg-Id (so the stream stores them
    // a second time), and a full replay of both streams from the start.
    publish_all(&s, &events[..300], Encoding::MsgPack, false).await;
    a.stop().await;
    for def in [topology::archiver_events_consumer(), topology::archiver_replies_consumer()] {
        s.js.get_stream(def.stream).await.unwrap().delete_consumer(def.name()).await.unwrap();
        topology::ensure_consumer(&s.js, &def).await.unwrap();
    }
    let a = archiver(&s, &db).await;
    for def in [topology::archiver_events_consumer(), topology::archiver_replies_consumer()] {
        consumer_drained(&s, &def).await;
    }
    let stats = a.stop().await;
    assert!(stats.snapshot().done as i64 >= n + 300 + n_chats, "the replay went through: {:?}", stats.snapshot());
    assert_eq!(db.count("SELECT count(*) FROM events").await, n);
    // The rules worker answered the re-sent chats again, under the same
    // reply ids: REPLIES dropped those copies, and the archive has one each.
    assert_eq!(db.count("SELECT count(*) FROM replies").await, n_chats);
    assert_eq!(db.count("SELECT count(*) FROM chat_messages").await, n_chats);
    assert_eq!(db.count("SELECT count(*) FROM interactions WHERE reported_by = 'ferry'").await, n_chats);
    assert_eq!(db.count("SELECT count(*) FROM customers").await, 14);
    assert_eq!(inspect::count(&s.js, DEADLETTER_STREAM).await.unwrap(), 0);
}

fn interaction(agent: &str, i: usize) -> Envelope {
    let failed = i.is_multiple_of(4);
    Envelope::new(
        AgentId::new(agent).unwrap(),
        EventBody::Interaction(Interaction {
            session_id: format!("s-{}", i % 3),
            user_input: format!("question {i}"),
            intent: Some(if i.is_multiple_of(2) { "refund" } else { "order_status" }.into()),
            tools_used: if i.is_multiple_of(5) { vec![] } else { vec!["orders.lookup".into(), "kb.search".into()] },
            response_time_ms: 100.0 + i as f64,
            success: !failed,
            error_type: failed.then(|| "timeout".into()),
            model: Some("smollm2".into()),
            tokens: Some(10 + i as u32),
        }),
    )
}

/// Interactions land in their own table, queryable by session, intent,
/// tool and error type; events typed by hand (`nats pub`, no headers, no
/// id) are archived under the id made from their place in `EVENTS`, so a
/// replay of the stream stores nothing twice.
#[tokio::test]
async fn interactions_and_hand_typed_events_are_archived_once() {
    let s = stack(RULES, Duration::from_secs(30)).await;
    let db = db().await;
    let _rules = s.replica(16).await;
    let a = archiver(&s, &db).await;

    let events: Vec<Envelope> = (0..20).map(|i| interaction(if i % 2 == 0 { "desk-1" } else { "desk-2" }, i)).collect();
    let (json, msgpack) = events.split_at(10);
    publish_all(&s, json, Encoding::Json, true).await;
    publish_all(&s, msgpack, Encoding::MsgPack, true).await;
    let typed = publish_by_hand(
        &s.op,
        &s.js,
        "events.desk-2.interaction",
        r#"{"body": {"session_id": "by-hand", "response_time_ms": 2500, "success": false, "error_type": "tool_error", "tools_used": ["kb.search"]}}"#,
    )
    .await;
    let chat_id = publish_by_hand(&s.op, &s.js, "events.desk-2.chat", r#"{"body": {"chat": "Bo", "sender": "Bo", "text": "hi"}}"#).await;

    db.wait_count("SELECT count(*) FROM events", 22).await;
    db.wait_count("SELECT count(*) FROM replies", 1).await;
    // 21 reported by assistants, and the rules' reply to the chat as Ferry's own.
    db.wait_count("SELECT count(*) FROM interactions", 22).await;
    assert_eq!(db.count("SELECT count(*) FROM interactions WHERE reported_by = 'assistant'").await, 21);
    assert_eq!(db.count("SELECT count(*) FROM interactions WHERE session_id = 's-0'").await, 7);
    assert_eq!(db.count("SELECT count(*) FROM interactions WHERE intent = 'refund'").await, 10);
    assert_eq!(db.count("SELECT count(*) FROM interactions WHERE 'kb.search' = ANY(tools_used)").await, 17);
    assert_eq!(db.count("SELECT count(*) FROM interactions WHERE error_type = 'timeout' AND NOT success").await, 5);
    assert_eq!(db.count("SELECT count(*) FROM interactions WHERE cardinality(tools_used) = 0").await, 4);
    let row = db
        .client()
        .await
        .query_one("SELECT id, agent, error_type, response_time_ms, user_input FROM interactions WHERE session_id = 'by-hand'", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, Uuid>(0), typed.0);
    assert_eq!(row.get::<_, &str>(1), "desk-2");
    assert_eq!(row.get::<_, &str>(2), "tool_error");
    assert_eq!(row.get::<_, f64>(3), 2500.0);
    assert_eq!(row.get::<_, &str>(4), "", "user_input left out is empty");
    // The hand-typed chat's reply points at the same derived id.
    assert_eq!(db.count(&format!("SELECT count(*) FROM replies WHERE in_reply_to = '{chat_id}'")).await, 1);
    assert_eq!(db.count(&format!("SELECT count(*) FROM chat_messages WHERE event_id = '{chat_id}'")).await, 1);

    // A full replay of EVENTS: every consumer derives the same ids again.
    a.stop().await;
    let def = topology::archiver_events_consumer();
    s.js.get_stream(def.stream).await.unwrap().delete_consumer(def.name()).await.unwrap();
    topology::ensure_consumer(&s.js, &def).await.unwrap();
    let a = archiver(&s, &db).await;
    consumer_drained(&s, &def).await;
    a.stop().await;
    assert_eq!(db.count("SELECT count(*) FROM events").await, 22);
    assert_eq!(db.count("SELECT count(*) FROM interactions").await, 22);
    assert_eq!(inspect::count(&s.js, DEADLETTER_STREAM).await.unwrap(), 0);
}

/// A backlog far larger than one subscription holds (8192 messages), taken
/// with the archiver's default 8192 in flight: it pulls in batches the
/// subscription can hold, so no message is dropped in the client and
/// redelivered after `ack_wait`.
#[tokio::test]
async fn a_large_backlog_is_archived_without_redeliveries() {
    let s = stack(RULES, Duration::from_secs(30)).await;
    let db = db().await;
    let events: Vec<Envelope> = (0..20_000).map(|i| activity("desk-1", i)).collect();
    publish_all(&s, &events, Encoding::MsgPack, true).await;
    let a = archiver(&s, &db).await;
    let def = topology::archiver_events_consumer();
    consumer_drained(&s, &def).await;
    a.stop().await;
    let info = consumer_info(&s, &def).await;
    // Every delivery counts in the consumer sequence, redeliveries too.
    assert_eq!(
        info.delivered.consumer_sequence, 20_000,
        "messages were dropped and delivered again: {info:?}"
    );
    assert_eq!(db.count("SELECT count(*) FROM events").await, 20_000);
    assert_eq!(db.count("SELECT count(*) FROM activities").await, 20_000);
}

#[tokio::test]
async fn killed_archiver_process_loses_and_doubles_nothing() {
    let s = stack(RULES, Duration::from_secs(30)).await;
    let db = db().await;
    // Short ack_wait: what the killed process held (committed or not) comes back quickly.
    for mut def in [topology::archiver_events_consumer(), topology::archiver_replies_consumer()] {
        def.config.ack_wait = Duration::from_secs(2);
        topology::ensure_consumer(&s.js, &def).await.unwrap();
    }
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_ferry-worker"))
            .args(["--server", &s.nats.url(), "--user", "archiver"])
            .args(["--password", s.nats.secrets().role(topology::Role::Archiver)])
            .args(["archiver", "--batch-rows", "50", "--database-url", &db.pg.url()])
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("ferry-worker starts")
    };
    let mut victim = spawn();
    let events: Vec<Envelope> = (0..4000).map(|i| activity("desk-1", i)).collect();
    publish_all(&s, &events, Encoding::MsgPack, true).await;
    // Kill it mid-run: some batches committed but not acked, some in flight.
    let start = Instant::now();
    while db.count("SELECT count(*) FROM events").await < 500 {
        assert!(start.elapsed() < WAIT, "archiver made no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    victim.kill().unwrap();
    victim.wait().unwrap();
    let mut survivor = spawn();
    db.wait_count("SELECT count(*) FROM events", 4000).await;
    db.wait_count("SELECT count(*) FROM activities", 4000).await;
    consumer_drained(&s, &topology::archiver_events_consumer()).await;
    let info = s
        .js
        .get_stream(topology::EVENTS_STREAM)
        .await
        .unwrap()
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>("archiver-events")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    // Every delivery bumps the consumer sequence; more deliveries than
    // messages means the kill forced redeliveries.
    assert!(
        info.delivered.consumer_sequence > info.delivered.stream_sequence,
        "the kill forced redeliveries: {:?}",
        info.delivered
    );
    let want: HashSet<Uuid> = events.iter().map(|e| e.id.0).collect();
    assert_eq!(db.ids("SELECT id FROM events").await, want);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(survivor.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(survivor.wait().unwrap().success());
}

#[tokio::test]
async fn postgres_outage_under_load_loses_nothing() {
    let s = stack(RULES, Duration::from_secs(30)).await;
    let mut db = db().await;
    let a = archiver(&s, &db).await;
    let events: Vec<Envelope> = (0..6000).map(|i| activity(if i % 2 == 0 { "desk-1" } else { "desk-2" }, i)).collect();
    let (first, rest) = events.split_at(2000);
    publish_all(&s, first, Encoding::MsgPack, true).await;
    // Stop the database the hard way while events keep arriving.
    let js = s.js.clone();
    let rest_owned = rest.to_vec();
    let publisher = tokio::spawn(async move {
        for chunk in rest_owned.chunks(200) {
            let sends = chunk.iter().cloned().map(|e| {
                let js = js.clone();
                async move { publish(&js, &e, Encoding::MsgPack, true).await }
            });
            futures::future::join_all(sends).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    db.pg.kill();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let held = inspect::count(&s.js, topology::EVENTS_STREAM).await.unwrap();
    assert!(held > 2000, "events kept arriving during the outage");
    db.pg.restart().unwrap();
    publisher.await.unwrap();
    db.wait_count("SELECT count(*) FROM events", 6000).await;
    consumer_drained(&s, &topology::archiver_events_consumer()).await;
    let want: HashSet<Uuid> = events.iter().map(|e| e.id.0).collect();
    assert_eq!(db.ids("SELECT id FROM events").await, want);
    assert_eq!(db.count("SELECT count(*) FROM activities").await, 6000);
    assert_eq!(inspect::count(&s.js, DEADLETTER_STREAM).await.unwrap(), 0, "an outage poisons nothing");
    let stats = a.stop().await.snapshot();
    assert_eq!(stats.poisoned, 0, "{stats:?}");
}

#[tokio::test]
async fn unstorable_and_undecodable_messages_go_to_dead_letters() {
    let s = stack(RULES, Duration::from_secs(30)).await;
    let db = db().await;
    let a = archiver(&s, &db).await;
    // PostgreSQL's jsonb refuses U+0000; the events around it are stored.
    let good: Vec<Envelope> = (0..20).map(|i| activity("desk-1", i)).collect();
    let bad = chat("desk-1", "nul \u{0} inside");
    let mut all = good.clone();
    all.insert(10, bad.clone());
    for e in &all {
        publish(&s.js, e, Encoding::Json, true).await;
    }
    // Not an event at all.
    s.js.publish(subject::event(&AgentId::new("desk-2").unwrap(), ferry_schema::EventKind::Chat), "{not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    db.wait_count("SELECT count(*) FROM events", 20).await;
    let dead_letters = archiver_dead_letters(&s, 2).await;
    let mut codes: Vec<&str> = dead_letters.iter().map(|(c, _)| c.as_str()).collect();
    codes.sort();
    assert_eq!(codes, ["malformed", "unstorable"], "{dead_letters:?}");
    let unstorable = &dead_letters.iter().find(|(c, _)| c == "unstorable").unwrap().1;
    assert!(unstorable.contains("22P05"), "PostgreSQL's reason is kept: {unstorable}");
    assert_eq!(db.count("SELECT count(*) FROM events").await, 20);
    assert_eq!(a.stop().await.snapshot().poisoned, 2);
}

/// The archiver's dead letters as (code, reason), once there are `n` (or
/// after [`WAIT`]).
async fn archiver_dead_letters(s: &Stack, n: usize) -> Vec<(String, String)> {
    let start = Instant::now();
    loop {
        let letters: Vec<(String, String)> = inspect::read_all(&s.js, DEADLETTER_STREAM, "")
            .await
            .unwrap()
            .into_iter()
            .filter(|m| m.subject.as_str() == subject::dead_letter(topology::EVENTS_STREAM, "archiver-events").as_str())
            .map(|m| {
                let h = m.headers.unwrap();
                (h.get(headers::DEAD_REASON_CODE).unwrap().to_string(), h.get(headers::DEAD_REASON).unwrap().to_string())
            })
            .collect();
        if letters.len() >= n || start.elapsed() > WAIT {
            return letters;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A chat whose sender is 1,500 random CJK characters is too long for the
/// customers' index: PostgreSQL answers SQLSTATE 54000. That was taken for
/// an outage, so the archiver retried the batch for ever and every later
/// event waited behind it. Now the batch is split until the bad row stands
/// alone; it goes to dead letters with PostgreSQL's message, the rest commit.
#[tokio::test]
async fn a_value_too_long_for_an_index_is_dead_lettered_and_the_rest_commit() {
    let s = stack(RULES, Duration::from_secs(30)).await;
    let db = db().await;
    let a = archiver(&s, &db).await;
    let mut bad = chat("desk-1", "hello");
    // Random, so PostgreSQL cannot compress the key under the index's limit.
    let mut x: u32 = 12345;
    let sender: String = (0..1500)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            char::from_u32(0x4E00 + (x >> 8) % 0x5000).unwrap()
        })
        .collect();
    match &mut bad.body {
        EventBody::Chat(c) => c.sender = sender,
        _ => unreachable!(),
    }
    let mut all: Vec<Envelope> = (0..30).map(|i| activity("desk-1", i)).collect();
    all.extend((0..5).map(|i| chat("desk-2", &format!("after {i}"))));
    all.insert(17, bad);
    publish_all(&s, &all, Encoding::MsgPack, true).await;
    db.wait_count("SELECT count(*) FROM events", 35).await;
    let dead = archiver_dead_letters(&s, 1).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, "unstorable");
    assert!(dead[0].1.contains("54000"), "PostgreSQL's reason is kept: {}", dead[0].1);
    assert_eq!(db.count("SELECT count(*) FROM customers").await, 1, "the good chats' customer is stored");
    let stats = a.stop().await.snapshot();
    assert_eq!(stats.poisoned, 1, "{stats:?}");
}

/// `e`, made `days_ago` days ago: its UUIDv7 id and its `ts` both from then.
fn aged(mut e: Envelope, days_ago: i64) -> Envelope {
    let at = chrono::Utc::now() - chrono::TimeDelta::days(days_ago);
    let secs = u64::try_from(at.timestamp()).unwrap();
    e.id = EventId(Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, secs, at.timestamp_subsec_nanos())));
    e.ts = at;
    e
}

async fn exists(db: &Db, table: &str) -> bool {
    db.client().await.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table]).await.unwrap().get(0)
}

/// Retention drops whole days: the partitions of the days older than a
/// table keeps go, with exactly the rows they held; rows whose day had no
/// partition are deleted by age; one replica acts at a time; and the
/// archiver's own upkeep does it on its schedule, leaving today's rows (in
/// today's partitions, made at start) and the chat history.
#[tokio::test]
async fn retention_drops_the_days_a_table_no_longer_keeps() {
    let s = stack(RULES, Duration::from_secs(30)).await;
    let db = db().await;
    let _rules = s.replica(16).await;
    let c = db.client().await;
    let today = chrono::Utc::now().date_naive();
    let day = |ago: i64| (today - chrono::TimeDelta::days(ago)).format("%Y%m%d").to_string();
    // The partitions that the archivers of 45 and 40 days ago made.
    for ago in [45, 40] {
        retention::make_partitions(&c, today - chrono::TimeDelta::days(ago)).await.unwrap();
    }
    let a = archiver_with(&s, &db, |cfg| cfg.retention = None).await;

    let mut events = Vec::new();
    for (ago, n) in [(45, 4), (40, 3), (0, 5)] {
        for i in 0..n {
            events.push(aged(chat("desk-1", &format!("{ago} days ago, chat {i}")), ago));
            events.push(aged(interaction("desk-2", i), ago));
        }
    }
    // An id that is not a UUIDv7: its "day" has no partition.
    let mut stray = chat("desk-2", "stray");
    stray.id = EventId(Uuid::new_v4());
    events.push(stray.clone());
    publish_all(&s, &events, Encoding::MsgPack, true).await;
    db.wait_count("SELECT count(*) FROM events", 25).await;
    db.wait_count("SELECT count(*) FROM replies", 13).await;
    // 12 reported by the assistant, and the 13 rule replies as Ferry's own.
    db.wait_count("SELECT count(*) FROM interactions", 25).await;
    assert_eq!(db.count("SELECT count(*) FROM events_default").await, 1, "only the stray lacks a partition");
    assert_eq!(db.count("SELECT count(*) FROM replies_default").await, 1);
    assert_eq!(db.count(&format!("SELECT count(*) FROM events_p{}", day(0))).await, 10, "today's rows in today's partition");
    c.execute("UPDATE events SET archived_at = now() - interval '50 days' WHERE id = $1", &[&stray.id.0]).await.unwrap();
    c.execute("UPDATE replies SET archived_at = now() - interval '50 days' WHERE in_reply_to = $1", &[&stray.id.0])
        .await
        .unwrap();
    for ago in [100, 10] {
        c.execute(
            "INSERT INTO alerts (id, rule, check_kind, scope_kind, scope_value, state, ts, value, threshold, message,
                                 trigger_seq, stream_seq)
             VALUES (gen_random_uuid(), 'errors', 'error_rate', 'all', '', 'firing', now() - $1 * interval '1 day',
                     50, 10, 'm', 1, 1)",
            &[&f64::from(ago)],
        )
        .await
        .unwrap();
    }

    // While another replica applies it, this one skips the pass.
    let other = db.client().await;
    other.execute("SELECT pg_advisory_lock($1)", &[&retention::RETENTION_LOCK]).await.unwrap();
    let keep42 = Retention::parse("events=42,replies=42,interactions=42").unwrap().unwrap();
    assert_eq!(retention::apply(&c, &keep42, chrono::Utc::now()).await.unwrap(), None);
    drop(other);

    let removed = loop {
        // The lock goes with the other connection's session, shortly.
        if let Some(r) = retention::apply(&c, &keep42, chrono::Utc::now()).await.unwrap() {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The archiver of 45 days ago made the partitions of days 46 to 43
    // ago (the day before to two days after): all older than 42 days.
    let mut partitions = Vec::new();
    for (table, rows) in [("events", 8), ("replies", 4), ("interactions", 4)] {
        for ago in [46, 45, 44, 43] {
            partitions.push((format!("{table}_p{}", day(ago)), if ago == 45 { rows } else { 0 }));
        }
    }
    let want = Removed {
        partitions,
        rows: vec![("events_default".into(), 1), ("replies_default".into(), 1), ("alerts".into(), 1)],
    };
    assert_eq!(removed, want);
    assert!(!exists(&db, &format!("events_p{}", day(45))).await);
    assert_eq!(db.count("SELECT count(*) FROM events").await, 25 - 8 - 1);
    assert_eq!(db.count("SELECT count(*) FROM alerts").await, 1);

    // The archiver's upkeep, with the default retention (30 days), drops
    // the day 40 days ago by itself.
    a.stop().await;
    let a = archiver_with(&s, &db, |cfg| cfg.upkeep_every = Duration::from_millis(200)).await;
    let start = Instant::now();
    while exists(&db, &format!("interactions_p{}", day(40))).await {
        assert!(start.elapsed() < WAIT, "the upkeep did not drop the partitions of 40 days ago");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!exists(&db, &format!("events_p{}", day(40))).await);
    assert!(!exists(&db, &format!("replies_p{}", day(40))).await);
    assert_eq!(db.count("SELECT count(*) FROM events").await, 10);
    assert_eq!(db.count("SELECT count(*) FROM replies").await, 5);
    // Today's 5 from the assistant, and Ferry's 13 (stamped when answered).
    assert_eq!(db.count("SELECT count(*) FROM interactions").await, 18);
    assert_eq!(db.count("SELECT count(*) FROM chat_messages").await, 13, "chat history is not the events' to drop");
    let again = retention::apply(&c, &Retention::default(), chrono::Utc::now()).await.unwrap();
    assert_eq!(again.map(|r| r.total()), Some(0), "a second pass finds nothing more");
    a.stop().await;
}

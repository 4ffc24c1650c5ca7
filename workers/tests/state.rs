//! The PostgreSQL state against a real server: migrations, customers, conversation context, knowledge base.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use ferry_schema::codec;
use ferry_schema::db::{self, SchemaError};
use ferry_schema::event::{ChatMessage, ChatType, MessageType};
use ferry_schema::reply::{AnsweredBy, ChatAction, ChatReply, ResponderKind};
use ferry_schema::{AgentId, Envelope, EventBody, Reply, ReplyBody};
use ferry_stack::PgServer;
use ferry_workers::archiver::batch::Sink;
use ferry_workers::archiver::rows::{EventRow, EventSink, ReplyRow, ReplySink};
use ferry_workers::state::conversations::{self, Speaker};
use ferry_workers::state::{self, customers, kb};

async fn server() -> PgServer {
    tokio::task::spawn_blocking(PgServer::start_temp).await.unwrap().expect("PostgreSQL starts")
}

async fn migrated(pg: &PgServer) -> tokio_postgres::Client {
    let mut c = state::connect_one(&pg.url()).await.unwrap();
    db::migrate(&mut c, None).await.unwrap();
    c
}

/// Tables, columns, indexes and constraints of the public schema, as text.
async fn schema_of(c: &tokio_postgres::Client) -> String {
    let mut out = String::new();
    for sql in [
        "SELECT table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable || ' ' || coalesce(column_default, '')
           FROM information_schema.columns WHERE table_schema = 'public' ORDER BY 1",
        "SELECT indexname || ' ' || indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1",
        "SELECT conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint
          WHERE connamespace = 'public'::regnamespace ORDER BY 1",
        "SELECT version || ' ' || name FROM refinery_schema_history ORDER BY version",
    ] {
        for r in c.query(sql, &[]).await.unwrap() {
            out.push_str(r.get::<_, &str>(0));
            out.push('\n');
        }
    }
    out
}

#[tokio::test]
async fn migrations_fresh_stepwise_and_again_end_at_one_schema() {
    let pg = server().await;
    let mut fresh = state::connect_one(&pg.url()).await.unwrap();
    assert_eq!(db::applied(&fresh).await.unwrap(), Vec::<i64>::new());
    let applied = db::migrate(&mut fresh, None).await.unwrap();
    assert_eq!(applied, db::migrations());
    let want = schema_of(&fresh).await;
    assert!(want.contains("events.id uuid NO"), "{want}");
    // Up to date: migrating again applies nothing and changes nothing.
    assert!(db::migrate(&mut fresh, None).await.unwrap().is_empty());
    assert_eq!(schema_of(&fresh).await, want);
    db::check(&fresh, None).await.unwrap();

    // A database that stopped at V1, as an older Ferry left it.
    let url = pg.create_extra_database("old").unwrap();
    let mut old = state::connect_one(&url).await.unwrap();
    db::migrate(&mut old, Some(1)).await.unwrap();
    let err = db::check(&old, None).await.unwrap_err();
    assert!(matches!(err, SchemaError::TooOld { .. }));
    assert_eq!(
        err.to_string(),
        "the database schema is older than this program needs: missing V2__customers_and_conversations, V3__knowledge_base, V4__interactions, V5__alerts, V6__ferry_interactions, V7__partitions, V8__alert_deliveries (run `ferry migrate` against this database)"
    );
    db::check(&old, Some(1)).await.unwrap();
    // A worker refuses to start against it, with the same message.
    let refused = state::connect_checked(&state::DbConfig::new(url.clone())).await.unwrap_err();
    assert!(refused.to_string().contains("missing V2__customers_and_conversations"), "{refused}");
    // Migrated the rest of the way, it ends where the fresh one did.
    let applied: Vec<i64> = db::migrate(&mut old, None).await.unwrap().iter().map(|m| m.version).collect();
    assert_eq!(applied, [2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(schema_of(&old).await, want);
}

/// V7 partitions events, replies and interactions by day: a database that
/// V6 left keeps every row, the days of its last year get their
/// partitions, and only rows with no such day (an id that is not a UUIDv7)
/// stay in the default partitions.
#[tokio::test]
async fn partitioning_keeps_every_row_of_an_older_database() {
    let pg = server().await;
    let mut c = state::connect_one(&pg.url()).await.unwrap();
    db::migrate(&mut c, Some(6)).await.unwrap();
    c.batch_execute(
        "CREATE FUNCTION v7(t timestamptz) RETURNS uuid LANGUAGE sql AS $$
             SELECT (lpad(to_hex(floor(extract(epoch FROM t) * 1000)::bigint), 12, '0') || '7000'
                     || '8' || substr(md5(random()::text), 1, 15))::uuid $$;
         INSERT INTO events SELECT v7(now() - i * interval '1 day'), 'desk-1', 'chat', now() - i * interval '1 day', '{}', i
           FROM generate_series(0, 9) i;
         INSERT INTO events VALUES (gen_random_uuid(), 'desk-1', 'chat', now(), '{}', 99);
         INSERT INTO chat_messages (event_id, agent, chat, chat_type, sender, msg_type, text, ts)
           SELECT id, agent, 'c', 'direct', 's', 'text', 't', ts FROM events;
         INSERT INTO replies (id, in_reply_to, agent, kind, ts, body, stream_seq)
           SELECT gen_random_uuid(), id, agent, 'chat', ts, '{}', stream_seq FROM events;
         INSERT INTO predictions SELECT id, in_reply_to, agent, ts, 'p', 0.5, 'm' FROM replies;
         INSERT INTO interactions (id, agent, ts, session_id, user_input, tools_used, response_time_ms, success)
           SELECT id, agent, ts, 's', 'u', '{}', 1, true FROM events;
         DROP FUNCTION v7;",
    )
    .await
    .unwrap();
    let n: i64 = c.query_one("SELECT count(*) FROM replies", &[]).await.unwrap().get(0);
    assert_eq!(n, 11);

    assert_eq!(db::migrate(&mut c, None).await.unwrap().iter().map(|m| m.version).collect::<Vec<_>>(), [7, 8]);
    let count = |sql: &'static str| {
        let c = &c;
        async move { c.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(count("SELECT count(*) FROM events").await, 11);
    assert_eq!(count("SELECT count(*) FROM replies").await, 11);
    assert_eq!(count("SELECT count(*) FROM interactions").await, 11);
    assert_eq!(count("SELECT count(*) FROM chat_messages").await, 11);
    assert_eq!(count("SELECT count(*) FROM predictions").await, 11);
    assert_eq!(count("SELECT count(*) FROM events_default").await, 1, "the id that is not a UUIDv7");
    assert_eq!(count("SELECT count(*) FROM replies_default").await, 1);
    assert_eq!(count("SELECT count(*) FROM interactions_default").await, 0);
    // Ten days with rows (in UTC, ten or eleven), per table.
    let parts = count("SELECT count(*) FROM pg_inherits WHERE inhparent = 'events'::regclass").await;
    assert!((11..=12).contains(&parts), "{parts} partitions of events (ten days and the default)");
    // Idempotent as before: the same event id is refused.
    let dup = c.execute("INSERT INTO events SELECT id, agent, kind, ts, body, stream_seq FROM events LIMIT 1", &[]).await;
    assert!(dup.is_err(), "a stored event id is refused");
}

#[tokio::test]
async fn customers_are_found_by_normalised_sender_per_agent() {
    let pg = server().await;
    let c = migrated(&pg).await;
    let t = Utc::now();
    let a = customers::identify(&c, "desk-1", "  Ａlice　Chen ", t).await.unwrap();
    let b = customers::identify(&c, "desk-1", "alice chen", t).await.unwrap();
    assert_eq!(a.id, b.id, "one customer for both spellings");
    let other_desk = customers::identify(&c, "desk-2", "Alice Chen", t).await.unwrap();
    assert_ne!(a.id, other_desk.id, "customers are per agent");
    let wang = customers::identify(&c, "desk-1", "王小明", t).await.unwrap();
    assert_eq!(customers::identify(&c, "desk-1", " 王小明 ", t).await.unwrap().id, wang.id);
    assert_ne!(wang.id, a.id);
    customers::set_tags(&c, wang.id, &["vip".to_string()]).await.unwrap();
    assert_eq!(customers::identify(&c, "desk-1", "王小明", t).await.unwrap().tags, ["vip"]);
    assert_eq!(customers::find(&c, "desk-1", "nobody").await.unwrap(), None);
    let n: i64 = c.query_one("SELECT count(*) FROM customers", &[]).await.unwrap().get(0);
    assert_eq!(n, 3);
}

fn at(minute: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 22, 9, 0, 0).unwrap() + chrono::Duration::minutes(minute)
}

fn chat_at(sender: &str, text: &str, ts: DateTime<Utc>) -> Envelope {
    let mut e = Envelope::new(
        AgentId::new("desk-1").unwrap(),
        EventBody::Chat(ChatMessage {
            chat: sender.into(),
            chat_type: ChatType::Direct,
            sender: sender.into(),
            text: text.into(),
            msg_type: MessageType::Text,
        }),
    );
    e.ts = ts;
    e
}

fn answer(to: &Envelope, text: &str) -> ReplyRow {
    let mut r = Reply::new(
        "rules",
        to.id,
        to.agent.clone(),
        ReplyBody::Chat(ChatReply {
            chat: "c".into(),
            action: ChatAction::Reply,
            content: Some(text.into()),
            confidence: 1.0,
            answered_by: AnsweredBy {
                kind: ResponderKind::Rule,
                name: "r".into(),
            },
            processing_ms: 1.0,
            tokens: None,
            timings: None,
        }),
    );
    r.ts = to.ts + chrono::Duration::seconds(5);
    ReplyRow {
        body_json: codec::reply_body_json(&r.body).unwrap(),
        reply: r,
        stream_seq: 1,
    }
}

fn row(e: &Envelope) -> EventRow {
    EventRow {
        body_json: codec::event_body_json(&e.body).unwrap(),
        env: e.clone(),
        stream_seq: 1,
    }
}

#[tokio::test]
async fn conversation_context_is_the_last_turns_in_order() {
    let pg = server().await;
    migrated(&pg).await;
    // The sinks write through a pooled client, as in the archiver.
    let pool = state::pool(&state::DbConfig::new(pg.url())).unwrap();
    let mut c = pool.get().await.unwrap();
    let idle = Duration::from_secs(30 * 60);
    let sink = EventSink { conversation_idle: idle };
    // Five exchanges, a minute apart, Chinese and English mixed, written by
    // the archiver's own sinks (replies first for two of them: the reply
    // consumer may well be ahead of the event consumer).
    let texts = ["你好", "我的订单到哪了？", "order 1234", "还没收到", "thanks"];
    let chats: Vec<Envelope> = texts.iter().enumerate().map(|(i, t)| chat_at("王芳", t, at(i as i64))).collect();
    let replies: Vec<ReplyRow> = chats.iter().enumerate().map(|(i, e)| answer(e, &format!("reply {i}"))).collect();
    ReplySink.write(&mut c, &replies[3..]).await.unwrap();
    sink.write(&mut c, &chats.iter().map(row).collect::<Vec<_>>()).await.unwrap();
    ReplySink.write(&mut c, &replies[..3]).await.unwrap();

    // The sixth message, not archived yet: its context is the last four turns.
    let next = chat_at("王芳", "能快点吗", at(6));
    let turns = conversations::context(&**c, "desk-1", "王芳", next.id.0, next.ts, idle, 4).await.unwrap();
    let got: Vec<(Speaker, &str)> = turns.iter().map(|t| (t.speaker, t.text.as_str())).collect();
    assert_eq!(
        got,
        [
            (Speaker::Customer, "还没收到"),
            (Speaker::Agent, "reply 3"),
            (Speaker::Customer, "thanks"),
            (Speaker::Agent, "reply 4"),
        ]
    );
    // Archived, the message is not part of its own context.
    sink.write(&mut c, &[row(&next)]).await.unwrap();
    let again = conversations::context(&**c, "desk-1", "王芳", next.id.0, next.ts, idle, 4).await.unwrap();
    assert_eq!(again, turns);
    // Another customer's conversation is not mixed in.
    let other = chat_at("Bob", "hello", at(7));
    assert!(conversations::context(&**c, "desk-1", "Bob", other.id.0, other.ts, idle, 4).await.unwrap().is_empty());

    // Two hours later the conversation has gone idle: a new one starts.
    let later = chat_at("王芳", "new question", at(130));
    assert!(conversations::context(&**c, "desk-1", "王芳", later.id.0, later.ts, idle, 4).await.unwrap().is_empty());
    sink.write(&mut c, &[row(&later)]).await.unwrap();
    let rows = c
        .query("SELECT status FROM conversations ORDER BY opened_at", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>();
    assert_eq!(rows, ["closed", "open"]);
    // Writing the same events again changes nothing.
    sink.write(&mut c, &chats.iter().map(row).collect::<Vec<_>>()).await.unwrap();
    let n: i64 = c.query_one("SELECT count(*) FROM chat_messages", &[]).await.unwrap().get(0);
    assert_eq!(n, 7);
}

#[tokio::test]
async fn knowledge_base_retrieval_in_chinese_and_english() {
    let pg = server().await;
    let c = migrated(&pg).await;
    let dir = ferry_harness::cargo::workspace_root().unwrap().join("ops/demo/kb");
    let articles = kb::load_path(&dir).unwrap();
    for a in &articles {
        assert_eq!(kb::upsert(&c, a).await.unwrap(), kb::Upserted::Created);
    }
    // Importing again is a no-op; a changed body is an update.
    assert_eq!(kb::upsert(&c, &articles[0]).await.unwrap(), kb::Upserted::Unchanged);
    let mut changed = articles[0].clone();
    changed.body.push_str(" Updated.");
    assert_eq!(kb::upsert(&c, &changed).await.unwrap(), kb::Upserted::Updated);

    for (query, top) in [
        ("How long does a refund take?", "refunds"),
        ("退款多久能到账", "refunds"),
        ("我想退货", "refunds"),
        ("包邮吗？运费多少", "shipping"),
        ("how much is delivery to Shanghai", "shipping"),
        ("where is my order", "order-tracking"),
        ("怎么查物流", "order-tracking"),
        ("do you accept WeChat Pay?", "payment"),
        ("可以用支付宝吗", "payment"),
        ("my headphones broke, is there a warranty", "warranty"),
        ("客服几点上班", "hours"),
    ] {
        let hits = kb::search(&c, query, 3).await.unwrap();
        assert_eq!(hits.first().map(|h| h.slug.as_str()), Some(top), "{query:?}: {hits:#?}");
        assert!(hits.len() <= 3);
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
    }
    assert!(kb::search(&c, "the of and", 3).await.unwrap().is_empty(), "stop words alone match nothing");
    assert!(kb::search(&c, "xylophone", 3).await.unwrap().is_empty());
}

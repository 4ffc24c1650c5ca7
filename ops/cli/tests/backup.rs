//! `ferry backup` and `ferry restore` against real stacks: what one stack held comes back in a fresh one, which then carries on.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use async_nats::jetstream;
use ferry_schema::connect::NatsConfig;
use ferry_schema::topology::{EVENTS_STREAM, REPLIES_STREAM};
use ferry_schema::{subject, AgentId};

use common::ferry;

/// Both outputs of a command that must succeed (its progress is on stderr).
fn both(out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    common::ok(out) + &stderr
}

/// One `ferry up` (without inference), its ports and data dir.
struct Up {
    data: tempfile::TempDir,
    port: u16,
    pg_port: u16,
    child: std::process::Child,
}

impl Up {
    /// Starts it (with `--demo FILE`, or no demo) and returns once it runs.
    fn start(demo: Option<&Path>, alerts: &Path) -> Self {
        let data = common::up_data_dir();
        let (port, pg_port) = (ferry_stack::free_port().unwrap(), ferry_stack::free_port().unwrap());
        let mut demo_args = match demo {
            Some(file) => vec!["--demo", file.to_str().unwrap()],
            None => vec!["--no-demo"],
        };
        demo_args.extend(["--alerts", alerts.to_str().unwrap()]);
        let child = common::up(data.path(), port, pg_port, &demo_args);
        Self { data, port, pg_port, child }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// `ferry <args>` aimed at this stack.
    fn ferry(&self, args: &[&str]) -> Command {
        let mut cmd = ferry();
        cmd.args(args)
            .arg("--data-dir")
            .arg(self.data.path())
            .args(["--server", &self.url(), "--pg-port", &self.pg_port.to_string()]);
        cmd
    }

    fn secrets(&self) -> ferry_stack::Secrets {
        ferry_stack::Secrets::load(&self.data.path().join("secrets.env")).unwrap().unwrap()
    }

    async fn js(&self) -> jetstream::Context {
        let c = NatsConfig::new(self.url(), "backup test").with_user("operator", self.secrets().operator);
        jetstream::new(c.connect().await.unwrap())
    }

    async fn db(&self) -> tokio_postgres::Client {
        let url = format!(
            "postgres://{}:{}@127.0.0.1:{}/{}",
            ferry_stack::postgres::DB_USER,
            self.secrets().postgres,
            self.pg_port,
            ferry_stack::postgres::DB_NAME
        );
        ferry_workers::state::connect_one(&url).await.unwrap()
    }

    fn down(mut self) {
        common::ok(ferry().args(["down", "--data-dir"]).arg(self.data.path()).output().unwrap());
        self.child.wait().unwrap();
    }
}

impl Drop for Up {
    /// A test that failed half way leaves no stack running: `ferry down`
    /// stops what the `ferry up` it kills started.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = ferry().args(["down", "--data-dir"]).arg(self.data.path()).output();
        }
    }
}

/// What the archive holds: the ids of each table's rows, sorted, as text.
async fn archive(db: &tokio_postgres::Client) -> Vec<(&'static str, Vec<String>)> {
    let mut out = Vec::new();
    for (table, key) in [
        ("events", "id::text"),
        ("replies", "id::text"),
        ("chat_messages", "event_id::text"),
        ("customers", "id::text"),
        ("conversations", "id::text"),
        ("kb_articles", "id::text"),
        ("rule_alerts", "reply_id::text"),
        ("interactions", "id::text"),
        ("alerts", "id::text"),
    ] {
        let rows = db.query(&format!("SELECT {key} FROM {table} ORDER BY 1"), &[]).await.unwrap();
        out.push((table, rows.iter().map(|r| r.get::<_, String>(0)).collect()));
    }
    out
}

async fn stream_messages(js: &jetstream::Context, name: &str) -> u64 {
    js.get_stream(name).await.unwrap().info().await.unwrap().state.messages
}

/// Where the archiver's consumer on `EVENTS` stands: everything up to this
/// stream sequence is acked.
async fn archiver_floor(js: &jetstream::Context) -> u64 {
    let events = js.get_stream(EVENTS_STREAM).await.unwrap();
    events.consumer_info("archiver-events").await.unwrap().ack_floor.stream_sequence
}

/// Waits until `table` in the archive holds `n` rows.
async fn wait_rows(db: &tokio_postgres::Client, table: &str, n: i64) {
    for _ in 0..300 {
        let got: i64 = db.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await.unwrap().get(0);
        if got >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the archive's {table} never held {n} rows");
}

/// A stack with chats, replies, an alert, an interaction and the knowledge
/// base is backed up; a fresh stack restored from it holds every row and
/// message, its consumers stand where they stood, and it answers the next
/// chat. Restoring over data is refused without `--replace`; `--keep`
/// keeps the newest backups.
#[tokio::test]
async fn a_backup_restores_into_a_fresh_stack_that_carries_on() {
    // The demo's lines that rules answer (no model here): greetings, a
    // refund, opening hours, a game that raises an alert, an interaction.
    let demo_dir = tempfile::tempdir().unwrap();
    let demo = demo_dir.path().join("demo.jsonl");
    let lines: Vec<&str> = include_str!("../../demo/chat.jsonl")
        .lines()
        .filter(|l| !l.contains("crypto giveaway") && !l.contains("Shenzhen") && !l.contains("\"kind\":\"predict\""))
        .collect();
    std::fs::write(&demo, lines.join("\n") + "\n").unwrap();
    // An alert from the demo's assistant interaction (840 ms for
    // `order_status`).
    let alerts = demo_dir.path().join("alerts.toml");
    std::fs::write(
        &alerts,
        "[[rule]]\nname = \"slow-intent\"\ncheck = \"response_time\"\nscope = \"intent\"\nthreshold = 500\nmin_interactions = 1\n",
    )
    .unwrap();

    let first = Up::start(Some(&demo), &alerts);
    let db = first.db().await;
    wait_rows(&db, "events", lines.len() as i64).await;
    wait_rows(&db, "alerts", 1).await;
    let before = archive(&db).await;
    for (table, ids) in &before {
        assert!(!ids.is_empty(), "the first stack's {table} is empty: the test would prove nothing");
    }
    let js = first.js().await;
    let (events, replies) = (stream_messages(&js, EVENTS_STREAM).await, stream_messages(&js, REPLIES_STREAM).await);
    let archived_floor = archiver_floor(&js).await;

    let backups = tempfile::tempdir().unwrap();
    let to = backups.path().to_str().unwrap();
    let out = both(first.ferry(&["backup", "--to", to, "--keep", "1"]).output().unwrap());
    assert!(out.contains(&format!("stream {EVENTS_STREAM}: {events} messages")), "{out}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let out = both(first.ferry(&["backup", "--to", to, "--keep", "1"]).output().unwrap());
    assert!(out.contains("removed the old backup"), "{out}");
    let kept: Vec<_> = std::fs::read_dir(backups.path()).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(kept.len(), 1, "--keep 1 keeps one: {kept:?}");
    assert!(kept[0].join("manifest.json").is_file() && kept[0].join("postgres.dump").is_file());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&kept[0]).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "a backup holds customers' chats: only its owner may read it");
    drop((js, db));
    first.down();

    let second = Up::start(None, &alerts);
    let out = both(second.ferry(&["restore", to]).output().unwrap());
    assert!(out.contains("every file checked by sha256"), "{out}");
    let db = second.db().await;
    assert_eq!(archive(&db).await, before, "the restored archive holds every row");
    let js = second.js().await;
    assert_eq!(stream_messages(&js, EVENTS_STREAM).await, events);
    assert_eq!(stream_messages(&js, REPLIES_STREAM).await, replies);
    let restored_floor = archiver_floor(&js).await;
    assert_eq!(restored_floor, archived_floor, "the archiver's consumer stands where it stood");

    // Restoring over data needs --replace.
    let refused = second.ferry(&["restore", to]).output().unwrap();
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("exists with") && why.contains("--replace"), "{why}");

    // The restored stack answers the next chat, typed by hand.
    let desk1 = AgentId::new("desk-1").unwrap();
    let mut agent = NatsConfig::new(second.url(), "backup test agent")
        .with_user("desk-1", second.secrets().agent("desk-1").unwrap());
    agent.inbox_prefix = Some(subject::agent_inbox_prefix(&desk1));
    let agent_js = jetstream::ContextBuilder::new()
        .api_prefix(subject::AGENT_JS_API_PREFIX)
        .build(agent.connect().await.unwrap());
    agent_js
        .publish(
            subject::event(&desk1, ferry_schema::EventKind::Chat).to_string(),
            r#"{"body":{"chat":"Zoe","sender":"Zoe","text":"hello after the restore"}}"#.into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let total = before[0].1.len() as i64 + 1;
    wait_rows(&db, "events", total).await;
    for _ in 0..300 {
        let answered: i64 = db
            .query_one("SELECT count(*) FROM replies WHERE body::text LIKE '%Zoe%'", &[])
            .await
            .unwrap()
            .get(0);
        if answered == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answered: i64 = db.query_one("SELECT count(*) FROM replies WHERE body::text LIKE '%Zoe%'", &[]).await.unwrap().get(0);
    assert_eq!(answered, 1, "the restored stack answered the new chat once");
    let events_now: i64 = db.query_one("SELECT count(*) FROM events", &[]).await.unwrap().get(0);
    assert_eq!(events_now, total, "nothing archived twice after the restore");
    drop((js, db));
    second.down();
}

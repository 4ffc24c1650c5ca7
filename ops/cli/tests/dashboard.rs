//! `ferry dashboard` in a real headless Chromium (Debian's, driven over the DevTools protocol) against a real broker and alerts worker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::BufRead as _;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::ferry;
use ferry_schema::topology::{self, Role, StreamSettings};
use ferry_schema::{headers, AgentId, Encoding, EventId};
use ferry_stack::{free_port, NatsServer, PgServer};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);

/// A process killed when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The harness's page, failing the test loudly.
struct Page(ferry_harness::browser::Page);

impl Page {
    async fn open() -> Self {
        Self(ferry_harness::browser::Page::open(1400, 1000).await.expect("chromium (Debian's package) starts"))
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.0.call(method, params).await.unwrap()
    }

    async fn eval(&mut self, expr: &str) -> Value {
        self.0.eval(expr).await.unwrap()
    }

    async fn wait_until(&mut self, expr: &str, what: &str) {
        if let Err(body) = self.0.wait_until(expr).await.unwrap() {
            panic!("{what}: never; the page shows:\n{body}");
        }
    }
}

async fn publish(js: &jetstream::Context, agent: &str, kind: &str, body: Value) {
    let id = EventId::new();
    let event = json!({"id": id.to_string(), "agent": agent, "kind": kind, "ts": chrono::Utc::now(), "v": 1, "body": body});
    let h = headers::for_publish(id.to_string().as_str(), Encoding::Json, None);
    js.publish_with_headers(format!("events.{agent}.{kind}"), h, event.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_page_logs_in_and_shows_agents_traffic_and_alerts_live() {
    let nats = NatsServer::start_temp().expect("nats-server starts");
    let op = nats.operator("test").connect().await.unwrap();
    let js = jetstream::new(op.clone());
    let agents = [AgentId::new("desk-1").unwrap()];
    topology::provision(&js, &StreamSettings::default(), &agents).await.unwrap();

    // The alerts worker, so a burst of failures becomes an alert.
    // The archive, with an archiver and a rules worker that answers every chat.
    let pg = tokio::task::spawn_blocking(PgServer::start_temp).await.unwrap().expect("PostgreSQL starts");
    let mut db = ferry_workers::state::connect_one(&pg.url()).await.unwrap();
    ferry_schema::db::migrate(&mut db, None).await.unwrap();
    let rules = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(rules.path(), "[[rule]]\nname = \"assistant-errors\"\ncheck = \"error_rate\"\nthreshold = 50\nmin_interactions = 3\n").unwrap();
    let chat_rules = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(chat_rules.path(), "[[rule]]\nname = \"echo\"\naction = \"reply\"\ntemplate = \"echo: {text}\"\n").unwrap();
    let stop = CancellationToken::new();
    let alerts = {
        let (conn, cfg, stop) = (nats.role(Role::Alerts, "test-alerts"), ferry_workers::alerts::AlertsConfig::new(rules.path()), stop.clone());
        tokio::spawn(async move { ferry_workers::alerts::run(conn.connect().await.unwrap(), &cfg, stop).await })
    };
    let archiver = {
        let (conn, cfg, stop) = (nats.role(Role::Archiver, "test-archiver"), ferry_workers::archiver::ArchiverConfig::new(pg.url()), stop.clone());
        tokio::spawn(async move { ferry_workers::archiver::run(conn.connect().await.unwrap(), &cfg, stop).await })
    };
    let rules_worker = {
        let (conn, cfg, stop) = (nats.role(Role::Rules, "test-rules"), ferry_workers::rules::RulesConfig::new(chat_rules.path()), stop.clone());
        tokio::spawn(async move { ferry_workers::rules::run(conn.connect().await.unwrap(), &cfg, stop).await })
    };

    // The real `ferry dashboard`, as an operator runs it.
    let dash_port = free_port().unwrap();
    let mut child = ferry()
        .args(["dashboard", "--server", &nats.url(), "--password", &nats.secrets().operator, "--database-url", &pg.url()])
        .args(["--listen", &format!("127.0.0.1:{dash_port}")])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let _dashboard = Killed(child);
    let mut lines = std::io::BufReader::new(stderr).lines();
    let said = lines.next().unwrap().unwrap();
    assert!(said.contains(&format!("dashboard on http://127.0.0.1:{dash_port}/")), "{said}");
    std::thread::spawn(move || lines.for_each(drop));
    let url = format!("http://127.0.0.1:{dash_port}/");

    let mut page = Page::open().await;
    page.call("Page.navigate", json!({"url": url})).await;
    page.wait_until("document.getElementById('login') && !document.getElementById('login').hidden", "the login form").await;

    // Without a session the live feed is refused; a wrong password too.
    assert_eq!(page.eval("fetch('/live').then(r => r.status)").await, 401);
    page.eval("document.getElementById('password').value = 'not-the-password'; document.getElementById('login-button').click(); true").await;
    page.wait_until("document.getElementById('login-error').innerText.includes('Wrong user or password')", "a wrong password refused").await;
    assert_eq!(page.eval("document.getElementById('app').hidden").await, true);

    // The operator's password logs in and the feed goes live.
    let pw = serde_json::to_string(&nats.secrets().operator).unwrap();
    page.eval(&format!("document.getElementById('password').value = {pw}; document.getElementById('login-button').click(); true")).await;
    page.wait_until("document.getElementById('status').innerText.startsWith('live')", "the live feed").await;

    // An agent comes online.
    let heartbeat = json!({"version": "9.9.9", "cpu_percent": 12.5, "rss_bytes": 52428800, "spool_depth": 3});
    publish(&js, "desk-1", "heartbeat", heartbeat).await;
    page.wait_until(
        "[...document.querySelectorAll('#agents tr')].some(r => r.innerText.includes('desk-1') && r.innerText.includes('online') && r.innerText.includes('9.9.9'))",
        "desk-1 online",
    )
    .await;

    // The event counter moves as events are published.
    let before = page.eval("Number(document.getElementById('events-total').innerText)").await.as_u64().unwrap();
    for i in 0..20 {
        publish(&js, "desk-1", "chat", json!({"chat": "Alice", "sender": "Alice", "text": format!("hello {i}")})).await;
    }
    page.wait_until(&format!("Number(document.getElementById('events-total').innerText) >= {}", before + 20), "the counter moving")
        .await;
    // Activity samples are not read one by one but counted from the
    // stream's state: they move the counter and show as their kind.
    for i in 0..30 {
        publish(&js, "desk-1", "activity", json!({"app": "notepad.exe", "title": format!("note {i}")})).await;
    }
    page.wait_until(&format!("Number(document.getElementById('events-total').innerText) >= {}", before + 50), "activities counted")
        .await;
    page.wait_until("document.getElementById('kinds').innerText.includes('activity')", "the activity kind").await;
    // The rules worker's answers: reply latency, the step that answered,
    // the lag of every consumer and the replicas online.
    page.wait_until("document.getElementById('lat-p99').innerText !== '-'", "the reply latency").await;
    page.wait_until("document.getElementById('steps').innerText.includes('rule')", "replies by step").await;
    page.wait_until("document.getElementById('consumers').innerText.includes('archiver-events')", "the consumers' lag").await;
    page.wait_until(
        "['ferry-rules', 'ferry-archiver', 'ferry-alerts'].every(s => document.getElementById('replicas').innerText.includes(s))",
        "the replicas online",
    )
    .await;
    // A chat that cannot be decoded is dead-lettered, by its reason.
    let h = headers::for_publish(EventId::new().to_string().as_str(), Encoding::Json, None);
    js.publish_with_headers("events.desk-1.chat", h, "{\"not\": \"an event\"".into()).await.unwrap().await.unwrap();
    page.wait_until("document.getElementById('dead').innerText.includes('malformed')", "a dead letter by its reason").await;

    // The archive: an agent's recent events, and a time range.
    let archived = |sql: &'static str| {
        let url = pg.url();
        async move {
            let c = ferry_workers::state::connect_one(&url).await.unwrap();
            c.query_one(sql, &[]).await.unwrap().get::<_, i64>(0)
        }
    };
    let deadline = Instant::now() + WAIT;
    while archived("SELECT count(*) FROM replies").await < 20 || archived("SELECT count(*) FROM events WHERE kind = 'activity'").await < 30 {
        assert!(Instant::now() < deadline, "the archiver never stored the 20 replies and 30 activities");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    page.eval("[...document.querySelectorAll('#agents tr')].find(r => r.innerText.includes('desk-1')).click(); true").await;
    page.wait_until("document.getElementById('agent-events').innerText.includes('note 29')", "desk-1's recent events").await;
    page.wait_until("document.getElementById('agent-replies').innerText.includes('echo: hello 19')", "desk-1's recent replies").await;
    page.eval("document.getElementById('range-1h').click(); true").await;
    page.wait_until("Number(document.getElementById('history-events').innerText) >= 21", "the last hour from the archive").await;
    page.wait_until("Number(document.getElementById('history-replies').innerText) >= 20", "the last hour's replies").await;
    page.wait_until("document.getElementById('history-latency').innerText !== '- / - / -'", "the hour's reply latency").await;

    // A burst of failed interactions: the alert appears.
    for _ in 0..5 {
        let failed = json!({"session_id": "s-1", "response_time_ms": 900.0, "success": false, "error_type": "timeout", "intent": "refund"});
        publish(&js, "desk-1", "interaction", failed).await;
    }
    page.wait_until(
        "document.getElementById('alerts-firing').innerText.includes('assistant-errors')",
        "the alert on the page",
    )
    .await;
    page.wait_until("document.getElementById('by-error').innerText.includes('timeout')", "the error types").await;

    // Acknowledged on the page, recorded in the archive (once it holds the alert).
    let deadline = Instant::now() + WAIT;
    while archived("SELECT count(*) FROM alerts WHERE state = 'firing'").await < 1 {
        assert!(Instant::now() < deadline, "the archiver never stored the alert");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    page.eval("document.querySelector('#alerts-firing button.ack').click(); true").await;
    page.wait_until("document.getElementById('alerts-firing').innerText.includes('acknowledged by operator')", "the acknowledgement").await;
    assert_eq!(archived("SELECT count(*) FROM alerts WHERE acknowledged_by = 'operator'").await, 1);

    // A screenshot of what the browser shows, kept beside the build.
    let png = page.0.screenshot(1400).await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    let dir = ferry_harness::cargo::current_target_dir().unwrap_or_else(std::env::temp_dir).join("screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("dashboard.png");
    std::fs::write(&path, png).unwrap();
    eprintln!("screenshot: {}", path.display());

    stop.cancel();
    alerts.await.unwrap().unwrap();
    archiver.await.unwrap().unwrap();
    rules_worker.await.unwrap().unwrap();
}

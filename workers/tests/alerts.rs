//! The alerts role against a real broker, a real PostgreSQL and a real local webhook receiver: fire once, cooldown, resolve, offline, and a killed replica.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use ferry_schema::alert::{Alert, AlertState, Delivery, DeliveryOutcome};
use ferry_schema::reply::{AnsweredBy, ChatAction, ChatReply, ResponderKind};
use ferry_schema::topology::{self, Role, StreamSettings, ALERTS_STREAM};
use ferry_schema::{codec, headers, subject, AgentId, Encoding, EventId, Reply, ReplyBody};
use ferry_stack::{inspect, NatsServer};
use ferry_workers::alerts::{self, AlertsConfig};
use ferry_workers::archiver::{self, ArchiverConfig};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);

/// A `ferry-worker` process, killed if the test ends before it stops it.
struct Worker(std::process::Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A webhook receiver on a free loopback port: every body it took, and
/// how many calls it answered.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Alert>>>,
}

fn receiver() -> Receiver {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", server.server_addr().to_ip().unwrap());
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    std::thread::spawn(move || {
        for mut req in server.incoming_requests() {
            let mut body = Vec::new();
            std::io::Read::read_to_end(req.as_reader(), &mut body).unwrap();
            let header = req.headers().iter().find(|h| h.field.equiv("Ferry-Alert-Id")).map(|h| h.value.to_string());
            let alert = Alert::from_json(&body).expect("the webhook gets an alert as JSON");
            assert_eq!(header, Some(alert.id.to_string()), "the id is also a header");
            sink.lock().unwrap().push(alert);
            let _ = req.respond(tiny_http::Response::empty(204));
        }
    });
    Receiver { url, got }
}

impl Receiver {
    /// Waits until the webhook took `n` distinct alerts (a delivery cut
    /// off by a killed replica comes again: receivers de-duplicate by id).
    async fn wait_for(&self, n: usize) -> Vec<Alert> {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.got.lock().unwrap().clone();
            let mut ids: Vec<_> = got.iter().map(|a| a.id).collect();
            ids.sort();
            ids.dedup();
            if ids.len() >= n {
                return got;
            }
            assert!(Instant::now() < deadline, "webhook got {} of {n} alerts: {got:?}", ids.len());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn broker() -> (NatsServer, async_nats::Client, jetstream::Context) {
    let nats = NatsServer::start_temp().expect("nats-server starts");
    let op = nats.operator("test-operator").connect().await.expect("operator connects");
    let js = jetstream::new(op.clone());
    let agents = [AgentId::new("desk-1").unwrap(), AgentId::new("desk-2").unwrap()];
    topology::provision(&js, &StreamSettings::default(), &agents).await.expect("provision");
    (nats, op, js)
}

fn alerts_file(body: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut f, body.as_bytes()).unwrap();
    f
}

/// Publishes an interaction as a plain client would (`nats pub`, JSON, no id).
async fn interaction(op: &async_nats::Client, agent: &str, ok: bool, intent: Option<&str>) {
    let body = serde_json::json!({"body": {
        "session_id": "s-1", "user_input": "where is my parcel", "response_time_ms": 120.0,
        "success": ok, "error_type": if ok { None } else { Some("timeout") }, "intent": intent,
    }});
    op.publish(format!("events.{agent}.interaction"), body.to_string().into()).await.unwrap();
}

async fn heartbeat(op: &async_nats::Client, agent: &str) {
    heartbeat_with_spool(op, agent, 0).await;
}

async fn heartbeat_with_spool(op: &async_nats::Client, agent: &str, spool_depth: u64) {
    let body = format!(r#"{{"body": {{"version": "test", "cpu_percent": 1.0, "rss_bytes": 1, "spool_depth": {spool_depth}}}}}"#);
    op.publish(format!("events.{agent}.heartbeat"), body.into()).await.unwrap();
    op.flush().await.unwrap();
}

/// Every alert `ALERTS` holds, in order (not the delivery log beside them).
async fn stored(js: &jetstream::Context) -> Vec<Alert> {
    inspect::read_all(js, ALERTS_STREAM, "alerts.>")
        .await
        .unwrap()
        .iter()
        .map(|m| Alert::from_json(&m.payload).unwrap())
        .collect()
}

/// Waits until `ALERTS` holds an alert of `rule` in `state`; returns all.
async fn wait_stored(js: &jetstream::Context, rule: &str, state: AlertState) -> Vec<Alert> {
    let deadline = Instant::now() + WAIT;
    loop {
        let all = stored(js).await;
        if all.iter().any(|a| a.rule == rule && a.state == state) {
            return all;
        }
        assert!(Instant::now() < deadline, "no {rule} {state:?} alert; stored: {all:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn summary(v: &[Alert]) -> Vec<(String, String, AlertState)> {
    v.iter().map(|a| (a.rule.clone(), a.scope.to_string(), a.state)).collect()
}

type Running = (CancellationToken, tokio::task::JoinHandle<Result<Arc<ferry_workers::runtime::Stats>, alerts::RunError>>);

fn in_process(nats: &NatsServer, file: &std::path::Path) -> Running {
    in_process_with(nats, AlertsConfig::new(file))
}

fn in_process_with(nats: &NatsServer, cfg: AlertsConfig) -> Running {
    let stop = CancellationToken::new();
    let token = stop.clone();
    let conn = nats.role(Role::Alerts, "test-alerts");
    let task = tokio::spawn(async move {
        let client = conn.connect().await.expect("alerts connects");
        alerts::run(client, &cfg, token).await
    });
    (stop, task)
}

type Archiving = (CancellationToken, tokio::task::JoinHandle<Result<Arc<ferry_workers::runtime::Stats>, archiver::RunError>>);

/// An archiver replica in this process, writing to the PostgreSQL at `url`.
fn archiver_in_process(nats: &NatsServer, url: String) -> Archiving {
    let stop = CancellationToken::new();
    let (conn, cfg, token) = (nats.role(Role::Archiver, "test-archiver"), ArchiverConfig::new(url), stop.clone());
    (stop, tokio::spawn(async move { archiver::run(conn.connect().await.unwrap(), &cfg, token).await }))
}

/// The rows `sql` returns once there are `n` of them (or what it returns
/// when the wait is over).
async fn rows_when(url: &str, sql: &str, n: usize) -> Vec<tokio_postgres::Row> {
    let db = ferry_workers::state::connect_one(url).await.unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let rows = db.query(sql, &[]).await.unwrap();
        if rows.len() >= n || Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_burst_fires_one_alert_the_cooldown_holds_the_next_and_recovery_resolves() {
    let (nats, op, js) = broker().await;
    let hook = receiver();
    let file = alerts_file(&format!(
        "alert_cooldown_minutes = 10\nwebhook_url = \"{}\"\n\
         [[rule]]\nname = \"errors\"\ncheck = \"error_rate\"\nthreshold = 50\nwindow_seconds = 600\nmin_interactions = 5\n\
         [[rule]]\nname = \"by-intent\"\ncheck = \"error_rate\"\nscope = \"intent\"\nthreshold = 50\nmin_interactions = 1\n",
        hook.url
    ));
    let pg = common::migrated_pg().await;
    let (stop, task) = in_process(&nats, file.path());
    let (archiver_stop, archiver) = archiver_in_process(&nats, pg.url());

    // A burst of failures: one firing alert, at the fifth (the first judged).
    for _ in 0..10 {
        interaction(&op, "desk-1", false, None).await;
    }
    op.flush().await.unwrap();
    let firing = hook.wait_for(1).await;
    assert_eq!(summary(&firing), [("errors".into(), "all".into(), AlertState::Firing)]);
    assert!((firing[0].value - 100.0).abs() < 1e-9, "{firing:?}");

    // Recovery: ten successes bring the rate to 50%, not above: resolved.
    for _ in 0..10 {
        interaction(&op, "desk-1", true, None).await;
    }
    op.flush().await.unwrap();
    let got = hook.wait_for(2).await;
    assert_eq!(got[1].state, AlertState::Resolved);
    assert_eq!(got[1].trigger_seq, got[0].trigger_seq, "the resolved alert names its firing");

    // A second burst inside the cooldown: held. The interaction after it
    // (its own intent) fires its own rule, and alerts are judged in stream
    // order, so once that one is stored the burst has been judged.
    for _ in 0..10 {
        interaction(&op, "desk-1", false, None).await;
    }
    interaction(&op, "desk-2", false, Some("sentinel")).await;
    op.flush().await.unwrap();
    let all = wait_stored(&js, "by-intent", AlertState::Firing).await;
    assert_eq!(
        summary(&all),
        [
            ("errors".into(), "all".into(), AlertState::Firing),
            ("errors".into(), "all".into(), AlertState::Resolved),
            ("by-intent".into(), "intent=sentinel".into(), AlertState::Firing),
        ],
        "the cooldown held the second burst"
    );
    let got = hook.wait_for(3).await;
    let mut ids: Vec<_> = got.iter().map(|a| a.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "each alert reached the webhook once: {got:?}");

    // The archiver keeps each alert once, in the alerts table.
    let rows = rows_when(&pg.url(), "SELECT rule, scope_kind, scope_value, state FROM alerts ORDER BY stream_seq", 3).await;
    let rows: Vec<(String, String, String, String)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
    assert_eq!(
        rows,
        [
            ("errors".into(), "all".into(), "".into(), "firing".into()),
            ("errors".into(), "all".into(), "".into(), "resolved".into()),
            ("by-intent".into(), "intent".into(), "sentinel".into(), "firing".into()),
        ]
    );
    stop.cancel();
    task.await.unwrap().unwrap();
    archiver_stop.cancel();
    archiver.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_silent_agent_raises_agent_offline_and_its_heartbeat_resolves_it() {
    let (nats, op, js) = broker().await;
    let hook = receiver();
    let file = alerts_file(&format!(
        "webhook_url = \"{}\"\n[[rule]]\nname = \"offline\"\ncheck = \"agent_offline\"\nthreshold = 2\n",
        hook.url
    ));
    let (stop, task) = in_process(&nats, file.path());
    heartbeat(&op, "desk-2").await;
    let got = hook.wait_for(1).await;
    assert_eq!(summary(&got), [("offline".into(), "agent=desk-2".into(), AlertState::Firing)]);
    heartbeat(&op, "desk-2").await;
    let got = hook.wait_for(2).await;
    assert_eq!(got[1].state, AlertState::Resolved);
    assert_eq!(summary(&stored(&js).await).len(), 2, "one firing, one resolved");
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// A rule with `scope = "group"` keeps a window per agent group, from the
/// groups file `ferry agent add --group` writes (`--groups`), and reads it
/// again: an agent added to a group later counts there from then on.
#[tokio::test]
async fn a_group_rule_follows_the_groups_file() {
    let (nats, op, js) = broker().await;
    let hook = receiver();
    let file = alerts_file(&format!(
        "webhook_url = \"{}\"\n[[rule]]\nname = \"team\"\ncheck = \"consecutive_errors\"\nscope = \"group\"\nthreshold = 3\n",
        hook.url
    ));
    let groups = alerts_file("[groups]\nsupport = [\"desk-1\", \"desk-2\"]\n");
    let mut cfg = AlertsConfig::new(file.path());
    cfg.groups = Some(groups.path().to_path_buf());
    cfg.reload_every = Some(Duration::from_millis(200));
    let (stop, task) = in_process_with(&nats, cfg);
    // desk-3 is in no group: its failures count nowhere; two members' make a run.
    for agent in ["desk-3", "desk-3", "desk-3", "desk-1", "desk-2", "desk-1"] {
        interaction(&op, agent, false, None).await;
    }
    let got = hook.wait_for(1).await;
    assert_eq!(summary(&got), [("team".into(), "group=support".into(), AlertState::Firing)]);
    // desk-3 joins vip; its failures from then on raise vip's alert.
    // Failures go on until the worker has read the file again (before
    // that they count nowhere): then three in a row fire.
    std::fs::write(groups.path(), "[groups]\nsupport = [\"desk-1\", \"desk-2\"]\nvip = [\"desk-3\"]\n").unwrap();
    let deadline = Instant::now() + WAIT;
    while hook.got.lock().unwrap().len() < 2 {
        assert!(Instant::now() < deadline, "no vip alert: {:?}", hook.got.lock().unwrap());
        interaction(&op, "desk-3", false, None).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = hook.wait_for(2).await;
    assert_eq!(summary(&got[1..]), [("team".into(), "group=vip".into(), AlertState::Firing)]);
    assert_eq!(stored(&js).await.len(), 2);
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// An agent whose heartbeats report a growing spool (its events not
/// getting through) raises one alert, which its first heartbeat with the
/// spool drained resolves; the other agent's small spool raises nothing.
#[tokio::test]
async fn a_spool_backlog_raises_an_alert_until_the_spool_drains() {
    let (nats, op, js) = broker().await;
    let hook = receiver();
    let file = alerts_file(&format!(
        "webhook_url = \"{}\"\n[[rule]]\nname = \"backlog\"\ncheck = \"spool_backlog\"\nthreshold = 1000\n",
        hook.url
    ));
    let (stop, task) = in_process(&nats, file.path());
    heartbeat_with_spool(&op, "desk-1", 10).await;
    heartbeat_with_spool(&op, "desk-2", 2500).await;
    heartbeat_with_spool(&op, "desk-2", 4000).await;
    let got = hook.wait_for(1).await;
    assert_eq!(summary(&got), [("backlog".into(), "agent=desk-2".into(), AlertState::Firing)]);
    assert_eq!(got[0].value, 2500.0);
    heartbeat_with_spool(&op, "desk-2", 0).await;
    let got = hook.wait_for(2).await;
    assert_eq!(got[1].state, AlertState::Resolved);
    assert_eq!(summary(&stored(&js).await).len(), 2, "one firing, one resolved");
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// A burst of dead letters (as a worker stores them on `DEADLETTER`)
/// above the rate raises one alert, and the window emptying resolves it.
#[tokio::test]
async fn a_burst_of_dead_letters_raises_an_alert_and_the_quiet_after_resolves_it() {
    let (nats, op, js) = broker().await;
    let hook = receiver();
    let file = alerts_file(&format!(
        "webhook_url = \"{}\"\n[[rule]]\nname = \"dead\"\ncheck = \"dead_letters\"\nthreshold = 60\nwindow_seconds = 2\n",
        hook.url
    ));
    let (stop, task) = in_process(&nats, file.path());
    // 3 in a 2 s window is 90 a minute.
    for i in 0..3 {
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::DEAD_REASON_CODE, "malformed");
        h.insert(headers::DEAD_SUBJECT, "events.desk-1.chat");
        js.publish_with_headers("deadletter.EVENTS.rules", h, format!("junk {i}").into()).await.unwrap().await.unwrap();
    }
    let got = hook.wait_for(2).await;
    assert_eq!(
        summary(&got),
        [("dead".into(), "all".into(), AlertState::Firing), ("dead".into(), "all".into(), AlertState::Resolved)]
    );
    assert_eq!(got[0].value, 90.0);
    assert_eq!(summary(&stored(&js).await).len(), 2, "one firing, one resolved");
    drop(op);
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// Every webhook call is in the delivery log: a receiver that fails once
/// (a 503) and then takes the alert leaves two records, on `ALERTS` and in
/// PostgreSQL's `alert_deliveries`, the URL shown without its token.
#[tokio::test]
async fn each_webhook_call_is_in_the_delivery_log_with_its_answer() {
    let (nats, op, js) = broker().await;
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let addr = server.server_addr().to_ip().unwrap();
    let calls = Arc::new(Mutex::new(0usize));
    let seen = calls.clone();
    std::thread::spawn(move || {
        for req in server.incoming_requests() {
            let n = {
                let mut c = seen.lock().unwrap();
                *c += 1;
                *c
            };
            let code = if n == 1 { 503 } else { 204 };
            let _ = req.respond(tiny_http::Response::empty(code));
        }
    });
    let file = alerts_file(&format!(
        "webhook_url = \"http://{addr}/hook?token=s3cret\"\n[[rule]]\nname = \"dead\"\ncheck = \"dead_letters\"\nthreshold = 0\nwindow_seconds = 60\n"
    ));
    let pg = common::migrated_pg().await;
    let (stop, task) = in_process(&nats, file.path());
    let (archiver_stop, archiver) = archiver_in_process(&nats, pg.url());
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::DEAD_REASON_CODE, "malformed");
    js.publish_with_headers("deadletter.EVENTS.rules", h, "junk".into()).await.unwrap().await.unwrap();
    let fired = wait_stored(&js, "dead", AlertState::Firing).await;
    let deadline = Instant::now() + WAIT;
    let log = loop {
        let log: Vec<Delivery> = inspect::read_all(&js, ALERTS_STREAM, "alert-deliveries.>")
            .await
            .unwrap()
            .iter()
            .map(|m| Delivery::from_json(&m.payload).unwrap())
            .collect();
        if log.len() >= 2 {
            break log;
        }
        assert!(Instant::now() < deadline, "the delivery log holds {log:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let url = format!("http://{addr}/hook");
    let lines: Vec<_> = log.iter().map(|d| (d.alert_id, d.url.clone(), d.attempt, d.outcome, d.status)).collect();
    assert_eq!(
        lines,
        [
            (fired[0].id, url.clone(), 1, DeliveryOutcome::Failed, Some(503)),
            (fired[0].id, url.clone(), 2, DeliveryOutcome::Took, Some(204)),
        ]
    );
    assert!(log[0].detail.contains("503") && !log[0].detail.contains("s3cret"), "{:?}", log[0].detail);
    let rows = rows_when(&pg.url(), "SELECT alert_id, url, attempt, outcome, status FROM alert_deliveries ORDER BY attempt", 2).await;
    let rows: Vec<(uuid::Uuid, String, i64, String, Option<i32>)> =
        rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))).collect();
    assert_eq!(
        rows,
        [
            (fired[0].id, url.clone(), 1, "failed".into(), Some(503)),
            (fired[0].id, url, 2, "took".into(), Some(204)),
        ]
    );
    drop(op);
    stop.cancel();
    task.await.unwrap().unwrap();
    archiver_stop.cancel();
    archiver.await.unwrap().unwrap();
}

/// A worker consumer falling behind raises one alert however many
/// replicas poll it; a replica that starts while it fires reads it back
/// instead of raising it again; the consumer catching up resolves it once.
#[tokio::test]
async fn a_lagging_consumer_raises_one_alert_across_replicas_and_catching_up_resolves_it() {
    let (nats, op, js) = broker().await;
    let hook = receiver();
    let file = alerts_file(&format!(
        "webhook_url = \"{}\"\n[[rule]]\nname = \"lag\"\ncheck = \"consumer_lag\"\nthreshold = 20\nconsumers = [\"rules\"]\n",
        hook.url
    ));
    let cfg = || AlertsConfig {
        lag_every: Duration::from_millis(100),
        ..AlertsConfig::new(file.path())
    };
    let replicas = [in_process_with(&nats, cfg()), in_process_with(&nats, cfg())];
    // No rules worker runs: every event waits on EVENTS/rules.
    for _ in 0..30 {
        heartbeat(&op, "desk-1").await;
    }
    let got = hook.wait_for(1).await;
    assert_eq!(summary(&got), [("lag".into(), "consumer=rules".into(), AlertState::Firing)]);
    assert!(got[0].value > 20.0, "{got:?}");
    let late = in_process_with(&nats, cfg());
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The consumer catches up: everything taken and acknowledged.
    let consumer: jetstream::consumer::PullConsumer = js.get_consumer_from_stream("rules", topology::EVENTS_STREAM).await.unwrap();
    let mut taken = 0;
    while taken < 30 {
        let mut batch = consumer.fetch().max_messages(100).messages().await.unwrap();
        while let Some(m) = futures::StreamExt::next(&mut batch).await {
            m.unwrap().double_ack().await.unwrap();
            taken += 1;
        }
    }
    let got = hook.wait_for(2).await;
    assert_eq!(got[1].state, AlertState::Resolved, "{got:?}");
    // Let every replica poll again: a late copy would be dropped by the
    // stream, and a replica that missed the firing would raise another.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let all = stored(&js).await;
    assert_eq!(
        summary(&all),
        [
            ("lag".into(), "consumer=rules".into(), AlertState::Firing),
            ("lag".into(), "consumer=rules".into(), AlertState::Resolved),
        ],
        "one firing and one resolution from three replicas"
    );
    assert_eq!((all[0].trigger_seq, all[1].trigger_seq), (0, 0), "the rule's first generation");
    for (stop, task) in replicas.into_iter().chain([late]) {
        stop.cancel();
        task.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn killing_an_alerts_replica_mid_window_neither_loses_nor_doubles_an_alert() {
    let (nats, op, js) = broker().await;
    let hook = receiver();
    let file = alerts_file(&format!(
        "webhook_url = \"{}\"\n\
         [[rule]]\nname = \"errors\"\ncheck = \"error_rate\"\nthreshold = 50\nwindow_seconds = 600\nmin_interactions = 6\n\
         [[rule]]\nname = \"by-intent\"\ncheck = \"error_rate\"\nscope = \"intent\"\nthreshold = 50\nmin_interactions = 1\n",
        hook.url
    ));
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_ferry-worker"))
            .args(["--server", &nats.url(), "--user", "alerts"])
            .args(["--password", nats.secrets().role(Role::Alerts)])
            .args(["alerts", "--alerts"])
            .arg(file.path())
            .env("RUST_LOG", "warn")
            .spawn()
            .map(Worker)
            .expect("ferry-worker starts")
    };
    let kill = |c: &mut Worker| {
        c.0.kill().unwrap();
        c.0.wait().unwrap();
    };
    let mut first = spawn();
    // Half the window's failures reach the first replica; it is killed.
    for _ in 0..3 {
        interaction(&op, "desk-1", false, None).await;
    }
    op.flush().await.unwrap();
    inspect::wait_for_count(&js, topology::EVENTS_STREAM, 3, WAIT).await.unwrap();
    kill(&mut first);
    // Two replicas from here on; the rest of the burst.
    let mut second = spawn();
    let mut third = spawn();
    for _ in 0..3 {
        interaction(&op, "desk-1", false, None).await;
    }
    op.flush().await.unwrap();
    let fired = wait_stored(&js, "errors", AlertState::Firing).await;
    assert_eq!(fired.len(), 1, "{fired:?}");
    // The sixth failure fired it: the first three were not lost.
    assert_eq!(fired[0].trigger_seq, 6);
    // One of the two is killed and a fresh one starts, which reads the
    // firing back instead of raising it again; recovery resolves once.
    kill(&mut second);
    let mut fourth = spawn();
    for _ in 0..6 {
        interaction(&op, "desk-1", true, None).await;
    }
    interaction(&op, "desk-2", false, Some("sentinel")).await;
    op.flush().await.unwrap();
    wait_stored(&js, "by-intent", AlertState::Firing).await;
    wait_stored(&js, "errors", AlertState::Resolved).await;
    let got = hook.wait_for(3).await;
    // Let both live replicas finish what they read; a late copy would be
    // dropped by the stream, which is what this checks.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = stored(&js).await;
    assert_eq!(
        summary(&all),
        [
            ("errors".into(), "all".into(), AlertState::Firing),
            ("errors".into(), "all".into(), AlertState::Resolved),
            ("by-intent".into(), "intent=sentinel".into(), AlertState::Firing),
        ],
        "nothing lost, nothing doubled"
    );
    let mut per_id: HashMap<uuid::Uuid, usize> = HashMap::new();
    for a in &got {
        *per_id.entry(a.id).or_default() += 1;
    }
    assert_eq!(per_id.len(), 3, "{got:?}");
    for c in [&mut third, &mut fourth] {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.0.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
        assert!(c.0.wait().unwrap().success(), "SIGTERM: the graceful path exits 0");
    }
}

/// Publishes a chat reply answered by `step`, as a worker would.
async fn reply(js: &jetstream::Context, agent: &str, step: ResponderKind) {
    let body = ReplyBody::Chat(ChatReply {
        chat: "Alice".into(),
        action: ChatAction::Reply,
        content: Some("sorry".into()),
        confidence: 0.1,
        answered_by: AnsweredBy { kind: step, name: step.as_str().into() },
        processing_ms: 30.0,
        tokens: None,
        timings: None,
    });
    let agent = AgentId::new(agent).unwrap();
    let r = Reply::new("inference", EventId::new(), agent.clone(), body);
    let payload = codec::encode_reply(&r, Encoding::MsgPack).unwrap();
    let h = headers::for_publish(r.id.text(), Encoding::MsgPack, None);
    js.publish_with_headers(subject::reply(&agent), h, payload.into()).await.unwrap().await.unwrap();
}

#[tokio::test]
async fn ferrys_own_fallbacks_raise_an_alert_of_their_own() {
    let (nats, op, js) = broker().await;
    let hook = receiver();
    let file = alerts_file(&format!(
        "webhook_url = \"{}\"\n\
         [[rule]]\nname = \"ferry-fallbacks\"\ncheck = \"error_rate\"\nsource = \"ferry\"\nthreshold = 50\nmin_interactions = 3\n\
         [[rule]]\nname = \"assistant-errors\"\ncheck = \"error_rate\"\nthreshold = 50\nmin_interactions = 1\n",
        hook.url
    ));
    let (stop, task) = in_process(&nats, file.path());
    // The model answered one; the fallback chain answered two more.
    reply(&js, "desk-1", ResponderKind::Model).await;
    reply(&js, "desk-1", ResponderKind::Apology).await;
    reply(&js, "desk-2", ResponderKind::KbTemplate).await;
    let got = hook.wait_for(1).await;
    assert_eq!(summary(&got), [("ferry-fallbacks".into(), "all".into(), AlertState::Firing)]);
    assert!((got[0].value - 200.0 / 3.0).abs() < 1e-6, "{got:?}");
    // A rule over assistants' interactions does not count Ferry's replies:
    // an assistant's failure is its first.
    interaction(&op, "desk-1", false, None).await;
    op.flush().await.unwrap();
    let all = wait_stored(&js, "assistant-errors", AlertState::Firing).await;
    assert_eq!(all.len(), 2, "{all:?}");
    stop.cancel();
    task.await.unwrap().unwrap();
}

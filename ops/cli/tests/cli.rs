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
    let kb_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../demo/kb");
    assert_eq!(
        db(&["kb", "import", kb_dir]).trim(),
        format!("6 articles from {kb_dir}: 0 created, 0 updated, 6 unchanged")
    );
    let top = db(&["kb", "search", "退款多久到账"]);
    assert!(top.lines().next().unwrap().contains("refunds"), "{top}");

    // A crash of `ferry up` leaves its broker and database running ...
    up.kill().unwrap();
    up.wait().unwrap();
    assert!(port_open(port) && port_open(pg_port));
    // ... and `ferry down` stops them.
    let out = ferry().args(["down", "--data-dir"]).arg(dir.path()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("stopped nats-server, PostgreSQL"), "{err}");
    assert!(!port_open(port) && !port_open(pg_port));
    let again = ferry().args(["down", "--data-dir"]).arg(dir.path()).output().unwrap();
    assert!(String::from_utf8_lossy(&again.stderr).contains("nothing was running"));
    // Without a database URL or a local cluster's password: a clear error.
    let out = ferry().args(["migrate", "--data-dir", "/nonexistent"]).env_remove("DATABASE_URL").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no --database-url (or DATABASE_URL) given"));
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
    // demo (8 events; 8 replies: 6 chats, an alert, a prediction), its 6 chats
    // and their 6 senders.
    assert!(
        stderr.contains("archive: 8 events, 8 replies, 6 chat messages, 6 customers, 6 conversations"),
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
        "consumer EVENTS/rules",
        "consumer WORK/inference-chat",
        "consumer EVENTS/inference-predict",
        "consumer REPLIES/agent-desk-1",
        "consumer EVENTS/archiver-events",
        "consumer REPLIES/archiver-replies",
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

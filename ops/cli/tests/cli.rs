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

#[test]
fn up_once_runs_the_whole_demo_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let out = ferry()
        .args(["up", "--once", "--data-dir"])
        .arg(dir.path())
        .args(["--port", &free_port().unwrap().to_string()])
        .args(["--monitor-port", &free_port().unwrap().to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("stream EVENTS: created"), "{stderr}");
    assert!(stderr.contains("0 chats or predictions unanswered"), "{stderr}");
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

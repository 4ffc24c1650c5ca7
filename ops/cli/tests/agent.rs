//! `ferry agent add|list|revoke` against a real nats-server: the new agent's nkey works, the broker confines it, revoke locks it out after the reload.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use async_nats::jetstream;
use ferry_schema::connect::Auth;
use ferry_schema::topology::{self, StreamSettings, EVENTS_STREAM, REPLIES_STREAM};
use ferry_schema::{subject, AgentId, EventKind};
use ferry_stack::{inspect, NatsServer};
use tokio::sync::mpsc;

use common::{ferry, ok, up_data_dir};

fn agent(id: &str) -> AgentId {
    AgentId::new(id).unwrap()
}

/// `ferry agent <args>` on `nats`, with the registry in `data`.
fn agent_cmd(nats: &NatsServer, data: &Path, args: &[&str]) -> Output {
    ferry()
        .arg("agent")
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .arg("--nats-conf")
        .arg(nats.dir().join("nats.conf"))
        .args(["--nats-pid", &nats.pid().unwrap().to_string()])
        .args(["--server", &nats.url(), "--password", &nats.secrets().operator])
        .output()
        .unwrap()
}

fn list(data: &Path) -> String {
    ok(ferry().args(["agent", "list", "--data-dir"]).arg(data).output().unwrap())
}

/// A plain client with `id`'s seed, as a misbehaving agent would use it,
/// reporting the server's errors.
async fn connect_as(
    nats: &NatsServer,
    id: &str,
    seed: &str,
) -> Result<(async_nats::Client, mpsc::UnboundedReceiver<String>), async_nats::ConnectError> {
    let (tx, errors) = mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::new()
        .nkey(seed.to_string())
        .custom_inbox_prefix(subject::agent_inbox_prefix(&agent(id)))
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                match event {
                    async_nats::Event::ServerError(e) => {
                        let _ = tx.send(e.to_string());
                    }
                    async_nats::Event::ClientError(e) => {
                        let _ = tx.send(e.to_string());
                    }
                    _ => {}
                }
            }
        })
        .max_reconnects(Some(1))
        .connect(nats.url())
        .await?;
    Ok((client, errors))
}

async fn next_error(errors: &mut mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(Duration::from_secs(10), errors.recv())
        .await
        .expect("the server reports the violation")
        .unwrap()
}

fn seed_of(data: &Path, id: &str) -> String {
    match Auth::nkey_file(&data.join("agents").join(format!("{id}.nk"))).unwrap() {
        Auth::Nkey { seed } => seed,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn added_agent_is_confined_and_revoke_locks_it_out_after_reload() {
    let nats = NatsServer::start_temp().expect("nats-server starts");
    let js = jetstream::new(nats.operator("test-operator").connect().await.unwrap());
    topology::provision(&js, &StreamSettings::default(), &[]).await.unwrap();
    let data = tempfile::tempdir().unwrap();

    let out = ok(agent_cmd(&nats, data.path(), &["add", "desk-7", "--group", "support"]));
    assert!(out.contains("consumer    REPLIES/agent-desk-7: created"), "{out}");
    assert!(out.contains("told to reload its configuration"), "{out}");
    assert!(out.contains("desk-7 connected with its seed and read its consumer: ok"), "{out}");
    assert!(out.contains("ferry-agent --id desk-7 --nkey desk-7.nk"), "{out}");
    ok(agent_cmd(&nats, data.path(), &["add", "desk-8", "--group", "support"]));
    // desk-8 has an account of its own, filled by the reload: at most
    // AGENT_MAX_CONNECTIONS connections, and desk-7 still gets in past them
    // (below). Its rotation later closes them.
    assert!(out.contains(&format!("account     AGENT_0001 (slot 1 of {})", ferry_stack::nats::DEMO_SLOTS)), "{out}");
    let seed8 = seed_of(data.path(), "desk-8");
    let mut held = Vec::new();
    for _ in 0..ferry_schema::quota::AGENT_MAX_CONNECTIONS {
        held.push(connect_as(&nats, "desk-8", &seed8).await.expect("within desk-8's connections"));
    }
    let over = connect_as(&nats, "desk-8", &seed8).await.expect_err("one connection past desk-8's limit");
    assert!(over.to_string().contains("maximum account active connections exceeded"), "{over}");
    // The same id twice is refused.
    let again = agent_cmd(&nats, data.path(), &["add", "desk-7"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("agent desk-7 already exists"));

    // The seed is printed, and kept in a file only its owner may read.
    use std::os::unix::fs::PermissionsExt;
    let seed_file = data.path().join("agents").join("desk-7.nk");
    assert_eq!(std::fs::metadata(&seed_file).unwrap().permissions().mode() & 0o777, 0o600);
    let seed = seed_of(data.path(), "desk-7");
    assert!(out.contains(&seed), "{out}");
    let groups = std::fs::read_to_string(data.path().join("groups.toml")).unwrap();
    assert!(groups.contains("support = [\"desk-7\", \"desk-8\"]"), "{groups}");

    // desk-7 with its seed: its own events are stored (JetStream acks them) ...
    let (client, mut errors) = connect_as(&nats, "desk-7", &seed).await.unwrap();
    let ajs = jetstream::new(client.clone());
    ajs.publish(subject::event(&agent("desk-7"), EventKind::Chat), "mine".into())
        .await
        .unwrap()
        .await
        .unwrap();
    // ... and it may read its own reply consumer.
    let own = jetstream::ContextBuilder::new()
        .api_prefix(subject::AGENT_JS_API_PREFIX)
        .timeout(Duration::from_secs(2))
        .build(client.clone());
    own.get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
        topology::agent_replies_consumer_name(&agent("desk-7")),
        REPLIES_STREAM,
    )
    .await
    .unwrap();

    // Another agent's events subject is refused by the server ...
    client
        .publish(subject::event(&agent("desk-8"), EventKind::Chat), "spoofed".into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let e = next_error(&mut errors).await;
    assert!(e.contains("Permissions Violation for Publish to \"events.desk-8.chat\""), "{e}");
    // ... and so is listening to another agent's replies ...
    let _sub = client.subscribe(subject::reply(&agent("desk-8"))).await.unwrap();
    client.flush().await.unwrap();
    let e = next_error(&mut errors).await;
    assert!(e.contains("Permissions Violation for Subscription to \"replies.desk-8\""), "{e}");
    // ... or reading another agent's reply consumer.
    let theirs = own
        .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
            topology::agent_replies_consumer_name(&agent("desk-8")),
            REPLIES_STREAM,
        )
        .await;
    assert!(theirs.is_err());
    let e = next_error(&mut errors).await;
    assert!(e.contains("Permissions Violation for Publish to \"$JS.FERRY.API.CONSUMER.INFO.REPLIES.agent-desk-8\""), "{e}");
    assert_eq!(inspect::count(&js, EVENTS_STREAM).await.unwrap(), 1, "only the allowed publish was stored");

    let listed = list(data.path());
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 3, "{listed}");
    assert!(lines[1].starts_with("desk-7  support") && lines[1].ends_with("active"), "{listed}");
    assert!(lines[2].starts_with("desk-8  support") && lines[2].ends_with("active"), "{listed}");

    // Rotate desk-8's key: the new seed works, the old one is refused, and
    // its reply consumer (with what waits in it) stays.
    let old8 = seed_of(data.path(), "desk-8");
    let out = ok(agent_cmd(&nats, data.path(), &["rotate", "desk-8"]));
    assert!(out.contains("desk-8 connected with its seed and read its consumer: ok") && out.contains("refuses desk-8's old seed: ok"), "{out}");
    let new8 = seed_of(data.path(), "desk-8");
    assert_ne!(old8, new8);
    assert!(out.contains(&new8), "{out}");
    connect_as(&nats, "desk-8", &new8).await.unwrap();
    let refused = connect_as(&nats, "desk-8", &old8).await.expect_err("the old seed is refused");
    assert!(refused.to_string().to_lowercase().contains("authorization"), "{refused}");
    js.get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
        topology::agent_replies_consumer_name(&agent("desk-8")),
        REPLIES_STREAM,
    )
    .await
    .expect("desk-8's consumer stays");

    // Revoke desk-7 while it is connected.
    let out = ok(agent_cmd(&nats, data.path(), &["revoke", "desk-7"]));
    assert!(out.contains("refuses desk-7's old seed: ok"), "{out}");
    assert!(out.contains("consumer    REPLIES/agent-desk-7: deleted"), "{out}");
    assert!(!seed_file.exists());
    // The reload closed its open connection ...
    let e = next_error(&mut errors).await;
    assert!(e.to_lowercase().contains("authorization"), "{e}");
    // ... and a new one is refused.
    let refused = connect_as(&nats, "desk-7", &seed).await.expect_err("desk-7 is refused");
    assert!(refused.to_string().to_lowercase().contains("authorization"), "{refused}");
    // Its consumer is gone; desk-8 is untouched.
    let gone = js
        .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
            topology::agent_replies_consumer_name(&agent("desk-7")),
            REPLIES_STREAM,
        )
        .await;
    assert!(gone.is_err());
    connect_as(&nats, "desk-8", &seed_of(data.path(), "desk-8")).await.unwrap();

    let listed = list(data.path());
    assert!(listed.lines().nth(1).unwrap().contains("revoked 20"), "{listed}");
    let json = ok(ferry().args(["agent", "list", "--json", "--data-dir"]).arg(data.path()).output().unwrap());
    let first: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    assert_eq!(first["id"], "desk-7");
    assert!(first["revoked"].is_string(), "{json}");
    let groups = std::fs::read_to_string(data.path().join("groups.toml")).unwrap();
    assert!(groups.contains("support = [\"desk-8\"]"), "{groups}");
    // A second revoke says so.
    let again = agent_cmd(&nats, data.path(), &["revoke", "desk-7"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already revoked"));
}

#[test]
fn offline_add_only_writes_files_and_every_command_has_help_with_examples() {
    let data = tempfile::tempdir().unwrap();
    let conf = data.path().join("nats.conf");
    std::fs::write(&conf, ferry_stack::NATS_CONF).unwrap();
    let out = ok(ferry()
        .args(["agent", "add", "desk-9", "--offline", "--data-dir"])
        .arg(data.path())
        .arg("--nats-conf")
        .arg(&conf)
        .output()
        .unwrap());
    assert!(out.contains("reload      skipped (--offline)"), "{out}");
    let text = std::fs::read_to_string(&conf).unwrap();
    let registry = std::fs::read_to_string(data.path().join("agents.toml")).unwrap();
    let key = registry
        .lines()
        .find_map(|l| l.strip_prefix("public_key = "))
        .unwrap()
        .trim_matches('"');
    assert!(text.contains(&format!("nkey: {key}")), "{text}");
    assert!(text.contains("\"events.desk-9.chat\""), "{text}");
    assert!(!text.contains("\"events.desk-9.>\""), "one subject per kind, not all: {text}");
    // The committed config has no demo users; the demo config keeps them
    // beside the generated ones.
    assert!(!text.contains("user: desk-1"), "{text}");
    let demo = ferry_stack::nats::demo_nats_conf();
    assert!(demo.contains("user: desk-1, password: $FERRY_AGENT_DESK_1_PASSWORD"), "{demo}");
    // nats-server accepts the generated file.
    let checked = Command::new(ferry_stack::nats::server_binary().unwrap())
        .arg("-t")
        .arg("-c")
        .arg(&conf)
        .envs(ferry_stack::Secrets::generate().env())
        .output()
        .unwrap();
    assert!(checked.status.success(), "{}", String::from_utf8_lossy(&checked.stderr));

    // `ferry agent slots` grows the pool, keeps desk-9 in its slot, says to
    // restart, and refuses to shrink below a held slot.
    let out = ok(ferry().args(["agent", "slots", "1200", "--data-dir"]).arg(data.path()).arg("--nats-conf").arg(&conf).output().unwrap());
    assert!(out.contains("1000 -> 1200 agent slots") && out.contains("restart nats-server"), "{out}");
    let grown = std::fs::read_to_string(&conf).unwrap();
    assert!(grown.contains("  AGENT_1200 { limits: $AGENT_LIMITS, imports: $AGENT_IMPORTS }\n"), "{grown}");
    assert!(grown.contains(&format!("nkey: {key}")));
    assert_eq!(grown.matches("imports: $AGENT_IMPORTS").count(), 1200);
    let shrink = ferry().args(["agent", "slots", "0", "--data-dir"]).arg(data.path()).arg("--nats-conf").arg(&conf).output().unwrap();
    assert!(!shrink.status.success());
    assert!(String::from_utf8_lossy(&shrink.stderr).contains("agent slot 1 is taken"), "{}", String::from_utf8_lossy(&shrink.stderr));

    for sub in ["add", "list", "revoke", "slots"] {
        let help = ok(ferry().args(["agent", sub, "--help"]).output().unwrap());
        assert!(help.contains("Examples:") && help.contains(&format!("ferry agent {sub}")), "{help}");
    }
}

/// Starts `ferry up` without inference and demo; returns once it runs.
fn up(data: &Path, port: u16, pg_port: u16) -> std::process::Child {
    common::up(data, port, pg_port, &["--no-demo"])
}

#[tokio::test]
async fn agent_add_on_ferry_up_needs_no_flags_and_survives_a_restart() {
    let data = up_data_dir();
    let (port, pg_port) = (ferry_stack::free_port().unwrap(), ferry_stack::free_port().unwrap());
    let url = format!("nats://127.0.0.1:{port}");
    let mut stack = up(data.path(), port, pg_port);

    // The broker's pid, its nats.conf and the operator password all come from the data dir.
    let out = ok(ferry()
        .args(["agent", "add", "desk-7", "--group", "support", "--data-dir"])
        .arg(data.path())
        .args(["--server", &url])
        .output()
        .unwrap());
    assert!(out.contains("desk-7 connected with its seed and read its consumer: ok"), "{out}");
    let seed = seed_of(data.path(), "desk-7");

    // `ferry up` started again puts desk-7 back into nats.conf and its group into groups.toml.
    ok(ferry().args(["down", "--data-dir"]).arg(data.path()).output().unwrap());
    stack.wait().unwrap();
    let mut stack = up(data.path(), port, pg_port);
    let client = async_nats::ConnectOptions::new()
        .nkey(seed)
        .custom_inbox_prefix(subject::agent_inbox_prefix(&agent("desk-7")))
        .connect(url.as_str())
        .await
        .unwrap();
    jetstream::new(client)
        .publish(subject::event(&agent("desk-7"), EventKind::Heartbeat), "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let groups = std::fs::read_to_string(data.path().join("groups.toml")).unwrap();
    assert!(groups.contains("support = [\"desk-7\"]"), "{groups}");
    ok(ferry().args(["down", "--data-dir"]).arg(data.path()).output().unwrap());
    stack.wait().unwrap();
}

/// `--valid-for`: once a key's time is up, `ferry agent expire` locks the
/// agent out of the running broker; a key with time left is untouched, and
/// `ferry agent rotate` gives the expired agent a new key.
#[tokio::test]
async fn an_expired_key_is_locked_out_and_rotate_renews_it() {
    let nats = NatsServer::start_temp().expect("nats-server starts");
    let js = jetstream::new(nats.operator("test-operator").connect().await.unwrap());
    topology::provision(&js, &StreamSettings::default(), &[]).await.unwrap();
    let data = tempfile::tempdir().unwrap();

    let out = ok(agent_cmd(&nats, data.path(), &["add", "desk-7", "--valid-for", "30s"]));
    assert!(out.contains("  expires     "), "{out}");
    ok(agent_cmd(&nats, data.path(), &["add", "desk-8", "--valid-for", "30d"]));
    let zero = agent_cmd(&nats, data.path(), &["add", "desk-9", "--valid-for", "0s"]);
    assert!(!zero.status.success() && String::from_utf8_lossy(&zero.stderr).contains("--valid-for must be longer than 0"));
    let out = ok(agent_cmd(&nats, data.path(), &["expire"]));
    assert!(out.contains("No agent's key has expired."), "{out}");
    let (seed7, seed8) = (seed_of(data.path(), "desk-7"), seed_of(data.path(), "desk-8"));
    assert!(connect_as(&nats, "desk-7", &seed7).await.is_ok(), "before its expiry the key works");

    // Until its thirty seconds are up (long enough for the two adds and the first expire on a busy machine).
    while !list(data.path()).contains("expired ") {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let out = ok(agent_cmd(&nats, data.path(), &["expire"]));
    assert!(out.contains("Expired agent desk-7") && out.contains("refuses desk-7's old seed: ok"), "{out}");
    assert!(!out.contains("desk-8"), "{out}");
    assert!(connect_as(&nats, "desk-7", &seed7).await.is_err());
    assert!(connect_as(&nats, "desk-8", &seed8).await.is_ok(), "a key with time left still works");
    // Its reply consumer stays for when it comes back.
    js.get_stream(REPLIES_STREAM).await.unwrap().consumer_info("agent-desk-7").await.unwrap();

    let out = ok(agent_cmd(&nats, data.path(), &["rotate", "desk-7", "--valid-for", "1h"]));
    assert!(out.contains("desk-7 connected with its seed and read its consumer: ok"), "{out}");
    assert!(connect_as(&nats, "desk-7", &seed_of(data.path(), "desk-7")).await.is_ok());
    assert!(list(data.path()).contains("active, expires "), "{}", list(data.path()));
}

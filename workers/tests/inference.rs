//! The inference worker with the real model (SmolLM2-135M GGUF) on a real nats-server.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{publish, stack};
use ferry_schema::codec::{decode_reply, DEFAULT_MAX_PAYLOAD};
use ferry_schema::event::{ChatMessage, ChatType, MessageType, PredictRequest, RecentActivity};
use ferry_schema::reply::ResponderKind;
use ferry_schema::topology::{self, REPLIES_STREAM, WORK_STREAM};
use ferry_schema::{AgentId, Encoding, Envelope, EventBody, EventId, Reply, ReplyBody};
use ferry_stack::inspect;
use ferry_workers::inference::{self, InferenceConfig};
use ferry_workers::runtime::Stats;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(240);

/// Every chat goes to inference.
const TO_INFERENCE: &str = "[defaults]\nunmatched_chat = \"infer\"\n";

/// Route setting that forbids SmolLM2's end tokens, so a generation runs to
/// `max_tokens` (tests that need a generation of known length).
const NO_END: &str = "logit_bias = { \"0\" = -100.0, \"2\" = -100.0, \"4\" = -100.0 }";

fn model() -> String {
    ferry_stack::model::ensure_default_model()
        .expect("default model available")
        .display()
        .to_string()
}

fn config(extra: &str) -> String {
    format!(
        r#"
concurrency = 4
step_timeout_secs = 120
apology = "sorry, later"
[models.smollm2]
path = "{model}"
[[route]]
model = "smollm2"
temperature = 0.0
max_tokens = 24
{extra}
"#,
        model = model()
    )
}

struct Inference {
    stop: CancellationToken,
    task: JoinHandle<Result<Arc<Stats>, inference::RunError>>,
    _file: tempfile::NamedTempFile,
}

async fn inference_replica(s: &common::Stack, config: &str) -> Inference {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut file, config.as_bytes()).unwrap();
    let client = s.nats.role(ferry_schema::topology::Role::Inference, "test-inference").connect().await.unwrap();
    let cfg = InferenceConfig::new(file.path());
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move { inference::run(client, &cfg, token).await });
    Inference { stop, task, _file: file }
}

fn chat(agent: &str, text: &str) -> Envelope {
    Envelope::new(
        AgentId::new(agent).unwrap(),
        EventBody::Chat(ChatMessage {
            chat: "Bob".into(),
            chat_type: ChatType::Direct,
            sender: "Bob".into(),
            text: text.into(),
            msg_type: MessageType::Text,
        }),
    )
}

async fn replies(js: &async_nats::jetstream::Context) -> HashMap<EventId, Vec<Reply>> {
    let mut out: HashMap<EventId, Vec<Reply>> = HashMap::new();
    for m in inspect::read_all(js, REPLIES_STREAM, "").await.unwrap() {
        let enc = Encoding::from_headers(m.headers.as_ref()).unwrap();
        let r = decode_reply(&m.payload, enc, DEFAULT_MAX_PAYLOAD).unwrap();
        out.entry(r.in_reply_to).or_default().push(r);
    }
    out
}

fn chat_body(r: &Reply) -> &ferry_schema::reply::ChatReply {
    match &r.body {
        ReplyBody::Chat(c) => c,
        other => panic!("not a chat reply: {other:?}"),
    }
}

#[tokio::test]
async fn chat_handed_over_by_rules_gets_a_model_reply() {
    let s = stack(TO_INFERENCE, Duration::from_secs(30)).await;
    let _rules = s.replica(16).await;
    let _inf = inference_replica(&s, &config("")).await;
    let event = chat("desk-1", "Hello! Where is my order?");
    publish(&s.js, &event, Encoding::Json, true).await;
    inspect::wait_for_count(&s.js, REPLIES_STREAM, 1, WAIT).await.unwrap();
    let all = replies(&s.js).await;
    let r = &all[&event.id][0];
    let c = chat_body(r);
    assert!(!c.content.as_deref().unwrap_or("").trim().is_empty(), "{c:?}");
    assert_eq!(c.answered_by.kind, ResponderKind::Model);
    assert_eq!(c.answered_by.name, "smollm2");
    assert!(c.tokens.unwrap() > 0);
    assert!(c.processing_ms > 0.0);
    assert!((0.0..=1.0).contains(&c.confidence));
    // Where the time went, as the engine measured it.
    let t = c.timings.as_ref().expect("a model answer carries its timings");
    assert_eq!(t.generated_tokens, c.tokens.unwrap());
    assert!(t.prompt_tokens > 10, "the chat template and the message: {t:?}");
    assert!(t.prompt_ms > 0.0 && t.generation_ms > 0.0 && t.queue_ms >= 0.0 && t.wait_ms >= 0.0, "{t:?}");
    assert!(t.prompt_ms + t.generation_ms <= c.processing_ms, "{t:?} within {} ms", c.processing_ms);
    assert_eq!((t.engine.as_str(), t.format.as_str()), ("mistral.rs", "as-is"));
    // The hand-off was consumed from the work queue.
    assert_eq!(inspect::count(&s.js, WORK_STREAM).await.unwrap(), 0);
    // The tokens are in the metrics, under the model's alias (summed over
    // the replicas of the other tests in this process, so at least these).
    let text = ferry_workers::metrics::global().encode();
    let series = format!("{}_total{{role=\"inference\",model=\"smollm2\",replica=", ferry_workers::metrics::MODEL_TOKENS);
    let counted: u64 = text
        .lines()
        .filter_map(|l| l.strip_prefix(series.as_str()))
        .filter_map(|rest| rest.rsplit(' ').next()?.trim().parse::<u64>().ok())
        .sum();
    assert!(text.contains(&series), "{series} missing in\n{text}");
    assert!(counted >= u64::from(c.tokens.unwrap()), "{counted} < {:?}", c.tokens);
}

#[tokio::test]
async fn prediction_request_gets_a_prediction() {
    let s = stack(TO_INFERENCE, Duration::from_secs(30)).await;
    let _inf = inference_replica(&s, &config("")).await;
    let at = |t: &str| format!("2026-11-22T{t}Z").parse().unwrap();
    let event = Envelope::new(
        AgentId::new("desk-2").unwrap(),
        EventBody::Predict(PredictRequest {
            recent: vec![
                RecentActivity { at: at("09:00:00"), app: "outlook.exe".into(), title: "Inbox (12)".into(), duration_ms: 300_000 },
                RecentActivity { at: at("09:05:00"), app: "excel.exe".into(), title: "Orders.xlsx".into(), duration_ms: 900_000 },
                RecentActivity { at: at("09:20:00"), app: "chrome.exe".into(), title: "Shipping - Admin".into(), duration_ms: 120_000 },
            ],
        }),
    );
    publish(&s.js, &event, Encoding::MsgPack, true).await;
    inspect::wait_for_count(&s.js, REPLIES_STREAM, 1, WAIT).await.unwrap();
    let all = replies(&s.js).await;
    let ReplyBody::Prediction(p) = &all[&event.id][0].body else {
        panic!("not a prediction")
    };
    assert!(!p.prediction.trim().is_empty(), "{p:?}");
    assert_eq!(p.model, "smollm2");
    assert!(p.processing_ms > 0.0);
    let t = p.timings.as_ref().expect("a model prediction carries its timings");
    assert!(t.prompt_tokens > 0 && t.generated_tokens > 0, "{t:?}");
}

#[tokio::test]
async fn routes_select_model_aliases() {
    let s = stack(TO_INFERENCE, Duration::from_secs(30)).await;
    let _rules = s.replica(16).await;
    // The same file backs both aliases; a group of agents gets the other one.
    let cfg = format!(
        r#"
concurrency = 2
[models.general]
path = "{m}"
[models.vip]
path = "{m}"
[groups]
vips = ["desk-2"]
[[route]]
groups = ["vips"]
model = "vip"
max_tokens = 8
[[route]]
model = "general"
max_tokens = 8
"#,
        m = model()
    );
    let _inf = inference_replica(&s, &cfg).await;
    let a = chat("desk-1", "hi");
    let b = chat("desk-2", "hi");
    publish(&s.js, &a, Encoding::MsgPack, true).await;
    publish(&s.js, &b, Encoding::MsgPack, true).await;
    inspect::wait_for_count(&s.js, REPLIES_STREAM, 2, WAIT).await.unwrap();
    let all = replies(&s.js).await;
    assert_eq!(chat_body(&all[&a.id][0]).answered_by.name, "general");
    assert_eq!(chat_body(&all[&b.id][0]).answered_by.name, "vip");
}

#[tokio::test]
async fn fallback_chain_records_which_step_answered() {
    let s = stack(TO_INFERENCE, Duration::from_secs(30)).await;
    let _rules = s.replica(16).await;
    // Primary broken, backup real: the backup answers.
    let cfg = format!(
        r#"
apology = "sorry, later"
[models.primary]
path = "/nonexistent/primary.gguf"
[models.backup]
path = "{m}"
[[route]]
model = "primary"
backup = "backup"
max_tokens = 8
"#,
        m = model()
    );
    let inf = inference_replica(&s, &cfg).await;
    let e1 = chat("desk-1", "hello");
    publish(&s.js, &e1, Encoding::MsgPack, true).await;
    inspect::wait_for_count(&s.js, REPLIES_STREAM, 1, WAIT).await.unwrap();
    inf.stop.cancel();
    inf.task.await.unwrap().unwrap();

    // Both broken: a template answers when one matches, else the apology.
    let both_broken = r#"
apology = "sorry, later"
[models.primary]
path = "/nonexistent/primary.gguf"
[models.backup]
path = "/nonexistent/backup.gguf"
[[route]]
model = "primary"
backup = "backup"
max_tokens = 8
[[template]]
keywords = ["ship"]
answer = "We ship within two working days."
"#;
    let _inf = inference_replica(&s, both_broken).await;
    let e2 = chat("desk-1", "Do you ship to Shenzhen?");
    let e3 = chat("desk-1", "hello again");
    publish(&s.js, &e2, Encoding::MsgPack, true).await;
    publish(&s.js, &e3, Encoding::MsgPack, true).await;
    inspect::wait_for_count(&s.js, REPLIES_STREAM, 3, WAIT).await.unwrap();
    let all = replies(&s.js).await;
    let by = |id: &EventId| chat_body(&all[id][0]).answered_by.clone();
    assert_eq!((by(&e1.id).kind, by(&e1.id).name.as_str()), (ResponderKind::Model, "backup"));
    assert_eq!(by(&e2.id).kind, ResponderKind::KbTemplate);
    assert_eq!(chat_body(&all[&e2.id][0]).content.as_deref(), Some("We ship within two working days."));
    assert_eq!(by(&e3.id).kind, ResponderKind::Apology);
    assert_eq!(chat_body(&all[&e3.id][0]).content.as_deref(), Some("sorry, later"));
}

#[tokio::test]
async fn knowledge_base_from_postgres_answers_when_the_models_cannot() {
    let s = stack(TO_INFERENCE, Duration::from_secs(30)).await;
    let pg = common::migrated_pg().await;
    let c = ferry_workers::state::connect_one(&pg.url()).await.unwrap();
    let kb_dir = ferry_harness::cargo::workspace_root().unwrap().join("ops/demo/kb");
    for a in ferry_workers::state::kb::load_path(&kb_dir).unwrap() {
        ferry_workers::state::kb::upsert(&c, &a).await.unwrap();
    }
    let _rules = s.replica(16).await;
    let cfg = r#"
apology = "sorry, later"
[models.primary]
path = "/nonexistent/primary.gguf"
[[route]]
model = "primary"
max_tokens = 8
"#;
    let mut file = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut file, cfg.as_bytes()).unwrap();
    let client = s.nats.role(ferry_schema::topology::Role::Inference, "test-inference").connect().await.unwrap();
    let mut icfg = InferenceConfig::new(file.path());
    icfg.db = Some(ferry_workers::state::DbConfig::new(pg.url()));
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move { inference::run(client, &icfg, token).await });

    let zh = chat("desk-1", "退款需要多久才能到账？");
    let en = chat("desk-1", "Do you accept WeChat Pay or Alipay?");
    let none = chat("desk-1", "hello again");
    for e in [&zh, &en, &none] {
        publish(&s.js, e, Encoding::MsgPack, true).await;
    }
    inspect::wait_for_count(&s.js, REPLIES_STREAM, 3, WAIT).await.unwrap();
    let all = replies(&s.js).await;
    let answer = |e: &Envelope| {
        let c = chat_body(&all[&e.id][0]);
        (c.answered_by.kind, c.answered_by.name.clone(), c.content.clone().unwrap_or_default())
    };
    let (kind, name, text) = answer(&zh);
    assert_eq!((kind, name.as_str()), (ResponderKind::KbTemplate, "refunds"));
    assert!(text.contains("3-5个工作日"), "{text}");
    let (kind, name, _) = answer(&en);
    assert_eq!((kind, name.as_str()), (ResponderKind::KbTemplate, "payment"));
    assert_eq!(answer(&none).0, ResponderKind::Apology);
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn two_replicas_answer_every_request_once() {
    const N: usize = 8;
    let s = stack(TO_INFERENCE, Duration::from_secs(30)).await;
    let _rules = s.replica(16).await;
    let a = inference_replica(&s, &config("")).await;
    let b = inference_replica(&s, &config("")).await;
    let events: Vec<_> = (0..N).map(|i| chat("desk-1", &format!("question number {i}?"))).collect();
    for e in &events {
        publish(&s.js, e, Encoding::MsgPack, true).await;
    }
    inspect::wait_for_count(&s.js, REPLIES_STREAM, N as u64, WAIT).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = replies(&s.js).await;
    assert_eq!(all.len(), N);
    assert!(all.values().all(|r| r.len() == 1));
    let mut done = 0;
    for r in [a, b] {
        r.stop.cancel();
        done += r.task.await.unwrap().unwrap().snapshot().done;
    }
    assert_eq!(done, N as u64, "each request handled once across replicas");
}

#[tokio::test]
async fn generation_longer_than_ack_wait_is_not_redelivered() {
    let s = stack(TO_INFERENCE, Duration::from_secs(30)).await;
    // The broker gives up on an unacknowledged message after 2 s.
    let mut def = topology::inference_chat_consumer();
    def.config.ack_wait = Duration::from_secs(2);
    topology::ensure_consumer(&s.js, &def).await.unwrap();
    let _rules = s.replica(16).await;
    // SmolLM2's end tokens are forbidden, so the generation surely runs
    // 150 tokens: several seconds, well past the 2 s ack_wait.
    let long = config(NO_END).replace("max_tokens = 24", "max_tokens = 150");
    let a = inference_replica(&s, &long).await;
    let b = inference_replica(&s, &long).await;
    let event = chat("desk-1", "Count from 1 to 200, separated by commas.");
    publish(&s.js, &event, Encoding::MsgPack, true).await;
    inspect::wait_for_count(&s.js, REPLIES_STREAM, 1, WAIT).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let all = replies(&s.js).await;
    let r = chat_body(&all[&event.id][0]);
    assert!(r.processing_ms > 2000.0, "the generation must outlast ack_wait to test anything: {} ms", r.processing_ms);
    assert_eq!(r.tokens, Some(150), "logit_bias kept the end tokens out, so it ran to max_tokens");
    assert_eq!(all[&event.id].len(), 1);
    let stream = s.js.get_stream(topology::WORK_STREAM).await.unwrap();
    let info = stream.consumer_info("inference-chat").await.unwrap();
    assert_eq!(info.num_redelivered, 0, "in-progress acks kept the message with its replica");
    let mut done = 0;
    for r in [a, b] {
        r.stop.cancel();
        done += r.task.await.unwrap().unwrap().snapshot().done;
    }
    assert_eq!(done, 1);
}

#[tokio::test]
async fn shutdown_while_generating_loses_nothing() {
    const N: usize = 4;
    let s = stack(TO_INFERENCE, Duration::from_secs(30)).await;
    let _rules = s.replica(16).await;
    let long = config(NO_END).replace("max_tokens = 24", "max_tokens = 64");
    let first = inference_replica(&s, &long).await;
    let events: Vec<_> = (0..N).map(|i| chat("desk-2", &format!("Tell me about product {i}."))).collect();
    for e in &events {
        publish(&s.js, e, Encoding::MsgPack, true).await;
    }
    // Stop while generations are under way (the replica holds messages and
    // none is answered yet): phase two lets them finish and publish.
    let work = s.js.get_stream(WORK_STREAM).await.unwrap();
    let started = std::time::Instant::now();
    loop {
        let info = work.consumer_info("inference-chat").await.unwrap();
        if info.num_ack_pending > 0 {
            break;
        }
        assert!(started.elapsed() < WAIT, "inference never took the work");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(inspect::count(&s.js, REPLIES_STREAM).await.unwrap(), 0, "stopping before any reply");
    first.stop.cancel();
    let stats = first.task.await.unwrap().unwrap().snapshot();
    assert_eq!(stats.in_flight, 0);
    assert!(stats.done >= 1, "generations in flight at shutdown were finished: {stats:?}");
    let answered_before = replies(&s.js).await.len() as u64;
    assert_eq!(answered_before, stats.done, "every finished generation was published before exit");
    // What the first replica did not take, a second one answers.
    let _second = inference_replica(&s, &long).await;
    inspect::wait_for_count(&s.js, REPLIES_STREAM, N as u64, WAIT).await.unwrap();
    let all = replies(&s.js).await;
    assert_eq!(all.len(), N);
    assert!(all.values().all(|r| r.len() == 1));
}

/// `format = "q8_0"`: a Q8_0 copy is made once beside the model with its
/// sha256 beside it, used as it is at the next start, made again when it
/// was damaged; a file already in the format is its own copy; and a worker
/// whose config asks for the format answers a chat from the copy.
#[tokio::test]
async fn a_q8_0_copy_is_made_once_checked_and_answers() {
    use ferry_workers::inference::weights::{self, Format};
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if std::fs::hard_link(model(), &src).is_err() {
        std::fs::copy(model(), &src).unwrap();
    }
    let prepare = |p: &std::path::Path| weights::prepared(p, Format::Q8_0).unwrap();
    let copy = prepare(&src);
    assert_eq!(copy, dir.path().join("SmolLM2-135M-Instruct.Q8_0.gguf"));
    let recorded = std::fs::read_to_string(dir.path().join("SmolLM2-135M-Instruct.Q8_0.gguf.sha256")).unwrap();
    let sum = weights::sha256_of(&copy).unwrap();
    assert_eq!(recorded.trim(), sum, "the copy's sha256 is recorded beside it");
    assert_ne!(sum, weights::sha256_of(&src).unwrap(), "the copy is a conversion, not the original");

    // The next start uses it as it is.
    let written = std::fs::metadata(&copy).unwrap().modified().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(prepare(&src), copy);
    assert_eq!(std::fs::metadata(&copy).unwrap().modified().unwrap(), written, "not made again");
    // A file already in Q8_0 is its own copy.
    assert_eq!(prepare(&copy), copy);

    // A damaged copy is made again, to the same bytes.
    std::fs::OpenOptions::new().write(true).open(&copy).unwrap().set_len(4096).unwrap();
    assert_eq!(prepare(&src), copy);
    assert_eq!(weights::sha256_of(&copy).unwrap(), sum, "the conversion is deterministic");

    // The worker runs the copy.
    let s = stack(TO_INFERENCE, Duration::from_secs(30)).await;
    let _rules = s.replica(16).await;
    let cfg = format!(
        "concurrency = 2\nstep_timeout_secs = 120\napology = \"sorry, later\"\n[models.smollm2]\npath = \"{}\"\nformat = \"q8_0\"\n[[route]]\nmodel = \"smollm2\"\ntemperature = 0.0\nmax_tokens = 16\n",
        src.display()
    );
    let _inf = inference_replica(&s, &cfg).await;
    let event = chat("desk-1", "Hello! Where is my order?");
    publish(&s.js, &event, Encoding::Json, true).await;
    inspect::wait_for_count(&s.js, REPLIES_STREAM, 1, WAIT).await.unwrap();
    let all = replies(&s.js).await;
    let c = chat_body(&all[&event.id][0]);
    assert_eq!(c.answered_by.kind, ResponderKind::Model, "{c:?}");
    assert!(c.tokens.unwrap() > 0 && !c.content.as_deref().unwrap_or("").trim().is_empty(), "{c:?}");
    assert_eq!(c.timings.as_ref().map(|t| t.format.as_str()), Some("Q8_0"), "the reply names the format it ran");
}

/// `--threads` is what the engine's kernels read (candle's own count), so a
/// worker on a shared machine can leave cores to the broker; the default is
/// one per core; 0 is refused before anything starts.
#[test]
fn the_engine_threads_follow_the_threads_flag() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut file, config("").as_bytes()).unwrap();
    let check = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry-worker"))
            .args(["--check", "inference", "--config"])
            .arg(file.path())
            .args(extra)
            .env_remove("RAYON_NUM_THREADS")
            .env_remove("FERRY_INFERENCE_THREADS")
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let (ok, said) = check(&["--threads", "1"]);
    assert!(ok && said.contains("; 1 engine threads"), "{said}");
    let cores = std::thread::available_parallelism().unwrap().get();
    let (ok, said) = check(&[]);
    assert!(ok && said.contains(&format!("; {cores} engine threads")), "{said}");
    let (ok, said) = check(&["--threads", "0"]);
    assert!(!ok && said.contains("--threads"), "{said}");
}

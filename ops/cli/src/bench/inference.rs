//! `ferry bench inference`: llama.cpp vs mistral.rs in one process vs the inference worker end to end.
//!
//! In one run, on the default model and the same cores: (a) llama.cpp through
//! llama-cpp-python (installed by `ops/bench/setup-llama-cpp.sh` into a venv
//! the benchmark owns), single stream; (b) mistral.rs in one process
//! through the worker's own engine (`ferry-worker bench-engine`), single
//! stream; (c) the `ferry-worker inference` process end to end
//! (hand-off published to `work.inference.chat`, reply received on the
//! agent's reply subject) at concurrency 1, 4, 8 and 16 (that many clients,
//! each sending its next request when its reply came). Prints tok/s,
//! replies/s, the time to first token p50/p99 (from each reply's timings:
//! queue, wait for a model slot, prompt) and the ratios of the issue's
//! targets.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use clap::Args;
use ferry_schema::codec::{decode_reply, encode_event, DEFAULT_MAX_PAYLOAD};
use ferry_schema::event::{ChatMessage, ChatType, MessageType};
use ferry_schema::subject::{self, WorkQueue};
use ferry_schema::topology::{self, StreamSettings};
use ferry_schema::reply::ChatReply;
use ferry_schema::{headers, AgentId, Encoding, Envelope, EventBody, EventId, ReplyBody};
use tokio::sync::oneshot;
use ferry_stack::NatsServer;
use futures::StreamExt;

use crate::procs::{Spec, Supervised};

use super::common::{cores, median_of, verdict};

#[derive(Debug, Args)]
pub struct InferenceBench {
    /// Tokens generated per request.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Timed runs of the single-stream measurements (a) and (b).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Requests per concurrency level in (c), as a multiple of the level.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Skip (a) (no llama-cpp-python).
    #[arg(long)]
    no_llama_cpp: bool,
    /// The weights' format for (b) and (c), as `format` in the inference
    /// config (the demo's is q8_0); (a) always runs the shipped Q4_1 file.
    #[arg(long, default_value = "q8_0")]
    format: String,
}

/// The concurrency levels of (c).
const LEVELS: [usize; 4] = [1, 4, 8, 16];

const SYSTEM: &str = "You are a helpful customer-service assistant. Answer briefly.";
/// SmolLM2's end-of-generation tokens (`<|endoftext|>`, `<|im_end|>`,
/// `<reponame>`), forbidden in every measurement so each generation runs to
/// `--max-tokens`, as `llama_cpp_bench.py` does for llama.cpp.
const END_TOKENS: [u32; 3] = [0, 2, 4];
/// Asks for long output, so generations run to `max_tokens` and tok/s compares like with like.
const PROMPT: &str = "A customer asks: please list every step of returning an order, in detail, numbered from 1 to 50.";

fn repo_file(rel: &str) -> PathBuf {
    // The checkout `cargo run` started from; else where this was compiled.
    crate::checkout::root()
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")))
        .join(rel)
}

/// (a): llama.cpp through llama-cpp-python, median tok/s.
fn llama_cpp(model: &std::path::Path, args: &InferenceBench) -> anyhow::Result<f64> {
    let setup = repo_file("ops/bench/setup-llama-cpp.sh");
    eprintln!("  (a) preparing llama-cpp-python (first time: builds llama.cpp, takes minutes) ...");
    let status = Command::new("bash").arg(&setup).status().context("running setup-llama-cpp.sh")?;
    anyhow::ensure!(status.success(), "{} failed", setup.display());
    let venv = std::env::var_os("FERRY_BENCH_VENV")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/ferry/bench-venv")))
        .context("HOME is not set")?;
    let out = Command::new(venv.join("bin/python"))
        .arg(repo_file("ops/bench/llama_cpp_bench.py"))
        .arg("--model")
        .arg(model)
        .args(["--max-tokens", &args.max_tokens.to_string()])
        .args(["--runs", &args.runs.to_string()])
        .args(["--prompt", PROMPT])
        .output()
        .context("running llama_cpp_bench.py")?;
    anyhow::ensure!(out.status.success(), "llama_cpp_bench.py failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(line).context("parsing llama_cpp_bench.py output")?;
    if let Some(runs) = v["runs"].as_array() {
        for r in runs {
            eprintln!("  (a) run: {} tokens in {:.2}s", r["tokens"], r["seconds"].as_f64().unwrap_or(0.0));
        }
    }
    v["tok_per_s_median"].as_f64().context("no tok_per_s_median in llama_cpp_bench.py output")
}

/// (b): `ferry-worker bench-engine`, the worker's own engine in its own
/// process; the CLI does not link mistral.rs.
fn mistral_one_process(worker: &std::path::Path, model: &std::path::Path, args: &InferenceBench) -> anyhow::Result<f64> {
    let out = Command::new(worker)
        .arg("bench-engine")
        .arg("--model")
        .arg(model)
        .args(["--system", SYSTEM, "--prompt", PROMPT])
        .args(["--max-tokens", &args.max_tokens.to_string(), "--runs", &args.runs.to_string()])
        .arg("--forbid")
        .arg(END_TOKENS.map(|t| t.to_string()).join(","))
        .args(["--format", &args.format])
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {} bench-engine", worker.display()))?;
    anyhow::ensure!(out.status.success(), "{} bench-engine failed ({})", worker.display(), out.status);
    let mut rates = Vec::new();
    // The worker's logs share stdout with the runs: a run is a JSON line
    // with `tokens`. The first run warms up.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let runs = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok().filter(|v| v.get("tokens").is_some()).map(|v| (l, v)));
    for (i, (line, run)) in runs.enumerate().skip(1) {
        let (tokens, secs) = (run["tokens"].as_f64().unwrap_or(0.0), run["secs"].as_f64().unwrap_or(0.0));
        anyhow::ensure!(secs > 0.0, "bench-engine run {i}: {line}");
        rates.push(tokens / secs);
        eprintln!("  (b) run {i}: {tokens} tokens in {secs:.2}s");
    }
    Ok(median_of(rates))
}

struct Level {
    concurrency: usize,
    tok_per_s: f64,
    replies_per_s: f64,
    /// Time to first token, milliseconds: p50 and p99 over the replies.
    ttft_ms: (f64, f64),
}

/// A request's reply: awaited by its client, or come first.
enum Awaited {
    Waiting(oneshot::Sender<ChatReply>),
    Arrived(ChatReply),
}

/// The time to first token a reply's timings give: its time in the
/// stream, waiting for a model slot, and reading the prompt.
fn ttft_ms(t: &ferry_schema::reply::Timings) -> f64 {
    t.queue_ms + t.wait_ms + t.prompt_ms
}

/// The `p`-th quantile (0 to 1) of `v`, nearest rank; NaN when empty.
fn quantile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or(f64::NAN)
}

/// (c): the worker end to end at one concurrency level.
async fn worker_e2e(worker_bin: &std::path::Path, model: &std::path::Path, concurrency: usize, args: &InferenceBench) -> anyhow::Result<Level> {
    let nats = NatsServer::start_temp()?;
    let agent = AgentId::new("desk-1")?;
    let op = nats.operator("bench").connect().await?;
    let js = jetstream::new(op.clone());
    topology::provision(&js, &StreamSettings::default(), std::slice::from_ref(&agent)).await?;
    let cfg_path = nats.dir().join("inference.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "concurrency = {concurrency}\nstep_timeout_secs = 600\nsystem_prompt = \"{SYSTEM}\"\n[models.m]\npath = \"{}\"\nformat = \"{}\"\n[[route]]\nmodel = \"m\"\ntemperature = 0.0\ntop_p = 1.0\nmax_tokens = {}\nlogit_bias = {{ {} }}\n",
            model.display(),
            args.format,
            args.max_tokens,
            END_TOKENS.map(|id| format!("\"{id}\" = -100.0")).join(", ")
        ),
    )?;
    // The worker as a deployment runs it: its own process and NATS user.
    let env = vec![
        ("NATS_URL".to_string(), nats.url()),
        ("NATS_USER".to_string(), topology::Role::Inference.as_str().to_string()),
        ("NATS_PASSWORD".to_string(), nats.secrets().role(topology::Role::Inference).to_string()),
    ];
    let log = nats.dir().join("inference.log");
    let args_ = vec!["inference".to_string(), "--config".to_string(), cfg_path.display().to_string()];
    let worker = Supervised::start("inference".into(), Spec { program: worker_bin.to_path_buf(), args: args_, env, log })?;
    let mut replies = op.subscribe(subject::reply(&agent)).await?;
    // Warm up: one request, not timed (model load, first-token kernels).
    let send = |text: String| {
        let js = js.clone();
        let agent = agent.clone();
        async move {
            let env = Envelope::new(
                agent,
                EventBody::Chat(ChatMessage {
                    chat: "bench".into(),
                    chat_type: ChatType::Direct,
                    sender: "bench".into(),
                    text,
                    msg_type: MessageType::Text,
                }),
            );
            let h = headers::for_publish(env.id.text(), Encoding::MsgPack, None);
            js.publish_with_headers(WorkQueue::InferenceChat.subject(), h, encode_event(&env, Encoding::MsgPack)?.into())
                .await?
                .await?;
            anyhow::Ok(env.id)
        }
    };
    send(PROMPT.to_string()).await?;
    tokio::time::timeout(Duration::from_secs(600), replies.next()).await?.context("no warm-up reply")?;
    // `concurrency` clients, each sending its next request when its reply
    // came (a closed loop), `rounds` requests each: the first-token time is
    // then the engine's, not a burst's queue.
    let waiting: Arc<Mutex<HashMap<EventId, Awaited>>> = Arc::default();
    let router = {
        let waiting = waiting.clone();
        tokio::spawn(async move {
            while let Some(m) = replies.next().await {
                let Ok(r) = decode_reply(&m.payload, Encoding::MsgPack, DEFAULT_MAX_PAYLOAD) else { continue };
                let ReplyBody::Chat(c) = r.body else { continue };
                let mut w = waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                match w.remove(&r.in_reply_to) {
                    Some(Awaited::Waiting(to)) => {
                        let _ = to.send(c);
                    }
                    // Came before its client registered (or a stray): kept for it.
                    _ => {
                        w.insert(r.in_reply_to, Awaited::Arrived(c));
                    }
                }
            }
        })
    };
    let n = concurrency * args.rounds.max(1);
    let started = Instant::now();
    let clients = (0..concurrency).map(|client| {
        let (send, waiting, rounds) = (&send, waiting.clone(), args.rounds.max(1));
        async move {
            let mut got = Vec::with_capacity(rounds);
            for round in 0..rounds {
                let text = format!("{PROMPT} (client {client}, request {round})");
                let id = send(text).await?;
                let (tx, rx) = oneshot::channel();
                let early = {
                    let mut w = waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    match w.remove(&id) {
                        Some(Awaited::Arrived(c)) => Some(c),
                        _ => {
                            w.insert(id, Awaited::Waiting(tx));
                            None
                        }
                    }
                };
                let reply = match early {
                    Some(c) => c,
                    None => tokio::time::timeout(Duration::from_secs(900), rx).await?.context("the reply router stopped")?,
                };
                got.push(reply);
            }
            anyhow::Ok(got)
        }
    });
    let answered: Vec<ChatReply> = futures::future::try_join_all(clients).await?.into_iter().flatten().collect();
    router.abort();
    let tokens: u64 = answered.iter().map(|c| u64::from(c.tokens.unwrap_or(0))).sum();
    let ttft: Vec<f64> = answered.iter().filter_map(|c| c.timings.as_ref().map(ttft_ms)).collect();
    anyhow::ensure!(ttft.len() == n, "{} of {n} replies carried no timings: not answered by the model?", n - ttft.len());
    let secs = started.elapsed().as_secs_f64();
    worker.stop().await;
    eprintln!("  (c) concurrency {concurrency}: {n} replies, {tokens} tokens in {secs:.1}s");
    Ok(Level {
        concurrency,
        tok_per_s: tokens as f64 / secs,
        replies_per_s: n as f64 / secs,
        ttft_ms: (quantile(ttft.clone(), 0.5), quantile(ttft, 0.99)),
    })
}

pub async fn run(args: InferenceBench) -> anyhow::Result<()> {
    let model = tokio::task::spawn_blocking(ferry_stack::model::ensure_default_model).await??;
    eprintln!(
        "ferry bench inference: {} ({} tokens per request, {} cores)",
        model.display(),
        args.max_tokens,
        cores()
    );
    let a = if args.no_llama_cpp {
        None
    } else {
        Some(llama_cpp(&model, &args)?)
    };
    let worker = crate::procs::worker_binary(None)?;
    let b = mistral_one_process(&worker, &model, &args)?;
    let mut levels = Vec::new();
    for c in LEVELS {
        levels.push(worker_e2e(&worker, &model, c, &args).await?);
    }
    println!("| measurement | tok/s | replies/s | first token p50 | first token p99 |");
    println!("|---|---:|---:|---:|---:|");
    if let Some(a) = a {
        println!("| (a) llama.cpp (llama-cpp-python), single stream | {a:.1} | | | |");
    }
    println!("| (b) mistral.rs in one process (ferry-worker bench-engine), single stream | {b:.1} | | | |");
    for l in &levels {
        println!(
            "| (c) inference worker end to end, concurrency {} | {:.1} | {:.2} | {:.0} ms | {:.0} ms |",
            l.concurrency, l.tok_per_s, l.replies_per_s, l.ttft_ms.0, l.ttft_ms.1
        );
    }
    println!();
    let at = |c: usize| levels.iter().find(|l| l.concurrency == c);
    let (Some(l1), Some(l8)) = (at(1), at(8)) else { anyhow::bail!("levels 1 and 8 are measured") };
    let (c1, c8) = (l1.tok_per_s, l8.tok_per_s);
    let ttft_ratio = l8.ttft_ms.0 / l1.ttft_ms.0;
    println!(
        "first token p50 at concurrency 8 vs 1: {ttft_ratio:.2}x (target <= 2.00x) {}",
        verdict(ttft_ratio <= 2.0)
    );
    println!("(c) at concurrency 1 vs (b): {:.2}x (target within 5%) {}", c1 / b, verdict((c1 / b - 1.0).abs() <= 0.05));
    if let Some(a) = a {
        println!("(c) single stream vs (a): {:.2}x (target >= 1.00x) {}", c1 / a, verdict(c1 >= a));
        println!("(c) aggregate at concurrency 8 vs (a): {:.2}x (target >= 3.00x) {}", c8 / a, verdict(c8 >= 3.0 * a));
    }
    Ok(())
}

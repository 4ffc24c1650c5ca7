//! `ferry bench ...`: benchmarks that run their baseline in the same run and print the ratio.
//!
//! `ferry bench rules` measures, on a fresh real nats-server per scenario:
//! (a) a raw JetStream round trip with no application logic: publish to
//! `EVENTS`, a pull consumer republishes each message to `replies.<agent>`
//! (stored in `REPLIES`) and acks, a plain subscriber receives; and (b) the
//! same load through the real agent (its publisher, its reply consumer) and
//! the real rules worker. Both run at full rate (unthrottled, bounded
//! publish window) and at half of (a)'s full rate. Latency is from publish to
//! reply receipt.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer::pull};
use clap::{Args, Subcommand};
use ferry_agent::{Agent, AgentConfig};
use ferry_schema::codec::encode_event;
use ferry_schema::event::{ChatMessage, ChatType, MessageType};
use ferry_schema::topology::{self, StreamSettings, EVENTS_STREAM};
use ferry_schema::{headers, subject, AgentId, Encoding, Envelope, EventBody, EventId};
use ferry_stack::NatsServer;
use ferry_workers::rules::{self, RulesConfig};
use futures::{Stream, StreamExt};
use hdrhistogram::Histogram;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Raw JetStream round trip vs the real agent + rules worker.
    Rules(RulesBench),
    /// llama.cpp vs mistral.rs in-process vs the inference worker end to end.
    Inference(crate::bench_inference::InferenceBench),
    /// Raw COPY into the events table vs the archiver from JetStream.
    Archiver(crate::bench_archiver::ArchiverBench),
    /// The agent's RSS and CPU at 1 event/s, spool write rate, drain rate after an outage.
    Agent(crate::bench_agent::AgentBench),
}

#[derive(Debug, Args)]
pub struct RulesBench {
    /// Events per scenario.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Messages in flight in the consumer (rules worker max_in_flight; same for the raw republisher).
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Publishes awaiting a JetStream ack (agent publish_window; same for the raw publisher).
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Runs of each scenario; the table shows medians.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
}

const BENCH_RULES: &str = r#"
[[rule]]
name = "bench"
action = "reply"
template = "echo: {text}"
"#;

/// The result of one scenario.
#[derive(Debug, Clone, Copy)]
struct Measured {
    events_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Raw,
    Ferry,
}

pub async fn run(cmd: BenchCmd) -> anyhow::Result<()> {
    match cmd {
        BenchCmd::Rules(args) => rules_bench(args).await,
        BenchCmd::Inference(args) => crate::bench_inference::run(args).await,
        BenchCmd::Archiver(args) => crate::bench_archiver::run(args).await,
        BenchCmd::Agent(args) => crate::bench_agent::run(args).await,
    }
}

async fn rules_bench(args: RulesBench) -> anyhow::Result<()> {
    anyhow::ensure!(args.events > 0, "--events must be at least 1");
    anyhow::ensure!(args.repeat > 0, "--repeat must be at least 1");
    eprintln!(
        "ferry bench rules: {} events per scenario, concurrency {}, publish window {}, {} repeats, {} cores",
        args.events,
        args.concurrency,
        args.window,
        args.repeat,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    // (a) and (b) alternate, so drift on a shared machine hits both alike.
    let mut full = (Vec::new(), Vec::new());
    for i in 0..args.repeat {
        eprintln!("  full rate, repeat {}/{}", i + 1, args.repeat);
        full.0.push(scenario(Path::Raw, None, &args).await.context("(a) full rate")?);
        full.1.push(scenario(Path::Ferry, None, &args).await.context("(b) full rate")?);
    }
    let half = median(&full.0, |m| m.events_per_s) / 2.0;
    let mut halves = (Vec::new(), Vec::new());
    for i in 0..args.repeat {
        eprintln!("  half rate ({half:.0}/s), repeat {}/{}", i + 1, args.repeat);
        halves.0.push(scenario(Path::Raw, Some(half), &args).await.context("(a) half rate")?);
        halves.1.push(scenario(Path::Ferry, Some(half), &args).await.context("(b) half rate")?);
    }

    println!("Median of {} runs each:", args.repeat);
    println!();
    println!("| scenario | rate | events/s | p50 ms | p99 ms |");
    println!("|---|---|---:|---:|---:|");
    let half_label = format!("half ({half:.0}/s)");
    for (name, rate, runs) in [
        ("(a) raw JetStream round trip", "full", &full.0),
        ("(b) agent + rules worker", "full", &full.1),
        ("(a) raw JetStream round trip", half_label.as_str(), &halves.0),
        ("(b) agent + rules worker", half_label.as_str(), &halves.1),
    ] {
        println!(
            "| {name} | {rate} | {:.0} | {:.2} | {:.2} |",
            median(runs, |m| m.events_per_s),
            median(runs, |m| m.p50_ms),
            median(runs, |m| m.p99_ms)
        );
    }
    let thr = median(&full.1, |m| m.events_per_s) / median(&full.0, |m| m.events_per_s);
    let p99 = median(&halves.1, |m| m.p99_ms) / median(&halves.0, |m| m.p99_ms);
    println!();
    println!(
        "throughput (b)/(a) at full rate: {thr:.2}x (target >= 0.80x) {}",
        verdict(thr >= 0.8)
    );
    println!(
        "p99 latency (b)/(a) at half rate: {p99:.2}x (target <= 1.50x) {}",
        verdict(p99 <= 1.5)
    );
    let each = |runs: &(Vec<Measured>, Vec<Measured>), f: fn(&Measured) -> f64| {
        runs.0
            .iter()
            .zip(&runs.1)
            .map(|(a, b)| format!("{:.2}", f(b) / f(a)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("per repeat, throughput ratio: {}", each(&full, |m| m.events_per_s));
    println!("per repeat, p99 ratio at half rate: {}", each(&halves, |m| m.p99_ms));
    Ok(())
}

pub(crate) fn median_of(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn median(runs: &[Measured], f: impl Fn(&Measured) -> f64) -> f64 {
    median_of(runs.iter().map(f).collect())
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

fn events(n: usize, agent: &AgentId) -> Vec<Envelope> {
    (0..n)
        .map(|i| {
            Envelope::new(
                agent.clone(),
                EventBody::Chat(ChatMessage {
                    chat: "bench".into(),
                    chat_type: ChatType::Direct,
                    sender: "bench".into(),
                    text: format!("message number {i}"),
                    msg_type: MessageType::Text,
                }),
            )
        })
        .collect()
}

/// Yields `items` at `rate` per second (or as fast as taken), stamping each
/// one's send time in `sent` as it is yielded.
fn paced(
    items: Vec<Envelope>,
    rate: Option<f64>,
    sent: Arc<Mutex<HashMap<EventId, Instant>>>,
) -> impl Stream<Item = Envelope> {
    // The clock starts at the first send, not when the stream is built.
    let start = Arc::new(std::sync::OnceLock::new());
    futures::stream::iter(items.into_iter().enumerate()).then(move |(i, e)| {
        let (sent, start) = (sent.clone(), start.clone());
        async move {
            if let Some(r) = rate {
                let start = *start.get_or_init(Instant::now);
                let due = start + Duration::from_secs_f64(i as f64 / r);
                tokio::time::sleep_until(due.into()).await;
            }
            if let Ok(mut s) = sent.lock() {
                s.insert(e.id, Instant::now());
            }
            e
        }
    })
}

struct Recorder {
    sent: Arc<Mutex<HashMap<EventId, Instant>>>,
    hist: Histogram<u64>,
    received: usize,
    first: Option<Instant>,
    last: Instant,
}

impl Recorder {
    fn new(sent: Arc<Mutex<HashMap<EventId, Instant>>>) -> anyhow::Result<Self> {
        Ok(Self {
            sent,
            hist: Histogram::new(3)?,
            received: 0,
            first: None,
            last: Instant::now(),
        })
    }

    fn record(&mut self, id: EventId) {
        let now = Instant::now();
        let start = self.sent.lock().ok().and_then(|mut s| s.remove(&id));
        if let Some(t) = start {
            let us = u64::try_from(now.duration_since(t).as_micros()).unwrap_or(u64::MAX);
            let _ = self.hist.record(us.max(1));
            self.received += 1;
            self.first.get_or_insert(t);
            self.last = now;
        }
    }

    fn result(&self) -> Measured {
        let elapsed = self
            .first
            .map(|f| self.last.duration_since(f).as_secs_f64())
            .unwrap_or(f64::INFINITY);
        Measured {
            events_per_s: self.received as f64 / elapsed,
            p50_ms: self.hist.value_at_quantile(0.5) as f64 / 1e3,
            p99_ms: self.hist.value_at_quantile(0.99) as f64 / 1e3,
        }
    }
}

async fn scenario(path: Path, rate: Option<f64>, args: &RulesBench) -> anyhow::Result<Measured> {
    let nats = NatsServer::start_temp()?;
    let agent_id = AgentId::new("desk-1")?;
    let op = nats.operator("bench operator").connect().await?;
    let js = jetstream::new(op.clone());
    topology::provision(&js, &StreamSettings::default(), std::slice::from_ref(&agent_id)).await?;
    let sent = Arc::new(Mutex::new(HashMap::new()));
    let mut rec = Recorder::new(sent.clone())?;
    let stop = CancellationToken::new();
    let n = args.events;
    let input = paced(events(n, &agent_id), rate, sent);
    let deadline = Duration::from_secs(300);

    match path {
        Path::Raw => {
            // Publisher and subscriber share one connection, as the agent's
            // publisher and reply receiver do.
            let agent_conn = nats.operator("bench agent side").connect().await?;
            let mut replies = agent_conn.subscribe(subject::reply(&agent_id)).await?;
            agent_conn.flush().await?;
            let republisher = tokio::spawn(raw_republisher(
                nats.operator("bench republisher").connect().await?,
                args.concurrency,
                stop.clone(),
            ));
            let pub_js = jetstream::ContextBuilder::new()
                .max_ack_inflight(args.window)
                .backpressure_on_inflight(true)
                .build(agent_conn.clone());
            let window = args.window;
            let publisher = tokio::spawn(async move {
                input
                    .map(|e| {
                        let js = pub_js.clone();
                        async move {
                            let payload = encode_event(&e, Encoding::MsgPack)?;
                            let h = headers::for_publish(&e.id.to_string(), Encoding::MsgPack, None);
                            js.publish_with_headers(subject::event(&e.agent, e.kind()), h, payload.into())
                                .await?
                                .await?;
                            anyhow::Ok(())
                        }
                    })
                    .buffer_unordered(window)
                    .collect::<Vec<_>>()
                    .await
                    .into_iter()
                    .collect::<anyhow::Result<Vec<_>>>()
            });
            let started = Instant::now();
            while rec.received < n && started.elapsed() < deadline {
                let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(10), replies.next()).await else {
                    break;
                };
                if let Some(id) = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(headers::MSG_ID))
                    .and_then(|v| v.as_str().parse::<EventId>().ok())
                {
                    rec.record(id);
                }
            }
            publisher.await??;
            stop.cancel();
            republisher.await??;
        }
        Path::Ferry => {
            // The server's dir is removed with the server.
            let rules_file = nats.dir().join("bench-rules.toml");
            std::fs::write(&rules_file, BENCH_RULES)?;
            let mut cfg = RulesConfig::new(&rules_file);
            cfg.consume.max_in_flight = args.concurrency;
            let worker_client = nats.workers("bench rules").connect().await?;
            let worker_stop = stop.clone();
            let worker = tokio::spawn(async move { rules::run(worker_client, &cfg, worker_stop).await });
            let conn = nats.agent(&agent_id).context("no desk-1 user")?;
            let mut acfg = AgentConfig::new(agent_id.clone(), conn);
            acfg.publish_window = args.window;
            acfg.reply_batch = args.concurrency;
            let agent = Agent::connect(acfg).await?;
            let (tx, mut rx) = tokio::sync::mpsc::channel(args.concurrency);
            let receiver = tokio::spawn({
                let (agent, stop) = (agent.clone(), stop.clone());
                async move { agent.receive_replies(tx, stop).await }
            });
            let publisher = tokio::spawn({
                let (agent, stop) = (agent.clone(), stop.clone());
                async move { agent.publish_all(input, &stop, |_, _| {}).await }
            });
            let started = Instant::now();
            while rec.received < n && started.elapsed() < deadline {
                let Ok(Some(r)) = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await else {
                    break;
                };
                rec.record(r.in_reply_to);
            }
            publisher.await??;
            stop.cancel();
            receiver.await??;
            worker.await??;
        }
    }
    anyhow::ensure!(
        rec.received == n,
        "{path:?}: only {} of {n} replies arrived",
        rec.received
    );
    Ok(rec.result())
}

/// The baseline's "worker": pull, republish the payload to the agent's reply
/// subject (awaiting the stream's ack), ack. Same concurrency bound as the
/// rules worker; no decoding, no rules.
async fn raw_republisher(
    client: async_nats::Client,
    concurrency: usize,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(concurrency * 2)
        .backpressure_on_inflight(true)
        .build(client);
    let mut def = topology::rules_consumer();
    def.config.durable_name = Some("bench-raw".into());
    topology::ensure_consumer(&js, &def).await?;
    let consumer = js
        .get_consumer_from_stream::<pull::Config, _, _>("bench-raw", EVENTS_STREAM)
        .await?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(concurrency)
        .messages()
        .await?;
    let permits = Arc::new(Semaphore::new(concurrency));
    let agent = AgentId::new("desk-1")?;
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            p = permits.clone().acquire_owned() => p?,
        };
        let msg = tokio::select! {
            _ = stop.cancelled() => break,
            m = messages.next() => match m {
                Some(Ok(m)) => m,
                Some(Err(_)) => continue,
                None => break,
            },
        };
        let js = js.clone();
        let subject = subject::reply(&agent);
        tasks.spawn(async move {
            let mut h = async_nats::HeaderMap::new();
            if let Some(id) = msg.headers.as_ref().and_then(|h| h.get(headers::MSG_ID)) {
                h.insert(headers::MSG_ID, id.clone());
            }
            if let Ok(ack) = js.publish_with_headers(subject, h, msg.payload.clone()).await {
                if ack.await.is_ok() {
                    let _ = msg.ack().await;
                }
            }
            drop(permit);
        });
    }
    tasks.close();
    tasks.wait().await;
    Ok(())
}

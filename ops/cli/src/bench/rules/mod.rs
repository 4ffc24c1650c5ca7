//! `ferry bench rules`: a raw JetStream round trip against the real agent and rules worker, in the same run.
//!
//! It measures, on a fresh real nats-server per scenario:
//! (a) a raw JetStream round trip with no application logic: publish to
//! `EVENTS`, a pull consumer republishes each message to `replies.<agent>`
//! (stored in `REPLIES`) and acks, a plain subscriber receives; and (b) the
//! same load through the real agent (its publisher, its reply receiver) and
//! the real rules worker. Both run at full rate (unthrottled, bounded
//! publish window) and at half of (a)'s full rate. Latency is from publish to
//! reply receipt; every scenario records a reply where it is received (in
//! the subscription loop, or in the agent's reply handler), with no queue
//! in between.
//!
//! `--decompose` adds three mixed scenarios to see where (b) loses: (r) (a)
//! with its subscriber on the reply stream's republish (`live.replies.<agent>`,
//! where the agent reads) instead of the reply subject; (w) (a)'s publisher
//! and plain subscriber around the real rules worker; and (p) the agent's
//! publisher with the rules worker and a plain subscriber. (r) against (a) is
//! the cost of receiving from the stream rather than from the publisher; (w)
//! against (a) is the worker's cost; (p) against (w) the agent publisher's;
//! (b) against (p) the agent's reply receiver's (live replies, and the last
//! pass that acks their copies in its consumer, reported apart).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer::pull};
use clap::Args;
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

use super::common::{cores, cpu_ticks, median_of, verdict};

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
    /// Runs of each scenario, alternating; the table shows medians. Fewer
    /// than about 15 cannot tell 0.78x from 0.82x on a shared 2-core machine
    /// (BENCHMARKS.md); a run of 15 takes about two minutes.
    #[arg(long, default_value_t = 15)]
    repeat: usize,
    /// Also run three mixed scenarios at full and half rate, to see where
    /// (b) loses against (a): (r) (a) with its subscriber on the reply
    /// stream's republish, where the agent reads; (w) the raw publisher and
    /// a plain subscriber around the real rules worker; (p) the agent's
    /// publisher and the rules worker, replies read by a plain subscriber
    /// (not the agent's reply receiver).
    #[arg(long)]
    decompose: bool,
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
    /// CPU time of nats-server per event, µs.
    broker_us: f64,
    /// CPU time of this process (publisher, middle, receiver) per event, µs.
    clients_us: f64,
    /// (b) only: the agent's last reply pass after the measured window
    /// (it acks the consumer's copy of each reply that came live):
    /// wall time in ms, broker and client CPU per event in µs.
    after: (f64, f64, f64),
}

/// What stands between the publisher and the receiver of a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// (a): raw publisher, raw republisher, plain subscriber.
    Raw,
    /// (r): (a) with the plain subscriber on the reply stream's republish.
    RawLive,
    /// (b): the agent (publisher and reply receiver), the rules worker.
    Ferry,
    /// (w): raw publisher, the rules worker, plain subscriber.
    WorkerOnly,
    /// (p): the agent's publisher, the rules worker, plain subscriber.
    AgentPublish,
}

impl Path {
    fn label(self) -> &'static str {
        match self {
            Self::Raw => "(a) raw JetStream round trip",
            Self::RawLive => "(r) raw round trip, replies read from the stream's republish",
            Self::Ferry => "(b) agent + rules worker",
            Self::WorkerOnly => "(w) raw publisher + rules worker + plain subscriber",
            Self::AgentPublish => "(p) agent publisher + rules worker + plain subscriber",
        }
    }
}

pub async fn run(args: RulesBench) -> anyhow::Result<()> {
    anyhow::ensure!(args.events > 0, "--events must be at least 1");
    anyhow::ensure!(args.repeat > 0, "--repeat must be at least 1");
    eprintln!(
        "ferry bench rules: {} events per scenario, concurrency {}, publish window {}, {} repeats, {} cores",
        args.events,
        args.concurrency,
        args.window,
        args.repeat,
        cores()
    );
    let mut paths = vec![Path::Raw, Path::Ferry];
    if args.decompose {
        paths.extend([Path::RawLive, Path::WorkerOnly, Path::AgentPublish]);
    }
    // The scenarios alternate, so drift on a shared machine hits all alike.
    let mut full: Vec<Vec<Measured>> = vec![Vec::new(); paths.len()];
    for i in 0..args.repeat {
        eprintln!("  full rate, repeat {}/{}", i + 1, args.repeat);
        for (k, p) in paths.iter().enumerate() {
            full[k].push(scenario(*p, None, &args).await.with_context(|| format!("{} at full rate", p.label()))?);
        }
    }
    let half = median(&full[0], |m| m.events_per_s) / 2.0;
    let mut halves: Vec<Vec<Measured>> = vec![Vec::new(); paths.len()];
    for i in 0..args.repeat {
        eprintln!("  half rate ({half:.0}/s), repeat {}/{}", i + 1, args.repeat);
        for (k, p) in paths.iter().enumerate() {
            halves[k].push(
                scenario(*p, Some(half), &args)
                    .await
                    .with_context(|| format!("{} at half rate", p.label()))?,
            );
        }
    }

    println!("Median of {} runs each:", args.repeat);
    println!();
    println!("| scenario | rate | events/s | p50 ms | p99 ms | broker CPU µs/event | client CPU µs/event |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    let half_label = format!("half ({half:.0}/s)");
    for (rate, runs) in [("full", &full), (half_label.as_str(), &halves)] {
        for (k, p) in paths.iter().enumerate() {
            println!(
                "| {} | {rate} | {:.0} | {:.2} | {:.2} | {:.1} | {:.1} |",
                p.label(),
                median(&runs[k], |m| m.events_per_s),
                median(&runs[k], |m| m.p50_ms),
                median(&runs[k], |m| m.p99_ms),
                median(&runs[k], |m| m.broker_us),
                median(&runs[k], |m| m.clients_us)
            );
        }
    }
    let thr = median(&full[1], |m| m.events_per_s) / median(&full[0], |m| m.events_per_s);
    let p99 = median(&halves[1], |m| m.p99_ms) / median(&halves[0], |m| m.p99_ms);
    println!();
    println!(
        "throughput (b)/(a) at full rate: {thr:.2}x (target >= 0.80x) {}",
        verdict(thr >= 0.8)
    );
    println!(
        "p99 latency (b)/(a) at half rate: {p99:.2}x (target <= 1.50x) {}",
        verdict(p99 <= 1.5)
    );
    let each = |runs: &[Vec<Measured>], k: usize, f: fn(&Measured) -> f64| {
        runs[0]
            .iter()
            .zip(&runs[k])
            .map(|(a, b)| format!("{:.2}", f(b) / f(a)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let cpu_of = |runs: &[Measured]| median(runs, |m| m.broker_us + m.clients_us);
    println!(
        "CPU per event (b)/(a) at full rate: {:.2}x (broker {:.2}x, clients {:.2}x); no target, steadier than the rates on a shared machine",
        cpu_of(&full[1]) / cpu_of(&full[0]),
        median(&full[1], |m| m.broker_us) / median(&full[0], |m| m.broker_us),
        median(&full[1], |m| m.clients_us) / median(&full[0], |m| m.clients_us)
    );
    println!(
        "(b) after each full-rate run, the agent's last reply pass acks its consumer's copy of every reply that came live: {:.0} ms, broker {:.1} + client {:.1} µs CPU per event (outside the columns above; a running agent does this after {} s of quiet)",
        median(&full[1], |m| m.after.0),
        median(&full[1], |m| m.after.1),
        median(&full[1], |m| m.after.2),
        ferry_agent::replies::SWEEP_IDLE.as_secs()
    );
    println!("per repeat, throughput ratio: {}", each(&full, 1, |m| m.events_per_s));
    println!("per repeat, p99 ratio at half rate: {}", each(&halves, 1, |m| m.p99_ms));
    for (k, p) in paths.iter().enumerate().skip(2) {
        println!(
            "{} vs (a): throughput {:.2}x, p99 at half rate {:.2}x, CPU per event {:.2}x",
            &p.label()[..3],
            median(&full[k], |m| m.events_per_s) / median(&full[0], |m| m.events_per_s),
            median(&halves[k], |m| m.p99_ms) / median(&halves[0], |m| m.p99_ms),
            cpu_of(&full[k]) / cpu_of(&full[0])
        );
    }
    Ok(())
}

fn median(runs: &[Measured], f: impl Fn(&Measured) -> f64) -> f64 {
    median_of(runs.iter().map(f).collect())
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
            broker_us: f64::NAN,
            clients_us: f64::NAN,
            after: (f64::NAN, f64::NAN, f64::NAN),
        }
    }
}

/// The id of the event a reply on a plain subscription answers: (a)'s
/// republisher copies the event's `Nats-Msg-Id`; the rules worker's reply
/// says it in its body.
fn answered_event(m: &async_nats::Message, from_worker: bool) -> Option<EventId> {
    if from_worker {
        let enc = Encoding::from_headers(m.headers.as_ref()).ok()?;
        return ferry_schema::codec::decode_reply(&m.payload, enc, ferry_schema::codec::DEFAULT_MAX_PAYLOAD)
            .ok()
            .map(|r| r.in_reply_to);
    }
    m.headers
        .as_ref()
        .and_then(|h| h.get(headers::MSG_ID))
        .and_then(|v| v.as_str().parse::<EventId>().ok())
}

/// (a)'s publisher: each event with its `Nats-Msg-Id`, at most `window`
/// awaiting JetStream's ack.
async fn raw_publish(conn: async_nats::Client, input: impl Stream<Item = Envelope>, window: usize) -> anyhow::Result<()> {
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(window)
        .backpressure_on_inflight(true)
        .build(conn);
    input
        .map(|e| {
            let js = js.clone();
            async move {
                let payload = encode_event(&e, Encoding::MsgPack)?;
                let h = headers::for_publish(e.id.text(), Encoding::MsgPack, None);
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
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(())
}

async fn scenario(path: Path, rate: Option<f64>, args: &RulesBench) -> anyhow::Result<Measured> {
    let nats = NatsServer::start_temp()?;
    let agent_id = AgentId::new("desk-1")?;
    let op = nats.operator("bench operator").connect().await?;
    let js = jetstream::new(op.clone());
    topology::provision(&js, &StreamSettings::default(), std::slice::from_ref(&agent_id)).await?;
    let sent = Arc::new(Mutex::new(HashMap::new()));
    let rec = Arc::new(Mutex::new(Recorder::new(sent.clone())?));
    let stop = CancellationToken::new();
    let n = args.events;
    let input = paced(events(n, &agent_id), rate, sent);
    let agent_publishes = matches!(path, Path::Ferry | Path::AgentPublish);
    let agent_receives = path == Path::Ferry;
    let worker_answers = !matches!(path, Path::Raw | Path::RawLive);

    // The middle: (a)'s republisher or the real rules worker.
    let middle: tokio::task::JoinHandle<anyhow::Result<()>> = if worker_answers {
        // The server's dir is removed with the server.
        let rules_file = nats.dir().join("bench-rules.toml");
        std::fs::write(&rules_file, BENCH_RULES)?;
        let mut cfg = RulesConfig::new(&rules_file);
        cfg.consume.max_in_flight = args.concurrency;
        let worker_client = nats.role(topology::Role::Rules, "bench rules").connect().await?;
        let worker_stop = stop.clone();
        tokio::spawn(async move {
            rules::run(worker_client, &cfg, worker_stop).await?;
            Ok(())
        })
    } else {
        tokio::spawn(raw_republisher(
            nats.operator("bench republisher").connect().await?,
            args.concurrency,
            stop.clone(),
        ))
    };

    // Connections: in (a) and (w) the raw publisher and the plain subscriber
    // share one, as the agent's publisher and reply receiver share its own
    // in (b). In (p) the plain subscriber needs one beside the agent's (an
    // agent may not subscribe to its reply subject).
    let plain = if agent_publishes {
        None
    } else {
        Some(nats.operator("bench agent side").connect().await?)
    };
    let agent = if agent_publishes || agent_receives {
        let conn = nats.agent(&agent_id).context("no desk-1 user")?;
        let mut acfg = AgentConfig::new(agent_id.clone(), conn);
        acfg.publish_window = args.window;
        acfg.reply_batch = args.concurrency;
        Some(Agent::connect(acfg).await?)
    } else {
        None
    };

    // Replies are recorded where they are received, in every scenario.
    let receiver: tokio::task::JoinHandle<anyhow::Result<()>> = match (&agent, agent_receives) {
        (Some(agent), true) => {
            let (agent, stop, rec) = (agent.clone(), stop.clone(), rec.clone());
            tokio::spawn(async move {
                agent
                    .handle_replies(
                        move |reply| {
                            if let Ok(mut r) = rec.lock() {
                                r.record(reply.in_reply_to);
                            }
                            Box::pin(std::future::ready(true))
                        },
                        stop,
                    )
                    .await?;
                Ok(())
            })
        }
        _ => {
            let conn = match &plain {
                Some(c) => c.clone(),
                None => nats.operator("bench plain subscriber").connect().await?,
            };
            let replies_subject = if path == Path::RawLive {
                subject::live_reply(&agent_id)
            } else {
                subject::reply(&agent_id)
            };
            let mut replies = conn.subscribe(replies_subject).await?;
            conn.flush().await?;
            let (stop, rec) = (stop.clone(), rec.clone());
            tokio::spawn(async move {
                let _conn = conn;
                loop {
                    let m = tokio::select! {
                        _ = stop.cancelled() => break,
                        m = replies.next() => m,
                    };
                    let Some(m) = m else { break };
                    if let (Some(id), Ok(mut r)) = (answered_event(&m, worker_answers), rec.lock()) {
                        r.record(id);
                    }
                }
                Ok(())
            })
        }
    };

    // CPU time of the broker and of this process over the measured window
    // (clock ticks of 10 ms: a run of a second or more has enough of them).
    let broker_pid = nats.pid().context("nats-server has no pid")?;
    let cpu = || -> anyhow::Result<(u64, u64)> {
        Ok((cpu_ticks(broker_pid)?, cpu_ticks(std::process::id())?))
    };
    let cpu0 = cpu()?;
    let publisher: tokio::task::JoinHandle<anyhow::Result<()>> = match &plain {
        Some(conn) => tokio::spawn(raw_publish(conn.clone(), input, args.window)),
        None => {
            let agent = agent.clone().context("the agent publishes in this scenario")?;
            let stop = stop.clone();
            tokio::spawn(async move {
                agent.publish_all(input, &stop, |_, _| {}).await?;
                Ok(())
            })
        }
    };

    // Wait for every reply, or until nothing moved for 10 s.
    let started = Instant::now();
    let (mut seen, mut moved) = (0usize, Instant::now());
    loop {
        let received = rec.lock().map(|r| r.received).unwrap_or(0);
        if received >= n || started.elapsed() > Duration::from_secs(300) || moved.elapsed() > Duration::from_secs(10) {
            break;
        }
        if received > seen {
            (seen, moved) = (received, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cpu1 = cpu()?;
    publisher.await??;
    let stopped = Instant::now();
    stop.cancel();
    receiver.await??;
    let (after_ms, cpu2) = (stopped.elapsed().as_secs_f64() * 1e3, cpu()?);
    middle.await??;
    let rec = rec.lock().map_err(|_| anyhow::anyhow!("the recorder's lock is poisoned"))?;
    anyhow::ensure!(
        rec.received == n,
        "{}: only {} of {n} replies arrived",
        path.label(),
        rec.received
    );
    let per_event_us = |ticks: u64| ticks as f64 * 1e4 / n as f64;
    Ok(Measured {
        broker_us: per_event_us(cpu1.0.saturating_sub(cpu0.0)),
        clients_us: per_event_us(cpu1.1.saturating_sub(cpu0.1)),
        after: (
            after_ms,
            per_event_us(cpu2.0.saturating_sub(cpu1.0)),
            per_event_us(cpu2.1.saturating_sub(cpu1.1)),
        ),
        ..rec.result()
    })
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

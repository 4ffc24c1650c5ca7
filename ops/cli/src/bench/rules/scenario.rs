//! One scenario of `ferry bench rules`: a fresh broker, the middle (raw republisher or rules worker), the two sides around it, the load, and what it measured.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use ferry_schema::topology::{self, StreamSettings};
use ferry_schema::{subject, AgentId, Envelope};
use ferry_stack::NatsServer;
use ferry_workers::rules::{self, RulesConfig};
use futures::future::BoxFuture;
use futures::{FutureExt as _, StreamExt as _};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::load::{answered_event, events, paced, Recorder, Sent};
use super::raw::{raw_publish, raw_republisher};
use super::{product, Measured, Path, RulesBench};
use crate::bench::common::cpu_ticks;

const BENCH_RULES: &str = r#"
[[rule]]
name = "bench"
action = "reply"
template = "echo: {text}"
"#;

/// A task of the scenario that runs until it is done or stopped.
type Task = JoinHandle<anyhow::Result<()>>;

/// Where the load goes in: the raw publisher's connection, or the agent's
/// input.
enum Input {
    Raw(async_nats::Client),
    Agent(tokio::io::DuplexStream),
}

/// What stands around the middle.
struct Sides {
    input: Input,
    /// Records every reply where it is received.
    receiver: Task,
    /// (p): the agent's publishing half, running until stop.
    publishing: Option<Task>,
}

/// Runs `path` once at `rate` (none: as fast as it goes) on a broker of its own.
pub(super) async fn scenario(path: Path, rate: Option<f64>, args: &RulesBench) -> anyhow::Result<Measured> {
    let nats = NatsServer::start_temp()?;
    let agent_id = AgentId::new("desk-1")?;
    let op = nats.operator("bench operator").connect().await?;
    topology::provision(&jetstream::new(op), &StreamSettings::default(), std::slice::from_ref(&agent_id)).await?;
    let sent: Sent = Arc::new(Mutex::new(HashMap::new()));
    let rec = Arc::new(Mutex::new(Recorder::new(sent.clone())?));
    let stop = CancellationToken::new();
    let n = args.events;
    let middle = start_middle(&nats, path, args, stop.clone()).await?;
    let sides = start_sides(&nats, path, &agent_id, args, &rec, &stop).await?;
    let load = prepare_load(sides.input, events(n, &agent_id), rate, sent, args.window)?;

    // CPU time of the broker and of this process over the measured window
    // (clock ticks of 10 ms: a run of a second or more has enough of them).
    let broker_pid = nats.pid().context("nats-server has no pid")?;
    let cpu = || -> anyhow::Result<(u64, u64)> { Ok((cpu_ticks(broker_pid)?, cpu_ticks(std::process::id())?)) };
    let cpu0 = cpu()?;
    let publisher = tokio::spawn(load);
    wait_for_replies(&rec, n).await;
    let cpu1 = cpu()?;
    publisher.await??;
    let stopped = Instant::now();
    stop.cancel();
    sides.receiver.await??;
    let (after_ms, cpu2) = (stopped.elapsed().as_secs_f64() * 1e3, cpu()?);
    if let Some(publishing) = sides.publishing {
        publishing.await??;
    }
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

/// The middle: (a)'s republisher, or the real rules worker.
async fn start_middle(nats: &NatsServer, path: Path, args: &RulesBench, stop: CancellationToken) -> anyhow::Result<Task> {
    if !path.worker_answers() {
        let client = nats.operator("bench republisher").connect().await?;
        return Ok(tokio::spawn(raw_republisher(client, args.concurrency, stop)));
    }
    // The server's dir is removed with the server.
    let rules_file = nats.dir().join("bench-rules.toml");
    std::fs::write(&rules_file, BENCH_RULES)?;
    let mut cfg = RulesConfig::new(&rules_file);
    cfg.consume.max_in_flight = args.concurrency;
    let worker_client = nats.role(topology::Role::Rules, "bench rules").connect().await?;
    Ok(tokio::spawn(async move {
        rules::run(worker_client, &cfg, stop).await?;
        Ok(())
    }))
}

/// The publishing and the receiving side of `path`, the receiver already
/// listening. In (a), (r) and (w) the raw publisher and the plain
/// subscriber share one connection. The agent, in (b) and (p), runs as in
/// production: its drainer publishes on a connection of its own, its reply
/// receiver reads on the agent's main one; in (p) the plain subscriber
/// needs one beside the agent's (an agent may not subscribe to its reply
/// subject).
async fn start_sides(
    nats: &NatsServer,
    path: Path,
    agent_id: &AgentId,
    args: &RulesBench,
    rec: &Arc<Mutex<Recorder>>,
    stop: &CancellationToken,
) -> anyhow::Result<Sides> {
    let spool_dir = nats.dir().join("agent-spool");
    match path {
        Path::Ferry => {
            let agent = product::connect(nats, agent_id, args.window, args.concurrency).await?;
            let (pipe, input) = tokio::io::duplex(product::PIPE);
            let receiver = product::spawn_agent(agent, &spool_dir, input, rec.clone(), stop.clone())?;
            Ok(Sides { input: Input::Agent(pipe), receiver, publishing: None })
        }
        Path::AgentPublish => {
            let agent = product::connect(nats, agent_id, args.window, args.concurrency).await?;
            let (pipe, input) = tokio::io::duplex(product::PIPE);
            let publishing = product::spawn_publisher(agent, &spool_dir, input, stop.clone())?;
            let conn = nats.operator("bench plain subscriber").connect().await?;
            let receiver = plain_receiver(conn, subject::reply(agent_id), true, rec.clone(), stop.clone()).await?;
            Ok(Sides { input: Input::Agent(pipe), receiver, publishing: Some(publishing) })
        }
        Path::Raw | Path::RawLive | Path::WorkerOnly => {
            let conn = nats.operator("bench agent side").connect().await?;
            let replies = if path == Path::RawLive {
                subject::live_reply(agent_id)
            } else {
                subject::reply(agent_id)
            };
            let receiver = plain_receiver(conn.clone(), replies, path.worker_answers(), rec.clone(), stop.clone()).await?;
            Ok(Sides { input: Input::Raw(conn), receiver, publishing: None })
        }
    }
}

/// A plain subscriber on `replies` that records each reply as it arrives,
/// until `stop`; subscribed when this returns.
async fn plain_receiver(
    conn: async_nats::Client,
    replies: async_nats::Subject,
    from_worker: bool,
    rec: Arc<Mutex<Recorder>>,
    stop: CancellationToken,
) -> anyhow::Result<Task> {
    let mut replies = conn.subscribe(replies).await?;
    conn.flush().await?;
    Ok(tokio::spawn(async move {
        let _conn = conn;
        loop {
            let m = tokio::select! {
                _ = stop.cancelled() => break,
                m = replies.next() => m,
            };
            let Some(m) = m else { break };
            if let (Some(id), Ok(mut r)) = (answered_event(&m, from_worker), rec.lock()) {
                r.record(id);
            }
        }
        Ok(())
    }))
}

/// The publishing side's work, ready before the clock starts: `events` at
/// `rate` into `input`, each stamped in `sent` as it goes.
fn prepare_load(
    input: Input,
    events: Vec<Envelope>,
    rate: Option<f64>,
    sent: Sent,
    window: usize,
) -> anyhow::Result<BoxFuture<'static, anyhow::Result<()>>> {
    Ok(match input {
        Input::Raw(conn) => {
            let events = events.into_iter().map(|e| (e.id, e)).collect();
            raw_publish(conn, paced(events, rate, sent), window).boxed()
        }
        Input::Agent(pipe) => product::feed(pipe, product::lines(&events)?, rate, sent).boxed(),
    })
}

/// Waits for a reply to each of `n` events, or until nothing moved for
/// 10 s (or 300 s went by).
async fn wait_for_replies(rec: &Mutex<Recorder>, n: usize) {
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
}

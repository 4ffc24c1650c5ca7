//! The agent in `ferry bench rules` (b) and (p), assembled as production assembles it: JSON lines into the intake, the spool writer, the drainer and, in (b), the reply receiver.
//!
//! (b) runs the whole agent through [`run_lines`], what `ferry-agent run
//! --input -` runs: each line is parsed into the intake, made durable by the
//! spool writer (group commit, fsync), published by the drainer (in spool
//! order, on its own connection, removed after the ack); replies come live
//! from the `REPLIES` stream's republish (with the catch-up consumer behind
//! them), are recorded as acted on in the spool, and are handed on, where
//! the bench records them. (p) runs only the publishing half (lines,
//! intake, spool writer, drainer), as `run` wires it.

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use ferry_agent::health::Health;
use ferry_agent::pipeline::{write_spool, INTAKE_QUEUE};
use ferry_agent::run::{run_lines, Until};
use ferry_agent::source::parse_line;
use ferry_agent::spool::{RefKey, Spool, SpoolConfig};
use ferry_agent::{Agent, AgentConfig};
use ferry_schema::codec::encode_event;
use ferry_schema::{AgentId, Encoding, Envelope, EventId, Reply};
use ferry_stack::NatsServer;
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::load::{paced, Recorder, Sent};

/// Bytes the agent's input pipe holds before a write waits: a Linux pipe's.
pub(super) const PIPE: usize = 64 * 1024;

/// The agent `agent_id`, connected with its own credentials, with the
/// bench's publish window and reply batch.
pub(super) async fn connect(nats: &NatsServer, agent_id: &AgentId, window: usize, reply_batch: usize) -> anyhow::Result<Agent> {
    let conn = nats.agent(agent_id).context("no desk-1 user")?;
    let mut cfg = AgentConfig::new(agent_id.clone(), conn);
    cfg.publish_window = window;
    cfg.reply_batch = reply_batch;
    Ok(Agent::connect(cfg).await?)
}

/// The agent's input, one JSON line per event (the full envelope, so the
/// agent keeps its id), prepared before the clock starts.
pub(super) fn lines(events: &[Envelope]) -> anyhow::Result<Vec<(EventId, Vec<u8>)>> {
    events
        .iter()
        .map(|e| {
            let mut line = encode_event(e, Encoding::Json)?;
            line.push(b'\n');
            Ok((e.id, line))
        })
        .collect()
}

/// Writes `lines` into the agent's input at `rate` per second (or as fast
/// as it reads), stamping each event's send time as its line goes in; the
/// input ends after the last.
pub(super) async fn feed(mut input: DuplexStream, lines: Vec<(EventId, Vec<u8>)>, rate: Option<f64>, sent: Sent) -> anyhow::Result<()> {
    let mut lines = std::pin::pin!(paced(lines, rate, sent));
    while let Some(line) = lines.next().await {
        input.write_all(&line).await.context("writing to the agent's input")?;
    }
    input.shutdown().await.context("closing the agent's input")?;
    Ok(())
}

/// (b): the whole agent on `input`, with its spool in `spool_dir`; every
/// reply it hands on goes to `rec`. The task ends once the agent has shut
/// down after `stop`, its last reply pass included.
pub(super) fn spawn_agent(
    agent: Agent,
    spool_dir: &Path,
    input: DuplexStream,
    rec: Arc<Mutex<Recorder>>,
    stop: CancellationToken,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    let spool = Spool::open(SpoolConfig::new(spool_dir))?;
    let (out, mut replies) = mpsc::channel::<Reply>(agent.config().reply_batch.max(1));
    let recording = tokio::spawn(async move {
        while let Some(reply) = replies.recv().await {
            if let Ok(mut r) = rec.lock() {
                r.record(reply.in_reply_to);
            }
        }
    });
    Ok(tokio::spawn(async move {
        run_lines(&agent, spool, BufReader::new(input), Until::Shutdown, out, stop).await?;
        recording.await?;
        Ok(())
    }))
}

/// (p): the agent's publishing half on `input`, with its spool in
/// `spool_dir`: lines parsed into the intake, the spool writer, the drainer
/// (until `stop`). No reply receiver.
pub(super) fn spawn_publisher(
    agent: Agent,
    spool_dir: &Path,
    input: DuplexStream,
    stop: CancellationToken,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    let spool = Spool::open(SpoolConfig::new(spool_dir))?;
    let health = Health::default();
    let (intake, intake_rx) = mpsc::channel(INTAKE_QUEUE);
    let no_refs = |_: &[Envelope]| Vec::<(RefKey, EventId)>::new();
    let writer = tokio::spawn(write_spool(spool.clone(), agent.config().encoding, intake_rx, health.clone(), no_refs, |_| {}));
    let id = agent.config().agent.clone();
    let drainer = tokio::spawn(async move { agent.drain_spool(&spool, &health, None, &stop).await });
    Ok(tokio::spawn(async move {
        let mut lines = BufReader::new(input).lines();
        let mut n = 0usize;
        while let Some(line) = lines.next_line().await? {
            n += 1;
            if let Some(env) = parse_line(&id, n, &line)? {
                if intake.send(env).await.is_err() {
                    break;
                }
            }
        }
        // The writer ends once the intake has no sender; the drainer at `stop`.
        drop(intake);
        writer.await?;
        drainer.await?;
        Ok(())
    }))
}

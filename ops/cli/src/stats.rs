//! `ferry stats`: streams, consumer lag per worker role, worker replicas online, agents and their last heartbeat.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use clap::Args;
use ferry_schema::status::ServiceStats;
use ferry_schema::codec::{self, DEFAULT_MAX_PAYLOAD};
use ferry_schema::topology::{ALERTS_STREAM, DEADLETTER_STREAM, EVENTS_STREAM, REPLIES_STREAM, WORK_STREAM};
use ferry_schema::{subject, Encoding};
use futures::StreamExt;

use crate::ConnArgs;

/// Shows, from the broker alone:
/// - each stream: messages, bytes, first and last message time;
/// - each consumer: pending (not yet delivered), ack pending (delivered, not
///   yet acked) and redelivered: a worker role's lag;
/// - each worker replica online (answering `$SRV.STATS`) with its counters;
/// - each agent that sent a heartbeat, with the time of its last one.
///
/// Examples:
///   ferry stats
///   ferry stats --watch 2
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct StatsArgs {
    /// Refresh every this many seconds until Ctrl-C.
    #[arg(long, value_name = "SECS")]
    watch: Option<u64>,
    /// How long to wait for worker replicas to answer.
    #[arg(long, default_value_t = 500)]
    wait_ms: u64,
    #[command(flatten)]
    conn: ConnArgs,
}

/// One consumer's position: a worker role's lag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerLag {
    /// Its stream.
    pub stream: String,
    /// Its name.
    pub consumer: String,
    /// Messages not yet delivered.
    pub pending: u64,
    /// Delivered and not yet acked.
    pub ack_pending: usize,
    /// Delivered more than once.
    pub redelivered: usize,
    /// Pull requests waiting.
    pub waiting: usize,
    /// A durable consumer (a role's), not an ephemeral reader's.
    pub durable: bool,
}

/// The streams whose consumers are the worker roles'.
const CONSUMER_STREAMS: [&str; 5] = [EVENTS_STREAM, REPLIES_STREAM, WORK_STREAM, ALERTS_STREAM, DEADLETTER_STREAM];

/// Every consumer of Ferry's streams, by stream then name.
pub async fn consumer_lags(js: &jetstream::Context) -> anyhow::Result<Vec<ConsumerLag>> {
    let mut out = Vec::new();
    for name in CONSUMER_STREAMS {
        let s = js.get_stream(name).await.with_context(|| format!("looking up stream {name} (run `ferry provision`)"))?;
        let mut consumers = s.consumers();
        let mut rows = Vec::new();
        while let Some(c) = consumers.next().await {
            let c = c?;
            rows.push(ConsumerLag {
                stream: name.to_string(),
                consumer: c.name.clone(),
                pending: c.num_pending,
                ack_pending: c.num_ack_pending,
                redelivered: c.num_redelivered,
                waiting: c.num_waiting,
                durable: c.config.durable_name.is_some(),
            });
        }
        rows.sort_by(|a, b| a.consumer.cmp(&b.consumer));
        out.extend(rows);
    }
    Ok(out)
}

/// The worker roles' consumers alone (no agent's reply consumer, no
/// reader), by stream order then name: one consumer-info request each,
/// however many agents there are.
pub async fn worker_lags(js: &jetstream::Context) -> anyhow::Result<Vec<ConsumerLag>> {
    let mut out = Vec::new();
    for def in ferry_schema::topology::worker_consumers() {
        let stream = js.get_stream_no_info(def.stream).await.with_context(|| format!("looking up stream {}", def.stream))?;
        let c = stream
            .consumer_info(def.name())
            .await
            .with_context(|| format!("reading consumer {}/{} (run `ferry provision`)", def.stream, def.name()))?;
        out.push(ConsumerLag {
            stream: def.stream.to_string(),
            consumer: c.name.clone(),
            pending: c.num_pending,
            ack_pending: c.num_ack_pending,
            redelivered: c.num_redelivered,
            waiting: c.num_waiting,
            durable: true,
        });
    }
    let order = |s: &str| CONSUMER_STREAMS.iter().position(|x| *x == s).unwrap_or(usize::MAX);
    out.sort_by(|a, b| (order(&a.stream), &a.consumer).cmp(&(order(&b.stream), &b.consumer)));
    Ok(out)
}

async fn streams(js: &jetstream::Context, out: &mut String) -> anyhow::Result<()> {
    out.push_str("streams\n");
    let lags = consumer_lags(js).await?;
    for name in CONSUMER_STREAMS {
        let mut s = js.get_stream(name).await.with_context(|| format!("looking up stream {name} (run `ferry provision`)"))?;
        let st = s.info().await?.state.clone();
        out.push_str(&format!(
            "  {name:<11} {:>9} msgs {:>12} bytes  first {}  last {}\n",
            st.messages, st.bytes, st.first_timestamp, st.last_timestamp
        ));
        for c in lags.iter().filter(|c| c.stream == name) {
            out.push_str(&format!(
                "    {:<22} pending {:>8}  ack pending {:>6}  redelivered {:>6}  waiting pulls {:>3}\n",
                c.consumer, c.pending, c.ack_pending, c.redelivered, c.waiting
            ));
        }
    }
    Ok(())
}

/// Every worker replica that answers `$SRV.STATS` within `wait`, by role
/// then id.
pub async fn service_stats(client: &async_nats::Client, wait: Duration) -> anyhow::Result<Vec<ServiceStats>> {
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await?;
    client.publish_with_reply(subject::all_service_stats(), inbox, "".into()).await?;
    client.flush().await?;
    let mut found = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, sub.next()).await {
        if let Ok(v) = serde_json::from_slice::<ServiceStats>(&msg.payload) {
            found.push(v);
        }
    }
    found.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
    Ok(found)
}

async fn workers(client: &async_nats::Client, wait: Duration, out: &mut String) -> anyhow::Result<()> {
    let found = service_stats(client, wait).await?;
    out.push_str(&format!("workers online: {}\n", found.len()));
    for v in found {
        let c = v.status().map(|s| s.counters).unwrap_or_default();
        out.push_str(&format!(
            "  {:<16} {:<24} done {:>9}  retried {:>6}  poisoned {:>5}  in flight {:>5}  avg {:>7.2} ms\n",
            v.name, v.id, c.done, c.retried, c.poisoned, c.in_flight, c.avg_processing_ms,
        ));
    }
    Ok(())
}

async fn agents(js: &jetstream::Context, out: &mut String) -> anyhow::Result<()> {
    let s = js.get_stream(EVENTS_STREAM).await?;
    let mut subjects = Vec::new();
    let mut listing = s.info_with_subjects(subject::all_heartbeats().to_string()).await?;
    while let Some(entry) = listing.next().await {
        subjects.push(entry?.0);
    }
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    for subj in &subjects {
        let Ok(msg) = s.get_last_raw_message_by_subject(subj).await else { continue };
        let enc = Encoding::of(Some(&msg.headers), &msg.payload).unwrap_or(Encoding::MsgPack);
        if let Ok(e) = codec::decode_event(&msg.payload, enc, DEFAULT_MAX_PAYLOAD) {
            last.insert(e.agent.to_string(), e.ts.to_rfc3339());
        }
    }
    out.push_str(&format!("agents with heartbeats: {}\n", last.len()));
    for (agent, ts) in last {
        out.push_str(&format!("  {agent:<24} last heartbeat {ts}\n"));
    }
    Ok(())
}

/// The whole report as text.
pub async fn report(client: &async_nats::Client, wait: Duration) -> anyhow::Result<String> {
    let js = jetstream::new(client.clone());
    let mut out = String::new();
    streams(&js, &mut out).await?;
    workers(client, wait, &mut out).await?;
    agents(&js, &mut out).await?;
    Ok(out)
}

pub async fn run(args: StatsArgs) -> anyhow::Result<()> {
    let client = args.conn.config("ferry stats").connect().await?;
    let wait = Duration::from_millis(args.wait_ms);
    loop {
        let text = report(&client, wait).await?;
        if args.watch.is_some() {
            // Clear the screen and home the cursor between refreshes.
            print!("\x1b[2J\x1b[H");
        }
        print!("{text}");
        let Some(secs) = args.watch else { return Ok(()) };
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(secs.max(1))) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

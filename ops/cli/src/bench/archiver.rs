//! `ferry bench archiver`: raw COPY into the events table vs the archiver consuming the same events from JetStream.
//!
//! (a) COPY of N prepared rows (CSV in memory before the clock starts) into
//!     `events`: the fastest way PostgreSQL takes rows, with no broker and no
//!     Ferry code.
//! (b) The same N events stored in `EVENTS` first (not timed), then the
//!     archiver started and timed from its consumer's first delivery (its
//!     start-up, a connection pool and a schema check, is printed apart)
//!     until the consumer has nothing pending or unacknowledged; since it
//!     acks after commit, that is when every row is in. It also writes the
//!     derived rows (activities, chats with customers and conversations),
//!     which (a) does not.
//!
//! One PostgreSQL cluster (fsync on, as in production) and one broker, both
//! fresh for the run; the tables are emptied before every scenario.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use bytes::Bytes;
use clap::Args;
use ferry_schema::codec::{encode_event, event_body_json};
use ferry_schema::event::{Activity, ChatMessage, ChatType, MessageType};
use ferry_schema::topology::{self, StreamSettings};
use ferry_schema::{headers, subject, AgentId, Encoding, Envelope, EventBody};
use ferry_stack::{NatsServer, PgServer, PgServerOptions};
use ferry_workers::archiver::{self, ArchiverConfig};
use ferry_workers::state;
use futures::{SinkExt, StreamExt};
use tokio_util::sync::CancellationToken;

use super::common::{cores, median_of, verdict};

#[derive(Debug, Args)]
pub struct ArchiverBench {
    /// Events per scenario.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Share of chats among the events, in percent (the rest are
    /// activities); chats also write customers and conversations.
    #[arg(long, default_value_t = 10)]
    chat_percent: usize,
    /// Runs of each scenario; the table shows medians.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Archiver: rows per transaction [default: the archiver's, 2000].
    #[arg(long)]
    batch_rows: Option<usize>,
    /// Archiver: messages held at once (the pull batch) [default: the archiver's, 8192].
    #[arg(long)]
    concurrency: Option<usize>,
    /// Archiver: how long the first row of a batch waits for more, ms [default: the archiver's, 20].
    #[arg(long)]
    batch_wait_ms: Option<u64>,
    /// Archiver: transactions in flight per consumer [default: the archiver's, 3].
    #[arg(long)]
    writers: Option<usize>,
}

impl ArchiverBench {
    /// The archiver's own defaults with this run's overrides.
    fn config(&self, url: &str) -> ArchiverConfig {
        let mut cfg = ArchiverConfig::new(url);
        if let Some(n) = self.batch_rows {
            cfg.batch.max_rows = n;
        }
        if let Some(n) = self.concurrency {
            cfg.consume.max_in_flight = n;
        }
        if let Some(ms) = self.batch_wait_ms {
            cfg.batch.max_wait = Duration::from_millis(ms);
        }
        if let Some(n) = self.writers {
            cfg.batch.writers = n;
        }
        cfg
    }
}

fn events(n: usize, chat_percent: usize) -> anyhow::Result<Vec<Envelope>> {
    let agents: Vec<AgentId> = (1..=20).map(|i| AgentId::new(format!("desk-{i}"))).collect::<Result<_, _>>()?;
    Ok((0..n)
        .map(|i| {
            let agent = agents[i % agents.len()].clone();
            let body = if i % 100 < chat_percent {
                EventBody::Chat(ChatMessage {
                    chat: format!("customer {}", i % 500),
                    chat_type: ChatType::Direct,
                    sender: format!("customer {}", i % 500),
                    text: format!("Hello, where is my order {i}? 我的订单什么时候到？"),
                    msg_type: MessageType::Text,
                })
            } else {
                EventBody::Activity(Activity {
                    app: "excel.exe".into(),
                    title: format!("Q3 report {i}.xlsx - Excel"),
                    exe: Some("C:\\Program Files\\Microsoft Office\\excel.exe".into()),
                    pid: Some(4242),
                    site: None,
                    afk: false,
                    duration_ms: 15_000,
                })
            };
            Envelope::new(agent, body)
        })
        .collect())
}

fn csv_field(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
}

/// The CSV COPY reads: id, agent, kind, ts, body, stream_seq.
fn csv(events: &[Envelope]) -> anyhow::Result<Bytes> {
    let mut out = String::with_capacity(events.len() * 300);
    for (i, e) in events.iter().enumerate() {
        out.push_str(&format!("{},{},{},{},", e.id, e.agent, e.kind(), e.ts.to_rfc3339()));
        csv_field(&event_body_json(&e.body)?, &mut out);
        out.push_str(&format!(",{}\n", i + 1));
    }
    Ok(Bytes::from(out))
}

const TRUNCATE: &str =
    "TRUNCATE events, replies, chat_messages, predictions, rule_alerts, alerts, conversations, customers, agents CASCADE";

async fn raw_copy(url: &str, data: &Bytes, n: usize) -> anyhow::Result<f64> {
    let client = state::connect_one(url).await?;
    client.batch_execute(TRUNCATE).await?;
    let start = Instant::now();
    let sink = client
        .copy_in("COPY events (id, agent, kind, ts, body, stream_seq) FROM STDIN (FORMAT csv)")
        .await?;
    futures::pin_mut!(sink);
    sink.send(data.clone()).await?;
    let rows = sink.finish().await?;
    let secs = start.elapsed().as_secs_f64();
    anyhow::ensure!(rows as usize == n, "COPY stored {rows} rows, expected {n}");
    Ok(n as f64 / secs)
}

async fn archiver_run(
    nats: &NatsServer,
    js: &jetstream::Context,
    url: &str,
    events: &[Envelope],
    args: &ArchiverBench,
) -> anyhow::Result<f64> {
    let client = state::connect_one(url).await?;
    client.batch_execute(TRUNCATE).await?;
    // A fresh consumer reads EVENTS from the start.
    let def = topology::archiver_events_consumer();
    let stream = js.get_stream(def.stream).await?;
    let _ = stream.delete_consumer(def.name()).await;
    topology::ensure_consumer(js, &def).await?;
    let cfg = args.config(url);
    let stop = CancellationToken::new();
    let worker_client = nats.role(ferry_schema::topology::Role::Archiver, "bench archiver").connect().await?;
    let token = stop.clone();
    let start = Instant::now();
    let worker = tokio::spawn(async move { archiver::run(worker_client, &cfg, token).await });
    let mut consumer = stream
        .get_consumer::<jetstream::consumer::pull::Config>(def.name())
        .await
        .map_err(|e| anyhow::anyhow!("looking up {}: {e}", def.name()))?;
    // The clock starts at the first delivery, so the archiver's start-up
    // (pool, schema check) is reported apart and not counted as rows/s.
    let first = loop {
        let info = consumer.info().await?;
        if info.delivered.stream_sequence > 0 {
            break Instant::now();
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(60), "the archiver did not start in 60 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let total = events.len() as f64;
    loop {
        let info = consumer.info().await?;
        let left = (info.num_pending + info.num_ack_pending as u64) as f64;
        if left == 0.0 {
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(900), "the archiver did not finish in 15 minutes");
        // Consumer info makes the server count pending messages: ask rarely
        // while much is left and often near the end, so the finish is seen
        // within a few milliseconds of the last ack (a fixed 250 ms poll
        // added up to 250 ms, about a tenth of a run, to (b)).
        let done = (total - left).max(1.0);
        let eta = first.elapsed().as_secs_f64() * left / done;
        tokio::time::sleep(Duration::from_secs_f64((eta / 4.0).clamp(0.002, 0.25))).await;
    }
    let secs = first.elapsed().as_secs_f64();
    eprintln!(
        "    start-up {:.0} ms (not counted), {} rows in {secs:.3} s",
        (first - start).as_secs_f64() * 1e3,
        events.len()
    );
    stop.cancel();
    worker.await??;
    let stored: i64 = client.query_one("SELECT count(*) FROM events", &[]).await?.get(0);
    anyhow::ensure!(stored as usize == events.len(), "archived {stored} events, expected {}", events.len());
    Ok(events.len() as f64 / secs)
}

pub async fn run(args: ArchiverBench) -> anyhow::Result<()> {
    anyhow::ensure!(args.events > 0, "--events must be at least 1");
    anyhow::ensure!(args.repeat > 0, "--repeat must be at least 1");
    anyhow::ensure!(args.chat_percent <= 100, "--chat-percent is a percentage (0 to 100)");
    let shown = args.config("");
    anyhow::ensure!(
        shown.batch.max_rows > 0 && shown.consume.max_in_flight > 0 && shown.batch.writers > 0,
        "--batch-rows, --concurrency and --writers must be at least 1"
    );
    eprintln!(
        "ferry bench archiver: {} events ({}% chats), {} repeats, batches of {} rows, {} writers, {} in flight, {} cores",
        args.events,
        args.chat_percent,
        args.repeat,
        shown.batch.max_rows,
        shown.batch.writers,
        shown.consume.max_in_flight,
        cores()
    );
    let pg = tokio::task::spawn_blocking(|| {
        PgServer::start(PgServerOptions {
            unsafe_fast: false,
            ..Default::default()
        })
    })
    .await??;
    let url = pg.url();
    crate::db::migrate(&url, None).await.context("migrating the bench database")?;
    // Today's partitions, as an archiver makes them at start, so (a) COPY
    // writes where (b) does.
    let client = ferry_workers::state::connect_one(&url).await?;
    ferry_workers::archiver::retention::make_partitions(&client, chrono::Utc::now().date_naive()).await?;
    drop(client);
    let nats = tokio::task::spawn_blocking(NatsServer::start_temp).await??;
    let op = nats.operator("bench archiver").connect().await?;
    let js = jetstream::new(op);
    let mut settings = StreamSettings::default();
    settings.events_max_bytes = settings.events_max_bytes.max(4 << 30);
    topology::provision(&js, &settings, &[]).await?;

    let events = events(args.events, args.chat_percent)?;
    let data = csv(&events)?;
    eprintln!("  storing {} events in EVENTS ...", events.len());
    let published = futures::stream::iter(events.iter())
        .map(|e| {
            let js = js.clone();
            async move {
                let mut h = async_nats::HeaderMap::new();
                h.insert(headers::MSG_ID, e.id.to_string().as_str());
                let payload = encode_event(e, Encoding::MsgPack)?;
                js.publish_with_headers(subject::event(&e.agent, e.kind()), h, payload.into())
                    .await?
                    .await?;
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(256)
        .collect::<Vec<_>>()
        .await;
    for p in published {
        p?;
    }

    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..args.repeat {
        eprintln!("  repeat {}/{}: (a) COPY ...", i + 1, args.repeat);
        a.push(raw_copy(&url, &data, events.len()).await.context("(a) COPY")?);
        eprintln!("  repeat {}/{}: (b) archiver ...", i + 1, args.repeat);
        b.push(archiver_run(&nats, &js, &url, &events, &args).await.context("(b) archiver")?);
    }
    let (ma, mb) = (median_of(a.clone()), median_of(b.clone()));
    let ratio = mb / ma;
    println!("| scenario | rows/s (median of {}) | runs |", args.repeat);
    println!("|---|---:|---|");
    let runs = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ");
    println!("| (a) raw COPY into events | {ma:.0} | {} |", runs(&a));
    println!("| (b) archiver from JetStream | {mb:.0} | {} |", runs(&b));
    println!();
    println!(
        "(b)/(a) = {ratio:.2}x (target >= 0.5x: {})",
        verdict(ratio >= 0.5)
    );
    Ok(())
}

//! `ferry replay`: select stored messages by subject, sequence or time and print them, re-send them, run them through a worker in shadow mode, or follow one event's trace.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use async_nats::jetstream::{self, consumer::push::OrderedConfig, consumer::DeliverPolicy};
use chrono::{DateTime, NaiveDateTime, Utc};
use clap::{Args, ValueEnum};
use ferry_schema::codec::{self, Encoding, DEFAULT_MAX_PAYLOAD};
use ferry_schema::reply::ReplyId;
use ferry_schema::topology::{DEADLETTER_STREAM, EVENTS_STREAM, REPLIES_STREAM, WORK_STREAM};
use ferry_schema::{headers, subject, AgentId, EventId, EventKind};
use ferry_workers::runtime::{publish::Publisher, Handler as _, Outcome};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::ConnArgs;

/// Replays stored messages. Select them by subject (--agent, --kind or
/// --subject), by stream sequence (--from-seq/--to-seq) or by time (--since,
/// --from/--until), then:
///
///   (default)      print them as decoded JSON lines on stdout;
///   --to SUBJECT   publish them again on a debug subject at --rate per second
///                  (core NATS; a subject that a stream stores is refused);
///   --shadow rules run the rules worker's logic on them with --rules FILE:
///                  its replies go to shadow.<run>.> (never to an agent), and
///                  the command prints how they differ from the replies that
///                  were recorded for those events.
///
/// --trace ID follows one event instead: the event, its hand-offs, replies
/// and dead letters, each hop with its time since the event.
///
/// A replay reads what the stream held when it started, shows progress on
/// stderr, prints a summary at the end, and Ctrl-C stops it cleanly.
///
/// Examples:
///   ferry replay --agent desk-1 --kind chat --since 1h
///   ferry replay --from-seq 1200 --to-seq 1300
///   ferry replay --from 2026-11-20T10:00 --until 2026-11-20T11:00 --to debug.replay --rate 50
///   ferry replay --kind chat --since 1d --shadow rules --rules rules-next.toml
///   ferry replay --stream REPLIES --agent desk-1 --limit 20
///   ferry replay --trace 0193f5c2-7d1e-7a40-9b1e-2f7c3d9a8e11
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct ReplayArgs {
    /// Stream to read: EVENTS, REPLIES, WORK or DEADLETTER.
    #[arg(long, default_value = EVENTS_STREAM)]
    stream: String,
    /// Only this agent's messages (events.<agent>.> on EVENTS, replies.<agent> on REPLIES).
    #[arg(long)]
    agent: Option<String>,
    /// Only events of this kind: chat, activity, heartbeat, predict.
    #[arg(long)]
    kind: Option<String>,
    /// Any subject filter (wildcards allowed) instead of --agent/--kind.
    #[arg(long, conflicts_with_all = ["agent", "kind"])]
    subject: Option<String>,
    /// First stream sequence to read.
    #[arg(long, conflicts_with_all = ["since", "from"])]
    from_seq: Option<u64>,
    /// Last stream sequence to read.
    #[arg(long)]
    to_seq: Option<u64>,
    /// Start this long ago: 30s, 15m, 1h, 2d.
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "from")]
    since: Option<Duration>,
    /// Start at this time: 2026-11-20T10:00 (UTC) or RFC 3339 with an offset.
    #[arg(long, value_parser = parse_time)]
    from: Option<DateTime<Utc>>,
    /// Stop after this time (same forms as --from).
    #[arg(long, value_parser = parse_time)]
    until: Option<DateTime<Utc>>,
    /// Stop after this many messages.
    #[arg(long)]
    limit: Option<u64>,
    /// Also print each message's headers (stdout mode).
    #[arg(long)]
    headers: bool,
    /// Publish the selected messages on this subject instead of printing
    /// them (e.g. debug.replay); never a subject one of Ferry's streams stores.
    #[arg(long, value_name = "SUBJECT", conflicts_with = "shadow")]
    to: Option<String>,
    /// Messages per second with --to (0: as fast as the broker takes them).
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// Run this worker role's logic on the selected events in shadow mode.
    #[arg(long, value_enum)]
    shadow: Option<ShadowRole>,
    /// The rules file for --shadow rules.
    #[arg(long, required_if_eq("shadow", "rules"))]
    rules: Option<PathBuf>,
    /// PostgreSQL for shadow rules that match customer tags.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Name of the shadow run (a subject token); random when not given.
    #[arg(long)]
    run: Option<String>,
    /// Follow one event (its id, or its trace id) across every stream.
    #[arg(long, value_name = "EVENT_ID", conflicts_with_all = ["to", "shadow", "subject", "from_seq"])]
    trace: Option<String>,
    /// With --trace: how long after the event to look for its hops.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    window: Duration,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
    #[command(flatten)]
    conn: ConnArgs,
}

/// Worker roles that can run in shadow mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ShadowRole {
    /// The rules worker (rules file from --rules).
    Rules,
}

/// `2026-11-20T10:00`, `2026-11-20T10:00:30` (UTC), or RFC 3339 with an offset.
fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, fmt) {
            return Ok(t.and_utc());
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_time(chrono::NaiveTime::MIN).and_utc());
    }
    Err(format!(
        "{s:?} is not a time: expected 2026-11-20T10:00 (UTC), 2026-11-20T10:00:30, 2026-11-20, or RFC 3339 such as 2026-11-20T10:00:00+08:00"
    ))
}

fn to_offset(t: DateTime<Utc>) -> anyhow::Result<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp(t.timestamp())
        .and_then(|o| o.replace_nanosecond(t.timestamp_subsec_nanos()))
        .with_context(|| format!("time {t} out of range"))
}

fn from_offset(t: time::OffsetDateTime) -> DateTime<Utc> {
    DateTime::from_timestamp(t.unix_timestamp(), t.nanosecond()).unwrap_or_default()
}

/// Which messages of which stream.
#[derive(Debug, Clone)]
pub struct Selection {
    /// Stream name.
    pub stream: String,
    /// Subject filter (empty: all).
    pub filter: String,
    /// Where to start.
    pub start: Start,
    /// Last sequence to read (inclusive).
    pub to_seq: Option<u64>,
    /// Last time to read (inclusive).
    pub until: Option<DateTime<Utc>>,
    /// At most this many.
    pub limit: Option<u64>,
}

/// Where a selection starts.
#[derive(Debug, Clone, Copy)]
pub enum Start {
    /// The stream's first message.
    First,
    /// A stream sequence.
    Seq(u64),
    /// A time.
    Time(DateTime<Utc>),
}

fn filter_of(args: &ReplayArgs) -> anyhow::Result<String> {
    if let Some(s) = &args.subject {
        return Ok(s.clone());
    }
    let agent = args.agent.as_deref().map(AgentId::new).transpose().context("--agent")?;
    let kind = match args.kind.as_deref() {
        None => None,
        Some(k) => Some(EventKind::parse(k).with_context(|| {
            format!(
                "--kind {k:?}: expected one of {}",
                EventKind::ALL.map(EventKind::as_str).join(", ")
            )
        })?),
    };
    Ok(match (args.stream.as_str(), agent, kind) {
        (_, None, None) => String::new(),
        (EVENTS_STREAM, Some(a), Some(k)) => subject::event(&a, k).to_string(),
        (EVENTS_STREAM, Some(a), None) => subject::events_of_agent(&a).to_string(),
        (EVENTS_STREAM, None, Some(k)) => subject::events_of_kind(k).to_string(),
        (REPLIES_STREAM, Some(a), None) => subject::reply(&a).to_string(),
        (stream, _, _) => bail!("--agent/--kind select events (and --agent replies); for {stream} use --subject"),
    })
}

fn selection(args: &ReplayArgs) -> anyhow::Result<Selection> {
    let known = [EVENTS_STREAM, REPLIES_STREAM, WORK_STREAM, DEADLETTER_STREAM];
    if !known.contains(&args.stream.as_str()) {
        bail!("--stream {:?}: expected one of {}", args.stream, known.join(", "));
    }
    let start = match (args.from_seq, args.since, args.from) {
        (Some(seq), _, _) => Start::Seq(seq.max(1)),
        (None, Some(ago), _) => Start::Time(Utc::now() - chrono::Duration::from_std(ago).context("--since is too long")?),
        (None, None, Some(t)) => Start::Time(t),
        (None, None, None) => Start::First,
    };
    if let (Some(from), Some(to)) = (args.from_seq, args.to_seq) {
        if to < from {
            bail!("--to-seq {to} is before --from-seq {from}");
        }
    }
    Ok(Selection {
        stream: args.stream.clone(),
        filter: filter_of(args)?,
        start,
        to_seq: args.to_seq,
        until: args.until,
        limit: args.limit,
    })
}

fn bar(quiet: bool, len: u64, what: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Why a read stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Every selected message was read.
    Done,
    /// Ctrl-C.
    Interrupted,
}

/// One stored message, however it was read.
#[derive(Debug)]
pub struct Stored {
    /// Stream sequence.
    pub seq: u64,
    /// When the stream stored it.
    pub time: DateTime<Utc>,
    /// Its subject.
    pub subject: String,
    /// Its headers.
    pub headers: Option<async_nats::HeaderMap>,
    /// Its payload.
    pub payload: bytes::Bytes,
    /// The message as a consumer delivers it (what a worker's handler
    /// takes); `None` when read by direct get from a work-queue stream.
    pub msg: Option<jetstream::Message>,
}

/// Whether `subject` matches the NATS filter `filter` (`*` one token, `>` the rest).
fn matches(filter: &str, subject: &str) -> bool {
    if filter.is_empty() {
        return true;
    }
    let mut s = subject.split('.');
    for f in filter.split('.') {
        match (f, s.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (f, Some(t)) if f == t => {}
            _ => return false,
        }
    }
    s.next().is_none()
}

/// Reads the selected messages in stream order, as the stream held them when
/// the read started, calling `each` on every one. `progress` counts them.
///
/// Streams with limits retention are read through an ordered push consumer
/// (ephemeral, no acks; nats-server 2.9 has no ordered pull consumers). A
/// work-queue stream (WORK) allows no consumer without acks, so it is read
/// message by message with direct gets, which remove nothing.
pub async fn read<F, Fut>(
    client: &async_nats::Client,
    js: &jetstream::Context,
    sel: &Selection,
    progress: &ProgressBar,
    mut each: F,
) -> anyhow::Result<(u64, Ended)>
where
    F: FnMut(Stored) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut stream = js
        .get_stream(&sel.stream)
        .await
        .with_context(|| format!("looking up stream {} (run `ferry provision`)", sel.stream))?;
    let info = stream.info().await?.clone();
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    let end = sel.to_seq.map_or(last, |t| t.min(last));
    let start_seq = match sel.start {
        Start::Seq(s) => s.max(first),
        _ => first,
    };
    let too_early = |t: DateTime<Utc>| matches!(sel.start, Start::Time(from) if t < from);
    if info.state.messages == 0 || start_seq > end {
        return Ok((0, Ended::Done));
    }
    let mut n = 0u64;
    let interrupt = tokio::signal::ctrl_c();
    tokio::pin!(interrupt);

    if info.config.retention == jetstream::stream::RetentionPolicy::WorkQueue {
        progress.set_length(end - start_seq + 1);
        for seq in start_seq..=end {
            if sel.limit.is_some_and(|l| n >= l) {
                break;
            }
            let got = tokio::select! {
                _ = &mut interrupt => return Ok((n, Ended::Interrupted)),
                got = stream.get_raw_message(seq) => got,
            };
            progress.inc(1);
            // Consumed (deleted) sequences leave gaps.
            let Ok(m) = got else { continue };
            let time = from_offset(m.time);
            if !matches(&sel.filter, m.subject.as_str()) || too_early(time) {
                continue;
            }
            if sel.until.is_some_and(|u| time > u) {
                break;
            }
            each(Stored {
                seq,
                time,
                subject: m.subject.to_string(),
                headers: Some(m.headers),
                payload: m.payload,
                msg: None,
            })
            .await?;
            n += 1;
        }
        return Ok((n, Ended::Done));
    }

    let deliver_policy = match sel.start {
        Start::First => DeliverPolicy::All,
        Start::Seq(_) => DeliverPolicy::ByStartSequence { start_sequence: start_seq },
        Start::Time(t) => DeliverPolicy::ByStartTime { start_time: to_offset(t)? },
    };
    let consumer = stream
        .create_consumer(OrderedConfig {
            deliver_subject: client.new_inbox(),
            filter_subject: sel.filter.clone(),
            deliver_policy,
            ..Default::default()
        })
        .await
        .context("creating an ordered consumer")?;
    let pending = consumer.cached_info().num_pending;
    progress.set_length(sel.limit.map_or(pending, |l| l.min(pending)));
    if pending == 0 {
        return Ok((0, Ended::Done));
    }
    let mut messages = consumer.messages().await.context("reading")?;
    loop {
        if sel.limit.is_some_and(|l| n >= l) {
            return Ok((n, Ended::Done));
        }
        let next = tokio::select! {
            _ = &mut interrupt => return Ok((n, Ended::Interrupted)),
            next = messages.next() => next,
        };
        let Some(msg) = next else { return Ok((n, Ended::Done)) };
        let msg = msg.context("reading")?;
        let (seq, time, left) = {
            let info = msg.info().map_err(|e| anyhow::anyhow!("message info: {e}"))?;
            (info.stream_sequence, from_offset(info.published), info.pending)
        };
        if seq > end || sel.until.is_some_and(|u| time > u) {
            return Ok((n, Ended::Done));
        }
        if !too_early(time) {
            each(Stored {
                seq,
                time,
                subject: msg.subject.to_string(),
                headers: msg.headers.clone(),
                payload: msg.payload.clone(),
                msg: Some(msg),
            })
            .await?;
            n += 1;
            progress.inc(1);
        }
        if left == 0 || seq == end {
            return Ok((n, Ended::Done));
        }
    }
}

fn header_map(h: Option<&async_nats::HeaderMap>) -> Value {
    let mut out = serde_json::Map::new();
    if let Some(h) = h {
        for (k, vs) in h.iter() {
            let vs: Vec<&str> = vs.iter().map(|v| v.as_str()).collect();
            out.insert(k.to_string(), json!(vs.join(", ")));
        }
    }
    Value::Object(out)
}

fn summary(what: &str, n: u64, ended: Ended, started: std::time::Instant) {
    let secs = started.elapsed().as_secs_f64();
    let how = match ended {
        Ended::Done => "",
        Ended::Interrupted => " (stopped by Ctrl-C)",
    };
    eprintln!("ferry replay: {what} {n} messages in {secs:.1}s{how}");
}

pub async fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let client = args.conn.config("ferry replay").connect().await?;
    let js = jetstream::new(client.clone());
    if let Some(id) = &args.trace {
        return trace(&client, &js, id, args.window).await;
    }
    let sel = selection(&args)?;
    let started = std::time::Instant::now();
    if let Some(role) = args.shadow {
        return shadow(&args, &client, &js, &sel, role).await;
    }
    if let Some(to) = &args.to {
        if subject::is_stored(to) {
            bail!("--to {to:?}: one of Ferry's streams stores that subject, so the replay would reach workers or agents; pick a debug subject such as {}", subject::replay_debug());
        }
        let pb = bar(args.quiet, 0, "sending");
        // Paced by deadlines, not a shared timer: message i goes out at
        // start + i / rate.
        let period = (args.rate > 0).then(|| Duration::from_secs_f64(1.0 / f64::from(args.rate)));
        let mut next_at = tokio::time::Instant::now();
        let target = async_nats::Subject::from(to.as_str());
        let (n, ended) = read(&client, &js, &sel, &pb, |msg| {
            let client = client.clone();
            let target = target.clone();
            let at = next_at;
            if let Some(p) = period {
                next_at += p;
            }
            async move {
                tokio::time::sleep_until(at).await;
                let h = msg.headers.unwrap_or_default();
                client.publish_with_headers(target, h, msg.payload).await?;
                Ok(())
            }
        })
        .await?;
        client.flush().await?;
        pb.finish_and_clear();
        summary(&format!("sent to {to}"), n, ended, started);
        return Ok(());
    }
    let pb = bar(args.quiet, 0, "reading");
    let with_headers = args.headers;
    let (n, ended) = read(&client, &js, &sel, &pb, |msg| {
        let mut line = json!({
            "seq": msg.seq,
            "time": msg.time,
            "subject": msg.subject,
            "data": crate::tap::decode(msg.headers.as_ref(), &msg.payload),
        });
        if with_headers {
            line["headers"] = header_map(msg.headers.as_ref());
        }
        pb.suspend(|| println!("{line}"));
        async { Ok(()) }
    })
    .await?;
    pb.finish_and_clear();
    summary("printed", n, ended, started);
    Ok(())
}

/// What a worker did with one event, in a form two runs can be compared by:
/// ids, timestamps and processing times left out.
#[derive(Debug, Clone)]
pub enum Output {
    /// A reply (its body as JSON, without `processing_ms`).
    Reply(Value),
    /// A hand-off to another role, with the rule that made it when known
    /// (a hand-off the inference worker already consumed from WORK is known
    /// by its reply, which does not name the rule).
    HandOff { subject: String, rule: Option<String> },
}

impl PartialEq for Output {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Reply(a), Self::Reply(b)) => a == b,
            (Self::HandOff { subject: s1, rule: r1 }, Self::HandOff { subject: s2, rule: r2 }) => {
                s1 == s2 && (r1 == r2 || r1.is_none() || r2.is_none())
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Reply(v) => write!(f, "reply {v}"),
            Self::HandOff { subject, rule: Some(rule) } => write!(f, "hand-off to {subject} (rule {rule})"),
            Self::HandOff { subject, rule: None } => write!(f, "hand-off to {subject} (answered by inference)"),
        }
    }
}

fn strip_times(v: &mut Value) {
    if let Value::Object(m) = v {
        m.remove("processing_ms");
        for x in m.values_mut() {
            strip_times(x);
        }
    }
}

/// A reply's comparable form and the event it answers.
fn reply_output(h: Option<&async_nats::HeaderMap>, payload: &[u8]) -> Option<(EventId, ReplyId, Output)> {
    let enc = Encoding::from_headers(h).unwrap_or(Encoding::MsgPack);
    let reply = codec::decode_reply(payload, enc, DEFAULT_MAX_PAYLOAD).ok()?;
    let body = serde_json::from_str::<Value>(&codec::reply_body_json(&reply.body).ok()?).ok()?;
    let mut body = json!({ reply.kind().as_str(): body });
    strip_times(&mut body);
    Some((reply.in_reply_to, reply.id, Output::Reply(body)))
}

/// A hand-off's comparable form and the event it carries.
fn handoff_output(subject_name: &str, h: Option<&async_nats::HeaderMap>) -> Option<(EventId, Output)> {
    let h = h?;
    let id = h.get(headers::MSG_ID)?.as_str().parse::<uuid::Uuid>().ok()?;
    let rule = h.get(headers::ROUTE_RULE).map(|v| v.to_string());
    Some((
        EventId(id),
        Output::HandOff {
            subject: subject_name.to_string(),
            rule,
        },
    ))
}

async fn shadow(
    args: &ReplayArgs,
    client: &async_nats::Client,
    js: &jetstream::Context,
    sel: &Selection,
    role: ShadowRole,
) -> anyhow::Result<()> {
    if sel.stream != EVENTS_STREAM {
        bail!("--shadow runs on events: use --stream {EVENTS_STREAM}");
    }
    let ShadowRole::Rules = role;
    let responder = ferry_workers::rules::handler::RESPONDER;
    let rules_path = args.rules.as_ref().context("--shadow rules needs --rules FILE")?;
    let rules = Arc::new(ferry_workers::rules::config::load(rules_path)?);
    let run = match &args.run {
        Some(r) => AgentId::new(r.as_str()).context("--run must be one subject token")?.to_string(),
        None => format!("r{}", uuid::Uuid::now_v7().simple()),
    };
    let mut handler = ferry_workers::rules::handler::RulesHandler::new(
        Publisher::Shadow {
            client: client.clone(),
            run: run.clone(),
        },
        rules.clone(),
        DEFAULT_MAX_PAYLOAD,
    );
    if rules.needs_customers() {
        let url = args
            .database_url
            .as_deref()
            .context("the rules file matches customer_tags, which needs PostgreSQL: pass --database-url or set DATABASE_URL")?;
        let db = ferry_workers::state::DbConfig::new(url);
        handler = handler.with_customers(ferry_workers::state::connect_checked(&db).await?);
    }
    let mut outputs = client.subscribe(subject::all_shadow(&run)).await?;
    eprintln!(
        "ferry replay: shadow run {run}: rules from {}; output on {}",
        rules_path.display(),
        subject::all_shadow(&run)
    );

    // 1. The events through the handler, in stream order.
    let started = std::time::Instant::now();
    let pb = bar(args.quiet, 0, "shadow rules");
    let mut events: BTreeMap<u64, (EventId, String, String)> = BTreeMap::new();
    let failed: std::cell::RefCell<Vec<(u64, String)>> = std::cell::RefCell::new(Vec::new());
    let mut first_time: Option<DateTime<Utc>> = None;
    let (n, ended) = read(client, js, sel, &pb, |msg| {
        let seq = msg.seq;
        first_time = first_time.or(Some(msg.time));
        let enc = Encoding::from_headers(msg.headers.as_ref()).unwrap_or(Encoding::MsgPack);
        let decoded = codec::decode_event(&msg.payload, enc, DEFAULT_MAX_PAYLOAD);
        if let Ok(env) = &decoded {
            let text = match &env.body {
                ferry_schema::EventBody::Chat(c) => c.text.clone(),
                _ => String::new(),
            };
            events.insert(seq, (env.id, msg.subject.clone(), text));
        }
        let handler = &handler;
        let failed = &failed;
        async move {
            let Some(msg) = msg.msg else {
                bail!("{} is read by direct get; shadow mode needs a consumer's message", EVENTS_STREAM)
            };
            match handler.handle(&msg).await {
                Outcome::Done => {}
                Outcome::Poison { code, reason } => {
                    failed.borrow_mut().push((seq, format!("would be dead-lettered ({code}): {reason}")));
                }
                Outcome::RetryAfter { reason, .. } => failed.borrow_mut().push((seq, format!("would be retried: {reason}"))),
            }
            Ok(())
        }
    })
    .await?;
    client.publish(subject::shadow_end(&run), bytes::Bytes::new()).await?;
    client.flush().await?;
    pb.finish_and_clear();

    // 2. What the shadow run published, up to its end marker.
    let end = subject::shadow_end(&run);
    let mut shadow: HashMap<EventId, Vec<Output>> = HashMap::new();
    while let Some(m) = outputs.next().await {
        if m.subject == end {
            break;
        }
        let Some(inner) = subject::unshadow(&run, m.subject.as_str()) else { continue };
        if subject::is_reply(inner) {
            if let Some((event, _, out)) = reply_output(m.headers.as_ref(), &m.payload) {
                shadow.entry(event).or_default().push(out);
            }
        } else if let Some((event, out)) = handoff_output(inner, m.headers.as_ref()) {
            shadow.entry(event).or_default().push(out);
        }
    }

    // 3. What was recorded for the same events: the rules' replies (their ids
    //    follow from the event ids) and the hand-offs (their msg ids are the
    //    event ids), read from the time of the first event on.
    let ids: HashSet<EventId> = events.values().map(|(id, _, _)| *id).collect();
    let want_replies: HashMap<ReplyId, EventId> = ids.iter().map(|e| (ReplyId::for_event(*e, responder), *e)).collect();
    // The inference worker answers only chats the rules handed over: its
    // reply stands for a hand-off WORK no longer holds.
    let inferred: HashMap<ReplyId, EventId> = ids
        .iter()
        .map(|e| (ReplyId::for_event(*e, ferry_workers::inference::handler::RESPONDER), *e))
        .collect();
    let mut recorded: HashMap<EventId, Vec<Output>> = HashMap::new();
    let mut handed: HashSet<EventId> = HashSet::new();
    if let Some(from) = first_time {
        let since = Start::Time(from - chrono::Duration::seconds(1));
        let hidden = ProgressBar::hidden();
        let replies = Selection {
            stream: REPLIES_STREAM.to_string(),
            filter: String::new(),
            start: since,
            to_seq: None,
            until: None,
            limit: None,
        };
        read(client, js, &replies, &hidden, |m| {
            if let Some((_, rid, out)) = reply_output(m.headers.as_ref(), &m.payload) {
                if let Some(e) = want_replies.get(&rid) {
                    recorded.entry(*e).or_default().push(out);
                } else if let Some(e) = inferred.get(&rid) {
                    handed.insert(*e);
                }
            }
            async { Ok(()) }
        })
        .await?;
        let work = Selection {
            stream: WORK_STREAM.to_string(),
            ..replies
        };
        read(client, js, &work, &hidden, |m| {
            if let Some((e, out)) = handoff_output(m.subject.as_str(), m.headers.as_ref()) {
                if ids.contains(&e) {
                    handed.remove(&e);
                    recorded.entry(e).or_default().push(out);
                }
            }
            async { Ok(()) }
        })
        .await?;
        // Answered by inference, and no longer in WORK.
        for e in handed {
            recorded.entry(e).or_default().push(Output::HandOff {
                subject: subject::WorkQueue::InferenceChat.subject().to_string(),
                rule: None,
            });
        }
    }

    // 4. The diff, in stream order.
    let none = Vec::new();
    let (mut same, mut changed) = (0u64, 0u64);
    for (seq, (id, subj, text)) in &events {
        let was = recorded.get(id).unwrap_or(&none);
        let now = shadow.get(id).unwrap_or(&none);
        if was == now {
            same += 1;
            continue;
        }
        changed += 1;
        let show = |o: &[Output]| {
            if o.is_empty() {
                "nothing".to_string()
            } else {
                o.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
            }
        };
        println!("event {id} (seq {seq}, {subj}){}", if text.is_empty() { String::new() } else { format!(": {text:?}") });
        println!("  recorded: {}", show(was));
        println!("  shadow:   {}", show(now));
    }
    let failed = failed.into_inner();
    for (seq, why) in &failed {
        println!("seq {seq}: {why}");
    }
    summary("shadow-replayed", n, ended, started);
    println!(
        "shadow rules: {n} events, {same} same, {changed} changed, {} not handled; nothing was published to agents",
        failed.len()
    );
    Ok(())
}

/// Follows one event across the streams: every message that carries its id
/// (as `Nats-Msg-Id`, in its trace id, as the event a reply answers, or in a
/// dead letter), from a second before the event until `window` after it.
async fn trace(client: &async_nats::Client, js: &jetstream::Context, id: &str, window: Duration) -> anyhow::Result<()> {
    let uuid: uuid::Uuid = id
        .parse()
        .with_context(|| format!("--trace {id:?}: expected an event id (a UUID) or a 32-digit trace id"))?;
    let event = EventId(uuid);
    let (secs, nanos) = uuid
        .get_timestamp()
        .map(|t| t.to_unix())
        .context("--trace: the id is not a UUIDv7, so it carries no time")?;
    let at = DateTime::from_timestamp(i64::try_from(secs).unwrap_or_default(), nanos).context("--trace: time out of range")?;
    let hex = uuid.simple().to_string();
    let until = at + chrono::Duration::from_std(window).context("--window is too long")?;
    let mut hops: Vec<(DateTime<Utc>, String, u64, String, String)> = Vec::new();
    for stream in [EVENTS_STREAM, WORK_STREAM, REPLIES_STREAM, DEADLETTER_STREAM] {
        let sel = Selection {
            stream: stream.to_string(),
            filter: String::new(),
            start: Start::Time(at - chrono::Duration::seconds(1)),
            to_seq: None,
            until: Some(until),
            limit: None,
        };
        read(client, js, &sel, &ProgressBar::hidden(), |m| {
            let h = m.headers.as_ref();
            let msg_id = h.and_then(|h| h.get(headers::MSG_ID)).map(|v| v.to_string());
            let traced = headers::traceparent(h).and_then(headers::trace_id) == Some(hex.as_str());
            let reply = reply_output(h, &m.payload);
            let answers = reply.as_ref().is_some_and(|(e, _, _)| *e == event);
            let enc = Encoding::from_headers(h).unwrap_or(Encoding::MsgPack);
            let carries = codec::decode_event(&m.payload, enc, DEFAULT_MAX_PAYLOAD).is_ok_and(|e| e.id == event);
            if traced || answers || carries || msg_id.as_deref() == Some(id) {
                let what = match (stream, reply) {
                    (DEADLETTER_STREAM, _) => format!(
                        "dead letter ({}): {}",
                        h.and_then(|h| h.get(headers::DEAD_REASON_CODE)).map(|v| v.to_string()).unwrap_or_default(),
                        h.and_then(|h| h.get(headers::DEAD_REASON)).map(|v| v.to_string()).unwrap_or_default()
                    ),
                    (_, Some((_, _, out))) => out.to_string(),
                    (WORK_STREAM, _) => handoff_output(m.subject.as_str(), h).map(|(_, o)| o.to_string()).unwrap_or_default(),
                    _ => crate::tap::decode(h, &m.payload).to_string(),
                };
                hops.push((
                    m.time,
                    stream.to_string(),
                    m.seq,
                    m.subject.clone(),
                    what,
                ));
            }
            async { Ok(()) }
        })
        .await?;
    }
    if hops.is_empty() {
        bail!("no message of event {id} between {} and {until}", at - chrono::Duration::seconds(1));
    }
    hops.sort_by_key(|h| h.0);
    let t0 = hops[0].0;
    for (t, stream, seq, subj, what) in &hops {
        let ms = (*t - t0).num_microseconds().unwrap_or_default() as f64 / 1e3;
        println!("{t} +{ms:>9.1}ms  {stream:<10} seq {seq:<6} {subj}  {what}");
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn times_in_the_forms_operators_type() {
        let t = parse_time("2026-11-20T10:00").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-20T10:00:00+00:00");
        assert_eq!(parse_time("2026-11-20T18:00:00+08:00").unwrap(), t);
        assert_eq!(parse_time("2026-11-20T10:00:00.5").unwrap().timestamp_subsec_millis(), 500);
        assert_eq!(parse_time("2026-11-20").unwrap().to_rfc3339(), "2026-11-20T00:00:00+00:00");
        let e = parse_time("yesterday").unwrap_err();
        assert!(e.contains("2026-11-20T10:00"), "{e}");
    }

    #[test]
    fn times_survive_the_trip_through_the_client_type() {
        let t = parse_time("2026-11-20T10:00:00.123456789Z").unwrap();
        assert_eq!(from_offset(to_offset(t).unwrap()), t);
    }

    #[test]
    fn comparable_output_leaves_out_processing_time() {
        let mut v = json!({"chat": {"content": "hi", "processing_ms": 1.5, "answered_by": {"name": "r"}}});
        strip_times(&mut v);
        assert_eq!(v, json!({"chat": {"content": "hi", "answered_by": {"name": "r"}}}));
    }
}

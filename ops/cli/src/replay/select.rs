//! Which stored messages a replay reads, and reading them: the selection from the flags, then the messages in stream order.

use anyhow::{bail, Context as _};
use async_nats::jetstream::{self, consumer::push::OrderedConfig, consumer::DeliverPolicy};
use chrono::{DateTime, NaiveDateTime, Utc};
use ferry_schema::topology::{DEADLETTER_STREAM, EVENTS_STREAM, REPLIES_STREAM, WORK_STREAM};
use ferry_schema::{subject, AgentId, EventKind};
use futures::StreamExt;
use indicatif::ProgressBar;

use super::ReplayArgs;

/// `2026-11-20T10:00`, `2026-11-20T10:00:30` (UTC), or RFC 3339 with an offset.
pub(super) fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
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

pub(super) fn selection(args: &ReplayArgs) -> anyhow::Result<Selection> {
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

impl Selection {
    /// Whether a message stored at `t` comes before a start given as a time.
    fn too_early(&self, t: DateTime<Utc>) -> bool {
        matches!(self.start, Start::Time(from) if t < from)
    }
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
    each: F,
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
    if info.state.messages == 0 || start_seq > end {
        return Ok((0, Ended::Done));
    }
    if info.config.retention == jetstream::stream::RetentionPolicy::WorkQueue {
        return read_direct(&stream, sel, (start_seq, end), progress, each).await;
    }
    read_ordered(client, &stream, sel, (start_seq, end), progress, each).await
}

/// [`read`] from a work-queue stream: direct gets of the sequences from `start_seq` to `end`.
async fn read_direct<F, Fut>(
    stream: &jetstream::stream::Stream,
    sel: &Selection,
    (start_seq, end): (u64, u64),
    progress: &ProgressBar,
    mut each: F,
) -> anyhow::Result<(u64, Ended)>
where
    F: FnMut(Stored) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut n = 0u64;
    let interrupt = tokio::signal::ctrl_c();
    tokio::pin!(interrupt);
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
        if !matches(&sel.filter, m.subject.as_str()) || sel.too_early(time) {
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
    Ok((n, Ended::Done))
}

/// [`read`] from a stream with limits retention: an ordered push consumer
/// from the selection's start, up to sequence `end`.
async fn read_ordered<F, Fut>(
    client: &async_nats::Client,
    stream: &jetstream::stream::Stream,
    sel: &Selection,
    (start_seq, end): (u64, u64),
    progress: &ProgressBar,
    mut each: F,
) -> anyhow::Result<(u64, Ended)>
where
    F: FnMut(Stored) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut n = 0u64;
    let interrupt = tokio::signal::ctrl_c();
    tokio::pin!(interrupt);
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
        if !sel.too_early(time) {
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
}

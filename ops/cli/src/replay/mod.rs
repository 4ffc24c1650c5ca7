//! `ferry replay`: select stored messages by subject, sequence or time and print them, re-send them, run them through a worker in shadow mode, or follow one event's trace.
//!
//! # Layout
//!
//! - [`select`]: the selection the flags make, and reading it from a
//!   stream in order (ordered consumer, or direct gets on `WORK`).
//! - [`print`]: the default mode (JSON lines on stdout), and the progress
//!   bar and summary every mode shows on stderr.
//! - [`resend`]: `--to`, publishing again on a debug subject.
//! - [`shadow`]: `--shadow`, a worker's logic on stored events, diffed
//!   against what was recorded.
//! - [`trace`]: `--trace`, one event's hops across the streams.
//! - [`output`]: what a worker did with an event, in the form `shadow`
//!   compares and `trace` prints.

mod output;
mod print;
mod resend;
mod select;
mod shadow;
mod trace;

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use clap::{Args, ValueEnum};
use ferry_schema::topology::EVENTS_STREAM;

use self::select::parse_time;
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
    /// Only events of this kind: chat, activity, heartbeat, predict, interaction.
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


pub async fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let client = args.conn.config("ferry replay").connect().await?;
    let js = jetstream::new(client.clone());
    if let Some(id) = &args.trace {
        return trace::trace(&client, &js, id, args.window).await;
    }
    let sel = select::selection(&args)?;
    if let Some(role) = args.shadow {
        return shadow::shadow(&args, &client, &js, &sel, role).await;
    }
    if let Some(to) = &args.to {
        return resend::resend(&client, &js, &sel, to, args.rate, args.quiet).await;
    }
    print::print(&client, &js, &sel, args.quiet, args.headers).await
}

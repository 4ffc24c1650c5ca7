//! `ferry replay --shadow`: stored events through a worker's logic, its output on `shadow.<run>.>` (never to an agent), diffed against what was recorded for the same events.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context as _};
use async_nats::jetstream;
use chrono::{DateTime, Utc};
use ferry_schema::codec::{self, DEFAULT_MAX_PAYLOAD};
use ferry_schema::reply::ReplyId;
use ferry_schema::topology::{EVENTS_STREAM, REPLIES_STREAM, WORK_STREAM};
use ferry_schema::{subject, AgentId, EventId};
use ferry_workers::rules::handler::RulesHandler;
use ferry_workers::runtime::{publish::Publisher, Handler as _, Outcome};
use futures::StreamExt;
use indicatif::ProgressBar;

use super::output::{handoff_output, reply_output, Output};
use super::print::{bar, summary};
use super::select::{read, Ended, Selection, Start};
use super::{ReplayArgs, ShadowRole};

/// What each event read went through the handler needs for the diff, by
/// stream sequence: its id, its subject, and a chat's text.
type Events = BTreeMap<u64, (EventId, String, String)>;

/// What a worker did with each event, by event.
type Outputs = HashMap<EventId, Vec<Output>>;

/// The selected events, put through the handler.
struct Replayed {
    events: Events,
    /// Events the handler would not have finished: stream sequence and why.
    failed: Vec<(u64, String)>,
    /// When the stream stored the first one.
    first_time: Option<DateTime<Utc>>,
    /// Messages read, and why the read stopped.
    read: (u64, Ended),
}

/// Runs `role`'s logic on the selected events (see [`ReplayArgs`]) and
/// prints, in stream order, each event whose shadow output differs from
/// what was recorded for it, then the events the handler would not have
/// finished, and a summary.
pub(super) async fn shadow(
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
    let responder = ferry_schema::Responder::Rules.as_str();
    let rules_path = args.rules.as_ref().context("--shadow rules needs --rules FILE")?;
    let (handler, run) = rules_handler(args, client, rules_path).await?;
    let mut outputs = client.subscribe(subject::all_shadow(&run)).await?;
    eprintln!(
        "ferry replay: shadow run {run}: rules from {}; output on {}",
        rules_path.display(),
        subject::all_shadow(&run)
    );

    let started = Instant::now();
    let replayed = through_handler(client, js, sel, &handler, args.quiet).await?;
    client.publish(subject::shadow_end(&run), bytes::Bytes::new()).await?;
    client.flush().await?;
    let shadow = shadow_outputs(&mut outputs, &run).await;
    let recorded = match replayed.first_time {
        Some(from) => {
            let ids: HashSet<EventId> = replayed.events.values().map(|(id, _, _)| *id).collect();
            recorded_outputs(client, js, &ids, from, responder).await?
        }
        None => Outputs::new(),
    };

    let (same, changed) = print_diff(&replayed.events, &recorded, &shadow);
    for (seq, why) in &replayed.failed {
        println!("seq {seq}: {why}");
    }
    let (n, ended) = replayed.read;
    summary("shadow-replayed", n, ended, started);
    println!(
        "shadow rules: {n} events, {same} same, {changed} changed, {} not handled; nothing was published to agents",
        replayed.failed.len()
    );
    Ok(())
}

/// The rules worker's handler with the rules of `rules_path`, publishing
/// on the shadow subjects of a run (`--run`, or a random name), and that
/// run's name.
async fn rules_handler(
    args: &ReplayArgs,
    client: &async_nats::Client,
    rules_path: &Path,
) -> anyhow::Result<(RulesHandler, String)> {
    let rules = Arc::new(ferry_workers::rules::config::load(rules_path)?);
    let run = match &args.run {
        Some(r) => AgentId::new(r.as_str()).context("--run must be one subject token")?.to_string(),
        None => format!("r{}", uuid::Uuid::now_v7().simple()),
    };
    let mut handler = RulesHandler::new(
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
    Ok((handler, run))
}

/// Step 1: the selected events through `handler`, in stream order.
async fn through_handler(
    client: &async_nats::Client,
    js: &jetstream::Context,
    sel: &Selection,
    handler: &RulesHandler,
    quiet: bool,
) -> anyhow::Result<Replayed> {
    let pb = bar(quiet, 0, "shadow rules");
    let mut events = Events::new();
    let failed: RefCell<Vec<(u64, String)>> = RefCell::new(Vec::new());
    let mut first_time: Option<DateTime<Utc>> = None;
    let counted = read(client, js, sel, &pb, |msg| {
        let seq = msg.seq;
        first_time = first_time.or(Some(msg.time));
        // As the workers decode it: a hand-typed event gets the id they gave it.
        let at = codec::StreamPosition { seq, stored: msg.time };
        let decoded = codec::decode_event_message(&msg.subject, msg.headers.as_ref(), &msg.payload, DEFAULT_MAX_PAYLOAD, Some(&at))
            .map(|m| m.env);
        if let Ok(env) = &decoded {
            let text = match &env.body {
                ferry_schema::EventBody::Chat(c) => c.text.clone(),
                _ => String::new(),
            };
            events.insert(seq, (env.id, msg.subject.clone(), text));
        }
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
    pb.finish_and_clear();
    Ok(Replayed {
        events,
        failed: failed.into_inner(),
        first_time,
        read: counted,
    })
}

/// Step 2: what the shadow run published, up to its end marker.
async fn shadow_outputs(outputs: &mut async_nats::Subscriber, run: &str) -> Outputs {
    let end = subject::shadow_end(run);
    let mut shadow = Outputs::new();
    while let Some(m) = outputs.next().await {
        if m.subject == end {
            break;
        }
        let Some(inner) = subject::unshadow(run, m.subject.as_str()) else { continue };
        if subject::is_reply(inner) {
            if let Some((event, _, out)) = reply_output(m.headers.as_ref(), &m.payload) {
                shadow.entry(event).or_default().push(out);
            }
        } else if let Some((event, out)) = handoff_output(inner, m.headers.as_ref()) {
            shadow.entry(event).or_default().push(out);
        }
    }
    shadow
}

/// Step 3: what was recorded for the events `ids`: `responder`'s replies
/// (their ids follow from the event ids) and the hand-offs (their msg ids
/// are the event ids), read from a second before `from` on.
async fn recorded_outputs(
    client: &async_nats::Client,
    js: &jetstream::Context,
    ids: &HashSet<EventId>,
    from: DateTime<Utc>,
    responder: &str,
) -> anyhow::Result<Outputs> {
    let want_replies: HashMap<ReplyId, EventId> = ids.iter().map(|e| (ReplyId::for_event(*e, responder), *e)).collect();
    // The inference worker answers only chats the rules handed over: its
    // reply stands for a hand-off WORK no longer holds.
    let inferred: HashMap<ReplyId, EventId> = ids
        .iter()
        .map(|e| (ReplyId::for_event(*e, ferry_schema::Responder::Inference.as_str()), *e))
        .collect();
    let mut recorded = Outputs::new();
    let mut handed: HashSet<EventId> = HashSet::new();
    let hidden = ProgressBar::hidden();
    let replies = Selection {
        stream: REPLIES_STREAM.to_string(),
        filter: String::new(),
        start: Start::Time(from - chrono::Duration::seconds(1)),
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
    Ok(recorded)
}

/// Step 4: the diff, in stream order; returns how many events came out
/// the same and how many changed.
fn print_diff(events: &Events, recorded: &Outputs, shadow: &Outputs) -> (u64, u64) {
    let none = Vec::new();
    let (mut same, mut changed) = (0u64, 0u64);
    for (seq, (id, subj, text)) in events {
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
    (same, changed)
}

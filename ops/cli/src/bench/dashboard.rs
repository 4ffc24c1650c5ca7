//! `ferry bench dashboard`: the pipeline under load without, with, and again without a dashboard (and a browser on its page): what the dashboard adds to the CPU per event, its memory, and the delay from a publish to the page.
//!
//! Both phases run the rules worker and the archiver as processes on one
//! nats-server and one PostgreSQL, fed by simulated agents (activities and
//! chats at `--rate`, a heartbeat from each agent every `--heartbeat-secs`)
//! published from this process. Phase (a) has no dashboard; phase (b)
//! starts `ferry dashboard` (with the archive) and a headless Chromium
//! logged in on its page. The pipeline's CPU is the broker's and the
//! workers' (from `/proc`); (b) adds the dashboard server's. Every 500 ms
//! of (b) a new agent `mark-<n>` heartbeats once; the page records when its
//! row appears, and the delay is that time less the publish time (one
//! machine, one clock). Phase (a') runs the pipeline alone again after (b):
//! the baseline is the mean of (a) and (a'), and their spread is printed,
//! since on two cores it is of the size of the target itself.

use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use clap::Args;
use ferry_schema::event::{Activity, ChatMessage, ChatType, Heartbeat, MessageType};
use ferry_schema::topology::{self, Role, StreamSettings};
use ferry_schema::{codec, headers, subject, AgentId, Encoding, Envelope, EventBody};
use ferry_stack::{free_port, NatsServer, PgServer};
use tokio_util::sync::CancellationToken;

use super::common::{cores, cpu_ticks, median_of, verdict};

/// The delay target: publish to page, p99.
const TARGET_P99_MS: f64 = 1000.0;
/// The CPU target: what the dashboard adds to the pipeline's CPU per event.
const TARGET_OVERHEAD: f64 = 0.05;
/// How often (b) sends a marker heartbeat.
const MARK_EVERY: Duration = Duration::from_millis(500);
/// Seconds of load before each phase's clock starts.
const WARM_UP: Duration = Duration::from_secs(3);

/// The dashboard's cost under load and the delay from publish to page.
#[derive(Debug, Args)]
pub struct DashboardBench {
    /// Simulated agents.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Events per second from all agents together (activities, every tenth
    /// a chat), heartbeats on top.
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    /// Seconds between two heartbeats of one agent.
    #[arg(long, default_value_t = 30)]
    heartbeat_secs: u64,
    /// Seconds each phase is measured.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
}

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What one phase measured.
#[derive(Debug, Default)]
struct Phase {
    events: u64,
    secs: f64,
    pipeline_ticks: u64,
    dashboard_ticks: u64,
    /// Messages the workers' consumers had not yet acked at the end.
    behind: u64,
}

impl Phase {
    fn per_event_us(&self, ticks: u64) -> f64 {
        // A clock tick is 10 ms.
        ticks as f64 * 10_000.0 / self.events.max(1) as f64
    }
}

/// The event a simulated agent sends as its `i`-th.
fn event(agent: &AgentId, i: u64) -> Envelope {
    let body = if i % 10 == 0 {
        EventBody::Chat(ChatMessage {
            chat: "Alice".into(),
            chat_type: ChatType::Direct,
            sender: "Alice".into(),
            msg_type: MessageType::Text,
            text: format!("hello {i}"),
        })
    } else {
        EventBody::Activity(Activity {
            app: "excel.exe".into(),
            title: format!("Book{i}.xlsx"),
            exe: None,
            pid: Some(42),
            site: None,
            afk: false,
            duration_ms: 1000,
        })
    };
    Envelope::new(agent.clone(), body)
}

fn heartbeat(agent: &AgentId) -> Envelope {
    Envelope::new(
        agent.clone(),
        EventBody::Heartbeat(Heartbeat {
            version: "bench".into(),
            cpu_percent: 1.0,
            rss_bytes: 30 << 20,
            spool_depth: 0,
            oldest_unsent_ms: None,
            components: vec![],
        }),
    )
}

async fn send(client: &async_nats::Client, env: &Envelope) -> anyhow::Result<()> {
    let payload = codec::encode_event(env, Encoding::MsgPack)?;
    let h = headers::for_publish(env.id.text().as_str(), Encoding::MsgPack, None);
    client.publish_with_headers(subject::event(&env.agent, env.kind()).to_string(), h, payload.into()).await?;
    Ok(())
}

/// Publishes the simulated agents' load until `stop`, counting into `sent`.
async fn load(client: async_nats::Client, args_rate: u64, agents: Vec<AgentId>, heartbeat_secs: u64, sent: Arc<AtomicU64>, stop: CancellationToken) -> anyhow::Result<()> {
    let tick = Duration::from_millis(10);
    let per_tick = (args_rate as f64 / 100.0).max(1.0);
    let beats_per_tick = agents.len() as f64 / (heartbeat_secs.max(1) as f64 * 100.0);
    let (mut owed, mut beats_owed) = (0.0f64, 0.0f64);
    let (mut i, mut next_beat) = (0u64, 0usize);
    let mut every = tokio::time::interval(tick);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = every.tick() => {}
        }
        owed += per_tick;
        beats_owed += beats_per_tick;
        while owed >= 1.0 {
            let agent = &agents[(i as usize) % agents.len()];
            send(&client, &event(agent, i)).await?;
            i += 1;
            owed -= 1.0;
            sent.fetch_add(1, Ordering::Relaxed);
        }
        while beats_owed >= 1.0 {
            send(&client, &heartbeat(&agents[next_beat % agents.len()])).await?;
            next_beat += 1;
            beats_owed -= 1.0;
            sent.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Messages the worker consumers have not acked yet.
async fn behind(js: &jetstream::Context) -> anyhow::Result<u64> {
    let lags = crate::stats::consumer_lags(js).await?;
    Ok(lags
        .iter()
        .filter(|c| ["rules", "archiver-events", "archiver-replies"].contains(&c.consumer.as_str()))
        .map(|c| c.pending + c.ack_pending as u64)
        .sum())
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok()))?)
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn start_worker(bin: &std::path::Path, role: Role, nats: &NatsServer, db_url: &str, extra: &[&str], log: &std::path::Path) -> anyhow::Result<Killed> {
    let log = std::fs::File::create(log)?;
    let child = Command::new(bin)
        .arg(role.as_str())
        .args(extra)
        .env("NATS_URL", nats.url())
        .env("NATS_USER", role.as_str())
        .env("NATS_PASSWORD", nats.secrets().role(role))
        .env("DATABASE_URL", db_url)
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {} {}", bin.display(), role.as_str()))?;
    Ok(Killed(child))
}

/// Waits until services named `names` answer `$SRV.STATS`.
async fn wait_for_services(client: &async_nats::Client, names: &[&str]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up: Vec<String> = crate::stats::service_stats(client, Duration::from_millis(300)).await?.into_iter().map(|s| s.name).collect();
        if names.iter().all(|n| up.iter().any(|u| u == n)) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "workers not up after 60 s (up: {up:?}, waiting for {names:?})");
    }
}

pub async fn run(args: DashboardBench) -> anyhow::Result<()> {
    anyhow::ensure!(args.agents > 0 && args.rate > 0 && args.seconds > 0, "--agents, --rate and --seconds must be above 0");
    eprintln!(
        "ferry bench dashboard: {} agents (a heartbeat each every {} s), {} events/s, {} s per phase, {} cores",
        args.agents, args.heartbeat_secs, args.rate, args.seconds, cores()
    );
    // Before `worker_binary`, which may rebuild this very binary in a
    // checkout: the path then names the new file, not a deleted one.
    let exe = std::env::current_exe()?;
    let nats = tokio::task::spawn_blocking(NatsServer::start_temp).await??;
    let broker_pid = nats.pid().context("the broker's pid")?;
    let pg = tokio::task::spawn_blocking(PgServer::start_temp).await??;
    crate::db::migrate(&pg.url(), None).await.context("migrating the bench database")?;
    let op = nats.operator("bench dashboard").connect().await?;
    let js = jetstream::new(op.clone());
    topology::provision(&js, &StreamSettings::default(), &[]).await?;

    let dir = tempfile::tempdir()?;
    let rules_file = dir.path().join("rules.toml");
    std::fs::write(&rules_file, "[[rule]]\nname = \"echo\"\naction = \"reply\"\ntemplate = \"echo: {text}\"\n")?;
    let bin = crate::procs::worker_binary(None)?;
    let rules_path = rules_file.display().to_string();
    let workers = [
        start_worker(&bin, Role::Rules, &nats, &pg.url(), &["--rules", &rules_path], &dir.path().join("rules.log"))?,
        start_worker(&bin, Role::Archiver, &nats, &pg.url(), &[], &dir.path().join("archiver.log"))?,
    ];
    wait_for_services(&op, &["ferry-rules", "ferry-archiver"]).await?;
    let pipeline_pids: Vec<u32> = std::iter::once(broker_pid).chain(workers.iter().map(|w| w.0.id())).collect();
    let pipeline_ticks = || -> anyhow::Result<u64> { pipeline_pids.iter().map(|p| cpu_ticks(*p)).sum() };

    let agents: Vec<AgentId> = (0..args.agents).map(|i| AgentId::new(format!("bench-{i:04}"))).collect::<Result<_, _>>()?;
    let sent = Arc::new(AtomicU64::new(0));
    let stop_load = CancellationToken::new();
    let loader = tokio::spawn(load(op.clone(), args.rate, agents, args.heartbeat_secs, sent.clone(), stop_load.clone()));

    // (a) the pipeline alone.
    eprintln!("  (a) the pipeline without a dashboard ...");
    tokio::time::sleep(WARM_UP).await;
    let a = measure(&args, &sent, &pipeline_ticks, || Ok(0), &js).await?;

    // (b) with the dashboard and a browser on its page.
    eprintln!("  (b) with `ferry dashboard` and a browser on its page ...");
    let port = free_port()?;
    let mut child = Command::new(&exe)
        .args(["dashboard", "--server", &nats.url(), "--password", &nats.secrets().operator])
        .args(["--listen", &format!("127.0.0.1:{port}"), "--database-url", &pg.url()])
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {} dashboard", exe.display()))?;
    let stderr = child.stderr.take().context("the dashboard's stderr")?;
    let dashboard = Killed(child);
    let mut lines = std::io::BufReader::new(stderr).lines();
    let said = tokio::task::spawn_blocking(move || {
        let first = lines.next();
        std::thread::spawn(move || lines.for_each(drop));
        first
    })
    .await?
    .context("the dashboard said nothing")??;
    anyhow::ensure!(said.contains("dashboard on http://"), "ferry dashboard: {said}");
    let dash_pid = dashboard.0.id();

    let mut page = ferry_harness::browser::Page::open(1400, 1000).await?;
    page.call("Page.navigate", serde_json::json!({"url": format!("http://127.0.0.1:{port}/")})).await?;
    let ready = |r: Result<(), String>, what: &str| r.map_err(|body| anyhow::anyhow!("{what} never showed; the page:\n{body}"));
    ready(page.wait_until("!!document.getElementById('login') && !document.getElementById('login').hidden").await?, "the login form")?;
    let pw = serde_json::to_string(&nats.secrets().operator)?;
    page.eval(&format!("document.getElementById('password').value = {pw}; document.getElementById('login-button').click(); true")).await?;
    ready(page.wait_until("document.getElementById('status').innerText.startsWith('live')").await?, "the live feed")?;
    // The page notes when each marker agent's row first appears.
    page.eval(
        "window.__seen = {}; new MutationObserver(() => { for (const r of document.querySelectorAll('#agents tr')) { \
           const id = r.firstChild && r.firstChild.textContent; \
           if (id && id.startsWith('mark-') && !(id in window.__seen)) window.__seen[id] = Date.now(); } }) \
         .observe(document.getElementById('agents'), {childList: true, subtree: true}); true",
    )
    .await?;
    tokio::time::sleep(WARM_UP).await;

    let marks: Arc<std::sync::Mutex<BTreeMap<String, i64>>> = Arc::default();
    let stop_marks = CancellationToken::new();
    let marker = {
        let (client, marks, stop) = (op.clone(), marks.clone(), stop_marks.clone());
        tokio::spawn(async move {
            let mut n = 0u32;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return anyhow::Ok(()),
                    _ = tokio::time::sleep(MARK_EVERY) => {}
                }
                let agent = AgentId::new(format!("mark-{n:04}"))?;
                let at = chrono::Utc::now().timestamp_millis();
                send(&client, &heartbeat(&agent)).await?;
                marks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(agent.to_string(), at);
                n += 1;
            }
        })
    };
    let b = measure(&args, &sent, &pipeline_ticks, || cpu_ticks(dash_pid), &js).await?;
    stop_marks.cancel();
    marker.await??;
    let rss = rss_mib(dash_pid);
    // The last markers get a moment to arrive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seen: BTreeMap<String, f64> = serde_json::from_value(page.eval("window.__seen").await?).unwrap_or_default();

    // (a') the pipeline alone again: the baseline is the mean of (a) and
    // (a'), and their spread shows how much the pipeline alone varies.
    eprintln!("  (a') the pipeline alone again ...");
    drop(page);
    drop(dashboard);
    tokio::time::sleep(WARM_UP).await;
    let a2 = measure(&args, &sent, &pipeline_ticks, || Ok(0), &js).await?;
    stop_load.cancel();
    loader.await??;

    let published = marks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let delays: Vec<f64> = published.iter().filter_map(|(id, at)| seen.get(id).map(|t| t - *at as f64)).collect();
    let missed = published.len() - delays.len();
    let pct = |p: f64| {
        let mut v = delays.clone();
        v.sort_by(f64::total_cmp);
        v.get(((v.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or(f64::NAN)
    };
    let (p50, p99) = (median_of(delays.clone()), pct(0.99));

    let (a1_us, a2_us) = (a.per_event_us(a.pipeline_ticks), a2.per_event_us(a2.pipeline_ticks));
    let a_us = (a1_us + a2_us) / 2.0;
    let (b_pipe_us, b_dash_us) = (b.per_event_us(b.pipeline_ticks), b.per_event_us(b.dashboard_ticks));
    let overhead = (b_pipe_us + b_dash_us) / a_us - 1.0;
    let own = b_dash_us / a_us;
    let spread = (a1_us - a2_us).abs() / a_us;
    println!("| phase | events/s | pipeline CPU µs/event | dashboard CPU µs/event | dashboard CPU (% of a core) | unacked at end |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!("| (a) pipeline alone | {:.0} | {a1_us:.1} | - | - | {} |", a.events as f64 / a.secs, a.behind);
    println!(
        "| (b) with dashboard + page | {:.0} | {b_pipe_us:.1} | {b_dash_us:.1} | {:.1} | {} |",
        b.events as f64 / b.secs,
        b.dashboard_ticks as f64 / b.secs,
        b.behind
    );
    println!("| (a') pipeline alone again | {:.0} | {a2_us:.1} | - | - | {} |", a2.events as f64 / a2.secs, a2.behind);
    println!();
    println!("dashboard RSS: {rss:.0} MiB");
    println!(
        "publish to page, {} markers ({missed} not seen): p50 {p50:.0} ms, p99 {p99:.0} ms (target p99 < {TARGET_P99_MS:.0} ms: {})",
        published.len(),
        verdict(missed == 0 && p99 < TARGET_P99_MS)
    );
    println!(
        "CPU per event added by the dashboard (its own and the pipeline's change, against the mean of (a) and (a')): {:+.1}% (target < {:.0}%: {})",
        overhead * 100.0,
        TARGET_OVERHEAD * 100.0,
        verdict(overhead < TARGET_OVERHEAD)
    );
    println!(
        "of which the dashboard's own: {:+.1}%; the pipeline alone varied {:.1}% between (a) and (a')",
        own * 100.0,
        spread * 100.0
    );
    if a.behind > args.rate || b.behind > args.rate || a2.behind > args.rate {
        println!("note: the workers fell behind the load (more than a second's events unacked); CPU per event then undercounts their work");
    }
    drop(workers);
    Ok(())
}

/// One measured phase of `args.seconds`: events sent, the pipeline's CPU
/// and `extra`'s, and how far the workers were behind at the end.
async fn measure(
    args: &DashboardBench,
    sent: &AtomicU64,
    pipeline: &dyn Fn() -> anyhow::Result<u64>,
    extra: impl Fn() -> anyhow::Result<u64>,
    js: &jetstream::Context,
) -> anyhow::Result<Phase> {
    let (e0, p0, x0, t0) = (sent.load(Ordering::Relaxed), pipeline()?, extra()?, Instant::now());
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let (e1, p1, x1, secs) = (sent.load(Ordering::Relaxed), pipeline()?, extra()?, t0.elapsed().as_secs_f64());
    Ok(Phase {
        events: e1 - e0,
        secs,
        pipeline_ticks: p1.saturating_sub(p0),
        dashboard_ticks: x1.saturating_sub(x0),
        behind: behind(js).await?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_schema::EventKind;

    #[test]
    fn every_tenth_event_is_a_chat() {
        let a = AgentId::new("bench-0001").unwrap_or_else(|e| panic!("{e}"));
        let kinds: Vec<EventKind> = (0..20).map(|i| event(&a, i).kind()).collect();
        assert_eq!(kinds.iter().filter(|k| **k == EventKind::Chat).count(), 2);
        assert_eq!(heartbeat(&a).kind(), EventKind::Heartbeat);
    }
}

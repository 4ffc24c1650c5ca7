//! `ferry bench agent`: the agent's footprint and throughput against the targets.
//!
//! (a) Steady state: the real `ferry-agent` binary (Linux build) fed one
//!     activity event per second on stdin for `--steady-secs`, publishing to
//!     a fresh broker; its RSS and CPU are read from `/proc` after a warm-up.
//! (b) Spool writes: `--events` activity events appended to a fresh spool
//!     in the batches the spool writer makes (encode, seal, fsync per batch).
//! (c) Drain after an outage: the same spool, now full, published to the
//!     broker by the drainer until empty (in order, acks awaited, removal
//!     fsynced). With `--sync-cost`, also to a broker that fsyncs every
//!     write (`sync_interval: always`), for its cost.
//!
//! The targets are absolute, so the "baseline" each row is compared to is
//! its target: the ratio says how far inside (>= 1) or outside (< 1) it is.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use ferry_agent::health::Health;
use ferry_agent::pipeline::MAX_BATCH;
use ferry_agent::spool::{Spool, SpoolConfig};
use ferry_agent::{Agent, AgentConfig};
use ferry_schema::event::Activity;
use ferry_schema::topology::{self, StreamSettings};
use ferry_schema::{AgentId, Encoding, Envelope, EventBody};
use ferry_stack::NatsServer;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use super::common::{cpu_ticks, median_of, verdict};

#[derive(Debug, Args)]
pub struct AgentBench {
    /// Events spooled, then drained, in (b) and (c).
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Seconds of the steady state (a), after a 5 s warm-up.
    #[arg(long, default_value_t = 60)]
    steady_secs: u64,
    /// Runs of (b) and (c); the table shows medians.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// The ferry-agent binary [default: beside this ferry, built with cargo if missing].
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// Also run the steady state with ferry-agent.exe under Wine (cross-built,
    /// in a fresh prefix on its own Xvfb) and report its memory, for information.
    #[arg(long)]
    wine: bool,
    /// Also drain (c) to a second broker with `sync_interval: always` (an
    /// fsync per write, the production setting) and report its rate as a
    /// share of the default broker's. Needs nats-server 2.10 or later:
    /// FERRY_NATS_SERVER=2.15.1.
    #[arg(long)]
    sync_cost: bool,
}

fn activity(agent: &AgentId, i: usize) -> Envelope {
    Envelope::new(
        agent.clone(),
        EventBody::Activity(Activity {
            app: "chrome.exe".into(),
            title: format!("Order {i} - Customer portal"),
            exe: Some("C:\\Program Files\\Google\\Chrome\\Application\\chrome.exe".into()),
            pid: Some(4242),
            site: Some("portal.example.com".into()),
            afk: false,
            duration_ms: 12_000,
        }),
    )
}

pub async fn run(args: AgentBench) -> anyhow::Result<()> {
    let agent_id = AgentId::new("desk-1")?;
    eprintln!("ferry bench agent: starting a fresh nats-server ...");
    let nats = NatsServer::start_temp().context("starting nats-server")?;
    let js = async_nats::jetstream::new(nats.operator("bench").connect().await?);
    topology::provision(&js, &StreamSettings::default(), std::slice::from_ref(&agent_id)).await?;

    // (a) steady state of the real binary.
    let bin = match args.agent_bin.clone() {
        Some(b) => b,
        None => agent_binary()?,
    };
    eprintln!("(a) {} at 1 event/s for {} s (+5 s warm-up) ...", bin.display(), args.steady_secs);
    let (rss, cpu_pct) = steady(&bin, &nats, &agent_id, args.steady_secs).await?;

    let wine = if args.wine {
        eprintln!("(a') ferry-agent.exe under Wine at 1 event/s for {} s (+5 s warm-up) ...", args.steady_secs);
        Some(steady_wine(&nats, &agent_id, args.steady_secs).await?)
    } else {
        None
    };

    // (b) and (c), and (c) again on a broker that fsyncs every write.
    let sync_nats = if args.sync_cost {
        eprintln!("(c') a second nats-server with sync_interval: always ...");
        let dir = tempfile::tempdir()?;
        let conf = dir.path().join("nats.conf");
        let store = dir.path().join("store");
        std::fs::write(&conf, ferry_stack::nats::with_sync_always(&ferry_stack::nats::with_store_dir(&ferry_stack::nats::demo_nats_conf(), &store)))?;
        let opts = ferry_stack::NatsServerOptions { data_dir: Some(dir.path().to_path_buf()), conf: Some(conf), ..Default::default() };
        let server = NatsServer::start(opts).context(
            "starting nats-server with sync_interval: always (2.10 or later: run with FERRY_NATS_SERVER=2.15.1)",
        )?;
        let js = async_nats::jetstream::new(server.operator("bench").connect().await?);
        topology::provision(&js, &StreamSettings::default(), std::slice::from_ref(&agent_id)).await?;
        Some((server, dir))
    } else {
        None
    };
    let mut writes = Vec::new();
    let mut drains = Vec::new();
    let mut synced = Vec::new();
    for run in 1..=args.repeat.max(1) {
        let (write_rate, drain_rate) = spool_and_drain(&nats, &agent_id, args.events).await?;
        eprintln!("    run {run}: spool writes {write_rate:.0}/s, drain {drain_rate:.0}/s");
        writes.push(write_rate);
        drains.push(drain_rate);
        if let Some((server, _)) = &sync_nats {
            let (_, rate) = spool_and_drain(server, &agent_id, args.events).await?;
            eprintln!("    run {run}: drain to the fsync-every-write broker {rate:.0}/s");
            synced.push(rate);
        }
    }
    let write = median_of(writes);
    let drain = median_of(drains);

    println!();
    println!("ferry bench agent ({} events spooled and drained, medians of {}; steady state {} s)", args.events, args.repeat.max(1), args.steady_secs);
    println!("| measure | measured | target | ratio (>= 1 is met) | |");
    println!("|---|---:|---:|---:|---|");
    let rss_mb = rss as f64 / (1024.0 * 1024.0);
    row("RSS at 1 event/s", format!("{rss_mb:.1} MB"), "<= 15 MB", 15.0 / rss_mb);
    row("CPU at 1 event/s", format!("{cpu_pct:.3}% of a core"), "<= 0.5%", 0.5 / cpu_pct.max(1e-6));
    if let Some((loader_rss, working_set)) = wine {
        println!(
            "| RSS under Wine (information) | {:.1} MB working set (GetProcessMemoryInfo); {:.1} MB RSS of the Wine process | | | |",
            working_set as f64 / (1024.0 * 1024.0),
            loader_rss as f64 / (1024.0 * 1024.0)
        );
    }
    row("spool writes", format!("{write:.0} events/s"), ">= 50,000/s", write / 50_000.0);
    row("drain after an outage", format!("{drain:.0} events/s"), ">= 20,000/s", drain / 20_000.0);
    if !synced.is_empty() {
        let rate = median_of(synced);
        println!(
            "| drain, broker with `sync_interval: always` (information) | {rate:.0} events/s | | {:.2}x of the default broker's | |",
            rate / drain
        );
    }
    Ok(())
}

/// (b) and (c) once: `events` activities spooled in the writer's batches,
/// then drained to `nats` until the spool is empty; the two rates.
async fn spool_and_drain(nats: &NatsServer, agent_id: &AgentId, n: usize) -> anyhow::Result<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let events: Vec<Envelope> = (0..n).map(|i| activity(agent_id, i)).collect();
    let spool = Spool::open(SpoolConfig::new(dir.path().join("spool")))?;
    let t0 = Instant::now();
    let s = spool.clone();
    tokio::task::spawn_blocking(move || {
        for batch in events.chunks(MAX_BATCH) {
            s.append(batch, Encoding::MsgPack)?;
        }
        anyhow::Ok(())
    })
    .await??;
    let write_rate = n as f64 / t0.elapsed().as_secs_f64();

    let conn = nats.agent(agent_id).context("nats.conf has no user for desk-1")?;
    let agent = Agent::connect(AgentConfig::new(agent_id.clone(), conn)).await?;
    let stop = CancellationToken::new();
    let drainer = {
        let (agent, spool, stop) = (agent.clone(), spool.clone(), stop.clone());
        tokio::spawn(async move { agent.drain_spool(&spool, &Health::default(), None, &stop).await })
    };
    let t0 = Instant::now();
    while spool.depth().events > 0 {
        if t0.elapsed() > Duration::from_secs(600) {
            anyhow::bail!("the drain did not finish in 10 minutes ({} left)", spool.depth().events);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drain_rate = n as f64 / t0.elapsed().as_secs_f64();
    stop.cancel();
    drainer.await?;
    Ok((write_rate, drain_rate))
}

fn row(what: &str, measured: String, target: &str, ratio: f64) {
    println!("| {what} | {measured} | {target} | {ratio:.2}x | {} |", verdict(ratio >= 1.0));
}

/// Seconds of one event per second before the steady state is measured.
const WARMUP_SECS: u64 = 5;

/// Writes one activity event per second to an agent's stdin, for `secs` seconds.
async fn feed(stdin: &mut tokio::process::ChildStdin, secs: u64) -> anyhow::Result<()> {
    let line = b"{\"kind\":\"activity\",\"body\":{\"app\":\"chrome.exe\",\"title\":\"Customer portal\",\"duration_ms\":1000}}\n";
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    for _ in 0..secs {
        ticker.tick().await;
        stdin.write_all(line).await?;
        stdin.flush().await?;
    }
    Ok(())
}

/// Runs the binary on stdin fed one event per second; returns its RSS at
/// the end and its CPU use over the measured window.
async fn steady(bin: &Path, nats: &NatsServer, agent: &AgentId, secs: u64) -> anyhow::Result<(u64, f64)> {
    let dir = tempfile::tempdir()?;
    let password = nats.secrets().agent(agent.as_str()).context("no password for desk-1")?;
    let mut child = tokio::process::Command::new(bin)
        .args(["--id", agent.as_str(), "--server", &nats.url(), "--password", password])
        .arg("--spool")
        .arg(dir.path().join("spool"))
        .args(["run", "--no-desktop", "--no-adapter", "--input", "-"])
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id().context("the agent exited at once")?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    feed(&mut stdin, WARMUP_SECS).await?;
    let (t0, c0) = (Instant::now(), cpu_ticks(pid)?);
    feed(&mut stdin, secs).await?;
    let c1 = cpu_ticks(pid)?;
    let wall = t0.elapsed().as_secs_f64();
    let rss = rss_bytes(pid)?;
    let _ = child.start_kill();
    let _ = child.wait().await;
    // Linux counts CPU time in clock ticks of 1/100 s (USER_HZ).
    let cpu = (c1 - c0) as f64 / 100.0;
    Ok((rss, cpu / wall * 100.0))
}

fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .context("no VmRSS")?
        .parse()?;
    Ok(kb * 1024)
}

/// `ferry-agent` of this `ferry`'s build (brought up to date in a
/// checkout), else the one beside this `ferry`.
fn agent_binary() -> anyhow::Result<PathBuf> {
    if let Some(built) = crate::checkout::sibling_binary("ferry-agent").context("or pass --agent-bin PATH")? {
        return Ok(built);
    }
    let beside = std::env::current_exe()?.with_file_name("ferry-agent");
    anyhow::ensure!(beside.is_file(), "no ferry-agent beside this ferry: pass --agent-bin PATH");
    Ok(beside)
}

/// The steady state of ferry-agent.exe under Wine: the RSS of the Wine
/// process (Linux's view, Wine's own DLLs included) and the working set the
/// agent reports in its last heartbeat (Windows' view).
#[cfg(feature = "harness")]
async fn steady_wine(nats: &NatsServer, agent: &AgentId, secs: u64) -> anyhow::Result<(u64, u64)> {
    let work = tempfile::tempdir()?;
    eprintln!("    cross-building ferry-agent.exe and booting a Wine prefix ...");
    let dir = work.path().to_path_buf();
    let (exe, wine) = tokio::task::spawn_blocking(move || crate::checkout::windows_agent_under_wine(&dir)).await??;
    let copy = work.path().join("ferry-agent.exe");
    std::fs::copy(&exe, &copy)?;
    let password = nats.secrets().agent(agent.as_str()).context("no password for desk-1")?;
    let mut cmd = wine.command(&copy)?;
    cmd.args(["--id", agent.as_str(), "--server", &nats.url(), "--password", password])
        .arg("--spool")
        .arg(format!("Z:{}", work.path().join("spool").display()))
        .args(["run", "--no-desktop", "--no-adapter", "--heartbeat", "5s", "--input", "-"])
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = tokio::process::Command::from(cmd).kill_on_drop(true).spawn()?;
    let pid = child.id().context("the agent exited at once")?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    feed(&mut stdin, WARMUP_SECS + secs).await?;
    let loader_rss = rss_bytes(pid)?;
    let _ = child.start_kill();
    let _ = child.wait().await;
    // The last heartbeat's working set.
    let js = async_nats::jetstream::new(nats.operator("bench-wine").connect().await?);
    let subject = ferry_schema::subject::event(agent, ferry_schema::EventKind::Heartbeat);
    let beats = ferry_stack::inspect::read_all(&js, ferry_schema::topology::EVENTS_STREAM, subject.as_ref()).await?;
    let last = beats.last().context("the agent under Wine sent no heartbeat")?;
    let enc = Encoding::from_headers(last.headers.as_ref())?;
    let working_set = match ferry_schema::codec::decode_event(&last.payload, enc, 1 << 20)?.body {
        EventBody::Heartbeat(h) => h.rss_bytes,
        _ => anyhow::bail!("not a heartbeat on {subject}"),
    };
    drop(wine);
    Ok((loader_rss, working_set))
}

#[cfg(not(feature = "harness"))]
async fn steady_wine(_: &NatsServer, _: &AgentId, _: u64) -> anyhow::Result<(u64, u64)> {
    anyhow::bail!("--wine needs a ferry built from a checkout with the `harness` feature (the default): cargo run -p ferry-ops -- bench agent --wine")
}

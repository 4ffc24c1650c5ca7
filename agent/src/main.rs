//! `ferry-agent`: the desktop agent's command line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use ferry_agent::adapter::AdapterServer;
use ferry_agent::collect::Collector;
use ferry_agent::config::{self, FileConfig};
use ferry_agent::run::{run, Sources, Until};
use ferry_agent::spool::{FullPolicy, Spool};
use ferry_agent::{platform, Agent, AgentConfig};
use ferry_schema::codec::encode_reply;
use ferry_schema::connect::{Auth, NatsConfig, TlsFiles};
use ferry_schema::{AgentId, Encoding};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

/// Ferry's desktop agent: publishes this PC's activity and chat events to
/// NATS JetStream and acts on the replies addressed to it.
///
/// Every event is first written to an encrypted spool on disk and removed
/// only once JetStream has it, so nothing is lost while the broker is away.
///
/// Examples:
///   # a desk PC: settings from a file (see `ferry-agent check --help`)
///   ferry-agent --config ferry-agent.toml run
///   # register that to start at logon, and check it
///   ferry-agent --config ferry-agent.toml install
///   ferry-agent --config ferry-agent.toml check
///   # send the lines of a file, print replies as JSON lines, stop when all chats are answered
///   ferry-agent --id desk-1 --password "$PW" run --input chat.jsonl --until-answered
///   # an agent added with `ferry agent add desk-7`, with a WeChat adapter on the default port
///   ferry-agent --id desk-7 --nkey desk-7.nk --server nats://broker:4222 run --adapter 127.0.0.1:7301
///
/// Input lines look like {"kind":"chat","body":{"chat":"Alice","sender":"Alice","text":"hi"}}.
#[derive(Debug, Parser)]
#[command(version, about, verbatim_doc_comment)]
struct Cli {
    /// Config file (TOML); flags override its settings.
    #[arg(long, short = 'c', env = "FERRY_AGENT_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// This agent's id (one subject token: letters, digits, '-', '_').
    #[arg(long, env = "FERRY_AGENT_ID", global = true)]
    id: Option<String>,
    /// NATS server URL(s), comma separated [default: nats://127.0.0.1:4222].
    #[arg(long, env = "NATS_URL", global = true)]
    server: Option<String>,
    /// NATS user (the agent's own user; defaults to --id).
    #[arg(long, env = "NATS_USER", global = true)]
    user: Option<String>,
    /// Password of --user.
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true, global = true)]
    password: Option<String>,
    /// NATS credentials file (instead of --user/--password).
    #[arg(long, env = "NATS_CREDS", global = true)]
    creds: Option<PathBuf>,
    /// nkey seed file from `ferry agent add` (instead of --user/--password).
    #[arg(long, env = "FERRY_AGENT_NKEY", global = true, conflicts_with_all = ["creds", "password"])]
    nkey: Option<PathBuf>,
    /// Require TLS and trust this CA for the broker's certificate (on top
    /// of the system's roots; a `tls://` URL alone trusts the system's).
    #[arg(long, env = "NATS_TLS_CA", global = true)]
    tls_ca: Option<PathBuf>,
    /// Client certificate, for a broker that verifies clients (with --tls-key).
    #[arg(long, env = "NATS_TLS_CERT", global = true)]
    tls_cert: Option<PathBuf>,
    /// The client certificate's key.
    #[arg(long, env = "NATS_TLS_KEY", global = true)]
    tls_key: Option<PathBuf>,
    /// Spool directory [default: %LOCALAPPDATA%\Ferry\<id>\spool, or ~/.local/share/ferry/<id>/spool].
    #[arg(long, global = true)]
    spool: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Collect and publish events, act on replies, until Ctrl-C.
    Run(RunArgs),
    /// Start this agent at logon (per user: HKCU\...\Run on Windows, XDG autostart elsewhere).
    ///
    /// The entry runs `ferry-agent --config <file> run` with the absolute path
    /// of --config, which is required. A Windows service is not used: it would
    /// run in session 0 and could not see the user's desktop.
    Install,
    /// Remove the logon entry made by `install`.
    Uninstall,
    /// Validate the config and the connection, and say what is wrong.
    ///
    /// Checks the config file and flags, the spool (opens it, reports its
    /// depth), the desktop collector, the adapter's port, the broker
    /// connection with this agent's credentials, its reply consumer, and a
    /// publish on its own subject (a heartbeat). Exits 1 if anything fails.
    Check,
    /// Print what the desktop collector sees: the foreground window and idle time, as JSON lines.
    Probe(ferry_agent::probe::ProbeArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Enc {
    Msgpack,
    Json,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Also read events from JSON lines: a file, or `-` for stdin.
    #[arg(long)]
    input: Option<String>,
    /// Encoding of published events (replies come back in the same one) [default: msgpack].
    #[arg(long, value_enum)]
    encoding: Option<Enc>,
    /// Exit once the input is done, the spool is empty and every chat and
    /// prediction request got a reply.
    #[arg(long, requires = "input")]
    until_answered: bool,
    /// With --until-answered: give up after this many seconds without a reply.
    #[arg(long, default_value_t = 30)]
    idle_timeout: u64,
    /// Run the desktop collector (foreground window, idle) [default: on Windows; config collect.desktop].
    #[arg(long, overrides_with = "no_desktop")]
    desktop: bool,
    /// Do not run the desktop collector.
    #[arg(long)]
    no_desktop: bool,
    /// Listen for chat adapters on this loopback address (config adapter.listen).
    #[arg(long, value_name = "ADDR")]
    adapter: Option<String>,
    /// Do not listen for chat adapters.
    #[arg(long, conflicts_with = "adapter")]
    no_adapter: bool,
    /// Heartbeat interval, `0s` for none [default: 30s; config timers.heartbeat].
    #[arg(long, value_name = "DURATION")]
    heartbeat: Option<String>,
    /// Prediction request interval, `0s` for none [default: 60s; config timers.prediction].
    #[arg(long, value_name = "DURATION")]
    prediction: Option<String>,
    /// What to do when the spool is full [default: block; config spool.when_full].
    #[arg(long, value_enum)]
    when_full: Option<Policy>,
    /// Serve Prometheus metrics (spool depth, published, replies, components) at http://ADDR/metrics [config metrics.listen].
    #[arg(long, value_name = "ADDR", env = "FERRY_AGENT_METRICS_LISTEN")]
    metrics_listen: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Policy {
    Block,
    DropOldest,
}

/// The settings of the file with the flags applied.
struct Resolved {
    file: FileConfig,
    id: AgentId,
    nats: NatsConfig,
}

fn resolve(cli: &Cli) -> anyhow::Result<Resolved> {
    let mut file = match &cli.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let id = cli
        .id
        .clone()
        .or_else(|| file.id.clone())
        .context("no agent id: give --id, FERRY_AGENT_ID or `id = ...` in the config file")?;
    let id = AgentId::new(id).context("--id")?;
    let server = cli
        .server
        .clone()
        .or_else(|| file.server.clone())
        .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let mut nats = NatsConfig::new(&server, format!("ferry-agent {id}"));
    nats.retry_initial_connect = true;
    let nkey = cli.nkey.clone().or_else(|| file.nkey.clone());
    let creds = cli.creds.clone().or_else(|| file.creds.clone());
    let password = cli.password.clone().or_else(|| file.password.clone());
    nats.auth = match (nkey, creds, password) {
        (Some(path), _, _) => Auth::nkey_file(&path)?,
        (None, Some(path), _) => Auth::CredsFile(path),
        (None, None, Some(password)) => Auth::UserPassword {
            user: cli.user.clone().or_else(|| file.user.clone()).unwrap_or_else(|| id.to_string()),
            password,
        },
        (None, None, None) => Auth::None,
    };
    nats.tls = TlsFiles::from_parts(
        cli.tls_ca.clone().or_else(|| file.tls_ca.clone()),
        cli.tls_cert.clone().or_else(|| file.tls_cert.clone()),
        cli.tls_key.clone().or_else(|| file.tls_key.clone()),
    );
    if let Some(dir) = &cli.spool {
        file.spool.dir = Some(dir.clone());
    }
    Ok(Resolved { file, id, nats })
}

fn encoding(file: &FileConfig, flag: Option<Enc>) -> anyhow::Result<Encoding> {
    Ok(match (flag, file.encoding.as_deref()) {
        (Some(Enc::Json), _) | (None, Some("json")) => Encoding::Json,
        (Some(Enc::Msgpack), _) | (None, Some("msgpack") | None) => Encoding::MsgPack,
        (None, Some(other)) => anyhow::bail!("encoding = {other:?}: expected \"msgpack\" or \"json\""),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match &cli.cmd {
        Cmd::Run(args) => run_cmd(&cli, args).await,
        Cmd::Install => install(&cli),
        Cmd::Uninstall => {
            match platform::uninstall_autostart()? {
                Some(entry) => println!("removed the logon entry {}", entry.location),
                None => println!("no logon entry was installed"),
            }
            Ok(())
        }
        Cmd::Check => check(&cli).await,
        // Probe needs no id and no broker: it only asks the local system.
        Cmd::Probe(probe) => Ok(ferry_agent::probe::run(probe, &mut std::io::stdout().lock())?),
    }
}

async fn run_cmd(cli: &Cli, args: &RunArgs) -> anyhow::Result<()> {
    let mut r = resolve(cli)?;
    if let Some(v) = &args.heartbeat {
        r.file.timers.heartbeat = Some(v.clone());
    }
    if let Some(v) = &args.prediction {
        r.file.timers.prediction = Some(v.clone());
    }
    if let Some(v) = &args.metrics_listen {
        r.file.metrics.listen = Some(v.clone());
    }
    if let Some(p) = args.when_full {
        r.file.spool.when_full = Some(match p {
            Policy::Block => FullPolicy::Block,
            Policy::DropOldest => FullPolicy::DropOldest,
        });
    }
    if let Some(a) = &args.adapter {
        r.file.adapter.enabled = Some(true);
        r.file.adapter.listen = Some(a.clone());
    }
    if args.no_adapter {
        r.file.adapter.enabled = Some(false);
    }
    let desktop_on = if args.no_desktop {
        false
    } else if args.desktop {
        true
    } else {
        r.file.collect.desktop.unwrap_or(cfg!(windows) && args.input.is_none())
    };
    let mut periodic = config::timers(&r.file)?;
    let (collect, privacy) = config::collect_settings(&r.file)?;
    let spool_cfg = config::spool_config(&r.file, r.id.as_str())?;
    let adapter_addr = config::adapter_listen(&r.file)?;
    if args.until_answered {
        // A script's run: only its own lines count.
        periodic.heartbeat = None;
        periodic.prediction = None;
    }

    let spool_dir = spool_cfg.dir.clone();
    let spool = tokio::task::spawn_blocking(move || Spool::open(spool_cfg))
        .await?
        .with_context(|| format!("opening the spool in {}", spool_dir.display()))?;
    let depth = spool.depth();
    tracing::info!(dir = %spool_dir.display(), events = depth.events, "spool open");

    let mut sources = Sources::default();
    if let Some(input) = &args.input {
        sources.lines = Some(if input == "-" {
            Box::new(tokio::io::BufReader::new(tokio::io::stdin()))
        } else {
            let file = tokio::fs::File::open(input)
                .await
                .with_context(|| format!("opening --input {input}"))?;
            Box::new(tokio::io::BufReader::new(file))
        });
    }
    if desktop_on {
        let desktop = platform::desktop().context("the desktop collector (collect.desktop)")?;
        sources.desktop = Some((desktop, Collector::new(collect, privacy)));
    }
    if let Some(addr) = adapter_addr {
        let token = ferry_agent::adapter::load_or_create_token(&spool_dir)
            .with_context(|| format!("the adapters' token in {}", spool_dir.display()))?;
        let server = AdapterServer::bind(addr, &token).await?;
        tracing::info!(
            listen = %server.local_addr()?,
            token_file = %spool_dir.join(ferry_agent::adapter::TOKEN_FILE).display(),
            "waiting for chat adapters"
        );
        sources.adapter = Some(server);
    }

    let mut cfg = AgentConfig::new(r.id, r.nats);
    cfg.encoding = encoding(&r.file, args.encoding)?;
    let agent = Agent::connect(cfg).await.context("connecting to NATS")?;

    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stopping: spooling what the sources hold, publishing for up to 5 s");
        on_signal.cancel();
    });
    let until = if args.until_answered {
        Until::Answered {
            idle_timeout: Duration::from_secs(args.idle_timeout),
        }
    } else {
        Until::Shutdown
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let printer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(reply) = rx.recv().await {
            let mut line = encode_reply(&reply, Encoding::Json)?;
            line.push(b'\n');
            stdout.write_all(&line).await?;
            stdout.flush().await?;
        }
        anyhow::Ok(())
    });
    let report = run(&agent, spool, sources, periodic, until, Some(tx), shutdown).await?;
    printer.await??;
    tracing::info!(
        published = report.published,
        replies = report.replies,
        unanswered = report.unanswered,
        spooled = report.spooled,
        "agent stopped"
    );
    if report.unanswered > 0 {
        anyhow::bail!("{} chat or prediction events got no reply", report.unanswered);
    }
    Ok(())
}

/// Ctrl-C, or SIGTERM on Unix.
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn install(cli: &Cli) -> anyhow::Result<()> {
    let config = cli
        .config
        .as_deref()
        .context("install needs --config FILE: the logon entry runs `ferry-agent --config FILE run`")?;
    // Validate before registering something that would fail at every logon.
    resolve(cli).with_context(|| format!("{} is not usable", config.display()))?;
    let config = absolute(config)?;
    let exe = std::env::current_exe().context("locating ferry-agent itself")?;
    let command = vec![
        exe.to_string_lossy().into_owned(),
        "--config".to_string(),
        config.to_string_lossy().into_owned(),
        "run".to_string(),
    ];
    let entry = platform::install_autostart(&command)?;
    println!("ferry-agent starts at logon: {}", entry.location);
    println!("  runs: {}", command.join(" "));
    println!("check it now with: ferry-agent --config {} check", config.display());
    Ok(())
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    if !p.exists() {
        anyhow::bail!("--config {}: no such file", p.display());
    }
    std::path::absolute(p).with_context(|| format!("--config {}", p.display()))
}

/// One line of `check`'s report.
fn line(ok: bool, what: &str, detail: impl std::fmt::Display) -> bool {
    println!("{} {what}: {detail}", if ok { "ok     " } else { "PROBLEM" });
    ok
}

async fn check(cli: &Cli) -> anyhow::Result<()> {
    let mut all = true;
    let r = match resolve(cli) {
        Ok(r) => r,
        Err(e) => {
            line(false, "config", format!("{e:#}"));
            anyhow::bail!("the config is not usable");
        }
    };
    all &= line(true, "config", format!("agent {}", r.id));
    let settings = (|| {
        Ok::<_, config::ConfigError>((
            config::timers(&r.file)?,
            config::collect_settings(&r.file)?,
            config::adapter_listen(&r.file)?,
            config::spool_config(&r.file, r.id.as_str())?,
        ))
    })();
    let (_, _, adapter, spool_cfg) = match settings {
        Ok(s) => s,
        Err(e) => {
            line(false, "config", e);
            anyhow::bail!("the config is not usable");
        }
    };
    all &= line(true, "settings", "collect, privacy, adapter, timers and spool settings are valid");
    let dir = spool_cfg.dir.clone();
    match tokio::task::spawn_blocking(move || Spool::open(spool_cfg)).await? {
        Ok(spool) => {
            let d = spool.depth();
            all &= line(
                true,
                "spool",
                format!("{} ({} events waiting, {} dropped ever)", dir.display(), d.events, d.dropped),
            );
        }
        Err(e) => all &= line(false, "spool", format!("{e} (is another ferry-agent running with this spool?)")),
    }
    match platform::desktop() {
        Ok(mut d) => match d.foreground() {
            Ok(w) => {
                all &= line(
                    true,
                    "desktop collector",
                    match w {
                        Some(w) => format!("foreground window {:?}", w.title),
                        None => "no foreground window right now".into(),
                    },
                )
            }
            Err(e) => all &= line(false, "desktop collector", e),
        },
        Err(e) => {
            line(true, "desktop collector", format!("off ({e})"));
        }
    }
    if let Some(addr) = adapter {
        match std::net::TcpListener::bind(addr) {
            Ok(_) => all &= line(true, "adapter", format!("{addr} is free to listen on")),
            Err(e) => all &= line(false, "adapter", format!("{addr}: {e} (another agent running?)")),
        }
    }
    let mut nats = r.nats.clone();
    nats.retry_initial_connect = false;
    let cfg = AgentConfig::new(r.id.clone(), nats);
    match tokio::time::timeout(Duration::from_secs(10), Agent::connect(cfg)).await {
        Err(_) => all &= line(false, "broker", "no connection within 10 s (address, firewall?)"),
        Ok(Err(e)) => all &= line(false, "broker", e),
        Ok(Ok(agent)) => {
            all &= line(true, "broker", "connected with this agent's credentials");
            match agent.check_access().await {
                Ok(()) => all &= line(true, "permissions", "can publish its events and read its replies"),
                Err(e) => all &= line(false, "permissions", e),
            }
        }
    }
    if !all {
        anyhow::bail!("some checks failed");
    }
    Ok(())
}

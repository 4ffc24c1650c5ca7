//! `ferry-agent`: the desktop agent's command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use ferry_agent::run::{run_lines, Until};
use ferry_agent::{Agent, AgentConfig};
use ferry_schema::codec::encode_reply;
use ferry_schema::connect::{Auth, NatsConfig};
use ferry_schema::{AgentId, Encoding};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

/// Ferry's desktop agent: publishes this PC's events to NATS JetStream and
/// acts on the replies addressed to it.
///
/// Examples:
///   # send the lines of a file, print replies as JSON lines, stop when all chats are answered
///   ferry-agent --id desk-1 --user desk-1 --password "$PW" run --input chat.jsonl --until-answered
///   # read events from stdin and keep running
///   tail -f events.jsonl | ferry-agent --id desk-1 --user desk-1 --password "$PW" run
///   # an agent added with `ferry agent add desk-7`: its nkey seed file
///   ferry-agent --id desk-7 --nkey desk-7.nk --server nats://broker:4222 run --input chat.jsonl
///
/// Input lines look like {"kind":"chat","body":{"chat":"Alice","sender":"Alice","text":"hi"}}.
#[derive(Debug, Parser)]
#[command(version, about, verbatim_doc_comment)]
struct Cli {
    /// This agent's id (one subject token: letters, digits, '-', '_').
    #[arg(long, env = "FERRY_AGENT_ID", global = true)]
    id: Option<String>,
    /// NATS server URL(s), comma separated.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222", global = true)]
    server: String,
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
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Publish events from JSON lines and print replies as JSON lines.
    Run(RunArgs),
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
    /// Input file of JSON lines; `-` for stdin.
    #[arg(long, default_value = "-")]
    input: String,
    /// Encoding of published events (replies come back in the same one).
    #[arg(long, value_enum, default_value = "msgpack")]
    encoding: Enc,
    /// Exit once the input is done and every chat and prediction request got a reply.
    #[arg(long)]
    until_answered: bool,
    /// With --until-answered: give up after this many seconds without a reply.
    #[arg(long, default_value_t = 30)]
    idle_timeout: u64,
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
    // Probe needs no id and no broker: it only asks the local system.
    let args = match cli.cmd {
        Cmd::Run(args) => args,
        Cmd::Probe(probe) => return Ok(ferry_agent::probe::run(&probe, &mut std::io::stdout().lock())?),
    };
    let id = cli.id.clone().context("--id (or FERRY_AGENT_ID) is required")?;
    let agent_id = AgentId::new(id).context("--id")?;
    let mut nats = NatsConfig::new(&cli.server, format!("ferry-agent {agent_id}"));
    nats.retry_initial_connect = true;
    nats.auth = match (&cli.nkey, &cli.creds, &cli.password) {
        (Some(path), _, _) => Auth::nkey_file(path)?,
        (None, Some(path), _) => Auth::CredsFile(path.clone()),
        (None, None, Some(password)) => Auth::UserPassword {
            user: cli.user.clone().unwrap_or_else(|| agent_id.to_string()),
            password: password.clone(),
        },
        (None, None, None) => Auth::None,
    };
    let mut cfg = AgentConfig::new(agent_id, nats);
    cfg.encoding = match args.encoding {
        Enc::Msgpack => Encoding::MsgPack,
        Enc::Json => Encoding::Json,
    };
    let agent = Agent::connect(cfg).await.context("connecting to NATS")?;

    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
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
    let report = if args.input == "-" {
        let input = tokio::io::BufReader::new(tokio::io::stdin());
        run_lines(&agent, input, until, tx, shutdown).await?
    } else {
        let file = tokio::fs::File::open(&args.input)
            .await
            .with_context(|| format!("opening --input {}", args.input))?;
        run_lines(&agent, tokio::io::BufReader::new(file), until, tx, shutdown).await?
    };
    printer.await??;
    tracing::info!(
        published = report.published,
        replies = report.replies,
        unanswered = report.unanswered,
        "agent stopped"
    );
    if report.unanswered > 0 {
        anyhow::bail!("{} chat or prediction events got no reply", report.unanswered);
    }
    Ok(())
}

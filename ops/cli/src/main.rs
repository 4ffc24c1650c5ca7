//! `ferry`: the operators' command: run a local stack, provision, benchmark.

mod agent;
mod agent_registry;
mod agent_slots;
mod backup;
mod bench;
mod certs;
mod chaos;
mod checkout;
mod dashboard;
mod data_dir;
mod db;
mod dlq;
mod down;
mod procs;
mod provision;
mod replay;
mod stats;
mod tap;
mod up;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

/// mimalloc: fewer cycles in allocation than glibc's malloc on the
/// message paths (measured with `ferry bench archiver`: glibc's malloc was
/// about 12% of the archiver's CPU).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use ferry_schema::connect::{Auth, NatsConfig};

/// Operate Ferry: run the whole pipeline locally, provision streams and
/// consumers on a broker, and measure it.
///
/// Examples:
///   ferry up                      # broker, PostgreSQL, workers, demo agent; Ctrl-C or `ferry down` stops
///   ferry up --once               # same, exit after the demo agent got its replies
///   ferry up --tls                # the broker on TLS only (local CA under .ferry/tls)
///   ferry certs --dir tls --name nats.example.com   # TLS files for a real broker
///   ferry down                    # stop what `ferry up` started (also after a crash)
///   ferry provision --user operator --password "$FERRY_OPERATOR_PASSWORD"
///   ferry migrate --database-url postgres://ferry:PW@db:5432/ferry
///   ferry kb import ops/demo/kb   # into ferry up's database
///   ferry replay --agent desk-1 --since 1h                  # stored events as JSON lines
///   ferry replay --kind chat --shadow rules --rules new.toml # what a rules change would do
///   ferry tap 'events.>'          # live events, decoded to JSON
///   ferry dlq list                # dead letters and why
///   ferry stats --watch 2         # lag per worker role, replicas, agents
///   ferry dashboard               # the live page on http://127.0.0.1:8090/
///   ferry agent add desk-7 --group support   # an agent's nkey and permissions, reloaded into the broker
///   ferry chaos worker-kill       # SIGKILL a worker every 2 s under load; exits 1 on loss
///   ferry bench rules --events 20000 --repeat 5
///   ferry bench inference
///   ferry bench archiver --events 100000
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start the local pipeline: nats-server with nats.conf, provisioning,
    /// PostgreSQL, the archiver, rules and inference workers, and a demo
    /// agent that prints its replies.
    Up(up::UpArgs),
    /// Stop what `ferry up` started: its workers, broker and PostgreSQL.
    Down(down::DownArgs),
    /// Apply the PostgreSQL migrations (idempotent; prints what it applied).
    Migrate(db::MigrateArgs),
    /// The knowledge base: import articles, try a search.
    #[command(subcommand)]
    Kb(db::KbCmd),
    /// Replay stored events: print them, re-send them to a debug subject,
    /// run them through a worker in shadow mode and diff, or trace one event.
    Replay(Box<replay::ReplayArgs>),
    /// Watch a subject live, decoded to JSON lines.
    Tap(tap::TapArgs),
    /// Streams, consumer lag, worker replicas online, agents' heartbeats.
    Stats(stats::StatsArgs),
    /// A live web page of the pipeline (agents, traffic, interactions,
    /// alerts), pushed over server-sent events; log in as the operator.
    Dashboard(dashboard::DashboardArgs),
    /// Dead letters: list them, re-drive them after a fix.
    #[command(subcommand)]
    Dlq(dlq::DlqCmd),
    /// Agents' credentials: add (an nkey and its permissions), list, revoke.
    #[command(subcommand)]
    Agent(agent::AgentCmd),
    /// Create or update streams and consumers (idempotent; prints what changed).
    Provision(provision::ProvisionArgs),
    /// TLS files: a local CA, the broker's certificate, clients' certificates.
    Certs(certs::CertsArgs),
    /// Fault scenarios against real processes: kill workers, the broker, a
    /// cluster node, an agent, stop PostgreSQL; then count what was lost,
    /// doubled or reordered.
    Chaos(Box<chaos::ChaosArgs>),
    /// Benchmarks that run a baseline in the same run and print ratios.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Save the streams (the broker's snapshots, with their consumers) and
    /// the archive (pg_dump) into a dated folder; keep the last N.
    Backup(backup::BackupArgs),
    /// Bring a stack back from a backup: its streams, consumers and archive.
    Restore(backup::RestoreArgs),
}

/// Connection flags, named as the `nats` CLI names them.
#[derive(Debug, Clone, Args)]
pub struct ConnArgs {
    /// NATS server URL(s), comma separated.
    #[arg(short = 's', long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub server: String,
    /// User (operators use `operator`).
    #[arg(long, env = "NATS_USER", default_value = "operator")]
    pub user: String,
    /// Password of --user (for `ferry up`'s broker: FERRY_OPERATOR_PASSWORD in .ferry/secrets.env).
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Credentials file instead of --user/--password.
    #[arg(long, env = "NATS_CREDS")]
    pub creds: Option<PathBuf>,
    /// Require TLS and trust this CA for the server's certificate
    /// (`ferry up --tls`: .ferry/tls/ca.pem).
    #[arg(long, env = "NATS_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate, for a server that verifies clients (with --tls-key).
    #[arg(long, env = "NATS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's key.
    #[arg(long, env = "NATS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl ConnArgs {
    /// Connection settings for these flags.
    pub fn config(&self, name: &str) -> NatsConfig {
        let mut c = NatsConfig::new(&self.server, name);
        c.auth = match (&self.creds, &self.password) {
            (Some(p), _) => Auth::CredsFile(p.clone()),
            (None, Some(pw)) => Auth::UserPassword {
                user: self.user.clone(),
                password: pw.clone(),
            },
            (None, None) => Auth::None,
        };
        c.tls = ferry_schema::connect::TlsFiles::from_parts(self.tls_ca.clone(), self.tls_cert.clone(), self.tls_key.clone());
        c
    }

    /// Connection settings for these flags; given no credentials, the
    /// operator with `ferry up`'s password from `<data_dir>/secrets.env`.
    /// `otherwise` ends the error when neither is there.
    pub fn or_local_operator(&self, data_dir: &data_dir::DataDir, name: &str, otherwise: &str) -> anyhow::Result<NatsConfig> {
        let mut c = self.config(name);
        if matches!(c.auth, Auth::None) {
            let secrets = data_dir.secrets();
            let found = ferry_stack::Secrets::load(&secrets)?.with_context(|| {
                format!(
                    "no --password (NATS_PASSWORD) or --creds given and no `ferry up` secrets in {}; {otherwise}",
                    secrets.display()
                )
            })?;
            c = c.with_user(self.user.clone(), found.operator);
        }
        Ok(c)
    }
}

fn init_logs() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logs();
    // The dashboard takes a steady trickle of small messages and pushes a
    // page a second: on one thread a message wakes no other thread, which
    // on a multi-threaded runtime cost it more than the message itself
    // (`ferry bench dashboard`).
    let mut rt = match cli.cmd {
        Cmd::Dashboard(_) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let rt = rt.enable_all().build().context("starting the async runtime")?;
    rt.block_on(run(cli.cmd))
}

async fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Up(args) => up::run(args).await,
        Cmd::Down(args) => down::run(args),
        Cmd::Migrate(args) => db::run_migrate(args).await,
        Cmd::Kb(cmd) => db::run_kb(cmd).await,
        Cmd::Replay(args) => replay::run(*args).await,
        Cmd::Tap(args) => tap::run(args).await,
        Cmd::Stats(args) => stats::run(args).await,
        Cmd::Dashboard(args) => dashboard::run(args).await,
        Cmd::Dlq(cmd) => dlq::run(cmd).await,
        Cmd::Agent(cmd) => agent::run(cmd).await,
        Cmd::Certs(args) => certs::run(args),
        Cmd::Provision(args) => provision::run(args).await,
        Cmd::Chaos(args) => chaos::run(*args).await,
        Cmd::Bench(cmd) => bench::run(cmd).await,
        Cmd::Backup(args) => backup::run_backup(args).await,
        Cmd::Restore(args) => backup::run_restore(args).await,
    }
}

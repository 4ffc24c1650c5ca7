//! `ferry-worker`: one binary for every worker role, one subcommand per role.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

/// mimalloc: fewer cycles in allocation than glibc's malloc on the
/// message paths (measured with `ferry bench archiver`: glibc's malloc was
/// about 12% of the archiver's CPU).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use ferry_schema::connect::{Auth, NatsConfig};
use ferry_schema::topology::Role;
use ferry_workers::{archiver, inference, rules, runtime};
use tokio_util::sync::CancellationToken;

/// Ferry's workers. Each replica of a role pulls from the role's shared
/// durable consumer, so adding replicas is how you scale.
///
/// Examples:
///   ferry-worker --server nats://127.0.0.1:4222 --user workers --password "$PW" rules --rules rules.toml
///   ferry-worker --user workers --password "$PW" inference --config inference.toml
///   ferry-worker --user workers --password "$PW" rules --rules rules.toml --groups .ferry/groups.toml
///   NATS_URL=nats://gpu-1:4222 NATS_CREDS=/etc/ferry/worker.creds ferry-worker rules --rules /etc/ferry/rules.toml
///   DATABASE_URL=postgres://ferry:PW@db:5432/ferry ferry-worker --user workers --password "$PW" archiver
///   ferry-worker --metrics-listen 0.0.0.0:9464 --log-format json --user workers --password "$PW" rules
///   ferry-worker --check rules --rules rules.toml   # validate before deploying; connects to nothing
#[derive(Debug, Parser)]
#[command(version, about, verbatim_doc_comment)]
struct Cli {
    #[command(flatten)]
    nats: NatsArgs,
    /// Log format.
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9464):
    /// messages by outcome, handling time, in flight, consumer lag, tokens.
    #[arg(long, env = "FERRY_METRICS_LISTEN", value_name = "ADDR", global = true)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Check and exit: parse the flags, load and validate the role's files
    /// (rules file, inference config, database URL) and the credentials,
    /// print a summary, and connect to nothing. Exits non-zero, naming the
    /// problem, when the worker would refuse to start.
    #[arg(long, global = true)]
    check: bool,
    #[command(subcommand)]
    role: RoleCmd,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
struct NatsArgs {
    /// NATS server URL(s), comma separated.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222", global = true)]
    server: String,
    /// NATS user: the role's own (`rules`, `inference`, `archiver` in nats.conf).
    #[arg(long, env = "NATS_USER", global = true)]
    user: Option<String>,
    /// NATS password for --user.
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true, global = true)]
    password: Option<String>,
    /// NATS credentials file (instead of --user/--password).
    #[arg(long, env = "NATS_CREDS", global = true)]
    creds: Option<PathBuf>,
    /// Require TLS and trust this CA for the server's certificate.
    #[arg(long, env = "NATS_TLS_CA", global = true)]
    tls_ca: Option<PathBuf>,
    /// Client certificate, for a server that verifies clients (with --tls-key).
    #[arg(long, env = "NATS_TLS_CERT", global = true, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The client certificate's key.
    #[arg(long, env = "NATS_TLS_KEY", global = true, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum RoleCmd {
    /// Keyword/regex rules: auto-replies, escalation, hand-off to inference.
    Rules(RulesArgs),
    /// Model replies to chats handed over by the rules, and next-activity
    /// predictions, on mistral.rs.
    Inference(InferenceArgs),
    /// Every event and reply into PostgreSQL, in batches, idempotent on
    /// their ids, acked only after the commit. Needs the schema applied
    /// (`ferry migrate`).
    Archiver(ArchiverArgs),
    /// Alert rules over interactions and heartbeats (error rate, response
    /// time, failures in a row, agents offline) per scope; raises alerts
    /// on `alerts.>` (stream ALERTS) and POSTs them to webhooks. Every
    /// replica evaluates every event; a second replica is a hot standby.
    Alerts(AlertsArgs),
    /// Not a role: generates on mistral.rs in this process, one stream,
    /// and prints a JSON line per run (`{"tokens":N,"secs":S}`), the first
    /// a warm-up. `ferry bench inference` runs it as its measurement (b).
    #[command(hide = true)]
    BenchEngine(BenchEngineArgs),
}

#[derive(Debug, Args)]
struct BenchEngineArgs {
    /// The GGUF model file.
    #[arg(long)]
    model: PathBuf,
    /// The system prompt.
    #[arg(long)]
    system: String,
    /// The user's message.
    #[arg(long)]
    prompt: String,
    /// Tokens generated per run.
    #[arg(long)]
    max_tokens: usize,
    /// Timed runs after the warm-up.
    #[arg(long)]
    runs: usize,
    /// Token ids never generated (so each run goes to --max-tokens).
    #[arg(long, value_delimiter = ',')]
    forbid: Vec<u32>,
    /// The weights' format, as `format` in the inference config.
    #[arg(long, default_value = "as-is")]
    format: String,
}

/// `bench-engine`: the engine on one model, one stream, greedy.
async fn bench_engine(args: BenchEngineArgs) -> anyhow::Result<()> {
    use inference::config::{ModelSource, ModelSpec, Sampling};
    use inference::engine::Generate as _;
    use inference::prompt::{PromptMessage, Speaker};
    let format = inference::weights::Format::parse(&args.format)
        .with_context(|| format!("--format {:?}: expected one of {}", args.format, inference::weights::Format::NAMES))?;
    let spec = ModelSpec {
        alias: "m".into(),
        source: ModelSource::File(args.model.clone()),
        format,
    };
    let engine = inference::engine::Engine::load(&[spec], 1).await;
    anyhow::ensure!(!engine.loaded().is_empty(), "model {} did not load: {:?}", args.model.display(), engine.status());
    let prompt = [
        PromptMessage { speaker: Speaker::System, text: args.system },
        PromptMessage { speaker: Speaker::User, text: args.prompt },
    ];
    let sampling = Sampling {
        temperature: 0.0,
        top_p: 1.0,
        max_tokens: args.max_tokens,
        logit_bias: args.forbid.iter().map(|&id| (id, -100.0)).collect(),
    };
    for _ in 0..=args.runs {
        let g = engine.generate("m", &prompt, &sampling, std::time::Duration::from_secs(600)).await?;
        println!("{}", serde_json::json!({ "tokens": g.tokens, "secs": g.elapsed.as_secs_f64() }));
    }
    Ok(())
}

#[derive(Debug, Args)]
struct DbArgs {
    /// PostgreSQL URL (postgres://user:password@host:port/database).
    #[arg(long = "database-url", env = "DATABASE_URL", hide_env_values = true)]
    url: Option<String>,
    #[arg(long, value_name = "N", help = with_default(
        "Connections in this replica's PostgreSQL pool.",
        ferry_workers::state::DbConfig::new("").pool_size,
    ))]
    db_pool: Option<usize>,
}

impl DbArgs {
    fn config(&self) -> Option<ferry_workers::state::DbConfig> {
        self.url.as_ref().map(|url| {
            let mut c = ferry_workers::state::DbConfig::new(url);
            if let Some(n) = self.db_pool {
                c.pool_size = n.max(1);
            }
            c
        })
    }
}

/// The help of a flag that overrides a library default: no flag restates a
/// default (they once drifted apart), and `--help` prints the library's.
fn with_default(what: &str, default: impl std::fmt::Display) -> String {
    format!("{what} [default: {default}]")
}

#[derive(Debug, Args)]
struct ArchiverArgs {
    #[command(flatten)]
    db: DbArgs,
    #[arg(long, value_name = "N", help = with_default(
        "Messages held at once per consumer (events, replies): the rows waiting for a commit, and the pull batch size.",
        archiver::ArchiverConfig::new("").consume.max_in_flight,
    ))]
    concurrency: Option<usize>,
    #[arg(long, value_name = "N", help = with_default(
        "Most rows in one transaction.",
        archiver::ArchiverConfig::new("").batch.max_rows,
    ))]
    batch_rows: Option<usize>,
    #[arg(long, value_name = "MS", help = with_default(
        "How long the first row of a batch waits for more, in milliseconds.",
        archiver::ArchiverConfig::new("").batch.max_wait.as_millis(),
    ))]
    batch_wait_ms: Option<u64>,
    #[arg(long, value_name = "MINUTES", help = with_default(
        "A conversation idle this many minutes is closed by the next chat, which opens a new one.",
        archiver::ArchiverConfig::new("").conversation_idle.as_secs() / 60,
    ))]
    conversation_idle_mins: Option<u64>,
    #[arg(long, env = "FERRY_KEEP", value_name = "TABLE=DAYS,...", value_parser = parse_retention, help = with_default(
        "How long each table keeps its rows, in days: `events=30,alerts=90` (tables not named keep their defaults), \
         or `forever`. Once an hour one replica drops the day partitions older than that.",
        archiver::retention::Retention::default(),
    ))]
    keep: Option<Keep>,
}

/// `--keep`: a retention, or `None` for `forever`.
#[derive(Debug, Clone)]
struct Keep(Option<archiver::retention::Retention>);

/// `--keep`, checked when the flags are read.
fn parse_retention(spec: &str) -> Result<Keep, archiver::retention::SpecError> {
    archiver::retention::Retention::parse(spec).map(Keep)
}

impl ArchiverArgs {
    /// The archiver's config: the library's defaults, with what the flags
    /// set.
    fn config(&self, db: ferry_workers::state::DbConfig) -> archiver::ArchiverConfig {
        let mut cfg = archiver::ArchiverConfig::new(db.url.clone());
        cfg.db = db;
        if let Some(n) = self.concurrency {
            cfg.consume.max_in_flight = n.max(1);
        }
        if let Some(n) = self.batch_rows {
            cfg.batch.max_rows = n.max(1);
        }
        if let Some(ms) = self.batch_wait_ms {
            cfg.batch.max_wait = std::time::Duration::from_millis(ms);
        }
        if let Some(mins) = self.conversation_idle_mins {
            cfg.conversation_idle = std::time::Duration::from_secs(mins * 60);
        }
        if let Some(Keep(keep)) = &self.keep {
            cfg.retention = keep.clone();
        }
        cfg
    }
}

#[derive(Debug, Args)]
struct InferenceArgs {
    /// The inference config (TOML): models, routes, sampling, templates;
    /// see workers/src/inference/config.rs and ops/demo/inference.toml.
    #[arg(long, env = "FERRY_INFERENCE_CONFIG", default_value = "inference.toml")]
    config: PathBuf,
    /// Groups file completing the config's [groups] (`ferry agent add
    /// --group` writes it: <data dir>/groups.toml); read at start.
    #[arg(long, env = "FERRY_GROUPS")]
    groups: Option<PathBuf>,
    /// Conversation context and knowledge base: read from this PostgreSQL.
    /// Without it, prompts hold the message only.
    #[command(flatten)]
    db: DbArgs,
    /// Threads the engine's kernels may use (matrix products, attention),
    /// for all its models together: leave cores to the broker and the other
    /// roles on a shared machine. Default: one per core.
    #[arg(long, env = "FERRY_INFERENCE_THREADS", value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
}

/// The environment variable the engine's kernels (candle's and rayon's
/// thread pools) read for their thread count.
const ENGINE_THREADS_VAR: &str = "RAYON_NUM_THREADS";

#[derive(Debug, Args)]
struct RulesArgs {
    /// The rules file (TOML); see ops/demo/rules.toml and workers/src/rules/config.rs.
    #[arg(long, env = "FERRY_RULES", default_value = "rules.toml")]
    rules: PathBuf,
    /// Groups file completing the rules file's [groups] (`ferry agent add
    /// --group` writes it: <data dir>/groups.toml); read again with the rules.
    #[arg(long, env = "FERRY_GROUPS")]
    groups: Option<PathBuf>,
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, help = with_default(
        "How often the rules and groups files are read again. A change that validates replaces the rules in use between two events; one that does not is logged (file, rule, field) and the rules in use stay. 0s: read once, at start.",
        humantime::format_duration(rules::RELOAD_EVERY),
    ))]
    reload_every: Option<std::time::Duration>,
    #[arg(long, value_name = "N", help = with_default(
        "Events handled at once by this replica (also the pull batch size).",
        rules::RulesConfig::new("").consume.max_in_flight,
    ))]
    concurrency: Option<usize>,
    /// Customer tags for rules with `customer_tags`: read from this
    /// PostgreSQL (required when a rule uses them).
    #[command(flatten)]
    db: DbArgs,
}

impl RulesArgs {
    /// The rules worker's config: the library's defaults, with what the
    /// flags set.
    fn config(&self) -> rules::RulesConfig {
        let mut cfg = rules::RulesConfig::new(&self.rules);
        if let Some(n) = self.concurrency {
            cfg.consume.max_in_flight = n;
        }
        cfg.db = self.db.config();
        cfg.groups_path = self.groups.clone();
        if let Some(every) = self.reload_every {
            cfg.reload_every = Some(every); // 0s turns it off (rules::run)
        }
        cfg
    }
}

#[derive(Debug, Args)]
struct AlertsArgs {
    /// The alerts file (TOML); see ops/demo/alerts.toml and workers/src/alerts/config.rs.
    #[arg(long, env = "FERRY_ALERTS", default_value = "alerts.toml")]
    alerts: PathBuf,
    /// Groups file completing the alerts file's [groups], for rules with
    /// scope = "group" (`ferry agent add --group` writes it: <data
    /// dir>/groups.toml); read again with the alerts file.
    #[arg(long, env = "FERRY_GROUPS")]
    groups: Option<PathBuf>,
    /// How often the alerts file is read again (a valid change replaces the
    /// rules and webhooks in use; an invalid one is logged and ignored). 0s:
    /// read once, at start.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "2s")]
    reload_every: std::time::Duration,
    /// How often consumer-lag rules read their consumers' info (one request
    /// per watched consumer each time, from every replica).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "5s")]
    lag_every: std::time::Duration,
}

impl AlertsArgs {
    fn config(&self) -> ferry_workers::alerts::AlertsConfig {
        let mut cfg = ferry_workers::alerts::AlertsConfig::new(&self.alerts);
        cfg.groups = self.groups.clone();
        cfg.reload_every = (!self.reload_every.is_zero()).then_some(self.reload_every);
        cfg.lag_every = self.lag_every.max(std::time::Duration::from_millis(100));
        cfg
    }
}

/// The connection of one replica of `role`: its inboxes under
/// `_INBOX.<role>`, the only ones its user in `nats.conf` may read.
fn nats_config(args: &NatsArgs, role: Role) -> anyhow::Result<NatsConfig> {
    let mut cfg = NatsConfig::new(&args.server, format!("ferry-worker {}", role.as_str()));
    cfg.retry_initial_connect = true;
    cfg.inbox_prefix = Some(ferry_schema::subject::role_inbox_prefix(role.as_str()));
    cfg.tls = ferry_schema::connect::TlsFiles::from_parts(args.tls_ca.clone(), args.tls_cert.clone(), args.tls_key.clone());
    cfg.auth = match (&args.user, &args.password, &args.creds) {
        (_, _, Some(path)) => Auth::CredsFile(path.clone()),
        (Some(user), None, None) => anyhow::bail!(
            "NATS_PASSWORD (--password) is not set: set it to the password of NATS user {user} (FERRY_{}_PASSWORD in the broker's environment)",
            role.as_str().to_ascii_uppercase()
        ),
        (Some(user), Some(password), None) if password.is_empty() => anyhow::bail!(
            "NATS_PASSWORD (--password) is empty: set it to the password of NATS user {user} (FERRY_{}_PASSWORD in the broker's environment)",
            role.as_str().to_ascii_uppercase()
        ),
        (Some(user), Some(password), None) => Auth::UserPassword {
            user: user.clone(),
            password: password.clone(),
        },
        (None, _, None) => Auth::None,
    };
    Ok(cfg)
}

/// `--check`: the database URL, when one is given, parses.
fn check_db(db: Option<&ferry_workers::state::DbConfig>) -> anyhow::Result<()> {
    if let Some(db) = db {
        describe_db(&db.url)?;
    }
    Ok(())
}

/// `ferry@host:port/database` of a PostgreSQL URL, without its password.
fn describe_db(url: &str) -> anyhow::Result<String> {
    let pg = ferry_workers::state::parse_url(url)?;
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_string(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    Ok(format!(
        "{}@{host}:{port}/{}",
        pg.get_user().unwrap_or("?"),
        pg.get_dbname().unwrap_or("?")
    ))
}

/// `--check`: a model file that is not there is a warning, not an error:
/// the worker starts without it and the fallback chain skips it.
fn check_models(settings: &inference::config::InferenceSettings) {
    for m in &settings.models {
        if let inference::config::ModelSource::File(path) = &m.source {
            if !path.is_file() {
                eprintln!(
                    "warning: model {}: {} is not a file here; a worker that cannot load it skips to the next step of the fallback chain",
                    m.alias,
                    path.display()
                );
            }
        }
    }
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Before any thread exists, so nothing reads the environment while it
    // changes: the kernels' pools read it when they first run.
    if let RoleCmd::Inference(InferenceArgs { threads: Some(n), .. }) = &cli.role {
        std::env::set_var(ENGINE_THREADS_VAR, n.to_string());
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    init_logs(cli.log_format);
    // Served until the worker exits (never with --check, which binds nothing).
    let _metrics = match (cli.check, cli.metrics_listen) {
        (false, Some(addr)) => Some(ferry_workers::metrics::serve(addr)?),
        _ => None,
    };
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        runtime::shutdown_signal().await;
        tracing::info!("shutdown requested: finishing in-flight work");
        on_signal.cancel();
    });
    match cli.role {
        RoleCmd::BenchEngine(args) => bench_engine(args).await?,
        RoleCmd::Rules(args) => {
            let cfg = args.config();
            // Validate the rules before touching the network.
            let set = rules::config::load_with_groups(&cfg.rules_path, cfg.groups_path.as_deref())?;
            let nats = nats_config(&cli.nats, Role::Rules)?;
            if cli.check {
                check_db(cfg.db.as_ref())?;
                if set.needs_customers() && cfg.db.is_none() {
                    return Err(rules::StartError::NeedsDatabase(cfg.rules_path.display().to_string()).into());
                }
                println!("ferry-worker rules: ok: {} rules in {}", set.len(), cfg.rules_path.display());
                return Ok(());
            }
            let client = nats
                .connect()
                .await
                .context("connecting to NATS")?;
            let stats = rules::run(client, &cfg, shutdown).await?;
            tracing::info!(stats = ?stats.snapshot(), "rules worker stopped");
        }
        RoleCmd::Inference(args) => {
            let mut cfg = inference::InferenceConfig::new(&args.config);
            cfg.db = args.db.config();
            cfg.groups_path = args.groups.clone();
            // Validate the config before loading models or connecting.
            let settings = inference::config::load_with_groups(&cfg.config_path, cfg.groups_path.as_deref())?;
            let nats = nats_config(&cli.nats, Role::Inference)?;
            if cli.check {
                check_db(cfg.db.as_ref())?;
                check_models(&settings);
                println!(
                    "ferry-worker inference: ok: {} models, {} routes, {} templates in {}; {} engine threads",
                    settings.models.len(),
                    settings.routes.len(),
                    settings.templates.len(),
                    cfg.config_path.display(),
                    inference::engine::threads()
                );
                return Ok(());
            }
            let client = nats
                .connect()
                .await
                .context("connecting to NATS")?;
            let stats = inference::run(client, &cfg, shutdown).await?;
            tracing::info!(stats = ?stats.snapshot(), "inference worker stopped");
        }
        RoleCmd::Archiver(args) => {
            let Some(db) = args.db.config() else {
                anyhow::bail!("the archiver needs a database: pass --database-url or set DATABASE_URL (postgres://user:password@host:port/database)");
            };
            let cfg = args.config(db);
            // Check the URL before touching the network.
            ferry_workers::state::parse_url(&cfg.db.url)?;
            let nats = nats_config(&cli.nats, Role::Archiver)?;
            if cli.check {
                println!("ferry-worker archiver: ok: database {}", describe_db(&cfg.db.url)?);
                return Ok(());
            }
            let client = nats
                .connect()
                .await
                .context("connecting to NATS")?;
            let stats = archiver::run(client, &cfg, shutdown).await?;
            tracing::info!(stats = ?stats.snapshot(), "archiver stopped");
        }
        RoleCmd::Alerts(args) => {
            let cfg = args.config();
            // Validate the file before touching the network.
            let file = ferry_workers::alerts::config::load(&cfg.file, cfg.groups.as_deref())?;
            let nats = nats_config(&cli.nats, Role::Alerts)?;
            if cli.check {
                println!(
                    "ferry-worker alerts: ok: {} rules, {} webhooks in {}{}",
                    file.rules.len(),
                    file.webhooks.len(),
                    cfg.file.display(),
                    if file.enabled { "" } else { " (disabled)" }
                );
                return Ok(());
            }
            let client = nats.connect().await.context("connecting to NATS")?;
            let stats = ferry_workers::alerts::run(client, &cfg, shutdown).await?;
            tracing::info!(stats = ?stats.snapshot(), "alerts worker stopped");
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("ferry-worker").chain(args.iter().copied())).unwrap()
    }

    /// With no flags a deployed worker runs the library's defaults. The
    /// archiver's flags once restated 4096 and 1000 over the library's 8192
    /// and 2000, so compose and systemd (which pass neither) ran the old
    /// numbers.
    #[test]
    fn without_flags_the_workers_run_the_library_defaults() {
        let url = "postgres://ferry@127.0.0.1:5432/ferry";
        let RoleCmd::Archiver(a) = parse(&["archiver", "--database-url", url]).role else { panic!("archiver") };
        let got = a.config(a.db.config().unwrap());
        let want = archiver::ArchiverConfig::new(url);
        assert_eq!(got.consume.max_in_flight, want.consume.max_in_flight);
        assert_eq!((got.batch.max_rows, got.batch.max_wait), (want.batch.max_rows, want.batch.max_wait));
        assert_eq!(got.conversation_idle, want.conversation_idle);
        assert_eq!(got.db.pool_size, want.db.pool_size);
        assert_eq!(got.retention, want.retention);

        let RoleCmd::Rules(r) = parse(&["rules", "--rules", "r.toml"]).role else { panic!("rules") };
        let (got, want) = (r.config(), rules::RulesConfig::new("r.toml"));
        assert_eq!(got.consume.max_in_flight, want.consume.max_in_flight);
        assert_eq!(got.reload_every, want.reload_every);
    }

    #[test]
    fn flags_override_and_help_names_the_library_default() {
        let RoleCmd::Archiver(a) = parse(&[
            "archiver", "--database-url", "postgres://x@h/d", "--concurrency", "64", "--batch-rows", "10",
            "--batch-wait-ms", "5", "--conversation-idle-mins", "2", "--db-pool", "3",
        ])
        .role
        else {
            panic!("archiver")
        };
        let got = a.config(a.db.config().unwrap());
        assert_eq!((got.consume.max_in_flight, got.batch.max_rows, got.db.pool_size), (64, 10, 3));
        assert_eq!(got.batch.max_wait, std::time::Duration::from_millis(5));
        assert_eq!(got.conversation_idle, std::time::Duration::from_secs(120));
        let RoleCmd::Rules(r) = parse(&["rules", "--concurrency", "8", "--reload-every", "0s"]).role else { panic!("rules") };
        let got = r.config();
        assert_eq!((got.consume.max_in_flight, got.reload_every), (8, Some(std::time::Duration::ZERO)));

        let help = match Cli::try_parse_from(["ferry-worker", "archiver", "--help"]) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("--help parses to help"),
        };
        let want = archiver::ArchiverConfig::new("");
        assert!(help.contains(&format!("[default: {}]", want.consume.max_in_flight)), "{help}");
        assert!(help.contains(&format!("[default: {}]", want.batch.max_rows)), "{help}");
        assert!(help.contains("[default: events=30,replies=30,interactions=30,alerts=90]"), "{help}");
    }

    #[test]
    fn keep_sets_the_retention_and_a_bad_one_names_the_item() {
        let RoleCmd::Archiver(a) = parse(&["archiver", "--database-url", "postgres://x@h/d", "--keep", "alerts=365"]).role else {
            panic!("archiver")
        };
        let got = a.config(a.db.config().unwrap()).retention.unwrap();
        assert_eq!(got.alerts.as_secs(), 365 * 86_400);
        assert_eq!(got.events.as_secs(), 30 * 86_400);
        let RoleCmd::Archiver(a) = parse(&["archiver", "--database-url", "postgres://x@h/d", "--keep", "forever"]).role else {
            panic!("archiver")
        };
        assert_eq!(a.config(a.db.config().unwrap()).retention, None);
        let err = Cli::try_parse_from(["ferry-worker", "archiver", "--database-url", "postgres://x@h/d", "--keep", "event=3"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown table `event`"), "{err}");
    }
}

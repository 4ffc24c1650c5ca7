//! `ferry agent add|list|revoke|rotate`: an agent's credentials (an nkey), its broker permissions and reply consumer, reloaded into a running nats-server.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use chrono::Utc;
use clap::{Args, Subcommand};
use ferry_schema::connect::{Auth, NatsConfig};
use ferry_schema::{subject, topology, AgentId};
use ferry_stack::Secrets;

use crate::agent_registry::{self as registry, AgentEntry, Registry, RegistryLock};
use crate::ConnArgs;

#[derive(Debug, Subcommand)]
pub enum AgentCmd {
    /// Create an agent's credentials: an nkey (seed saved to
    /// <data-dir>/agents/<id>.nk, mode 0600, and printed), its user in
    /// nats.conf (publish only events.<id>.>, read only its own replies),
    /// its reply consumer REPLIES/agent-<id>; then reload the running
    /// nats-server and check that the agent can connect.
    ///
    /// Examples:
    ///   ferry agent add desk-7                    # on `ferry up`'s broker
    ///   ferry agent add desk-7 --group support    # rules/inference match it by group
    ///   ferry agent add desk-7 --nats-conf /etc/nats/nats.conf --nats-pid /var/run/nats.pid \
    ///       --server nats://broker:4222 --password "$FERRY_OPERATOR_PASSWORD"
    ///   ferry agent add desk-7 --offline          # files only: no reload, no consumer
    #[command(verbatim_doc_comment)]
    Add(AddArgs),
    /// List the agents in the registry: id, group, public key, added, revoked.
    ///
    /// Examples:
    ///   ferry agent list
    ///   ferry agent list --json | jq -r 'select(.revoked == null) | .id'
    #[command(verbatim_doc_comment)]
    List(ListArgs),
    /// Take an agent's credentials back: remove its user from nats.conf,
    /// reload nats-server (which also closes the agent's open connections),
    /// delete its seed file and its reply consumer (with the replies it had
    /// not fetched). The registry keeps the entry, marked revoked.
    ///
    /// Examples:
    ///   ferry agent revoke desk-7
    ///   ferry agent revoke desk-7 --nats-conf /etc/nats/nats.conf --nats-pid 4711
    #[command(verbatim_doc_comment)]
    Revoke(RevokeArgs),
    /// Give an agent a new key: a new nkey (seed saved over
    /// <data-dir>/agents/<id>.nk and printed), its user in nats.conf
    /// updated and nats-server reloaded, which closes connections made with
    /// the old key and refuses it from then on. Its reply consumer, and the
    /// replies waiting in it, stay. Rotate when a seed may have leaked, when
    /// a PC changes hands, or on a schedule.
    ///
    /// Examples:
    ///   ferry agent rotate desk-7
    ///   ferry agent rotate desk-7 --nats-conf /etc/nats/nats.conf --nats-pid 4711
    #[command(verbatim_doc_comment)]
    Rotate(RevokeArgs),
}

/// Where the registry, the broker's config and the broker are.
#[derive(Debug, Args)]
pub struct Target {
    /// Data dir: the registry (agents.toml), seeds (agents/<id>.nk),
    /// groups.toml, and `ferry up`'s secrets.env and up.pid.
    #[arg(long, default_value = ".ferry")]
    data_dir: PathBuf,
    /// nats.conf whose agent users to rewrite (between its `# BEGIN ferry
    /// agents` and `# END ferry agents` lines). Default: the one `ferry up`
    /// runs, <data-dir>/nats/nats.conf, when it exists.
    #[arg(long, env = "FERRY_NATS_CONF")]
    nats_conf: Option<PathBuf>,
    /// nats-server to reload: a process id or a pid file. Default: `ferry
    /// up`'s broker (from <data-dir>/up.pid) when it runs.
    #[arg(long, value_name = "PID|FILE")]
    nats_pid: Option<String>,
    /// Change only the files: no reload, no consumer created or deleted
    /// (for a broker this machine does not run or reach).
    #[arg(long)]
    offline: bool,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// The agent id (one subject token: letters, digits, '-', '_').
    id: String,
    /// The agent's group. It lands in <data-dir>/groups.toml, which the
    /// rules and inference workers read with `--groups` (rules and routes
    /// select agents by group); workers read it at start.
    #[arg(long)]
    group: Option<String>,
    #[command(flatten)]
    target: Target,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Data dir holding the registry (agents.toml).
    #[arg(long, default_value = ".ferry")]
    data_dir: PathBuf,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The agent id.
    id: String,
    #[command(flatten)]
    target: Target,
}

pub async fn run(cmd: AgentCmd) -> anyhow::Result<()> {
    match cmd {
        AgentCmd::Add(args) => add(args).await,
        AgentCmd::List(args) => list(&args),
        AgentCmd::Revoke(args) => revoke(args).await,
        AgentCmd::Rotate(args) => rotate(args).await,
    }
}

/// How long to wait for a reload to show (the agent can or can no longer connect).
const RELOAD_WAIT: Duration = Duration::from_secs(10);

async fn add(args: AddArgs) -> anyhow::Result<()> {
    let t = &args.target;
    let id = AgentId::new(args.id.as_str()).context("agent id")?;
    if let Some(g) = &args.group {
        registry::check_group(g)?;
    }
    let _lock = RegistryLock::take(&t.data_dir)?;
    let reg_path = registry::registry_path(&t.data_dir);
    let mut reg = Registry::load(&reg_path)?;
    let plan = plan(t, &reg)?;
    let pair = nkeys::KeyPair::new_user();
    let seed = pair.seed().context("encoding the new nkey seed")?;
    reg.add(AgentEntry {
        id: id.to_string(),
        group: args.group.clone(),
        public_key: pair.public_key(),
        created: Utc::now(),
        revoked: None,
        rotated: None,
    })?;
    let seed_file = registry::seed_path(&t.data_dir, &id);
    write_seed(&seed_file, &id, &seed)?;
    reg.save(&reg_path)?;
    tracing::info!(agent = %id, public_key = %pair.public_key(), "agent added to the registry");

    println!("Added agent {id}{}.", group_note(args.group.as_deref()));
    println!("  public key  {}", pair.public_key());
    println!("  seed        {seed}");
    println!("  seed file   {} (mode 0600)", seed_file.display());
    let applied = apply(t, &plan, &reg)?;
    if !t.offline {
        let js = jetstream::new(operator(t, "ferry agent add")?.connect().await?);
        let report = topology::ensure_consumer(&js, &topology::agent_replies_consumer(&id))
            .await
            .with_context(|| format!("creating the reply consumer of {id} (is the broker provisioned? `ferry provision`)"))?;
        let line = crate::provision::describe(std::slice::from_ref(&report));
        println!("  consumer    {}", line.trim_start_matches("consumer "));
        if applied.reloaded {
            let conn = agent_conn(&t.conn.server, &id, Auth::Nkey { seed: seed.clone() });
            wait_until(&format!("{id} to be able to connect"), || async {
                check_agent(&conn, &id).await.map_err(|e| format!("{e:#}"))
            })
            .await?;
            println!("  check       {id} connected with its seed and read its consumer: ok");
        }
    }
    println!();
    println!("The seed is the agent's password. Copy the seed file to the agent's PC only");
    println!("(keep it mode 0600) and run the agent with it:");
    println!("  ferry-agent --id {id} --nkey {id}.nk --server nats://<broker>:4222 run");
    println!("(or set FERRY_AGENT_NKEY to the file). `ferry agent revoke {id}` takes it back.");
    Ok(())
}

fn list(args: &ListArgs) -> anyhow::Result<()> {
    let reg = Registry::load(&registry::registry_path(&args.data_dir))?;
    if args.json {
        for a in &reg.agents {
            let line = serde_json::json!({
                "id": a.id,
                "group": a.group,
                "public_key": a.public_key,
                "created": registry::rfc3339(&a.created),
                "revoked": a.revoked.as_ref().map(registry::rfc3339),
            });
            println!("{line}");
        }
        return Ok(());
    }
    if reg.agents.is_empty() {
        eprintln!(
            "ferry: no agents in {} (add one with `ferry agent add <id>`)",
            registry::registry_path(&args.data_dir).display()
        );
        return Ok(());
    }
    let id_w = reg.agents.iter().map(|a| a.id.len()).max().unwrap_or(0).max(2);
    let group_w = reg
        .agents
        .iter()
        .map(|a| a.group.as_deref().unwrap_or("-").len())
        .max()
        .unwrap_or(0)
        .max(5);
    println!("{:id_w$}  {:group_w$}  {:56}  {:20}  STATUS", "ID", "GROUP", "PUBLIC KEY", "ADDED");
    for a in &reg.agents {
        let status = match &a.revoked {
            None => "active".to_string(),
            Some(t) => format!("revoked {}", registry::rfc3339(t)),
        };
        println!(
            "{:id_w$}  {:group_w$}  {:56}  {:20}  {status}",
            a.id,
            a.group.as_deref().unwrap_or("-"),
            a.public_key,
            registry::rfc3339(&a.created),
        );
    }
    Ok(())
}

/// What `rotate` and `revoke` start from: the agent, the registry (locked
/// until this is dropped) and the plan, checked before anything changes.
struct Opened {
    id: AgentId,
    _lock: RegistryLock,
    reg_path: PathBuf,
    reg: Registry,
    plan: Plan,
}

fn open_registry(t: &Target, id: &str) -> anyhow::Result<Opened> {
    let id = AgentId::new(id).context("agent id")?;
    let _lock = RegistryLock::take(&t.data_dir)?;
    let reg_path = registry::registry_path(&t.data_dir);
    let reg = Registry::load(&reg_path)?;
    let plan = plan(t, &reg)?;
    Ok(Opened { id, _lock, reg_path, reg, plan })
}

async fn rotate(args: RevokeArgs) -> anyhow::Result<()> {
    let t = &args.target;
    let Opened { id, _lock, reg_path, mut reg, plan } = open_registry(t, &args.id)?;
    let seed_file = registry::seed_path(&t.data_dir, &id);
    let old_auth = Auth::nkey_file(&seed_file).ok();
    let pair = nkeys::KeyPair::new_user();
    let seed = pair.seed().context("encoding the new nkey seed")?;
    let old_key = reg.rotate(id.as_str(), pair.public_key(), Utc::now())?;
    write_seed(&seed_file, &id, &seed)?;
    reg.save(&reg_path)?;
    tracing::info!(agent = %id, old = %old_key, new = %pair.public_key(), "agent key rotated");
    println!("Rotated the key of agent {id}.");
    println!("  public key  {} (was {old_key})", pair.public_key());
    println!("  seed        {seed}");
    println!("  seed file   {} (mode 0600)", seed_file.display());
    let applied = apply(t, &plan, &reg)?;
    if !t.offline && applied.reloaded {
        let conn = agent_conn(&t.conn.server, &id, Auth::Nkey { seed: seed.clone() });
        wait_until(&format!("{id} to be able to connect with its new seed"), || async {
            check_agent(&conn, &id).await.map_err(|e| format!("{e:#}"))
        })
        .await?;
        println!("  check       {id} connected with its new seed: ok");
        if let Some(auth) = old_auth {
            wait_refused(t, &id, auth).await?;
            println!("  check       the broker refuses the old seed: ok");
        }
    }
    println!();
    println!("Copy the new seed file to the agent's PC (mode 0600) and restart the agent;");
    println!("until then it cannot connect, and its events wait in its spool.");
    Ok(())
}

/// Waits until the reloaded broker refuses `id` with `auth` (an old seed).
async fn wait_refused(t: &Target, id: &AgentId, auth: Auth) -> anyhow::Result<()> {
    let conn = agent_conn(&t.conn.server, id, auth);
    wait_until(&format!("the broker to refuse {id}'s old seed"), || async {
        match quiet(conn.connect()).await {
            Ok(_) => Err("it still connects".to_string()),
            Err(_) => Ok(()),
        }
    })
    .await
}

async fn revoke(args: RevokeArgs) -> anyhow::Result<()> {
    let t = &args.target;
    let Opened { id, _lock, reg_path, mut reg, plan } = open_registry(t, &args.id)?;
    reg.revoke(id.as_str(), Utc::now())?;
    reg.save(&reg_path)?;
    tracing::info!(agent = %id, "agent revoked in the registry");
    println!("Revoked agent {id}.");
    let seed_file = registry::seed_path(&t.data_dir, &id);
    // Kept in memory to check, after the reload, that it no longer works.
    let old_auth = Auth::nkey_file(&seed_file).ok();
    let applied = apply(t, &plan, &reg)?;
    if !t.offline {
        if applied.reloaded {
            if let Some(auth) = old_auth {
                wait_refused(t, &id, auth).await?;
                println!("  check       the broker refuses {id}'s seed: ok");
            }
        }
        let js = jetstream::new(operator(t, "ferry agent revoke")?.connect().await?);
        let deleted = topology::remove_agent_consumer(&js, &id).await?;
        println!(
            "  consumer    {}/{}: {}",
            topology::REPLIES_STREAM,
            topology::agent_replies_consumer_name(&id),
            if deleted { "deleted" } else { "did not exist" }
        );
    }
    match std::fs::remove_file(&seed_file) {
        Ok(()) => println!("  seed file   {}: deleted", seed_file.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("deleting {}", seed_file.display())),
    }
    Ok(())
}

/// Which nats.conf to rewrite and which nats-server to reload, checked
/// before anything changes.
#[derive(Debug)]
struct Plan {
    /// The config with the generated block, if there is one to update.
    conf: Option<PathBuf>,
    /// The nats-server to reload, unless offline or unknown.
    pid: Option<i32>,
}

fn plan(t: &Target, reg: &Registry) -> anyhow::Result<Plan> {
    let default_conf = t.data_dir.join("nats").join("nats.conf");
    let conf = match &t.nats_conf {
        Some(p) => Some(p.clone()),
        None => default_conf.exists().then_some(default_conf),
    };
    if let Some(conf) = &conf {
        let text = std::fs::read_to_string(conf).with_context(|| format!("reading {}", conf.display()))?;
        reg.splice_into(&text, &conf.display().to_string())?;
    }
    let pid = if t.offline || conf.is_none() { None } else { nats_pid(t)? };
    if let (Some(pid), Some(conf)) = (pid, &conf) {
        if let Some(running_conf) = config_of(pid) {
            if std::fs::canonicalize(&running_conf).ok() != std::fs::canonicalize(conf).ok() {
                eprintln!(
                    "ferry: warning: nats-server (pid {pid}) runs with {}, not {}",
                    running_conf.display(),
                    conf.display()
                );
            }
        }
    }
    Ok(Plan { conf, pid })
}

/// What [`apply`] did.
#[derive(Debug)]
struct Applied {
    /// A nats-server was told to reload.
    reloaded: bool,
}

/// Regenerates the groups file and nats.conf's agent users from `reg`,
/// and reloads nats-server, as planned. Prints one line per step.
fn apply(t: &Target, plan: &Plan, reg: &Registry) -> anyhow::Result<Applied> {
    let groups = registry::groups_path(&t.data_dir);
    registry::write_atomic(&groups, reg.groups_toml()?.as_bytes(), 0o644)?;
    println!("  groups      {} (workers read it with --groups at start)", groups.display());

    let Some(conf) = &plan.conf else {
        println!(
            "  nats.conf   none at {}: `ferry up` writes the agent users at its next start; for another broker pass --nats-conf",
            t.data_dir.join("nats").join("nats.conf").display()
        );
        return Ok(Applied { reloaded: false });
    };
    let text = std::fs::read_to_string(conf).with_context(|| format!("reading {}", conf.display()))?;
    let new = reg.splice_into(&text, &conf.display().to_string())?;
    if new != text {
        registry::write_atomic(conf, new.as_bytes(), 0o644)?;
    }
    println!("  nats.conf   {}: {} agent users", conf.display(), reg.active().count());
    if t.offline {
        println!("  reload      skipped (--offline); reload it with: nats-server --signal reload=<pid>");
        return Ok(Applied { reloaded: false });
    }
    let Some(pid) = plan.pid else {
        println!("  reload      no running nats-server known (no `ferry up` in {}); reload yours with: nats-server --signal reload=<pid>, or pass --nats-pid", t.data_dir.display());
        return Ok(Applied { reloaded: false });
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGHUP)
        .with_context(|| format!("signalling nats-server (pid {pid}) to reload"))?;
    tracing::info!(pid, conf = %conf.display(), "nats-server reload requested");
    println!("  reload      nats-server (pid {pid}) told to reload its configuration");
    Ok(Applied { reloaded: true })
}

/// The nats-server to reload: `--nats-pid` (a pid or pid file), or the one
/// `ferry up` started from this data dir, if it runs.
fn nats_pid(t: &Target) -> anyhow::Result<Option<i32>> {
    if let Some(given) = &t.nats_pid {
        let text = match given.trim().parse::<i32>() {
            Ok(pid) => pid.to_string(),
            Err(_) => std::fs::read_to_string(given).with_context(|| format!("reading --nats-pid file {given}"))?,
        };
        let pid: i32 = text
            .trim()
            .parse()
            .with_context(|| format!("--nats-pid {given}: {:?} is not a process id", text.trim()))?;
        anyhow::ensure!(
            crate::down::running(pid, "nats-server"),
            "--nats-pid {given}: process {pid} is not a running nats-server"
        );
        return Ok(Some(pid));
    }
    let up = t.data_dir.join(crate::up::PID_FILE);
    Ok(crate::down::pids(&up)
        .into_iter()
        .find(|(what, pid)| what == "nats" && crate::down::running(*pid, "nats-server"))
        .map(|(_, pid)| pid))
}

/// The config file a running nats-server was started with (`-c FILE`), if it can be read.
fn config_of(pid: i32) -> Option<PathBuf> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let conf = args
        .iter()
        .position(|a| a == "-c" || a == "--config")
        .and_then(|i| args.get(i + 1))?;
    let conf = Path::new(conf);
    if conf.is_absolute() {
        Some(conf.to_path_buf())
    } else {
        Some(std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?.join(conf))
    }
}

/// Operator connection settings: the flags, or `ferry up`'s operator
/// password from <data-dir>/secrets.env when none were given.
fn operator(t: &Target, name: &str) -> anyhow::Result<NatsConfig> {
    let mut c = t.conn.config(name);
    if matches!(c.auth, Auth::None) {
        let secrets = t.data_dir.join("secrets.env");
        let found = Secrets::load(&secrets)?.with_context(|| {
            format!(
                "no --password (NATS_PASSWORD) or --creds given and no `ferry up` secrets in {}; pass the operator's credentials, or --offline",
                secrets.display()
            )
        })?;
        c = c.with_user(t.conn.user.clone(), found.operator);
    }
    Ok(c)
}

/// The connection settings `ferry-agent` uses for `id` with `auth`.
fn agent_conn(server: &str, id: &AgentId, auth: Auth) -> NatsConfig {
    let mut c = NatsConfig::new(server, format!("ferry agent check {id}"));
    c.auth = auth;
    c.inbox_prefix = Some(subject::agent_inbox_prefix(id));
    c.connect_timeout = Duration::from_secs(2);
    c
}

/// Connects as the agent and reads its reply consumer's info, as
/// `ferry-agent` does: proves the user, its permissions and the consumer.
async fn check_agent(conn: &NatsConfig, id: &AgentId) -> anyhow::Result<()> {
    let client = quiet(conn.connect()).await?;
    let js = jetstream::ContextBuilder::new()
        .api_prefix(subject::AGENT_JS_API_PREFIX)
        .timeout(Duration::from_secs(2))
        .build(client);
    js.get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
        topology::agent_replies_consumer_name(id),
        topology::REPLIES_STREAM,
    )
    .await?;
    Ok(())
}

/// Runs `fut` without logs: a refused connection is what the checks expect
/// while the reload is under way, and async-nats logs each as an error.
async fn quiet<F: std::future::Future>(fut: F) -> F::Output {
    use tracing::instrument::WithSubscriber as _;
    fut.with_subscriber(tracing::subscriber::NoSubscriber::default()).await
}

/// Retries `check` until it succeeds or [`RELOAD_WAIT`] passes.
async fn wait_until<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(()) => return Ok(()),
            Err(e) if start.elapsed() > RELOAD_WAIT => {
                anyhow::bail!(
                    "waited {RELOAD_WAIT:?} for {what} after the reload: {e}. See nats-server's log: a server started with a store dir on its command line (-sd) refuses every reload; set store_dir in its nats.conf instead"
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Writes the seed file, mode 0600, in a dir only the owner can enter.
pub(crate) fn write_seed(path: &Path, id: &AgentId, seed: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    registry::write_atomic(
        path,
        format!("# nkey seed of Ferry agent {id}: its password; keep it secret.\n{seed}\n").as_bytes(),
        0o600,
    )
}

fn group_note(group: Option<&str>) -> String {
    group.map(|g| format!(" in group {g}")).unwrap_or_default()
}

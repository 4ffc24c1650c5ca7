//! `ferry agent add|list|revoke|rotate|expire|slots`: an agent's credentials (an nkey), its broker permissions and reply consumer, reloaded into a running nats-server.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use chrono::Utc;
use clap::{Args, Subcommand};
use ferry_schema::connect::{Auth, NatsConfig};
use ferry_schema::{subject, topology, AgentId};

use crate::agent_registry::{self as registry, AgentEntry, Registry, RegistryLock};
use crate::ConnArgs;
use crate::data_dir::DataDir;

#[derive(Debug, Subcommand)]
pub enum AgentCmd {
    /// Create an agent's credentials: an nkey (seed saved to
    /// <data-dir>/agents/<id>.nk, mode 0600, and printed), its user in
    /// nats.conf (publish only its own events, read only its own replies),
    /// its reply consumer REPLIES/agent-<id>; then reload the running
    /// nats-server and check that the agent can connect.
    ///
    /// Examples:
    ///   ferry agent add desk-7                    # on `ferry up`'s broker
    ///   ferry agent add desk-7 --group support    # rules/inference match it by group
    ///   ferry agent add desk-7 --nats-conf /etc/nats/nats.conf --nats-pid /var/run/nats.pid \
    ///       --server nats://broker:4222 --password "$FERRY_OPERATOR_PASSWORD"
    ///   ferry agent add desk-7 --offline          # files only: no reload, no consumer
    ///   ferry agent add desk-7 --valid-for 90d    # the key expires (see `ferry agent expire`)
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
    ///   # a cluster: every node's copy of nats.conf and every node's server,
    ///   # then each node is checked on its own URL
    ///   ferry agent revoke desk-7 --nats-conf n1/nats.conf --nats-conf n2/nats.conf --nats-conf n3/nats.conf \
    ///       --nats-pid n1.pid --nats-pid n2.pid --nats-pid n3.pid --server nats://n1:4222,nats://n2:4222,nats://n3:4222
    #[command(verbatim_doc_comment)]
    Revoke(RevokeArgs),
    /// Give an agent a new key: a new nkey (seed saved over
    /// <data-dir>/agents/<id>.nk and printed), its user in nats.conf
    /// updated and nats-server reloaded, which closes connections made with
    /// the old key and refuses it from then on. Its reply consumer, and the
    /// replies waiting in it, stay. Rotate when a seed may have leaked, when
    /// a PC changes hands, or on a schedule.
    ///
    /// A key that expires gets as long again as the old one had, unless
    /// --valid-for says otherwise; an expired agent is renewed this way.
    ///
    /// Examples:
    ///   ferry agent rotate desk-7
    ///   ferry agent rotate desk-7 --valid-for 30d
    ///   ferry agent rotate desk-7 --nats-conf /etc/nats/nats.conf --nats-pid 4711
    #[command(verbatim_doc_comment)]
    Rotate(RotateArgs),
    /// Lock out every agent whose key has expired (`add --valid-for`):
    /// rewrite nats.conf without their users, reload nats-server (which
    /// closes their connections) and check that every node refuses them.
    /// Their reply consumers and seed files stay; `ferry agent rotate <id>`
    /// gives such an agent a new key. nats-server has no expiry for nkey
    /// users, so run this on a schedule (a daily timer or cron job) where
    /// you run `ferry agent add`; until it runs, an expired key still
    /// connects.
    ///
    /// Examples:
    ///   ferry agent expire
    ///   ferry agent expire --nats-conf /etc/nats/nats.conf --nats-pid /var/run/nats.pid
    #[command(verbatim_doc_comment)]
    Expire(ExpireArgs),
    /// Grow the pool of agent accounts in nats.conf to COUNT slots. Each
    /// agent has a NATS account of its own (a slot), so that its limits (8
    /// connections, 260 KiB a message) bind it alone; the committed
    /// nats.conf has 1,000. nats-server gives an account that a reload adds
    /// no working imports, so after this restart the broker (each node of
    /// a cluster) before adding the agents that need the new slots. Keep
    /// COUNT x 8 plus 1,000 for the workers under the server's
    /// max_connections (10,000 in Ferry's nats.conf), or raise that too.
    ///
    /// Examples:
    ///   ferry agent slots 2000 --nats-conf /etc/nats/nats.conf
    ///   ferry agent slots 2000 --nats-conf n1/nats.conf --nats-conf n2/nats.conf --nats-conf n3/nats.conf
    #[command(verbatim_doc_comment)]
    Slots(crate::agent_slots::SlotsArgs),
}

/// Where the registry, the broker's config and the broker are.
#[derive(Debug, Args)]
pub struct Target {
    /// Data dir: the registry (agents.toml), seeds (agents/<id>.nk),
    /// groups.toml, and `ferry up`'s secrets.env and up.pid.
    #[arg(long, default_value = crate::data_dir::DEFAULT)]
    data_dir: DataDir,
    /// nats.conf whose agent users to rewrite (between its `# BEGIN ferry
    /// agents` and `# END ferry agents` lines). Repeat it (or separate with
    /// commas) for each node's copy on a cluster. Default: the one `ferry
    /// up` runs, <data-dir>/nats/nats.conf, when it exists.
    #[arg(long, env = "FERRY_NATS_CONF", value_delimiter = ',')]
    nats_conf: Vec<PathBuf>,
    /// nats-server to reload: a process id or a pid file. Repeat it for
    /// each node of a cluster. Default: `ferry up`'s broker (from
    /// <data-dir>/up.pid) when it runs. After a reload, each URL of
    /// --server is checked on its own: a cluster is done only when every
    /// node refuses (or accepts) the key.
    #[arg(long, value_name = "PID|FILE")]
    nats_pid: Vec<String>,
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
    /// How long the key works, e.g. 90d or 12h (default: until revoked).
    /// After that the generated nats.conf has no user for it, and `ferry
    /// agent expire` applies that to the running broker.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    valid_for: Option<Duration>,
    #[command(flatten)]
    target: Target,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Data dir holding the registry (agents.toml).
    #[arg(long, default_value = crate::data_dir::DEFAULT)]
    data_dir: DataDir,
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

#[derive(Debug, Args)]
pub struct RotateArgs {
    /// The agent id.
    id: String,
    /// How long the new key works, e.g. 90d (default: as long as the old
    /// key was given, or until revoked if it had no expiry).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    valid_for: Option<Duration>,
    #[command(flatten)]
    target: Target,
}

#[derive(Debug, Args)]
pub struct ExpireArgs {
    #[command(flatten)]
    target: Target,
}

pub async fn run(cmd: AgentCmd) -> anyhow::Result<()> {
    match cmd {
        AgentCmd::Add(args) => add(args).await,
        AgentCmd::List(args) => list(&args),
        AgentCmd::Revoke(args) => revoke(args).await,
        AgentCmd::Rotate(args) => rotate(args).await,
        AgentCmd::Expire(args) => expire(args).await,
        AgentCmd::Slots(args) => crate::agent_slots::run(&args),
    }
}

/// A `--valid-for` as a chrono duration (refusing one too long to add to a time).
fn validity(valid_for: Option<Duration>) -> anyhow::Result<Option<chrono::Duration>> {
    valid_for
        .map(|d| {
            anyhow::ensure!(!d.is_zero(), "--valid-for must be longer than 0");
            chrono::Duration::from_std(d).ok().filter(|d| Utc::now().checked_add_signed(*d).is_some()).context("--valid-for is too long")
        })
        .transpose()
}

/// How long to wait for a reload to show (the agent can or can no longer connect).
const RELOAD_WAIT: Duration = Duration::from_secs(10);

async fn add(args: AddArgs) -> anyhow::Result<()> {
    let t = &args.target;
    let id = AgentId::new(args.id.as_str()).context("agent id")?;
    if let Some(g) = &args.group {
        registry::check_group(g)?;
    }
    let valid_for = validity(args.valid_for)?;
    let _lock = RegistryLock::take(&t.data_dir)?;
    let reg_path = t.data_dir.registry();
    let mut reg = Registry::load(&reg_path)?;
    let plan = plan(t, &reg)?;
    let pair = nkeys::KeyPair::new_user();
    let seed = pair.seed().context("encoding the new nkey seed")?;
    let created = Utc::now();
    let expires = valid_for.map(|v| created + v);
    reg.add(
        AgentEntry {
            id: id.to_string(),
            group: args.group.clone(),
            public_key: pair.public_key(),
            created,
            revoked: None,
            rotated: None,
            expires,
            slot: None,
        },
        plan.slots,
    )?;
    let seed_file = t.data_dir.seed(&id);
    write_seed(&seed_file, &id, &seed)?;
    reg.save(&reg_path)?;
    tracing::info!(agent = %id, public_key = %pair.public_key(), "agent added to the registry");

    println!("Added agent {id}{}.", group_note(args.group.as_deref()));
    if let Some(slot) = reg.agents.last().and_then(|a| a.slot) {
        println!("  account     {} (slot {slot} of {})", topology::agent_account(slot), plan.slots);
    }
    println!("  public key  {}", pair.public_key());
    println!("  seed        {seed}");
    println!("  seed file   {} (mode 0600)", seed_file.display());
    if let Some(e) = &expires {
        println!("  expires     {} (then `ferry agent expire` locks it out)", registry::rfc3339(e));
    }
    let applied = apply(t, &plan, &reg)?;
    if !t.offline {
        let client = match applied.reloaded {
            true => settle(t, "ferry agent add").await?,
            false => operator(t, "ferry agent add")?.connect().await?,
        };
        let js = jetstream::new(client);
        let report = topology::ensure_consumer(&js, &topology::agent_replies_consumer(&id))
            .await
            .with_context(|| format!("creating the reply consumer of {id} (is the broker provisioned? `ferry provision`)"))?;
        let line = crate::provision::describe(std::slice::from_ref(&report));
        println!("  consumer    {}", line.trim_start_matches("consumer "));
        if applied.reloaded {
            wait_accepted(t, &id, &seed).await?;
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
    let reg = Registry::load(&args.data_dir.registry())?;
    if args.json {
        for a in &reg.agents {
            let line = serde_json::json!({
                "id": a.id,
                "group": a.group,
                "public_key": a.public_key,
                "created": registry::rfc3339(&a.created),
                "revoked": a.revoked.as_ref().map(registry::rfc3339),
                "expires": a.expires.as_ref().map(registry::rfc3339),
            });
            println!("{line}");
        }
        return Ok(());
    }
    if reg.agents.is_empty() {
        eprintln!(
            "ferry: no agents in {} (add one with `ferry agent add <id>`)",
            args.data_dir.registry().display()
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
        let status = match (&a.revoked, &a.expires) {
            (Some(t), _) => format!("revoked {}", registry::rfc3339(t)),
            (None, Some(e)) if a.expired_at(Utc::now()) => format!("expired {}", registry::rfc3339(e)),
            (None, Some(e)) => format!("active, expires {}", registry::rfc3339(e)),
            (None, None) => "active".to_string(),
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
    let reg_path = t.data_dir.registry();
    let reg = Registry::load(&reg_path)?;
    let plan = plan(t, &reg)?;
    Ok(Opened { id, _lock, reg_path, reg, plan })
}

async fn rotate(args: RotateArgs) -> anyhow::Result<()> {
    let t = &args.target;
    let valid_for = validity(args.valid_for)?;
    let Opened { id, _lock, reg_path, mut reg, plan } = open_registry(t, &args.id)?;
    let seed_file = t.data_dir.seed(&id);
    let old_auth = Auth::nkey_file(&seed_file).ok();
    let pair = nkeys::KeyPair::new_user();
    let seed = pair.seed().context("encoding the new nkey seed")?;
    let old_key = reg.rotate(id.as_str(), pair.public_key(), Utc::now(), valid_for, plan.slots)?;
    write_seed(&seed_file, &id, &seed)?;
    reg.save(&reg_path)?;
    tracing::info!(agent = %id, old = %old_key, new = %pair.public_key(), "agent key rotated");
    println!("Rotated the key of agent {id}.");
    println!("  public key  {} (was {old_key})", pair.public_key());
    println!("  seed        {seed}");
    println!("  seed file   {} (mode 0600)", seed_file.display());
    if let Some(e) = reg.agents.iter().find(|a| a.id == id.as_str()).and_then(|a| a.expires) {
        println!("  expires     {}", registry::rfc3339(&e));
    }
    let applied = apply(t, &plan, &reg)?;
    if !t.offline && applied.reloaded {
        wait_accepted(t, &id, &seed).await?;
        if let Some(auth) = old_auth {
            wait_refused(t, &id, auth).await?;
        }
        // Best effort: rotating needs no operator, but a script's next
        // command may.
        let _ = settle(t, "ferry agent rotate").await;
    }
    println!();
    println!("Copy the new seed file to the agent's PC (mode 0600) and restart the agent;");
    println!("until then it cannot connect, and its events wait in its spool.");
    Ok(())
}

/// The URLs of `--server`, each checked on its own: on a cluster a change
/// holds only once every node has it.
fn nodes(t: &Target) -> Vec<&str> {
    t.conn.server.split(',').map(str::trim).filter(|u| !u.is_empty()).collect()
}

/// Waits until every node lets `id` in with `seed` and read its consumer.
async fn wait_accepted(t: &Target, id: &AgentId, seed: &str) -> anyhow::Result<()> {
    for url in nodes(t) {
        let conn = agent_conn(t, url, id, Auth::Nkey { seed: seed.to_string() });
        wait_until(&format!("{url} to let {id} in with its seed"), || async {
            check_agent(&conn, id).await.map_err(|e| format!("{e:#}"))
        })
        .await?;
        println!("  check       {url}: {id} connected with its seed and read its consumer: ok");
    }
    Ok(())
}

/// Waits until every node refuses `id` with `auth` (an old seed). A node
/// that cannot be reached is not taken for one that refuses.
async fn wait_refused(t: &Target, id: &AgentId, auth: Auth) -> anyhow::Result<()> {
    for url in nodes(t) {
        let conn = agent_conn(t, url, id, auth.clone());
        wait_until(&format!("{url} to refuse {id}'s old seed"), || async {
            match quiet(conn.connect()).await {
                Ok(_) => Err("it still connects".to_string()),
                Err(e) if format!("{e:#}").to_lowercase().contains("authoriz") => Ok(()),
                Err(e) => Err(format!("cannot tell, the node did not answer: {e:#}")),
            }
        })
        .await?;
        println!("  check       {url}: refuses {id}'s old seed: ok");
    }
    Ok(())
}

async fn revoke(args: RevokeArgs) -> anyhow::Result<()> {
    let t = &args.target;
    let Opened { id, _lock, reg_path, mut reg, plan } = open_registry(t, &args.id)?;
    reg.revoke(id.as_str(), Utc::now())?;
    reg.save(&reg_path)?;
    tracing::info!(agent = %id, "agent revoked in the registry");
    println!("Revoked agent {id}.");
    let seed_file = t.data_dir.seed(&id);
    // Kept in memory to check, after the reload, that it no longer works.
    let old_auth = Auth::nkey_file(&seed_file).ok();
    let applied = apply(t, &plan, &reg)?;
    if !t.offline {
        if applied.reloaded {
            if let Some(auth) = old_auth {
                wait_refused(t, &id, auth).await?;
            }
        }
        let client = match applied.reloaded {
            true => settle(t, "ferry agent revoke").await?,
            false => operator(t, "ferry agent revoke")?.connect().await?,
        };
        let js = jetstream::new(client);
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

async fn expire(args: ExpireArgs) -> anyhow::Result<()> {
    let t = &args.target;
    let _lock = RegistryLock::take(&t.data_dir)?;
    let reg = Registry::load(&t.data_dir.registry())?;
    let expired: Vec<(AgentId, String)> = reg
        .expired(Utc::now())
        .map(|a| Ok((AgentId::new(a.id.as_str())?, a.expires.as_ref().map(registry::rfc3339).unwrap_or_default())))
        .collect::<Result<_, ferry_schema::InvalidAgentId>>()?;
    if expired.is_empty() {
        println!("No agent's key has expired.");
        return Ok(());
    }
    let plan = plan(t, &reg)?;
    // The seeds, to check after the reload that they no longer work.
    let seeds: Vec<Option<Auth>> = expired.iter().map(|(id, _)| Auth::nkey_file(&t.data_dir.seed(id)).ok()).collect();
    // The registry already says they are not active: the config is
    // generated without them.
    let applied = apply(t, &plan, &reg)?;
    for ((id, when), seed) in expired.iter().zip(seeds) {
        println!("Expired agent {id} (its key expired at {when}); `ferry agent rotate {id}` gives it a new key.");
        if let (Some(auth), false, true) = (seed, t.offline, applied.reloaded) {
            wait_refused(t, id, auth).await?;
        }
    }
    if applied.reloaded {
        let _ = settle(t, "ferry agent expire").await;
    }
    Ok(())
}

/// JetStream's account information request.
const JS_ACCOUNT_INFO: &str = "$JS.API.INFO";

/// JetStream answers in a row that count as the reload being over.
const SETTLED_ANSWERS: u32 = 5;

/// Waits (up to [`RELOAD_WAIT`]) until JetStream answers again after a
/// reload, and returns an operator connection made after it: while
/// nats-server reloads its accounts (a thousand agent slots take about 0.1
/// s) it refuses or drops JetStream requests, and 2.9.10 can leave a
/// connection opened meanwhile without JetStream for good. Done once fresh
/// connections have had [`SETTLED_ANSWERS`] answers in a row, 0.1 s apart,
/// which also covers a reload that has yet to start; only warns when not.
async fn settle(t: &Target, name: &str) -> anyhow::Result<async_nats::Client> {
    let start = Instant::now();
    let mut in_a_row = 0;
    while in_a_row < SETTLED_ANSWERS {
        if start.elapsed() > RELOAD_WAIT {
            eprintln!("ferry: warning: JetStream did not answer steadily within {RELOAD_WAIT:?} of the reload; see nats-server's log");
            break;
        }
        let client = operator(t, name)?.connect().await?;
        // The raw account-info request: its answer's shape differs between
        // server versions, and only whether it is an error matters here.
        let answer = tokio::time::timeout(Duration::from_secs(1), client.request(JS_ACCOUNT_INFO, "".into())).await;
        let answered = match answer {
            Ok(Ok(msg)) => serde_json::from_slice::<serde_json::Value>(&msg.payload)
                .map_err(|e| e.to_string())
                .and_then(|v| match v.get("error") {
                    None => Ok(()),
                    Some(e) => Err(e.to_string()),
                }),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer within 1 s".to_string()),
        };
        match answered {
            Ok(()) => in_a_row += 1,
            Err(e) => {
                tracing::debug!(error = %e, "JetStream not answering yet after the reload");
                in_a_row = 0;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(operator(t, name)?.connect().await?)
}

/// Which nats.conf to rewrite and which nats-server to reload, checked
/// before anything changes.
#[derive(Debug)]
struct Plan {
    /// The configs with the generated block (one per node), if any.
    confs: Vec<PathBuf>,
    /// The nats-servers to reload; none when offline or unknown.
    pids: Vec<i32>,
    /// Agent slots in the configs (the smallest pool when they differ;
    /// with no config, the committed nats.conf's, which `ferry up` uses).
    slots: u32,
}

fn plan(t: &Target, reg: &Registry) -> anyhow::Result<Plan> {
    let default_conf = t.data_dir.nats_conf();
    let confs = if t.nats_conf.is_empty() {
        default_conf.exists().then_some(default_conf).into_iter().collect()
    } else {
        t.nats_conf.clone()
    };
    let mut slots = None::<u32>;
    for conf in &confs {
        let text = std::fs::read_to_string(conf).with_context(|| format!("reading {}", conf.display()))?;
        reg.splice_into(&text, &conf.display().to_string())?;
        let pool = registry::pool_size(&text, &conf.display().to_string())?;
        slots = Some(slots.map_or(pool, |s| s.min(pool)));
    }
    let slots = slots.unwrap_or(ferry_schema::quota::AGENT_SLOTS);
    let pids = if t.offline || confs.is_empty() { Vec::new() } else { nats_pids(t)? };
    // A node's config may be the given file or one beside it that includes
    // it (the cluster's node-N.conf includes nats.conf).
    let dirs: Vec<_> = confs
        .iter()
        .filter_map(|c| std::fs::canonicalize(c).ok())
        .filter_map(|c| c.parent().map(Path::to_path_buf))
        .collect();
    for pid in &pids {
        if let Some(running_conf) = config_of(*pid) {
            let beside = std::fs::canonicalize(&running_conf).ok().and_then(|c| c.parent().map(Path::to_path_buf));
            if !beside.is_some_and(|d| dirs.contains(&d)) {
                eprintln!(
                    "ferry: warning: nats-server (pid {pid}) runs with {}, not with any --nats-conf given",
                    running_conf.display()
                );
            }
        }
    }
    Ok(Plan { confs, pids, slots })
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
    let groups = t.data_dir.groups();
    registry::write_atomic(&groups, reg.groups_toml()?.as_bytes(), 0o644)?;
    println!("  groups      {} (workers read it with --groups at start)", groups.display());

    if plan.confs.is_empty() {
        println!(
            "  nats.conf   none at {}: `ferry up` writes the agent users at its next start; for another broker pass --nats-conf",
            t.data_dir.nats_conf().display()
        );
        return Ok(Applied { reloaded: false });
    }
    for conf in &plan.confs {
        let text = std::fs::read_to_string(conf).with_context(|| format!("reading {}", conf.display()))?;
        let new = reg.splice_into(&text, &conf.display().to_string())?;
        if new != text {
            registry::write_atomic(conf, new.as_bytes(), 0o644)?;
        }
        println!(
            "  nats.conf   {}: {} agent users in {} agent slots",
            conf.display(),
            reg.active().count(),
            registry::pool_size(&new, &conf.display().to_string())?
        );
    }
    if t.offline {
        println!("  reload      skipped (--offline); copy the file to every node and reload each with: nats-server --signal reload=<pid>");
        return Ok(Applied { reloaded: false });
    }
    if plan.pids.is_empty() {
        println!("  reload      no running nats-server known (no `ferry up` in {}); reload yours with: nats-server --signal reload=<pid>, or pass --nats-pid", t.data_dir.display());
        return Ok(Applied { reloaded: false });
    }
    for &pid in &plan.pids {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGHUP)
            .with_context(|| format!("signalling nats-server (pid {pid}) to reload"))?;
        tracing::info!(pid, "nats-server reload requested");
        println!("  reload      nats-server (pid {pid}) told to reload its configuration");
    }
    Ok(Applied { reloaded: true })
}

/// The nats-servers to reload: every `--nats-pid` (a pid or pid file), or
/// the one `ferry up` started from this data dir, if it runs.
fn nats_pids(t: &Target) -> anyhow::Result<Vec<i32>> {
    if !t.nats_pid.is_empty() {
        return t.nats_pid.iter().map(|given| given_pid(given)).collect();
    }
    let up = t.data_dir.pid_file();
    Ok(crate::down::pids(&up)
        .into_iter()
        .filter(|(what, pid)| what == "nats" && crate::down::running(*pid, "nats-server"))
        .map(|(_, pid)| pid)
        .take(1)
        .collect())
}

/// One `--nats-pid`: a process id, or a file holding one, of a running nats-server.
fn given_pid(given: &str) -> anyhow::Result<i32> {
    {
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
        Ok(pid)
    }
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
    t.conn.or_local_operator(&t.data_dir, name, "pass the operator's credentials, or --offline")
}

/// The connection settings `ferry-agent` uses for `id` with `auth`, to the
/// one node `url`, with the TLS settings of `--tls-ca` etc.
fn agent_conn(t: &Target, url: &str, id: &AgentId, auth: Auth) -> NatsConfig {
    let mut c = t.conn.config(&format!("ferry agent check {id}"));
    c.url = url.to_string();
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

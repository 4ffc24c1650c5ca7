//! `ferry provision`: create or update streams and consumers, and say what changed.

use anyhow::Context as _;
use async_nats::jetstream;
use clap::Args;
use ferry_schema::topology::{self, Change, Provisioned, StreamSettings};
use ferry_schema::AgentId;

use crate::ConnArgs;

#[derive(Debug, Args)]
pub struct ProvisionArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Also create the reply consumer of these agents (repeatable).
    #[arg(long = "agent", value_name = "ID")]
    agents: Vec<String>,
    /// Stream replicas (3 on a 3-node cluster).
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Check the flags and credentials, print what would be provisioned,
    /// and connect to nothing.
    #[arg(long)]
    check: bool,
}

/// One line per stream or consumer: `stream EVENTS: created`.
pub fn describe(report: &[Provisioned]) -> String {
    report
        .iter()
        .map(|p| match &p.change {
            Change::Created => format!("{}: created", p.what),
            Change::Unchanged => format!("{}: unchanged", p.what),
            Change::Updated(fields) => format!("{}: updated ({})", p.what, fields.join(", ")),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// JetStream keeps at most five replicas of a stream.
const MAX_REPLICAS: usize = 5;

/// `--check`: credentials are given (`nats.conf` has no anonymous access)
/// and a credentials file is readable.
fn check_credentials(conn: &ConnArgs) -> anyhow::Result<()> {
    match (&conn.creds, &conn.password) {
        (Some(path), _) => std::fs::metadata(path)
            .map(|_| ())
            .with_context(|| format!("--creds {}", path.display())),
        (None, Some(_)) => Ok(()),
        (None, None) => anyhow::bail!(
            "no password for user {:?}: pass --password or set NATS_PASSWORD (or --creds); the broker has no anonymous access",
            conn.user
        ),
    }
}

/// `--check`: what would be provisioned, or why it could not be.
fn check(args: &ProvisionArgs, agents: &[AgentId]) -> anyhow::Result<String> {
    check_credentials(&args.conn)?;
    let settings = StreamSettings {
        replicas: args.replicas,
        ..Default::default()
    };
    let consumers: usize = topology::Role::ALL.iter().map(|r| r.consumers().len()).sum();
    Ok(format!(
        "ferry provision: ok: {} streams with {} replica(s), {} consumers and {} agent reply consumers on {}",
        topology::all_streams(&settings).len(),
        args.replicas,
        consumers,
        agents.len(),
        args.conn.server
    ))
}

pub async fn run(args: ProvisionArgs) -> anyhow::Result<()> {
    let agents = args
        .agents
        .iter()
        .map(|a| AgentId::new(a.as_str()).context("--agent"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if !(1..=MAX_REPLICAS).contains(&args.replicas) {
        anyhow::bail!("--replicas {}: a stream has 1 to {MAX_REPLICAS} replicas", args.replicas);
    }
    if args.check {
        println!("{}", check(&args, &agents)?);
        return Ok(());
    }
    let client = args.conn.config("ferry provision").connect().await?;
    let js = jetstream::new(client);
    let settings = StreamSettings {
        replicas: args.replicas,
        ..Default::default()
    };
    let report = topology::provision(&js, &settings, &agents).await?;
    println!("{}", describe(&report));
    Ok(())
}

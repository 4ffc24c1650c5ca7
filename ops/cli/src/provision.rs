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

pub async fn run(args: ProvisionArgs) -> anyhow::Result<()> {
    let agents = args
        .agents
        .iter()
        .map(|a| AgentId::new(a.as_str()).context("--agent"))
        .collect::<anyhow::Result<Vec<_>>>()?;
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

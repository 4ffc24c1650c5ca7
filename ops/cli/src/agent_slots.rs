//! `ferry agent slots`: grows the pool of agent accounts in nats.conf (each agent has an account of its own, created at the broker's start).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;

use crate::agent_registry::{self as registry, Registry, RegistryLock};
use crate::data_dir::DataDir;

#[derive(Debug, Args)]
pub struct SlotsArgs {
    /// How many agent slots nats.conf should have (at least every slot
    /// an agent holds).
    pub(crate) count: u32,
    /// Data dir holding the registry (agents.toml).
    #[arg(long, default_value = crate::data_dir::DEFAULT)]
    data_dir: DataDir,
    /// nats.conf to rewrite; repeat it for each node's copy. Default:
    /// <data-dir>/nats/nats.conf, which `ferry up` sizes itself at start.
    #[arg(long, env = "FERRY_NATS_CONF", value_delimiter = ',')]
    nats_conf: Vec<PathBuf>,
}

pub fn run(args: &SlotsArgs) -> anyhow::Result<()> {
    let _lock = RegistryLock::take(&args.data_dir)?;
    let mut reg = Registry::load(&args.data_dir.registry())?;
    let confs = if args.nats_conf.is_empty() { vec![args.data_dir.nats_conf()] } else { args.nats_conf.clone() };
    let mut texts = Vec::new();
    for conf in &confs {
        let text = std::fs::read_to_string(conf).with_context(|| format!("reading {}", conf.display()))?;
        let new = reg.splice_grown(&text, &conf.display().to_string(), args.count)?;
        texts.push((conf, registry::pool_size(&text, &conf.display().to_string())?, new));
    }
    for (conf, was, new) in texts {
        registry::write_atomic(conf, new.as_bytes(), 0o644)?;
        println!("  nats.conf   {}: {was} -> {} agent slots", conf.display(), args.count);
    }
    // The restart that must follow also frees the retired slots.
    if !reg.retired.is_empty() {
        println!("  registry    {} retired slots free again after the restart", reg.retired.len());
        reg.clear_retired();
        reg.save(&args.data_dir.registry())?;
    }
    let needed = u64::from(args.count) * u64::from(ferry_schema::quota::AGENT_MAX_CONNECTIONS)
        + u64::from(ferry_schema::quota::WORKER_CONNECTIONS);
    if needed > u64::from(ferry_schema::quota::SERVER_MAX_CONNECTIONS) {
        eprintln!(
            "ferry: warning: {} slots x {} connections + {} for the workers is {needed}, over the server's max_connections ({}): raise it in nats.conf, or agents together could lock the workers out",
            args.count,
            ferry_schema::quota::AGENT_MAX_CONNECTIONS,
            ferry_schema::quota::WORKER_CONNECTIONS,
            ferry_schema::quota::SERVER_MAX_CONNECTIONS
        );
    }
    println!();
    println!("Now restart nats-server (each node of a cluster, one at a time): a reload gives the new");
    println!("accounts no working imports, so agents added into them could not publish until then.");
    Ok(())
}


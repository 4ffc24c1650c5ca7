//! `ferry bench ...`: benchmarks that run their baseline in the same run and print the ratio.
//!
//! # Layout
//!
//! - [`rules`]: a raw JetStream round trip against the agent and the rules
//!   worker as production runs them (spool, drainer, live replies).
//! - [`inference`]: llama.cpp against mistral.rs in-process against the
//!   inference worker end to end.
//! - [`archiver`]: raw `COPY` against the archiver consuming from JetStream.
//! - [`agent`]: the agent's footprint, spool write rate and drain rate
//!   against absolute targets.
//! - [`dashboard`]: the pipeline under load without and with a dashboard
//!   and a browser on its page (built with the `harness` feature).
//! - [`common`]: what they share: medians, verdicts, CPU time from `/proc`.

mod agent;
mod archiver;
mod common;
#[cfg(feature = "harness")]
mod dashboard;
mod inference;
mod rules;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Raw JetStream round trip vs the real agent + rules worker.
    Rules(rules::RulesBench),
    /// llama.cpp vs mistral.rs in-process vs the inference worker end to end.
    Inference(inference::InferenceBench),
    /// Raw COPY into the events table vs the archiver from JetStream.
    Archiver(archiver::ArchiverBench),
    /// The agent's RSS and CPU at 1 event/s, spool write rate, drain rate after an outage.
    Agent(agent::AgentBench),
    /// The dashboard's CPU per event, memory and publish-to-page delay under simulated agents.
    #[cfg(feature = "harness")]
    Dashboard(dashboard::DashboardBench),
}

pub async fn run(cmd: BenchCmd) -> anyhow::Result<()> {
    match cmd {
        BenchCmd::Rules(args) => rules::run(args).await,
        BenchCmd::Inference(args) => inference::run(args).await,
        BenchCmd::Archiver(args) => archiver::run(args).await,
        BenchCmd::Agent(args) => agent::run(args).await,
        #[cfg(feature = "harness")]
        BenchCmd::Dashboard(args) => dashboard::run(args).await,
    }
}

//! Registers a worker as a NATS micro service (`nats micro ls/stats/info`).

use std::sync::Arc;

use async_nats::service::{Service, ServiceExt};
use ferry_schema::subject;
use futures::StreamExt;
use serde::Serialize;

use super::Stats;

pub use ferry_schema::subject::service_name;

/// What the status endpoint and the stats `data` field report.
#[derive(Debug, Serialize)]
struct Status<'a> {
    role: &'a str,
    version: &'a str,
    /// What the role loaded at start (rules, models).
    info: &'a serde_json::Value,
    #[serde(flatten)]
    stats: super::StatsSnapshot,
    /// Each consume loop of the role in this process: bound or re-binding.
    loops: Vec<crate::metrics::LoopState>,
}

/// Starts the micro service of one replica of `role`. It has one endpoint,
/// `status` on `ferry.svc.<role>.status`, answering with `info` (what the
/// replica loaded at start), its counters and the state of each of its
/// consume loops, and reports the same as `data` in `nats micro stats`.
/// The returned service must be kept alive; stop it on shutdown.
pub async fn register(
    client: &async_nats::Client,
    role: &'static str,
    description: &str,
    info: serde_json::Value,
    stats: Arc<Stats>,
) -> Result<Service, async_nats::Error> {
    let version = env!("CARGO_PKG_VERSION");
    let info = Arc::new(info);
    let for_stats = stats.clone();
    let info_for_stats = info.clone();
    let service = client
        .service_builder()
        .description(description)
        .stats_handler(move |_endpoint, _| {
            serde_json::to_value(Status {
                role,
                version,
                info: &info_for_stats,
                stats: for_stats.snapshot(),
                loops: crate::metrics::global().loop_states(role),
            })
            .unwrap_or_default()
        })
        .start(service_name(role), version)
        .await?;
    let mut status = service
        .endpoint_builder()
        .name("status")
        .add(subject::service_status(role).to_string())
        .await?;
    tokio::spawn(async move {
        while let Some(request) = status.next().await {
            let body = serde_json::to_vec(&Status {
                role,
                version,
                info: &info,
                stats: stats.snapshot(),
                loops: crate::metrics::global().loop_states(role),
            })
            .unwrap_or_default();
            if let Err(error) = request.respond(Ok(body.into())).await {
                tracing::debug!(%error, "status reply failed");
            }
        }
    });
    Ok(service)
}

//! Registers a worker as a NATS micro service (`nats micro ls/stats/info`).

use std::sync::Arc;

use async_nats::service::{Service, ServiceExt};
use ferry_schema::subject;
use futures::StreamExt;
use ferry_schema::status::WorkerStatus;

use super::Stats;

pub use ferry_schema::subject::service_name;

/// What the status endpoint and the stats `data` field report, now.
fn status_now(role: &str, version: &str, info: &serde_json::Value, stats: &Stats) -> WorkerStatus {
    WorkerStatus {
        role: role.to_string(),
        version: version.to_string(),
        info: info.clone(),
        counters: stats.snapshot(),
        loops: stats.loop_states(),
    }
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
            serde_json::to_value(status_now(role, version, &info_for_stats, &for_stats)).unwrap_or_default()
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
            let body = serde_json::to_vec(&status_now(role, version, &info, &stats)).unwrap_or_default();
            if let Err(error) = request.respond(Ok(body.into())).await {
                tracing::debug!(%error, "status reply failed");
            }
        }
    });
    Ok(service)
}

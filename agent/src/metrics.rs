//! The agent's Prometheus metrics and their endpoint; the names are in `ferry_schema::metrics`.
//!
//! Off by default (`run --metrics-listen 127.0.0.1:9470`): a desk PC is
//! usually watched through its heartbeat, and a fleet's operator may want a
//! scrape on the few that misbehave.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::health::Health;
use crate::spool::Spool;

use ferry_schema::metrics::{
    AGENT_COMPONENT_UP as COMPONENT_UP, AGENT_PUBLISHED as PUBLISHED, AGENT_REPLIES as REPLIES,
    AGENT_REPLIES_REFUSED as REPLIES_REFUSED,
    AGENT_SPOOL_BYTES as SPOOL_BYTES, AGENT_SPOOL_DROPPED as SPOOL_DROPPED, AGENT_SPOOL_EVENTS as SPOOL_EVENTS,
    AGENT_SPOOL_OLDEST_SECONDS as SPOOL_OLDEST_SECONDS,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ComponentLabel {
    component: String,
}

/// Counters the run loop moves; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Counts {
    published: Arc<AtomicU64>,
    replies: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
}

impl Counts {
    /// One more event acknowledged.
    pub fn published(&self) {
        self.published.fetch_add(1, Ordering::Relaxed);
    }

    /// One more reply acted on.
    pub fn reply(&self) {
        self.replies.fetch_add(1, Ordering::Relaxed);
    }

    /// One more reply dropped unread (another agent's, or undecodable).
    pub fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Replies dropped unread so far.
    pub fn refused_so_far(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Events acknowledged so far.
    pub fn published_so_far(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    /// Replies acted on so far.
    pub fn replies_so_far(&self) -> u64 {
        self.replies.load(Ordering::Relaxed)
    }
}

/// Renders the metrics text from the live state.
fn render(spool: &Spool, health: &Health, counts: &Counts) -> String {
    let mut registry = Registry::default();
    let depth = spool.depth();
    let gauge = |v: i64| {
        let g = Gauge::<i64>::default();
        g.set(v);
        g
    };
    let counter = |v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        c
    };
    let oldest = depth
        .oldest_ts_ms
        .map_or(0, |t| ((chrono::Utc::now().timestamp_millis() - t) / 1000).max(0));
    registry.register(SPOOL_EVENTS, "Events in the spool, waiting for JetStream", gauge(depth.events as i64));
    registry.register(SPOOL_BYTES, "Bytes of sealed records in the spool", gauge(depth.bytes as i64));
    registry.register(SPOOL_OLDEST_SECONDS, "Age of the oldest unsent event", gauge(oldest));
    registry.register(SPOOL_DROPPED, "Events deleted unsent because the spool was full", counter(depth.dropped));
    registry.register(PUBLISHED, "Events JetStream acknowledged", counter(counts.published_so_far()));
    registry.register(REPLIES, "Replies acted on", counter(counts.replies_so_far()));
    registry.register(
        REPLIES_REFUSED,
        "Replies dropped unread: addressed to another agent, or undecodable",
        counter(counts.refused_so_far()),
    );
    let up = Family::<ComponentLabel, Gauge<i64>>::default();
    for c in health.snapshot() {
        up.get_or_create(&ComponentLabel { component: c.name }).set(i64::from(c.ok));
    }
    registry.register(COMPONENT_UP, "1 when the component is fine", up);
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// The endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("metrics endpoint {addr}: {reason}")]
pub struct MetricsError {
    /// The address.
    pub addr: SocketAddr,
    /// Why.
    pub reason: String,
}

/// A running endpoint; stops when dropped.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    addr: SocketAddr,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer").field("addr", &self.addr).finish()
    }
}

impl MetricsServer {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.server.unblock();
    }
}

/// Serves `/metrics` on `addr` from a thread of its own.
pub fn serve(addr: SocketAddr, spool: Spool, health: Health, counts: Counts) -> Result<MetricsServer, MetricsError> {
    let server = Arc::new(tiny_http::Server::http(addr).map_err(|e| MetricsError {
        addr,
        reason: e.to_string(),
    })?);
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| MetricsError { addr, reason: "not an IP address".into() })?;
    let srv = server.clone();
    std::thread::Builder::new()
        .name("ferry-agent-metrics".into())
        .spawn(move || {
            for request in srv.incoming_requests() {
                let response = if request.url() == "/metrics" {
                    let mut r = tiny_http::Response::from_string(render(&spool, &health, &counts));
                    if let Ok(h) = tiny_http::Header::from_bytes(
                        ferry_schema::headers::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    ) {
                        r.add_header(h);
                    }
                    r
                } else {
                    tiny_http::Response::from_string("ferry-agent serves Prometheus metrics at /metrics\n")
                        .with_status_code(404)
                };
                if let Err(error) = request.respond(response) {
                    tracing::debug!(%error, "metrics response failed");
                }
            }
        })
        .map_err(|e| MetricsError {
            addr,
            reason: e.to_string(),
        })?;
    Ok(MetricsServer { server, addr: bound })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_and_values() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(crate::spool::SpoolConfig::new(dir.path())).unwrap();
        let health = Health::default();
        health.set("broker", false, Some("down".into()));
        let counts = Counts::default();
        counts.published();
        counts.published();
        let text = render(&spool, &health, &counts);
        for expected in [
            "ferry_agent_spool_events 0",
            "ferry_agent_published_total 2",
            "ferry_agent_replies_total 0",
            "ferry_agent_component_up{component=\"broker\"} 0",
        ] {
            assert!(text.contains(expected), "{expected} missing from {text}");
        }
    }
}

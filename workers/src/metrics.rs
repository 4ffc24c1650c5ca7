//! The workers' Prometheus metrics and the HTTP endpoint that serves them; the
//! names (and what each means) are in `ferry_schema::metrics`.
//!
//! Metrics live in one process-wide registry ([`global`]). `ferry-worker`
//! runs one replica of one role per process; tests run several, told apart
//! by `role` and `replica` (the replica's number in its process, `0` in a
//! deployment). A replica's series are also its micro-service counters
//! ([`crate::runtime::Stats`] reads them): one store for both.

use std::net::SocketAddr;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

pub use ferry_schema::metrics::{
    WORKER_ACK_FAILURES as ACK_FAILURES, WORKER_BUSY_SECONDS as BUSY_SECONDS, WORKER_CONSUMER_ACK_PENDING as CONSUMER_ACK_PENDING,
    WORKER_CONSUMER_PENDING as CONSUMER_PENDING, WORKER_CONSUMER_REDELIVERED as CONSUMER_REDELIVERED,
    WORKER_HANDLING_SECONDS as HANDLING_SECONDS, WORKER_IN_FLIGHT as IN_FLIGHT, WORKER_LOOP_UP as LOOP_UP, WORKER_MESSAGES as MESSAGES,
    WORKER_MODEL_TOKENS as MODEL_TOKENS,
};

/// The `/metrics` content type (OpenMetrics text, which Prometheus reads).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels of a consume loop's metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoopLabels {
    /// Worker role.
    pub role: String,
    /// Durable consumer.
    pub consumer: String,
    /// The replica's number in this process.
    pub replica: String,
}

/// Labels of what the broker says of a consumer (the same for every replica).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabels {
    /// Worker role.
    pub role: String,
    /// Durable consumer.
    pub consumer: String,
}

/// Labels of [`MESSAGES`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// Worker role.
    pub role: String,
    /// Durable consumer.
    pub consumer: String,
    /// The replica's number in this process.
    pub replica: String,
    /// `done`, `retry` or `poison`.
    pub outcome: &'static str,
}

/// Labels of [`MODEL_TOKENS`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    /// Worker role.
    pub role: String,
    /// Model alias.
    pub model: String,
    /// The replica's number in this process.
    pub replica: String,
}

type HistogramFamily = Family<LoopLabels, Histogram, fn() -> Histogram>;

/// The process's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    messages: Family<OutcomeLabels, Counter>,
    handling: HistogramFamily,
    busy: Family<LoopLabels, Counter<f64, AtomicU64>>,
    in_flight: Family<LoopLabels, Gauge>,
    ack_failures: Family<LoopLabels, Counter>,
    tokens: Family<ModelLabels, Counter>,
    pending: Family<ConsumerLabels, Gauge>,
    ack_pending: Family<ConsumerLabels, Gauge>,
    redelivered: Family<ConsumerLabels, Gauge>,
    up: Family<LoopLabels, Gauge>,
    /// Each consume loop's state, for `/health`.
    loops: Arc<Mutex<BTreeMap<LoopKey, bool>>>,
    /// Replicas numbered so far, per role.
    replicas: Mutex<BTreeMap<String, u32>>,
}

/// A consume loop: role, consumer, replica.
type LoopKey = (String, String, String);

fn handling_histogram() -> Histogram {
    // 0.25 ms .. ~8 s: rules and the archiver answer in milliseconds,
    // inference in seconds.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let messages = Family::<OutcomeLabels, Counter>::default();
        registry.register(MESSAGES, "Messages handled, by outcome", messages.clone());
        let handling: HistogramFamily = Family::new_with_constructor(handling_histogram);
        registry.register(HANDLING_SECONDS, "Seconds from delivery to the ack decision", handling.clone());
        let busy = Family::<LoopLabels, Counter<f64, AtomicU64>>::default();
        registry.register(BUSY_SECONDS, "Seconds spent handling messages, summed over messages", busy.clone());
        let in_flight = Family::<LoopLabels, Gauge>::default();
        registry.register(IN_FLIGHT, "Messages being handled now", in_flight.clone());
        let ack_failures = Family::<LoopLabels, Counter>::default();
        registry.register(ACK_FAILURES, "Acks that did not reach the broker", ack_failures.clone());
        let tokens = Family::<ModelLabels, Counter>::default();
        registry.register(MODEL_TOKENS, "Tokens generated", tokens.clone());
        let pending = Family::<ConsumerLabels, Gauge>::default();
        registry.register(CONSUMER_PENDING, "Messages the consumer has not delivered yet (lag)", pending.clone());
        let ack_pending = Family::<ConsumerLabels, Gauge>::default();
        registry.register(CONSUMER_ACK_PENDING, "Messages delivered and not yet acknowledged", ack_pending.clone());
        let redelivered = Family::<ConsumerLabels, Gauge>::default();
        registry.register(CONSUMER_REDELIVERED, "Messages redelivered and not yet acknowledged", redelivered.clone());
        let up = Family::<LoopLabels, Gauge>::default();
        registry.register(LOOP_UP, "1 while the consume loop is bound to its consumer, 0 while it gets it back", up.clone());
        Self {
            registry,
            messages,
            handling,
            busy,
            in_flight,
            ack_failures,
            tokens,
            pending,
            ack_pending,
            redelivered,
            up,
            loops: Arc::default(),
            replicas: Mutex::default(),
        }
    }

    /// The next replica number of `role` in this process: `0`, `1`, ...
    pub fn next_replica(&self, role: &str) -> String {
        let mut replicas = self.replicas.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let next = replicas.entry(role.to_string()).or_insert(0);
        let this = *next;
        *next += 1;
        this.to_string()
    }

    /// The handles one consume loop of a replica updates.
    pub fn for_loop(&self, role: &str, consumer: &str, replica: &str) -> LoopMetrics {
        let l = LoopLabels {
            role: role.to_string(),
            consumer: consumer.to_string(),
            replica: replica.to_string(),
        };
        let c = ConsumerLabels {
            role: role.to_string(),
            consumer: consumer.to_string(),
        };
        let outcome = |outcome| OutcomeLabels {
            role: role.to_string(),
            consumer: consumer.to_string(),
            replica: replica.to_string(),
            outcome,
        };
        LoopMetrics {
            done: self.messages.get_or_create_owned(&outcome("done")),
            retry: self.messages.get_or_create_owned(&outcome("retry")),
            poison: self.messages.get_or_create_owned(&outcome("poison")),
            handling: self.handling.get_or_create_owned(&l),
            busy: self.busy.get_or_create_owned(&l),
            in_flight: self.in_flight.get_or_create_owned(&l),
            ack_failures: self.ack_failures.get_or_create_owned(&l),
            pending: self.pending.get_or_create_owned(&c),
            ack_pending: self.ack_pending.get_or_create_owned(&c),
            redelivered: self.redelivered.get_or_create_owned(&c),
            up: self.up.get_or_create_owned(&l),
            loops: self.loops.clone(),
            key: (role.to_string(), consumer.to_string(), replica.to_string()),
        }
    }

    /// The counter of tokens a replica of `role` generated with `model`.
    pub fn tokens(&self, role: &str, model: &str, replica: &str) -> Counter {
        self.tokens.get_or_create_owned(&ModelLabels {
            role: role.to_string(),
            model: model.to_string(),
            replica: replica.to_string(),
        })
    }

    /// `/health`: whether every consume loop of this process is bound to
    /// its consumer (none yet: starting), as a status and a JSON body
    /// listing each loop.
    pub fn health(&self) -> (bool, String) {
        let loops = self.loops.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let healthy = !loops.is_empty() && loops.values().all(|up| *up);
        let list: Vec<serde_json::Value> = loops
            .iter()
            .map(|((role, consumer, replica), up)| serde_json::json!({"role": role, "consumer": consumer, "replica": replica, "up": up}))
            .collect();
        let status = match (healthy, loops.is_empty()) {
            (true, _) => "ok",
            (false, true) => "starting",
            (false, false) => "degraded",
        };
        (healthy, serde_json::json!({"status": status, "loops": list}).to_string())
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Whether one consume loop is bound to its consumer and pulling (part of
/// the worker's status, in `schema`).
pub use ferry_schema::status::LoopState;

/// One consume loop's metric handles (cheap clones of shared atomics).
#[derive(Debug, Clone)]
pub struct LoopMetrics {
    pub(crate) done: Counter,
    pub(crate) retry: Counter,
    pub(crate) poison: Counter,
    pub(crate) handling: Histogram,
    pub(crate) busy: Counter<f64, AtomicU64>,
    pub(crate) in_flight: Gauge,
    pub(crate) ack_failures: Counter,
    pub(crate) pending: Gauge,
    pub(crate) ack_pending: Gauge,
    pub(crate) redelivered: Gauge,
    up: Gauge,
    loops: Arc<Mutex<BTreeMap<LoopKey, bool>>>,
    key: LoopKey,
}

impl LoopMetrics {
    /// The consumer this loop pulls from.
    pub(crate) fn consumer(&self) -> &str {
        &self.key.1
    }

    /// Whether the loop is bound to its consumer and pulling.
    pub(crate) fn is_up(&self) -> bool {
        self.up.get() == 1
    }

    /// Records whether the loop is bound to its consumer and pulling.
    pub(crate) fn set_up(&self, up: bool) {
        self.up.set(i64::from(up));
        self.loops.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(self.key.clone(), up);
    }
}

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {reason}")]
pub struct ServeError {
    /// The address asked for.
    pub addr: SocketAddr,
    /// What went wrong.
    pub reason: String,
}

/// A running metrics endpoint; dropping it stops it.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    addr: SocketAddr,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl MetricsServer {
    /// The address it listens on (the port chosen when asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves [`global`] metrics at `http://addr/metrics`, and at `/health` 200
/// when every consume loop is bound to its consumer (503 otherwise), on a
/// thread of its own (a scrape never waits on the workers' runtime, nor they
/// on it).
pub fn serve(addr: SocketAddr) -> Result<MetricsServer, ServeError> {
    let server = tiny_http::Server::http(addr).map_err(|e| ServeError {
        addr,
        reason: e.to_string(),
    })?;
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| ServeError {
            addr,
            reason: "not an IP listener".into(),
        })?;
    let server = Arc::new(server);
    let s = server.clone();
    let thread = std::thread::Builder::new()
        .name("ferry-metrics".into())
        .spawn(move || {
            for request in s.incoming_requests() {
                let response = if request.url() == "/metrics" || request.url().starts_with("/metrics?") {
                    let header = tiny_http::Header::from_bytes(ferry_schema::headers::CONTENT_TYPE, CONTENT_TYPE).ok();
                    let mut r = tiny_http::Response::from_string(global().encode());
                    if let Some(h) = header {
                        r.add_header(h);
                    }
                    r
                } else if request.url() == "/health" {
                    let (healthy, body) = global().health();
                    tiny_http::Response::from_string(body).with_status_code(if healthy { 200 } else { 503 })
                } else {
                    tiny_http::Response::from_string("Ferry serves Prometheus metrics at /metrics and its consume loops' state at /health\n")
                        .with_status_code(404)
                };
                if let Err(error) = request.respond(response) {
                    tracing::debug!(%error, "metrics response failed");
                }
            }
        })
        .map_err(|e| ServeError {
            addr,
            reason: e.to_string(),
        })?;
    tracing::info!(addr = %bound, "serving Prometheus metrics at /metrics");
    Ok(MetricsServer {
        server,
        addr: bound,
        thread: Some(thread),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels_in_the_text_format() {
        let replica = global().next_replica("test-role");
        assert_eq!(replica, "0");
        assert_eq!(global().next_replica("test-role"), "1");
        let m = global().for_loop("test-role", "test-consumer", &replica);
        m.done.inc();
        m.handling.observe(0.003);
        m.busy.inc_by(0.003);
        m.pending.set(4);
        global().tokens("test-role", "smol", &replica).inc_by(7);
        let text = global().encode();
        assert!(
            text.contains(r#"ferry_worker_messages_total{role="test-role",consumer="test-consumer",replica="0",outcome="done"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"ferry_worker_handling_seconds_count{role="test-role",consumer="test-consumer",replica="0"} 1"#), "{text}");
        assert!(text.contains(r#"ferry_worker_busy_seconds_total{role="test-role",consumer="test-consumer",replica="0"} 0.003"#), "{text}");
        assert!(text.contains(r#"ferry_worker_model_tokens_total{role="test-role",model="smol",replica="0"} 7"#), "{text}");
        // What the broker says of a consumer is one series, whichever replica asked.
        assert!(text.contains(r#"ferry_worker_consumer_pending{role="test-role",consumer="test-consumer"} 4"#), "{text}");
    }
}

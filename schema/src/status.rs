//! A worker replica's status: what its micro service answers on `ferry.svc.<role>.status` and reports as `nats micro stats` data, and what `ferry stats` reads.

use serde::{Deserialize, Serialize};

/// One replica's status. Written by the worker runtime, read by `ferry
/// stats` and by anyone with the `nats` CLI (`nats micro stats ferry-rules`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// The role (`rules`, `inference`, `archiver`).
    pub role: String,
    /// The worker's version.
    pub version: String,
    /// What the replica loaded at start (rules, models, batch sizes).
    #[serde(default)]
    pub info: serde_json::Value,
    /// Its counters since start.
    #[serde(flatten)]
    pub counters: Counters,
    /// Each consume loop of the replica: bound or re-binding.
    #[serde(default)]
    pub loops: Vec<LoopState>,
}

/// A replica's counters since it started. Every field defaults to zero
/// when absent, so an older worker's status still reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counters {
    /// Messages handled and acked.
    pub done: u64,
    /// Messages nak'ed for a later retry.
    pub retried: u64,
    /// Messages dead-lettered.
    pub poisoned: u64,
    /// Acks that failed to reach the broker (the message will be redelivered).
    pub ack_failures: u64,
    /// Messages being handled now.
    pub in_flight: u64,
    /// Mean handling time, milliseconds.
    pub avg_processing_ms: f64,
    /// Tokens generated (inference).
    pub tokens: u64,
    /// Tokens generated per second of handling time (inference).
    pub tokens_per_s: f64,
}

/// A replica's answer to `$SRV.STATS` (`nats micro stats`), as far as
/// `ferry stats` reads it: the service's name and id, and Ferry's status in
/// each endpoint's `data`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ServiceStats {
    /// The service (`ferry-rules`).
    pub name: String,
    /// This replica's id.
    pub id: String,
    /// Its endpoints.
    #[serde(default)]
    pub endpoints: Vec<EndpointStats>,
}

/// One endpoint of a [`ServiceStats`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EndpointStats {
    /// The replica's status (absent from services that are not Ferry's).
    #[serde(default)]
    pub data: Option<WorkerStatus>,
}

impl ServiceStats {
    /// The replica's status, from the first endpoint that has one.
    pub fn status(&self) -> Option<&WorkerStatus> {
        self.endpoints.iter().find_map(|e| e.data.as_ref())
    }
}

/// One consume loop of a replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoopState {
    /// The durable consumer it reads.
    pub consumer: String,
    /// Bound and pulling (false while it re-binds).
    pub up: bool,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_status_reads_back_as_written_with_its_counters_at_the_top_level() {
        let s = WorkerStatus {
            role: "rules".into(),
            version: "0.1.0".into(),
            info: serde_json::json!({ "rules": 3 }),
            counters: Counters { done: 7, poisoned: 1, avg_processing_ms: 0.5, ..Counters::default() },
            loops: vec![LoopState { consumer: "rules".into(), up: true }],
        };
        let v = serde_json::to_value(&s).unwrap();
        // The `nats` CLI shows these keys as they are: flat, not nested.
        assert_eq!(v["done"], 7);
        assert_eq!(v["loops"][0]["consumer"], "rules");
        let back: WorkerStatus = serde_json::from_value(v).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn missing_counters_read_as_zero() {
        let s: WorkerStatus = serde_json::from_str(r#"{"role":"archiver","version":"0.0.9","done":4}"#).unwrap();
        assert_eq!(s.counters.done, 4);
        assert_eq!(s.counters.retried, 0);
        assert!(s.loops.is_empty());
    }
}

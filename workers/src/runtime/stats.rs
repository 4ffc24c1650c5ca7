//! Counters a worker keeps about its own work, served by its micro service.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Counters shared by a worker's tasks (lock-free).
#[derive(Debug, Default)]
pub struct Stats {
    done: AtomicU64,
    retried: AtomicU64,
    poisoned: AtomicU64,
    ack_failures: AtomicU64,
    in_flight: AtomicU64,
    busy_nanos: AtomicU64,
    tokens: AtomicU64,
}

/// A point-in-time copy of [`Stats`], as JSON for `nats micro stats`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StatsSnapshot {
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

impl Stats {
    pub(crate) fn start(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn finish(&self, outcome: &super::Outcome, elapsed: std::time::Duration) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let counter = match outcome {
            super::Outcome::Done => &self.done,
            super::Outcome::RetryAfter { .. } => &self.retried,
            super::Outcome::Poison { .. } => &self.poisoned,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.busy_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Counts `n` generated tokens.
    pub fn add_tokens(&self, n: u64) {
        self.tokens.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn ack_failed(&self) {
        self.ack_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Copies the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        let done = self.done.load(Ordering::Relaxed);
        let retried = self.retried.load(Ordering::Relaxed);
        let poisoned = self.poisoned.load(Ordering::Relaxed);
        let handled = done + retried + poisoned;
        let busy = self.busy_nanos.load(Ordering::Relaxed);
        let tokens = self.tokens.load(Ordering::Relaxed);
        StatsSnapshot {
            done,
            retried,
            poisoned,
            ack_failures: self.ack_failures.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            avg_processing_ms: if handled == 0 {
                0.0
            } else {
                busy as f64 / handled as f64 / 1e6
            },
            tokens,
            tokens_per_s: if busy == 0 {
                0.0
            } else {
                tokens as f64 / (busy as f64 / 1e9)
            },
        }
    }
}

//! The topology's tests: the definitions against the broker's limits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use async_nats::jetstream::stream::DiscardPolicy;

use super::{all_streams, events_stream, work_stream, StreamSettings};

/// Every stream is bounded in bytes and age, together within the
/// broker's file store (nats.conf's `max_file_store: 20GB`, read in
/// decimal gigabytes, the smaller reading), and the work queue refuses
/// new hand-offs rather than evicting unprocessed ones (the events do
/// where the server enforces quotas: `crate::quota`'s tests).
#[test]
fn every_stream_is_bounded_and_all_fit_the_broker_store() {
    let s = StreamSettings::default();
    let mut total = 0i64;
    for c in all_streams(&s) {
        assert!(c.max_bytes > 0, "{} has no byte cap", c.name);
        assert!(c.max_age > Duration::ZERO, "{} has no age cap", c.name);
        total += c.max_bytes;
    }
    let conf = include_str!("../../../nats.conf");
    assert!(conf.contains("max_file_store: 20GB"));
    assert!(total <= 20_000_000_000, "{total} bytes of streams in a 20 GB store");
    assert_eq!(work_stream(&s).discard, DiscardPolicy::New);
    assert_eq!(events_stream(&s).discard, DiscardPolicy::Old);
}

/// A consumer-lag alert names a worker consumer by its durable name alone
/// (the scope's value), so no two of them share one.
#[test]
fn worker_consumer_names_are_unique_across_streams() {
    let names: Vec<String> = super::worker_consumers().iter().map(|d| d.name().to_string()).collect();
    let mut unique = names.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), names.len(), "{names:?}");
    assert!(names.iter().all(|n| !n.is_empty()), "{names:?}");
}

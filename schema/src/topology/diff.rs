//! What provisioning compares: the fields of a stream or consumer as the broker has them and as wanted.
//!
//! Each differing field becomes one `field: old -> new` line of the report;
//! fields the server fills in or normalises (no limit as 0 or -1, replicas
//! 0 or 1) compare by meaning.

use async_nats::jetstream::consumer::{self, pull};
use async_nats::jetstream::stream;

/// `name: have -> want` for each pair that differs.
fn diff_fields(pairs: &[(&str, String, String)]) -> Vec<String> {
    pairs
        .iter()
        .filter(|(_, have, want)| have != want)
        .map(|(name, have, want)| format!("{name}: {have} -> {want}"))
        .collect()
}

/// A stream's republish setting in a report line.
fn republish_text(r: Option<&stream::Republish>) -> String {
    match r {
        None => "none".into(),
        Some(r) => format!("{} -> {}{}", r.source, r.destination, if r.headers_only { " (headers only)" } else { "" }),
    }
}

/// The fields of stream `have` that differ from `want`.
pub(super) fn stream_diff(have: &stream::Config, want: &stream::Config) -> Vec<String> {
    diff_fields(&[
        (
            "subjects",
            format!("{:?}", have.subjects),
            format!("{:?}", want.subjects),
        ),
        (
            "republish",
            republish_text(have.republish.as_ref()),
            republish_text(want.republish.as_ref()),
        ),
        (
            "retention",
            format!("{:?}", have.retention),
            format!("{:?}", want.retention),
        ),
        (
            "storage",
            format!("{:?}", have.storage),
            format!("{:?}", want.storage),
        ),
        (
            "max_age",
            format!("{:?}", have.max_age),
            format!("{:?}", want.max_age),
        ),
        (
            "max_bytes",
            have.max_bytes.to_string(),
            want.max_bytes.to_string(),
        ),
        (
            "duplicate_window",
            format!("{:?}", have.duplicate_window),
            format!("{:?}", want.duplicate_window),
        ),
        (
            "max_message_size",
            have.max_message_size.to_string(),
            want.max_message_size.to_string(),
        ),
        (
            "discard",
            format!("{:?}", have.discard),
            format!("{:?}", want.discard),
        ),
        (
            "max_msgs_per_subject",
            // 0 and -1 both mean no limit.
            if have.max_messages_per_subject > 0 { have.max_messages_per_subject } else { -1 }.to_string(),
            if want.max_messages_per_subject > 0 { want.max_messages_per_subject } else { -1 }.to_string(),
        ),
        (
            "discard_new_per_subject",
            have.discard_new_per_subject.to_string(),
            want.discard_new_per_subject.to_string(),
        ),
        (
            "num_replicas",
            have.num_replicas.max(1).to_string(),
            want.num_replicas.max(1).to_string(),
        ),
    ])
}

/// The fields of consumer `have` that differ from `want`.
pub(super) fn consumer_diff(have: &consumer::Config, want: &pull::Config) -> Vec<String> {
    diff_fields(&[
        (
            "filter_subject",
            have.filter_subject.clone(),
            want.filter_subject.clone(),
        ),
        (
            "deliver_policy",
            format!("{:?}", have.deliver_policy),
            format!("{:?}", want.deliver_policy),
        ),
        (
            "ack_policy",
            format!("{:?}", have.ack_policy),
            format!("{:?}", want.ack_policy),
        ),
        (
            "ack_wait",
            format!("{:?}", have.ack_wait),
            format!("{:?}", want.ack_wait),
        ),
        (
            "max_deliver",
            have.max_deliver.to_string(),
            want.max_deliver.to_string(),
        ),
        (
            "max_ack_pending",
            have.max_ack_pending.to_string(),
            want.max_ack_pending.to_string(),
        ),
        (
            "backoff",
            format!("{:?}", have.backoff),
            format!("{:?}", want.backoff),
        ),
    ])
}

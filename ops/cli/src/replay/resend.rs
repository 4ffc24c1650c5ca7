//! `ferry replay --to`: the selected messages published again, paced, on a debug subject that no stream stores.

use std::time::{Duration, Instant};

use anyhow::bail;
use async_nats::jetstream;
use ferry_schema::subject;

use super::print::{bar, summary};
use super::select::{read, Selection};

/// Publishes the selected messages, headers and payload as stored, on `to`
/// at `rate` per second (0: as fast as the broker takes them). A subject one
/// of Ferry's streams stores is refused: the replay would reach workers or
/// agents.
pub(super) async fn resend(
    client: &async_nats::Client,
    js: &jetstream::Context,
    sel: &Selection,
    to: &str,
    rate: u32,
    quiet: bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    if subject::is_stored(to) {
        bail!("--to {to:?}: one of Ferry's streams stores that subject, so the replay would reach workers or agents; pick a debug subject such as {}", subject::replay_debug());
    }
    let pb = bar(quiet, 0, "sending");
    // Paced by deadlines, not a shared timer: message i goes out at
    // start + i / rate.
    let period = (rate > 0).then(|| Duration::from_secs_f64(1.0 / f64::from(rate)));
    let mut next_at = tokio::time::Instant::now();
    let target = async_nats::Subject::from(to);
    let (n, ended) = read(client, js, sel, &pb, |msg| {
        let client = client.clone();
        let target = target.clone();
        let at = next_at;
        if let Some(p) = period {
            next_at += p;
        }
        async move {
            tokio::time::sleep_until(at).await;
            let h = msg.headers.unwrap_or_default();
            client.publish_with_headers(target, h, msg.payload).await?;
            Ok(())
        }
    })
    .await?;
    client.flush().await?;
    pb.finish_and_clear();
    summary(&format!("sent to {to}"), n, ended, started);
    Ok(())
}

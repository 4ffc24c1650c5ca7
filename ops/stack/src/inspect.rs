//! Reading what a stream holds: for tests, the demo and benchmarks.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use futures::StreamExt;

/// Why a stream could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The broker refused or failed.
    #[error("{what}: {message}")]
    Broker {
        /// What was being done.
        what: String,
        /// The error.
        message: String,
    },
    /// The stream did not reach the expected count in time.
    #[error("stream {stream} holds {have} messages after {waited:?}, expected at least {want}")]
    Timeout {
        /// Stream.
        stream: String,
        /// Messages it holds.
        have: u64,
        /// Messages wanted.
        want: u64,
        /// Time waited.
        waited: Duration,
    },
}

fn broker(what: &str) -> impl FnOnce(String) -> InspectError + '_ {
    move |message| InspectError::Broker {
        what: what.to_string(),
        message,
    }
}

/// Number of messages in `stream`.
pub async fn count(js: &jetstream::Context, stream: &str) -> Result<u64, InspectError> {
    let mut s = js
        .get_stream(stream)
        .await
        .map_err(|e| broker(stream)(e.to_string()))?;
    let info = s.info().await.map_err(|e| broker(stream)(e.to_string()))?;
    Ok(info.state.messages)
}

/// Waits until `stream` holds at least `want` messages; polls every 50 ms.
pub async fn wait_for_count(
    js: &jetstream::Context,
    stream: &str,
    want: u64,
    timeout: Duration,
) -> Result<u64, InspectError> {
    let start = Instant::now();
    loop {
        let have = count(js, stream).await?;
        if have >= want {
            return Ok(have);
        }
        if start.elapsed() > timeout {
            return Err(InspectError::Timeout {
                stream: stream.to_string(),
                have,
                want,
                waited: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every message `stream` holds on subjects matching `filter` (all when
/// empty), read with an ephemeral ordered consumer; nothing is acked or
/// changed.
pub async fn read_all(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
) -> Result<Vec<async_nats::Message>, InspectError> {
    let s = js
        .get_stream(stream)
        .await
        .map_err(|e| broker(stream)(e.to_string()))?;
    let consumer = s
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: filter.to_string(),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| broker(stream)(e.to_string()))?;
    let pending = consumer.cached_info().num_pending;
    let mut out = Vec::with_capacity(usize::try_from(pending).unwrap_or(0));
    if pending == 0 {
        return Ok(out);
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| broker(stream)(e.to_string()))?;
    while (out.len() as u64) < pending {
        match tokio::time::timeout(Duration::from_secs(10), messages.next()).await {
            Ok(Some(Ok(m))) => out.push(m.message),
            Ok(Some(Err(e))) => return Err(broker(stream)(e.to_string())),
            Ok(None) | Err(_) => {
                return Err(broker(stream)(format!(
                    "read {} of {pending} messages, then nothing more",
                    out.len()
                )))
            }
        }
    }
    Ok(out)
}

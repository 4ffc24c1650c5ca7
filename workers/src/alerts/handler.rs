//! Webhook delivery: each alert from `ALERTS/alerts-notify` POSTed as JSON to every webhook, acked once all took it.
//!
//! A webhook that answers 2xx took the alert. A timeout, a refused
//! connection, a 5xx or a 429 is passing: the message is nacked with a
//! back-off and delivered again (to every webhook: receivers de-duplicate
//! on the alert's `id`, also sent as the `Ferry-Alert-Id` header); after the
//! consumer's `max_deliver` it is a dead letter carrying the last answer.
//! Any other 4xx means the receiver will never take it: a dead letter at
//! once. Every call is logged with the alert, the URL, the attempt and the
//! answer: that log is the delivery log.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use ferry_schema::alert::Alert;
use ferry_schema::deadletter::ReasonCode;

use super::LiveFile;
use crate::runtime::{Handler, Outcome};

/// The header that carries the alert's id on a webhook call.
pub const ALERT_ID_HEADER: &str = "Ferry-Alert-Id";

/// `ALERTS/alerts-notify`: POSTs each alert to the webhooks in use.
#[derive(Debug)]
pub struct NotifyHandler {
    /// The alerts file in use (its webhooks).
    pub live: Arc<LiveFile>,
    /// The HTTP client.
    pub http: reqwest::Client,
}

/// What one webhook call came to.
enum Call {
    Took,
    Passing(String),
    Refused(String),
}

impl Handler for NotifyHandler {
    async fn handle(&self, msg: &jetstream::Message) -> Outcome {
        let alert = match Alert::from_json(&msg.payload) {
            Ok(a) => a,
            Err(e) => {
                return Outcome::Poison {
                    code: ReasonCode::Malformed,
                    reason: format!("not an alert: {e}"),
                }
            }
        };
        let file = self.live.current();
        if !file.enabled {
            return Outcome::Done;
        }
        let attempt = msg.info().map(|i| i.delivered).unwrap_or(1);
        let mut passing = Vec::new();
        for hook in &file.webhooks {
            let call = self
                .http
                .post(&hook.url)
                .timeout(hook.timeout)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(ALERT_ID_HEADER, alert.id.to_string())
                .body(msg.payload.to_vec())
                .send()
                .await;
            let result = match call {
                Ok(r) if r.status().is_success() => Call::Took,
                Ok(r) if r.status().is_server_error() || r.status() == reqwest::StatusCode::TOO_MANY_REQUESTS => {
                    Call::Passing(format!("{} answered {}", hook.url, r.status()))
                }
                Ok(r) => Call::Refused(format!("{} answered {}", hook.url, r.status())),
                Err(e) => Call::Passing(format!("{}: {e}", hook.url)),
            };
            match result {
                Call::Took => tracing::info!(alert = %alert.id, url = %hook.url, attempt, "webhook took the alert"),
                Call::Passing(why) => {
                    tracing::warn!(alert = %alert.id, url = %hook.url, attempt, reason = %why, "webhook failed; will retry");
                    passing.push(why);
                }
                Call::Refused(why) => {
                    tracing::warn!(alert = %alert.id, url = %hook.url, attempt, reason = %why, "webhook refused the alert");
                    return Outcome::Poison {
                        code: ReasonCode::WebhookRefused,
                        reason: why,
                    };
                }
            }
        }
        if passing.is_empty() {
            Outcome::Done
        } else {
            Outcome::retry(Duration::from_secs(1), passing.join("; "))
        }
    }
}

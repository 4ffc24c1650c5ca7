//! Webhook delivery: each alert from `ALERTS/alerts-notify` POSTed as JSON to every webhook, acked once all took it.
//!
//! A webhook that answers 2xx took the alert. A timeout, a refused
//! connection, a 5xx or a 429 is passing: the message is nacked with a
//! back-off and delivered again (to every webhook: receivers de-duplicate
//! on the alert's `id`, also sent as the `Ferry-Alert-Id` header); after the
//! consumer's `max_deliver` it is a dead letter carrying the last answer.
//! Any other 4xx means the receiver will never take it: a dead letter at
//! once. Every call is recorded, with the alert, the URL (without user,
//! password or query), the attempt, the answer and how long it took, on
//! `alert-deliveries.<rule>` in `ALERTS` (the delivery log, which the
//! archiver keeps in `alert_deliveries`); those records reach this handler
//! too, which passes them by.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use chrono::Utc;
use ferry_schema::alert::{Alert, Delivery, DeliveryOutcome};
use ferry_schema::deadletter::ReasonCode;
use ferry_schema::headers;

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
    /// Where the delivery records go.
    pub js: jetstream::Context,
}

/// What one webhook call came to.
enum Call {
    Took,
    Passing(String),
    Refused(String),
}

/// `url` as a delivery record shows it: no user, password, query or
/// fragment (where a webhook's token usually is); the text as written when
/// it does not parse.
pub fn shown_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            u.to_string()
        }
        Err(_) => url.to_string(),
    }
}

impl NotifyHandler {
    /// Stores the record of one call. The call is made whatever comes of
    /// this: a record that cannot be stored is logged, and the alert's
    /// delivery goes on.
    async fn record(&self, d: &Delivery) {
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::MSG_ID, d.id.to_string().as_str());
        h.insert(headers::CONTENT_TYPE, headers::CONTENT_TYPE_JSON);
        let stored = match self.js.publish_with_headers(d.subject(), h, d.to_json().into()).await {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(error) = stored {
            tracing::warn!(%error, alert = %d.alert_id, url = %d.url, attempt = d.attempt, "delivery record not stored");
        }
    }
}

impl Handler for NotifyHandler {
    async fn handle(&self, msg: &jetstream::Message) -> Outcome {
        // The delivery log shares the stream; it is not delivered anywhere.
        if ferry_schema::subject::is_alert_delivery(&msg.subject) {
            return Outcome::Done;
        }
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
        let attempt = msg.info().map(|i| u64::try_from(i.delivered).unwrap_or(1)).unwrap_or(1);
        let mut passing = Vec::new();
        for hook in &file.webhooks {
            let started = Instant::now();
            let call = self
                .http
                .post(&hook.url)
                .timeout(hook.timeout)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(ALERT_ID_HEADER, alert.id.to_string())
                .body(msg.payload.to_vec())
                .send()
                .await;
            let status = call.as_ref().ok().map(|r| r.status().as_u16());
            let result = match call {
                Ok(r) if r.status().is_success() => Call::Took,
                Ok(r) if r.status().is_server_error() || r.status() == reqwest::StatusCode::TOO_MANY_REQUESTS => {
                    Call::Passing(format!("{} answered {}", hook.url, r.status()))
                }
                Ok(r) => Call::Refused(format!("{} answered {}", hook.url, r.status())),
                Err(e) => Call::Passing(format!("{}: {e}", hook.url)),
            };
            let url = shown_url(&hook.url);
            let (outcome, detail) = match &result {
                Call::Took => (DeliveryOutcome::Took, String::new()),
                Call::Passing(why) => (DeliveryOutcome::Failed, why.replace(&hook.url, &url)),
                Call::Refused(why) => (DeliveryOutcome::Refused, why.replace(&hook.url, &url)),
            };
            self.record(&Delivery {
                id: Delivery::id_for(alert.id, &url, attempt),
                alert_id: alert.id,
                rule: alert.rule.clone(),
                url,
                attempt,
                outcome,
                status,
                detail: Delivery::bounded(&detail),
                ts: Utc::now(),
                elapsed_ms: started.elapsed().as_secs_f64() * 1000.0,
            })
            .await;
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

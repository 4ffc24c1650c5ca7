//! The archiver's handlers: decode an event or reply, hand its row to the batch writer, return the commit's outcome.

use async_nats::jetstream;
use ferry_schema::codec;
use ferry_schema::deadletter::ReasonCode;

use super::batch::Batcher;
use super::rows::{AlertRow, DeliveryRow, EventRow, ReplyRow};
use crate::runtime::{decode, Handler, Outcome};

/// `EVENTS/archiver-events`.
#[derive(Debug)]
pub struct EventHandler {
    /// The event writer.
    pub batcher: Batcher<EventRow>,
    /// Largest payload decoded.
    pub max_payload: usize,
}

/// `REPLIES/archiver-replies`.
#[derive(Debug)]
pub struct ReplyHandler {
    /// The reply writer.
    pub batcher: Batcher<ReplyRow>,
    /// Largest payload decoded.
    pub max_payload: usize,
}

/// `ALERTS/archiver-alerts`: alerts, and the webhook delivery log.
#[derive(Debug)]
pub struct AlertHandler {
    /// The alert writer.
    pub batcher: Batcher<AlertRow>,
    /// The delivery log's writer.
    pub deliveries: Batcher<DeliveryRow>,
}

fn poison(code: ReasonCode, e: impl std::fmt::Display) -> Outcome {
    Outcome::Poison {
        code,
        reason: e.to_string(),
    }
}

fn stream_seq(msg: &jetstream::Message) -> i64 {
    msg.info()
        .map(|i| i64::try_from(i.stream_sequence).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Handler for EventHandler {
    async fn handle(&self, msg: &jetstream::Message) -> Outcome {
        let env = match decode::event(msg, self.max_payload) {
            Ok(m) => m.env,
            Err(poison) => return poison,
        };
        let body_json = match codec::event_body_json(&env.body) {
            Ok(j) => j,
            Err(e) => return poison(ReasonCode::Encode, e),
        };
        let row = EventRow {
            env,
            body_json,
            stream_seq: stream_seq(msg),
        };
        self.batcher.submit(row).await
    }
}

impl Handler for ReplyHandler {
    async fn handle(&self, msg: &jetstream::Message) -> Outcome {
        let reply = match decode::reply(msg, self.max_payload) {
            Ok(r) => r,
            Err(poison) => return poison,
        };
        let body_json = match codec::reply_body_json(&reply.body) {
            Ok(j) => j,
            Err(e) => return poison(ReasonCode::Encode, e),
        };
        let row = ReplyRow {
            reply,
            body_json,
            stream_seq: stream_seq(msg),
        };
        self.batcher.submit(row).await
    }
}

impl Handler for AlertHandler {
    async fn handle(&self, msg: &jetstream::Message) -> Outcome {
        if ferry_schema::subject::is_alert_delivery(&msg.subject) {
            return match ferry_schema::alert::Delivery::from_json(&msg.payload) {
                Ok(delivery) => {
                    self.deliveries
                        .submit(DeliveryRow {
                            delivery,
                            stream_seq: stream_seq(msg),
                        })
                        .await
                }
                Err(e) => poison(ReasonCode::Malformed, format!("not a delivery record: {e}")),
            };
        }
        match ferry_schema::alert::Alert::from_json(&msg.payload) {
            Ok(alert) => {
                self.batcher
                    .submit(AlertRow {
                        alert,
                        stream_seq: stream_seq(msg),
                    })
                    .await
            }
            Err(e) => poison(ReasonCode::Malformed, format!("not an alert: {e}")),
        }
    }
}

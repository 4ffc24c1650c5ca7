//! The rules handler: decode, decide, publish the reply or hand-off, report the outcome.

use std::sync::Arc;
use std::time::Instant;

use async_nats::jetstream;
use ferry_schema::codec::{self, Encoding};
use ferry_schema::deadletter::ReasonCode;
use ferry_schema::reply::{AlertReply, AnsweredBy, ChatAction, ChatReply, ResponderKind};
use ferry_schema::subject::WorkQueue;
use ferry_schema::{headers, Envelope, EventBody, ReplyBody};

use super::engine::{Decision, RuleSet};
use super::reload::LiveRules;
use crate::runtime::publish::{self, Outgoing, Publisher};
use crate::runtime::{decode, Handler, Outcome};
use crate::state::Failure;

/// This handler's name in its replies and their ids.
pub const RESPONDER: &str = ferry_schema::Responder::Rules.as_str();

/// Applies a [`RuleSet`] to events and publishes what it decides.
#[derive(Debug)]
pub struct RulesHandler {
    publisher: Publisher,
    rules: Arc<LiveRules>,
    max_payload: usize,
    customers: Option<deadpool_postgres::Pool>,
}

/// How long a chat waits before another try when its customer could not be
/// looked up (PostgreSQL away).
const CUSTOMER_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

impl RulesHandler {
    /// A handler publishing through `publisher` (a JetStream context, or
    /// shadow mode for `ferry replay`); payloads above `max_payload` bytes
    /// are dead-lettered.
    pub fn new(publisher: impl Into<Publisher>, rules: Arc<RuleSet>, max_payload: usize) -> Self {
        Self {
            publisher: publisher.into(),
            rules: Arc::new(LiveRules::new(rules)),
            max_payload,
            customers: None,
        }
    }

    /// Looks chat customers up in `pool` (needed when rules use `customer_tags`).
    pub fn with_customers(mut self, pool: deadpool_postgres::Pool) -> Self {
        self.customers = Some(pool);
        self
    }

    /// The rule set in use, for a [`Reloader`](super::reload::Reloader) to replace.
    pub fn live_rules(&self) -> Arc<LiveRules> {
        self.rules.clone()
    }

    /// The tags of the chat's customer, creating the customer on its first
    /// chat; empty when no rule needs them.
    /// A database that is away is retried; a sender the database refuses
    /// for its data (say, too long for the customers' index) is poison.
    async fn customer_tags(&self, env: &Envelope, rules: &RuleSet) -> Result<Vec<String>, Outcome> {
        let (EventBody::Chat(c), Some(pool), true) = (&env.body, &self.customers, rules.needs_customers()) else {
            return Ok(Vec::new());
        };
        // Boxed: a PostgreSQL round trip's future is large, and every event
        // would otherwise carry (and move) room for it.
        Box::pin(async move {
            let client = pool
                .get()
                .await
                .map_err(|e| Outcome::retry(CUSTOMER_RETRY, format!("customer lookup failed: {e}")))?;
            crate::state::customers::identify(&**client, env.agent.as_str(), &c.sender, env.ts)
                .await
                .map(|k| k.tags)
                .map_err(|e| match crate::state::classify(&e) {
                    Failure::Data => Outcome::Poison {
                        code: ferry_schema::deadletter::ReasonCode::Unstorable,
                        reason: format!("customer lookup refused: {}", crate::state::db_reason(&e)),
                    },
                    Failure::Transient => Outcome::retry(CUSTOMER_RETRY, format!("customer lookup failed: {}", crate::state::db_reason(&e))),
                })
        })
        .await
    }
}

fn chat_reply(
    chat: &str,
    action: ChatAction,
    content: Option<String>,
    confidence: f32,
    rule: String,
    started: Instant,
) -> ReplyBody {
    ReplyBody::Chat(ChatReply {
        chat: chat.to_string(),
        action,
        content,
        confidence,
        answered_by: AnsweredBy {
            kind: ResponderKind::Rule,
            name: rule,
        },
        processing_ms: publish::elapsed_ms(started),
        tokens: None,
        timings: None,
    })
}

impl Handler for RulesHandler {
    async fn handle(&self, msg: &jetstream::Message) -> Outcome {
        let started = Instant::now();
        let (env, enc, filled_in) = match decode::event(msg, self.max_payload) {
            Ok(m) => (m.env, m.enc, m.filled_in),
            Err(poison) => return poison,
        };
        // A hand-typed event's bytes are not a whole event.
        let original = (!filled_in).then_some(&msg.payload);
        let tp = headers::traceparent(msg.headers.as_ref());
        // One set decides the whole event, even if a reload lands meanwhile.
        let rules = self.rules.current();
        let tags = match self.customer_tags(&env, &rules).await {
            Ok(t) => t,
            Err(outcome) => return outcome,
        };
        // Everything up to the publish is synchronous; the event, its tags
        // and the rules are dropped before the one await that takes time,
        // so this future does not carry them while it waits.
        let out = outgoing(&env, enc, tp, rules.decide(&env, &tags), original, started);
        drop((env, tags, rules));
        match out {
            Ok(Some(out)) => out.publish(&self.publisher).await,
            Ok(None) => Outcome::Done,
            Err(poison) => poison,
        }
    }
}

/// What `decision` sends for `env` (whose bytes are `original`, unless it
/// was completed from a hand-typed one): a reply, a hand-off to inference,
/// or nothing.
fn outgoing(
    env: &Envelope,
    enc: Encoding,
    tp: Option<&str>,
    decision: Decision,
    original: Option<&bytes::Bytes>,
    started: Instant,
) -> Result<Option<Outgoing>, Outcome> {
    tracing::debug!(event = %env.id, agent = %env.agent, kind = %env.kind(), ?decision, "decided");
    let chat = match &env.body {
        EventBody::Chat(c) => c.chat.as_str(),
        _ => "",
    };
    let body = match decision {
        Decision::Nothing => return Ok(None),
        Decision::Reply {
            rule,
            text,
            confidence,
        } => chat_reply(chat, ChatAction::Reply, Some(text), confidence, rule, started),
        Decision::Escalate {
            rule,
            reason,
            confidence,
        } => chat_reply(chat, ChatAction::Escalate, reason, confidence, rule, started),
        Decision::Ignore { rule } => chat_reply(chat, ChatAction::Ignore, None, 1.0, rule, started),
        Decision::Alert { rule, message } => ReplyBody::Alert(AlertReply {
            rule,
            message,
            processing_ms: publish::elapsed_ms(started),
        }),
        Decision::Infer { rule } => {
            // The original bytes go on unchanged, so the inference worker
            // decodes what the agent sent, in its encoding; a hand-typed
            // event goes on completed, so it reads the same id and time.
            let payload = match original {
                Some(bytes) => bytes.clone(),
                None => codec::encode_event(env, enc)
                    .map(bytes::Bytes::from)
                    .map_err(|e| Outcome::Poison {
                        code: ReasonCode::Encode,
                        reason: e.to_string(),
                    })?,
            };
            let mut headers = headers::for_publish(env.id.text(), enc, tp);
            headers.insert(headers::ROUTE_RULE, rule.as_str());
            return Ok(Some(Outgoing {
                subject: WorkQueue::InferenceChat.subject(),
                headers,
                payload,
            }));
        }
    };
    Outgoing::reply(RESPONDER, env, enc, tp, body).map(Some)
}

//! The inference handlers: chat hand-offs in, model replies out; prediction requests in, predictions out.

use std::sync::Arc;
use std::time::Instant;

use async_nats::jetstream;
use ferry_schema::reply::{ChatAction, ChatReply, PredictionReply};
use ferry_schema::{headers, EventBody, ReplyBody};

use super::config::{InferenceSettings, Task};
use super::engine::Engine;
use super::{fallback, prompt};
use crate::runtime::{decode, publish, Handler, Outcome, Stats};
use crate::state::conversations::{self, Turn};
use crate::state::kb::{self, Hit};

/// This handler's name in its replies and their ids.
pub const RESPONDER: &str = ferry_schema::Responder::Inference.as_str();

/// What both handlers share.
#[derive(Debug, Clone)]
pub struct Shared {
    /// For publishing replies (JetStream, or shadow mode).
    pub publisher: crate::runtime::publish::Publisher,
    /// The models.
    pub engine: Arc<Engine>,
    /// The config.
    pub settings: Arc<InferenceSettings>,
    /// Counters (tokens).
    pub stats: Arc<Stats>,
    /// Largest payload decoded.
    pub max_payload: usize,
    /// Conversation context and knowledge base, when the worker has a database.
    pub db: Option<deadpool_postgres::Pool>,
}

/// The conversation's last turns and the knowledge-base articles for a chat.
/// A database failure degrades the prompt (logged) rather than delaying the
/// answer: the chain must always answer.
async fn grounding(s: &Shared, env: &ferry_schema::Envelope, chat: &ferry_schema::event::ChatMessage) -> (Vec<Turn>, Vec<Hit>) {
    let Some(pool) = &s.db else {
        return (Vec::new(), Vec::new());
    };
    let ctx = &s.settings.context;
    let result = async {
        let client = pool.get().await.map_err(|e| e.to_string())?;
        let turns = conversations::context(
            &**client,
            env.agent.as_str(),
            &chat.sender,
            env.id.0,
            env.ts,
            ctx.conversation_idle(),
            ctx.turns,
        )
        .await
        .map_err(|e| e.to_string())?;
        let hits = kb::search(&**client, &chat.text, ctx.kb_articles).await.map_err(|e| e.to_string())?;
        Ok::<_, String>((turns, hits))
    }
    .await;
    result.unwrap_or_else(|error| {
        tracing::warn!(event = %env.id, %error, "no conversation context or knowledge base for this chat (PostgreSQL unavailable)");
        (Vec::new(), Vec::new())
    })
}

/// Answers chats handed over by the rules worker (`work.inference.chat`).
#[derive(Debug)]
pub struct ChatHandler(pub Shared);

/// Answers prediction requests (`events.*.predict`).
#[derive(Debug)]
pub struct PredictHandler(pub Shared);

impl Handler for ChatHandler {
    async fn handle(&self, msg: &jetstream::Message) -> Outcome {
        let s = &self.0;
        let started = Instant::now();
        let queued = publish::queued_ms(msg);
        // A hand-off carries the agent's original event bytes; the rules
        // worker already checked them against their subject.
        let (env, enc) = match decode::handoff(msg, s.max_payload) {
            Ok(d) => d,
            Err(poison) => return poison,
        };
        let EventBody::Chat(chat) = &env.body else {
            return Outcome::Poison {
                code: ferry_schema::deadletter::ReasonCode::WrongKind,
                reason: format!("a chat hand-off carries a {} event", env.kind()),
            };
        };
        let route = s.settings.route(Task::Chat, &env.agent);
        let (turns, hits) = grounding(s, &env, chat).await;
        let p = prompt::chat(&s.settings, chat, &turns, &hits);
        let answer = fallback::chat(&*s.engine, &s.settings, route, &p, &chat.text, &hits).await;
        if let Some(t) = answer.tokens {
            s.stats.add_tokens(&answer.by.name, u64::from(t));
        }
        tracing::debug!(event = %env.id, by = ?answer.by, turns = turns.len(), kb = hits.len(), skipped = ?answer.skipped, "answered");
        let body = ReplyBody::Chat(ChatReply {
            chat: chat.chat.clone(),
            action: ChatAction::Reply,
            content: Some(answer.text),
            confidence: answer.confidence,
            answered_by: answer.by,
            processing_ms: publish::elapsed_ms(started),
            tokens: answer.tokens,
            timings: answer.generation.as_ref().map(|g| g.timings(queued)),
        });
        let tp = headers::traceparent(msg.headers.as_ref());
        publish::reply(&s.publisher, RESPONDER, &env, enc, tp, body).await
    }
}

impl Handler for PredictHandler {
    async fn handle(&self, msg: &jetstream::Message) -> Outcome {
        let s = &self.0;
        let started = Instant::now();
        let queued = publish::queued_ms(msg);
        let (env, enc) = match decode::event(msg, s.max_payload) {
            Ok(m) => (m.env, m.enc),
            Err(poison) => return poison,
        };
        let EventBody::Predict(req) = &env.body else {
            // The consumer filters on predict subjects; anything else is not ours.
            return Outcome::Done;
        };
        let route = s.settings.route(Task::Predict, &env.agent);
        let p = prompt::predict(&s.settings, req);
        let body = match fallback::models(&*s.engine, &s.settings, route, &p).await {
            Ok((alias, gen)) => {
                s.stats.add_tokens(&alias, u64::from(gen.tokens));
                PredictionReply {
                    timings: Some(gen.timings(queued)),
                    prediction: gen.text,
                    confidence: gen.confidence,
                    model: alias,
                    processing_ms: publish::elapsed_ms(started),
                }
            }
            // No model could answer: say so rather than leave the agent waiting.
            Err(skipped) => PredictionReply {
                prediction: String::new(),
                confidence: 0.0,
                model: format!("none ({})", skipped.join("; ")),
                processing_ms: publish::elapsed_ms(started),
                timings: None,
            },
        };
        let tp = headers::traceparent(msg.headers.as_ref());
        publish::reply(&s.publisher, RESPONDER, &env, enc, tp, ReplyBody::Prediction(body)).await
    }
}

//! Replies: what workers send back to an agent, addressed by the event they answer.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::{AgentId, EventId};

/// Who answers events. The name is part of every reply's id
/// ([`ReplyId::for_event`]), so it is contract: `ferry replay` derives the
/// ids of recorded replies from it, and renaming one would give every
/// redelivered event a second reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Responder {
    /// The rules worker.
    Rules,
    /// The inference worker.
    Inference,
}

impl Responder {
    /// The name in reply ids and in a reply's `responder` field.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Rules => "rules",
            Self::Inference => "inference",
        }
    }
}

/// A reply's id. It is derived from the answered event's id and the name of
/// the responder (`rules`, `inference`), so a worker that handles the same
/// event twice produces the same id, JetStream drops the second publish
/// (`Nats-Msg-Id`), and an agent can tell a redelivered reply from a new one.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplyId(pub Uuid);

impl ReplyId {
    /// The deterministic id of `responder`'s reply to `event`.
    pub fn for_event(event: EventId, responder: &str) -> Self {
        Self(Uuid::new_v5(&event.0, responder.as_bytes()))
    }

    /// The id as text, as `to_string` writes it, without going through
    /// `fmt` (it is the reply's `Nats-Msg-Id`).
    pub fn text(&self) -> String {
        self.0.hyphenated().encode_lower(&mut Uuid::encode_buffer()).to_owned()
    }
}

impl fmt::Display for ReplyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for ReplyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReplyId({})", self.0)
    }
}

impl Serialize for ReplyId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.hyphenated().encode_lower(&mut Uuid::encode_buffer()))
    }
}

impl<'de> Deserialize<'de> for ReplyId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Uuid::parse_str(&s)
            .map(Self)
            .map_err(|e| serde::de::Error::custom(format!("id {s:?} is not a UUID: {e}")))
    }
}

/// What kind of reply this is; decides the shape of its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyKind {
    /// An answer to a chat message.
    Chat,
    /// A next-activity prediction.
    Prediction,
    /// An alert raised by a rule over activity (e.g. a forbidden site).
    Alert,
}

impl ReplyKind {
    /// Every kind.
    pub const ALL: [ReplyKind; 3] = [Self::Chat, Self::Prediction, Self::Alert];

    /// The name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Prediction => "prediction",
            Self::Alert => "alert",
        }
    }

    /// Parses a kind name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// A reply as Ferry code sees it. On the wire it is the map
/// `{id, in_reply_to, agent, kind, ts, v, body}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// See [`ReplyId`].
    pub id: ReplyId,
    /// The event this reply answers.
    pub in_reply_to: EventId,
    /// The agent the reply goes to.
    pub agent: AgentId,
    /// When the reply was made.
    pub ts: DateTime<Utc>,
    /// The answer.
    pub body: ReplyBody,
}

impl Reply {
    /// A reply from `responder` to `event` of `agent`, stamped now.
    pub fn new(responder: &str, event: EventId, agent: AgentId, body: ReplyBody) -> Self {
        Self {
            id: ReplyId::for_event(event, responder),
            in_reply_to: event,
            agent,
            ts: Utc::now(),
            body,
        }
    }

    /// Ferry's own work as an interaction, so the archive's `interactions`
    /// and the alerts worker see Ferry's answers as they see an
    /// assistant's: the chat (or, for a prediction or rule alert, the
    /// agent) is the session; `intent` is `chat_<action>`, `predict` or
    /// `rule_alert`; `tools_used` the step that answered (`rule`, `model`,
    /// `kb_template`, `apology`); it failed when the fallback chain had to
    /// go past the model (`error_type` `fallback_<step>`); `model` is the
    /// model alias, when a model answered. The customer's text is not
    /// copied (it is in `chat_messages`).
    pub fn as_interaction(&self) -> crate::event::Interaction {
        let light = |intent: &str, tool: &str, ms: f64| crate::event::Interaction {
            session_id: self.agent.as_str().to_string(),
            user_input: String::new(),
            intent: Some(intent.into()),
            tools_used: vec![tool.into()],
            response_time_ms: ms,
            success: true,
            error_type: None,
            model: None,
            tokens: None,
        };
        match &self.body {
            ReplyBody::Chat(c) => {
                let step = c.answered_by.kind;
                let fell_back = matches!(step, ResponderKind::KbTemplate | ResponderKind::Apology);
                let action = match c.action {
                    ChatAction::Reply => "chat_reply",
                    ChatAction::Escalate => "chat_escalate",
                    ChatAction::Ignore => "chat_ignore",
                };
                crate::event::Interaction {
                    session_id: c.chat.clone(),
                    user_input: String::new(),
                    intent: Some(action.into()),
                    tools_used: vec![step.as_str().into()],
                    response_time_ms: c.processing_ms,
                    success: !fell_back,
                    error_type: fell_back.then(|| format!("fallback_{}", step.as_str())),
                    model: (step == ResponderKind::Model).then(|| c.answered_by.name.clone()),
                    tokens: c.tokens,
                }
            }
            ReplyBody::Prediction(p) => crate::event::Interaction {
                model: Some(p.model.clone()),
                ..light("predict", "model", p.processing_ms)
            },
            ReplyBody::Alert(a) => light("rule_alert", "rule", a.processing_ms),
        }
    }

    /// The reply's kind, derived from its body.
    pub fn kind(&self) -> ReplyKind {
        match self.body {
            ReplyBody::Chat(_) => ReplyKind::Chat,
            ReplyBody::Prediction(_) => ReplyKind::Prediction,
            ReplyBody::Alert(_) => ReplyKind::Alert,
        }
    }
}

/// The body of a reply.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyBody {
    /// See [`ChatReply`].
    Chat(ChatReply),
    /// See [`PredictionReply`].
    Prediction(PredictionReply),
    /// See [`AlertReply`].
    Alert(AlertReply),
}

/// What the agent should do with a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatAction {
    /// Send `content` to the chat.
    Reply,
    /// Hand the conversation to a person; `content` says why.
    Escalate,
    /// Do nothing.
    Ignore,
}

/// Which step of Ferry produced an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponderKind {
    /// A rule of the rules worker.
    Rule,
    /// A model of the inference worker.
    Model,
    /// A knowledge-base template (fallback chain).
    KbTemplate,
    /// The fixed apology (last step of the fallback chain).
    Apology,
}

impl ResponderKind {
    /// The step's name on the wire and in the archive.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Rule => "rule",
            Self::Model => "model",
            Self::KbTemplate => "kb_template",
            Self::Apology => "apology",
        }
    }
}

/// Who answered: the step kind and its name (rule name, model alias, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnsweredBy {
    /// The step.
    pub kind: ResponderKind,
    /// The rule name, model alias or template name.
    pub name: String,
}

/// An answer to a chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatReply {
    /// The chat to act in (copied from the message).
    pub chat: String,
    /// What to do.
    pub action: ChatAction,
    /// Text to send (for `reply`) or the reason (for `escalate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// How sure the responder is, 0 to 1.
    pub confidence: f32,
    /// Who answered.
    pub answered_by: AnsweredBy,
    /// Time spent producing the answer, milliseconds.
    pub processing_ms: f64,
    /// Tokens generated, for model answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u32>,
    /// Where a model answer's time went (model answers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<Timings>,
}

/// Where a model answer's time went: waiting (in the stream, then for a
/// model slot), reading the prompt, generating; and what ran it. What an
/// operator needs to tell a slow model from a long queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// From when the broker stored the request to when the worker took it
    /// up, milliseconds (the broker's clock against the worker's).
    pub queue_ms: f64,
    /// Waiting in the worker for a model slot (its concurrency limit and the
    /// engine's scheduler), milliseconds.
    pub wait_ms: f64,
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Reading the prompt, milliseconds.
    pub prompt_ms: f64,
    /// Tokens generated.
    pub generated_tokens: u32,
    /// Generating them, milliseconds.
    pub generation_ms: f64,
    /// The engine (`mistral.rs`).
    pub engine: String,
    /// The weights' format as run (`Q8_0`), or `as-is`.
    pub format: String,
}

/// A next-activity prediction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionReply {
    /// The predicted next activity, as text.
    pub prediction: String,
    /// How sure the model is, 0 to 1.
    pub confidence: f32,
    /// The model alias that predicted it.
    pub model: String,
    /// Time spent, milliseconds.
    pub processing_ms: f64,
    /// Where the model's time went (when a model answered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<Timings>,
}

/// An alert a rule raised about an activity, shown to the agent's user and
/// to whoever watches alerts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertReply {
    /// The rule that raised it.
    pub rule: String,
    /// What the user sees.
    pub message: String,
    /// Time spent, milliseconds.
    pub processing_ms: f64,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn chat(kind: ResponderKind, name: &str) -> Reply {
        let body = ReplyBody::Chat(ChatReply {
            chat: "Alice".into(),
            action: ChatAction::Reply,
            content: Some("hi".into()),
            confidence: 0.5,
            answered_by: AnsweredBy { kind, name: name.into() },
            processing_ms: 812.0,
            tokens: Some(40),
            timings: None,
        });
        Reply::new("inference", EventId::new(), AgentId::new("desk-1").unwrap(), body)
    }

    #[test]
    fn a_model_answer_is_a_success_and_a_fallback_a_failure_named_by_its_step() {
        let ok = chat(ResponderKind::Model, "smollm2").as_interaction();
        assert_eq!((ok.success, ok.model.as_deref(), ok.tokens), (true, Some("smollm2"), Some(40)));
        assert_eq!((ok.session_id.as_str(), ok.intent.as_deref(), ok.response_time_ms), ("Alice", Some("chat_reply"), 812.0));
        assert_eq!(ok.tools_used, ["model"]);
        let fell = chat(ResponderKind::Apology, "apology").as_interaction();
        assert_eq!((fell.success, fell.error_type.as_deref(), fell.model), (false, Some("fallback_apology"), None));
        let rule = chat(ResponderKind::Rule, "greeting").as_interaction();
        assert!(rule.success && rule.tools_used == ["rule"] && rule.model.is_none());
    }
}

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

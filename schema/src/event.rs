//! Events: the envelope every agent publishes and the bodies it carries.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::AgentId;

/// An event's id: a UUIDv7, so ids sort by creation time. It is also the
/// event's `Nats-Msg-Id`, which makes JetStream drop a re-published copy.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId(pub Uuid);

impl EventId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// The id as text, as `to_string` writes it, without going through
    /// `fmt` (a `Nats-Msg-Id` is made for every message).
    pub fn text(&self) -> String {
        self.0.hyphenated().encode_lower(&mut Uuid::encode_buffer()).to_owned()
    }
}

impl Default for EventId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventId({})", self.0)
    }
}

impl std::str::FromStr for EventId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

// Ids travel as text in both encodings so `nats sub` and `ferry tap` show them
// the way logs and PostgreSQL do.
impl Serialize for EventId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.hyphenated().encode_lower(&mut Uuid::encode_buffer()))
    }
}

impl<'de> Deserialize<'de> for EventId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Uuid::parse_str(&s)
            .map(Self)
            .map_err(|e| serde::de::Error::custom(format!("id {s:?} is not a UUID: {e}")))
    }
}

/// What an event is about; also the last token of its subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A chat message received by the agent's chat adapter.
    Chat,
    /// A foreground-window / idle sample from the agent's collectors.
    Activity,
    /// The agent's periodic health report.
    Heartbeat,
    /// A request to predict the user's next activity.
    Predict,
    /// One interaction of an AI assistant, as it reports it for monitoring.
    Interaction,
}

impl EventKind {
    /// Every kind, in subject order.
    pub const ALL: [EventKind; 5] = [Self::Chat, Self::Activity, Self::Heartbeat, Self::Predict, Self::Interaction];

    /// The kind's name as used in subjects and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Activity => "activity",
            Self::Heartbeat => "heartbeat",
            Self::Predict => "predict",
            Self::Interaction => "interaction",
        }
    }

    /// Parses a kind name; `None` when it is not one of [`EventKind::ALL`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event as Ferry code sees it. On the wire it is the map
/// `{id, agent, kind, ts, v, body}` (see [`crate::codec`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// Unique, sortable id; also the `Nats-Msg-Id`.
    pub id: EventId,
    /// The agent that produced the event; must match the subject's agent.
    pub agent: AgentId,
    /// When the agent observed the event.
    pub ts: DateTime<Utc>,
    /// What happened.
    pub body: EventBody,
}

impl Envelope {
    /// A new event with a fresh id, stamped now.
    pub fn new(agent: AgentId, body: EventBody) -> Self {
        Self {
            id: EventId::new(),
            agent,
            ts: Utc::now(),
            body,
        }
    }

    /// The event's kind, derived from its body.
    pub fn kind(&self) -> EventKind {
        self.body.kind()
    }
}

/// The body of an event, one variant per [`EventKind`].
#[derive(Debug, Clone, PartialEq)]
pub enum EventBody {
    /// See [`ChatMessage`].
    Chat(ChatMessage),
    /// See [`Activity`].
    Activity(Activity),
    /// See [`Heartbeat`].
    Heartbeat(Heartbeat),
    /// See [`PredictRequest`].
    Predict(PredictRequest),
    /// See [`Interaction`].
    Interaction(Interaction),
}

impl EventBody {
    /// The kind this body belongs to.
    pub fn kind(&self) -> EventKind {
        match self {
            Self::Chat(_) => EventKind::Chat,
            Self::Activity(_) => EventKind::Activity,
            Self::Heartbeat(_) => EventKind::Heartbeat,
            Self::Predict(_) => EventKind::Predict,
            Self::Interaction(_) => EventKind::Interaction,
        }
    }
}

/// Direct (one customer) or group chat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatType {
    /// A one-to-one chat.
    #[default]
    Direct,
    /// A group chat.
    Group,
}

/// The kind of content a chat message holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageType {
    /// Plain text.
    #[default]
    Text,
    /// A picture; `text` holds a description or file name.
    Image,
    /// A file; `text` holds its name.
    File,
    /// Anything else the adapter could not classify.
    Other,
}

/// A chat message the agent's chat adapter received.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// The chat (conversation) name as the chat app shows it; replies go there.
    pub chat: String,
    /// Direct or group chat; direct when absent.
    #[serde(default)]
    pub chat_type: ChatType,
    /// Who wrote the message.
    pub sender: String,
    /// The message text.
    pub text: String,
    /// What the message holds; text when absent.
    #[serde(default)]
    pub msg_type: MessageType,
}

/// One foreground-window sample, merged over its duration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Activity {
    /// Application name, e.g. `chrome.exe`.
    pub app: String,
    /// Window title (possibly redacted by the agent's privacy rules).
    pub title: String,
    /// Full executable path, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    /// Process id, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Web site, for browser windows where it can be told.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// True when the user was idle (away from keyboard) for this span.
    #[serde(default)]
    pub afk: bool,
    /// How long the sample lasted, in milliseconds (0 for a point sample).
    #[serde(default)]
    pub duration_ms: u64,
}

/// Health of one agent component (a collector, the chat adapter, the spool).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentStatus {
    /// Component name, e.g. `foreground`.
    pub name: String,
    /// Whether it works.
    pub ok: bool,
    /// What is wrong, when it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The agent's periodic health report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Agent version.
    pub version: String,
    /// CPU use of the agent process, percent of one core.
    #[serde(default)]
    pub cpu_percent: f32,
    /// Resident memory of the agent process, bytes.
    #[serde(default)]
    pub rss_bytes: u64,
    /// Events waiting in the spool.
    #[serde(default)]
    pub spool_depth: u64,
    /// Age of the oldest unsent event, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_unsent_ms: Option<u64>,
    /// Status of each component.
    #[serde(default)]
    pub components: Vec<ComponentStatus>,
}

/// One past activity given as context for a prediction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecentActivity {
    /// When it started.
    pub at: DateTime<Utc>,
    /// Application name.
    pub app: String,
    /// Window title.
    pub title: String,
    /// How long it lasted, milliseconds.
    #[serde(default)]
    pub duration_ms: u64,
}

/// A request to predict the user's next activity from recent ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictRequest {
    /// Recent activities, oldest first.
    pub recent: Vec<RecentActivity>,
}

/// One interaction of an AI assistant (a question and how it was answered),
/// reported by the assistant itself, by Ferry's own workers, or by any
/// service, for monitoring: error rates, response times, intents and tools.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interaction {
    /// The assistant's conversation or session this interaction belongs to.
    pub session_id: String,
    /// What the user asked (as the reporter chose to record it).
    #[serde(default)]
    pub user_input: String,
    /// The intent the assistant recognised, when it tells.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<String>,
    /// The tools the assistant called, in order.
    #[serde(default)]
    pub tools_used: Vec<String>,
    /// How long the answer took, milliseconds.
    pub response_time_ms: f64,
    /// Whether the interaction succeeded.
    pub success: bool,
    /// What went wrong, when it did not (e.g. `timeout`, `tool_error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_type: Option<String>,
    /// The model that answered, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Tokens generated, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u32>,
}

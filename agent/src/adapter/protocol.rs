//! The protocol's lines: what clients send, what the agent answers, and reading and writing them.

use chrono::{DateTime, Utc};
use ferry_schema::event::{ChatType, MessageType};
use ferry_schema::EventId;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

use super::MAX_LINE;

/// A line from a client.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum FromClient {
    /// The first line.
    Hello {
        /// Protocol version.
        v: u32,
        /// The install's token, from [`TOKEN_FILE`].
        #[serde(default)]
        token: Option<String>,
        /// Client's name, for logs and the heartbeat.
        #[serde(default)]
        name: Option<String>,
        /// Whether the client sends chat messages.
        #[serde(default)]
        sends: bool,
    },
    /// An incoming chat message.
    Message {
        /// Chat name.
        chat: String,
        /// Direct or group.
        #[serde(default)]
        chat_type: ChatType,
        /// Sender.
        sender: String,
        /// Text.
        content: String,
        /// Content type.
        #[serde(default)]
        msg_type: MessageType,
        /// When it was received.
        #[serde(default)]
        time: Option<DateTime<Utc>>,
        /// Echoed in `accepted`.
        #[serde(default, rename = "ref")]
        reference: Option<String>,
    },
    /// One interaction of an AI assistant on this PC, reported for
    /// monitoring: spooled as an `interaction` event and answered like a
    /// `message`.
    Interaction {
        /// The assistant's session.
        session_id: String,
        /// What the user asked.
        #[serde(default)]
        user_input: String,
        /// The intent recognised.
        #[serde(default)]
        intent: Option<String>,
        /// Tools called, in order.
        #[serde(default)]
        tools_used: Vec<String>,
        /// How long the answer took, milliseconds.
        response_time_ms: f64,
        /// Whether it succeeded.
        success: bool,
        /// What went wrong.
        #[serde(default)]
        error_type: Option<String>,
        /// The model that answered.
        #[serde(default)]
        model: Option<String>,
        /// Tokens generated.
        #[serde(default)]
        tokens: Option<u32>,
        /// When it happened.
        #[serde(default)]
        time: Option<DateTime<Utc>>,
        /// Echoed in `accepted`.
        #[serde(default, rename = "ref")]
        reference: Option<String>,
    },
    /// A `send` went out.
    Sent {
        /// The reply.
        reply_id: String,
    },
    /// A `send` failed.
    SendFailed {
        /// The reply.
        reply_id: String,
        /// Why.
        #[serde(default)]
        error: String,
    },
    /// Liveness check.
    Ping,
}

/// A line to a client.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToClient {
    /// Answer to a good `hello`.
    Welcome {
        /// Protocol version.
        v: u32,
        /// This agent's id.
        agent: String,
    },
    /// A message was spooled.
    Accepted {
        /// Its event id.
        event_id: EventId,
        /// The client's `ref`.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
    /// Send a chat message.
    Send {
        /// The reply this comes from.
        reply_id: String,
        /// The message it answers.
        event_id: EventId,
        /// Where to send.
        chat: String,
        /// What to send.
        text: String,
    },
    /// A conversation was handed to a person.
    Escalation {
        /// The reply.
        reply_id: String,
        /// The message.
        event_id: EventId,
        /// The chat.
        chat: String,
        /// Why.
        reason: String,
    },
    /// A next-activity prediction.
    Prediction {
        /// The reply.
        reply_id: String,
        /// The request it answers.
        event_id: EventId,
        /// What comes next.
        prediction: String,
        /// How sure, 0 to 1.
        confidence: f32,
    },
    /// An alert raised about this desktop.
    Alert {
        /// The reply.
        reply_id: String,
        /// The rule.
        rule: String,
        /// What to show.
        message: String,
    },
    /// A line was not understood.
    Error {
        /// What was wrong.
        message: String,
    },
    /// Answer to `ping`.
    Pong,
}

/// Writes `line` as one JSON line.
pub(super) async fn write_line(w: &mut tokio::net::tcp::OwnedWriteHalf, line: &ToClient) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(line).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    w.write_all(&bytes).await
}

/// The next parsed line; `None` at end of stream or shutdown.
pub(super) async fn read_line(
    lines: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    buf: &mut String,
    shutdown: &CancellationToken,
) -> Option<Result<FromClient, String>> {
    loop {
        buf.clear();
        let mut limited = (&mut *lines).take(MAX_LINE as u64 + 1);
        let n = tokio::select! {
            _ = shutdown.cancelled() => return None,
            r = limited.read_line(buf) => match r {
                Ok(n) => n,
                Err(error) => return Some(Err(format!("unreadable line: {error}"))),
            },
        };
        if n == 0 {
            return None;
        }
        if n > MAX_LINE {
            return Some(Err(format!("line longer than {MAX_LINE} bytes")));
        }
        let line = buf.trim();
        if line.is_empty() {
            continue;
        }
        return Some(serde_json::from_str(line).map_err(|e| format!("bad line: {e}")));
    }
}

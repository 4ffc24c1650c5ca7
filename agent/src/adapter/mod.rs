//! The chat adapter protocol: JSON lines over loopback TCP between the agent
//! and a local adapter process (e.g. the `wxauto` bridge for WeChat).
//!
//! The agent listens (default `127.0.0.1:7301`, loopback only); adapters and
//! other local listeners connect. Every line is one JSON object with a
//! `type`. The first line from a client must be `hello` with the protocol
//! version `v` and the install's token; the agent answers `welcome` or an
//! `error` and closes.
//!
//! Loopback is not a boundary between the programs of one PC, so a client
//! proves it may read the agent's files: the token is a random secret the
//! agent writes once into [`TOKEN_FILE`] in its spool directory, readable
//! by its user only (mode 0600; on Windows the spool's directory under the
//! user's local app data carries the user's ACL). One client that sends
//! chat messages at a time: a second is refused while the first is
//! connected (listeners are not limited).
//!
//! From the client:
//! - `{"type":"hello","v":1,"token":"…","name":"wxauto","sends":true}`:
//!   `sends` says the client can send chat messages (an adapter); without
//!   it the client only listens (predictions, escalations, alerts).
//! - `{"type":"message","chat":"Alice","chat_type":"direct","sender":"Alice","content":"hi","msg_type":"text","time":"2026-11-22T10:00:00+08:00","ref":"42"}`:
//!   an incoming chat message; `chat_type` (`direct`/`group`), `msg_type`
//!   (`text`/`image`/`file`/`other`), `time` and `ref` are optional. The
//!   agent spools it as a chat event and, once the spool has committed it
//!   (it then survives a crash of the agent), answers `accepted` with the
//!   event id and the same `ref`. Until then the adapter keeps the message,
//!   and offers it again on its next connection. `ref` identifies the
//!   message among those of the adapter's `name`: the spool remembers the
//!   last [`REFS_CAPACITY`](crate::spool::REFS_CAPACITY) references, and a
//!   message offered again with one of them is answered `accepted` with
//!   the event it already became, not spooled twice.
//! - `{"type":"interaction","session_id":"s-1","user_input":"…","intent":"refund","tools_used":["orders.lookup"],"response_time_ms":840,"success":true,"error_type":null,"model":"…","tokens":57,"time":"…","ref":"43"}`:
//!   an AI assistant on this PC reports one interaction (only `session_id`,
//!   `response_time_ms` and `success` are required); spooled as an
//!   `interaction` event and `accepted` like a `message`. Any client may
//!   send it, a listener too.
//! - `{"type":"sent","reply_id":"…"}` / `{"type":"send_failed","reply_id":"…","error":"…"}`:
//!   the outcome of a `send`. The agent records a chat reply as done only
//!   after `sent`; a `send_failed`, or no answer within
//!   [`SEND_CONFIRM_TIMEOUT`], makes it send again, and after
//!   [`SEND_TRIES`] tries the reply goes to every client as an `escalation`
//!   for a person to send. So a `send` can come twice with one `reply_id`
//!   (an agent killed between the adapter's send and its `sent`): an adapter
//!   sends a `reply_id` once.
//! - `{"type":"ping"}`: answered by `pong`.
//!
//! From the agent:
//! - `welcome` `{"v":1,"agent":"desk-1"}`, `accepted` `{"event_id","ref"}`.
//! - `send` `{"reply_id","event_id","chat","text"}`: send `text` to `chat`
//!   (only to one client that `sends`).
//! - `escalation` `{"reply_id","event_id","chat","reason"}`, `prediction`
//!   `{"reply_id","event_id","prediction","confidence"}`, `alert`
//!   `{"reply_id","rule","message"}`: to every client.
//! - `error` `{"message"}`: a line was not understood (the connection stays
//!   open, except after a bad `hello`).
//!
//! # Layout
//!
//! - this module: the protocol's constants.
//! - `protocol`: the lines, [`FromClient`] and [`ToClient`], and how they
//!   are read and written.
//! - `token`: the install's token that a client proves itself with.
//! - `clients`: the connected [`Clients`], to which replies go, and the
//!   `send`s waiting for their `sent`.
//! - `spooled`: the chat events waiting for the spool's commit before their
//!   `accepted` ([`Spooled`]).
//! - `server`: [`AdapterServer`], its accept loop and one connection's
//!   conversation. Start here.
//! - `tests`: the protocol spoken over TCP to a server on loopback.

mod clients;
mod protocol;
mod server;
mod spooled;
#[cfg(test)]
mod tests;
mod token;

use std::sync::Mutex;
use std::time::Duration;

pub use clients::{Clients, SendError};
pub use protocol::{FromClient, ToClient};
pub use server::{AdapterError, AdapterServer};
pub use spooled::Spooled;
pub use token::{load_or_create_token, TOKEN_FILE};

/// The protocol version this agent speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7301";
/// Name of the adapter component in the heartbeat.
pub const COMPONENT: &str = "chat-adapter";
/// How long the agent waits for an adapter's `sent` or `send_failed`.
pub const SEND_CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a chat reply is given to an adapter before it is escalated.
pub const SEND_TRIES: u32 = 5;
/// Longest line accepted from a client.
const MAX_LINE: usize = 256 * 1024;
/// Lines queued for one client before it counts as stuck.
const CLIENT_QUEUE: usize = 256;

/// A poisoned lock still holds valid data: every change under these locks
/// is a single insert or removal.
fn unpoisoned<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

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
//! One file on purpose: the protocol's types, the server, the clients a
//! reply is sent to and the spool commits an `accepted` waits for are one
//! conversation, read together; a third of it is its tests.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use ferry_schema::event::{ChatMessage, ChatType, EventBody, MessageType};
use ferry_schema::{AgentId, Envelope, EventId};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::spool::{self, RefKey, Spool};

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

/// The file in the spool directory that holds the adapters' token.
pub const TOKEN_FILE: &str = "adapter.token";

/// The adapters' token in `dir` ([`TOKEN_FILE`]), made (mode 0600) on the
/// first start; a token already there is kept, so adapters keep working
/// across restarts.
pub fn load_or_create_token(dir: &std::path::Path) -> std::io::Result<String> {
    use rand::Rng as _;
    use std::io::Write as _;
    let path = dir.join(TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) if t.trim().len() >= 32 => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(dir)?;
    let token: String = rand::thread_rng()
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(43)
        .map(char::from)
        .collect();
    let partial = dir.join(format!("{TOKEN_FILE}.partial"));
    let _ = std::fs::remove_file(&partial);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&partial)?;
    f.write_all(token.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&partial, &path)?;
    Ok(token)
}

/// Whether `given` is `token`, in time that does not depend on where they
/// first differ.
fn token_matches(given: &str, token: &str) -> bool {
    given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

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

#[derive(Debug)]
struct Client {
    id: u64,
    name: String,
    sends: bool,
    tx: mpsc::Sender<ToClient>,
}

/// A `send` waiting for its `sent`: the client it went to, and who waits.
type Pending = HashMap<String, (u64, oneshot::Sender<Result<(), String>>)>;

/// The connected clients; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Clients {
    inner: Arc<Mutex<Vec<Client>>>,
    changed: Arc<Notify>,
    /// `send`s waiting for the adapter's `sent` or `send_failed`, by reply id.
    pending: Arc<Mutex<Pending>>,
}

/// Why a chat reply was not sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No client that sends is connected.
    #[error("no chat adapter is connected")]
    NoAdapter,
    /// The adapter went away before it answered.
    #[error("the chat adapter disconnected before it confirmed the send")]
    Disconnected,
    /// The adapter did not answer in time.
    #[error("the chat adapter did not confirm the send within {0:?}")]
    Unconfirmed(Duration),
    /// The adapter answered `send_failed`.
    #[error("the chat adapter could not send it: {0}")]
    Failed(String),
}

/// A poisoned lock still holds valid data: every change under these locks
/// is a single insert or removal.
fn unpoisoned<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Clients {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Client>> {
        unpoisoned(&self.inner)
    }

    /// Whether a client that sends is connected.
    pub fn has_sender(&self) -> bool {
        self.lock().iter().any(|c| c.sends)
    }

    /// Waits until a client that sends is connected.
    pub async fn wait_for_sender(&self) {
        loop {
            let changed = self.changed.notified();
            if self.has_sender() {
                return;
            }
            changed.await;
        }
    }

    /// Gives `line`, the `send` of reply `reply_id`, to the first connected
    /// client that sends, and waits up to `within` for its `sent` (`Ok`) or
    /// `send_failed`.
    pub async fn send_confirmed(&self, reply_id: &str, line: ToClient, within: Duration) -> Result<(), SendError> {
        let (tx, answer) = {
            let clients = self.lock();
            let client = clients.iter().find(|c| c.sends).ok_or(SendError::NoAdapter)?;
            let (done, answer) = oneshot::channel();
            // Registered while the client list is locked, so a client
            // removed meanwhile also drops this entry (see `remove`).
            unpoisoned(&self.pending).insert(reply_id.to_string(), (client.id, done));
            (client.tx.clone(), answer)
        };
        let result = async {
            tx.send(line).await.map_err(|_| SendError::Disconnected)?;
            match tokio::time::timeout(within, answer).await {
                Err(_) => Err(SendError::Unconfirmed(within)),
                Ok(Err(_)) => Err(SendError::Disconnected),
                Ok(Ok(Err(error))) => Err(SendError::Failed(error)),
                Ok(Ok(Ok(()))) => Ok(()),
            }
        }
        .await;
        unpoisoned(&self.pending).remove(reply_id);
        result
    }

    /// Hands a client's `sent` / `send_failed` to whoever waits for it;
    /// false when nobody does (a late answer after a timeout).
    fn confirm(&self, reply_id: &str, outcome: Result<(), String>) -> bool {
        match unpoisoned(&self.pending).remove(reply_id) {
            Some((_, waiter)) => waiter.send(outcome).is_ok(),
            None => false,
        }
    }

    /// Gives `line` to every client; returns how many got it.
    pub async fn broadcast(&self, line: ToClient) -> usize {
        let txs: Vec<_> = self.lock().iter().map(|c| c.tx.clone()).collect();
        let mut n = 0;
        for tx in txs {
            if tx.send(line.clone()).await.is_ok() {
                n += 1;
            }
        }
        n
    }

    fn add(&self, client: Client) {
        self.lock().push(client);
        self.changed.notify_waiters();
    }

    fn remove(&self, id: u64) {
        self.lock().retain(|c| c.id != id);
        // Its unanswered sends fail now rather than after the timeout.
        unpoisoned(&self.pending).retain(|_, (client, _)| *client != id);
        self.changed.notify_waiters();
    }

    fn describe(&self) -> String {
        let names: Vec<String> = self
            .lock()
            .iter()
            .map(|c| format!("{}{}", c.name, if c.sends { "" } else { " (listener)" }))
            .collect();
        names.join(", ")
    }
}

/// Chat events from adapters that wait for the spool's commit, so that
/// `accepted` means "on disk". Cheap to clone: the spool writer asks
/// [`Spooled::refs_of`] for the references of every batch it writes and
/// calls [`Spooled::committed`] once the batch is durable.
#[derive(Debug, Clone, Default)]
pub struct Spooled {
    inner: Arc<Mutex<Waiting>>,
}

#[derive(Debug, Default)]
struct Waiting {
    /// Event -> who waits for its commit, and the adapter reference it has.
    events: HashMap<EventId, (Vec<oneshot::Sender<()>>, Option<RefKey>)>,
    /// Reference -> the event it became, until committed.
    refs: HashMap<RefKey, EventId>,
}

impl Spooled {
    /// Resolves once `id` is committed (an error if it never will be).
    fn register(&self, id: EventId, reference: Option<RefKey>) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let mut w = unpoisoned(&self.inner);
        w.events.insert(id, (vec![tx], reference));
        if let Some(key) = reference {
            w.refs.insert(key, id);
        }
        rx
    }

    /// The event a reference became when it is still on its way to the
    /// spool, with a receiver resolved at its commit.
    fn join(&self, key: RefKey) -> Option<(EventId, oneshot::Receiver<()>)> {
        let mut w = unpoisoned(&self.inner);
        let id = *w.refs.get(&key)?;
        let (waiters, _) = w.events.get_mut(&id)?;
        let (tx, rx) = oneshot::channel();
        waiters.push(tx);
        Some((id, rx))
    }

    /// The adapter references of `events`, for the spool to remember in the
    /// same transaction.
    pub fn refs_of(&self, events: &[Envelope]) -> Vec<(RefKey, EventId)> {
        let w = unpoisoned(&self.inner);
        if w.refs.is_empty() {
            return Vec::new();
        }
        events
            .iter()
            .filter_map(|e| w.events.get(&e.id).and_then(|(_, r)| *r).map(|r| (r, e.id)))
            .collect()
    }

    /// Tells the adapters that `events` are durable in the spool.
    pub fn committed(&self, events: &[Envelope]) {
        let mut w = unpoisoned(&self.inner);
        if w.events.is_empty() {
            return;
        }
        for e in events {
            if let Some((waiters, reference)) = w.events.remove(&e.id) {
                if let Some(key) = reference {
                    w.refs.remove(&key);
                }
                for tx in waiters {
                    let _ = tx.send(());
                }
            }
        }
    }
}

/// The listening side of the protocol.
#[derive(Debug)]
pub struct AdapterServer {
    listener: TcpListener,
    clients: Clients,
    spooled: Spooled,
    token: Arc<str>,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// The address is not a loopback address.
    #[error("adapter.listen = {0}: the chat adapter protocol is unauthenticated, so it listens on loopback only (127.0.0.1 or ::1)")]
    NotLoopback(SocketAddr),
    /// Binding failed.
    #[error("adapter.listen = {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl AdapterServer {
    /// Binds `addr` (loopback only); clients must say `token` in their hello.
    pub async fn bind(addr: SocketAddr, token: &str) -> Result<Self, AdapterError> {
        if !addr.ip().is_loopback() {
            return Err(AdapterError::NotLoopback(addr));
        }
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AdapterError::Bind { addr, source })?;
        Ok(Self {
            listener,
            clients: Clients::default(),
            spooled: Spooled::default(),
            token: Arc::from(token),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The clients, for delivering replies.
    pub fn clients(&self) -> Clients {
        self.clients.clone()
    }

    /// The adapters' messages waiting for the spool; the spool writer must
    /// report its commits here, or no message is ever `accepted`.
    pub fn spooled(&self) -> Spooled {
        self.spooled.clone()
    }

    /// Accepts clients until `shutdown`; their chat messages become chat
    /// events on `out`, except a message whose `ref` `spool` already has.
    pub async fn run(
        self,
        agent: AgentId,
        spool: Spool,
        out: mpsc::Sender<Envelope>,
        health: Health,
        shutdown: CancellationToken,
    ) {
        health.set(COMPONENT, false, Some("no adapter connected".into()));
        let mut next_id = 0u64;
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(error) => {
                        tracing::warn!(%error, "adapter accept failed");
                        continue;
                    }
                },
            };
            next_id += 1;
            let conn = Conn {
                spool: spool.clone(),
                clients: self.clients.clone(),
                spooled: self.spooled.clone(),
                agent: agent.clone(),
                out: out.clone(),
                health: health.clone(),
                shutdown: shutdown.clone(),
                token: self.token.clone(),
            };
            let id = next_id;
            tokio::spawn(async move {
                serve(id, stream, &conn).await;
                conn.clients.remove(id);
                report(&conn.clients, &conn.health);
                tracing::info!(%peer, "adapter client disconnected");
            });
        }
    }
}

fn report(clients: &Clients, health: &Health) {
    let who = clients.describe();
    if clients.has_sender() {
        health.set(COMPONENT, true, Some(who));
    } else if who.is_empty() {
        health.set(COMPONENT, false, Some("no adapter connected".into()));
    } else {
        health.set(COMPONENT, false, Some(format!("only listeners: {who}")));
    }
}

async fn write_line(w: &mut tokio::net::tcp::OwnedWriteHalf, line: &ToClient) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(line).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    w.write_all(&bytes).await
}

/// What one connection works with.
struct Conn {
    spool: Spool,
    clients: Clients,
    spooled: Spooled,
    agent: AgentId,
    out: mpsc::Sender<Envelope>,
    health: Health,
    shutdown: CancellationToken,
    token: Arc<str>,
}

async fn serve(id: u64, stream: TcpStream, conn: &Conn) {
    let Conn { spool, clients, spooled, agent, out, health, shutdown, token } = conn;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mut buf = String::new();
    // The hello.
    let hello = match read_line(&mut lines, &mut buf, shutdown).await {
        Some(Ok(FromClient::Hello { v, token: given, name, sends })) if v == PROTOCOL_VERSION => {
            if !given.as_deref().is_some_and(|g| token_matches(g, token)) {
                tracing::warn!(client = ?name, "adapter client refused: wrong or missing token");
                let message = format!("the hello must carry the token from the agent's {TOKEN_FILE} (in its spool directory)");
                let _ = write_line(&mut write, &ToClient::Error { message }).await;
                return;
            }
            if sends && clients.has_sender() {
                let message = format!("another adapter ({}) is connected; one at a time", clients.describe());
                let _ = write_line(&mut write, &ToClient::Error { message }).await;
                return;
            }
            (name, sends)
        }
        Some(Ok(FromClient::Hello { v, .. })) => {
            let message = format!("unsupported protocol version {v}; this agent speaks {PROTOCOL_VERSION}");
            let _ = write_line(&mut write, &ToClient::Error { message }).await;
            return;
        }
        Some(Ok(_)) => {
            let message = "the first line must be {\"type\":\"hello\",\"v\":1,...}".to_string();
            let _ = write_line(&mut write, &ToClient::Error { message }).await;
            return;
        }
        Some(Err(message)) => {
            let _ = write_line(&mut write, &ToClient::Error { message }).await;
            return;
        }
        None => return,
    };
    // References are an adapter's own: scoped by its name (adapters that
    // give none share one scope).
    let refs_scope = hello.0.clone().unwrap_or_default();
    let refs_scope = refs_scope.as_str();
    let name = hello.0.unwrap_or_else(|| format!("client-{id}"));
    let welcome = ToClient::Welcome {
        v: PROTOCOL_VERSION,
        agent: agent.to_string(),
    };
    if write_line(&mut write, &welcome).await.is_err() {
        return;
    }
    let (tx, mut rx) = mpsc::channel::<ToClient>(CLIENT_QUEUE);
    tracing::info!(client = %name, sends = hello.1, "adapter client connected");
    clients.add(Client {
        id,
        name: name.clone(),
        sends: hello.1,
        tx: tx.clone(),
    });
    report(clients, health);
    let writer = tokio::spawn(async move {
        while let Some(line) = rx.recv().await {
            if let Err(error) = write_line(&mut write, &line).await {
                tracing::warn!(%error, "writing to adapter failed");
                break;
            }
        }
    });
    loop {
        let Some(parsed) = read_line(&mut lines, &mut buf, shutdown).await else {
            break;
        };
        let answer = match parsed {
            Err(message) => Some(ToClient::Error { message }),
            Ok(FromClient::Hello { .. }) => Some(ToClient::Error {
                message: "hello was already received".into(),
            }),
            Ok(FromClient::Ping) => Some(ToClient::Pong),
            Ok(FromClient::Sent { reply_id }) => {
                if !clients.confirm(&reply_id, Ok(())) {
                    tracing::debug!(client = %name, reply = %reply_id, "`sent` for a send nobody waits for");
                }
                None
            }
            Ok(FromClient::SendFailed { reply_id, error }) => {
                tracing::warn!(client = %name, reply = %reply_id, %error, "adapter could not send reply");
                clients.confirm(&reply_id, Err(error));
                None
            }
            Ok(FromClient::Message {
                chat,
                chat_type,
                sender,
                content,
                msg_type,
                time,
                reference,
            }) => {
                // A message offered again (the agent died, or the connection
                // dropped, before its `accepted`) is the event it already became.
                let key = reference.as_deref().map(|r| spool.ref_key(refs_scope, r));
                let known = match key {
                    Some(key) => known_ref(spool, spooled, key).await,
                    None => None,
                };
                let (event_id, committed) = match known {
                    Some(known) => {
                        tracing::info!(client = %name, event = %known.0, "message offered again; accepted as before");
                        known
                    }
                    None => {
                        let mut env = Envelope::new(
                            agent.clone(),
                            EventBody::Chat(ChatMessage {
                                chat,
                                chat_type,
                                sender,
                                text: content,
                                msg_type,
                            }),
                        );
                        if let Some(t) = time {
                            env.ts = t;
                        }
                        let event_id = env.id;
                        let committed = spooled.register(event_id, key);
                        // Waits while the spool's intake is full: the adapter then
                        // stops being read, and TCP slows it down.
                        if out.send(env).await.is_err() {
                            break;
                        }
                        (event_id, committed)
                    }
                };
                // `accepted` once the spool has committed it; meanwhile the
                // next lines are read, so a burst shares one commit.
                let tx = tx.clone();
                tokio::spawn(async move {
                    let answer = match committed.await {
                        Ok(()) => ToClient::Accepted { event_id, reference },
                        Err(_) => ToClient::Error {
                            message: format!(
                                "message {} was not spooled (the agent is stopping); send it again",
                                reference.as_deref().unwrap_or("without ref")
                            ),
                        },
                    };
                    let _ = tx.send(answer).await;
                });
                None
            }
        };
        if let Some(answer) = answer {
            if tx.send(answer).await.is_err() {
                break;
            }
        }
    }
    // The caller removes the client from `clients`.
    drop(tx);
    writer.abort();
}

/// The event a message reference already became: one still on its way to
/// the spool (with its commit to wait for), else one the spool remembers
/// (committed). A spool that cannot be read counts as not knowing it.
async fn known_ref(spool: &Spool, spooled: &Spooled, key: RefKey) -> Option<(EventId, oneshot::Receiver<()>)> {
    // Looked up in this order, a reference is found: it leaves `spooled`
    // only after the spool has committed it.
    if let Some(pending) = spooled.join(key) {
        return Some(pending);
    }
    match spool::blocking(spool, move |s| s.event_for_ref(key)).await {
        Ok(Some(id)) => {
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(());
            Some((id, rx))
        }
        Ok(None) => None,
        Err(error) => {
            tracing::warn!(%error, "cannot look up a message reference; spooling the message");
            None
        }
    }
}

/// The next parsed line; `None` at end of stream or shutdown.
async fn read_line(
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


#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    const TEST_TOKEN: &str = "test-token";
    use super::*;

    #[test]
    fn lines_parse_as_documented() {
        let m: FromClient = serde_json::from_str(
            r#"{"type":"message","chat":"张三","chat_type":"group","sender":"李四","content":"你好","msg_type":"text","time":"2026-11-22T10:00:00+08:00","ref":"7"}"#,
        )
        .unwrap();
        let FromClient::Message { chat_type, time, reference, .. } = m else { panic!() };
        assert_eq!(chat_type, ChatType::Group);
        assert_eq!(time.unwrap().to_rfc3339(), "2026-11-22T02:00:00+00:00");
        assert_eq!(reference.as_deref(), Some("7"));
        let e = serde_json::from_str::<FromClient>(r#"{"type":"message","chat":"a","sender":"a"}"#).unwrap_err();
        assert!(e.to_string().contains("missing field `content`"), "{e}");
        let e = serde_json::from_str::<FromClient>(r#"{"type":"fax"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown variant `fax`"), "{e}");
        let line = serde_json::to_string(&ToClient::Send {
            reply_id: "r".into(),
            event_id: EventId(uuid::Uuid::nil()),
            chat: "c".into(),
            text: "t".into(),
        })
        .unwrap();
        assert_eq!(
            line,
            r#"{"type":"send","reply_id":"r","event_id":"00000000-0000-0000-0000-000000000000","chat":"c","text":"t"}"#
        );
    }

    #[tokio::test]
    async fn a_client_talks_the_protocol() {
        let server = AdapterServer::bind("127.0.0.1:0".parse().unwrap(), TEST_TOKEN).await.unwrap();
        let addr = server.local_addr().unwrap();
        let clients = server.clients();
        let spooled = server.spooled();
        let (tx, mut rx) = mpsc::channel(8);
        let stop = CancellationToken::new();
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(crate::spool::SpoolConfig::new(dir.path())).unwrap();
        tokio::spawn(server.run(AgentId::new("desk-1").unwrap(), spool, tx, Health::default(), stop.clone()));
        let stream = TcpStream::connect(addr).await.unwrap();
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r).lines();
        w.write_all(b"{\"type\":\"hello\",\"v\":1,\"token\":\"test-token\",\"name\":\"t\",\"sends\":true}\n").await.unwrap();
        assert!(r.next_line().await.unwrap().unwrap().contains("\"welcome\""));
        w.write_all(b"{\"type\":\"message\",\"chat\":\"A\",\"sender\":\"A\",\"content\":\"hi\",\"ref\":\"1\"}\nnot json\n")
            .await
            .unwrap();
        let env = rx.recv().await.unwrap();
        assert!(matches!(env.body, EventBody::Chat(ref c) if c.text == "hi" && c.chat == "A"));
        // No `accepted` before the spool's commit: the bad line's answer
        // comes first.
        assert!(r.next_line().await.unwrap().unwrap().contains("bad line"));
        // The same adapter offers it again on another connection before the
        // commit: it is the same event, not a second one.
        let again = TcpStream::connect(addr).await.unwrap();
        let (r2, mut w2) = again.into_split();
        let mut r2 = BufReader::new(r2).lines();
        w2.write_all(b"{\"type\":\"hello\",\"v\":1,\"token\":\"test-token\",\"name\":\"t\"}\n").await.unwrap();
        assert!(r2.next_line().await.unwrap().unwrap().contains("\"welcome\""));
        w2.write_all(b"{\"type\":\"message\",\"chat\":\"A\",\"sender\":\"A\",\"content\":\"hi\",\"ref\":\"1\"}\n{\"type\":\"ping\"}\n")
            .await
            .unwrap();
        assert!(r2.next_line().await.unwrap().unwrap().contains("\"pong\""));
        assert!(rx.try_recv().is_err(), "the message offered again was queued again");
        spooled.committed(std::slice::from_ref(&env));
        let accepted = r.next_line().await.unwrap().unwrap();
        assert!(accepted.contains("\"accepted\"") && accepted.contains(&env.id.to_string()) && accepted.contains("\"ref\":\"1\""), "{accepted}");
        let accepted = r2.next_line().await.unwrap().unwrap();
        assert!(accepted.contains("\"accepted\"") && accepted.contains(&env.id.to_string()), "{accepted}");
        drop((r2, w2));
        clients.wait_for_sender().await;
        let send = |reply_id: &'static str, within: Duration| {
            let clients = clients.clone();
            let line = ToClient::Send {
                reply_id: reply_id.into(),
                event_id: env.id,
                chat: "A".into(),
                text: format!("hello {reply_id}"),
            };
            tokio::spawn(async move { clients.send_confirmed(reply_id, line, within).await })
        };
        // `sent` confirms a send.
        let sending = send("r1", Duration::from_secs(30));
        assert!(r.next_line().await.unwrap().unwrap().contains("\"text\":\"hello r1\""));
        w.write_all(b"{\"type\":\"sent\",\"reply_id\":\"r1\"}\n").await.unwrap();
        sending.await.unwrap().unwrap();
        // `send_failed` says why.
        let sending = send("r2", Duration::from_secs(30));
        assert!(r.next_line().await.unwrap().unwrap().contains("hello r2"));
        w.write_all(b"{\"type\":\"send_failed\",\"reply_id\":\"r2\",\"error\":\"window closed\"}\n").await.unwrap();
        let failed = sending.await.unwrap();
        assert!(matches!(&failed, Err(SendError::Failed(e)) if e == "window closed"), "{failed:?}");
        // No answer in time.
        let sending = send("r3", Duration::from_millis(200));
        assert!(r.next_line().await.unwrap().unwrap().contains("hello r3"));
        assert!(matches!(sending.await.unwrap(), Err(SendError::Unconfirmed(_))));
        // A client that leaves fails the send waiting on it at once.
        let sending = send("r4", Duration::from_secs(60));
        assert!(r.next_line().await.unwrap().unwrap().contains("hello r4"));
        drop((r, w));
        let gone = tokio::time::timeout(Duration::from_secs(10), sending).await.unwrap().unwrap();
        assert!(matches!(gone, Err(SendError::Disconnected)), "{gone:?}");
        stop.cancel();
    }

    #[tokio::test]
    async fn wrong_version_and_non_loopback_are_refused() {
        assert!(matches!(
            AdapterServer::bind("0.0.0.0:0".parse().unwrap(), TEST_TOKEN).await,
            Err(AdapterError::NotLoopback(_))
        ));
        let server = AdapterServer::bind("127.0.0.1:0".parse().unwrap(), TEST_TOKEN).await.unwrap();
        let addr = server.local_addr().unwrap();
        let (tx, _rx) = mpsc::channel(8);
        let stop = CancellationToken::new();
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(crate::spool::SpoolConfig::new(dir.path())).unwrap();
        tokio::spawn(server.run(AgentId::new("desk-1").unwrap(), spool, tx, Health::default(), stop.clone()));
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"{\"type\":\"hello\",\"v\":2}\n").await.unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        assert!(text.contains("unsupported protocol version 2; this agent speaks 1"), "{text}");
        // Without the token, or with a wrong one: refused and closed.
        for hello in [
            &b"{\"type\":\"hello\",\"v\":1,\"name\":\"x\",\"sends\":true}\n"[..],
            &b"{\"type\":\"hello\",\"v\":1,\"token\":\"test-tokem\",\"sends\":true}\n"[..],
        ] {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(hello).await.unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).await.unwrap();
            assert!(text.contains("must carry the token") && !text.contains("welcome"), "{text}");
        }
        // With it: welcome; a second sender meanwhile is refused.
        let first = TcpStream::connect(addr).await.unwrap();
        let (r1, mut w1) = first.into_split();
        let mut r1 = BufReader::new(r1).lines();
        w1.write_all(b"{\"type\":\"hello\",\"v\":1,\"token\":\"test-token\",\"name\":\"a\",\"sends\":true}\n").await.unwrap();
        assert!(r1.next_line().await.unwrap().unwrap().contains("\"welcome\""));
        let mut second = TcpStream::connect(addr).await.unwrap();
        second.write_all(b"{\"type\":\"hello\",\"v\":1,\"token\":\"test-token\",\"name\":\"b\",\"sends\":true}\n").await.unwrap();
        let mut text = String::new();
        second.read_to_string(&mut text).await.unwrap();
        assert!(text.contains("another adapter") && text.contains("one at a time"), "{text}");
        stop.cancel();
    }

    /// The token file is made once, private to the user, and kept.
    #[test]
    fn the_token_is_made_once_and_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let t = load_or_create_token(dir.path()).unwrap();
        assert!(t.len() >= 32);
        assert_eq!(load_or_create_token(dir.path()).unwrap(), t);
        let mode = std::fs::metadata(dir.path().join(TOKEN_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(token_matches(&t, &t) && !token_matches("x", &t));
    }
}

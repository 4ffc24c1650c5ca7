//! The listening side: accepting clients, and one client's conversation from `hello` on.

use std::net::SocketAddr;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use ferry_schema::event::{ChatMessage, EventBody, Interaction};
use ferry_schema::{AgentId, Envelope, EventId};
use tokio::io::BufReader;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::clients::Client;
use super::protocol::{read_line, write_line};
use super::token::token_matches;
use super::{Clients, FromClient, Spooled, ToClient, CLIENT_QUEUE, COMPONENT, PROTOCOL_VERSION, TOKEN_FILE};
use crate::health::Health;
use crate::spool::{self, RefKey, Spool};

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

    /// Accepts clients until `shutdown`; their chat messages and
    /// interactions become events on `out`, except one whose `ref` `spool`
    /// already has.
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

/// Tells the heartbeat which clients are connected, and whether one sends.
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

/// One client's conversation: its `hello`, then its lines until it leaves,
/// the agent stops, or the spool's intake is closed.
async fn serve(id: u64, stream: TcpStream, conn: &Conn) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mut buf = String::new();
    let Some((hello_name, sends)) = hello(&mut lines, &mut buf, &mut write, conn).await else {
        return;
    };
    // References are an adapter's own: scoped by its name (adapters that
    // give none share one scope).
    let refs_scope = hello_name.clone().unwrap_or_default();
    let name = hello_name.unwrap_or_else(|| format!("client-{id}"));
    let welcome = ToClient::Welcome {
        v: PROTOCOL_VERSION,
        agent: conn.agent.to_string(),
    };
    if write_line(&mut write, &welcome).await.is_err() {
        return;
    }
    let (tx, mut rx) = mpsc::channel::<ToClient>(CLIENT_QUEUE);
    tracing::info!(client = %name, sends, "adapter client connected");
    conn.clients.add(Client {
        id,
        name: name.clone(),
        sends,
        tx: tx.clone(),
    });
    report(&conn.clients, &conn.health);
    let writer = tokio::spawn(async move {
        while let Some(line) = rx.recv().await {
            if let Err(error) = write_line(&mut write, &line).await {
                tracing::warn!(%error, "writing to adapter failed");
                break;
            }
        }
    });
    let client = Talking { name: &name, refs_scope: &refs_scope, tx: &tx };
    while let Some(parsed) = read_line(&mut lines, &mut buf, &conn.shutdown).await {
        let answer = match parsed {
            Err(message) => Some(ToClient::Error { message }),
            Ok(FromClient::Hello { .. }) => Some(ToClient::Error {
                message: "hello was already received".into(),
            }),
            Ok(FromClient::Ping) => Some(ToClient::Pong),
            Ok(FromClient::Sent { reply_id }) => {
                if !conn.clients.confirm(&reply_id, Ok(())) {
                    tracing::debug!(client = %name, reply = %reply_id, "`sent` for a send nobody waits for");
                }
                None
            }
            Ok(FromClient::SendFailed { reply_id, error }) => {
                tracing::warn!(client = %name, reply = %reply_id, %error, "adapter could not send reply");
                conn.clients.confirm(&reply_id, Err(error));
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
                let message = ChatMessage {
                    chat,
                    chat_type,
                    sender,
                    text: content,
                    msg_type,
                };
                if !client.event(conn, EventBody::Chat(message), time, reference).await {
                    break;
                }
                None
            }
            Ok(FromClient::Interaction {
                session_id,
                user_input,
                intent,
                tools_used,
                response_time_ms,
                success,
                error_type,
                model,
                tokens,
                time,
                reference,
            }) => {
                let interaction = Interaction {
                    session_id,
                    user_input,
                    intent,
                    tools_used,
                    response_time_ms,
                    success,
                    error_type,
                    model,
                    tokens,
                };
                if !client.event(conn, EventBody::Interaction(interaction), time, reference).await {
                    break;
                }
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

/// Reads the client's `hello` and checks it: its version, its token, and
/// one client that sends at a time. Its name and whether it sends when it
/// may go on; otherwise the client was told why (or is gone).
async fn hello(
    lines: &mut BufReader<OwnedReadHalf>,
    buf: &mut String,
    write: &mut OwnedWriteHalf,
    conn: &Conn,
) -> Option<(Option<String>, bool)> {
    let refusal = match read_line(lines, buf, &conn.shutdown).await? {
        Ok(FromClient::Hello { v, token: given, name, sends }) if v == PROTOCOL_VERSION => {
            if !given.as_deref().is_some_and(|g| token_matches(g, &conn.token)) {
                tracing::warn!(client = ?name, "adapter client refused: wrong or missing token");
                format!("the hello must carry the token from the agent's {TOKEN_FILE} (in its spool directory)")
            } else if sends && conn.clients.has_sender() {
                format!("another adapter ({}) is connected; one at a time", conn.clients.describe())
            } else {
                return Some((name, sends));
            }
        }
        Ok(FromClient::Hello { v, .. }) => {
            format!("unsupported protocol version {v}; this agent speaks {PROTOCOL_VERSION}")
        }
        Ok(_) => "the first line must be {\"type\":\"hello\",\"v\":1,...}".to_string(),
        Err(message) => message,
    };
    let _ = write_line(write, &ToClient::Error { message: refusal }).await;
    None
}

/// A client past its `hello`.
struct Talking<'a> {
    /// Its name, for logs.
    name: &'a str,
    /// Whose message references it gives (the name from its `hello`).
    refs_scope: &'a str,
    /// Its connection's writer.
    tx: &'a mpsc::Sender<ToClient>,
}

impl Talking<'_> {
    /// Queues a chat message or an interaction from the client as an event
    /// and answers `accepted` once the spool has committed it; false when
    /// the spool's intake is closed (the agent is stopping).
    async fn event(
        &self,
        conn: &Conn,
        body: EventBody,
        time: Option<DateTime<Utc>>,
        reference: Option<String>,
    ) -> bool {
        // A message offered again (the agent died, or the connection
        // dropped, before its `accepted`) is the event it already became.
        let key = reference.as_deref().map(|r| conn.spool.ref_key(self.refs_scope, r));
        let known = match key {
            Some(key) => known_ref(&conn.spool, &conn.spooled, key).await,
            None => None,
        };
        let (event_id, committed) = match known {
            Some(known) => {
                tracing::info!(client = %self.name, event = %known.0, "message offered again; accepted as before");
                known
            }
            None => {
                let mut env = Envelope::new(conn.agent.clone(), body);
                if let Some(t) = time {
                    env.ts = t;
                }
                let event_id = env.id;
                let committed = conn.spooled.register(event_id, key);
                // Waits while the spool's intake is full: the adapter then
                // stops being read, and TCP slows it down.
                if conn.out.send(env).await.is_err() {
                    return false;
                }
                (event_id, committed)
            }
        };
        // `accepted` once the spool has committed it; meanwhile the
        // next lines are read, so a burst shares one commit.
        let tx = self.tx.clone();
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
        true
    }
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

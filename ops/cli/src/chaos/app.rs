//! The application side of a chaos agent: a chat adapter on the agent's adapter port that offers numbered chats and records every reply it is handed.
//!
//! It behaves as the adapter protocol asks of a real adapter (see
//! `ferry_agent::adapter`): a message is kept until the agent answers
//! `accepted`, and offered again, in order, on the next connection when the
//! agent went away first; every `send` is answered `sent`, and a `reply_id`
//! it has seen before is not sent to the chat a second time.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ferry_agent::adapter::PROTOCOL_VERSION;
use serde_json::json;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Chats offered and not yet accepted, at most: the adapter's window.
pub const WINDOW: usize = 64;
/// How often a paced sender looks again whether it may send.
const PACE_TICK: Duration = Duration::from_millis(20);
/// Wait between two connection attempts while the agent is down.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

/// The text of chat `n`: the verdict finds it in the archive by this.
pub fn chat_text(n: u64, model: bool) -> String {
    if model {
        format!("Question {n}: could you tell me the status of my order?")
    } else {
        format!("chaos chat {n}")
    }
}

/// The chat number in a text made by [`chat_text`].
pub fn chat_number(text: &str) -> Option<u64> {
    let rest = text.strip_prefix("chaos chat ").or_else(|| text.strip_prefix("Question "))?;
    rest.split(':').next()?.trim().parse().ok()
}

/// What one agent's application saw.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Chat number to the event ids the agent accepted it as (one id per
    /// `accepted`: a chat offered again is accepted again, as the same
    /// event when the agent recognises its `ref`).
    pub accepted: BTreeMap<u64, Vec<String>>,
    /// Chats offered again on a new connection.
    pub reoffered: BTreeSet<u64>,
    /// Event id to the distinct reply ids handed to the application for it.
    pub replies: HashMap<String, BTreeSet<String>>,
    /// `send`s of a reply id already sent: not sent to the chat again.
    pub resent: u64,
    /// Connections made to the agent.
    pub connections: u64,
}

impl Seen {
    /// Chats with at least one reply.
    pub fn answered(&self) -> usize {
        self.accepted
            .values()
            .filter(|ids| ids.iter().any(|id| self.replies.get(id).is_some_and(|r| !r.is_empty())))
            .count()
    }
}

/// One agent's application side; clones share the record.
#[derive(Debug, Clone)]
pub struct App {
    seen: Arc<Mutex<Seen>>,
}

impl App {
    /// Runs the adapter for `chats` numbered chats against the agent on
    /// `port` until `stop`, reconnecting whenever the agent goes away.
    /// `per_sec` paces the chats (none: as fast as the agent accepts them).
    /// Each hello carries the agent's token, read from `token_file`.
    pub fn start(port: u16, token_file: PathBuf, chats: u64, per_sec: Option<f64>, model: bool, stop: CancellationToken) -> Self {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let app = Self { seen };
        let task = app.clone();
        let pace = Pace::new(per_sec);
        tokio::spawn(async move { task.run(port, &token_file, chats, pace, model, stop).await });
        app
    }

    /// A copy of what was seen so far.
    pub fn seen(&self) -> Seen {
        self.lock().clone()
    }

    /// (accepted, answered) so far.
    pub fn counts(&self) -> (usize, usize) {
        let s = self.lock();
        (s.accepted.len(), s.answered())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        // A poisoned lock still holds a consistent record: every change is one insert.
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn run(&self, port: u16, token_file: &Path, chats: u64, pace: Pace, model: bool, stop: CancellationToken) {
        let mut next = 0u64;
        let mut unaccepted: BTreeSet<u64> = BTreeSet::new();
        let mut sent_ids: BTreeSet<String> = BTreeSet::new();
        while !stop.is_cancelled() {
            let Ok(conn) = TcpStream::connect(("127.0.0.1", port)).await else {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(RECONNECT_PAUSE) => continue,
                }
            };
            // The agent writes its token before it listens.
            let token = std::fs::read_to_string(token_file).unwrap_or_default();
            self.lock().connections += 1;
            let result = self.session(conn, token.trim(), chats, &pace, model, &mut next, &mut unaccepted, &mut sent_ids, &stop).await;
            if let Err(error) = result {
                tracing::debug!(port, %error, "adapter connection ended");
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn session(
        &self,
        conn: TcpStream,
        token: &str,
        chats: u64,
        pace: &Pace,
        model: bool,
        next: &mut u64,
        unaccepted: &mut BTreeSet<u64>,
        sent_ids: &mut BTreeSet<String>,
        stop: &CancellationToken,
    ) -> std::io::Result<()> {
        let (read, mut write) = conn.into_split();
        let mut lines = BufReader::new(read).lines();
        let hello = json!({"type": "hello", "v": PROTOCOL_VERSION, "token": token, "name": "ferry-chaos", "sends": true});
        write.write_all(format!("{hello}\n").as_bytes()).await?;
        // What the last connection left unaccepted is offered again first, in order.
        let again: Vec<u64> = unaccepted.iter().copied().collect();
        if !again.is_empty() {
            self.lock().reoffered.extend(again.iter().copied());
        }
        for n in again {
            write.write_all(message(n, model).as_bytes()).await?;
        }
        loop {
            let can_offer = *next < chats && unaccepted.len() < WINDOW && pace.allows(*next);
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                line = lines.next_line() => {
                    let Some(line) = line? else { return Ok(()) };
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
                    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or_default().to_string();
                    match v.get("type").and_then(|t| t.as_str()) {
                        Some("accepted") => {
                            let Ok(n) = field("ref").parse::<u64>() else { continue };
                            unaccepted.remove(&n);
                            self.lock().accepted.entry(n).or_default().push(field("event_id"));
                        }
                        Some("send") | Some("escalation") => {
                            let (reply, event) = (field("reply_id"), field("event_id"));
                            if v.get("type").and_then(|t| t.as_str()) == Some("send") {
                                let sent = json!({"type": "sent", "reply_id": reply});
                                write.write_all(format!("{sent}\n").as_bytes()).await?;
                            }
                            let mut seen = self.lock();
                            if !sent_ids.insert(reply.clone()) {
                                seen.resent += 1;
                            }
                            seen.replies.entry(event).or_default().insert(reply);
                        }
                        _ => {}
                    }
                }
                () = tokio::time::sleep(PACE_TICK), if !can_offer && *next < chats => {}
                () = std::future::ready(()), if can_offer => {
                    let n = *next;
                    *next += 1;
                    unaccepted.insert(n);
                    write.write_all(message(n, model).as_bytes()).await?;
                }
            }
        }
    }
}

/// A pace: the `n`th item may go once `n / per_sec` seconds have passed.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    start: std::time::Instant,
    per_sec: Option<f64>,
}

impl Pace {
    /// Starts now; `None` allows everything at once.
    pub fn new(per_sec: Option<f64>) -> Self {
        Self { start: std::time::Instant::now(), per_sec: per_sec.filter(|r| *r > 0.0) }
    }

    /// Whether item `n` (from 0) may go now.
    pub fn allows(&self, n: u64) -> bool {
        self.per_sec.is_none_or(|r| n as f64 <= self.start.elapsed().as_secs_f64() * r)
    }

    /// How many items may have gone by now (`u64::MAX` unpaced).
    pub fn allowed(&self) -> u64 {
        self.per_sec.map_or(u64::MAX, |r| (self.start.elapsed().as_secs_f64() * r) as u64 + 1)
    }
}

fn message(n: u64, model: bool) -> String {
    let customer = format!("customer-{}", n % 50);
    let m = json!({
        "type": "message",
        "chat": customer,
        "sender": customer,
        "content": chat_text(n, model),
        "ref": n.to_string(),
    });
    format!("{m}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_numbers_come_back_from_their_texts() {
        for model in [false, true] {
            assert_eq!(chat_number(&chat_text(4711, model)), Some(4711));
        }
        assert_eq!(chat_number("hello"), None);
    }
}

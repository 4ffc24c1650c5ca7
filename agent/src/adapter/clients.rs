//! The connected clients: who gets a reply's lines, and the `send`s waiting for their `sent`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify};

use super::{unpoisoned, ToClient};

/// One connected client.
#[derive(Debug)]
pub(super) struct Client {
    /// The connection's number.
    pub(super) id: u64,
    /// The name from its `hello` (or `client-<id>`).
    pub(super) name: String,
    /// Whether it sends chat messages.
    pub(super) sends: bool,
    /// Its connection's writer.
    pub(super) tx: mpsc::Sender<ToClient>,
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
    pub(super) fn confirm(&self, reply_id: &str, outcome: Result<(), String>) -> bool {
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

    pub(super) fn add(&self, client: Client) {
        self.lock().push(client);
        self.changed.notify_waiters();
    }

    pub(super) fn remove(&self, id: u64) {
        self.lock().retain(|c| c.id != id);
        // Its unanswered sends fail now rather than after the timeout.
        unpoisoned(&self.pending).retain(|_, (client, _)| *client != id);
        self.changed.notify_waiters();
    }

    pub(super) fn describe(&self) -> String {
        let names: Vec<String> = self
            .lock()
            .iter()
            .map(|c| format!("{}{}", c.name, if c.sends { "" } else { " (listener)" }))
            .collect();
        names.join(", ")
    }
}

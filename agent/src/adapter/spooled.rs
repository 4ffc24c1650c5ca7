//! Chat events from adapters waiting for the spool's commit, so that `accepted` means "on disk".

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ferry_schema::{Envelope, EventId};
use tokio::sync::oneshot;

use super::unpoisoned;
use crate::spool::RefKey;

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
    pub(super) fn register(&self, id: EventId, reference: Option<RefKey>) -> oneshot::Receiver<()> {
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
    pub(super) fn join(&self, key: RefKey) -> Option<(EventId, oneshot::Receiver<()>)> {
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

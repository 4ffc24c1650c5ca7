//! What the agent has already done: replies acted on, and the event each adapter message became.
//!
//! Both are bounded tables that forget their oldest entries first: a reply
//! id is remembered so a redelivered reply is never sent to a customer
//! twice ([`ACTED_CAPACITY`] of them), an adapter's message reference so a
//! message offered again is not spooled twice ([`REFS_CAPACITY`]). A
//! reference is stored as a digest keyed with the spool's key, so a chat
//! platform's message id is not readable on disk.

use ferry_schema::{EventId, ReplyId};
use redb::{Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Spool, SpoolError, META};

/// Reply id -> position in `ACTED_ORDER`.
pub(super) const ACTED: TableDefinition<'_, u128, u64> = TableDefinition::new("acted");
/// Position -> reply id, to forget the oldest first.
pub(super) const ACTED_ORDER: TableDefinition<'_, u64, u128> = TableDefinition::new("acted_order");
/// Adapter message reference (a keyed digest, see [`RefKey`]) -> event id.
pub(super) const REFS: TableDefinition<'_, u128, u128> = TableDefinition::new("refs");
/// Position -> reference, to forget the oldest first.
pub(super) const REFS_ORDER: TableDefinition<'_, u64, u128> = TableDefinition::new("refs_order");

const META_ACTED_NEXT: &str = "acted_next";
const META_REFS_NEXT: &str = "refs_next";

/// Reply ids remembered for de-duplication.
pub const ACTED_CAPACITY: u64 = 100_000;
/// Adapter message references remembered, so that a message offered again
/// (the agent died before its `accepted`) is not spooled twice. A re-offer
/// is at most an adapter's window of unaccepted messages old.
pub const REFS_CAPACITY: u64 = 100_000;

/// An adapter's reference to one message, as the spool stores it: a digest
/// keyed with the spool's key, so the reference (a chat platform's message
/// id, say) is not readable on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RefKey(u128);

impl Spool {
    /// The spool's digest of adapter `adapter`'s reference `reference`.
    pub fn ref_key(&self, adapter: &str, reference: &str) -> RefKey {
        RefKey(self.inner.crypt.ref_digest(adapter, reference))
    }

    /// The event an adapter reference became, while it is remembered
    /// (the last [`REFS_CAPACITY`] references).
    pub fn event_for_ref(&self, key: RefKey) -> Result<Option<EventId>, SpoolError> {
        let txn = self.inner.db.begin_read().map_err(|e| self.db_err(e))?;
        let refs = txn.open_table(REFS).map_err(|e| self.db_err(e))?;
        let found = refs.get(key.0).map_err(|e| self.db_err(e))?;
        Ok(found.map(|v| EventId(uuid::Uuid::from_u128(v.value()))))
    }

    /// Remembers, in `txn`, which event each reference in `refs` became.
    pub(super) fn remember_refs(&self, txn: &redb::WriteTransaction, refs: &[(RefKey, EventId)]) -> Result<(), SpoolError> {
        let mut table = txn.open_table(REFS).map_err(|e| self.db_err(e))?;
        let mut order = txn.open_table(REFS_ORDER).map_err(|e| self.db_err(e))?;
        let mut meta = txn.open_table(META).map_err(|e| self.db_err(e))?;
        let mut pos = meta.get(META_REFS_NEXT).map_err(|e| self.db_err(e))?.map_or(0, |v| v.value());
        for (key, id) in refs {
            // A reference already remembered keeps its first event.
            if table.get(key.0).map_err(|e| self.db_err(e))?.is_some() {
                continue;
            }
            table.insert(key.0, id.0.as_u128()).map_err(|e| self.db_err(e))?;
            order.insert(pos, key.0).map_err(|e| self.db_err(e))?;
            if pos >= REFS_CAPACITY {
                if let Some(old) = order.remove(pos - REFS_CAPACITY).map_err(|e| self.db_err(e))? {
                    table.remove(old.value()).map_err(|e| self.db_err(e))?;
                }
            }
            pos += 1;
        }
        meta.insert(META_REFS_NEXT, pos).map_err(|e| self.db_err(e))?;
        Ok(())
    }

    /// Whether the agent has acted on reply `id` (as far as it remembers).
    pub fn has_acted(&self, id: ReplyId) -> Result<bool, SpoolError> {
        let txn = self.inner.db.begin_read().map_err(|e| self.db_err(e))?;
        let acted = txn.open_table(ACTED).map_err(|e| self.db_err(e))?;
        Ok(acted.get(id.0.as_u128()).map_err(|e| self.db_err(e))?.is_some())
    }

    /// Records that the agent acted on reply `id`; false when it already had.
    /// Durable before it returns, so after a crash the reply is not acted on again.
    pub fn mark_acted(&self, id: ReplyId) -> Result<bool, SpoolError> {
        let key = id.0.as_u128();
        let mut txn = self.inner.db.begin_write().map_err(|e| self.db_err(e))?;
        txn.set_durability(Durability::Immediate).map_err(|e| self.db_err(e))?;
        {
            let mut acted = txn.open_table(ACTED).map_err(|e| self.db_err(e))?;
            if acted.get(key).map_err(|e| self.db_err(e))?.is_some() {
                return Ok(false);
            }
            let mut meta = txn.open_table(META).map_err(|e| self.db_err(e))?;
            let pos = meta.get(META_ACTED_NEXT).map_err(|e| self.db_err(e))?.map_or(0, |v| v.value());
            meta.insert(META_ACTED_NEXT, pos + 1).map_err(|e| self.db_err(e))?;
            acted.insert(key, pos).map_err(|e| self.db_err(e))?;
            let mut order = txn.open_table(ACTED_ORDER).map_err(|e| self.db_err(e))?;
            order.insert(pos, key).map_err(|e| self.db_err(e))?;
            if pos >= ACTED_CAPACITY {
                if let Some(old) = order.remove(pos - ACTED_CAPACITY).map_err(|e| self.db_err(e))? {
                    acted.remove(old.value()).map_err(|e| self.db_err(e))?;
                }
            }
        }
        txn.commit().map_err(|e| self.db_err(e))?;
        Ok(true)
    }
}

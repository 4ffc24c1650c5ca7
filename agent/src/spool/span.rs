//! Small named state kept sealed beside the events: the collector's activity span still growing.
//!
//! The collector saves its open span here (see [`crate::collect`]) so a
//! crash does not lose it; each entry is sealed with its name as associated
//! data, so entries cannot be swapped.

use redb::{Durability, ReadableDatabase, TableDefinition};

use super::crypt::Unsealed;
use super::{Spool, SpoolError};

/// Name -> sealed bytes of small state (the open activity span).
pub(super) const STATE: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("state");

impl Spool {
    /// Stores (sealed) or clears a piece of small state under `name`. With
    /// `durable` the commit is fsynced; without, it reaches the disk with the
    /// next durable commit, and a crash before that loses it.
    pub fn put_state(&self, name: &str, value: Option<&[u8]>, durable: bool) -> Result<(), SpoolError> {
        let mut txn = self.inner.db.begin_write().map_err(|e| self.db_err(e))?;
        let durability = if durable { Durability::Immediate } else { Durability::None };
        txn.set_durability(durability).map_err(|e| self.db_err(e))?;
        {
            let mut table = txn.open_table(STATE).map_err(|e| self.db_err(e))?;
            match value {
                Some(v) => {
                    let sealed = self.inner.crypt.seal(state_aad(name).as_bytes(), v)?;
                    table.insert(name, sealed.as_slice()).map_err(|e| self.db_err(e))?;
                }
                None => {
                    table.remove(name).map_err(|e| self.db_err(e))?;
                }
            }
        }
        txn.commit().map_err(|e| self.db_err(e))
    }

    /// The state stored under `name`.
    pub fn get_state(&self, name: &str) -> Result<Option<Vec<u8>>, SpoolError> {
        let txn = self.inner.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = txn.open_table(STATE).map_err(|e| self.db_err(e))?;
        let Some(v) = table.get(name).map_err(|e| self.db_err(e))? else {
            return Ok(None);
        };
        let what = |u| match u {
            Unsealed::TooShort => "state too short",
            Unsealed::Nonce => "nonce",
            Unsealed::Authentication => "state authentication",
        };
        self.inner
            .crypt
            .open(state_aad(name).as_bytes(), v.value())
            .map(Some)
            .map_err(|u| SpoolError::Corrupt { seq: 0, what: what(u) })
    }
}

fn state_aad(name: &str) -> String {
    format!("state:{name}")
}

//! The agent's components report their state here; the heartbeat reads it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use ferry_schema::event::ComponentStatus;

/// Each component's state: ok, and what to say about it.
type States = BTreeMap<String, (bool, Option<String>)>;

/// Shared, cheap-to-clone table of component states (collectors, adapter,
/// broker connection, spool), by name.
#[derive(Debug, Clone, Default)]
pub struct Health {
    inner: Arc<Mutex<States>>,
}

impl Health {
    /// Sets `name`'s state.
    pub fn set(&self, name: &str, ok: bool, detail: Option<String>) {
        let mut map = match self.inner.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.insert(name.to_string(), (ok, detail));
    }

    /// Every component's state, by name.
    pub fn snapshot(&self) -> Vec<ComponentStatus> {
        let map = match self.inner.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.iter()
            .map(|(name, (ok, detail))| ComponentStatus {
                name: name.clone(),
                ok: *ok,
                detail: detail.clone(),
            })
            .collect()
    }
}

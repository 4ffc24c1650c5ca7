//! The spool: every event on local disk, encrypted, before it is published.
//!
//! Events are appended to a [redb] database in batches, one fsynced
//! transaction per batch, and removed only after JetStream acknowledged
//! them; a crash (kill -9, power loss) loses nothing that was appended.
//! Each record is sealed with AES-256-GCM under a key kept beside the
//! database (DPAPI-protected on Windows, a 0600 file elsewhere), with the
//! record's sequence number as associated data so records cannot be swapped.
//!
//! The spool is bounded by event count and bytes. When full, the
//! [`FullPolicy`] decides: `Block` makes the writer wait (the collectors'
//! bounded buffers then fill and they wait too), `DropOldest` deletes the
//! oldest events to make room and counts them, which the heartbeat reports.
//!
//! The same database remembers which replies the agent has acted on (so a
//! redelivered reply is never sent to a customer twice), which event each
//! adapter message reference became (so a message offered again is not
//! spooled twice) and the activity span still growing (so a crash does not
//! lose it).
//!
//! # Layout
//!
//! The children share one database, one key and one transaction discipline:
//! a change of the events table and its counters happens under one lock.
//!
//! - this module: [`Spool`] (opening it, its configuration and errors) and
//!   [`blocking`], the way async code calls it.
//! - `outbox`: the events: appending sealed batches (and the full policy),
//!   reading them in order, removing them after the ack, and the counters.
//! - `ledger`: replies acted on and the events adapter message references
//!   became, each bounded, oldest forgotten first.
//! - `span`: small named state, sealed (the collector's open span).
//! - `crypt`: the key file and AES-256-GCM sealing, and the keyed digests.
//! - `tests`: the tests of all of them, against a spool in a temp directory.

mod crypt;
mod ledger;
mod outbox;
mod span;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use ferry_schema::codec::EncodeError;
use ferry_schema::EventId;
use redb::{Database, TableDefinition};

use crypt::{Crypt, KEY_FILE};

pub use ledger::{RefKey, ACTED_CAPACITY, REFS_CAPACITY};
pub use outbox::{Appended, Depth, Record};

/// Counters and identity, shared by the children (each names its keys).
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
/// The database's file in the spool directory.
const DB_FILE: &str = "spool.redb";

/// What to do when the spool is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FullPolicy {
    /// Wait for room: collectors slow down, nothing is lost.
    Block,
    /// Delete the oldest events to make room, counting them.
    DropOldest,
}

/// Where the spool lives and how big it may grow.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// Directory of the database and its key.
    pub dir: PathBuf,
    /// Most events held.
    pub max_events: u64,
    /// Most bytes of sealed records held.
    pub max_bytes: u64,
    /// What to do when full.
    pub when_full: FullPolicy,
}

impl SpoolConfig {
    /// Defaults (1 million events, 256 MiB, block) in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            max_events: 1_000_000,
            max_bytes: 256 * 1024 * 1024,
            when_full: FullPolicy::Block,
        }
    }
}

/// Why the spool failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The directory or key file could not be used.
    #[error("spool {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The database is there but its key file is gone.
    #[error("spool {dir}: its key file {key} is gone, so the events spooled there cannot be read; to start again, move the spool directory aside (its unsent events are lost with the key)")]
    KeyLost {
        /// The spool directory.
        dir: PathBuf,
        /// The missing key file.
        key: PathBuf,
    },
    /// The key could not be stored or recovered.
    #[error("spool key {path}: {message}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The database failed.
    #[error("spool database {path}: {message}")]
    Db {
        /// The database file.
        path: PathBuf,
        /// redb's error.
        message: String,
    },
    /// A record did not decrypt or parse: the spool or its key was altered.
    #[error("spool record {seq} is corrupt ({what}); was the key file replaced? To start again, move the spool directory aside (its unsent events are lost)")]
    Corrupt {
        /// The record.
        seq: u64,
        /// What failed.
        what: &'static str,
    },
    /// The event could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// One event is larger than the broker takes from an agent (the codec's
    /// limit, under the `AGENTS` account's `max_payload`): it could never
    /// be published, so it is not spooled.
    #[error("event {id} is {bytes} bytes encoded, over the {max}-byte event limit; not sent")]
    TooLarge {
        /// The event.
        id: EventId,
        /// Its encoded size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// One event is bigger than the whole spool may be.
    #[error("event {id} needs {bytes} bytes but the spool holds at most {max} (spool.max_bytes)")]
    TooBig {
        /// The event.
        id: EventId,
        /// Its sealed size.
        bytes: u64,
        /// The limit.
        max: u64,
    },
}

struct Inner {
    db: Database,
    path: PathBuf,
    crypt: Crypt,
    cfg: SpoolConfig,
    state: Mutex<outbox::State>,
    /// Held by a change of the events table from before its transaction to
    /// after the counters in `state` follow it, so that no other change
    /// sees the table and the counters disagree (a removal of events just
    /// appended, before the append counted them, underflowed the count).
    changing: Mutex<()>,
    /// Called between an append's commit and its counting (tests widen
    /// that window with it).
    #[cfg(test)]
    after_append_commit: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Woken when events are appended.
    added: tokio::sync::Notify,
    /// Woken when events are removed.
    freed: tokio::sync::Notify,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool").field("path", &self.path).finish_non_exhaustive()
    }
}

/// The agent's durable, encrypted outbox. Cheap to clone; all methods are
/// blocking (call them from `spawn_blocking`) except the waits.
#[derive(Debug, Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

impl Spool {
    /// Opens the spool in `cfg.dir`, creating the directory, the key and the
    /// database on first use.
    pub fn open(cfg: SpoolConfig) -> Result<Self, SpoolError> {
        std::fs::create_dir_all(&cfg.dir).map_err(|source| SpoolError::Io {
            path: cfg.dir.clone(),
            source,
        })?;
        let key_path = cfg.dir.join(KEY_FILE);
        if !key_path.exists() && cfg.dir.join(DB_FILE).exists() {
            // A new key would read nothing of what is there.
            return Err(SpoolError::KeyLost { dir: cfg.dir.clone(), key: key_path });
        }
        let crypt = Crypt::load_or_create(&key_path)?;
        let path = cfg.dir.join(DB_FILE);
        let db_err = |e: &dyn std::fmt::Display| db_error(&path, e);
        let db = Database::create(&path).map_err(|e| db_err(&e))?;
        // Create the tables and read the counters.
        let txn = db.begin_write().map_err(|e| db_err(&e))?;
        let state = outbox::State::load(&txn, &path)?;
        txn.open_table(ledger::ACTED).map_err(|e| db_err(&e))?;
        txn.open_table(ledger::ACTED_ORDER).map_err(|e| db_err(&e))?;
        txn.open_table(span::STATE).map_err(|e| db_err(&e))?;
        txn.open_table(ledger::REFS).map_err(|e| db_err(&e))?;
        txn.open_table(ledger::REFS_ORDER).map_err(|e| db_err(&e))?;
        txn.commit().map_err(|e| db_err(&e))?;
        let spool = Self {
            inner: Arc::new(Inner {
                db,
                path,
                crypt,
                cfg,
                state: Mutex::new(state),
                changing: Mutex::new(()),
                #[cfg(test)]
                after_append_commit: Mutex::new(None),
                added: tokio::sync::Notify::new(),
                freed: tokio::sync::Notify::new(),
            }),
        };
        spool.read_oldest()?;
        Ok(spool)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The policy when full.
    pub fn policy(&self) -> FullPolicy {
        self.inner.cfg.when_full
    }

    fn state(&self) -> MutexGuard<'_, outbox::State> {
        // A panic while holding the lock cannot leave the counters half-written.
        match self.inner.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The right to change the events table and its counters.
    fn changing(&self) -> MutexGuard<'_, ()> {
        self.inner.changing.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A failure of the spool's database.
    fn db_err(&self, e: impl std::fmt::Display) -> SpoolError {
        db_error(&self.inner.path, e)
    }
}

/// A failure of the database in `path`.
fn db_error(path: &Path, e: impl std::fmt::Display) -> SpoolError {
    SpoolError::Db {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Blocking spool work on tokio's blocking pool.
pub async fn blocking<T: Send + 'static>(
    spool: &Spool,
    f: impl FnOnce(&Spool) -> Result<T, SpoolError> + Send + 'static,
) -> Result<T, SpoolError> {
    let spool = spool.clone();
    match tokio::task::spawn_blocking(move || f(&spool)).await {
        Ok(r) => r,
        Err(join) => Err(SpoolError::Db {
            path: PathBuf::new(),
            message: format!("spool task failed: {join}"),
        }),
    }
}

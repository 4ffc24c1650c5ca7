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
//! One file on purpose: its tables share one database, one key and one
//! transaction discipline (a change of the events table and its counters
//! under one lock), and a third of it is the tests of exactly that.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use aes_gcm::aead::{Aead, Generate, Key, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use bytes::Bytes;
use ferry_schema::codec::{encode_event, EncodeError, DEFAULT_MAX_PAYLOAD};
use ferry_schema::{Encoding, Envelope, EventId, EventKind, ReplyId};
use hmac::{Hmac, Mac};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use sha2::Sha256;

use crate::platform;

/// seq -> nonce || AES-GCM(header || payload).
const EVENTS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("events");
/// Counters and identity.
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
/// Reply id -> position in `ACTED_ORDER`.
const ACTED: TableDefinition<'_, u128, u64> = TableDefinition::new("acted");
/// Position -> reply id, to forget the oldest first.
const ACTED_ORDER: TableDefinition<'_, u64, u128> = TableDefinition::new("acted_order");
/// Name -> sealed bytes of small state (the open activity span).
const STATE: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("state");
/// Adapter message reference (a keyed digest, see [`RefKey`]) -> event id.
const REFS: TableDefinition<'_, u128, u128> = TableDefinition::new("refs");
/// Position -> reference, to forget the oldest first.
const REFS_ORDER: TableDefinition<'_, u64, u128> = TableDefinition::new("refs_order");

const META_DROPPED: &str = "dropped";
const META_ACTED_NEXT: &str = "acted_next";
const META_REFS_NEXT: &str = "refs_next";
const DB_FILE: &str = "spool.redb";
const KEY_FILE: &str = "spool.key";
/// Bytes of the random nonce in front of each sealed record.
const NONCE_LEN: usize = 12;
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

/// An event read back from the spool, ready to publish.
#[derive(Debug, Clone)]
pub struct Record {
    /// Position in the spool (increasing).
    pub seq: u64,
    /// The event's id (its `Nats-Msg-Id`).
    pub id: EventId,
    /// The event's kind (for its subject).
    pub kind: EventKind,
    /// How `payload` is encoded.
    pub encoding: Encoding,
    /// When the event happened, ms since the Unix epoch.
    pub ts_ms: i64,
    /// The encoded event.
    pub payload: Bytes,
}

/// How full the spool is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Depth {
    /// Events held.
    pub events: u64,
    /// Bytes of sealed records held.
    pub bytes: u64,
    /// Time of the oldest event held, ms since the Unix epoch.
    pub oldest_ts_ms: Option<i64>,
    /// Events deleted unsent because the spool was full (`drop-oldest`), ever.
    pub dropped: u64,
}

/// Result of an append.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Appended {
    /// Events written.
    pub written: usize,
    /// Oldest events deleted to make room.
    pub dropped: u64,
}

#[derive(Debug)]
struct State {
    next_seq: u64,
    count: u64,
    bytes: u64,
    dropped: u64,
    oldest_ts_ms: Option<i64>,
}

struct Inner {
    db: Database,
    path: PathBuf,
    cipher: Aes256Gcm,
    /// Key of the reference digests, derived from the spool's key.
    ref_key: [u8; 32],
    cfg: SpoolConfig,
    state: Mutex<State>,
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
        let key = load_or_create_key(&key_path)?;
        let cipher = Aes256Gcm::new(&key);
        let ref_key = digest_key(key.as_slice(), b"ferry spool: adapter message references");
        let path = cfg.dir.join(DB_FILE);
        let db_err = |e: &dyn std::fmt::Display| SpoolError::Db {
            path: path.clone(),
            message: e.to_string(),
        };
        let db = Database::create(&path).map_err(|e| db_err(&e))?;
        // Create the tables and read the counters.
        let txn = db.begin_write().map_err(|e| db_err(&e))?;
        let state = {
            let events = txn.open_table(EVENTS).map_err(|e| db_err(&e))?;
            let meta = txn.open_table(META).map_err(|e| db_err(&e))?;
            txn.open_table(ACTED).map_err(|e| db_err(&e))?;
            txn.open_table(ACTED_ORDER).map_err(|e| db_err(&e))?;
            txn.open_table(STATE).map_err(|e| db_err(&e))?;
            txn.open_table(REFS).map_err(|e| db_err(&e))?;
            txn.open_table(REFS_ORDER).map_err(|e| db_err(&e))?;
            let mut bytes = 0u64;
            for row in events.iter().map_err(|e| db_err(&e))? {
                let (_, v) = row.map_err(|e| db_err(&e))?;
                bytes += v.value().len() as u64;
            }
            let next_seq = match events.last().map_err(|e| db_err(&e))? {
                Some((k, _)) => k.value() + 1,
                None => 1,
            };
            let dropped = meta.get(META_DROPPED).map_err(|e| db_err(&e))?.map_or(0, |v| v.value());
            State {
                next_seq,
                count: events.len().map_err(|e| db_err(&e))?,
                bytes,
                dropped,
                oldest_ts_ms: None,
            }
        };
        txn.commit().map_err(|e| db_err(&e))?;
        let spool = Self {
            inner: Arc::new(Inner {
                db,
                path,
                cipher,
                ref_key,
                cfg,
                state: Mutex::new(state),
                changing: Mutex::new(()),
                #[cfg(test)]
                after_append_commit: Mutex::new(None),
                added: tokio::sync::Notify::new(),
                freed: tokio::sync::Notify::new(),
            }),
        };
        let oldest = spool.read_after(0, 1)?.first().map(|r| r.ts_ms);
        spool.state().oldest_ts_ms = oldest;
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

    fn state(&self) -> MutexGuard<'_, State> {
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

    fn db_err(&self, e: impl std::fmt::Display) -> SpoolError {
        SpoolError::Db {
            path: self.inner.path.clone(),
            message: e.to_string(),
        }
    }

    /// How full the spool is.
    pub fn depth(&self) -> Depth {
        let s = self.state();
        Depth {
            events: s.count,
            bytes: s.bytes,
            oldest_ts_ms: s.oldest_ts_ms,
            dropped: s.dropped,
        }
    }

    /// Whether `n` more events of about `bytes` would fit without dropping.
    pub fn has_room(&self, n: u64, bytes: u64) -> bool {
        let s = self.state();
        s.count == 0 || (s.count + n <= self.inner.cfg.max_events && s.bytes + bytes <= self.inner.cfg.max_bytes)
    }

    /// Waits until events are removed (for the `block` policy).
    pub async fn wait_for_room(&self) {
        self.inner.freed.notified().await;
    }

    /// Notified when events are appended (create and `enable` the
    /// `Notified` before reading, so an append in between is not missed).
    pub fn appended(&self) -> &tokio::sync::Notify {
        &self.inner.added
    }

    /// Seals `events` (encoded with `encoding`) and writes them in one
    /// durable transaction. With `drop-oldest`, deletes the oldest events
    /// first when they would not fit; with `block`, writes anyway (the caller
    /// waits for [`Spool::has_room`] first, see [`crate::pipeline`]).
    pub fn append(&self, events: &[Envelope], encoding: Encoding) -> Result<Appended, SpoolError> {
        self.append_with_refs(events, encoding, &[])
    }

    /// [`Spool::append`], remembering in the same transaction which event
    /// each adapter reference in `refs` became (see [`Spool::event_for_ref`]).
    pub fn append_with_refs(
        &self,
        events: &[Envelope],
        encoding: Encoding,
        refs: &[(RefKey, EventId)],
    ) -> Result<Appended, SpoolError> {
        if events.is_empty() {
            return Ok(Appended::default());
        }
        let _changing = self.changing();
        let first_seq = self.state().next_seq;
        let mut sealed = Vec::with_capacity(events.len());
        let mut add_bytes = 0u64;
        for (i, env) in events.iter().enumerate() {
            let seq = first_seq + i as u64;
            let value = self.seal(seq, env, encoding)?;
            if value.len() as u64 > self.inner.cfg.max_bytes {
                return Err(SpoolError::TooBig {
                    id: env.id,
                    bytes: value.len() as u64,
                    max: self.inner.cfg.max_bytes,
                });
            }
            add_bytes += value.len() as u64;
            sealed.push((seq, value));
        }
        let mut txn = self.inner.db.begin_write().map_err(|e| self.db_err(e))?;
        txn.set_durability(Durability::Immediate).map_err(|e| self.db_err(e))?;
        let mut dropped = 0u64;
        let mut dropped_bytes = 0u64;
        // Events of this batch dropped before they were stored.
        let mut skipped = 0u64;
        {
            let mut table = txn.open_table(EVENTS).map_err(|e| self.db_err(e))?;
            if self.inner.cfg.when_full == FullPolicy::DropOldest {
                let (count, bytes) = {
                    let s = self.state();
                    (s.count, s.bytes)
                };
                while count - dropped + sealed.len() as u64 > self.inner.cfg.max_events
                    || bytes - dropped_bytes + add_bytes > self.inner.cfg.max_bytes
                {
                    match table.pop_first().map_err(|e| self.db_err(e))? {
                        Some((_, v)) => {
                            dropped += 1;
                            dropped_bytes += v.value().len() as u64;
                        }
                        None => break,
                    }
                }
                // A batch bigger than the whole spool keeps its newest part.
                let mut skip = 0;
                while skip + 1 < sealed.len()
                    && ((sealed.len() - skip) as u64 > self.inner.cfg.max_events
                        || add_bytes > self.inner.cfg.max_bytes)
                {
                    add_bytes -= sealed[skip].1.len() as u64;
                    skip += 1;
                }
                if skip > 0 {
                    sealed.drain(..skip);
                    skipped = skip as u64;
                }
            }
            for (seq, value) in &sealed {
                table.insert(seq, value.as_slice()).map_err(|e| self.db_err(e))?;
            }
            if dropped + skipped > 0 {
                let mut meta = txn.open_table(META).map_err(|e| self.db_err(e))?;
                let total = self.state().dropped + dropped + skipped;
                meta.insert(META_DROPPED, total).map_err(|e| self.db_err(e))?;
            }
        }
        if !refs.is_empty() {
            self.remember_refs(&txn, refs)?;
        }
        txn.commit().map_err(|e| self.db_err(e))?;
        #[cfg(test)]
        if let Some(hook) = self.inner.after_append_commit.lock().ok().and_then(|mut h| h.take()) {
            hook();
        }
        // The oldest event held: unchanged while older events remain and none
        // were dropped; this batch's first kept event when none remain; read
        // back only when drop-oldest removed some and others are left.
        let read_oldest = {
            let mut s = self.state();
            let older_left = s.count - dropped;
            s.next_seq = first_seq + skipped + sealed.len() as u64;
            s.count = older_left + sealed.len() as u64;
            s.bytes = s.bytes - dropped_bytes + add_bytes;
            s.dropped += dropped + skipped;
            if older_left == 0 {
                s.oldest_ts_ms = events.get(skipped as usize).map(|e| e.ts.timestamp_millis());
            }
            older_left > 0 && dropped > 0
        };
        if read_oldest {
            let oldest = self.read_after(0, 1)?.first().map(|r| r.ts_ms);
            self.state().oldest_ts_ms = oldest;
        }
        let dropped = dropped + skipped;
        if dropped > 0 {
            tracing::warn!(dropped, policy = "drop-oldest", "spool full: oldest events deleted unsent");
        }
        self.inner.added.notify_waiters();
        Ok(Appended {
            written: sealed.len(),
            dropped,
        })
    }

    /// Up to `max` events after `seq`, oldest first.
    pub fn read_after(&self, seq: u64, max: usize) -> Result<Vec<Record>, SpoolError> {
        let txn = self.inner.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = txn.open_table(EVENTS).map_err(|e| self.db_err(e))?;
        let mut out = Vec::with_capacity(max.min(4096));
        for row in table.range(seq.saturating_add(1)..).map_err(|e| self.db_err(e))?.take(max) {
            let (k, v) = row.map_err(|e| self.db_err(e))?;
            out.push(self.open_record(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Removes every event up to and including `seq` (JetStream has them).
    pub fn remove_through(&self, seq: u64) -> Result<u64, SpoolError> {
        let _changing = self.changing();
        let mut txn = self.inner.db.begin_write().map_err(|e| self.db_err(e))?;
        // Durable too: an acknowledged event left in the spool by a crash
        // would be published again, and after more than the stream's
        // duplicate window it would be stored twice. One fsync per run of
        // acknowledged events (up to a drainer chunk) is cheap.
        txn.set_durability(Durability::Immediate).map_err(|e| self.db_err(e))?;
        let mut removed = 0u64;
        let mut removed_bytes = 0u64;
        {
            let mut table = txn.open_table(EVENTS).map_err(|e| self.db_err(e))?;
            let gone = table.extract_from_if(..=seq, |_, _| true).map_err(|e| self.db_err(e))?;
            for row in gone {
                let (_, v) = row.map_err(|e| self.db_err(e))?;
                removed += 1;
                removed_bytes += v.value().len() as u64;
            }
        }
        txn.commit().map_err(|e| self.db_err(e))?;
        if removed > 0 {
            {
                let mut s = self.state();
                s.count -= removed;
                s.bytes -= removed_bytes;
            }
            let oldest = self.read_after(seq, 1)?.first().map(|r| r.ts_ms);
            self.state().oldest_ts_ms = oldest;
            self.inner.freed.notify_waiters();
        }
        Ok(removed)
    }

    /// Forces everything committed so far to disk.
    pub fn sync(&self) -> Result<(), SpoolError> {
        let mut txn = self.inner.db.begin_write().map_err(|e| self.db_err(e))?;
        txn.set_durability(Durability::Immediate).map_err(|e| self.db_err(e))?;
        txn.commit().map_err(|e| self.db_err(e))
    }

    /// The spool's digest of adapter `adapter`'s reference `reference`.
    pub fn ref_key(&self, adapter: &str, reference: &str) -> RefKey {
        let mut mac = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(&self.inner.ref_key)
            .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
        mac.update(&(adapter.len() as u64).to_le_bytes());
        mac.update(adapter.as_bytes());
        mac.update(reference.as_bytes());
        let digest = mac.finalize().into_bytes();
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest[..16]);
        RefKey(u128::from_le_bytes(first))
    }

    /// The event an adapter reference became, while it is remembered
    /// (the last [`REFS_CAPACITY`] references).
    pub fn event_for_ref(&self, key: RefKey) -> Result<Option<EventId>, SpoolError> {
        let txn = self.inner.db.begin_read().map_err(|e| self.db_err(e))?;
        let refs = txn.open_table(REFS).map_err(|e| self.db_err(e))?;
        let found = refs.get(key.0).map_err(|e| self.db_err(e))?;
        Ok(found.map(|v| EventId(uuid::Uuid::from_u128(v.value()))))
    }

    fn remember_refs(&self, txn: &redb::WriteTransaction, refs: &[(RefKey, EventId)]) -> Result<(), SpoolError> {
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
                    let sealed = self.seal_bytes(state_aad(name).as_bytes(), v)?;
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
        let bytes = v.value();
        if bytes.len() < NONCE_LEN {
            return Err(SpoolError::Corrupt { seq: 0, what: "state too short" });
        }
        let (nonce, ct) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_from(nonce).map_err(|_| SpoolError::Corrupt { seq: 0, what: "nonce" })?;
        let aad = state_aad(name);
        self.inner
            .cipher
            .decrypt(&nonce, Payload { msg: ct, aad: aad.as_bytes() })
            .map(Some)
            .map_err(|_| SpoolError::Corrupt { seq: 0, what: "state authentication" })
    }

    fn seal_bytes(&self, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, SpoolError> {
        let nonce = Nonce::generate();
        let ct = self
            .inner
            .cipher
            .encrypt(&nonce, Payload { msg: plain, aad })
            .map_err(|_| SpoolError::Corrupt { seq: 0, what: "encryption" })?;
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    fn seal(&self, seq: u64, env: &Envelope, encoding: Encoding) -> Result<Vec<u8>, SpoolError> {
        let payload = encode_event(env, encoding)?;
        if payload.len() > DEFAULT_MAX_PAYLOAD {
            return Err(SpoolError::TooLarge { id: env.id, bytes: payload.len(), max: DEFAULT_MAX_PAYLOAD });
        }
        let kind = env.kind().as_str().as_bytes();
        let mut plain = Vec::with_capacity(16 + 1 + 8 + 1 + kind.len() + payload.len());
        plain.extend_from_slice(env.id.0.as_bytes());
        plain.push(match encoding {
            Encoding::MsgPack => 0,
            Encoding::Json => 1,
        });
        plain.extend_from_slice(&env.ts.timestamp_millis().to_le_bytes());
        plain.push(kind.len() as u8);
        plain.extend_from_slice(kind);
        plain.extend_from_slice(&payload);
        self.seal_bytes(&seq.to_le_bytes(), &plain)
    }

    fn open_record(&self, seq: u64, sealed: &[u8]) -> Result<Record, SpoolError> {
        let corrupt = |what| SpoolError::Corrupt { seq, what };
        if sealed.len() < NONCE_LEN {
            return Err(corrupt("too short"));
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_from(nonce).map_err(|_| corrupt("nonce"))?;
        let plain = self
            .inner
            .cipher
            .decrypt(&nonce, Payload { msg: ct, aad: &seq.to_le_bytes() })
            .map_err(|_| corrupt("authentication"))?;
        let header = 16 + 1 + 8 + 1;
        if plain.len() < header {
            return Err(corrupt("header"));
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&plain[..16]);
        let encoding = match plain[16] {
            0 => Encoding::MsgPack,
            1 => Encoding::Json,
            _ => return Err(corrupt("encoding")),
        };
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&plain[17..25]);
        let kind_len = usize::from(plain[25]);
        let kind_end = header + kind_len;
        let kind = plain
            .get(header..kind_end)
            .and_then(|k| std::str::from_utf8(k).ok())
            .and_then(EventKind::parse)
            .ok_or(corrupt("kind"))?;
        let payload = Bytes::from(plain).slice(kind_end..);
        Ok(Record {
            seq,
            id: EventId(uuid::Uuid::from_bytes(id)),
            kind,
            encoding,
            ts_ms: i64::from_le_bytes(ts),
            payload,
        })
    }
}

fn state_aad(name: &str) -> String {
    format!("state:{name}")
}

/// The spool key: 32 random bytes, stored protected (DPAPI on Windows, a
/// 0600 file elsewhere); made on first use.
/// A key for `purpose` derived from the spool's key.
fn digest_key(key: &[u8], purpose: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
    mac.update(purpose);
    mac.finalize().into_bytes().into()
}

fn load_or_create_key(path: &Path) -> Result<Key<Aes256Gcm>, SpoolError> {
    let key_err = |message: String| SpoolError::Key {
        path: path.to_path_buf(),
        message,
    };
    match std::fs::read(path) {
        Ok(stored) => {
            let raw = platform::unprotect_key(&stored).map_err(|e| key_err(e.to_string()))?;
            Key::<Aes256Gcm>::try_from(raw.as_slice())
                .map_err(|_| key_err(format!("expected 32 bytes, found {}", raw.len())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Key::<Aes256Gcm>::generate();
            let stored = platform::protect_key(&key).map_err(|e| key_err(e.to_string()))?;
            platform::write_private_file(path, &stored).map_err(|e| key_err(e.to_string()))?;
            Ok(key)
        }
        Err(source) => Err(SpoolError::Io {
            path: path.to_path_buf(),
            source,
        }),
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use ferry_schema::event::{Activity, EventBody};
    use ferry_schema::AgentId;

    fn agent() -> AgentId {
        AgentId::new("desk-1").unwrap()
    }

    fn activity(title: &str) -> Envelope {
        Envelope::new(
            agent(),
            EventBody::Activity(Activity {
                app: "notepad.exe".into(),
                title: title.into(),
                exe: None,
                pid: None,
                site: None,
                afk: false,
                duration_ms: 1000,
            }),
        )
    }

    fn spool(dir: &Path, max_events: u64, when_full: FullPolicy) -> Spool {
        let mut cfg = SpoolConfig::new(dir);
        cfg.max_events = max_events;
        cfg.when_full = when_full;
        Spool::open(cfg).unwrap()
    }

    #[test]
    fn events_survive_reopen_in_order_and_are_removed_after_ack() {
        let dir = tempfile::tempdir().unwrap();
        let envs: Vec<_> = (0..5).map(|i| activity(&format!("t{i}"))).collect();
        {
            let s = spool(dir.path(), 100, FullPolicy::Block);
            s.append(&envs[..3], Encoding::MsgPack).unwrap();
            s.append(&envs[3..], Encoding::Json).unwrap();
        }
        let s = spool(dir.path(), 100, FullPolicy::Block);
        assert_eq!(s.depth().events, 5);
        let recs = s.read_after(0, 100).unwrap();
        let ids: Vec<_> = recs.iter().map(|r| r.id).collect();
        assert_eq!(ids, envs.iter().map(|e| e.id).collect::<Vec<_>>());
        assert_eq!(recs[4].encoding, Encoding::Json);
        assert_eq!(recs[0].kind, EventKind::Activity);
        let back = ferry_schema::codec::decode_event(&recs[1].payload, Encoding::MsgPack, 1 << 20).unwrap();
        assert_eq!(back.id, envs[1].id);
        assert_eq!(s.depth().oldest_ts_ms, Some(envs[0].ts.timestamp_millis()));
        assert_eq!(s.remove_through(recs[2].seq).unwrap(), 3);
        assert_eq!(s.depth().events, 2);
        assert_eq!(s.depth().oldest_ts_ms, Some(envs[3].ts.timestamp_millis()));
        assert_eq!(s.read_after(0, 100).unwrap()[0].id, envs[3].id);
        // Sequence numbers keep growing after a reopen.
        drop(s);
        let s = spool(dir.path(), 100, FullPolicy::Block);
        s.append(&[activity("new")], Encoding::MsgPack).unwrap();
        let recs = s.read_after(0, 100).unwrap();
        assert!(recs.windows(2).all(|w| w[0].seq < w[1].seq));
        assert_eq!(recs.len(), 3);
    }

    #[test]
    fn an_event_the_broker_would_refuse_is_not_spooled() {
        // Over the codec's limit it could never be published: the broker
        // closes an agent's connection past the AGENTS account's
        // max_payload, and the drainer would retry it for ever.
        let dir = tempfile::tempdir().unwrap();
        let s = spool(dir.path(), 100, FullPolicy::Block);
        let big = activity(&"x".repeat(DEFAULT_MAX_PAYLOAD));
        match s.append(&[activity("ok"), big.clone()], Encoding::MsgPack) {
            Err(SpoolError::TooLarge { id, bytes, max }) => {
                assert_eq!((id, max), (big.id, DEFAULT_MAX_PAYLOAD));
                assert!(bytes > max);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert_eq!(s.depth().events, 0, "the batch is refused whole; the writer retries it without the event");
    }

    #[test]
    fn a_removal_racing_an_append_keeps_the_counters_right() {
        // The drainer may read, publish and remove an append's events while
        // the writer thread is descheduled between its commit and its
        // counting; that removal once underflowed the count (a panic in
        // the drainer, which then published nothing more).
        let dir = tempfile::tempdir().unwrap();
        let s = spool(dir.path(), 100, FullPolicy::Block);
        let (committed_tx, committed_rx) = std::sync::mpsc::channel::<()>();
        let (removed_tx, removed_rx) = std::sync::mpsc::channel::<()>();
        *s.inner.after_append_commit.lock().unwrap() = Some(Box::new(move || {
            committed_tx.send(()).unwrap();
            // Descheduled until the removal is done, or for a second when
            // the removal waits for this append.
            let _ = removed_rx.recv_timeout(std::time::Duration::from_secs(1));
        }));
        let remover = {
            let s = s.clone();
            std::thread::spawn(move || {
                committed_rx.recv().unwrap();
                let recs = s.read_after(0, 10).unwrap();
                let removed = s.remove_through(recs.last().unwrap().seq).unwrap();
                let _ = removed_tx.send(());
                removed
            })
        };
        s.append(&[activity("a"), activity("b")], Encoding::MsgPack).unwrap();
        assert_eq!(remover.join().expect("the removal panicked"), 2);
        assert_eq!(s.depth().events, 0);
        assert_eq!(s.depth().bytes, 0);
        s.append(&[activity("c")], Encoding::MsgPack).unwrap();
        assert_eq!(s.depth().events, 1);
    }

    #[test]
    fn drop_oldest_counts_and_block_reports_no_room() {
        let dir = tempfile::tempdir().unwrap();
        let s = spool(dir.path(), 3, FullPolicy::DropOldest);
        let envs: Vec<_> = (0..5).map(|i| activity(&format!("t{i}"))).collect();
        let a = s.append(&envs, Encoding::MsgPack).unwrap();
        assert_eq!(a.dropped, 2);
        assert_eq!(s.depth().events, 3);
        assert_eq!(s.depth().dropped, 2);
        assert_eq!(s.read_after(0, 10).unwrap()[0].id, envs[2].id);
        drop(s);
        // The count of dropped events is durable.
        let s = spool(dir.path(), 3, FullPolicy::DropOldest);
        assert_eq!(s.depth().dropped, 2);

        let dir = tempfile::tempdir().unwrap();
        let s = spool(dir.path(), 3, FullPolicy::Block);
        assert!(s.has_room(3, 100));
        s.append(&envs[..3], Encoding::MsgPack).unwrap();
        assert!(!s.has_room(1, 100));
    }

    #[test]
    fn nothing_readable_on_disk_and_a_wrong_key_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let s = spool(dir.path(), 100, FullPolicy::Block);
        s.append(&[activity("SECRET-TITLE-4711")], Encoding::Json).unwrap();
        s.put_state("span", Some(b"SECRET-SPAN-0815"), true).unwrap();
        s.sync().unwrap();
        drop(s);
        let raw = std::fs::read(dir.path().join(DB_FILE)).unwrap();
        let hay = String::from_utf8_lossy(&raw);
        assert!(!hay.contains("SECRET-TITLE-4711") && !hay.contains("SECRET-SPAN-0815"));
        // Without its key the spool is refused, saying how to recover ...
        let key = std::fs::read(dir.path().join(KEY_FILE)).unwrap();
        std::fs::remove_file(dir.path().join(KEY_FILE)).unwrap();
        let err = Spool::open(SpoolConfig::new(dir.path())).unwrap_err();
        assert!(matches!(err, SpoolError::KeyLost { .. }) && err.to_string().contains("move the spool directory aside"), "{err}");
        // ... and another key cannot read the records.
        let mut other = key.clone();
        let last = other.len() - 1;
        other[last] ^= 1;
        std::fs::write(dir.path().join(KEY_FILE), &other).unwrap();
        let err = Spool::open(SpoolConfig::new(dir.path())).unwrap_err();
        assert!(matches!(err, SpoolError::Corrupt { .. } | SpoolError::Key { .. }), "{err}");
        assert!(err.to_string().contains("spool"), "{err}");
    }

    #[test]
    fn an_adapter_reference_names_its_event_across_reopen_and_unreadably() {
        let dir = tempfile::tempdir().unwrap();
        let e = activity("chat");
        {
            let s = spool(dir.path(), 100, FullPolicy::Block);
            let key = s.ref_key("wxauto", "MSG-REF-0042");
            assert_eq!(s.event_for_ref(key).unwrap(), None);
            s.append_with_refs(std::slice::from_ref(&e), Encoding::MsgPack, &[(key, e.id)]).unwrap();
            // The events go; the reference stays.
            s.remove_through(s.read_after(0, 1).unwrap()[0].seq).unwrap();
        }
        let s = spool(dir.path(), 100, FullPolicy::Block);
        assert_eq!(s.event_for_ref(s.ref_key("wxauto", "MSG-REF-0042")).unwrap(), Some(e.id));
        // Another adapter's reference 42 is another message.
        assert_eq!(s.event_for_ref(s.ref_key("other", "MSG-REF-0042")).unwrap(), None);
        assert_ne!(s.ref_key("wx", "auto1"), s.ref_key("wxauto", "1"));
        s.sync().unwrap();
        drop(s);
        let raw = std::fs::read(dir.path().join(DB_FILE)).unwrap();
        assert!(!String::from_utf8_lossy(&raw).contains("MSG-REF-0042"));
    }

    #[test]
    fn acted_replies_are_remembered_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let id = ReplyId(uuid::Uuid::now_v7());
        {
            let s = spool(dir.path(), 10, FullPolicy::Block);
            assert!(s.mark_acted(id).unwrap());
            assert!(!s.mark_acted(id).unwrap());
        }
        let s = spool(dir.path(), 10, FullPolicy::Block);
        assert!(!s.mark_acted(id).unwrap());
        assert!(s.mark_acted(ReplyId(uuid::Uuid::now_v7())).unwrap());
        s.put_state("span", Some(b"abc"), false).unwrap();
        assert_eq!(s.get_state("span").unwrap().as_deref(), Some(&b"abc"[..]));
        s.put_state("span", None, false).unwrap();
        assert_eq!(s.get_state("span").unwrap(), None);
    }

    #[test]
    #[cfg(unix)]
    fn key_file_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let _s = spool(dir.path(), 10, FullPolicy::Block);
        let mode = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

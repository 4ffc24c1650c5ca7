//! The outbox: events appended sealed in durable batches, read in order, removed after their ack.
//!
//! Each event is one record of the `events` table under an increasing
//! sequence number: its id, encoding, time and kind, then the encoded event,
//! sealed with the sequence number as associated data. The counters of the
//! table (events, bytes, the oldest event's time, events dropped) live in
//! memory beside it and change under the spool's `changing` lock together
//! with the table.

use std::path::Path;

use bytes::Bytes;
use ferry_schema::codec::{encode_event, DEFAULT_MAX_PAYLOAD};
use ferry_schema::{Encoding, Envelope, EventId, EventKind};
use redb::{Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::crypt::Unsealed;
use super::{db_error, FullPolicy, RefKey, Spool, SpoolError, META};

/// seq -> nonce || AES-GCM(header || payload).
pub(super) const EVENTS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("events");
/// Events deleted unsent because the spool was full, ever (in `META`).
const META_DROPPED: &str = "dropped";
/// Bytes of a record's header: id, encoding, time, kind length.
const HEADER: usize = 16 + 1 + 8 + 1;

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

/// The counters of the events table.
#[derive(Debug)]
pub(super) struct State {
    next_seq: u64,
    count: u64,
    bytes: u64,
    dropped: u64,
    oldest_ts_ms: Option<i64>,
}

impl State {
    /// The counters of the events table as `txn` sees it (the oldest
    /// event's time is read after the spool is open).
    pub(super) fn load(txn: &redb::WriteTransaction, path: &Path) -> Result<Self, SpoolError> {
        let db_err = |e: &dyn std::fmt::Display| db_error(path, e);
        let events = txn.open_table(EVENTS).map_err(|e| db_err(&e))?;
        let meta = txn.open_table(META).map_err(|e| db_err(&e))?;
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
        Ok(Self {
            next_seq,
            count: events.len().map_err(|e| db_err(&e))?,
            bytes,
            dropped,
            oldest_ts_ms: None,
        })
    }
}

/// What making room for a batch under `drop-oldest` took.
#[derive(Debug, Default)]
struct Room {
    /// Stored events deleted.
    dropped: u64,
    /// Their sealed bytes.
    dropped_bytes: u64,
    /// Events of the batch dropped before they were stored.
    skipped: u64,
}

impl Spool {
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
        let mut room = Room::default();
        {
            let mut table = txn.open_table(EVENTS).map_err(|e| self.db_err(e))?;
            if self.inner.cfg.when_full == FullPolicy::DropOldest {
                room = self.make_room(&mut table, &mut sealed, &mut add_bytes)?;
            }
            for (seq, value) in &sealed {
                table.insert(seq, value.as_slice()).map_err(|e| self.db_err(e))?;
            }
            if room.dropped + room.skipped > 0 {
                let mut meta = txn.open_table(META).map_err(|e| self.db_err(e))?;
                let total = self.state().dropped + room.dropped + room.skipped;
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
        self.count_append(events, first_seq, sealed.len(), add_bytes, &room)?;
        let dropped = room.dropped + room.skipped;
        if dropped > 0 {
            tracing::warn!(dropped, policy = "drop-oldest", "spool full: oldest events deleted unsent");
        }
        self.inner.added.notify_waiters();
        Ok(Appended {
            written: sealed.len(),
            dropped,
        })
    }

    /// Deletes the oldest stored events until `sealed` fits; a batch bigger
    /// than the whole spool keeps its newest part.
    fn make_room(
        &self,
        table: &mut redb::Table<'_, u64, &'static [u8]>,
        sealed: &mut Vec<(u64, Vec<u8>)>,
        add_bytes: &mut u64,
    ) -> Result<Room, SpoolError> {
        let mut room = Room::default();
        let (count, bytes) = {
            let s = self.state();
            (s.count, s.bytes)
        };
        while count - room.dropped + sealed.len() as u64 > self.inner.cfg.max_events
            || bytes - room.dropped_bytes + *add_bytes > self.inner.cfg.max_bytes
        {
            match table.pop_first().map_err(|e| self.db_err(e))? {
                Some((_, v)) => {
                    room.dropped += 1;
                    room.dropped_bytes += v.value().len() as u64;
                }
                None => break,
            }
        }
        let mut skip = 0;
        while skip + 1 < sealed.len()
            && ((sealed.len() - skip) as u64 > self.inner.cfg.max_events || *add_bytes > self.inner.cfg.max_bytes)
        {
            *add_bytes -= sealed[skip].1.len() as u64;
            skip += 1;
        }
        if skip > 0 {
            sealed.drain(..skip);
            room.skipped = skip as u64;
        }
        Ok(room)
    }

    /// Brings the counters in line with a committed append of `written`
    /// records (`add_bytes` in all) from `events`, numbered from `first_seq`.
    fn count_append(
        &self,
        events: &[Envelope],
        first_seq: u64,
        written: usize,
        add_bytes: u64,
        room: &Room,
    ) -> Result<(), SpoolError> {
        // The oldest event held: unchanged while older events remain and none
        // were dropped; this batch's first kept event when none remain; read
        // back only when drop-oldest removed some and others are left.
        let read_oldest = {
            let mut s = self.state();
            let older_left = s.count - room.dropped;
            s.next_seq = first_seq + room.skipped + written as u64;
            s.count = older_left + written as u64;
            s.bytes = s.bytes - room.dropped_bytes + add_bytes;
            s.dropped += room.dropped + room.skipped;
            if older_left == 0 {
                s.oldest_ts_ms = events.get(room.skipped as usize).map(|e| e.ts.timestamp_millis());
            }
            older_left > 0 && room.dropped > 0
        };
        if read_oldest {
            let oldest = self.read_after(0, 1)?.first().map(|r| r.ts_ms);
            self.state().oldest_ts_ms = oldest;
        }
        Ok(())
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

    /// Reads the oldest event's time into the counters (after opening).
    pub(super) fn read_oldest(&self) -> Result<(), SpoolError> {
        let oldest = self.read_after(0, 1)?.first().map(|r| r.ts_ms);
        self.state().oldest_ts_ms = oldest;
        Ok(())
    }

    fn seal(&self, seq: u64, env: &Envelope, encoding: Encoding) -> Result<Vec<u8>, SpoolError> {
        let payload = encode_event(env, encoding)?;
        if payload.len() > DEFAULT_MAX_PAYLOAD {
            return Err(SpoolError::TooLarge { id: env.id, bytes: payload.len(), max: DEFAULT_MAX_PAYLOAD });
        }
        let kind = env.kind().as_str().as_bytes();
        let mut plain = Vec::with_capacity(HEADER + kind.len() + payload.len());
        plain.extend_from_slice(env.id.0.as_bytes());
        plain.push(match encoding {
            Encoding::MsgPack => 0,
            Encoding::Json => 1,
        });
        plain.extend_from_slice(&env.ts.timestamp_millis().to_le_bytes());
        plain.push(kind.len() as u8);
        plain.extend_from_slice(kind);
        plain.extend_from_slice(&payload);
        self.inner.crypt.seal(&seq.to_le_bytes(), &plain)
    }

    fn open_record(&self, seq: u64, sealed: &[u8]) -> Result<Record, SpoolError> {
        let corrupt = |what| SpoolError::Corrupt { seq, what };
        let plain = self.inner.crypt.open(&seq.to_le_bytes(), sealed).map_err(|u| {
            corrupt(match u {
                Unsealed::TooShort => "too short",
                Unsealed::Nonce => "nonce",
                Unsealed::Authentication => "authentication",
            })
        })?;
        if plain.len() < HEADER {
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
        let kind_end = HEADER + kind_len;
        let kind = plain
            .get(HEADER..kind_end)
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

//! The archiver role's configuration: [`ArchiverConfig`] with its defaults.

use std::time::Duration;

use ferry_schema::codec::DEFAULT_MAX_PAYLOAD;

use super::batch;
use super::retention::{Retention, UPKEEP_EVERY};
use crate::runtime::ConsumeSettings;
use crate::state::{conversations, DbConfig};

/// What an archiver replica needs.
#[derive(Debug, Clone)]
pub struct ArchiverConfig {
    /// The database.
    pub db: DbConfig,
    /// Consume loop limits (per consumer); `max_in_flight` bounds the rows
    /// waiting for a commit.
    pub consume: ConsumeSettings,
    /// Batch writer limits (per consumer).
    pub batch: batch::BatchSettings,
    /// Idle time after which a chat opens a new conversation.
    pub conversation_idle: Duration,
    /// Largest payload decoded; larger ones are dead-lettered.
    pub max_payload: usize,
    /// How often the keeper looks at `EVENTS`; `None`: no keeper.
    pub keeper_every: Option<Duration>,
    /// How long each table keeps its rows; `None`: forever.
    pub retention: Option<Retention>,
    /// How often the partition upkeep (and the retention) runs.
    pub upkeep_every: Duration,
}

/// How often the keeper looks at `EVENTS` by default: one stream and three
/// consumer infos a second, and in a second an agent can add at most its
/// cap per kind before the next trim.
pub const KEEPER_EVERY: Duration = Duration::from_secs(1);

impl ArchiverConfig {
    /// Defaults for `database_url`.
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            db: DbConfig::new(database_url),
            consume: ConsumeSettings {
                // Four full batches (2000 rows each): three being written
                // while the fourth fills. Fewer stall the pull while batches
                // commit (`ferry bench archiver`: 4096 beat 2048 by about 11% with
                // batches of 1000; 8192 with batches of 2000 beat that by
                // about 8%).
                max_in_flight: 8192,
                // Held messages (PostgreSQL away) stay ours: progress well
                // inside the consumer's 60 s ack_wait.
                progress_every: Some(Duration::from_secs(15)),
                ..ConsumeSettings::default()
            },
            batch: batch::BatchSettings::default(),
            conversation_idle: conversations::DEFAULT_IDLE,
            max_payload: DEFAULT_MAX_PAYLOAD,
            keeper_every: Some(KEEPER_EVERY),
            retention: Some(Retention::default()),
            upkeep_every: UPKEEP_EVERY,
        }
    }
}

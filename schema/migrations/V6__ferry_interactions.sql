-- Ferry's own work in `interactions`: each reply the archiver newly stores
-- is also an interaction row (`Reply::as_interaction`), keyed by the
-- reply's id, so the same queries and alerts cover an assistant's answers
-- and Ferry's. An assistant's row keeps its interaction event's id. The
-- key is no longer always an event's, so it is `id`, without the foreign key.
ALTER TABLE interactions DROP CONSTRAINT interactions_event_id_fkey;
ALTER TABLE interactions RENAME COLUMN event_id TO id;
ALTER TABLE interactions ADD COLUMN reported_by text NOT NULL DEFAULT 'assistant'
    CHECK (reported_by IN ('assistant', 'ferry'));
CREATE INDEX interactions_reported_by_ts ON interactions (reported_by, ts DESC);

-- `events`, `replies` and `interactions` partitioned by UTC day, so that
-- retention (workers/src/archiver/retention.rs) drops a day's partition
-- instead of deleting its rows.
--
-- The partition key keeps each table's idempotency exact:
-- - events by `id`: an event id is a UUIDv7, whose first 48 bits are its
--   creation time in milliseconds, so a day is a range of ids and the
--   primary key stays `id` alone.
-- - replies by `in_reply_to` (the event's id, so a reply lives on its
--   event's day): a reply id is a UUIDv5 of the event id and the responder,
--   so (id, in_reply_to) is unique exactly when id is, and a worker that
--   answers one event twice (a redelivery) still stores one reply.
-- - interactions by `ts`: a row is written only with the event or reply it
--   comes from when that is newly stored, so (id, ts) never doubles.
-- A row whose day has no partition (an id that is not a UUIDv7, a clock far
-- off) lands in the table's DEFAULT partition; creating a day's partition
-- moves that day's rows out of it, and retention deletes its old rows by
-- `archived_at` (`ts` for interactions).
--
-- Foreign keys into events and replies are dropped (a day's partition must
-- be droppable while chat messages, predictions and rule alerts stay).

-- The smallest UUID whose UUIDv7 time is `t` (to the millisecond).
CREATE FUNCTION ferry_uuid_at(t timestamptz) RETURNS uuid
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT (lpad(to_hex(greatest(0, floor(extract(epoch FROM t) * 1000))::bigint), 12, '0')
            || '00000000000000000000')::uuid
$$;

-- The UTC day of a UUIDv7's time (any UUID reads as some day).
CREATE FUNCTION ferry_uuid_day(id uuid) RETURNS date
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT (to_timestamp(('x' || lpad(substr(replace(id::text, '-', ''), 1, 12), 16, '0'))::bit(64)::bigint / 1000.0)
            AT TIME ZONE 'UTC')::date
$$;

-- The partition key of each partitioned table.
CREATE FUNCTION ferry_partition_key(parent text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT CASE parent WHEN 'events' THEN 'id' WHEN 'replies' THEN 'in_reply_to' WHEN 'interactions' THEN 'ts' END
$$;

-- Creates `<parent>_pYYYYMMDD`, the partition of `parent` for the UTC day
-- `day`, unless it exists, moving into it the rows of that day that its
-- DEFAULT partition holds. Returns whether it created one. Replicas may call
-- it at once: an advisory lock makes them take turns.
CREATE FUNCTION ferry_add_day_partition(parent text, day date) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    part  text := parent || '_p' || to_char(day, 'YYYYMMDD');
    key   text := ferry_partition_key(parent);
    lo    text;
    hi    text;
BEGIN
    IF key IS NULL THEN
        RAISE EXCEPTION 'ferry_add_day_partition: % is not partitioned by day', parent;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('ferry_add_day_partition'));
    IF to_regclass(part) IS NOT NULL THEN
        RETURN false;
    END IF;
    IF key = 'ts' THEN
        lo := quote_literal((day::timestamp AT TIME ZONE 'UTC')::text) || '::timestamptz';
        hi := quote_literal(((day + 1)::timestamp AT TIME ZONE 'UTC')::text) || '::timestamptz';
    ELSE
        lo := quote_literal(ferry_uuid_at(day::timestamp AT TIME ZONE 'UTC')::text) || '::uuid';
        hi := quote_literal(ferry_uuid_at((day + 1)::timestamp AT TIME ZONE 'UTC')::text) || '::uuid';
    END IF;
    -- Writers insert into the default partition too: hold it still while
    -- its rows of that day move (the attach below needs this lock anyway).
    EXECUTE format('LOCK TABLE %I IN ACCESS EXCLUSIVE MODE', parent || '_default');
    EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part, parent);
    EXECUTE format('WITH moved AS (DELETE FROM %I WHERE %I >= %s AND %I < %s RETURNING *) INSERT INTO %I SELECT * FROM moved',
                   parent || '_default', key, lo, key, hi, part);
    EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%s) TO (%s)', parent, part, lo, hi);
    RETURN true;
END
$$;

-- The tables, rebuilt partitioned: their rows first go to the DEFAULT
-- partition, then each day of the last year (and the next two) that holds
-- rows gets its partition.
ALTER TABLE events RENAME TO events_v6;
ALTER TABLE replies RENAME TO replies_v6;
ALTER TABLE interactions RENAME TO interactions_v6;

CREATE TABLE events (LIKE events_v6 INCLUDING DEFAULTS INCLUDING CONSTRAINTS) PARTITION BY RANGE (id);
CREATE TABLE replies (LIKE replies_v6 INCLUDING DEFAULTS INCLUDING CONSTRAINTS) PARTITION BY RANGE (in_reply_to);
CREATE TABLE interactions (LIKE interactions_v6 INCLUDING DEFAULTS INCLUDING CONSTRAINTS) PARTITION BY RANGE (ts);
CREATE TABLE events_default PARTITION OF events DEFAULT;
CREATE TABLE replies_default PARTITION OF replies DEFAULT;
CREATE TABLE interactions_default PARTITION OF interactions DEFAULT;

INSERT INTO events SELECT * FROM events_v6;
INSERT INTO replies SELECT * FROM replies_v6;
INSERT INTO interactions SELECT * FROM interactions_v6;

-- Drops the view `activities` and the foreign keys into the old tables.
DROP TABLE events_v6, replies_v6, interactions_v6 CASCADE;

ALTER TABLE events ADD PRIMARY KEY (id);
CREATE INDEX events_ts_brin ON events USING brin (ts);
CREATE INDEX events_agent_ts ON events (agent, ts DESC);

ALTER TABLE replies ADD PRIMARY KEY (id, in_reply_to);
CREATE INDEX replies_in_reply_to ON replies (in_reply_to);
CREATE INDEX replies_agent_ts ON replies (agent, ts DESC);

ALTER TABLE interactions ADD PRIMARY KEY (id, ts);
CREATE INDEX interactions_ts_brin ON interactions USING brin (ts);
CREATE INDEX interactions_session_ts ON interactions (session_id, ts);
CREATE INDEX interactions_intent_ts ON interactions (intent, ts DESC);
CREATE INDEX interactions_error_ts ON interactions (error_type, ts DESC) WHERE error_type IS NOT NULL;
CREATE INDEX interactions_tools ON interactions USING gin (tools_used);
CREATE INDEX interactions_reported_by_ts ON interactions (reported_by, ts DESC);

CREATE VIEW activities AS
SELECT id AS event_id,
       agent,
       ts,
       body ->> 'app' AS app,
       body ->> 'title' AS title,
       body ->> 'exe' AS exe,
       body ->> 'site' AS site,
       coalesce((body ->> 'afk')::boolean, false) AS afk,
       coalesce((body ->> 'duration_ms')::bigint, 0) AS duration_ms
  FROM events
 WHERE kind = 'activity';

DO $$
DECLARE
    d date;
BEGIN
    FOR d IN SELECT DISTINCT ferry_uuid_day(id) FROM events_default LOOP
        IF d BETWEEN current_date - 366 AND current_date + 2 THEN
            PERFORM ferry_add_day_partition('events', d);
        END IF;
    END LOOP;
    FOR d IN SELECT DISTINCT ferry_uuid_day(in_reply_to) FROM replies_default LOOP
        IF d BETWEEN current_date - 366 AND current_date + 2 THEN
            PERFORM ferry_add_day_partition('replies', d);
        END IF;
    END LOOP;
    FOR d IN SELECT DISTINCT (ts AT TIME ZONE 'UTC')::date FROM interactions_default LOOP
        IF d BETWEEN current_date - 366 AND current_date + 2 THEN
            PERFORM ferry_add_day_partition('interactions', d);
        END IF;
    END LOOP;
END
$$;

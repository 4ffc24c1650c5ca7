-- Ferry's system of record: agents, every event and every reply, and the
-- typed rows derived from them. Written by the archiver (workers/src/archiver),
-- idempotent on the event id and the reply id.

-- `last_seen` is kept to the minute (the archiver moves it at most once a
-- minute per agent); the exact time is max(ts) of the agent's events.
CREATE TABLE agents (
    id             text PRIMARY KEY,
    agent_group    text,
    first_seen     timestamptz NOT NULL,
    last_seen      timestamptz NOT NULL,
    last_heartbeat timestamptz,
    version        text
);

-- Every event, exactly once. The id is a UUIDv7: its first 48 bits are the
-- creation time, so new rows land at the right edge of the primary key's
-- B-tree (no random page splits) and the key doubles as a time index.
-- `ts` gets a BRIN index (a few pages for tens of millions of rows) for time
-- ranges, and (agent, ts) a B-tree for one agent's history. See
-- ARCHITECTURE.md, "PostgreSQL", for why this is not partitioned yet.
CREATE TABLE events (
    id          uuid PRIMARY KEY,
    agent       text NOT NULL,
    kind        text NOT NULL,
    ts          timestamptz NOT NULL,
    body        jsonb NOT NULL,
    stream_seq  bigint NOT NULL,
    archived_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_ts_brin ON events USING brin (ts);
CREATE INDEX events_agent_ts ON events (agent, ts DESC);

-- Every reply, exactly once. No foreign key to events: replies and events are
-- archived by two consumers, and a reply may be stored before its event.
CREATE TABLE replies (
    id               uuid PRIMARY KEY,
    in_reply_to      uuid NOT NULL,
    agent            text NOT NULL,
    kind             text NOT NULL,
    ts               timestamptz NOT NULL,
    answered_by_kind text,
    answered_by      text,
    action           text,
    content          text,
    confidence       real,
    processing_ms    double precision,
    tokens           integer,
    body             jsonb NOT NULL,
    stream_seq       bigint NOT NULL,
    archived_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX replies_in_reply_to ON replies (in_reply_to);
CREATE INDEX replies_agent_ts ON replies (agent, ts DESC);

CREATE TABLE chat_messages (
    event_id  uuid PRIMARY KEY REFERENCES events (id),
    agent     text NOT NULL,
    chat      text NOT NULL,
    chat_type text NOT NULL,
    sender    text NOT NULL,
    msg_type  text NOT NULL,
    text      text NOT NULL,
    ts        timestamptz NOT NULL
);

-- Activities are the most frequent events. Writing each one twice (into
-- events and a typed table) halved the archiver's throughput, so the typed
-- relation is a view over events: same columns, no second write. The
-- events (agent, ts) index serves an agent's activity history.
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

CREATE TABLE predictions (
    reply_id      uuid PRIMARY KEY REFERENCES replies (id),
    event_id      uuid NOT NULL,
    agent         text NOT NULL,
    ts            timestamptz NOT NULL,
    prediction    text NOT NULL,
    confidence    real NOT NULL,
    model         text NOT NULL
);
CREATE INDEX predictions_agent_ts ON predictions (agent, ts DESC);

CREATE TABLE alerts (
    reply_id uuid PRIMARY KEY REFERENCES replies (id),
    event_id uuid NOT NULL,
    agent    text NOT NULL,
    ts       timestamptz NOT NULL,
    rule     text NOT NULL,
    message  text NOT NULL
);
CREATE INDEX alerts_agent_ts ON alerts (agent, ts DESC);

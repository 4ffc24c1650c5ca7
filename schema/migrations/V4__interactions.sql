-- Interactions of AI assistants (event kind `interaction`): one row per
-- event, written by the archiver in the event's transaction and only for
-- events it newly stored, so idempotent on the event id like chat_messages.
-- Queried by session, intent, tool and error type, and by time; like
-- events, not partitioned yet (ARCHITECTURE.md, "PostgreSQL").
CREATE TABLE interactions (
    event_id         uuid PRIMARY KEY REFERENCES events (id),
    agent            text NOT NULL,
    ts               timestamptz NOT NULL,
    session_id       text NOT NULL,
    user_input       text NOT NULL,
    intent           text,
    tools_used       text[] NOT NULL,
    response_time_ms double precision NOT NULL,
    success          boolean NOT NULL,
    error_type       text,
    model            text,
    tokens           integer
);
CREATE INDEX interactions_ts_brin ON interactions USING brin (ts);
CREATE INDEX interactions_session_ts ON interactions (session_id, ts);
CREATE INDEX interactions_intent_ts ON interactions (intent, ts DESC);
CREATE INDEX interactions_error_ts ON interactions (error_type, ts DESC) WHERE error_type IS NOT NULL;
CREATE INDEX interactions_tools ON interactions USING gin (tools_used);

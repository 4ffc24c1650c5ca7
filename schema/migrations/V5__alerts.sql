-- Alerts raised by the alerts role (stream ALERTS), one row per transition
-- (firing or resolved), written by the archiver and idempotent on the
-- alert's id (a UUIDv5 of rule, scope, state and trigger: the same from
-- every alerts replica). The rules worker's alert replies, which were in
-- `alerts`, are rule replies to one agent: they keep their rows, as
-- `rule_alerts`.
ALTER TABLE alerts RENAME TO rule_alerts;
ALTER INDEX alerts_agent_ts RENAME TO rule_alerts_agent_ts;

CREATE TABLE alerts (
    id              uuid PRIMARY KEY,
    rule            text NOT NULL,
    check_kind      text NOT NULL,
    scope_kind      text NOT NULL,
    scope_value     text NOT NULL,
    state           text NOT NULL CHECK (state IN ('firing', 'resolved')),
    ts              timestamptz NOT NULL,
    value           double precision NOT NULL,
    threshold       double precision NOT NULL,
    message         text NOT NULL,
    trigger_seq     bigint NOT NULL,
    stream_seq      bigint NOT NULL,
    acknowledged_at timestamptz,
    acknowledged_by text
);
CREATE INDEX alerts_ts ON alerts (ts DESC);
CREATE INDEX alerts_rule_scope_ts ON alerts (rule, scope_kind, scope_value, ts DESC);

-- The webhook delivery log: one row per call the alerts role made for an
-- alert (stream ALERTS, `alert-deliveries.<rule>`), written by the archiver
-- and idempotent on the record's id (a UUIDv5 of alert, webhook and
-- attempt). Kept as long as alerts are (retention's `alerts`).
CREATE TABLE alert_deliveries (
    id          uuid PRIMARY KEY,
    alert_id    uuid NOT NULL,
    rule        text NOT NULL,
    url         text NOT NULL,
    attempt     bigint NOT NULL,
    outcome     text NOT NULL CHECK (outcome IN ('took', 'failed', 'refused')),
    status      integer,
    detail      text NOT NULL,
    ts          timestamptz NOT NULL,
    elapsed_ms  double precision NOT NULL,
    stream_seq  bigint NOT NULL
);
CREATE INDEX alert_deliveries_alert ON alert_deliveries (alert_id, ts);
CREATE INDEX alert_deliveries_ts ON alert_deliveries (ts DESC);

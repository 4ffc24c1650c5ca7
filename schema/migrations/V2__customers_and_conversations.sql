-- Customers and conversations: the state the rules and inference workers
-- read, kept by whoever sees a chat first (all writes are idempotent upserts).

-- A customer is a chat sender as one agent (desk) sees it. `sender_key` is
-- the sender normalised by workers/src/state/customers.rs (NFKC, trimmed,
-- inner whitespace collapsed, lower case).
CREATE TABLE customers (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    agent        text NOT NULL,
    sender_key   text NOT NULL,
    display_name text NOT NULL,
    tags         text[] NOT NULL DEFAULT '{}',
    notes        text NOT NULL DEFAULT '',
    first_seen   timestamptz NOT NULL,
    last_seen    timestamptz NOT NULL,
    UNIQUE (agent, sender_key)
);
CREATE INDEX customers_tags ON customers USING gin (tags);

-- A conversation is open until it has been idle longer than the archiver's
-- `conversation_idle` setting; the next chat then closes it and opens a new one.
CREATE TABLE conversations (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id   bigint NOT NULL REFERENCES customers (id),
    agent         text NOT NULL,
    chat          text NOT NULL,
    status        text NOT NULL CHECK (status IN ('open', 'closed')),
    opened_at     timestamptz NOT NULL,
    last_activity timestamptz NOT NULL,
    closed_at     timestamptz
);
CREATE UNIQUE INDEX conversations_one_open ON conversations (customer_id) WHERE status = 'open';
CREATE INDEX conversations_customer ON conversations (customer_id, opened_at DESC);

ALTER TABLE chat_messages
    ADD COLUMN customer_id bigint REFERENCES customers (id),
    ADD COLUMN conversation_id bigint REFERENCES conversations (id);
CREATE INDEX chat_messages_conversation_ts ON chat_messages (conversation_id, ts);

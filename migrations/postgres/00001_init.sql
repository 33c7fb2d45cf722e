-- Visitor sessions and their conversation.
--
-- No IF NOT EXISTS: migrations run under an advisory lock, so a table that
-- already exists belongs to something else in this schema, and we would
-- rather fail loudly than share it.

-- +goose Up
CREATE TABLE chatproxy_sessions (
    id            text PRIMARY KEY,
    kind          text NOT NULL DEFAULT 'visitor' CHECK (kind IN ('visitor', 'widget')),
    site          text NOT NULL,
    page_url      text,
    user_agent    text,
    client_ip     text,
    fingerprint   text,
    metadata      jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    revoked_at    timestamptz,
    message_count integer NOT NULL DEFAULT 0 CHECK (message_count >= 0)
);

-- Purge deletes by expiry.
CREATE INDEX chatproxy_sessions_expires_at_idx ON chatproxy_sessions (expires_at);

CREATE TABLE chatproxy_messages (
    -- Internal order: messages written in the same microsecond still sort
    -- in insertion order. Never exposed; id is the public name.
    seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id         text NOT NULL UNIQUE,
    session_id text NOT NULL REFERENCES chatproxy_sessions (id) ON DELETE CASCADE,
    role       text NOT NULL CHECK (role IN ('user', 'assistant')),
    content    text NOT NULL,
    status     text NOT NULL DEFAULT 'complete' CHECK (status IN ('complete', 'partial', 'error')),
    metadata   jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- History paging (and the foreign key's cascade) walk a session's messages in order.
CREATE INDEX chatproxy_messages_session_seq_idx ON chatproxy_messages (session_id, seq);
-- Retention purge deletes by age.
CREATE INDEX chatproxy_messages_created_at_idx ON chatproxy_messages (created_at);

-- +goose Down
DROP TABLE chatproxy_messages;
DROP TABLE chatproxy_sessions;

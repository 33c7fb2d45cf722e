-- Visitor sessions and their conversation, embedded store.
--
-- Times are INTEGER unix microseconds in UTC: they sort and compare as
-- numbers, and round-trip to time.Time exactly at Postgres' precision.
-- IF NOT EXISTS: two processes opening a fresh file at once are only
-- serialized by SQLite's write lock, so the loser may replay this file.

-- +goose Up
CREATE TABLE IF NOT EXISTS chatproxy_sessions (
    id            TEXT NOT NULL PRIMARY KEY,
    kind          TEXT NOT NULL DEFAULT 'visitor' CHECK (kind IN ('visitor', 'widget')),
    site          TEXT NOT NULL,
    page_url      TEXT,
    user_agent    TEXT,
    client_ip     TEXT,
    fingerprint   TEXT,
    metadata      TEXT CHECK (metadata IS NULL OR json_valid(metadata)),
    created_at    INTEGER NOT NULL,
    last_seen_at  INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    revoked_at    INTEGER,
    message_count INTEGER NOT NULL DEFAULT 0 CHECK (message_count >= 0)
) STRICT;

-- Purge deletes by expiry.
CREATE INDEX IF NOT EXISTS chatproxy_sessions_expires_at_idx ON chatproxy_sessions (expires_at);

CREATE TABLE IF NOT EXISTS chatproxy_messages (
    -- Internal order; AUTOINCREMENT so a deleted tail is never reused.
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL UNIQUE,
    session_id TEXT NOT NULL REFERENCES chatproxy_sessions (id) ON DELETE CASCADE,
    role       TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content    TEXT NOT NULL,
    status     TEXT NOT NULL DEFAULT 'complete' CHECK (status IN ('complete', 'partial', 'error')),
    metadata   TEXT CHECK (metadata IS NULL OR json_valid(metadata)),
    created_at INTEGER NOT NULL
) STRICT;

-- History paging (and the foreign key's cascade) walk a session's messages in order.
CREATE INDEX IF NOT EXISTS chatproxy_messages_session_seq_idx ON chatproxy_messages (session_id, seq);
-- Retention purge deletes by age.
CREATE INDEX IF NOT EXISTS chatproxy_messages_created_at_idx ON chatproxy_messages (created_at);

-- +goose Down
DROP TABLE IF EXISTS chatproxy_messages;
DROP TABLE IF EXISTS chatproxy_sessions;

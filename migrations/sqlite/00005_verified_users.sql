-- Verified visitors (issue 16), embedded store; see the PostgreSQL file.
-- SQLite has no ADD COLUMN IF NOT EXISTS: a process that loses the race to
-- migrate a file fails this step once (duplicate column) and finds the
-- schema current when it tries again.

-- +goose Up
ALTER TABLE chatproxy_sessions ADD COLUMN user_realm TEXT;
ALTER TABLE chatproxy_sessions ADD COLUMN user_id TEXT;
ALTER TABLE chatproxy_sessions ADD COLUMN user_name TEXT;
ALTER TABLE chatproxy_sessions ADD COLUMN user_email TEXT;
ALTER TABLE chatproxy_sessions ADD COLUMN user_attributes TEXT
    CHECK (user_attributes IS NULL OR json_valid(user_attributes));

CREATE INDEX IF NOT EXISTS chatproxy_sessions_user_idx ON chatproxy_sessions (user_realm, user_id, created_at)
    WHERE user_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS chatproxy_revoked_tokens (
    jti        TEXT NOT NULL PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES chatproxy_sessions (id) ON DELETE CASCADE,
    revoked_at INTEGER NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS chatproxy_revoked_tokens_session_idx ON chatproxy_revoked_tokens (session_id);

-- +goose Down
DROP TABLE IF EXISTS chatproxy_revoked_tokens;
DROP INDEX IF EXISTS chatproxy_sessions_user_idx;
ALTER TABLE chatproxy_sessions DROP COLUMN user_attributes;
ALTER TABLE chatproxy_sessions DROP COLUMN user_email;
ALTER TABLE chatproxy_sessions DROP COLUMN user_name;
ALTER TABLE chatproxy_sessions DROP COLUMN user_id;
ALTER TABLE chatproxy_sessions DROP COLUMN user_realm;

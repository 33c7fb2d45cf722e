-- Replies still being produced (issue 15, resumable replies): a reply's row
-- is stored with status 'streaming' when the exchange begins and finished
-- with its content and final status when the reply ends.
--
-- SQLite cannot change a CHECK constraint in place, so the messages table
-- is rebuilt (https://www.sqlite.org/lang_altertable.html#otheralter): new
-- table, rows copied with their seq, the AUTOINCREMENT counter carried over
-- (a deleted tail is still never reused), old table dropped, new one
-- renamed, indexes recreated. Nothing references chatproxy_messages, so the
-- foreign keys need not be turned off. Running it twice (two processes
-- migrating a fresh file at once) rebuilds the table twice, harmlessly.

-- +goose Up
DROP TABLE IF EXISTS chatproxy_messages_rebuild;
CREATE TABLE chatproxy_messages_rebuild (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL UNIQUE,
    session_id TEXT NOT NULL REFERENCES chatproxy_sessions (id) ON DELETE CASCADE,
    role       TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content    TEXT NOT NULL,
    status     TEXT NOT NULL DEFAULT 'complete' CHECK (status IN ('complete', 'partial', 'error', 'streaming')),
    metadata   TEXT CHECK (metadata IS NULL OR json_valid(metadata)),
    created_at INTEGER NOT NULL
) STRICT;
INSERT INTO chatproxy_messages_rebuild (seq, id, session_id, role, content, status, metadata, created_at)
    SELECT seq, id, session_id, role, content, status, metadata, created_at FROM chatproxy_messages;
DELETE FROM sqlite_sequence WHERE name = 'chatproxy_messages_rebuild';
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'chatproxy_messages_rebuild', seq FROM sqlite_sequence WHERE name = 'chatproxy_messages';
DROP TABLE chatproxy_messages;
ALTER TABLE chatproxy_messages_rebuild RENAME TO chatproxy_messages;
CREATE INDEX IF NOT EXISTS chatproxy_messages_session_seq_idx ON chatproxy_messages (session_id, seq);
CREATE INDEX IF NOT EXISTS chatproxy_messages_created_at_idx ON chatproxy_messages (created_at);

-- +goose Down
DROP TABLE IF EXISTS chatproxy_messages_rebuild;
CREATE TABLE chatproxy_messages_rebuild (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL UNIQUE,
    session_id TEXT NOT NULL REFERENCES chatproxy_sessions (id) ON DELETE CASCADE,
    role       TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content    TEXT NOT NULL,
    status     TEXT NOT NULL DEFAULT 'complete' CHECK (status IN ('complete', 'partial', 'error')),
    metadata   TEXT CHECK (metadata IS NULL OR json_valid(metadata)),
    created_at INTEGER NOT NULL
) STRICT;
INSERT INTO chatproxy_messages_rebuild (seq, id, session_id, role, content, status, metadata, created_at)
    SELECT seq, id, session_id, role, content,
           CASE status WHEN 'streaming' THEN 'partial' ELSE status END, metadata, created_at
    FROM chatproxy_messages;
DELETE FROM sqlite_sequence WHERE name = 'chatproxy_messages_rebuild';
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'chatproxy_messages_rebuild', seq FROM sqlite_sequence WHERE name = 'chatproxy_messages';
DROP TABLE chatproxy_messages;
ALTER TABLE chatproxy_messages_rebuild RENAME TO chatproxy_messages;
CREATE INDEX IF NOT EXISTS chatproxy_messages_session_seq_idx ON chatproxy_messages (session_id, seq);
CREATE INDEX IF NOT EXISTS chatproxy_messages_created_at_idx ON chatproxy_messages (created_at);

-- Messages pushed into a conversation and human handoff (issue 15, part 3):
-- a person's messages are stored with role 'agent', and a session has a
-- mode, 'bot' (its visitor's messages go to n8n) or 'human' (they go to
-- the handoff webhook).
--
-- The mode is a new column. SQLite cannot change a CHECK constraint in
-- place, so the messages table is rebuilt as 00003 does (see there); its
-- status check keeps 00003's 'streaming'. Unlike the rebuild, ADD COLUMN
-- cannot be replayed: of two processes migrating one file at the same
-- moment, the second fails once and migrates nothing, and its store's
-- next call finds the schema current.

-- +goose Up
ALTER TABLE chatproxy_sessions ADD COLUMN mode TEXT NOT NULL DEFAULT 'bot' CHECK (mode IN ('bot', 'human'));
DROP TABLE IF EXISTS chatproxy_messages_rebuild;
CREATE TABLE chatproxy_messages_rebuild (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL UNIQUE,
    session_id TEXT NOT NULL REFERENCES chatproxy_sessions (id) ON DELETE CASCADE,
    role       TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'agent')),
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
    status     TEXT NOT NULL DEFAULT 'complete' CHECK (status IN ('complete', 'partial', 'error', 'streaming')),
    metadata   TEXT CHECK (metadata IS NULL OR json_valid(metadata)),
    created_at INTEGER NOT NULL
) STRICT;
INSERT INTO chatproxy_messages_rebuild (seq, id, session_id, role, content, status, metadata, created_at)
    SELECT seq, id, session_id, CASE role WHEN 'agent' THEN 'assistant' ELSE role END,
           content, status, metadata, created_at FROM chatproxy_messages;
DELETE FROM sqlite_sequence WHERE name = 'chatproxy_messages_rebuild';
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'chatproxy_messages_rebuild', seq FROM sqlite_sequence WHERE name = 'chatproxy_messages';
DROP TABLE chatproxy_messages;
ALTER TABLE chatproxy_messages_rebuild RENAME TO chatproxy_messages;
CREATE INDEX IF NOT EXISTS chatproxy_messages_session_seq_idx ON chatproxy_messages (session_id, seq);
CREATE INDEX IF NOT EXISTS chatproxy_messages_created_at_idx ON chatproxy_messages (created_at);
ALTER TABLE chatproxy_sessions DROP COLUMN mode;

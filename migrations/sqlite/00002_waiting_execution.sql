-- n8n's "Using Response Nodes" mode on the chat API: a conversation whose
-- workflow waits for the visitor (Send and Wait for Response) records that
-- execution, so that the visitor's next message resumes it from whichever
-- instance receives it. One row per waiting conversation; it goes with its
-- session. IF NOT EXISTS: replay-safe, like 00001.

-- +goose Up
CREATE TABLE IF NOT EXISTS chatproxy_waiting (
    session_id   TEXT NOT NULL PRIMARY KEY REFERENCES chatproxy_sessions (id) ON DELETE CASCADE,
    execution_id TEXT NOT NULL,
    -- n8n's own resumeToken (newer n8n checks it on the socket), or NULL.
    resume_token TEXT,
    -- The proxy socket holding the execution (keeping n8n's heartbeats
    -- answered) while it waits.
    holder       TEXT NOT NULL,
    -- Which of n8n's two socket keys the holder used (isPublic or not).
    integrated   INTEGER NOT NULL DEFAULT 0,
    -- The waiting node takes only its buttons, no typed answer.
    blocked      INTEGER NOT NULL DEFAULT 0,
    -- Past this (unix microseconds), the execution is no longer resumed by a message.
    wait_until   INTEGER NOT NULL
) STRICT;

-- +goose Down
DROP TABLE IF EXISTS chatproxy_waiting;

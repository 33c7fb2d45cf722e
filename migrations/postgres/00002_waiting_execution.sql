-- n8n's "Using Response Nodes" mode on the chat API: a conversation whose
-- workflow waits for the visitor (Send and Wait for Response) records that
-- execution, so that the visitor's next message resumes it from whichever
-- instance receives it. One row per waiting conversation; it goes with its
-- session.

-- +goose Up
CREATE TABLE chatproxy_waiting (
    session_id   text PRIMARY KEY REFERENCES chatproxy_sessions (id) ON DELETE CASCADE,
    execution_id text NOT NULL,
    -- n8n's own resumeToken (newer n8n checks it on the socket), or NULL.
    resume_token text,
    -- The proxy socket holding the execution (keeping n8n's heartbeats
    -- answered) while it waits.
    holder       text NOT NULL,
    -- Which of n8n's two socket keys the holder used (isPublic or not).
    integrated   boolean NOT NULL DEFAULT false,
    -- The waiting node takes only its buttons, no typed answer.
    blocked      boolean NOT NULL DEFAULT false,
    -- Past this, the execution is no longer resumed by a message.
    wait_until   timestamptz NOT NULL
);

-- +goose Down
DROP TABLE chatproxy_waiting;

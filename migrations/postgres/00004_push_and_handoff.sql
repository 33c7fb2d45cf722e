-- Messages pushed into a conversation and human handoff (issue 15, part 3):
-- a person's messages are stored with role 'agent', and a session has a
-- mode, 'bot' (its visitor's messages go to n8n) or 'human' (they go to
-- the handoff webhook). ADD COLUMN with a constant default rewrites no
-- rows.

-- +goose Up
ALTER TABLE chatproxy_sessions ADD COLUMN mode text NOT NULL DEFAULT 'bot' CHECK (mode IN ('bot', 'human'));
ALTER TABLE chatproxy_messages DROP CONSTRAINT chatproxy_messages_role_check;
ALTER TABLE chatproxy_messages ADD CONSTRAINT chatproxy_messages_role_check
    CHECK (role IN ('user', 'assistant', 'agent'));

-- +goose Down
UPDATE chatproxy_messages SET role = 'assistant' WHERE role = 'agent';
ALTER TABLE chatproxy_messages DROP CONSTRAINT chatproxy_messages_role_check;
ALTER TABLE chatproxy_messages ADD CONSTRAINT chatproxy_messages_role_check
    CHECK (role IN ('user', 'assistant'));
ALTER TABLE chatproxy_sessions DROP COLUMN mode;

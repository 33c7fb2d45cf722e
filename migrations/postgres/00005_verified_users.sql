-- Verified visitors (issue 16): the user a site proved with identity_secret
-- is kept on the session, so one user's conversations can be found from any
-- device, listed, and erased together.
--
-- user_realm names the namespace a user id belongs to: the chat_proxy block
-- (its token audience) whose identity_secret proved it. Two sites sharing a
-- database never see each other's "user 42". All user columns are NULL on
-- anonymous sessions.

-- +goose Up
ALTER TABLE chatproxy_sessions
    ADD COLUMN user_realm      text,
    ADD COLUMN user_id         text,
    ADD COLUMN user_name       text,
    ADD COLUMN user_email      text,
    ADD COLUMN user_attributes jsonb,
    ADD CONSTRAINT chatproxy_sessions_user_check CHECK ((user_id IS NULL) = (user_realm IS NULL));

-- A user's conversations: the latest active one, the list (newest first),
-- erasure. Partial: anonymous sessions are not indexed at all.
CREATE INDEX chatproxy_sessions_user_idx ON chatproxy_sessions (user_realm, user_id, created_at)
    WHERE user_id IS NOT NULL;

-- Tokens a device gave up (destroy on one device of a user whose
-- conversation other devices share): the token stops working, the
-- conversation stays. Rows go with their session (its purge or erasure).
CREATE TABLE chatproxy_revoked_tokens (
    jti        text PRIMARY KEY,
    session_id text NOT NULL REFERENCES chatproxy_sessions (id) ON DELETE CASCADE,
    revoked_at timestamptz NOT NULL
);
CREATE INDEX chatproxy_revoked_tokens_session_idx ON chatproxy_revoked_tokens (session_id);

-- +goose Down
DROP TABLE chatproxy_revoked_tokens;
DROP INDEX chatproxy_sessions_user_idx;
ALTER TABLE chatproxy_sessions
    DROP CONSTRAINT chatproxy_sessions_user_check,
    DROP COLUMN user_attributes,
    DROP COLUMN user_email,
    DROP COLUMN user_name,
    DROP COLUMN user_id,
    DROP COLUMN user_realm;

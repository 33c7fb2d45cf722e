-- Replies still being produced (issue 15, resumable replies): a reply's row
-- is stored with status 'streaming' when the exchange begins, so that the
-- history shows it and a resumed stream can find it, and is finished with
-- its content and final status when the reply ends.

-- +goose Up
ALTER TABLE chatproxy_messages DROP CONSTRAINT chatproxy_messages_status_check;
ALTER TABLE chatproxy_messages ADD CONSTRAINT chatproxy_messages_status_check
    CHECK (status IN ('complete', 'partial', 'error', 'streaming'));

-- +goose Down
UPDATE chatproxy_messages SET status = 'partial' WHERE status = 'streaming';
ALTER TABLE chatproxy_messages DROP CONSTRAINT chatproxy_messages_status_check;
ALTER TABLE chatproxy_messages ADD CONSTRAINT chatproxy_messages_status_check
    CHECK (status IN ('complete', 'partial', 'error'));

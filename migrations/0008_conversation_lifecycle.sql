-- Conversations as a product (issue 16, part A): settings set by POST / PATCH, policy's verdict
-- on the requested model, and deletion. A deleted conversation keeps its row as the tombstone
-- (id, owner, created_at, deleted_at; no title, metadata or settings), so its id is never
-- taken again and a late message for it is refused; its messages and tool exchanges are gone.
ALTER TABLE conversations
    ADD COLUMN model_allowed boolean,
    ADD COLUMN model_reason text NOT NULL DEFAULT '',
    -- The stream sequence of the last settings change applied (changes apply in stream order).
    ADD COLUMN settings_seq bigint NOT NULL DEFAULT 0,
    ADD COLUMN deleted_at timestamptz,
    -- Subjects outside content_filters() that held the conversation's content (tool call
    -- records, keyed by run and call), kept so an interrupted purge can be done again.
    ADD COLUMN purge_subjects text[] NOT NULL DEFAULT '{}';

-- The list shows live conversations only: its keyset index leaves the tombstones out.
DROP INDEX conversations_recent;
CREATE INDEX conversations_recent ON conversations (project_id, user_id, last_activity_at, id)
    WHERE deleted_at IS NULL;

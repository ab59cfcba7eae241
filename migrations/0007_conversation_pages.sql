-- Conversations as a product (issue 16): a title, metadata and settings per conversation, and
-- the last activity and message count that the list route sorts and shows, kept by a trigger
-- on every statement that inserts messages (the persister's writes stay as they are).
ALTER TABLE conversations
    ADD COLUMN title text NOT NULL DEFAULT '',
    ADD COLUMN metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
    ADD COLUMN model text,
    ADD COLUMN system_prompt text,
    ADD COLUMN last_activity_at timestamptz,
    ADD COLUMN message_count bigint NOT NULL DEFAULT 0;

UPDATE conversations c
SET last_activity_at = GREATEST(c.created_at, x.last), message_count = x.n
FROM (SELECT conversation_id, max(created_at) AS last, count(*) AS n
      FROM messages GROUP BY conversation_id) AS x
WHERE x.conversation_id = c.id;
UPDATE conversations SET last_activity_at = created_at WHERE last_activity_at IS NULL;
ALTER TABLE conversations
    ALTER COLUMN last_activity_at SET NOT NULL,
    ALTER COLUMN last_activity_at SET DEFAULT now();

-- The list route's keyset: one user's conversations, most recent activity first.
CREATE INDEX conversations_recent ON conversations (project_id, user_id, last_activity_at, id);

CREATE FUNCTION conversations_count_messages() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Row locks in id order first (as the persister takes them): no deadlock between batches.
    PERFORM 1 FROM conversations
    WHERE id IN (SELECT conversation_id FROM new_messages) ORDER BY id FOR UPDATE;
    UPDATE conversations c
    SET message_count = c.message_count + n.n,
        last_activity_at = GREATEST(c.last_activity_at, n.last)
    FROM (SELECT conversation_id, count(*) AS n, max(created_at) AS last
          FROM new_messages GROUP BY conversation_id) AS n
    WHERE c.id = n.conversation_id;
    RETURN NULL;
END
$$;

CREATE TRIGGER messages_count_per_conversation
AFTER INSERT ON messages REFERENCING NEW TABLE AS new_messages
FOR EACH STATEMENT EXECUTE FUNCTION conversations_count_messages();

-- Usage reporting and retention (issue 16, part B): each usage row names the user and the
-- conversation it was for, so `GET /api/usage?group_by=user` needs no join to content rows and
-- keeps its numbers after a conversation is deleted or archived (billing outlives content).
-- Every run id is `run-<the user message's uuid>`; a trigger fills both from that message, so
-- the persister's usage writes stay as they are.
ALTER TABLE usage
    ADD COLUMN user_id text,
    ADD COLUMN conversation_id uuid;

UPDATE usage u
SET user_id = m.user_id, conversation_id = m.conversation_id
FROM messages m
WHERE u.run_id ~ '^run-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
  AND m.id = substr(u.run_id, 5)::uuid;

CREATE FUNCTION usage_owner() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.user_id IS NULL
       AND NEW.run_id ~ '^run-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        SELECT m.user_id, m.conversation_id INTO NEW.user_id, NEW.conversation_id
        FROM messages m WHERE m.id = substr(NEW.run_id, 5)::uuid;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER usage_fill_owner BEFORE INSERT ON usage
FOR EACH ROW EXECUTE FUNCTION usage_owner();

-- The report's range scan: one project's calls in a time window.
CREATE INDEX usage_project_time ON usage (project_id, created_at);
-- The sweep's archive of one conversation's usage rows.
CREATE INDEX usage_conversation ON usage (conversation_id);
-- The retention sweep's scan: live conversations (not a deletion's tombstone row), idle the
-- longest first. Also partial on a predicate only the sweep's query states (message_count >= 0
-- holds for every row), so the planner never picks it for the list route, whose keyset index
-- is conversations_recent.
CREATE INDEX conversations_idle ON conversations (last_activity_at, id)
    WHERE message_count >= 0 AND deleted_at IS NULL;

-- What the retention sweep archived (written before it asks for the deletion): a sweep that
-- was interrupted finds here what is archived already and only asks for the deletions still
-- missing; `last_activity_at` is the activity the archive holds (newer activity: not this one).
CREATE TABLE archived_conversations (
    conversation_id      uuid PRIMARY KEY,
    project_id           text NOT NULL,
    user_id              text NOT NULL,
    last_activity_at     timestamptz NOT NULL,
    location             text NOT NULL,   -- file:///… or s3://bucket/key
    sha256               text NOT NULL,
    messages             bigint NOT NULL,
    archived_at          timestamptz NOT NULL DEFAULT now(),
    delete_requested_at  timestamptz
);

-- One row per sweep that started: "once per period across replicas" is decided here, under the
-- sweep's advisory lock (a replica that finds a sweep finished this period does nothing).
CREATE TABLE retention_sweeps (
    id           bigserial PRIMARY KEY,
    instance     text NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    archived     bigint NOT NULL DEFAULT 0,
    backlog      bigint
);

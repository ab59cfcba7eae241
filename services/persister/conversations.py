"""A conversation's settings and its deletion, as the persister (the only writer) keeps them.

Settings changes apply in stream order (``settings_seq``); a creation's model and system prompt
are set once. A deletion keeps the row as the tombstone (owner and times only), deletes the
messages and tool exchanges, then purges the conversation's subjects from every stream that
holds content (``subjects.content_filters``) and the tool call records it noted; every step
can run again, so an interrupted deletion is finished by its redelivery.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
import nats.errors
import nats.js.errors

from shared import messages as m
from shared import subjects
from shared.bus import Bus
from shared.db import unavailable_is_transient
from shared.errors import BadData, RetryLater, Transient

# A creation (or a first message) may have made the row; a change of title and metadata applies
# only if newer than the last one applied, model and system prompt only where none is set.
APPLY_CREATE = """
INSERT INTO conversations AS c (id, project_id, user_id, created_at, last_activity_at, title,
                                metadata, model, system_prompt, settings_seq)
VALUES ($1, $2, $3, $4, $4, COALESCE($5, ''), COALESCE($6::jsonb, '{}'::jsonb), $7, $8, $9)
ON CONFLICT (id) DO UPDATE SET
    title = CASE WHEN c.settings_seq < EXCLUDED.settings_seq THEN EXCLUDED.title ELSE c.title END,
    metadata = CASE WHEN c.settings_seq < EXCLUDED.settings_seq THEN EXCLUDED.metadata
                    ELSE c.metadata END,
    model = COALESCE(c.model, EXCLUDED.model),
    system_prompt = COALESCE(c.system_prompt, EXCLUDED.system_prompt),
    settings_seq = GREATEST(c.settings_seq, EXCLUDED.settings_seq)
WHERE c.deleted_at IS NULL AND c.project_id = EXCLUDED.project_id
      AND c.user_id = EXCLUDED.user_id
RETURNING id
"""

APPLY_UPDATE = """
UPDATE conversations SET title = COALESCE($2, title), metadata = COALESCE($3::jsonb, metadata),
                         settings_seq = $4
WHERE id = $1 AND project_id = $5 AND user_id = $6 AND deleted_at IS NULL AND settings_seq < $4
RETURNING id
"""

STATE = "SELECT project_id, user_id, deleted_at FROM conversations WHERE id = $1"

APPLY_VERDICT = """
UPDATE conversations SET model_allowed = $2, model_reason = $3
WHERE id = $1 AND deleted_at IS NULL
RETURNING id
"""

# The tombstone first (a conversation only accepted so far has no row yet), then its lock.
TOMBSTONE = """
INSERT INTO conversations (id, project_id, user_id, created_at, last_activity_at, deleted_at)
VALUES ($1, $2, $3, $4, $4, $4)
ON CONFLICT (id) DO NOTHING
"""
LOCK = "SELECT project_id, user_id FROM conversations WHERE id = $1 FOR UPDATE"

# Every tool call of the conversation's runs (the model's tool_use ids in its stored turns).
TOOL_CALLS = """
SELECT t.run_id, b->>'id' AS call_id
FROM tool_turns t, jsonb_array_elements(t.content) AS b
WHERE t.conversation_id = $1 AND b->>'type' = 'tool_use'
"""

CLEAR = """
UPDATE conversations
SET deleted_at = COALESCE(deleted_at, $2), title = '', metadata = '{}'::jsonb, model = NULL,
    system_prompt = NULL, model_allowed = NULL, model_reason = '', message_count = 0,
    purge_subjects = ARRAY(SELECT DISTINCT s FROM unnest(purge_subjects || $3::text[]) AS s)
WHERE id = $1
RETURNING purge_subjects
"""

DELETE_CONTENT = (
    """
DELETE FROM tool_results WHERE run_id IN (
    SELECT run_id FROM tool_turns WHERE conversation_id = $1
    UNION SELECT run_id FROM runs WHERE conversation_id = $1)
""",
    # The claims before the turns: a turn being stored holds its claim, then inserts its
    # turn; deleting its turn first would wait on it while it waits on the deletion.
    "DELETE FROM round_claims WHERE conversation_id = $1",
    "DELETE FROM tool_turns WHERE conversation_id = $1",
    "DELETE FROM messages WHERE conversation_id = $1",
)


class ConversationStore:
    """The persister's writes for conversation settings and deletion."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def apply(self, e: m.ConversationChanged, seq: int) -> str:
        """Apply a change: ``applied``, ``stale`` (a newer one was applied) or ``deleted``."""
        cid = uuid.UUID(e.conversation_id)
        metadata = None if e.metadata is None else msgspec.json.encode(e.metadata).decode()
        async with (
            unavailable_is_transient("apply conversation change"),
            self.pool.acquire() as con,
        ):
            if e.op == "create":
                done = await con.fetchval(
                    APPLY_CREATE,
                    cid,
                    e.project_id,
                    e.user_id,
                    e.at,
                    e.title,
                    metadata,
                    e.model,
                    e.system_prompt,
                    seq,
                )
            else:
                done = await con.fetchval(
                    APPLY_UPDATE, cid, e.title, metadata, seq, e.project_id, e.user_id
                )
            if done is not None:
                return "applied"
            row = await con.fetchrow(STATE, cid)
        if row is None:
            # A change of a conversation only accepted so far: it applies once the row exists.
            raise RetryLater("conversation not stored yet", delay=1.0)
        if row["deleted_at"] is not None:
            return "deleted"
        if (row["project_id"], row["user_id"]) != (e.project_id, e.user_id):
            raise BadData("settings change for a conversation of another project or user")
        return "stale"

    async def verdict(self, v: m.ConversationModelVerdict) -> str:
        cid = uuid.UUID(v.conversation_id)
        async with unavailable_is_transient("store model verdict"), self.pool.acquire() as con:
            for _ in range(2):
                if await con.fetchval(APPLY_VERDICT, cid, v.allowed, v.reason) is not None:
                    return "applied"
                row = await con.fetchrow(STATE, cid)
                if row is None:
                    raise RetryLater("conversation not stored yet", delay=1.0)
                if row["deleted_at"] is not None:
                    return "deleted"
                # Stored (by the persister-conversations consumer) between the two statements:
                # apply again, never mistake a live conversation for a deleted one.
        raise RetryLater("conversation stored while the verdict was applied", delay=0.2)

    async def is_deleted(self, conversation_id: str) -> bool:
        async with unavailable_is_transient("read tombstone"), self.pool.acquire() as con:
            row = await con.fetchrow(STATE, uuid.UUID(conversation_id))
        return row is not None and row["deleted_at"] is not None

    async def delete(self, d: m.ConversationDeleteRequested) -> tuple[str, ...]:
        """Tombstone the conversation and delete its content, in one transaction; the subjects
        outside ``content_filters`` that the purge must also clear come back."""
        cid = uuid.UUID(d.conversation_id)
        async with (
            unavailable_is_transient("delete conversation"),
            self.pool.acquire() as con,
            con.transaction(),
        ):
            await con.execute(TOMBSTONE, cid, d.project_id, d.user_id, d.requested_at)
            owner = await con.fetchrow(LOCK, cid)
            if (owner["project_id"], owner["user_id"]) != (d.project_id, d.user_id):
                raise BadData("deletion of a conversation of another project or user")
            calls = await con.fetch(TOOL_CALLS, cid)
            records = [subjects.tool_call_record(r["run_id"], r["call_id"]) for r in calls]
            kept = await con.fetchval(CLEAR, cid, d.requested_at, records)
            for statement in DELETE_CONTENT:
                await con.execute(statement, cid)
        return tuple(kept or ())


class Purger:
    """Purges a deleted conversation's subjects from the streams (the persister's grant)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def purge(
        self, project: str, conversation: str, records: tuple[str, ...] = (), only: str = ""
    ) -> int:
        """Purge every content subject of the conversation (``only``: of that stream alone) and
        the given tool call records; the number of purge requests made."""
        targets = [
            (stream, subject)
            for stream, subject in subjects.content_filters(project, conversation)
            if not only or stream == only
        ]
        if not only or only == subjects.STREAM_TOOLS:
            targets += [(subjects.STREAM_TOOLS, r) for r in records]
        for stream, subject in targets:
            try:
                await self.bus.js.purge_stream(stream, subject=subject)
            except nats.js.errors.NotFoundError:
                continue  # a stream this deployment does not provision holds nothing
            except (nats.errors.Error, TimeoutError, OSError) as exc:
                raise Transient(f"purge of {stream} failed: {type(exc).__name__}") from exc
        return len(targets)

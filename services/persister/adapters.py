"""The Postgres side of the persister: every write is one transaction guarded by unique keys."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import msgspec

from services.persister import core
from shared import messages as m
from shared.db import unavailable_is_transient
from shared.errors import BadData, Transient


class Placed(msgspec.Struct, frozen=True):
    """Where a user message stands in its conversation, and whether this call stored it."""

    position: int
    inserted: bool


class StoredReply(msgspec.Struct, frozen=True):
    """The assistant message as stored (the first one written for the run wins)."""

    id: uuid.UUID
    conversation_id: uuid.UUID
    project_id: str
    user_id: str
    reply_to: uuid.UUID
    kind: m.ReplyKind
    content: str
    created_at: datetime
    inserted: bool
    usage: m.Usage = m.Usage()  # every call of the run so far, failed and cut ones included
    cost_usd: float = 0.0


UPSERT_RUN = """
INSERT INTO runs (run_id, message_id, conversation_id, project_id, user_id, status, status_rank,
                  verdict, reason, model, executor, attempts, estimated_tokens,
                  verdict_rank, verdict_attempt, limits, reserved_tokens, reserved_cost_usd)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,
        CASE WHEN $8 <> '' THEN $7 ELSE 0 END, CASE WHEN $8 <> '' THEN $12 ELSE 0 END,
        $14::jsonb, $15, $16)
ON CONFLICT (run_id) DO UPDATE SET
    -- Statuses only move forward, and a final status is never replaced by another.
    status = CASE WHEN EXCLUDED.status_rank > runs.status_rank
                       OR (EXCLUDED.status_rank = runs.status_rank AND runs.status_rank < 3)
                  THEN EXCLUDED.status ELSE runs.status END,
    status_rank = GREATEST(runs.status_rank, EXCLUDED.status_rank),
    -- Verdict fields come from the newest verdict by (status rank, attempt), not the last to arrive.
    verdict = CASE WHEN {newer} THEN EXCLUDED.verdict ELSE runs.verdict END,
    reason = CASE WHEN {newer} THEN EXCLUDED.reason ELSE runs.reason END,
    model = CASE WHEN {newer} AND EXCLUDED.model <> '' THEN EXCLUDED.model
                 WHEN runs.model = '' THEN EXCLUDED.model ELSE runs.model END,
    executor = CASE WHEN {newer} AND EXCLUDED.executor <> '' THEN EXCLUDED.executor
                    ELSE runs.executor END,
    verdict_rank = CASE WHEN {newer} THEN EXCLUDED.verdict_rank ELSE runs.verdict_rank END,
    verdict_attempt = CASE WHEN {newer} THEN EXCLUDED.verdict_attempt
                           ELSE runs.verdict_attempt END,
    attempts = GREATEST(runs.attempts, EXCLUDED.attempts),
    estimated_tokens = GREATEST(runs.estimated_tokens, EXCLUDED.estimated_tokens),
    limits = COALESCE(EXCLUDED.limits, runs.limits),
    reserved_tokens = GREATEST(runs.reserved_tokens, EXCLUDED.reserved_tokens),
    reserved_cost_usd = GREATEST(runs.reserved_cost_usd, EXCLUDED.reserved_cost_usd),
    updated_at = now()
""".replace(
    "{newer}",
    "(EXCLUDED.verdict <> '' AND (EXCLUDED.verdict_rank, EXCLUDED.verdict_attempt)"
    " >= (runs.verdict_rank, runs.verdict_attempt))",
)

INSERT_REPLY = """
INSERT INTO messages (id, conversation_id, project_id, user_id, role, kind, content, run_id,
                      reply_to, created_at)
SELECT $1, u.conversation_id, u.project_id, u.user_id, 'assistant', $2, $3, $4, u.id, now()
FROM messages u WHERE u.id = $5
ON CONFLICT DO NOTHING
RETURNING id
"""

# DISTINCT ON: one statement may not touch a row twice; the earliest message names the owner.
INSERT_CONVERSATIONS = """
INSERT INTO conversations (id, project_id, user_id, created_at)
SELECT DISTINCT ON (id) id, project_id, user_id, created_at
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[])
     AS t(id, project_id, user_id, created_at)
ORDER BY id, created_at
ON CONFLICT (id) DO NOTHING
"""

# Row locks in id order (no deadlocks): one conversation's batches hand out positions in turn.
LOCK_CONVERSATIONS = """
SELECT id, project_id, user_id FROM conversations WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE
"""

KNOWN_MESSAGES = "SELECT id, position FROM messages WHERE id = ANY($1::uuid[])"

LAST_POSITIONS = """
SELECT conversation_id, max(position) AS last FROM messages
WHERE conversation_id = ANY($1::uuid[]) AND role = 'user'
GROUP BY conversation_id
"""

INSERT_MESSAGES = """
INSERT INTO messages (id, conversation_id, project_id, user_id, role, content, content_hash,
                      idempotency_key, created_at, position)
SELECT id, conversation_id, project_id, user_id, 'user', content, content_hash, key, created_at,
       position
FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
            $8::timestamptz[], $9::int[])
     WITH ORDINALITY AS t(id, conversation_id, project_id, user_id, content, content_hash, key,
                          created_at, position, n)
ORDER BY n
"""

SELECT_REPLY = """
SELECT id, conversation_id, project_id, user_id, reply_to, kind, content, created_at
FROM messages WHERE run_id = $1 AND role = 'assistant'
"""

RUN_USAGE = """
SELECT COALESCE(SUM(input_tokens), 0) AS input_tokens,
       COALESCE(SUM(output_tokens), 0) AS output_tokens,
       COALESCE(SUM(cache_read_tokens), 0) AS cache_read_tokens,
       COALESCE(SUM(cache_write_tokens), 0) AS cache_write_tokens,
       COALESCE(SUM(cost_usd), 0) AS cost_usd
FROM usage WHERE run_id = $1
"""

INSERT_USAGE = """
INSERT INTO usage (call_id, task_id, run_id, attempt, project_id, model, outcome, input_tokens,
                   output_tokens, cache_read_tokens, cache_write_tokens, cost_usd)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
ON CONFLICT (call_id) DO NOTHING
RETURNING call_id
"""

ADD_PROJECT_USAGE = """
INSERT INTO project_usage AS p (project_id, input_tokens, output_tokens, cache_read_tokens,
                                cache_write_tokens, cost_usd, runs)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (project_id) DO UPDATE SET
    input_tokens = p.input_tokens + EXCLUDED.input_tokens,
    output_tokens = p.output_tokens + EXCLUDED.output_tokens,
    cache_read_tokens = p.cache_read_tokens + EXCLUDED.cache_read_tokens,
    cache_write_tokens = p.cache_write_tokens + EXCLUDED.cache_write_tokens,
    cost_usd = p.cost_usd + EXCLUDED.cost_usd,
    runs = p.runs + EXCLUDED.runs,
    updated_at = now()
"""


class Store:
    """Writes of the persister; the only code in baton that writes the database."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def insert_user_message(self, e: m.UserMessageAccepted) -> Placed:
        """Insert one message; ``inserted`` is False when it was already there (a redelivery)."""
        [result] = await self.insert_user_messages([e])
        if isinstance(result, BadData):
            raise result
        return result

    async def insert_user_messages(
        self, events: list[m.UserMessageAccepted]
    ) -> list[Placed | BadData]:
        """Many user messages in one transaction and a handful of round trips (a group commit).

        Per message: where it stands in its conversation and whether this call inserted it,
        or BadData if its conversation belongs to someone else (the rest is still stored).
        Positions are handed out under the conversations' row locks, so concurrent batches
        for one conversation take turns and never share a position.
        """
        ordered = sorted(events, key=lambda e: e.created_at)
        convs = [uuid.UUID(e.conversation_id) for e in ordered]
        async with (
            unavailable_is_transient("insert user messages"),
            self.pool.acquire() as con,
            con.transaction(),
        ):
            await con.execute(
                INSERT_CONVERSATIONS,
                convs,
                [e.project_id for e in ordered],
                [e.user_id for e in ordered],
                [e.created_at for e in ordered],
            )
            owners = {
                r["id"]: (r["project_id"], r["user_id"])
                for r in await con.fetch(LOCK_CONVERSATIONS, sorted(set(convs)))
            }
            ok = [
                e
                for e in ordered
                if owners.get(uuid.UUID(e.conversation_id)) == (e.project_id, e.user_id)
            ]
            known = {
                str(r["id"]): r["position"]
                for r in await con.fetch(KNOWN_MESSAGES, [uuid.UUID(e.message_id) for e in ok])
            }
            last = {
                str(r["conversation_id"]): r["last"]
                for r in await con.fetch(LAST_POSITIONS, sorted(set(convs)))
            }
            new: list[tuple[m.UserMessageAccepted, int]] = []
            for e in ok:
                if e.message_id in known or any(n.message_id == e.message_id for n, _ in new):
                    continue
                last[e.conversation_id] = last.get(e.conversation_id, 0) + 1
                new.append((e, last[e.conversation_id]))
            await con.execute(
                INSERT_MESSAGES,
                [uuid.UUID(e.message_id) for e, _ in new],
                [uuid.UUID(e.conversation_id) for e, _ in new],
                [e.project_id for e, _ in new],
                [e.user_id for e, _ in new],
                [e.content for e, _ in new],
                [e.content_hash for e, _ in new],
                [e.idempotency_key for e, _ in new],
                [e.created_at for e, _ in new],
                [position for _, position in new],
            )
        placed = {e.message_id: Placed(position, True) for e, position in new}
        placed.update({mid: Placed(pos or 0, False) for mid, pos in known.items()})
        foreign = BadData("conversation belongs to another project or user")
        return [placed.get(e.message_id, foreign) for e in events]

    async def upsert_run(self, v: m.RunVerdict) -> None:
        async with unavailable_is_transient("upsert run"), self.pool.acquire() as con:
            await self._upsert_run(
                con,
                v.run_id,
                v.message_id,
                v.conversation_id,
                v.project_id,
                v.user_id,
                v.status,
                verdict=v.verdict,
                reason=v.reason,
                model=v.model,
                executor=v.executor,
                attempts=v.attempt,
                estimated=v.estimated_tokens,
                limits=None if v.limits is None else m.encode(v.limits).decode(),
                reserved_tokens=v.reserved_tokens,
                reserved_cost_usd=v.reserved_cost_usd,
            )

    async def upsert_runs(self, verdicts: list[m.RunVerdict]) -> list[Exception | None]:
        """Many verdicts in one round trip and one commit (statuses only move forward, so
        their order within the batch does not matter). If the batch fails for a reason other
        than the database being down, each is retried alone, so one bad verdict fails only
        its own caller."""
        if len(verdicts) == 1:
            await self.upsert_run(verdicts[0])
            return [None]
        rows = [
            (
                v.run_id,
                uuid.UUID(v.message_id),
                uuid.UUID(v.conversation_id),
                v.project_id,
                v.user_id,
                v.status,
                core.rank(v.status),
                v.verdict,
                v.reason,
                v.model,
                v.executor,
                v.attempt,
                v.estimated_tokens,
                None if v.limits is None else m.encode(v.limits).decode(),
                v.reserved_tokens,
                v.reserved_cost_usd,
            )
            for v in verdicts
        ]
        try:
            async with unavailable_is_transient("upsert runs"), self.pool.acquire() as con:
                await con.executemany(UPSERT_RUN, rows)  # atomic: all or none
            return [None] * len(verdicts)
        except Transient:
            raise
        except Exception:
            out: list[Exception | None] = []
            for v in verdicts:
                try:
                    await self.upsert_run(v)
                    out.append(None)
                except Exception as exc:
                    out.append(exc)
            return out

    async def store_result(self, r: m.ExecResult) -> StoredReply:
        """Usage of this call, the run's answer and the project totals, in one transaction."""
        async with (
            unavailable_is_transient("store result"),
            self.pool.acquire() as con,
            con.transaction(),
        ):
            owner = await self._owner(con, r.message_id)
            await self._add_usage(con, r.call_id, r, r.usage, r.prices, "completed")
            stored = await self._insert_reply(con, r.run_id, r.message_id, "answer", r.text)
            if stored.inserted:
                await con.execute(ADD_PROJECT_USAGE, r.project_id, 0, 0, 0, 0, 0, 1)
            await self._upsert_run(
                con,
                r.run_id,
                r.message_id,
                r.conversation_id,
                r.project_id,
                owner,
                "completed",
                model=r.model,
                attempts=r.attempt,
            )
            return await self._with_run_usage(con, stored, r.run_id)

    async def store_failed_usage(self, f: m.ExecFailed) -> None:
        """A failed or cut call still used tokens; they are counted once, like any other call."""
        async with (
            unavailable_is_transient("store failed usage"),
            self.pool.acquire() as con,
            con.transaction(),
        ):
            await self._add_usage(con, f.call_id, f, f.usage, f.prices, f.error_class)

    async def store_reply(self, p: m.PolicyReply) -> StoredReply:
        async with (
            unavailable_is_transient("store reply"),
            self.pool.acquire() as con,
            con.transaction(),
        ):
            stored = await self._insert_reply(con, p.run_id, p.message_id, p.kind, p.text)
            await self._upsert_run(
                con,
                p.run_id,
                p.message_id,
                p.conversation_id,
                p.project_id,
                p.user_id,
                p.status,
            )
            return await self._with_run_usage(con, stored, p.run_id)

    async def _with_run_usage(self, con: Any, stored: StoredReply, run_id: str) -> StoredReply:
        """The reply with the usage of all its run's calls (what policy settles the budget with)."""
        row = await con.fetchrow(RUN_USAGE, run_id)
        usage = m.Usage(
            input_tokens=int(row["input_tokens"]),
            output_tokens=int(row["output_tokens"]),
            cache_read_tokens=int(row["cache_read_tokens"]),
            cache_write_tokens=int(row["cache_write_tokens"]),
        )
        return msgspec.structs.replace(stored, usage=usage, cost_usd=float(row["cost_usd"]))

    async def _owner(self, con: Any, message_id: str) -> str:
        user = await con.fetchval(
            "SELECT user_id FROM messages WHERE id = $1", uuid.UUID(message_id)
        )
        if user is None:
            raise BadData(f"result for unknown message {message_id}")
        return str(user)

    async def _add_usage(
        self,
        con: Any,
        call_id: str,
        e: m.ExecResult | m.ExecFailed,
        usage: m.Usage,
        prices: m.Prices,
        outcome: str,
    ) -> bool:
        """Count one call's usage; True if this call wrote it (False: an earlier delivery did)."""
        cost = usage.cost_usd(prices)
        inserted = await con.fetchval(
            INSERT_USAGE,
            call_id,
            e.task_id,
            e.run_id,
            e.attempt,
            e.project_id,
            e.model,
            outcome,
            usage.input_tokens,
            usage.output_tokens,
            usage.cache_read_tokens,
            usage.cache_write_tokens,
            cost,
        )
        if inserted is not None:
            await con.execute(
                ADD_PROJECT_USAGE,
                e.project_id,
                usage.input_tokens,
                usage.output_tokens,
                usage.cache_read_tokens,
                usage.cache_write_tokens,
                cost,
                0,
            )
        return inserted is not None

    async def _insert_reply(
        self, con: Any, run_id: str, message_id: str, kind: m.ReplyKind, text: str
    ) -> StoredReply:
        new_id = core.assistant_message_id(run_id)
        inserted = await con.fetchval(
            INSERT_REPLY, new_id, kind, text, run_id, uuid.UUID(message_id)
        )
        row = await con.fetchrow(SELECT_REPLY, run_id)
        if row is None:
            raise BadData(f"reply for unknown message {message_id}")
        return StoredReply(
            id=row["id"],
            conversation_id=row["conversation_id"],
            project_id=row["project_id"],
            user_id=row["user_id"],
            reply_to=row["reply_to"],
            kind=row["kind"],
            content=row["content"],
            created_at=row["created_at"],
            inserted=inserted is not None,
        )

    async def _upsert_run(
        self,
        con: Any,
        run_id: str,
        message_id: str,
        conversation_id: str,
        project_id: str,
        user_id: str,
        status: str,
        *,
        verdict: str = "",
        reason: str = "",
        model: str = "",
        executor: str = "",
        attempts: int = 0,
        estimated: int = 0,
        limits: str | None = None,
        reserved_tokens: int = 0,
        reserved_cost_usd: float = 0.0,
    ) -> None:
        await con.execute(
            UPSERT_RUN,
            run_id,
            uuid.UUID(message_id),
            uuid.UUID(conversation_id),
            project_id,
            user_id,
            status,
            core.rank(status),
            verdict,
            reason,
            model,
            executor,
            attempts,
            estimated,
            limits,
            reserved_tokens,
            reserved_cost_usd,
        )

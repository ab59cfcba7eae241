"""The Postgres side of the persister: every write is one transaction guarded by unique keys."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from services.persister import core
from shared import estimate, history
from shared import messages as m
from shared.db import unavailable_is_transient
from shared.errors import BadData, Transient
from shared.subjects import is_safe_token


class StoredToolTurn(msgspec.Struct, frozen=True):
    """A round's tool_use turn as stored (the first model call's wins), and the run's usage."""

    call_id: str
    text: str
    tool_calls: tuple[m.ToolCall, ...]
    user_id: str
    inserted: bool
    usage: m.Usage = m.Usage()
    earlier_call_ids: tuple[str, ...] = ()  # the tool_use ids of the run's earlier rounds


INSERT_TOOL_TURN = """
INSERT INTO tool_turns (run_id, round, call_id, conversation_id, reply_to, content)
SELECT $1, $2, $3, u.conversation_id, u.id, $5::jsonb FROM messages u WHERE u.id = $4
ON CONFLICT (run_id, round) DO NOTHING
RETURNING call_id
"""

REPLY_STORED = """
SELECT EXISTS (SELECT 1 FROM messages WHERE run_id = $1 AND role = 'assistant')
"""

# A tool turn's claim of its round (migrations/0012): the kind that holds the round, this
# turn's or that of an answer claimed first (a concurrent one is waited for).
CLAIM_TURN = """
INSERT INTO round_claims AS c (run_id, round, kind, conversation_id)
SELECT $1, $2, 'turn', u.conversation_id FROM messages u WHERE u.id = $3
ON CONFLICT (run_id, round) DO UPDATE SET kind = c.kind
RETURNING kind
"""

EARLIER_TOOL_TURNS = """
SELECT content FROM tool_turns WHERE run_id = $1 AND round < $2 ORDER BY round
"""

SELECT_TOOL_TURN = """
SELECT t.call_id, t.content, u.user_id FROM tool_turns t JOIN messages u ON u.id = t.reply_to
WHERE t.run_id = $1 AND t.round = $2
"""

INSERT_TOOL_RESULT = """
INSERT INTO tool_results (tool_use_id, run_id, round, name, outcome, is_error, content,
                          input_digest)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (run_id, tool_use_id) DO NOTHING
RETURNING tool_use_id
"""

SELECT_TOOL_RESULT = """
SELECT tool_use_id, run_id, round, name, outcome, is_error, content, input_digest
FROM tool_results WHERE run_id = $1 AND tool_use_id = $2
"""


class Placed(msgspec.Struct, frozen=True):
    """Where a user message stands in its conversation, and whether this call stored it."""

    position: int
    inserted: bool
    deleted: bool = False  # its conversation was deleted: not stored, never to be


class Superseded(Exception):
    """A model call's outcome that came second for its round (a redelivered task's second
    call): the round's first outcome, a tool turn or the run's reply, stands; this call's usage
    is billed and nothing else of it is stored (docs/tools.md, rule 2)."""


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
    calls: tuple[str, ...] | None = None  # the call ids ``usage`` sums (None: not read)
    asked_at: datetime | None = None  # when the user message was accepted, if it was read too


def _stored(row: Any, inserted: bool, **more: Any) -> StoredReply:
    """A ``StoredReply`` from a row with the reply's columns (``more``: usage, cost, asked_at)."""
    return StoredReply(
        id=row["id"],
        conversation_id=row["conversation_id"],
        project_id=row["project_id"],
        user_id=row["user_id"],
        reply_to=row["reply_to"],
        kind=row["kind"],
        content=row["content"],
        created_at=row["created_at"],
        inserted=inserted,
        **more,
    )


RUN_COLUMNS = """
INSERT INTO runs (run_id, message_id, conversation_id, project_id, user_id, status, status_rank,
                  verdict, reason, model, executor, attempts, estimated_tokens,
                  verdict_rank, verdict_attempt, limits, reserved_tokens, reserved_cost_usd)"""

RUN_CONFLICT = """
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

UPSERT_RUN = (
    RUN_COLUMNS
    + """
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,
        CASE WHEN $8 <> '' THEN $7 ELSE 0 END, CASE WHEN $8 <> '' THEN $12 ELSE 0 END,
        $14::jsonb, $15, $16)"""
    + RUN_CONFLICT
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
SELECT id, project_id, user_id, deleted_at IS NOT NULL AS deleted
FROM conversations WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE
"""

# After the conversations' row locks (a new statement sees every committed message): the batch's
# messages not stored yet (first copy of an id wins), each at the next position of its
# conversation in batch order, inserted; and where those already stored stand.
PLACE_MESSAGES = """
WITH batch AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[],
                         $7::text[], $8::timestamptz[])
         WITH ORDINALITY AS t(id, conversation_id, project_id, user_id, content, content_hash,
                              key, created_at, n)
),
known AS (
    SELECT id, position FROM messages WHERE id = ANY($1::uuid[])
),
fresh AS (
    SELECT DISTINCT ON (b.id) b.* FROM batch b
    WHERE NOT EXISTS (SELECT 1 FROM known k WHERE k.id = b.id)
    ORDER BY b.id, b.n
),
placed AS (
    SELECT f.*,
           COALESCE((SELECT max(m.position) FROM messages m
                     WHERE m.conversation_id = f.conversation_id AND m.role = 'user'), 0)
           + row_number() OVER (PARTITION BY f.conversation_id ORDER BY f.n) AS position
    FROM fresh f
),
inserted AS (
    INSERT INTO messages (id, conversation_id, project_id, user_id, role, content, content_hash,
                          idempotency_key, created_at, position)
    SELECT id, conversation_id, project_id, user_id, 'user', content, content_hash, key,
           created_at, position
    FROM placed ORDER BY n
    RETURNING id, position
)
SELECT id, position, true AS inserted FROM inserted
UNION ALL
SELECT id, position, false FROM known
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
       COALESCE(SUM(cost_usd), 0) AS cost_usd,
       COALESCE(array_agg(call_id), '{}') AS calls
FROM usage WHERE run_id = $1 AND purpose <> 'classification'
"""


def _replace_estimate(call_id: str, only_if: str, sets: str) -> str:
    """The two CTEs that replace an estimated usage row of ``call_id`` by an exact one (when
    ``only_if``): ``old``, the estimate as it was (locked, re-checked once a concurrent writer
    commits), and ``replaced``, the row rewritten with ``sets``, returning what each column
    moved by (what the project totals add)."""
    return f"""
old AS (
    SELECT call_id, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_usd
    FROM usage WHERE call_id = {call_id} AND estimated AND {only_if}
    FOR UPDATE
),
replaced AS (
    UPDATE usage x SET {sets}, estimated = false
    FROM old WHERE x.call_id = old.call_id
    RETURNING x.input_tokens - old.input_tokens AS input_tokens,
              x.output_tokens - old.output_tokens AS output_tokens,
              x.cache_read_tokens - old.cache_read_tokens AS cache_read_tokens,
              x.cache_write_tokens - old.cache_write_tokens AS cache_write_tokens,
              x.cost_usd - old.cost_usd AS cost_usd
),"""


# One call's usage in one statement: inserted once per call id; or, where an estimate of it was
# stored first (policy billed a call it took for dead, docs/guarantees.md I4) and this is the
# call's exact usage, the estimate replaced (never the reverse); the project totals move by what
# was inserted, or by the difference. ``unseen``: no row of the call was there when it began;
# with nothing inserted, a concurrent write stored one since (it reads again: its next statement
# sees it). An estimate's row found by FOR UPDATE is re-checked once its writer commits: of two
# exact copies at once, one replaces it, the other finds it exact and counts nothing.
ADD_USAGE = (
    """
WITH ins AS (
    INSERT INTO usage (call_id, task_id, run_id, attempt, project_id, model, outcome,
                       input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
                       cost_usd, purpose, estimated)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
    ON CONFLICT (call_id) DO NOTHING
    RETURNING input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_usd
),"""
    + _replace_estimate(
        "$1",
        "NOT $14::boolean",
        "task_id = $2, run_id = $3, attempt = $4, model = $6, outcome = $7, input_tokens = $8, "
        "output_tokens = $9, cache_read_tokens = $10, cache_write_tokens = $11, cost_usd = $12, "
        "purpose = $13",
    )
    + """
delta AS (SELECT * FROM ins UNION ALL SELECT * FROM replaced),
totals AS (
    INSERT INTO project_usage AS p (project_id, input_tokens, output_tokens, cache_read_tokens,
                                    cache_write_tokens, cost_usd, runs)
    SELECT $5, sum(input_tokens), sum(output_tokens), sum(cache_read_tokens),
           sum(cache_write_tokens), sum(cost_usd), 0
    FROM delta HAVING count(*) > 0
    ON CONFLICT (project_id) DO UPDATE SET
        input_tokens = p.input_tokens + EXCLUDED.input_tokens,
        output_tokens = p.output_tokens + EXCLUDED.output_tokens,
        cache_read_tokens = p.cache_read_tokens + EXCLUDED.cache_read_tokens,
        cache_write_tokens = p.cache_write_tokens + EXCLUDED.cache_write_tokens,
        cost_usd = p.cost_usd + EXCLUDED.cost_usd,
        updated_at = now()
)
SELECT (SELECT count(*) FROM ins) AS inserted, (SELECT count(*) FROM replaced) AS replaced,
       (SELECT COALESCE(sum(cost_usd), 0) FROM delta) AS cost_usd,
       NOT EXISTS (SELECT 1 FROM usage WHERE call_id = $1) AS unseen
"""
)

# A call's result in one statement (one round trip, atomic without BEGIN/COMMIT): its usage
# (once per call; an estimate of it stored first is replaced, as in ADD_USAGE), the run's
# answer (once per run), the project totals for what this statement wrote, and the run's
# status; it returns the reply (new or the one stored before), the usage of all the run's
# calls, and when the user message was accepted. Nothing is written for an unknown message (no
# row comes back). Two races, each read or written again by a second statement: the reply is
# NULL when a concurrent delivery stored it after this statement began (its snapshot cannot
# see it), and ``raced`` when a row of this call was stored since (an estimate to replace).
STORE_RESULT = (
    """
WITH u AS (
    SELECT id, project_id, user_id, conversation_id, created_at FROM messages WHERE id = $1
),
used AS (
    INSERT INTO usage (call_id, task_id, run_id, attempt, project_id, model, outcome,
                       input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
                       cost_usd)
    SELECT $2, $3, $4, $5, $6, $7, 'completed', $8, $9, $10, $11, $12 FROM u
    ON CONFLICT (call_id) DO NOTHING
    RETURNING input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_usd
),"""
    + _replace_estimate(
        "$2",
        "EXISTS (SELECT 1 FROM u)",
        "task_id = $3, run_id = $4, attempt = $5, model = $7, outcome = 'completed', "
        "input_tokens = $8, output_tokens = $9, cache_read_tokens = $10, "
        "cache_write_tokens = $11, cost_usd = $12, purpose = 'answer'",
    )
    + """
claim AS (
    -- The round's one outcome: an answer's claim, or the kind a concurrent claimant of the
    -- round committed first (the unique index waits for it and returns its row, snapshot or
    -- not; DO UPDATE, not DO NOTHING, so the row comes back either way). Every answer claims,
    -- tools offered or not: the model may send tool_use blocks unasked, and a policy reload
    -- can offer a retry other tools than its first attempt.
    INSERT INTO round_claims AS c (run_id, round, kind, conversation_id)
    SELECT $4, $17, 'answer', u.conversation_id FROM u
    ON CONFLICT (run_id, round) DO UPDATE SET kind = c.kind
    RETURNING kind
),
turned AS (
    -- A tool turn of this round (or a later one) was stored first: this answer came from a
    -- second model call of the round (a redelivered task) and does not end the run.
    -- The claim first: it is then always made before anything else this statement locks
    -- (the totals, the run's row), never skipped by the LIMIT and made at the statement's end
    -- while those are held (a deadlock with a turn's transaction that holds the claim).
    SELECT 1 FROM claim WHERE kind = 'turn'
    UNION ALL
    SELECT 1 FROM tool_turns WHERE run_id = $4 AND round >= $17
    LIMIT 1
),
reply AS (
    INSERT INTO messages (id, conversation_id, project_id, user_id, role, kind, content, run_id,
                          reply_to, created_at)
    SELECT $13, u.conversation_id, u.project_id, u.user_id, 'assistant', 'answer', $14, $4, u.id,
           now()
    FROM u WHERE NOT EXISTS (SELECT 1 FROM turned)
    ON CONFLICT DO NOTHING
    RETURNING id, conversation_id, project_id, user_id, reply_to, kind, content, created_at
),
totals AS (
    INSERT INTO project_usage AS p (project_id, input_tokens, output_tokens, cache_read_tokens,
                                    cache_write_tokens, cost_usd, runs)
    SELECT $6, sum(i), sum(o), sum(cr), sum(cw), sum(c), sum(n)
    FROM (SELECT input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_usd, 0
          FROM used
          UNION ALL
          SELECT *, 0 FROM replaced
          UNION ALL
          SELECT 0, 0, 0, 0, 0, 1 FROM reply) AS x(i, o, cr, cw, c, n)
    HAVING count(*) > 0
    ON CONFLICT (project_id) DO UPDATE SET
        input_tokens = p.input_tokens + EXCLUDED.input_tokens,
        output_tokens = p.output_tokens + EXCLUDED.output_tokens,
        cache_read_tokens = p.cache_read_tokens + EXCLUDED.cache_read_tokens,
        cache_write_tokens = p.cache_write_tokens + EXCLUDED.cache_write_tokens,
        cost_usd = p.cost_usd + EXCLUDED.cost_usd,
        runs = p.runs + EXCLUDED.runs,
        updated_at = now()
),
run AS ("""
    + RUN_COLUMNS
    + """
    SELECT $4, $1, $15, $6, u.user_id, 'completed', $16, '', '', $7, '', $5, 0, 0, 0, NULL, 0, 0
    FROM u WHERE NOT EXISTS (SELECT 1 FROM turned)"""
    + RUN_CONFLICT
    + """)
SELECT u.created_at AS asked_at, (SELECT count(*) FROM used) AS counted,
       EXISTS (SELECT 1 FROM turned) AS superseded,
       (SELECT sum(cost_usd) FROM replaced) AS replaced_cost,
       NOT EXISTS (SELECT 1 FROM usage WHERE call_id = $2)
           AND NOT EXISTS (SELECT 1 FROM used) AS raced,
       s.id, s.conversation_id, s.project_id, s.user_id, s.reply_to, s.kind, s.content,
       s.created_at, s.inserted,
       t.input_tokens, t.output_tokens, t.cache_read_tokens, t.cache_write_tokens, t.cost_usd,
       t.calls
FROM u
LEFT JOIN LATERAL (
    SELECT id, conversation_id, project_id, user_id, reply_to, kind, content, created_at,
           true AS inserted
    FROM reply
    UNION ALL
    SELECT id, conversation_id, project_id, user_id, reply_to, kind, content, created_at, false
    FROM messages
    WHERE run_id = $4 AND role = 'assistant' AND NOT EXISTS (SELECT 1 FROM reply)
    LIMIT 1
) AS s ON true
CROSS JOIN LATERAL (
    SELECT COALESCE(sum(input_tokens), 0) AS input_tokens,
           COALESCE(sum(output_tokens), 0) AS output_tokens,
           COALESCE(sum(cache_read_tokens), 0) AS cache_read_tokens,
           COALESCE(sum(cache_write_tokens), 0) AS cache_write_tokens,
           COALESCE(sum(cost_usd), 0) AS cost_usd,
           COALESCE(array_agg(DISTINCT call_id), '{}') AS calls
    FROM (SELECT call_id, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
                 cost_usd
          FROM usage WHERE run_id = $4 AND purpose <> 'classification'
          UNION ALL
          SELECT $2, * FROM used
          UNION ALL
          SELECT $2, * FROM replaced) AS z
) AS t
"""
)


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
        """Many user messages in one transaction of five round trips (a group commit).

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
            locked = await con.fetch(LOCK_CONVERSATIONS, sorted(set(convs)))
            owners = {r["id"]: (r["project_id"], r["user_id"]) for r in locked}
            # A deleted conversation takes no message again (its tombstone keeps the owner).
            gone = {r["id"] for r in locked if r["deleted"]}
            ok = [
                e
                for e in ordered
                if owners.get(uuid.UUID(e.conversation_id)) == (e.project_id, e.user_id)
                and uuid.UUID(e.conversation_id) not in gone
            ]
            rows = (
                []
                if not ok
                else await con.fetch(
                    PLACE_MESSAGES,
                    [uuid.UUID(e.message_id) for e in ok],
                    [uuid.UUID(e.conversation_id) for e in ok],
                    [e.project_id for e in ok],
                    [e.user_id for e in ok],
                    [e.content for e in ok],
                    [e.content_hash for e in ok],
                    [e.idempotency_key for e in ok],
                    [e.created_at for e in ok],
                )
            )
        placed = {str(r["id"]): Placed(r["position"] or 0, r["inserted"]) for r in rows}
        foreign = BadData("conversation belongs to another project or user")
        deleted = Placed(0, False, deleted=True)
        return [
            placed.get(e.message_id, deleted if uuid.UUID(e.conversation_id) in gone else foreign)
            for e in events
        ]

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
        their order within the batch does not matter). Written in run id order: each row's
        lock is held to the commit, so two batches that overlap take their common rows in one
        order and never wait for each other in a cycle (a deadlock, which Postgres breaks
        after a second by failing one batch). If the batch fails for a reason other than the
        database being down, each is retried alone, so one bad verdict fails only its own
        caller."""
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
            for v in sorted(verdicts, key=lambda v: v.run_id)
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
        """Usage of this call, the run's answer, the project totals and the run's status, in
        one statement (atomic by itself: no transaction round trips)."""
        cost = r.usage.cost_usd(r.prices)
        u = r.usage
        async with unavailable_is_transient("store result"), self.pool.acquire() as con:
            row = await con.fetchrow(
                STORE_RESULT,
                uuid.UUID(r.message_id),
                r.call_id,
                r.task_id,
                r.run_id,
                r.attempt,
                r.project_id,
                r.model,
                u.input_tokens,
                u.output_tokens,
                u.cache_read_tokens,
                u.cache_write_tokens,
                cost,
                core.assistant_message_id(r.run_id),
                r.text,
                uuid.UUID(r.conversation_id),
                core.rank("completed"),
                r.round,
            )
            if row is None:
                raise BadData(f"result for unknown message {r.message_id}")
            if row["counted"]:
                self._counted(r.model, cost)
            if row["replaced_cost"] is not None and row["replaced_cost"] > 0:
                self._counted(r.model, float(row["replaced_cost"]))  # a counter only grows
            if row["superseded"]:
                if row["raced"]:
                    await self._add_usage(con, r.call_id, r, r.usage, r.prices, "completed")
                raise Superseded(f"run {r.run_id} round {r.round} already asked for tools")
            if row["raced"]:
                # A row of this call was stored after the statement began (an estimate, or an
                # exact copy): replace the estimate now, then read the run's usage afresh.
                await self._add_usage(con, r.call_id, r, r.usage, r.prices, "completed")
                stored = await self._reply(con, r.run_id, r.message_id, inserted=False)
                stored = msgspec.structs.replace(stored, inserted=row["inserted"] is True)
                return await self._with_run_usage(con, stored, r.run_id)
            if row["id"] is None:
                # A concurrent delivery stored the reply after this statement began: read it
                # (and the run's usage) with a fresh snapshot.
                stored = await self._reply(con, r.run_id, r.message_id, inserted=False)
                return await self._with_run_usage(con, stored, r.run_id)
            return _stored(
                row,
                row["inserted"],
                usage=m.Usage(
                    input_tokens=int(row["input_tokens"]),
                    output_tokens=int(row["output_tokens"]),
                    cache_read_tokens=int(row["cache_read_tokens"]),
                    cache_write_tokens=int(row["cache_write_tokens"]),
                ),
                cost_usd=float(row["cost_usd"]),
                calls=tuple(row["calls"]),
                asked_at=row["asked_at"],
            )

    async def store_tool_turn(self, r: m.ExecResult) -> StoredToolTurn:
        """A model call that ended asking for tools: its usage (once per call) and its turn
        (once per run and round), in one transaction; the turn as stored comes back."""
        content = history.assistant_blocks(r.text, r.tool_calls)
        async with (
            unavailable_is_transient("store tool turn"),
            self.pool.acquire() as con,
            con.transaction(),
        ):
            # The round's claim, first: an answer of this round, stored or being stored by
            # another model call of the round at this very moment, holds it (the answer's
            # statement claims it too), and this turn is not stored. Locks are taken in the
            # answer's order (claim, the run's row, then the totals in _add_usage), so the two
            # never wait on each other in a circle.
            held = await con.fetchval(CLAIM_TURN, r.run_id, r.round, uuid.UUID(r.message_id))
            # The run's row, locked: a reply and a turn of one run are decided one at a time.
            await con.execute("SELECT 1 FROM runs WHERE run_id = $1 FOR UPDATE", r.run_id)
            await self._add_usage(con, r.call_id, r, r.usage, r.prices, "tool_use")
            # The run ended (its reply is stored: an answer of this round from a second model
            # call, or policy's own reply): this turn would ask for calls nothing will ever
            # run. The call is billed (committed); nothing else is stored.
            ended = held == "answer" or await con.fetchval(REPLY_STORED, r.run_id)
            if not ended:
                won = await con.fetchval(
                    INSERT_TOOL_TURN,
                    r.run_id,
                    r.round,
                    r.call_id,
                    uuid.UUID(r.message_id),
                    msgspec.json.encode(content).decode(),
                )
                row = await con.fetchrow(SELECT_TOOL_TURN, r.run_id, r.round)
                if row is None:
                    raise BadData(f"tool turn for unknown message {r.message_id}")
                usage = await con.fetchrow(RUN_USAGE, r.run_id)
                earlier = await con.fetch(EARLIER_TOOL_TURNS, r.run_id, r.round)
        if ended:
            raise Superseded(f"run {r.run_id} has its reply; round {r.round} asks too late")
        if won is not None:
            calls, text = r.tool_calls, r.text
        else:
            # An earlier model call of this round was stored first: its calls stand.
            stored = (
                msgspec.json.decode(row["content"])
                if isinstance(row["content"], str)
                else row["content"]
            )
            text = " ".join(b["text"] for b in stored if b.get("type") == "text")
            calls = tuple(
                m.ToolCall(
                    id=b["id"],
                    name=b["name"],
                    input=b["input"],
                    input_digest=m.input_digest(b["input"]),
                )
                for b in stored
                if b.get("type") == "tool_use"
            )
        return StoredToolTurn(
            call_id=row["call_id"],
            text=text,
            tool_calls=calls,
            user_id=row["user_id"],
            inserted=won is not None,
            earlier_call_ids=tuple(
                b["id"]
                for t in earlier
                for b in _blocks(t["content"])
                if b.get("type") == "tool_use" and isinstance(b.get("id"), str)
            ),
            usage=m.Usage(
                input_tokens=int(usage["input_tokens"]),
                output_tokens=int(usage["output_tokens"]),
                cache_read_tokens=int(usage["cache_read_tokens"]),
                cache_write_tokens=int(usage["cache_write_tokens"]),
            ),
        )

    async def store_tool_result(self, r: m.ToolResult) -> tuple[m.ToolResult, bool]:
        """A call's result (the first one stored for the call wins) and whether this stored it."""
        async with unavailable_is_transient("store tool result"), self.pool.acquire() as con:
            won = await con.fetchval(
                INSERT_TOOL_RESULT,
                r.call_id,
                r.run_id,
                r.round,
                r.name,
                r.outcome,
                r.is_error,
                r.content,
                r.input_digest,
            )
            if won is not None:
                return r, True
            row = await con.fetchrow(SELECT_TOOL_RESULT, r.run_id, r.call_id)
        return (
            msgspec.structs.replace(
                r,
                outcome=row["outcome"],
                is_error=row["is_error"],
                content=row["content"],
                input_digest=row["input_digest"],
            ),
            False,
        )

    async def store_failed_usage(self, f: m.ExecFailed) -> None:
        """A failed or cut call still used tokens; they are counted once, like any other call."""
        async with (
            unavailable_is_transient("store failed usage"),
            self.pool.acquire() as con,
            con.transaction(),
        ):
            await self._add_usage(con, f.call_id, f, f.usage, f.prices, f.error_class)

    async def store_estimates(self, e: m.ExecResult | m.ExecFailed) -> int:
        """The calls of earlier deliveries of ``e``'s task that died with their executor, each
        billed once by its call id with its estimated usage (flagged); how many this wrote.

        Written before the outcome itself, so the run's usage that policy settles with (the
        answer's, or the failure notice's) already counts them."""
        if not e.estimated:
            return 0
        async with (
            unavailable_is_transient("store estimates"),
            self.pool.acquire() as con,
            con.transaction(),
        ):
            written = 0
            for call in e.estimated:
                written += await self._add_usage(
                    con, call.call_id, e, call.usage, e.prices, estimate.OUTCOME, estimated=True
                )
            return written

    async def store_model_usage(self, u: m.ModelUsage) -> bool:
        """A call the agent made (a classification: no task, no attempt, it came before the
        run), or an executor's call that died with it and that policy settled at its attempt's
        deadline (flagged estimated): counted once, like any call. True if this delivery wrote it.
        """
        async with (
            unavailable_is_transient("store model usage"),
            self.pool.acquire() as con,
            con.transaction(),
        ):
            return await self._add_usage(
                con,
                u.call_id,
                u,
                u.usage,
                u.prices,
                u.outcome,
                purpose=u.purpose,
                estimated=u.estimated,
            )

    async def apply_api_key(self, c: m.ApiKeyCommand) -> str:
        """An operator's key command (``baton apikey``): what it did, for the log line.

        Both are idempotent: a redelivered create finds its row, a revoke keeps the first
        revocation time. A revoke names its project too: it never touches another's key.
        """
        try:
            key_id = uuid.UUID(c.key_id)
        except ValueError:
            raise BadData(f"api key id {c.key_id!r} is not a UUID") from None
        if not is_safe_token(c.project_id):
            raise BadData("api key command for an invalid project id")
        async with unavailable_is_transient("api key"), self.pool.acquire() as con:
            if c.op == "create":
                if len(c.key_hash) != 64 or not c.prefix:
                    raise BadData("api key create without its hash and prefix")
                try:
                    inserted = await con.fetchval(
                        "INSERT INTO api_keys (id, project_id, name, key_hash, prefix, created_at) "
                        "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING RETURNING true",
                        key_id,
                        c.project_id,
                        c.name[:200],
                        c.key_hash,
                        c.prefix,
                        c.at,
                    )
                except asyncpg.UniqueViolationError:
                    raise BadData("another key has this hash") from None
                return "api_key_created" if inserted else "api_key_duplicate"
            revoked = await con.fetchval(
                "UPDATE api_keys SET revoked_at = coalesce(revoked_at, $3) "
                "WHERE id = $1 AND project_id = $2 RETURNING true",
                key_id,
                c.project_id,
                c.at,
            )
            return "api_key_revoked" if revoked else "api_key_unknown"

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
        return msgspec.structs.replace(
            stored, usage=usage, cost_usd=float(row["cost_usd"]), calls=tuple(row["calls"])
        )

    async def _add_usage(
        self,
        con: Any,
        call_id: str,
        e: m.ExecResult | m.ExecFailed | m.ModelUsage,
        usage: m.Usage,
        prices: m.Prices,
        outcome: str,
        purpose: m.Purpose = "answer",
        estimated: bool = False,
    ) -> bool:
        """Count one call's usage; True if this call wrote it (False: an earlier delivery did).
        An exact usage replaces an estimate of the same call stored first (ADD_USAGE)."""
        cost = usage.cost_usd(prices)
        args = (
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
            purpose,
            estimated,
        )
        row = await con.fetchrow(ADD_USAGE, *args)
        if row["unseen"] and not row["inserted"] and not estimated:
            # A row of the call was stored since the statement began: this one sees it.
            row = await con.fetchrow(ADD_USAGE, *args)
        if row["inserted"]:
            self._counted(e.model, cost)
        elif row["replaced"] and row["cost_usd"] > 0:
            self._counted(e.model, float(row["cost_usd"]))  # by the difference; a counter grows
        return bool(row["inserted"] or row["replaced"])

    def _counted(self, model: str, cost: float) -> None:
        """Called when a call's usage was written for the first time (a hook for metrics)."""

    async def _insert_reply(
        self, con: Any, run_id: str, message_id: str, kind: m.ReplyKind, text: str
    ) -> StoredReply:
        new_id = core.assistant_message_id(run_id)
        inserted = await con.fetchval(
            INSERT_REPLY, new_id, kind, text, run_id, uuid.UUID(message_id)
        )
        return await self._reply(con, run_id, message_id, inserted is not None)

    async def _reply(self, con: Any, run_id: str, message_id: str, inserted: bool) -> StoredReply:
        row = await con.fetchrow(SELECT_REPLY, run_id)
        if row is None:
            raise BadData(f"reply for unknown message {message_id}")
        return _stored(row, inserted)

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


def _blocks(content: Any) -> list[dict[str, Any]]:
    """A stored turn's content blocks (jsonb comes back as text unless a codec is set)."""
    blocks = msgspec.json.decode(content) if isinstance(content, str) else content
    return [b for b in blocks if isinstance(b, dict)] if isinstance(blocks, list) else []

"""The retention sweep: archive conversations idle past their project's retention, then delete
them the one way there is (the deletion request, ``shared.deletion``).

It runs in the persister (the only writer), once per period across any number of replicas: a
replica takes a Postgres advisory lock (``pg_try_advisory_lock``, held on one connection for
the sweep; a dead replica's lock goes with its connection) and then starts only if no sweep
finished within the period (``retention_sweeps``). Per conversation, in this order:

1. dump its rows in one REPEATABLE READ snapshot and write the archive (whole or not at all);
2. record it in ``archived_conversations`` (with the activity time the archive holds);
3. publish the deletion request (create-only: a second one is "already deleted", a success);
4. mark the request sent.

Killed anywhere, the next sweep picks up where it stopped: an archive without its row is
written again (the same bytes: the file is deterministic), a row without its request gets the
request. A conversation its owner deleted (a tombstone) is never archived; one with activity
after it was archived is no longer idle and is left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import structlog

from services.persister import archive
from shared import deletion, retention
from shared.bus import Bus
from shared.metrics import ServiceMetrics

# "baton_rs" in ASCII: the one lock every replica's sweep takes.
LOCK_KEY = 0x6261746F6E5F7273


# Not archived-and-requested already (for this activity), not found deleted by this sweep, not
# a tombstone (migration 0008 keeps a deleted conversation's row); the last two clauses are the
# predicate of the partial index conversations_idle (migration 0009).
_NOT_DONE = (
    "NOT EXISTS (SELECT 1 FROM archived_conversations a WHERE a.conversation_id = c.id "
    "AND a.delete_requested_at IS NOT NULL AND a.last_activity_at >= c.last_activity_at) "
    "AND NOT (c.id = ANY($4::uuid[])) AND c.deleted_at IS NULL AND c.message_count >= 0"
)
# $1 the project, $2 its cutoff, $3 how many, $4 ids to skip.
IDLE_IN_PROJECT = (
    "SELECT id, project_id, user_id, last_activity_at FROM conversations c "
    f"WHERE project_id = $1 AND last_activity_at < $2 AND {_NOT_DONE} "
    "ORDER BY last_activity_at, id LIMIT $3"
)
# $1 the default cutoff, $2 the projects with rules of their own, $3 how many, $4 ids to skip.
IDLE_ELSEWHERE = (
    "SELECT id, project_id, user_id, last_activity_at FROM conversations c "
    f"WHERE last_activity_at < $1 AND NOT (project_id = ANY($2::text[])) AND {_NOT_DONE} "
    "ORDER BY last_activity_at, id LIMIT $3"
)


MARK_REQUESTED = (
    "UPDATE archived_conversations SET delete_requested_at = now() "
    "WHERE conversation_id = $1 AND delete_requested_at IS NULL"
)
MARK_DELETED_REQUESTED = (
    "UPDATE archived_conversations a SET delete_requested_at = now() FROM conversations c "
    "WHERE c.id = a.conversation_id AND a.delete_requested_at IS NULL "
    "AND c.deleted_at IS NOT NULL"
)


class SweepResult(msgspec.Struct, frozen=True):
    ran: bool  # False: another replica holds the lock, or a sweep finished this period
    archived: int = 0
    deletes_requested: int = 0
    skipped_deleted: int = 0
    batches: int = 0
    backlog: int = 0  # idle conversations still waiting when the sweep stopped (its budget)
    reason: str = ""


class SweepMetrics:
    """The sweep's metrics. A persister with no sweep declares them too (zero), so dashboards
    and alerts find them everywhere; the stale alert ignores a last success of 0."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.archived = metrics.counter(
            "archived_conversations_total", "Conversations archived by the retention sweep."
        )
        self.runs = metrics.counter(
            "retention_sweeps_total",
            "Retention sweeps by outcome (completed, skipped, failed).",
            ("outcome",),
        )
        for outcome in ("completed", "skipped", "failed"):
            self.runs.labels(outcome)  # every outcome's series from the start, at 0
        self.backlog = metrics.gauge(
            "retention_backlog",
            "Conversations past their retention still not archived when the last sweep ended.",
        )
        self.last_success = metrics.gauge(
            "retention_last_success_timestamp_seconds",
            "When the last retention sweep completed (any replica's, as this one last saw), Unix time.",
        )
        self.batch_seconds = metrics.histogram(
            "retention_batch_duration_seconds", "Time to archive and delete one batch."
        )


class Sweeper:
    def __init__(
        self,
        pool: Any,
        bus: Bus,
        target: archive.Target,
        prefix: str,
        kept: retention.Retention,
        metrics: ServiceMetrics,
        *,
        batch: int = 100,
        max_batches: int = 50,
        period_s: float = 3600.0,
        pause_s: float = 0.0,
        instance: str = "",
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.pool = pool
        self.bus = bus
        self.target = target
        self.prefix = prefix
        self.kept = kept
        # Set when the persister stops (run_forever's ``stop``): a sweep ends after the batch
        # it is in, as if cancelled, rather than on its cancel alone (which an await in a batch
        # can lose).
        self.stopping = asyncio.Event()
        self.batch = batch
        self.max_batches = max_batches
        self.period_s = period_s
        self.pause_s = pause_s
        self.instance = instance or f"persister-{uuid.uuid4().hex[:8]}"
        self.now = now
        self.log = structlog.get_logger().bind(component="retention_sweep")
        m = SweepMetrics(metrics)
        self.archived, self.runs, self.backlog = m.archived, m.runs, m.backlog
        self.last_success, self.batch_seconds = m.last_success, m.batch_seconds

    # ---- which conversations -------------------------------------------------------------

    def _cutoffs(self, now: datetime) -> tuple[list[tuple[str, datetime]], datetime | None]:
        """(named project, cutoff) for every project with its own retention, and the cutoff of
        every other project (None: the defaults keep forever)."""
        named = [
            (pid, now - timedelta(days=k.retention_days))
            for pid, k in self.kept.projects.items()
            if k.retention_days is not None
        ]
        d = self.kept.defaults.retention_days
        return named, None if d is None else now - timedelta(days=d)

    async def candidates(
        self, con: Any, limit: int, now: datetime, skip: list[uuid.UUID] | None = None
    ) -> list[Any]:
        """Idle conversations, the longest idle first, not archived-and-requested already
        (nor in ``skip``: those this sweep found deleted by their owner)."""
        named, default_cutoff = self._cutoffs(now)
        names = list(self.kept.projects)
        skipped = skip or []
        rows: list[Any] = []
        for pid, cutoff in named:
            rows += await con.fetch(IDLE_IN_PROJECT, pid, cutoff, limit, skipped)
        if default_cutoff is not None:
            rows += await con.fetch(IDLE_ELSEWHERE, default_cutoff, names, limit, skipped)
        rows.sort(key=lambda r: (r["last_activity_at"], r["id"]))
        return rows[:limit]

    # ---- one conversation ------------------------------------------------------------------

    async def _archive_one(self, row: Any) -> str:
        """Steps 1 to 4 for one conversation: 'archived', or 'deleted' (its owner deleted it)."""
        cid, project, owner = str(row["id"]), row["project_id"], row["user_id"]
        if await deletion.tombstone(self.bus, project, cid) is not None:
            # A deletion is under way (the owner's, or this sweep's own from a run killed before
            # it marked the request): nothing more to keep, and an archive of it is done.
            async with self.pool.acquire() as con:
                await con.execute(MARK_REQUESTED, row["id"])
            return "deleted"
        async with self.pool.acquire() as con:
            already = await con.fetchrow(
                "SELECT location, last_activity_at FROM archived_conversations "
                "WHERE conversation_id = $1",
                row["id"],
            )
            if already is None or already["last_activity_at"] < row["last_activity_at"]:
                async with con.transaction(isolation="repeatable_read", readonly=True):
                    rows = await archive.dump(con, cid)
                data = archive.encode(rows)
                key = archive.object_key(self.prefix, project, cid)
                await self.target.put(key, data)
                header, _ = archive.decode(data)
                await con.execute(
                    "INSERT INTO archived_conversations (conversation_id, project_id, user_id, "
                    "last_activity_at, location, sha256, messages) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7) "
                    "ON CONFLICT (conversation_id) DO UPDATE SET "
                    "last_activity_at = EXCLUDED.last_activity_at, location = EXCLUDED.location, "
                    "sha256 = EXCLUDED.sha256, messages = EXCLUDED.messages, archived_at = now(), "
                    "delete_requested_at = NULL",
                    row["id"],
                    project,
                    owner,
                    row["last_activity_at"],
                    f"{self.target.location.rstrip('/')}/{key}",
                    archive.sha256(data),
                    header.counts.get("messages", 0),
                )
                self.archived.inc()
        await deletion.request_delete(
            self.bus,
            deletion.delete_request(project, cid, owner, "retention", reason="retention"),
        )
        async with self.pool.acquire() as con:
            await con.execute(MARK_REQUESTED, row["id"])
        return "archived"

    # ---- one sweep -------------------------------------------------------------------------

    async def run_once(self, force: bool = False) -> SweepResult:
        """One sweep if this replica may run it now (``force``: whatever the period says)."""
        if not self.kept.limited:
            return SweepResult(ran=False, reason="no retention configured")
        async with self.pool.acquire() as lock:
            if not await lock.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
                self.runs.labels("skipped").inc()
                return SweepResult(ran=False, reason="another replica is sweeping")
            try:
                return await self._locked(lock, force)
            finally:
                await lock.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)

    async def _locked(self, con: Any, force: bool) -> SweepResult:
        now = self.now()
        recent = await con.fetchval(
            "SELECT max(finished_at) FROM retention_sweeps WHERE finished_at IS NOT NULL"
        )
        if recent is not None:
            # Every replica reports the last sweep anyone finished (the alert reads the max).
            self.last_success.set(recent.timestamp())
        if not force and recent is not None and recent > now - timedelta(seconds=self.period_s):
            self.runs.labels("skipped").inc()
            return SweepResult(ran=False, reason="a sweep finished this period")
        sweep_id = await con.fetchval(
            "INSERT INTO retention_sweeps (instance) VALUES ($1) RETURNING id", self.instance
        )
        # A sweep killed after asking for a deletion and before marking it: the persister may
        # have deleted the conversation since, which takes it out of the candidates.
        await con.execute(MARK_DELETED_REQUESTED)
        archived = requested = skipped = batches = 0
        deleted: list[uuid.UUID] = []
        try:
            while batches < self.max_batches:
                if self.stopping.is_set():
                    # Ended as a cancel would end it: unfinished, counted failed, so the next
                    # start sweeps again rather than take this one as the period's.
                    raise asyncio.CancelledError("the persister is stopping")
                rows = await self.candidates(con, self.batch, now, deleted)
                if not rows:
                    break
                started = time.monotonic()
                counts = {"archived": 0, "deleted": 0}
                for row in rows:
                    outcome = await self._archive_one(row)
                    counts[outcome] += 1
                    if outcome == "deleted":
                        deleted.append(row["id"])
                    if self.pause_s > 0:
                        await asyncio.sleep(self.pause_s)  # spare the database on a big backlog
                batches += 1
                archived += counts["archived"]
                skipped += counts["deleted"]
                requested += counts["archived"]
                elapsed = time.monotonic() - started
                self.batch_seconds.observe(elapsed)
                self.log.info(
                    "retention_batch",
                    sweep=sweep_id,
                    batch=batches,
                    archived=counts["archived"],
                    skipped_deleted=counts["deleted"],
                    duration_s=round(elapsed, 3),
                    target=self.target.location,
                )
            backlog = len(await self.candidates(con, 10_000, now, deleted))
        except BaseException:
            self.runs.labels("failed").inc()
            raise
        await con.execute(
            "UPDATE retention_sweeps SET finished_at = now(), archived = $2, backlog = $3 "
            "WHERE id = $1",
            sweep_id,
            archived,
            backlog,
        )
        self.backlog.set(backlog)
        self.last_success.set(time.time())
        self.runs.labels("completed").inc()
        self.log.info(
            "retention_sweep_done",
            sweep=sweep_id,
            archived=archived,
            batches=batches,
            backlog=backlog,
        )
        return SweepResult(
            ran=True,
            archived=archived,
            deletes_requested=requested,
            skipped_deleted=skipped,
            batches=batches,
            backlog=backlog,
        )

    async def run_forever(self, stop: asyncio.Event, every_s: float) -> None:
        """Try a sweep every ``every_s`` (a tenth of the period, say); errors are logged and
        the next try comes as usual."""
        self.stopping = stop
        while not stop.is_set():
            try:
                await self.run_once()
            except Exception as exc:  # the sweep never takes the persister down
                self.log.error("retention_sweep_failed", error=type(exc).__name__, detail=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)

"""Verdicts share one round trip and commit; a bad one in a batch fails only its own caller."""

from __future__ import annotations

import asyncio

import asyncpg

from services.persister.adapters import Store
from shared import messages as m
from shared.batching import GroupCommit
from shared.db import create_pool
from tests.integration.conftest import Infra
from tests.support import eventually, lock_waiters_at_least, user_event


def _verdict(
    e: m.UserMessageAccepted, run_id: str, status: m.RunStatus = "running"
) -> m.RunVerdict:
    return m.RunVerdict(
        event_id=f"v-{run_id}-{status}",
        message_id=e.message_id,
        conversation_id=e.conversation_id,
        project_id=e.project_id,
        run_id=run_id,
        user_id=e.user_id,
        verdict="approve",
        status=status,
        reason="ok",
        model="claude-sonnet-4-6",
        executor="chat",
        attempt=1,
    )


async def test_concurrent_verdicts_are_written_together_and_all_land(infra: Infra) -> None:
    pool = await create_pool(infra.database_url)
    store = Store(pool)
    sizes: list[int] = []
    commit: GroupCommit[m.RunVerdict, None] = GroupCommit(store.upsert_runs, on_batch=sizes.append)
    events = [user_event() for _ in range(20)]
    # Two verdicts per run in one batch, the final one first: statuses only move forward.
    verdicts = [_verdict(e, f"run-{e.message_id}", "completed") for e in events]
    verdicts += [_verdict(e, f"run-{e.message_id}", "running") for e in events]
    await asyncio.gather(*(commit.submit(v) for v in verdicts))
    assert sizes == [40]
    rows = await pool.fetch("SELECT status FROM runs")
    assert [r["status"] for r in rows] == ["completed"] * 20
    await pool.close()


async def test_a_bad_verdict_in_a_batch_fails_alone(infra: Infra) -> None:
    pool = await create_pool(infra.database_url)
    store = Store(pool)
    commit: GroupCommit[m.RunVerdict, None] = GroupCommit(store.upsert_runs)
    a, b = user_event(), user_event()
    good_a, good_b = _verdict(a, "run-a"), _verdict(b, "run-b")
    clash = _verdict(a, "run-other")  # a second run for one message breaks runs' unique key
    results = await asyncio.gather(
        commit.submit(good_a), commit.submit(clash), commit.submit(good_b), return_exceptions=True
    )
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], asyncpg.UniqueViolationError)
    stored = {r["run_id"] for r in await pool.fetch("SELECT run_id FROM runs")}
    assert stored == {"run-a", "run-b"}
    await pool.close()


async def test_two_batches_of_the_same_runs_in_opposite_orders_do_not_deadlock(
    infra: Infra,
) -> None:
    """Each row a batch writes stays locked to its commit. Batch one waits for a run's row
    another connection holds; batch two, the same two runs the other way round, takes the
    second run's row and queues for the first. When the first is free, batch one takes it and
    waits for the second: a cycle, which Postgres ended by failing a batch after a second
    (a transient error, redelivered). Written in run id order, both queue for the first row."""
    pool = await create_pool(infra.database_url)
    store = Store(pool)
    a, b = user_event(), user_event()
    low, high = sorted((f"run-{a.message_id}", f"run-{b.message_id}"))
    event = {f"run-{a.message_id}": a, f"run-{b.message_id}": b}
    for run_id in (low, high):
        await store.upsert_run(_verdict(event[run_id], run_id, "queued"))
    hold = await asyncpg.connect(infra.database_url)
    watch = await asyncpg.connect(infra.database_url)
    try:
        tx = hold.transaction()
        await tx.start()
        await hold.execute("SELECT 1 FROM runs WHERE run_id = $1 FOR UPDATE", low)
        one = asyncio.create_task(store.upsert_runs([_verdict(event[r], r) for r in (low, high)]))
        await eventually(lambda: lock_waiters_at_least(watch, 1), timeout=30)
        two = asyncio.create_task(
            store.upsert_runs([_verdict(event[r], r, "completed") for r in (high, low)])
        )

        await eventually(lambda: lock_waiters_at_least(watch, 2), timeout=30)
        await tx.rollback()
        results = await asyncio.wait_for(asyncio.gather(one, two, return_exceptions=True), 60)
    finally:
        await hold.close()
        await watch.close()
    assert results == [[None, None], [None, None]], results
    rows = await pool.fetch("SELECT run_id, status FROM runs ORDER BY run_id")
    assert [(r["run_id"], r["status"]) for r in rows] == [(low, "completed"), (high, "completed")]
    await pool.close()

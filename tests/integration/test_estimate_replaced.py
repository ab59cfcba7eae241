"""An estimate of a call (policy took it for dead) gives way to the call's exact usage when the
call turns out to have finished after all (its executor missed the abort): one row per call,
the exact numbers, the project totals moved by the difference; never the reverse, never twice.
Real Postgres (docs/guarantees.md, I4)."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from services.persister.adapters import Store
from shared import estimate
from shared import messages as m
from shared.db import create_pool
from tests.integration.conftest import Infra
from tests.support import blocked_on_a_lock, exec_result, user_event

EXACT = m.Usage(input_tokens=120, output_tokens=80, cache_read_tokens=10, cache_write_tokens=4)
GUESS = m.Usage(input_tokens=120, output_tokens=30, cache_read_tokens=10, cache_write_tokens=4)


def _exact(e: m.UserMessageAccepted) -> m.ExecResult:
    return exec_result(e, 1, "finished after all", EXACT)


def _estimate(r: m.ExecResult) -> m.ModelUsage:
    """What policy's settle timer publishes for the call (shared/estimate.py's row)."""
    return m.ModelUsage(
        event_id=estimate.estimate_id(r.call_id),
        message_id=r.message_id,
        conversation_id=r.conversation_id,
        project_id=r.project_id,
        call_id=r.call_id,
        run_id=r.run_id,
        user_id="u1",
        purpose="answer",
        model=r.model,
        outcome=estimate.OUTCOME,
        usage=GUESS,
        prices=r.prices,
        task_id=r.task_id,
        attempt=r.attempt,
        estimated=True,
    )


async def _setup(infra: Infra) -> tuple[Any, Store, m.UserMessageAccepted, m.ExecResult]:
    pool = await create_pool(infra.database_url, max_size=8)
    store = Store(pool)
    e = user_event()
    await store.insert_user_message(e)
    return pool, store, e, _exact(e)


async def _rows(pool: Any) -> list[dict[str, Any]]:
    return [dict(r) for r in await pool.fetch("SELECT * FROM usage ORDER BY call_id")]


async def _totals(pool: Any, project: str) -> tuple[int, int, int, int, float]:
    t = await pool.fetchrow("SELECT * FROM project_usage WHERE project_id = $1", project)
    return (
        t["input_tokens"],
        t["output_tokens"],
        t["cache_read_tokens"],
        t["cache_write_tokens"],
        float(t["cost_usd"]),
    )


def _counts(u: m.Usage, prices: m.Prices) -> tuple[int, int, int, int, float]:
    cost = u.cost_usd(prices)
    return (u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens, cost)


def _is_exact(row: dict[str, Any], r: m.ExecResult, outcome: str = "completed") -> bool:
    got = (row["input_tokens"], row["output_tokens"], row["cache_read_tokens"])
    return (
        row["call_id"] == r.call_id
        and not row["estimated"]
        and row["outcome"] == outcome
        and got == (EXACT.input_tokens, EXACT.output_tokens, EXACT.cache_read_tokens)
        and float(row["cost_usd"]) == pytest.approx(EXACT.cost_usd(r.prices))
    )


async def test_an_answer_replaces_the_estimate_of_its_call_and_the_totals_move_by_the_difference(
    infra: Infra,
) -> None:
    pool, store, e, exact = await _setup(infra)
    assert await store.store_model_usage(_estimate(exact))
    assert await _totals(pool, e.project_id) == pytest.approx(_counts(GUESS, exact.prices))

    stored = await store.store_result(exact)
    [row] = await _rows(pool)
    assert _is_exact(row, exact)
    assert await _totals(pool, e.project_id) == pytest.approx(_counts(EXACT, exact.prices))
    # The run's usage it announces (what policy settles with) is the exact one, counted once.
    assert (stored.inserted, stored.usage) == (True, EXACT)
    assert stored.calls == (exact.call_id,)  # the replaced row, once
    assert stored.cost_usd == pytest.approx(EXACT.cost_usd(exact.prices))
    runs = await pool.fetchval("SELECT runs FROM project_usage WHERE project_id = $1", e.project_id)
    assert runs == 1
    await pool.close()


async def test_an_exact_failure_report_replaces_the_estimate_of_its_call(infra: Infra) -> None:
    pool, store, e, exact = await _setup(infra)
    assert await store.store_model_usage(_estimate(exact))
    cut = m.ExecFailed(
        event_id="failed:1", message_id=e.message_id, conversation_id=e.conversation_id,
        project_id=e.project_id, task_id=exact.task_id, call_id=exact.call_id,
        run_id=exact.run_id, attempt=1, model=exact.model, error_class="cancelled",
        error="aborted", usage=EXACT, prices=exact.prices,
    )  # fmt: skip
    await store.store_failed_usage(cut)
    await store.store_failed_usage(cut)  # a redelivery: nothing more
    [row] = await _rows(pool)
    assert _is_exact(row, exact, outcome="cancelled")
    assert await _totals(pool, e.project_id) == pytest.approx(_counts(EXACT, exact.prices))
    await pool.close()


async def test_an_estimate_after_the_exact_usage_changes_nothing(infra: Infra) -> None:
    pool, store, e, exact = await _setup(infra)
    await store.store_result(exact)
    before = await _rows(pool)
    assert not await store.store_model_usage(_estimate(exact))
    assert await _rows(pool) == before
    assert _is_exact(before[0], exact)
    assert await _totals(pool, e.project_id) == pytest.approx(_counts(EXACT, exact.prices))
    await pool.close()


async def test_the_exact_usage_delivered_many_times_at_once_after_an_estimate_counts_once(
    infra: Infra,
) -> None:
    pool, store, e, exact = await _setup(infra)
    assert await store.store_model_usage(_estimate(exact))
    stored = await asyncio.gather(*(store.store_result(exact) for _ in range(8)))
    assert sum(s.inserted for s in stored) == 1
    assert all(s.usage == EXACT and s.calls == (exact.call_id,) for s in stored)
    [row] = await _rows(pool)
    assert _is_exact(row, exact)
    assert await _totals(pool, e.project_id) == pytest.approx(_counts(EXACT, exact.prices))
    await pool.close()


async def test_an_estimate_committed_while_the_answer_was_being_stored_is_still_replaced(
    infra: Infra,
) -> None:
    # The estimate's write holds the call's key uncommitted; the answer's statement waits for
    # it, cannot see it in its snapshot, and must replace it afterwards.
    pool, store, e, exact = await _setup(infra)
    guess = _estimate(exact)
    other: asyncpg.Connection = await pool.acquire()
    tx = other.transaction()
    await tx.start()
    try:
        # The store's own write of the estimate, on a connection whose transaction is open.
        est = guess.usage
        assert await store._add_usage(
            other, guess.call_id, guess, est, guess.prices, guess.outcome, estimated=True
        )
        racing = asyncio.create_task(store.store_result(exact))
        await blocked_on_a_lock(pool)
        assert not racing.done()
        await tx.commit()
    finally:
        await pool.release(other)
    stored = await racing
    [row] = await _rows(pool)
    assert _is_exact(row, exact)
    assert await _totals(pool, e.project_id) == pytest.approx(_counts(EXACT, exact.prices))
    assert (stored.inserted, stored.usage) == (True, EXACT)
    await pool.close()

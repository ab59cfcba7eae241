"""Deadlines swept by one timer: an await past its deadline is cut, others are left alone."""

from __future__ import annotations

import asyncio

import pytest

from services.gateway.deadlines import Deadlines


async def _bounded(deadlines: Deadlines, timeout_s: float, work: asyncio.Future[None]) -> str:
    task = deadlines.watch(timeout_s)
    try:
        await work
    except asyncio.CancelledError:
        if not deadlines.fired(task):
            raise
        await asyncio.sleep(0)  # the task goes on: the cancel was taken back
        return "timed out"
    finally:
        deadlines.forget(task)
    return "done"


def test_an_await_past_its_deadline_is_cut_and_the_task_goes_on() -> None:
    async def main() -> tuple[str, Deadlines]:
        deadlines = Deadlines(tick_s=0.01)
        never = asyncio.get_running_loop().create_future()
        return await asyncio.wait_for(_bounded(deadlines, 0.05, never), 30), deadlines

    outcome, deadlines = asyncio.run(main())
    assert outcome == "timed out"
    assert deadlines.due == {} and deadlines.cancelled == set()


def test_an_await_that_finishes_in_time_is_left_alone_and_the_sweep_stops() -> None:
    async def main() -> tuple[list[str], Deadlines]:
        deadlines = Deadlines(tick_s=0.01)
        loop = asyncio.get_running_loop()
        outcomes = []
        for _ in range(3):
            work = loop.create_future()
            loop.call_later(0.02, work.set_result, None)
            outcomes.append(await _bounded(deadlines, 5.0, work))
        await asyncio.sleep(0.05)
        assert deadlines.sweeper is not None and deadlines.sweeper.done()
        return outcomes, deadlines

    outcomes, deadlines = asyncio.run(main())
    assert outcomes == ["done"] * 3 and deadlines.due == {}


def test_a_cancel_from_elsewhere_is_not_taken_for_the_deadline() -> None:
    async def main() -> None:
        deadlines = Deadlines(tick_s=0.01)
        never = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(_bounded(deadlines, 5.0, never))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert deadlines.due == {}

    asyncio.run(main())

"""GroupCommit: one batch per event-loop turn, each caller gets its own result or error."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from shared.batching import GroupCommit


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    async def double(self, items: list[int]) -> Sequence[int | BaseException]:
        self.batches.append(items)
        await asyncio.sleep(0)
        return [ValueError(f"odd {i}") if i % 2 else i * 2 for i in items]


async def test_concurrent_submits_share_one_batch_and_get_their_own_results() -> None:
    rec = Recorder()
    group: GroupCommit[int, int] = GroupCommit(rec.double)
    results = await asyncio.gather(*(group.submit(i) for i in (0, 2, 4, 6)))
    assert results == [0, 4, 8, 12]
    assert rec.batches == [[0, 2, 4, 6]]


async def test_an_error_for_one_item_fails_only_its_caller() -> None:
    group: GroupCommit[int, int] = GroupCommit(Recorder().double)
    results = await asyncio.gather(*(group.submit(i) for i in (2, 3, 4)), return_exceptions=True)
    assert results[0] == 4 and results[2] == 8
    assert isinstance(results[1], ValueError)


async def test_a_failing_batch_fails_every_caller_in_it() -> None:
    async def broken(items: list[int]) -> Sequence[int]:
        raise ConnectionError("database gone")

    group: GroupCommit[int, int] = GroupCommit(broken)
    results = await asyncio.gather(*(group.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)


async def test_batches_are_capped_and_sequential_submits_are_not_held_back() -> None:
    rec = Recorder()
    sizes: list[int] = []
    group: GroupCommit[int, int] = GroupCommit(rec.double, max_batch=3, on_batch=sizes.append)
    await asyncio.gather(*(group.submit(i * 2) for i in range(7)))
    assert sizes == [3, 3, 1]
    assert await group.submit(10) == 20
    assert sizes[-1] == 1


async def test_a_wrong_number_of_results_is_an_error_for_everyone() -> None:
    async def short(items: list[int]) -> Sequence[int]:
        return items[:-1]

    group: GroupCommit[int, int] = GroupCommit(short)
    with pytest.raises(RuntimeError, match="returned"):
        await asyncio.gather(group.submit(1), group.submit(2))

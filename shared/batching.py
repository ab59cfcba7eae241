"""Group commit: concurrent callers share one round trip, each still gets its own result."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from opentelemetry import trace
from opentelemetry.trace import SpanContext

from shared import tracing

I = TypeVar("I")  # noqa: E741 - the conventional name for an input item
O = TypeVar("O")  # noqa: E741 - the conventional name for an output item

RunBatch = Callable[[list[I]], Awaitable[Sequence[O | BaseException]]]


class GroupCommit(Generic[I, O]):
    """Collects items submitted in the same event-loop turn and runs them as one batch.

    ``run_batch`` returns one result per item, in order; an exception in that list fails only
    its own caller, an exception raised by ``run_batch`` fails every caller of the batch. No
    caller returns before its batch has finished, so nothing is acked before it is committed.
    """

    def __init__(
        self,
        run_batch: RunBatch[I, O],
        max_batch: int = 256,
        on_batch: Callable[[int], None] | None = None,
        name: str = "group commit",
    ) -> None:
        self.run_batch = run_batch
        self.name = name
        self.max_batch = max_batch
        self.on_batch = on_batch
        self.pending: list[tuple[I, asyncio.Future[O], SpanContext]] = []
        self.scheduled = False

    async def submit(self, item: I) -> O:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[O] = loop.create_future()
        # Each caller's span, so the shared batch's span can link to every message it serves.
        self.pending.append((item, future, trace.get_current_span().get_span_context()))
        if not self.scheduled:
            # call_soon, not a timer: the batch is whatever arrived this turn, so no added latency.
            self.scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self.scheduled = False
        while self.pending:
            batch, self.pending = self.pending[: self.max_batch], self.pending[self.max_batch :]
            asyncio.get_running_loop().create_task(self._run(batch))

    async def _run(self, batch: list[tuple[I, asyncio.Future[O], SpanContext]]) -> None:
        if self.on_batch is not None:
            self.on_batch(len(batch))
        try:
            with tracing.batch_span(self.name, len(batch), [span for _, _, span in batch]):
                results = await self.run_batch([item for item, _, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} returned {len(results)} results")
        except BaseException as exc:
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future, _), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

"""The persister's inbound edge: decode → write in one transaction → publish → ack."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nats.aio.msg import Msg

from services.persister import core
from services.persister.adapters import Placed, Store, StoredReply
from shared import messages as m
from shared import subjects
from shared.batching import GroupCommit
from shared.bus import Bus
from shared.metrics import ServiceMetrics

A = TypeVar("A")
R = TypeVar("R")

# An answer can take minutes (long model streams, retries on a fallback model).
ANSWER_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)


class Handlers:
    def __init__(self, bus: Bus, store: Store, metrics: ServiceMetrics) -> None:
        self.bus = bus
        self.store = store
        batch_size = metrics.histogram(
            "batch_size",
            "User messages written per transaction (group commit).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.commit_seconds = metrics.histogram(
            "commit_seconds",
            "Duration of one write transaction, by what it writes.",
            ("write",),
        )
        self.answer_seconds = metrics.histogram(
            "answer_latency_seconds",
            "From accepting a user message to storing its reply, by reply kind.",
            ("kind",),
            buckets=ANSWER_BUCKETS,
        )
        self.cost = metrics.counter(
            "cost_usd_total",
            "Model cost in USD as billed (each call counted once), by model.",
            ("model",),
        )
        # Messages handled concurrently share one transaction; each still acks only after it.
        self.user_messages: GroupCommit[m.UserMessageAccepted, Placed] = GroupCommit(
            self._timed("user_messages", store.insert_user_messages), on_batch=batch_size.observe
        )
        self.upsert_run = self._timed("verdict", store.upsert_run)
        self.store_result = self._timed("result", store.store_result)
        self.store_reply = self._timed("reply", store.store_reply)
        self.store_failed_usage = self._timed("failed_usage", store.store_failed_usage)

    def _timed(self, write: str, fn: Callable[[A], Awaitable[R]]) -> Callable[[A], Awaitable[R]]:
        histogram = self.commit_seconds.labels(write)

        async def timed(arg: A) -> R:
            started = time.perf_counter()
            try:
                return await fn(arg)
            finally:
                histogram.observe(time.perf_counter() - started)

        return timed

    async def user_message(self, e: m.UserMessageAccepted, _msg: Msg) -> str:
        placed = await self.user_messages.submit(e)
        # Published on every delivery: the first publish may be the one a crash interrupted.
        persisted = m.UserMessagePersisted(
            event_id=f"persisted:user:{e.message_id}",
            message_id=e.message_id,
            conversation_id=e.conversation_id,
            project_id=e.project_id,
            causation_id=e.event_id,
            user_id=e.user_id,
            content=e.content,
            content_hash=e.content_hash,
            created_at=e.created_at,
            idempotency_key=e.idempotency_key,
            position=placed.position,
        )
        await self.bus.publish(
            subjects.persisted_user(e.project_id, e.conversation_id),
            persisted,
            msg_id=persisted.event_id,
        )
        return "inserted" if placed.inserted else "duplicate"

    async def verdict(self, v: m.RunVerdict, _msg: Msg) -> str:
        await self.upsert_run(v)
        return v.status

    async def result(self, r: m.ExecResult, _msg: Msg) -> str:
        stored = await self.store_result(r)
        if stored.usage_counted:
            self.cost.labels(r.model).inc(r.usage.cost_usd(r.prices))
        self._answered(stored)
        await self._announce(stored, r.run_id, r.event_id, r.usage)
        return "inserted" if stored.inserted else "duplicate"

    async def reply(self, p: m.PolicyReply, _msg: Msg) -> str:
        stored = await self.store_reply(p)
        self._answered(stored)
        await self._announce(stored, p.run_id, p.event_id, m.Usage())
        return "inserted" if stored.inserted else "duplicate"

    async def failed_usage(self, f: m.ExecFailed, _msg: Msg) -> str:
        if await self.store_failed_usage(f):
            self.cost.labels(f.model).inc(f.usage.cost_usd(f.prices))
        return f.error_class

    def _answered(self, stored: StoredReply) -> None:
        # Once per run (the first write); the start is the gateway's accept time.
        if stored.inserted and stored.asked_at is not None:
            waited = (stored.created_at - stored.asked_at).total_seconds()
            self.answer_seconds.labels(stored.kind).observe(max(waited, 0.0))

    async def _announce(self, stored: StoredReply, run_id: str, cause: str, usage: m.Usage) -> None:
        event = m.AssistantMessagePersisted(
            event_id=core.persisted_event_id(run_id),
            message_id=str(stored.id),
            conversation_id=str(stored.conversation_id),
            project_id=stored.project_id,
            causation_id=cause,
            run_id=run_id,
            reply_to=str(stored.reply_to),
            kind=stored.kind,
            content=stored.content,
            created_at=stored.created_at,
            status=core.REPLY_STATUS[stored.kind],
            usage=usage,
        )
        await self.bus.publish(
            subjects.persisted_assistant(stored.project_id, str(stored.conversation_id)),
            event,
            msg_id=event.event_id,
        )

"""The persister's inbound edge: decode → write in one transaction → publish → ack."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from nats.aio.msg import Msg

from services.persister import core
from services.persister.adapters import Placed, Store, StoredReply, StoredToolTurn, Superseded
from services.persister.conversations import ConversationStore, Purger
from shared import messages as m
from shared import subjects
from shared.batching import GroupCommit
from shared.bus import Bus
from shared.db import UNAVAILABLE
from shared.errors import BadData
from shared.metrics import ServiceMetrics

# An answer can take minutes (long model streams, retries on a fallback model).
ANSWER_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
# Calls whose usage the current write inserted: (model, cost), counted once it has committed.
_BILLED: ContextVar[list[tuple[str, float]] | None] = ContextVar("billed", default=None)


class InstrumentedStore(Store):
    """The store, observed: how long each write transaction takes, and what it committed for
    the first time (a run's reply: the end-to-end latency; a call's usage: its cost)."""

    def __init__(self, store: Store, metrics: ServiceMetrics) -> None:
        super().__init__(store.pool)
        self.commit_seconds = metrics.histogram(
            "commit_seconds", "Duration of one write transaction, by what it writes.", ("write",)
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

    @contextmanager
    def _write(self, write: str) -> Iterator[list[tuple[str, float]]]:
        started = time.perf_counter()
        billed: list[tuple[str, float]] = []
        token = _BILLED.set(billed)
        try:
            yield billed
        finally:
            _BILLED.reset(token)
            self.commit_seconds.labels(write).observe(time.perf_counter() - started)

    def _count(self, billed: list[tuple[str, float]]) -> None:
        # Reached only after the transaction committed: a rolled-back write counts nothing.
        for model, cost in billed:
            self.cost.labels(model).inc(cost)

    async def _answered(self, stored: StoredReply, message_id: str) -> None:
        if not stored.inserted:
            return  # a redelivery: the run's reply was stored (and observed) before
        asked = stored.asked_at
        if asked is None:
            try:
                asked = await self.pool.fetchval(
                    "SELECT created_at FROM messages WHERE id = $1", uuid.UUID(message_id)
                )
            except UNAVAILABLE:
                return  # the reply is stored; only this observation is lost
        if asked is not None:
            waited = (stored.created_at - asked).total_seconds()
            self.answer_seconds.labels(stored.kind).observe(max(waited, 0.0))

    def _counted(self, model: str, cost: float) -> None:
        billed = _BILLED.get()
        if billed is not None:
            billed.append((model, cost))

    async def insert_user_messages(
        self, events: list[m.UserMessageAccepted]
    ) -> list[Placed | BadData]:
        with self._write("user_messages"):
            return await super().insert_user_messages(events)

    async def upsert_run(self, v: m.RunVerdict) -> None:
        with self._write("verdict"):
            await super().upsert_run(v)

    async def upsert_runs(self, verdicts: list[m.RunVerdict]) -> list[Exception | None]:
        if len(verdicts) == 1:
            return await super().upsert_runs(verdicts)  # timed by upsert_run
        with self._write("verdict"):
            return await super().upsert_runs(verdicts)

    async def store_result(self, r: m.ExecResult) -> StoredReply:
        with self._write("result") as billed:
            try:
                stored = await super().store_result(r)
            except Superseded:
                self._count(billed)  # its usage was stored all the same
                raise
        self._count(billed)
        await self._answered(stored, r.message_id)
        return stored

    async def store_reply(self, p: m.PolicyReply) -> StoredReply:
        with self._write("reply"):
            stored = await super().store_reply(p)
        await self._answered(stored, p.message_id)
        return stored

    async def store_failed_usage(self, f: m.ExecFailed) -> None:
        with self._write("failed_usage") as billed:
            await super().store_failed_usage(f)
        self._count(billed)

    async def store_estimates(self, e: m.ExecResult | m.ExecFailed) -> int:
        if not e.estimated:
            return 0
        with self._write("estimates") as billed:
            written = await super().store_estimates(e)
        self._count(billed)
        return written

    async def store_model_usage(self, u: m.ModelUsage) -> bool:
        with self._write("model_usage") as billed:
            inserted = await super().store_model_usage(u)
        self._count(billed)
        return inserted


class Handlers:
    def __init__(self, bus: Bus, store: Store, metrics: ServiceMetrics) -> None:
        self.bus = bus
        store = InstrumentedStore(store, metrics)
        self.store = store
        batch_size = metrics.histogram(
            "batch_size",
            "User messages written per transaction (group commit).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        # Messages handled concurrently share one transaction; each still acks only after it.
        self.user_messages: GroupCommit[m.UserMessageAccepted, Placed] = GroupCommit(
            store.insert_user_messages, on_batch=batch_size.observe, name="insert user messages"
        )

        # Verdicts handled concurrently share one round trip and one commit as well.
        self.verdicts: GroupCommit[m.RunVerdict, None] = GroupCommit(
            store.upsert_runs, name="upsert runs"
        )
        self.conversations = ConversationStore(store.pool)
        self.purger = Purger(bus)
        self.late = metrics.counter(
            "deleted_conversation_events_total",
            "Events that arrived for a deleted conversation (not stored; purged again), by kind.",
            ("kind",),
        )

    async def user_message(self, e: m.UserMessageAccepted, _msg: Msg) -> str:
        placed = await self.user_messages.submit(e)
        if placed.deleted:
            # Accepted while the deletion was on its way: never stored, and gone from CHAT_IN.
            return await self._late(e, "user_message", subjects.STREAM_CHAT_IN)
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
        await self.verdicts.submit(v)
        return v.status

    async def result(self, r: m.ExecResult, _msg: Msg) -> str:
        await self.store.store_estimates(r)
        try:
            if core.is_tool_turn(r):
                return await self._tool_turn(r)
            stored = await self.store.store_result(r)
        except Superseded as exc:
            # A second model call of a round whose first outcome is stored (docs/tools.md,
            # rule 2): billed, nothing announced, the round's first outcome stands.
            self.bus.log.warning("outcome_superseded", call_id=r.call_id, reason=str(exc))
            return "superseded"
        except BadData:
            if not await self.conversations.is_deleted(r.conversation_id):
                raise
            # The run of a deleted conversation answered late: bill the call, keep no text.
            await self.store.store_failed_usage(_billed(r))
            return await self._late(r, "result", subjects.STREAM_RESULTS)
        await self._announce(stored, r.run_id, r.event_id)
        return "inserted" if stored.inserted else "duplicate"

    async def reply(self, p: m.PolicyReply, _msg: Msg) -> str:
        try:
            stored = await self.store.store_reply(p)
        except BadData:
            if not await self.conversations.is_deleted(p.conversation_id):
                raise
            return await self._late(p, "reply", subjects.STREAM_RESULTS)
        await self._announce(stored, p.run_id, p.event_id)
        return "inserted" if stored.inserted else "duplicate"

    async def conversation_changed(self, e: m.ConversationChanged, msg: Msg) -> str:
        """``conv.settings.>``: a creation or a change of title and metadata, in stream order."""
        outcome = await self.conversations.apply(e, msg.metadata.sequence.stream)
        if outcome == "deleted":
            return await self._late(e, "settings", subjects.STREAM_CONVERSATIONS)
        return outcome

    async def conversation_verdict(self, v: m.ConversationModelVerdict, _msg: Msg) -> str:
        """``policy.conversation.>``: policy's verdict on the conversation's requested model."""
        outcome = await self.conversations.verdict(v)
        if outcome == "deleted":
            return await self._late(v, "model_verdict", subjects.STREAM_CONVERSATIONS)
        return outcome

    async def conversation_deleted(self, d: m.ConversationDeleteRequested, _msg: Msg) -> str:
        """``conv.delete.>``: delete the content (one transaction), then purge the streams.

        Acked only after both; a redelivery does both again (idempotent). What arrives for the
        conversation later is refused by its tombstone and purged again (``_late``).
        """
        records = await self.conversations.delete(d)
        await self.purger.purge(d.project_id, d.conversation_id, records)
        return "deleted"

    async def _late(self, e: m.Event, kind: str, stream: str) -> str:
        """An event of a deleted conversation: nothing stored, and the stream it came from (and
        the token deltas, which end before a run's last event) purged of it again."""
        self.late.labels(kind).inc()
        await self.purger.purge(e.project_id, e.conversation_id, only=stream)
        if stream != subjects.STREAM_TOKENS:
            await self.purger.purge(e.project_id, e.conversation_id, only=subjects.STREAM_TOKENS)
        return "conversation_deleted"

    async def _tool_turn(self, r: m.ExecResult) -> str:
        turn: StoredToolTurn = await self.store.store_tool_turn(r)
        event = m.ToolTurnPersisted(
            event_id=core.tool_turn_event_id(r.run_id, r.round),
            message_id=r.message_id,
            conversation_id=r.conversation_id,
            project_id=r.project_id,
            causation_id=r.event_id,
            run_id=r.run_id,
            user_id=turn.user_id,
            round=r.round,
            call_id=turn.call_id,
            text=turn.text,
            tool_calls=turn.tool_calls,
            usage=turn.usage,
            earlier_call_ids=turn.earlier_call_ids,
        )
        await self.bus.publish(
            subjects.persisted_tool_turn(r.project_id, r.conversation_id),
            event,
            msg_id=event.event_id,
        )
        return "tool_turn" if turn.inserted else "tool_turn_duplicate"

    async def tool_result(self, r: m.ToolResult, _msg: Msg) -> str:
        """A tool call's result, stored once, then announced (policy continues the run on it)."""
        if await self.conversations.is_deleted(r.conversation_id):
            await self.purger.purge(
                r.project_id,
                r.conversation_id,
                (subjects.tool_call_record(r.run_id, r.call_id),),
                only=subjects.STREAM_TOOLS,
            )
            return await self._late(r, "tool_result", subjects.STREAM_TOOLS)
        stored, inserted = await self.store.store_tool_result(r)
        event = m.ToolResultPersisted(
            event_id=core.tool_result_event_id(r.run_id, r.call_id),
            message_id=r.message_id,
            conversation_id=r.conversation_id,
            project_id=r.project_id,
            causation_id=r.event_id,
            result=stored,
        )
        await self.bus.publish(
            subjects.persisted_tool_result(r.project_id, r.conversation_id),
            event,
            msg_id=event.event_id,
        )
        return "inserted" if inserted else "duplicate"

    async def failed_usage(self, f: m.ExecFailed, _msg: Msg) -> str:
        await self.store.store_estimates(f)
        await self.store.store_failed_usage(f)
        if await self.conversations.is_deleted(f.conversation_id):
            # The last event of a run a deletion cancelled: its token deltas end before it.
            return await self._late(f, "failed", subjects.STREAM_RESULTS)
        return f.error_class

    async def model_usage(self, u: m.ModelUsage, _msg: Msg) -> str:
        """A call billed on its own (an agent's classification, or a dead answer call policy
        settled at its deadline): its usage row (once per call id) and the project totals."""
        return "inserted" if await self.store.store_model_usage(u) else "duplicate"

    async def api_key(self, c: m.ApiKeyCommand, _msg: Msg) -> str:
        """An operator's API key command: the row written (or revoked), nothing announced."""
        return await self.store.apply_api_key(c)

    async def _announce(self, stored: StoredReply, run_id: str, cause: str) -> None:
        # The usage of every call of the run (failed attempts too): what policy settles with.
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
            usage=stored.usage,
            cost_usd=stored.cost_usd,
            calls=stored.calls,
        )
        await self.bus.publish(
            subjects.persisted_assistant(stored.project_id, str(stored.conversation_id)),
            event,
            msg_id=event.event_id,
        )


def _billed(r: m.ExecResult) -> m.ExecFailed:
    """A late answer's call as a usage row only: its numbers, no text, outcome ``cancelled``
    (the answer was discarded with its conversation)."""
    return m.ExecFailed(
        event_id=r.event_id,
        message_id=r.message_id,
        conversation_id=r.conversation_id,
        project_id=r.project_id,
        task_id=r.task_id,
        call_id=r.call_id,
        run_id=r.run_id,
        attempt=r.attempt,
        model=r.model,
        error_class="cancelled",
        error="",
        usage=r.usage,
        prices=r.prices,
    )

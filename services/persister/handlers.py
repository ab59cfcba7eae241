"""The persister's inbound edge: decode → write in one transaction → publish → ack."""

from __future__ import annotations

from nats.aio.msg import Msg

from services.persister import core
from services.persister.adapters import Placed, Store, StoredReply
from shared import messages as m
from shared import subjects
from shared.batching import GroupCommit
from shared.bus import Bus
from shared.metrics import ServiceMetrics


class Handlers:
    def __init__(self, bus: Bus, store: Store, metrics: ServiceMetrics) -> None:
        self.bus = bus
        self.store = store
        batch_size = metrics.histogram(
            "batch_size",
            "User messages written per transaction (group commit).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        # Messages handled concurrently share one transaction; each still acks only after it.
        self.user_messages: GroupCommit[m.UserMessageAccepted, Placed] = GroupCommit(
            store.insert_user_messages, on_batch=batch_size.observe
        )

        # Verdicts handled concurrently share one round trip and one commit as well.
        self.verdicts: GroupCommit[m.RunVerdict, None] = GroupCommit(store.upsert_runs)

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
        await self.verdicts.submit(v)
        return v.status

    async def result(self, r: m.ExecResult, _msg: Msg) -> str:
        stored = await self.store.store_result(r)
        await self._announce(stored, r.run_id, r.event_id, r.usage)
        return "inserted" if stored.inserted else "duplicate"

    async def reply(self, p: m.PolicyReply, _msg: Msg) -> str:
        stored = await self.store.store_reply(p)
        await self._announce(stored, p.run_id, p.event_id, m.Usage())
        return "inserted" if stored.inserted else "duplicate"

    async def failed_usage(self, f: m.ExecFailed, _msg: Msg) -> str:
        await self.store.store_failed_usage(f)
        return f.error_class

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

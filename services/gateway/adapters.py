"""What the gateway talks to: JetStream for accepts, Postgres read-only, the push fan-out hub."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import defaultdict
from typing import Any

import msgspec
import nats.js.errors
import structlog
from nats.aio.msg import Msg

from services.gateway import core
from shared import messages as m
from shared import subjects
from shared.batching import GroupCommit
from shared.bus import Bus

_accepted = msgspec.json.Decoder(m.UserMessageAccepted)
_delta = msgspec.json.Decoder(m.TokenDelta)


class Publisher:
    """Publishes accepted messages; a duplicate id comes back as the original message."""

    def __init__(self, bus: Bus, timeout_s: float) -> None:
        self.bus = bus
        self.timeout_s = timeout_s

    async def accept(self, e: m.UserMessageAccepted) -> tuple[m.UserMessageAccepted, bool]:
        ack = await self.bus.publish(
            subjects.chat_in(e.project_id, e.conversation_id),
            e,
            msg_id=e.message_id,
            timeout=self.timeout_s,
        )
        if not ack.duplicate:
            return e, False
        original = await self.bus.js.get_msg(subjects.STREAM_CHAT_IN, ack.seq)
        if original.data is None:
            raise LookupError(f"original of duplicate {e.message_id} is gone from the stream")
        return _accepted.decode(original.data), True


class ReadModel:
    """Queries over what the persister wrote; this pool's role may only read."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        # Keyed submits look their id up on the hot path: concurrent ones share one query.
        self._lookups: GroupCommit[str, m.UserMessageAccepted | None] = GroupCommit(
            self._messages_by_id
        )

    async def owner(self, conversation_id: str) -> tuple[str, str] | None:
        async with self.pool.acquire() as con:
            row = await con.fetchrow(
                "SELECT project_id, user_id FROM conversations WHERE id = $1",
                uuid.UUID(conversation_id),
            )
        return None if row is None else (row["project_id"], row["user_id"])

    async def message(self, message_id: str) -> m.UserMessageAccepted | None:
        """The stored user message with this id, if any."""
        return await self._lookups.submit(message_id)

    async def _messages_by_id(self, ids: list[str]) -> list[m.UserMessageAccepted | None]:
        async with self.pool.acquire() as con:
            rows = await con.fetch(
                "SELECT id, conversation_id, project_id, user_id, content, content_hash, "
                "idempotency_key, created_at FROM messages "
                "WHERE id = ANY($1::uuid[]) AND role = 'user'",
                [uuid.UUID(i) for i in ids],
            )
        found = {str(r["id"]): r for r in rows}
        return [_user_message(found[i]) if i in found else None for i in ids]

    async def messages(self, conversation_id: str) -> list[dict[str, Any]]:
        async with self.pool.acquire() as con:
            rows = await con.fetch(
                "SELECT id, role, kind, content, created_at, run_id FROM messages "
                "WHERE conversation_id = $1 ORDER BY created_at, seq",
                uuid.UUID(conversation_id),
            )
        return [
            {
                "id": str(r["id"]),
                "role": r["role"],
                "kind": r["kind"],
                "content": r["content"],
                "created_at": r["created_at"],
                "run_id": r["run_id"],
            }
            for r in rows
        ]

    async def runs(self, conversation_id: str) -> list[dict[str, Any]]:
        async with self.pool.acquire() as con:
            rows = await con.fetch(
                "SELECT r.run_id, r.message_id, r.status, r.verdict, r.reason, r.model, "
                "r.executor, r.attempts, r.estimated_tokens, r.created_at, r.updated_at, "
                "COALESCE(SUM(u.input_tokens), 0) AS input_tokens, "
                "COALESCE(SUM(u.output_tokens), 0) AS output_tokens, "
                "COALESCE(SUM(u.cache_read_tokens), 0) AS cache_read_tokens, "
                "COALESCE(SUM(u.cache_write_tokens), 0) AS cache_write_tokens, "
                "COALESCE(SUM(u.cost_usd), 0) AS cost_usd, COUNT(u.call_id) AS calls "
                "FROM runs r LEFT JOIN usage u ON u.run_id = r.run_id "
                "WHERE r.conversation_id = $1 GROUP BY r.run_id ORDER BY r.created_at",
                uuid.UUID(conversation_id),
            )
        return [
            {
                "run_id": r["run_id"],
                "message_id": str(r["message_id"]),
                "status": r["status"],
                "verdict": r["verdict"],
                "reason": r["reason"],
                "model": r["model"],
                "executor": r["executor"],
                "attempts": r["attempts"],
                "estimated_tokens": r["estimated_tokens"],
                "created_at": r["created_at"],
                "updated_at": r["updated_at"],
                "usage": {
                    "input_tokens": int(r["input_tokens"]),
                    "output_tokens": int(r["output_tokens"]),
                    "cache_read_tokens": int(r["cache_read_tokens"]),
                    "cache_write_tokens": int(r["cache_write_tokens"]),
                    "cost_usd": float(r["cost_usd"]),
                    "calls": int(r["calls"]),
                },
            }
            for r in rows
        ]

    async def usage(self, project_id: str) -> dict[str, Any]:
        async with self.pool.acquire() as con:
            r = await con.fetchrow("SELECT * FROM project_usage WHERE project_id = $1", project_id)
        fields = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")
        out: dict[str, Any] = {"project_id": project_id}
        for f in fields:
            out[f] = int(r[f]) if r else 0
        out["cost_usd"] = float(r["cost_usd"]) if r else 0.0
        out["runs"] = int(r["runs"]) if r else 0
        out["updated_at"] = r["updated_at"] if r else None
        return out

    async def ping(self) -> None:
        async with self.pool.acquire() as con:
            await con.fetchval("SELECT 1")


def _user_message(r: Any) -> m.UserMessageAccepted:
    return m.UserMessageAccepted(
        event_id=str(r["id"]),
        message_id=str(r["id"]),
        conversation_id=str(r["conversation_id"]),
        project_id=r["project_id"],
        user_id=r["user_id"],
        content=r["content"],
        content_hash=r["content_hash"],
        created_at=r["created_at"],
        idempotency_key=r["idempotency_key"],
    )


class TokenLog:
    """Reads a conversation's token deltas back from CHAT_STREAM for a resuming client.

    Message by message with "get the next message on this subject" requests: the gateway needs
    no consumer, so its NATS user keeps no right to create one (a consumer's deliver subject
    could be used to publish where the user may not, I5).
    """

    def __init__(self, bus: Bus, timeout_s: float) -> None:
        self.bus = bus
        self.timeout_s = timeout_s

    async def deltas(self, project: str, conversation_id: str) -> list[m.TokenDelta]:
        subject = subjects.token_stream(project, conversation_id)
        try:
            last = await self.bus.js.get_last_msg(subjects.STREAM_TOKENS, subject)
        except nats.js.errors.NotFoundError:
            return []
        if last.seq is None:
            return []
        out: list[m.TokenDelta] = []
        cursor = 1
        while cursor <= last.seq:
            try:
                msg = await self.bus.js.get_msg(
                    subjects.STREAM_TOKENS, seq=cursor, subject=subject, next=True
                )
            except nats.js.errors.NotFoundError:
                break
            if msg.seq is None or msg.data is None:
                break
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                out.append(_delta.decode(msg.data))
            cursor = msg.seq + 1
        return out


class PushEvent(msgspec.Struct, frozen=True):
    event: str
    id: str
    data: dict[str, Any]


class Hub:
    """One NATS subscription per subject family per process, fanned out to clients in memory."""

    def __init__(self, bus: Bus, queue_size: int, log: structlog.stdlib.BoundLogger) -> None:
        self.bus = bus
        self.queue_size = queue_size
        self.log = log
        self.clients: dict[str, set[asyncio.Queue[PushEvent | None]]] = defaultdict(set)
        self.subs: list[Any] = []

    async def start(self) -> None:
        for subject in subjects.PUSH_SUBJECTS:
            self.subs.append(await self.bus.nc.subscribe(subject, cb=self._on_msg))

    async def stop(self) -> None:
        """End every client stream (they reconnect elsewhere with Last-Event-ID); idempotent."""
        subs, self.subs = self.subs, []
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        for queues in list(self.clients.values()):
            for q in list(queues):
                _close(q)

    def join(self, conversation_id: str) -> asyncio.Queue[PushEvent | None]:
        q: asyncio.Queue[PushEvent | None] = asyncio.Queue(self.queue_size)
        self.clients[conversation_id].add(q)
        return q

    def leave(self, conversation_id: str, q: asyncio.Queue[PushEvent | None]) -> None:
        queues = self.clients.get(conversation_id)
        if queues is not None:
            queues.discard(q)
            if not queues:
                del self.clients[conversation_id]

    async def _on_msg(self, msg: Msg) -> None:
        conversation_id = msg.subject.rsplit(".", 1)[-1]
        queues = self.clients.get(conversation_id)
        if not queues:
            return
        try:
            mapped = core.push_event(msg.subject, msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.log.warning("push_decode_failed", subject=msg.subject, error=str(exc))
            return
        if mapped is None:
            return
        event = PushEvent(*mapped)
        for q in list(queues):
            try:
                q.put_nowait(event)
            except asyncio.QueueFull:
                # A client that cannot keep up is cut off; it resumes with Last-Event-ID.
                self.leave(conversation_id, q)
                _close(q)


def _close(q: asyncio.Queue[PushEvent | None]) -> None:
    """Tell a client stream to end, dropping what it has not read yet."""
    while not q.empty():
        q.get_nowait()
    q.put_nowait(None)

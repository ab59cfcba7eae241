"""What the gateway talks to: JetStream for accepts, Postgres read-only, the push fan-out hub."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
import weakref
from collections import defaultdict
from typing import Any

import msgspec
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge

from services.gateway import core
from shared import messages as m
from shared import ratelimit, subjects
from shared.batching import GroupCommit
from shared.bus import Bus
from shared.metrics import ServiceMetrics

_accepted = msgspec.json.Decoder(m.UserMessageAccepted)
_delta = msgspec.json.Decoder(m.TokenDelta)


class Publisher:
    """Publishes accepted messages; a duplicate id comes back as the original message."""

    def __init__(self, bus: Bus, timeout_s: float) -> None:
        self.bus = bus
        self.timeout_s = timeout_s

    async def accept(
        self, e: m.UserMessageAccepted, traceparent: str | None = None
    ) -> tuple[m.UserMessageAccepted, bool]:
        ack = await self.bus.publish(
            subjects.chat_in(e.project_id, e.conversation_id),
            e,
            msg_id=e.message_id,
            headers=None if traceparent is None else {"traceparent": traceparent},
            timeout=self.timeout_s,
        )
        if not ack.duplicate:
            return e, False
        original = await self.bus.js.get_msg(subjects.STREAM_CHAT_IN, ack.seq)
        if original.data is None:
            raise LookupError(f"original of duplicate {e.message_id} is gone from the stream")
        return _accepted.decode(original.data), True

    async def cancel(self, e: m.CancelRequested) -> bool:
        """Ask policy to cancel a run; True when this run's cancel was already asked for."""
        ack = await self.bus.publish(
            subjects.chat_cancel(e.project_id, e.conversation_id),
            e,
            msg_id=e.event_id,
            timeout=self.timeout_s,
        )
        return bool(ack.duplicate)


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
                ids,  # asyncpg encodes uuid strings itself, without UUID objects
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

    async def run_status(self, conversation_id: str, run_id: str) -> str | None:
        """The stored status of a run of this conversation (None: no record yet)."""
        async with self.pool.acquire() as con:
            status: str | None = await con.fetchval(
                "SELECT status FROM runs WHERE run_id = $1 AND conversation_id = $2",
                run_id,
                uuid.UUID(conversation_id),
            )
        return status

    async def runs(self, conversation_id: str) -> list[dict[str, Any]]:
        async with self.pool.acquire() as con:
            rows = await con.fetch(
                "SELECT r.run_id, r.message_id, r.status, r.verdict, r.reason, r.model, "
                "r.executor, r.attempts, r.estimated_tokens, r.created_at, r.updated_at, "
                "r.limits::text AS limits, r.reserved_tokens, r.reserved_cost_usd, "
                # The run's answer calls; the agent's classification of its message apart.
                "COALESCE(SUM(u.input_tokens) FILTER (WHERE NOT k), 0) AS input_tokens, "
                "COALESCE(SUM(u.output_tokens) FILTER (WHERE NOT k), 0) AS output_tokens, "
                "COALESCE(SUM(u.cache_read_tokens) FILTER (WHERE NOT k), 0) AS cache_read_tokens, "
                "COALESCE(SUM(u.cache_write_tokens) FILTER (WHERE NOT k), 0) "
                "AS cache_write_tokens, "
                "COALESCE(SUM(u.cost_usd) FILTER (WHERE NOT k), 0) AS cost_usd, "
                "COUNT(u.call_id) FILTER (WHERE NOT k) AS calls, "
                "COALESCE(SUM(u.input_tokens) FILTER (WHERE k), 0) AS c_input_tokens, "
                "COALESCE(SUM(u.output_tokens) FILTER (WHERE k), 0) AS c_output_tokens, "
                "COALESCE(SUM(u.cost_usd) FILTER (WHERE k), 0) AS c_cost_usd, "
                "COUNT(u.call_id) FILTER (WHERE k) AS c_calls "
                "FROM runs r LEFT JOIN (SELECT *, purpose = 'classification' AS k FROM usage) u "
                "ON u.run_id = r.run_id "
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
                # The verdict record: what was reserved against which limits, and what was used.
                "reserved_tokens": int(r["reserved_tokens"]),
                "reserved_cost_usd": float(r["reserved_cost_usd"]),
                "actual_tokens": int(
                    r["input_tokens"]
                    + r["output_tokens"]
                    + r["cache_read_tokens"]
                    + r["cache_write_tokens"]
                ),
                "limits": None if r["limits"] is None else msgspec.json.decode(r["limits"]),
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
                # What deciding the run cost: the agent's classification call(s).
                "classification": {
                    "input_tokens": int(r["c_input_tokens"]),
                    "output_tokens": int(r["c_output_tokens"]),
                    "cost_usd": float(r["c_cost_usd"]),
                    "calls": int(r["c_calls"]),
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
    """One NATS subscription per subject family per process, fanned out to clients in memory.

    Each client (an SSE or WebSocket stream) gets a bounded queue of shared event objects, so a
    client costs at most ``queue_size`` references however much is published; one that falls
    that far behind is cut off (it resumes with its last event id).
    """

    def __init__(
        self,
        bus: Bus,
        queue_size: int,
        log: structlog.stdlib.BoundLogger,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.bus = bus
        self.queue_size = queue_size
        self.log = log
        self.clients: dict[str, set[asyncio.Queue[PushEvent | None]]] = defaultdict(set)
        self.subs: list[Any] = []
        self.stopping = False
        # Queues cut off because their client fell behind (not because the hub stopped).
        self.slow: weakref.WeakSet[asyncio.Queue[PushEvent | None]] = weakref.WeakSet()
        self.drops: Counter | None = None
        self.subscriptions: Gauge | None = None
        if metrics is not None:
            self.drops = metrics.counter(
                "slow_client_drops_total",
                "Push streams (SSE or WebSocket) cut off because the client fell too far behind.",
            )
            self.subscriptions = metrics.gauge(
                "push_subscriptions", "Core NATS subscriptions the push hub holds (one per family)."
            )

    async def start(self) -> None:
        self.stopping = False
        for subject in subjects.PUSH_SUBJECTS:
            self.subs.append(await self.bus.nc.subscribe(subject, cb=self._on_msg))
        if self.subscriptions is not None:
            self.subscriptions.set(len(self.subs))

    async def stop(self) -> None:
        """End every client stream (they reconnect elsewhere with Last-Event-ID); idempotent."""
        self.stopping = True
        subs, self.subs = self.subs, []
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self.subscriptions is not None:
            self.subscriptions.set(0)
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

    def was_slow(self, q: asyncio.Queue[PushEvent | None]) -> bool:
        """Whether this client's stream ended because it fell behind."""
        return q in self.slow

    def drop(self, conversation_id: str, q: asyncio.Queue[PushEvent | None]) -> None:
        """Cut off a client that cannot keep up; it resumes with its last event id."""
        if q in self.slow:
            return
        self.slow.add(q)
        self.leave(conversation_id, q)
        _close(q)
        if self.drops is not None:
            self.drops.inc()

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
                self.drop(conversation_id, q)


def _close(q: asyncio.Queue[PushEvent | None]) -> None:
    """Tell a client stream to end, dropping what it has not read yet."""
    while not q.empty():
        q.get_nowait()
    q.put_nowait(None)


class RateGate:
    """An early ``429`` from the rate windows policy keeps (read only; policy stays the judge).

    A look at the bucket is cached per user for ``cache_s`` and a block until its window ends,
    so the accept path costs at most two KV reads per user per ``cache_s``. Any trouble reading
    lets the message through: policy counts it either way.
    """

    MAX_CACHED = 100_000

    def __init__(self, kv: Any, cache_s: float = 1.0) -> None:
        self.kv = kv
        self.cache_s = cache_s
        self.seen: dict[tuple[str, str], tuple[float, float]] = {}  # → (checked at, blocked until)

    async def retry_after(self, project: str, user: str) -> int | None:
        """Seconds until the user may send again, or None when not (known to be) over a limit."""
        now = time.time()
        hit = self.seen.get((project, user))
        if hit is not None:
            checked, until = hit
            if until > now:
                return max(1, math.ceil(until - now))
            if now - checked < self.cache_s:
                return None
        until = 0.0
        keys = [ratelimit.key(window, now, project, user) for window in ratelimit.WINDOWS]
        # Both windows in one round trip.
        entries = await asyncio.gather(*(self.kv.get(k) for k in keys), return_exceptions=True)
        for entry in entries:
            if isinstance(entry, nats.js.errors.KeyNotFoundError):
                continue
            try:
                if isinstance(entry, BaseException):
                    raise entry
                w = ratelimit.decoder.decode(entry.value or b"")
            except Exception:  # fail open: policy is authoritative
                return None
            if w.full:
                until = max(until, float(w.start + w.length))
        if len(self.seen) >= self.MAX_CACHED:
            self.seen.clear()
        self.seen[(project, user)] = (now, until)
        return max(1, math.ceil(until - now)) if until > now else None

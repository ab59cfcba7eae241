"""What the gateway talks to: JetStream for accepts, Postgres read-only, the push fan-out hub."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
import uuid
import weakref
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge

from services.gateway import core
from services.gateway.lifecycle import ConversationLog
from shared import deletion, ratelimit, subjects
from shared import messages as m
from shared.batching import GroupCommit
from shared.bus import Bus
from shared.db import UNAVAILABLE
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

    async def change(self, e: m.ConversationChanged, create: bool) -> bool:
        """Publish a creation (create-only on its subject) or a change; True: a duplicate (the
        creation was there already)."""
        try:
            ack = await self.bus.publish(
                subjects.conversation_settings(e.project_id, e.conversation_id),
                e,
                msg_id=e.event_id,
                headers={deletion.EXPECTED_LAST_SUBJECT_SEQ: "0"} if create else None,
                timeout=self.timeout_s,
            )
        except nats.js.errors.APIError as exc:
            if create and exc.err_code == deletion.WRONG_LAST_SEQUENCE:
                return True
            raise
        return bool(ack.duplicate)

    async def delete(self, d: m.ConversationDeleteRequested) -> bool:
        """Publish the tombstone; True: the conversation was deleted before (a duplicate)."""
        return not await deletion.request_delete(self.bus, d, timeout=self.timeout_s)

    async def cancel(self, e: m.CancelRequested) -> bool:
        """Ask policy to cancel a run; True when this run's cancel was already asked for."""
        ack = await self.bus.publish(
            subjects.chat_cancel(e.project_id, e.conversation_id),
            e,
            msg_id=e.event_id,
            timeout=self.timeout_s,
        )
        return bool(ack.duplicate)


_PAGE_COLUMNS = "id, role, kind, content, created_at, run_id, seq"
_CONVERSATION = (
    "id, title, created_at, last_activity_at, message_count, metadata::text AS metadata, "
    "model, system_prompt, model_allowed, model_reason, settings_seq"
)
# Pages are keyset range scans of an index (messages_conversation, conversations_recent), one
# statement per shape so that a prepared statement's generic plan keeps the index condition.
MESSAGES_NEWEST = (
    f"SELECT {_PAGE_COLUMNS} FROM messages WHERE conversation_id = $1 "
    "ORDER BY created_at DESC, seq DESC LIMIT $2"
)
MESSAGES_BEFORE = (
    f"SELECT {_PAGE_COLUMNS} FROM messages WHERE conversation_id = $1 "
    "AND (created_at, seq) < ($2, $3) ORDER BY created_at DESC, seq DESC LIMIT $4"
)
MESSAGES_AFTER = (
    f"SELECT {_PAGE_COLUMNS} FROM messages WHERE conversation_id = $1 "
    "AND (created_at, seq) > ($2, $3) ORDER BY created_at, seq LIMIT $4"
)
CONVERSATIONS_NEWEST = (
    f"SELECT {_CONVERSATION} FROM conversations WHERE project_id = $1 AND user_id = $2 "
    "AND deleted_at IS NULL ORDER BY last_activity_at DESC, id DESC LIMIT $3"
)
CONVERSATIONS_BEFORE = (
    f"SELECT {_CONVERSATION} FROM conversations WHERE project_id = $1 AND user_id = $2 "
    "AND deleted_at IS NULL AND (last_activity_at, id) < ($3, $4::uuid) "
    "ORDER BY last_activity_at DESC, id DESC LIMIT $5"
)


class ReadModel:
    """Queries over what the persister wrote; this pool's role may only read."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        # Keyed submits look their id up on the hot path: concurrent ones share one query.
        self._lookups: GroupCommit[str, m.UserMessageAccepted | None] = GroupCommit(
            self._messages_by_id
        )

    async def owner(self, conversation_id: str) -> tuple[str, str, bool] | None:
        """The conversation's project and user, and whether it was deleted (its tombstone)."""
        async with self.pool.acquire() as con:
            row = await con.fetchrow(
                "SELECT project_id, user_id, deleted_at IS NOT NULL AS deleted "
                "FROM conversations WHERE id = $1",
                uuid.UUID(conversation_id),
            )
        return None if row is None else (row["project_id"], row["user_id"], row["deleted"])

    async def project_of(self, key_hash: str) -> str | None:
        """The project of the active API key with this hash (auth.ApiKeys), if any."""
        async with self.pool.acquire() as con:
            project: str | None = await con.fetchval(
                "SELECT project_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
                key_hash,
            )
        return project

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
        return [_stored_message(r) for r in rows]

    async def message_page(
        self, conversation_id: str, limit: int, before: Any = None, after: Any = None
    ) -> tuple[list[dict[str, Any]], bool]:
        """One page of messages in conversation order and whether more lie beyond it.

        The newest ``limit``, or those just before ``before`` / just after ``after`` (a
        (created_at, seq) position): one range scan of ``messages_conversation``.
        """
        cid = uuid.UUID(conversation_id)
        async with self.pool.acquire() as con:
            if after is not None:
                rows = await con.fetch(
                    MESSAGES_AFTER,
                    cid,
                    after[0],
                    after[1],
                    limit + 1,
                )
            elif before is not None:
                rows = await con.fetch(
                    MESSAGES_BEFORE,
                    cid,
                    before[0],
                    before[1],
                    limit + 1,
                )
            else:
                rows = await con.fetch(
                    MESSAGES_NEWEST,
                    cid,
                    limit + 1,
                )
        more = len(rows) > limit
        rows = rows[:limit]
        if after is None:
            rows = rows[::-1]
        return [{**_stored_message(r), "seq": r["seq"]} for r in rows], more

    async def conversation(self, conversation_id: str) -> dict[str, Any] | None:
        async with self.pool.acquire() as con:
            row = await con.fetchrow(
                f"SELECT {_CONVERSATION} FROM conversations WHERE id = $1 AND deleted_at IS NULL",
                uuid.UUID(conversation_id),
            )
        return None if row is None else _conversation(row)

    async def conversations(
        self, project: str, user: str, limit: int, before: Any = None
    ) -> tuple[list[dict[str, Any]], bool]:
        """One user's conversations, most recent activity first, from just before ``before``
        (a (last_activity_at, id) position): one range scan of ``conversations_recent``."""
        async with self.pool.acquire() as con:
            if before is None:
                rows = await con.fetch(
                    CONVERSATIONS_NEWEST,
                    project,
                    user,
                    limit + 1,
                )
            else:
                rows = await con.fetch(
                    CONVERSATIONS_BEFORE,
                    project,
                    user,
                    before[0],
                    before[1],
                    limit + 1,
                )
        return [_conversation(r) for r in rows[:limit]], len(rows) > limit

    async def last_user_message_at(self, conversation_id: str) -> datetime | None:
        """When the conversation's last stored user message was accepted (None: none stored)."""
        async with self.pool.acquire() as con:
            at: datetime | None = await con.fetchval(
                "SELECT created_at FROM messages WHERE conversation_id = $1 AND role = 'user' "
                "ORDER BY position DESC LIMIT 1",
                uuid.UUID(conversation_id),
            )
        return at

    async def stored_ids(self, ids: list[str]) -> set[str]:
        """Which of these message ids the persister has stored."""
        if not ids:
            return set()
        async with self.pool.acquire() as con:
            rows = await con.fetch("SELECT id FROM messages WHERE id = ANY($1::uuid[])", ids)
        return {str(r["id"]) for r in rows}

    async def run_status(self, conversation_id: str, run_id: str) -> str | None:
        """The stored status of a run of this conversation (None: no record yet)."""
        async with self.pool.acquire() as con:
            status: str | None = await con.fetchval(
                "SELECT status FROM runs WHERE run_id = $1 AND conversation_id = $2",
                run_id,
                uuid.UUID(conversation_id),
            )
        return status

    async def run(self, conversation_id: str, run_id: str) -> tuple[str, datetime] | None:
        """A run of this conversation: its stored status and when it was recorded."""
        async with self.pool.acquire() as con:
            row = await con.fetchrow(
                "SELECT status, created_at FROM runs WHERE run_id = $1 AND conversation_id = $2",
                run_id,
                uuid.UUID(conversation_id),
            )
        return None if row is None else (row["status"], row["created_at"])

    async def tool_results(self, conversation_id: str) -> list[tuple[m.ToolResult, str, datetime]]:
        """The stored tool results of a conversation's runs, oldest first: (result, the run's
        message id, when it was stored)."""
        async with self.pool.acquire() as con:
            rows = await con.fetch(
                "SELECT t.tool_use_id, t.run_id, t.round, t.name, t.outcome, t.is_error, "
                "t.content, t.input_digest, t.created_at, r.message_id FROM tool_results t "
                "JOIN runs r ON r.run_id = t.run_id WHERE r.conversation_id = $1 "
                "ORDER BY t.created_at, t.round, t.tool_use_id",
                uuid.UUID(conversation_id),
            )
        return [
            (
                m.ToolResult(
                    event_id=f"toolresult:{m.call_key(r['run_id'], r['tool_use_id'])}",
                    message_id=str(r["message_id"]),
                    conversation_id=conversation_id,
                    project_id="",
                    run_id=r["run_id"],
                    round=r["round"],
                    call_id=r["tool_use_id"],
                    name=r["name"],
                    outcome=r["outcome"],
                    is_error=r["is_error"],
                    content=r["content"],
                    input_digest=r["input_digest"],
                ),
                str(r["message_id"]),
                r["created_at"],
            )
            for r in rows
        ]

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


def _conversation(r: Any) -> dict[str, Any]:
    return {
        "id": str(r["id"]),
        "title": r["title"],
        "created_at": r["created_at"],
        "last_activity_at": r["last_activity_at"],
        "message_count": int(r["message_count"]),
        "metadata": msgspec.json.decode(r["metadata"]),
        "settings": {
            "model": r["model"],
            "system_prompt": r["system_prompt"],
            "model_allowed": r["model_allowed"],
            "model_reason": r["model_reason"],
        },
        "pending": False,
        "settings_seq": int(r["settings_seq"]),
    }


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


class Inbox:
    """Accepted user messages still in CHAT_IN, read back by subject.

    Like TokenLog, with "get a message on this subject" requests (the gateway's NATS user needs
    only ``STREAM.MSG.GET.CHAT_IN``, which duplicate answers already use). CHAT_IN keeps
    messages by age (limits retention), so what the persister has consumed is still here.
    """

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def first(self, conversation_id: str, project: str = "*") -> m.UserMessageAccepted | None:
        """The earliest accepted message of a conversation still in the stream, if any.

        ``project`` "*" looks across projects: a conversation id is one conversation whichever
        project posted into it, and the earliest message names its owner (as in the persister).
        Raises what the bus raises when it cannot tell.
        """
        if not self.bus.nc.is_connected:
            raise nats.errors.ConnectionReconnectingError
        subject = subjects.chat_in(project, conversation_id)
        try:
            msg = await self.bus.js.get_msg(subjects.STREAM_CHAT_IN, 0, subject, next=True)
        except nats.js.errors.NotFoundError:
            return None
        if msg.data is None:
            return None
        return _accepted.decode(msg.data)

    async def pending(
        self,
        project: str,
        conversation_id: str,
        since: datetime | None,
        limit: int,
        slack_s: float = 30.0,
    ) -> list[m.UserMessageAccepted]:
        """Accepted messages of a conversation in stream order, from ``since`` - ``slack_s`` on.

        At most ``limit`` of them, by "next message on this subject" requests (one per message,
        the first one positioned by time): the caller drops those the database already holds.
        ``since`` None reads from the conversation's first message. The slack covers a gateway
        clock ahead of the server's (``created_at`` is stamped before the publish). Raises what
        the bus raises when it cannot read.
        """
        if not self.bus.nc.is_connected:
            raise nats.errors.ConnectionReconnectingError
        subject = subjects.chat_in(project, conversation_id)
        api = f"$JS.API.STREAM.MSG.GET.{subjects.STREAM_CHAT_IN}"
        request: dict[str, Any] = {"next_by_subj": subject}
        if since is not None:
            request["start_time"] = (since - timedelta(seconds=slack_s)).isoformat()
        else:
            request["seq"] = 1
        out: list[m.UserMessageAccepted] = []
        while len(out) < limit:
            reply = await self.bus.nc.request(api, msgspec.json.encode(request), timeout=2.0)
            got = _msg_get.decode(reply.data)
            if got.message is None:
                if got.error is not None and got.error.get("code") == 404:
                    break
                raise nats.errors.Error(f"CHAT_IN read failed: {got.error}")
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                out.append(_accepted.decode(base64.b64decode(got.message.data)))
            request = {"next_by_subj": subject, "seq": got.message.seq + 1}
        return out


_requested = msgspec.json.Decoder(m.ToolApprovalRequested)
_decided = msgspec.json.Decoder(m.ToolApprovalDecided)
_tool_result = msgspec.json.Decoder(m.ToolResult)


class ToolView(msgspec.Struct):
    """A conversation's tool messages in the TOOLS stream, in stream order, with store times."""

    requests: list[tuple[m.ToolApprovalRequested, datetime]]
    decisions: list[m.ToolApprovalDecided]
    results: list[m.ToolResult]
    last_approval_seq: int  # the stream sequence of its last decision (0: none)


class StreamReader:
    """One stream's messages read back by subject: "next message on this subject" gets only
    (``STREAM.MSG.GET.<stream>``), no consumer."""

    def __init__(self, bus: Bus, stream: str, limit: int = 500, timeout_s: float = 2.0) -> None:
        self.bus = bus
        self.stream = stream
        self.limit = limit
        self.timeout_s = timeout_s

    async def scan(self, subject: str, start: datetime) -> list[_StoredMsg]:
        """The messages on ``subject`` stored from ``start`` on, in stream order (at most
        ``limit``). Raises what the bus raises."""
        if not self.bus.nc.is_connected:
            raise nats.errors.ConnectionReconnectingError
        request: dict[str, Any] = {"next_by_subj": subject, "start_time": start.isoformat()}
        out: list[_StoredMsg] = []
        while len(out) < self.limit:
            got = await self.get(request)
            if got is None:
                break
            out.append(got)
            request = {"next_by_subj": subject, "seq": got.seq + 1}
        return out

    async def get(self, request: dict[str, Any]) -> _StoredMsg | None:
        api = f"$JS.API.STREAM.MSG.GET.{self.stream}"
        reply = await self.bus.nc.request(api, msgspec.json.encode(request), timeout=self.timeout_s)
        got = _msg_get.decode(reply.data)
        if got.message is None:
            if got.error is not None and got.error.get("code") == 404:
                return None
            raise nats.errors.Error(f"{self.stream} read failed: {got.error}")
        return got.message


class ToolLog:
    """A conversation's tool calls read back from the TOOLS stream by subject, as ``Inbox``
    reads CHAT_IN: policy's approval requests, the gateway's own decisions and the results.
    """

    def __init__(self, bus: Bus, limit: int = 500, timeout_s: float = 2.0) -> None:
        self.bus = bus
        self.reader = StreamReader(bus, subjects.STREAM_TOOLS, limit, timeout_s)

    async def view(
        self, project: str, conversation_id: str, since: datetime, slack_s: float = 30.0
    ) -> ToolView:
        """What the stream holds for the conversation from ``since`` - ``slack_s`` on (a run's
        tool messages all come after the run was recorded). Raises what the bus raises."""
        if not self.bus.nc.is_connected:
            raise nats.errors.ConnectionReconnectingError
        start = since - timedelta(seconds=slack_s)
        requests, decisions, results = await asyncio.gather(
            self.reader.scan(subjects.tool_requested(project, conversation_id), start),
            self.reader.scan(subjects.tool_approval(project, conversation_id), start),
            self.reader.scan(subjects.tool_result(project, conversation_id), start),
        )
        return ToolView(
            requests=[(x, at) for x, at in _decoded(requests, _requested)],
            decisions=[x for x, _ in _decoded(decisions, _decided)],
            results=[x for x, _ in _decoded(results, _tool_result)],
            last_approval_seq=await self.last_seq(subjects.tool_approval(project, conversation_id)),
        )

    async def last_seq(self, subject: str) -> int:
        """The stream sequence of the last message on ``subject`` (0: there is none)."""
        got = await self.reader.get({"last_by_subj": subject})
        return 0 if got is None else got.seq

    async def decision_at(self, seq: int) -> m.ToolApprovalDecided | None:
        got = await self.reader.get({"seq": seq})
        if got is None:
            return None
        return _decided.decode(base64.b64decode(got.data))


_verdict = msgspec.json.Decoder(m.RunVerdict)


class VerdictLog:
    """Policy's verdicts on a conversation's runs, read back from the POLICY stream: the
    statuses live clients were pushed, which the persister stores later (batched). A replay
    folds them onto the stored runs (``core.with_verdicts``), so it never shows a run as
    further behind than what its live clients already got."""

    def __init__(self, bus: Bus, limit: int = 500, timeout_s: float = 2.0) -> None:
        self.reader = StreamReader(bus, subjects.STREAM_POLICY, limit, timeout_s)

    async def since(
        self, project: str, conversation_id: str, since: datetime, slack_s: float = 30.0
    ) -> list[m.RunVerdict] | None:
        """The conversation's verdicts stored from ``since`` - ``slack_s`` on (a run's verdicts
        all come after its message was accepted), in stream order; None if there are more than
        the reader's limit (the read stops at the oldest ones, and the newest are the ones a
        replay needs: it then shows the runs as stored). Raises what the bus raises; a
        message that does not decode is skipped."""
        start = since - timedelta(seconds=slack_s)
        got = await self.reader.scan(subjects.policy_verdict(project, conversation_id), start)
        if len(got) >= self.reader.limit:
            return None
        return [v for v, _ in _decoded(got, _verdict)]


def _decoded(
    msgs: list[_StoredMsg], decoder: msgspec.json.Decoder[Any]
) -> list[tuple[Any, datetime]]:
    """The messages that decode (anything else is skipped), with their store times."""
    out: list[tuple[Any, datetime]] = []
    for msg in msgs:
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError, ValueError):
            out.append(
                (
                    decoder.decode(base64.b64decode(msg.data)),
                    msg.time or datetime.min.replace(tzinfo=UTC),
                )
            )
    return out


class _StoredMsg(msgspec.Struct):
    seq: int
    data: str = ""
    time: datetime | None = None


class _MsgGet(msgspec.Struct):
    message: _StoredMsg | None = None
    error: dict[str, Any] | None = None


_msg_get = msgspec.json.Decoder(_MsgGet)


class Owners:
    """Who owns a conversation: the database's row, else its earliest message in CHAT_IN.

    The stream covers what was accepted and is not stored yet (and, while the database cannot
    be read, what it still holds). An owner the database named never changes, so it is kept
    in a bounded table; owners found in the stream are looked up again until stored.
    """

    def __init__(
        self,
        reads: ReadModel,
        inbox: Inbox,
        log: ConversationLog | None = None,
        max_entries: int = 100_000,
    ) -> None:
        self.reads = reads
        self.inbox = inbox
        self.log = log
        self.max_entries = max_entries
        self.known: dict[str, core.Principal] = {}

    async def of(self, conversation_id: str) -> core.Ownership:
        """The owner, and whether the conversation was deleted: its tombstone in the stream is
        read first, every time (a deletion hides it at once, before the persister acts); if
        the stream cannot be read, the database's tombstone still answers."""
        tomb_read = True
        if self.log is not None:
            try:
                tomb = await self.log.tombstone(conversation_id)
            except (nats.errors.Error, TimeoutError, OSError, msgspec.DecodeError):
                tomb, tomb_read = None, False
            if tomb is not None:
                owner = core.Principal(project=tomb.project_id, user=tomb.user_id)
                return core.Ownership(owner, deleted=True)
        hit = self.known.get(conversation_id)
        if hit is not None and tomb_read:
            return core.Ownership(hit)
        stored_read = True
        try:
            row = await self.reads.owner(conversation_id)
        except UNAVAILABLE:
            row, stored_read = None, False
        if row is not None:
            owner = core.Principal(project=row[0], user=row[1])
            if row[2]:
                return core.Ownership(owner, deleted=True)
            if len(self.known) >= self.max_entries:
                self.known.clear()
            self.known[conversation_id] = owner
            return core.Ownership(owner)
        try:
            first = await self.inbox.first(conversation_id)
            created = None
            if first is None and self.log is not None:
                created = await self.log.creation(conversation_id)
        except (nats.errors.Error, TimeoutError, OSError, msgspec.DecodeError):
            return core.Ownership(None, known=False)
        if first is not None:
            return core.Ownership(core.Principal(project=first.project_id, user=first.user_id))
        if created is not None:
            # Created (POST /api/conversations) and not stored yet: the creation names it.
            c = created[0]
            return core.Ownership(core.Principal(project=c.project_id, user=c.user_id))
        return core.Ownership(None, known=stored_read and tomb_read)


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
        return [d for d, _ in await self.deltas_at(project, conversation_id)]

    async def deltas_at(
        self, project: str, conversation_id: str
    ) -> list[tuple[m.TokenDelta, datetime]]:
        """The deltas with the time each was stored (orders them against tool events)."""
        subject = subjects.token_stream(project, conversation_id)
        try:
            last = await self.bus.js.get_last_msg(subjects.STREAM_TOKENS, subject)
        except nats.js.errors.NotFoundError:
            return []
        if last.seq is None:
            return []
        out: list[tuple[m.TokenDelta, datetime]] = []
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
                out.append((_delta.decode(msg.data), msg.time or datetime.min.replace(tzinfo=UTC)))
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
    that far behind is cut off (it resumes with its last event id). Clients join a topic,
    ``<project>.<conversation>`` (``topic()``), the last two tokens of every push subject: an
    event reaches only watchers of its own project, whatever conversation id they asked for.

    A conversation's deletion tombstone (``conv.delete.<project>.<conversation>``, heard on
    every replica) ends its watchers at once (``end_conversation``): what they have not read
    yet is dropped, and nothing published later reaches them.
    """

    MAX_GONE = 10_000  # recently deleted topics remembered (a watcher joining late ends at once)

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
        # Queues ended because their conversation was deleted, and the topics deleted lately.
        self.deleted: weakref.WeakSet[asyncio.Queue[PushEvent | None]] = weakref.WeakSet()
        self.gone: dict[str, None] = {}
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
        self.subs.append(await self.bus.nc.subscribe(DELETE_SUBJECT, cb=self._on_delete))
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

    def join(self, topic: str) -> asyncio.Queue[PushEvent | None]:
        q: asyncio.Queue[PushEvent | None] = asyncio.Queue(self.queue_size)
        if topic in self.gone:
            self.deleted.add(q)
            _close(q)
            return q
        self.clients[topic].add(q)
        return q

    def end_conversation(self, topic: str) -> None:
        """End every watcher of a deleted conversation (``was_deleted`` tells them why)."""
        if len(self.gone) >= self.MAX_GONE:
            self.gone.clear()
        self.gone[topic] = None
        for q in list(self.clients.pop(topic, ())):
            self.deleted.add(q)
            _close(q)

    def was_deleted(self, q: asyncio.Queue[PushEvent | None]) -> bool:
        """Whether this client's stream ended because its conversation was deleted."""
        return q in self.deleted

    async def _on_delete(self, msg: Msg) -> None:
        s = msg.subject
        self.end_conversation(s[s.rfind(".", 0, s.rfind(".")) + 1 :])

    def leave(self, topic: str, q: asyncio.Queue[PushEvent | None]) -> None:
        queues = self.clients.get(topic)
        if queues is not None:
            queues.discard(q)
            if not queues:
                del self.clients[topic]

    def was_slow(self, q: asyncio.Queue[PushEvent | None]) -> bool:
        """Whether this client's stream ended because it fell behind."""
        return q in self.slow

    def drop(self, topic: str, q: asyncio.Queue[PushEvent | None]) -> None:
        """Cut off a client that cannot keep up; it resumes with its last event id."""
        if q in self.slow:
            return
        self.slow.add(q)
        self.leave(topic, q)
        _close(q)
        if self.drops is not None:
            self.drops.inc()

    async def _on_msg(self, msg: Msg) -> None:
        s = msg.subject
        topic = s[s.rfind(".", 0, s.rfind(".")) + 1 :]  # "<project>.<conversation>"
        queues = self.clients.get(topic)
        if not queues:
            return
        try:
            mapped = core.push_event(msg.subject, msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            # str(), never repr(): a UnicodeDecodeError's repr holds the bytes (content).
            self.log.warning("push_decode_failed", subject=msg.subject, error=str(exc))
            return
        if mapped is None:
            return
        event = PushEvent(*mapped)
        for q in list(queues):
            try:
                q.put_nowait(event)
            except asyncio.QueueFull:
                self.drop(topic, q)


# Every conversation's deletion tombstone, heard with core NATS as it is stored.
DELETE_SUBJECT = subjects.conversation_delete("*", "*")


def topic(project: str, conversation_id: str) -> str:
    """The hub topic of a conversation's push events (its subjects' last two tokens)."""
    return f"{project}.{conversation_id}"


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
        self.seen: dict[tuple[str, str], tuple[float, core.RateState]] = {}  # → (checked at, state)

    async def retry_after(self, project: str, user: str) -> int | None:
        """Seconds until the user may send again, or None when not (known to be) over a limit."""
        return (await self.look(project, user)).retry_after(time.time())

    async def look(self, project: str, user: str) -> core.RateState:
        """The user's rate windows as last read (at most ``cache_s`` old; blocked: until its end).

        A window with no entry yet (nothing sent in it) is not known here: policy writes the
        limit into the window, so the state names only windows the user has sent in.
        """
        now = time.time()
        hit = self.seen.get((project, user))
        if hit is not None:
            checked, state = hit
            if state.blocked_until() > now or now - checked < self.cache_s:
                return state.current(now)
        quotas: list[core.RateQuota] = []
        names = list(ratelimit.WINDOWS)
        keys = [ratelimit.key(window, now, project, user) for window in names]
        # Both windows in one round trip.
        entries = await asyncio.gather(*(self.kv.get(k) for k in keys), return_exceptions=True)
        for name, entry in zip(names, entries, strict=True):
            if isinstance(entry, nats.js.errors.KeyNotFoundError):
                continue
            try:
                if isinstance(entry, BaseException):
                    raise entry
                w = ratelimit.decoder.decode(entry.value or b"")
                quota = core.RateQuota(
                    name=core.RATE_WINDOW_NAMES.get(name, name),
                    window_s=int(w.length),
                    limit=int(w.limit),
                    used=len(w.ids),
                    ends_at=float(w.start + w.length),
                )
            except Exception:  # fail open: policy is authoritative
                return core.RateState(())
            if quota.limit < 1 or quota.window_s < 1:
                return core.RateState(())
            quotas.append(quota)
        state = core.RateState(tuple(quotas))
        if len(self.seen) >= self.MAX_CACHED:
            self.seen.clear()
        self.seen[(project, user)] = (now, state)
        return state.current(now)


def _stored_message(r: Any) -> dict[str, Any]:
    """A stored message row as the read model hands it out (one shape for every read)."""
    return {
        "id": str(r["id"]),
        "role": r["role"],
        "kind": r["kind"],
        "content": r["content"],
        "created_at": r["created_at"],
        "run_id": r["run_id"],
        "pending": False,
    }

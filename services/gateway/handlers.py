"""The gateway's HTTP edge: authenticate, validate, publish, answer; reads and pushes."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, cast

import msgspec
import nats.errors
import nats.js.errors
import structlog
from litestar import Request, Response, get, post
from litestar.params import FromPath, FromQuery, QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage
from opentelemetry import trace

from services.gateway import auth, core, openapi, pages, tools
from services.gateway import usage as usage_report
from services.gateway.adapters import (
    Hub,
    Inbox,
    Owners,
    Publisher,
    PushEvent,
    RateGate,
    ReadModel,
    TokenLog,
    ToolLog,
    ToolView,
    VerdictLog,
    topic,
)
from services.gateway.config import Settings
from services.gateway.edge import ON_SEND_TIMEOUT
from services.gateway.front import request_id
from services.gateway.lifecycle import ConversationLog, created_row, overlay
from shared import messages as m
from shared import subjects, tracing
from shared.db import UNAVAILABLE
from shared.metrics import ServiceMetrics
from shared.tracing import current_trace_id

EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
WRONG_LAST_SEQUENCE = 10071  # JetStream's error code for a failed expected-sequence check
# At most this many accepted-but-not-stored messages are read back per request.
PENDING_READ_LIMIT = 100


@dataclass
class Watch:
    """One client's view of a conversation: its hub queue and what a resume replays first.

    ``pending``: nobody owned the conversation when the stream opened; no event is sent before
    it turns out to be the watcher's (``Api.claim``).
    """

    conversation_id: str
    topic: str
    watcher: core.Principal
    queue: asyncio.Queue[PushEvent | None]
    replay: list[core.Push]
    live: core.LiveFilter
    pending: bool = False
    ended: bool = False
    # An API key's stream is looked at again while it is open (``Api.still_allowed``): a
    # revoked key ends it, as it refuses every request. None: a bearer or stream token.
    api_key: auth.Credentials | None = None
    key_hash: str | None = None  # opened by a stream token minted with an API key
    checked_at: float = 0.0


class Api:
    """Route handlers bound to the gateway's connections (one instance per process)."""

    def __init__(
        self,
        settings: Settings,
        publisher: Publisher,
        reads: ReadModel,
        hub: Hub,
        metrics: ServiceMetrics,
        tokens: TokenLog,
        rate_gate: RateGate | None = None,
        owners: Owners | None = None,
        tool_log: ToolLog | None = None,
        verdicts: VerdictLog | None = None,
    ) -> None:
        self.settings = settings
        self.log = ConversationLog(publisher.bus)
        self.owners = owners or Owners(reads, Inbox(publisher.bus), self.log)
        self.tool_log = tool_log or ToolLog(publisher.bus)
        self.verdicts = verdicts or VerdictLog(publisher.bus)
        self.id_key = core.id_key(str(settings.jwt_secret), str(settings.id_secret))
        self.rate_gate = rate_gate
        self.rate_limited = metrics.counter(
            "rate_limited_total", "Submits answered 429 early: the user was over a rate limit."
        )
        self.publisher = publisher
        self.reads = reads
        self.hub = hub
        self.tokens = tokens
        self.metrics = metrics
        self.accepts = metrics.counter(
            "accepted_total",
            "Chat messages accepted (202), by whether they were duplicates.",
            ("duplicate",),
        )
        self.cancels = metrics.counter(
            "cancel_requests_total",
            "Run cancels accepted (202), by whether the run's cancel was already asked for.",
            ("duplicate",),
        )
        self.approvals = metrics.counter(
            "tool_decisions_total",
            "Tool call decisions accepted (202), by answer and whether they repeated one.",
            ("approve", "duplicate"),
        )
        # The labelled child once, not a label lookup per accepted message.
        self.accepts_new = self.accepts.labels("false")
        self.principals = auth.Principals(
            str(settings.jwt_secret),
            max_lifetime_s=settings.jwt_max_lifetime_s,
            leeway_s=settings.jwt_leeway_s,
            hs256=settings.jwt_hs256,
            idp=settings.idp(),
            api_keys=auth.ApiKeys(reads, settings.api_key_cache_s),
        )
        self.stream_tokens = auth.StreamTokens(
            str(settings.jwt_secret), settings.stream_token_ttl_s
        )
        self.sse_connections = metrics.counter("sse_connections_total", "SSE streams opened.")
        self.stream_clients = metrics.gauge(
            "stream_clients",
            "Push streams open now, by transport (sse, websocket).",
            ("transport",),
        )
        self.sse_resumes = metrics.counter(
            "sse_resumes_total",
            "Push streams (SSE or WebSocket) resumed with a last event id, by whether it named a known position.",
            ("known",),
        )

    async def principal(self, request: Request[Any, Any, Any]) -> core.Principal:
        return await self.principals.authenticate(auth.Credentials.of(request.headers))

    async def watcher(
        self, headers: Any, query: Any, conversation_id: str
    ) -> tuple[core.Principal, str | None]:
        """Who opens a push stream: the bearer header, or a stream token in ``?access_token=``.

        The query parameter takes a stream token only (never a bearer token: URLs are kept by
        proxies and browsers), and only on this conversation's events and ws routes.
        """
        token = query.get("access_token")
        if token is None:
            return await self.principals.authenticate(auth.Credentials.of(headers)), None
        p, key_hash = self.stream_tokens.verify_key(token, conversation_id)
        keys = self.principals.api_keys
        # Minted with an API key: it opens nothing once the key is revoked.
        if key_hash is not None and keys is not None and await keys.project(key_hash) != p.project:
            raise core.ApiError(401, "unauthenticated", "unknown or revoked API key")
        return p, key_hash

    async def own(self, p: core.Principal, conversation_id: str) -> str:
        """The conversation id if the caller owns it; 404 otherwise (never 403: no existence leak)."""
        cid = pages.path_id(conversation_id)
        core.may_read(await self.owners.of(cid), p)
        return cid

    async def chat(self, request: Request[Any, Any, Any]) -> Response[Any]:
        line: dict[str, str] = {}
        try:
            payload, headers = await self.submit(
                auth.Credentials.of(request.headers),
                request.headers.get("idempotency-key"),
                await request.body(),
                line=line,
            )
        finally:
            structlog.contextvars.bind_contextvars(**line)  # for HttpEdge's line
        return Response(payload, status_code=202, headers=headers)

    async def submit(
        self,
        credentials: auth.Credentials,
        idempotency_key: str | None,
        body: bytes,
        traceparent: str | None = None,
        line: dict[str, str] | None = None,
    ) -> tuple[core.ChatAccepted, dict[str, str]]:
        """Accept one chat message: the 202 body and headers, or an ``ApiError``.

        Shared by the Litestar route and the raw ASGI fast path (``fastpath.FastAccept``). The
        message's trace is the request span's, or, when no span is recorded, ``traceparent``'s.
        What the request's log line should name (ids, trace id) goes into ``line``.
        """
        p = await self.principals.authenticate(credentials)
        key = core.check_idempotency_key(idempotency_key, self.settings.max_idempotency_key_chars)
        req = core.parse_chat(body, self.settings.max_content_chars)
        digest = core.content_hash(req.conversation_id, req.content)
        message_id, conversation_id = core.ids_for(p, key, req.conversation_id, self.id_key)
        if traceparent is None:
            span = trace.get_current_span()
            span.set_attribute("baton.message_id", message_id)
            span.set_attribute("baton.conversation_id", conversation_id)
            trace_id = current_trace_id()
        else:
            trace_id = tracing.trace_id_of(traceparent)
        if req.conversation_id is not None:
            await self._may_post(p, req.conversation_id)
        if line is not None:
            line.update(message_id=message_id, conversation_id=conversation_id, trace_id=trace_id)
        if key is not None:
            stored = await self._stored(message_id)
            if stored is not None:
                return self._duplicate(stored, digest)
        if not self.publisher.bus.nc.is_connected:
            # Reconnecting: a publish (or the rate gate's bucket read) would only sit in the
            # client's buffer until the timeout.
            raise _broker_unavailable()
        # After the duplicate check: a retried submit gets its original, not a 429.
        rate = core.RateState(())
        if self.rate_gate is not None:
            rate = await self.rate_gate.look(p.project, p.user)
            refusal = core.rate_limited(rate, time.time())
            if refusal is not None:
                self.rate_limited.inc()
                raise refusal
        event = m.UserMessageAccepted(
            event_id=message_id,
            message_id=message_id,
            conversation_id=conversation_id,
            project_id=p.project,
            user_id=p.user,
            content=req.content,
            content_hash=digest,
            created_at=datetime.now(UTC),
            idempotency_key=key,
        )
        try:
            original, duplicate = await self.publisher.accept(event, traceparent)
        except LookupError as exc:
            # A duplicate whose original left the stream: the database answers once it is stored.
            raise core.ApiError(
                503,
                "replay_pending",
                "duplicate is still being stored, retry",
                {"Retry-After": "1"},
            ) from exc
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            # No PubAck, no 202: the client must retry (with its key, safely).
            raise _broker_unavailable() from exc
        if duplicate:
            return self._duplicate(original, digest)
        self.accepts_new.inc()
        # How much room is left, as the gateway saw it (policy counts this message later).
        return core.accepted(original, False), rate.headers(time.time(), spent=1)

    async def _may_post(self, p: core.Principal, conversation_id: str) -> None:
        # No 202 the persister would refuse: an owner that cannot be told is a 503, not an allow.
        core.may_post(await self.owners.of(conversation_id), p)

    async def _stored(self, message_id: str) -> m.UserMessageAccepted | None:
        try:
            return await self.reads.message(message_id)
        except UNAVAILABLE:
            return None

    def _duplicate(
        self, original: m.UserMessageAccepted, digest: str
    ) -> tuple[core.ChatAccepted, dict[str, str]]:
        if original.content_hash != digest:
            raise core.ApiError(
                422,
                "idempotency_key_reused",
                "this Idempotency-Key was already used with a different request body",
            )
        self.accepts.labels("true").inc()
        return core.accepted(original, True), {"Idempotent-Replayed": "true"}

    async def cancel(
        self, request: Request[Any, Any, Any], conversation_id: str, run_id: str
    ) -> Response[Any]:
        """Ask policy to cancel a run; 202 once JetStream has the request (policy decides)."""
        p = await self.principal(request)
        cid, rid, message_id = core.parse_cancel_ids(conversation_id, run_id)
        await self.own(p, cid)
        try:
            status = await self.reads.run_status(cid, rid)
            message = None if status is not None else await self.reads.message(message_id)
        except UNAVAILABLE as exc:
            raise core.ApiError(503, "database_unavailable", "run store unavailable") from exc
        if status is None and (message is None or message.conversation_id != cid):
            raise core.ApiError(404, "not_found", "run not found")
        if status in core.FINAL_STATUSES:
            raise core.ApiError(
                409,
                "run_finished",
                f"run already finished: {status}",
                extra={"run_status": str(status)},
            )
        event = m.CancelRequested(
            event_id=f"cancel:{rid}",
            message_id=message_id,
            conversation_id=cid,
            project_id=p.project,
            user_id=p.user,
            run_id=rid,
            requested_at=datetime.now(UTC),
        )
        if not self.publisher.bus.nc.is_connected:
            raise _broker_unavailable()
        try:
            duplicate = await self.publisher.cancel(event)
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            raise _broker_unavailable() from exc
        self.cancels.labels(str(duplicate).lower()).inc()
        return Response(
            {
                "status": "cancelling",
                "run_id": rid,
                "run_status": status or "pending",
                "duplicate": duplicate,
            },
            status_code=202,
        )

    async def tool_approvals(
        self, request: Request[Any, Any, Any], conversation_id: str, run_id: str
    ) -> Response[Any]:
        """The user's answers to a run's "ask" tool calls; 202 once JetStream has each.

        Every decision is checked before any is published (409 when the run is not waiting for
        a call); a repeat of a recorded answer is a duplicate, never a second decision.
        """
        p = await self.principal(request)
        cid, rid, message_id = core.parse_cancel_ids(conversation_id, run_id)
        await self.own(p, cid)
        decisions = tools.parse_approvals(await request.body())
        try:
            run = await self.reads.run(cid, rid)
            message = None if run is not None else await self.reads.message(message_id)
        except UNAVAILABLE as exc:
            raise core.ApiError(503, "database_unavailable", "run store unavailable") from exc
        if run is None and (message is None or message.conversation_id != cid):
            raise core.ApiError(404, "not_found", "run not found")
        if run is not None and run[0] in core.FINAL_STATUSES:
            raise core.ApiError(
                409, "run_finished", f"run already finished: {run[0]}", extra={"run_status": run[0]}
            )
        since = run[1] if run is not None else message.created_at  # type: ignore[union-attr]
        if not self.publisher.bus.nc.is_connected:
            raise _broker_unavailable()
        answered: list[dict[str, Any]] = []
        try:
            view, calls = await self._run_tools(p, cid, rid, since)
            now = datetime.now(UTC)
            fresh = [tools.check(d, calls, now) for d in decisions]  # all checked first
            last = view.last_approval_seq
            for d, new in zip(decisions, fresh, strict=True):
                duplicate = not new
                for _ in range(5):
                    if duplicate:
                        break
                    outcome = await self._decide(p, calls, d, last, now)
                    if isinstance(outcome, int):
                        last = outcome  # published: the next one follows it
                        break
                    # Another decision of this conversation came first: look again.
                    view, calls = await self._run_tools(p, cid, rid, since)
                    last = view.last_approval_seq
                    duplicate = not tools.check(d, calls, datetime.now(UTC))
                else:
                    raise _broker_unavailable()
                self.approvals.labels(str(d.approve).lower(), str(duplicate).lower()).inc()
                answered.append(
                    {
                        "tool_call_id": d.tool_call_id,
                        "approve": d.approve,
                        "input_digest": core.shown_digest(calls.requested[d.tool_call_id]),
                        "duplicate": duplicate,
                    }
                )
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            raise _broker_unavailable() from exc
        return Response(
            {"status": "accepted", "run_id": rid, "decisions": answered}, status_code=202
        )

    async def _decide(
        self,
        p: core.Principal,
        calls: tools.RunTools,
        d: tools.DecisionIn,
        last_seq: int,
        now: datetime,
    ) -> int | None:
        """Publish one decision, only if no other decision of the conversation was published
        since the read (``Nats-Expected-Last-Subject-Sequence``): its sequence, or None when
        one was (look again). A duplicate id (the same call decided meanwhile) with another
        answer is 409 already_decided."""
        req = calls.requested[d.tool_call_id]
        event = tools.decided_event(req, d, p.user, now)
        try:
            ack = await self.publisher.bus.publish(
                subjects.tool_approval(p.project, req.conversation_id),
                event,
                msg_id=event.event_id,
                headers={EXPECTED_LAST_SUBJECT_SEQ: str(last_seq)},
                timeout=self.publisher.timeout_s,
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                return None
            raise
        if ack.duplicate:
            first = await self.tool_log.decision_at(ack.seq)
            if first is not None and first.approve != d.approve:
                raise core.ApiError(
                    409,
                    "already_decided",
                    f"tool call {d.tool_call_id} was already "
                    f"{'approved' if first.approve else 'denied'}",
                )
        return int(ack.seq)

    async def _run_tools(
        self, p: core.Principal, cid: str, rid: str, since: datetime
    ) -> tuple[ToolView, tools.RunTools]:
        view = await self.tool_log.view(p.project, cid, since)
        try:
            stored = [r for r, _, _ in await self.reads.tool_results(cid) if r.run_id == rid]
        except UNAVAILABLE as exc:
            raise core.ApiError(503, "database_unavailable", "run store unavailable") from exc
        results = [r.call_id for r in view.results] + [r.call_id for r in stored]
        requests = (r for r, _ in view.requests if r.user_id == p.user)
        calls = tools.run_tools(rid, requests, view.decisions, results)
        return view, calls

    async def messages(
        self,
        request: Request[Any, Any, Any],
        conversation_id: str,
        limit: str | None = None,
        before: str | None = None,
        after: str | None = None,
    ) -> pages.MessagesPage:
        """One page of a conversation: the newest, or just before or after a cursor.

        The newest end also shows the owner's accepted messages not stored yet (read your
        writes), in their place; the page keeps its size by leaving out older ones.
        """
        p = await self.principal(request)
        q = pages.message_query(limit, before, after)
        cid = await self.own(p, conversation_id)
        rows, more = await self._read(self.reads.message_page(cid, q.limit, q.before, q.after))
        has_older = more if q.after is None else True
        has_newer = more if q.after is not None else q.before is not None
        shown = rows
        if not has_newer:
            pending = await self._read(self._pending(p, cid, {x["id"] for x in rows}))
            shown = core.merge_pending(rows, pending)
            if len(shown) > q.limit:
                shown, has_older = shown[-q.limit :], True
        stored = [x for x in shown if not x["pending"]]
        before_cursor = after_cursor = None
        if stored:
            before_cursor = pages.message_cursor(stored[0]) if has_older else None
            after_cursor = pages.message_cursor(stored[-1])
        elif rows:  # only pending ones fit: older ones are the stored ones up to the newest
            last = {**rows[-1], "seq": rows[-1]["seq"] + 1}
            before_cursor, after_cursor = pages.message_cursor(last), pages.message_cursor(rows[-1])
        elif q.after is not None:
            after_cursor = after
        return pages.MessagesPage(
            conversation_id=cid,
            messages=[msgspec.convert(x, pages.Message) for x in shown],
            before=before_cursor,
            after=after_cursor,
            has_older=has_older,
            has_newer=has_newer,
        )

    async def conversation(
        self, request: Request[Any, Any, Any], conversation_id: str
    ) -> pages.Conversation:
        """A conversation's metadata; one only accepted so far (nothing stored) shows too."""
        p = await self.principal(request)
        cid = await self.own(p, conversation_id)
        return await self.view(p, cid)

    async def view(self, p: core.Principal, cid: str) -> pages.Conversation:
        """A conversation of the caller's as stored, with what JetStream has and the database
        not yet: accepted messages, a creation, changes of its title and metadata."""
        row = await self._read(self.reads.conversation(cid))
        pending = await self._read(self._pending(p, cid, set()))
        created = None
        if row is None:
            with contextlib.suppress(nats.errors.Error, TimeoutError, OSError, msgspec.DecodeError):
                created = await self.log.creation(cid)
            if created is not None:
                row = created_row(created[0], created[0].at)
            elif not pending:
                raise core.ApiError(404, "not_found", core.NOT_FOUND)
            else:
                first = pending[0]
                row = {
                    "id": cid,
                    "title": "",
                    "created_at": first.created_at,
                    "last_activity_at": first.created_at,
                    "message_count": 0,
                    "metadata": {},
                    "settings": {"model": None, "system_prompt": None},
                    "pending": True,
                }
        after = row.get("settings_seq", 0) if created is None else created[1]
        with contextlib.suppress(nats.errors.Error, TimeoutError, OSError):
            row = overlay(row, await self.log.changes(p.project, cid, after))
        if pending:
            row["message_count"] += len(pending)
            row["last_activity_at"] = max(row["last_activity_at"], pending[-1].created_at)
        return msgspec.convert(row, pages.Conversation)

    async def conversations(
        self, request: Request[Any, Any, Any], limit: str | None, cursor: str | None
    ) -> pages.ConversationsPage:
        """The caller's conversations, most recent activity first."""
        p = await self.principal(request)
        n = pages.limit_of(limit, pages.DEFAULT_CONVERSATIONS, pages.MAX_CONVERSATIONS)
        before = None if cursor is None else pages.decode(cursor, "c")
        rows, more = await self._read(self.reads.conversations(p.project, p.user, n, before))
        # Deleted a moment ago and not yet tombstoned in the database: left out already.
        gone = await self.log.deleted_among([r["id"] for r in rows])
        return pages.ConversationsPage(
            conversations=[
                msgspec.convert(r, pages.Conversation) for r in rows if r["id"] not in gone
            ],
            cursor=pages.conversation_cursor(rows[-1]) if more else None,
        )

    async def state(self, request: Request[Any, Any, Any], conversation_id: str) -> dict[str, Any]:
        p = await self.principal(request)
        cid = await self.own(p, conversation_id)
        runs = await self._read(self.reads.runs(cid))
        pending = await self._read(self._pending(p, cid, {r["message_id"] for r in runs}))
        known = {r["run_id"] for r in runs}
        more = [core.pending_run(e) for e in pending if core.run_id_of(e.message_id) not in known]
        waiting = await self._waiting_calls(p, cid, runs)
        for r in runs:
            # None: a run in flight whose calls could not be read (the stream is down).
            unknown = waiting is None and r["status"] not in core.FINAL_STATUSES
            r["pending_tool_calls"] = None if unknown else (waiting or {}).get(r["run_id"], [])
        for r in more:
            r["pending_tool_calls"] = []
        return {"conversation_id": cid, "runs": [*runs, *more]}

    async def _waiting_calls(
        self, p: core.Principal, cid: str, runs: list[dict[str, Any]]
    ) -> dict[str, list[dict[str, Any]]] | None:
        """Per run in flight, the tool calls waiting for the user's answer (TOOLS stream);
        None when the stream cannot be read (the rest of the state still answers)."""
        live = [r for r in runs if r["status"] not in core.FINAL_STATUSES]
        if not live:
            return {}
        since = min(r["created_at"] for r in live)
        try:
            view = await self.tool_log.view(p.project, cid, since)
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            structlog.get_logger().warning("tool_read_failed", error=type(exc).__name__)
            return None
        stored = await self._read(self.reads.tool_results(cid))
        requests = [x for x, _ in view.requests if x.user_id == p.user]
        out: dict[str, list[dict[str, Any]]] = {}
        for r in live:
            mine = {x.call_id for x in view.results if x.run_id == r["run_id"]}
            mine |= {x.call_id for x, _, _ in stored if x.run_id == r["run_id"]}
            calls = tools.run_tools(r["run_id"], requests, view.decisions, mine)
            out[r["run_id"]] = tools.pending_calls(calls)
        return out

    async def _pending(
        self, p: core.Principal, cid: str, seen: set[str]
    ) -> list[m.UserMessageAccepted]:
        """The owner's accepted messages of this conversation the database does not hold yet.

        Read from CHAT_IN after the last stored user message (read your writes: a 202 is visible
        at once, also while the persister is behind or down). A stream that cannot be read
        leaves them out: the stored messages still answer. ``seen``: the ids a read (a page, the
        runs) holds; a candidate the database holds is left out, on that read or not.
        """
        since = await self.reads.last_user_message_at(cid)
        accepted = await self._accepted(p, cid, since)
        fresh = [e for e in accepted if e.message_id not in seen]
        stored = seen | await self.reads.stored_ids([e.message_id for e in fresh])
        return core.unstored(accepted, stored, cid, p)

    async def _unread(
        self, p: core.Principal, cid: str, messages: list[dict[str, Any]]
    ) -> list[m.UserMessageAccepted]:
        """The owner's accepted messages that ``messages``, a read of the conversation's whole
        stored list made just before, lacks: pending for that read even if the persister has
        stored them since. Looked for after that read's own last user message, not the
        database's now: one stored in between would otherwise move the window past messages
        the read lacks, and dropping those as stored leaves them out of both (a replay would not
        know the message a client resumes from, and send it the whole conversation again)."""
        users = [x["created_at"] for x in messages if x["role"] == "user"]
        accepted = await self._accepted(p, cid, max(users) if users else None)
        return core.unstored(accepted, {x["id"] for x in messages}, cid, p)

    async def _accepted(
        self, p: core.Principal, cid: str, since: datetime | None
    ) -> list[m.UserMessageAccepted]:
        try:
            return await self.owners.inbox.pending(p.project, cid, since, PENDING_READ_LIMIT)
        except (nats.errors.Error, TimeoutError, OSError, msgspec.DecodeError) as exc:
            structlog.get_logger().warning("pending_read_failed", error=type(exc).__name__)
            return []

    async def usage(
        self,
        request: Request[Any, Any, Any],
        group_by: str | None = None,
        start: str | None = None,
        end: str | None = None,
    ) -> dict[str, Any]:
        p = await self.principal(request)
        q = usage_report.parse(group_by, start, end)
        if q is None:
            totals: dict[str, Any] = await self._read(self.reads.usage(p.project))
            return totals
        result: dict[str, Any] = await self._read(usage_report.fetch(self.reads.pool, p.project, q))
        return result

    async def _read(self, query: Any) -> Any:
        try:
            return await query
        except UNAVAILABLE as exc:
            raise core.ApiError(
                503, "database_unavailable", "read model unavailable, retry"
            ) from exc

    async def events(
        self, request: Request[Any, Any, Any], conversation_id: str
    ) -> ServerSentEvent:
        p, key_hash = await self.watcher(request.headers, request.query_params, conversation_id)
        last_id = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
        by_header = "access_token" not in request.query_params
        credentials = auth.Credentials.of(request.headers) if by_header else None
        watch = await self.watch(p, conversation_id, last_id, credentials, key_hash)
        self.sse_connections.inc()
        # A client that stops reading leaves the stream suspended in a send, where its own
        # cleanup never runs; edge.HttpEdge calls this instead.
        scope = cast(dict[str, Any], request.scope)
        scope[ON_SEND_TIMEOUT] = lambda: self._end_sse(watch, slow=True)
        return ServerSentEvent(self._stream(watch))

    async def watch(
        self,
        p: core.Principal,
        conversation_id: str,
        last_id: str | None,
        credentials: auth.Credentials | None = None,
        key_hash: str | None = None,
    ) -> Watch:
        """A push stream of a conversation the caller may watch, with what it missed replayed.

        Shared by SSE and WebSocket, so both carry the same events with the same resume rules.
        ``credentials``: what opened it (an API key's are looked at again while it is open);
        ``key_hash``: the API key a stream token that opened it was minted with.
        """
        cid = core.parse_uuid(conversation_id, "conversation id")
        key = topic(p.project, cid)
        # Join the hub first: whatever happens from now on is buffered in the queue, so the
        # ownership check and the replay below overlap the live events rather than leave a gap.
        queue = self.hub.join(key)
        replay: list[core.Push] = []
        live = core.LiveFilter([], 0)
        try:
            # Decided before any event is sent: someone else's is 404, unknown 503. One nobody
            # owns yet (a client may open its stream before its first post) opens pending and
            # replays nothing: whatever the database holds by now is not known to be the caller's.
            owned = core.may_watch(await self.owners.of(cid), p)
            if last_id and owned:
                replay, seen, ended = await self._replay(p, cid, last_id)
                live = core.LiveFilter(replay, queue.qsize(), seen, ended)
        except BaseException:
            self.hub.leave(key, queue)
            raise
        api_key = credentials if credentials is not None and credentials.api_key else None
        return Watch(
            cid,
            key,
            p,
            queue,
            replay,
            live,
            not owned,
            api_key=api_key,
            key_hash=key_hash,
            checked_at=time.monotonic(),
        )

    async def still_allowed(self, w: Watch) -> None:
        """404 once the conversation is deleted; 401 once the API key that opened the stream is
        revoked (or names another project). Asked before every event a stream sends.

        Looked at again at most every ``api_key_cache_s`` (the key cache's TTL): a revocation
        ends the key's open streams about as fast as it refuses its requests. A database that
        cannot be asked does not end a stream.
        """
        if self.hub.was_deleted(w.queue):
            raise core.ApiError(404, "conversation_deleted", "the conversation was deleted")
        if w.api_key is None and w.key_hash is None:
            return
        now = time.monotonic()
        # Not more than once a second, even with no key cache (a query per token otherwise).
        if now - w.checked_at < max(self.settings.api_key_cache_s, 1.0):
            return
        w.checked_at = now
        p: core.Principal | None
        try:
            if w.api_key is not None:
                p = await self.principals.authenticate(w.api_key)
            else:
                assert w.key_hash is not None and self.principals.api_keys is not None
                project = await self.principals.api_keys.project(w.key_hash)
                p = w.watcher if project == w.watcher.project else None
        except core.ApiError as exc:
            if exc.status == 401:
                raise
            return
        if p != w.watcher:
            raise core.ApiError(401, "unauthenticated", "unknown or revoked API key")

    async def claim(self, w: Watch) -> bool:
        """Before a pending stream's first event: whether the conversation is now the watcher's.

        False: still nobody's (the event is not sent). ApiError: someone else's (404) or not
        known (503); the stream ends without the event.
        """
        ownership = await self.owners.of(w.conversation_id)
        if core.may_watch(ownership, w.watcher):
            w.pending = False
            return True
        return False

    async def _replay(
        self, p: core.Principal, cid: str, last_id: str
    ) -> tuple[list[core.Push], set[str], set[str]]:
        """What a client that last saw ``last_id`` missed (everything, for an unknown id), the
        ids of the statuses and messages it got before (never sent to it again), and the runs
        it will have seen end (none of their tokens is sent after)."""
        pos = core.parse_event_id(last_id)
        # The database first, the token log second: an answer stored before the read has all
        # its tokens in the log by the time the log is read. The runs before the messages: a run
        # is stored as ended after its reply, so a run read as ended has its reply in the
        # messages read after it (read the other way round, a reply stored in between would be
        # missing, and the run's end shown as a status no live client saw).
        try:
            runs = await self.reads.runs(cid)
            messages = await self.reads.messages(cid)
            pending = await self._unread(p, cid, messages)
            messages = core.merge_pending(messages, pending)
        except UNAVAILABLE as exc:
            raise core.ApiError(
                503, "database_unavailable", "conversation store unavailable, retry"
            ) from exc
        # Policy's verdicts after the database's reads, before the token log's: what the
        # persister has not stored yet of the runs it holds in flight (or not at all), so the
        # replay is never behind what live clients were pushed (a cancel, a retry).
        since = core.verdicts_since(runs, messages, datetime.now(UTC))
        try:
            shown = runs
            verdicts = None if since is None else await self.verdicts.since(p.project, cid, since)
            if verdicts is not None:
                shown = core.with_verdicts(runs, messages, verdicts)
            timed = await self.tokens.deltas_at(p.project, cid)
            items = await self._tool_items(p, cid, shown)
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            raise _broker_unavailable() from exc
        deltas = [d for d, _ in timed]
        events = core.timeline(cid, messages, shown, deltas, items, core.latest_token_start(timed))
        missed = core.resume(events, pos, shown)
        self.sse_resumes.labels(str(pos is not None and len(missed) < len(events)).lower()).inc()
        return missed, core.seen_before(events, missed, pos), core.ended_runs(events, pos)

    async def _tool_items(
        self, p: core.Principal, cid: str, runs: list[dict[str, Any]]
    ) -> list[core.ToolItem]:
        """The tool events of a replay: each stored result, and each approval request still in
        the TOOLS stream, of runs in flight or with a stored result."""
        try:
            stored = await self.reads.tool_results(cid)
        except UNAVAILABLE as exc:
            raise core.ApiError(
                503, "database_unavailable", "conversation store unavailable, retry"
            ) from exc
        with_results = {r.run_id for r, _, _ in stored}
        active = [
            r for r in runs if r["status"] not in core.FINAL_STATUSES or r["run_id"] in with_results
        ]
        items: list[core.ToolItem] = []
        if active:
            view = await self.tool_log.view(p.project, cid, min(r["created_at"] for r in active))
            known = {r["run_id"] for r in runs}
            items = [
                core.ToolItem(r.run_id, at, core.requested_push(r))
                for r, at in view.requests
                if r.run_id in known and r.user_id == p.user
            ]
        items += [core.ToolItem(r.run_id, at, core.result_push(r, mid)) for r, mid, at in stored]
        items.sort(key=lambda i: i.at)
        return items

    async def _stream(self, w: Watch) -> AsyncGenerator[ServerSentEventMessage, None]:
        self.stream_clients.labels("sse").inc()
        try:
            yield ServerSentEventMessage(data=None, comment="connected", retry=1000)
            for event, event_id, data in w.replay:
                yield _sse(event, event_id, data)
            loop = asyncio.get_running_loop()
            max_s = self.settings.sse_max_s
            ends = loop.time() + max_s if max_s > 0 else math.inf
            while True:
                left = ends - loop.time()
                if left <= 0:
                    return  # bounded streams: the client reconnects, resuming (retry: 1000)
                try:
                    ev = await asyncio.wait_for(
                        w.queue.get(), min(self.settings.sse_heartbeat_s, left)
                    )
                except TimeoutError:
                    ev = _IDLE
                try:
                    await self.still_allowed(w)
                except core.ApiError:
                    return  # the key was revoked: a reconnect gets the 401
                if ev is _IDLE:
                    if loop.time() < ends:
                        yield ServerSentEventMessage(data=None, comment="heartbeat")
                    continue
                if ev is None:
                    return
                if w.pending:
                    try:
                        if not await self.claim(w):
                            continue
                    except core.ApiError:
                        return  # someone else's after all: end it; a reconnect gets the error
                if w.live.fresh(ev.event, ev.id, ev.data):
                    yield _sse(ev.event, ev.id, ev.data)
        finally:
            self._end_sse(w, slow=False)

    def _end_sse(self, w: Watch, slow: bool) -> None:
        """Release an SSE stream once, whichever way it ends."""
        if w.ended:
            return
        w.ended = True
        self.stream_clients.labels("sse").dec()
        if slow:
            self.hub.drop(w.topic, w.queue)  # counted once, however noticed
        self.hub.leave(w.topic, w.queue)


_IDLE = PushEvent("heartbeat", "", {})  # no event within a heartbeat interval


def _sse(event: str, event_id: str, data: dict[str, Any]) -> ServerSentEventMessage:
    return ServerSentEventMessage(data=msgspec.json.encode(data).decode(), event=event, id=event_id)


def _broker_unavailable() -> core.ApiError:
    return core.ApiError(
        503, "broker_unavailable", "message not accepted, please retry", {"Retry-After": "1"}
    )


def routes(api: Api) -> list[Any]:
    """Litestar route handlers bound to one Api instance."""
    cid = {"conversation_id": openapi.UUID}

    @post(
        "/api/chat",
        status_code=202,
        summary="Submit a chat message",
        **openapi.doc(
            400,
            404,
            413,
            422,
            429,
            503,
            body=openapi.chat_body(api.settings.max_content_chars),
            headers=[openapi.idempotency_key(api.settings.max_idempotency_key_chars)],
            success={202: openapi.ACCEPTED},
        ),
    )
    async def chat(request: Request[Any, Any, Any]) -> Response[Any]:
        # Each submitted message starts its own trace, which every later hop continues.
        attributes = {"http.request.method": "POST", "http.route": "/api/chat"}
        with tracing.root_span("POST /api/chat", request.headers, attributes) as span:
            span.set_attribute("baton.request_id", request_id())
            try:
                response = await api.chat(request)
            except core.ApiError as exc:
                span.set_attribute("http.response.status_code", exc.status)
                span.set_attribute("error.type", exc.code)
                if exc.status >= 500:
                    span.set_status(trace.Status(trace.StatusCode.ERROR, exc.code))
                raise
            span.set_attribute("http.response.status_code", response.status_code)
            return response

    @get(
        "/api/conversations",
        summary="The caller's conversations, most recent activity first",
        **openapi.doc(
            400,
            503,
            params={"limit": openapi.limit(pages.MAX_CONVERSATIONS), "cursor": openapi.CURSOR},
        ),
    )
    async def conversations(
        request: Request[Any, Any, Any],
        limit: FromQuery[str | None] = None,
        cursor: FromQuery[str | None] = None,
    ) -> pages.ConversationsPage:
        return await api.conversations(request, limit, cursor)

    @get(
        "/api/conversations/{conversation_id:str}",
        summary="A conversation's metadata",
        **openapi.doc(400, 404, 503, params=cid),
    )
    async def conversation(
        request: Request[Any, Any, Any], conversation_id: FromPath[str]
    ) -> pages.Conversation:
        return await api.conversation(request, conversation_id)

    @get(
        "/api/conversations/{conversation_id:str}/messages",
        summary="A page of messages in conversation order (newest page by default)",
        **openapi.doc(
            400,
            404,
            503,
            params={
                **cid,
                "limit": openapi.limit(pages.MAX_MESSAGES),
                "before": openapi.CURSOR,
                "after": openapi.CURSOR,
            },
        ),
    )
    async def messages(
        request: Request[Any, Any, Any],
        conversation_id: FromPath[str],
        limit: FromQuery[str | None] = None,
        before: FromQuery[str | None] = None,
        after: FromQuery[str | None] = None,
    ) -> pages.MessagesPage:
        return await api.messages(request, conversation_id, limit, before, after)

    @get(
        "/api/conversations/{conversation_id:str}/state",
        summary="Runs and verdicts",
        **openapi.doc(400, 404, 503, params=cid),
    )
    async def state(
        request: Request[Any, Any, Any], conversation_id: FromPath[str]
    ) -> dict[str, Any]:
        return await api.state(request, conversation_id)

    @get(
        "/api/conversations/{conversation_id:str}/events",
        summary="Server-Sent Events",
        **openapi.doc(
            400,
            404,
            503,
            params=cid,
            headers=openapi.LAST_EVENT_ID,
            success={200: openapi.EVENT_STREAM},
        ),
    )
    async def events(
        request: Request[Any, Any, Any], conversation_id: FromPath[str]
    ) -> ServerSentEvent:
        return await api.events(request, conversation_id)

    @post(
        "/api/conversations/{conversation_id:str}/runs/{run_id:str}/cancel",
        status_code=202,
        summary="Cancel a queued or running run (202: policy will stop it)",
        **openapi.doc(
            400,
            404,
            409,
            503,
            params={**cid, "run_id": openapi.RUN_ID},
            success={202: openapi.CANCELLING},
        ),
    )
    async def cancel(
        request: Request[Any, Any, Any], conversation_id: FromPath[str], run_id: FromPath[str]
    ) -> Response[Any]:
        return await api.cancel(request, conversation_id, run_id)

    @post(
        "/api/conversations/{conversation_id:str}/runs/{run_id:str}/tool-approvals",
        status_code=202,
        summary="Approve or deny a run's tool calls waiting for the user (202: policy has it)",
        **openapi.doc(
            400,
            404,
            409,
            413,
            422,
            503,
            params={**cid, "run_id": openapi.RUN_ID},
            body=openapi.APPROVALS_BODY,
            success={202: openapi.APPROVALS_ACCEPTED},
        ),
    )
    async def tool_approvals(
        request: Request[Any, Any, Any], conversation_id: FromPath[str], run_id: FromPath[str]
    ) -> Response[Any]:
        return await api.tool_approvals(request, conversation_id, run_id)

    @get(
        "/api/usage",
        summary="The caller's project token and cost totals, or a report per day, user or model",
        **openapi.doc(
            400,
            503,
            params={
                "group_by": usage_report.GROUP_BY_PARAM,
                "from": usage_report.time_param("from"),
                "to": usage_report.time_param("to"),
            },
            success={200: openapi.json_success("Totals or report", usage_report.REPORT_SCHEMA)},
        ),
    )
    async def usage(
        request: Request[Any, Any, Any],
        group_by: FromQuery[str | None] = None,
        from_: Annotated[str | None, QueryParameter(name="from")] = None,
        to: FromQuery[str | None] = None,
    ) -> dict[str, Any]:
        return await api.usage(request, group_by, from_, to)

    return [
        chat,
        conversations,
        conversation,
        messages,
        state,
        events,
        cancel,
        tool_approvals,
        usage,
    ]

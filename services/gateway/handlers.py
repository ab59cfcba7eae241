"""The gateway's HTTP edge: authenticate, validate, publish, answer; reads and pushes."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import msgspec
import nats.errors
import structlog
from litestar import Request, Response, get, post
from litestar.params import FromPath
from litestar.response import ServerSentEvent, ServerSentEventMessage
from opentelemetry import trace

from services.gateway import core, openapi
from services.gateway.adapters import (
    Hub,
    Inbox,
    Owners,
    Publisher,
    PushEvent,
    RateGate,
    ReadModel,
    TokenLog,
    topic,
)
from services.gateway.config import Settings
from services.gateway.edge import ON_SEND_TIMEOUT
from shared import messages as m
from shared import tracing
from shared.db import UNAVAILABLE
from shared.metrics import ServiceMetrics
from shared.tracing import current_trace_id


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
    ) -> None:
        self.settings = settings
        self.owners = owners or Owners(reads, Inbox(publisher.bus))
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
        # The labelled child once, not a label lookup per accepted message.
        self.accepts_new = self.accepts.labels("false")
        self.principals = core.Principals(
            str(settings.jwt_secret),
            max_lifetime_s=settings.jwt_max_lifetime_s,
            leeway_s=settings.jwt_leeway_s,
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

    def principal(self, request: Request[Any, Any, Any]) -> core.Principal:
        return self.principals.authenticate(request.headers.get("authorization"))

    async def own(self, p: core.Principal, conversation_id: str) -> str:
        """The conversation id if the caller owns it; 404 otherwise (never 403: no existence leak)."""
        cid = core.parse_uuid(conversation_id, "conversation id")
        core.may_read(await self.owners.of(cid), p)
        return cid

    async def chat(self, request: Request[Any, Any, Any]) -> Response[Any]:
        line: dict[str, str] = {}
        try:
            payload, headers = await self.submit(
                request.headers.get("authorization"),
                request.headers.get("idempotency-key"),
                await request.body(),
                line=line,
            )
        finally:
            structlog.contextvars.bind_contextvars(**line)  # for HttpEdge's line
        return Response(payload, status_code=202, headers=headers)

    async def submit(
        self,
        authorization: str | None,
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
        p = self.principals.authenticate(authorization)
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
        if self.rate_gate is not None:
            retry = await self.rate_gate.retry_after(p.project, p.user)
            if retry is not None:
                self.rate_limited.inc()
                raise core.ApiError(
                    429,
                    "rate_limited",
                    f"too many messages; retry in {retry} s",
                    {"Retry-After": str(retry)},
                )
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
        return core.accepted(original, False), {}

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
        p = self.principal(request)
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

    async def messages(
        self, request: Request[Any, Any, Any], conversation_id: str
    ) -> dict[str, Any]:
        cid = await self.own(self.principal(request), conversation_id)
        return {"conversation_id": cid, "messages": await self._read(self.reads.messages(cid))}

    async def state(self, request: Request[Any, Any, Any], conversation_id: str) -> dict[str, Any]:
        cid = await self.own(self.principal(request), conversation_id)
        return {"conversation_id": cid, "runs": await self._read(self.reads.runs(cid))}

    async def usage(self, request: Request[Any, Any, Any]) -> dict[str, Any]:
        p = self.principal(request)
        result: dict[str, Any] = await self._read(self.reads.usage(p.project))
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
        p = self.principal(request)
        last_id = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
        watch = await self.watch(p, conversation_id, last_id)
        self.sse_connections.inc()
        # A client that stops reading leaves the stream suspended in a send, where its own
        # cleanup never runs; edge.HttpEdge calls this instead.
        scope = cast(dict[str, Any], request.scope)
        scope[ON_SEND_TIMEOUT] = lambda: self._end_sse(watch, slow=True)
        return ServerSentEvent(self._stream(watch))

    async def watch(self, p: core.Principal, conversation_id: str, last_id: str | None) -> Watch:
        """A push stream of a conversation the caller may watch, with what it missed replayed.

        Shared by SSE and WebSocket, so both carry the same events with the same resume rules.
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
                replay = await self._replay(p, cid, last_id)
                live = core.LiveFilter(replay, queue.qsize())
        except BaseException:
            self.hub.leave(key, queue)
            raise
        return Watch(cid, key, p, queue, replay, live, pending=not owned)

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

    async def _replay(self, p: core.Principal, cid: str, last_id: str) -> list[core.Push]:
        """What a client that last saw ``last_id`` missed (everything, for an unknown id)."""
        pos = core.parse_event_id(last_id)
        # The database first, the token log second: an answer stored before the read has all
        # its tokens in the log by the time the log is read.
        try:
            messages = await self.reads.messages(cid)
            runs = await self.reads.runs(cid)
        except UNAVAILABLE as exc:
            raise core.ApiError(
                503, "database_unavailable", "conversation store unavailable, retry"
            ) from exc
        try:
            deltas = await self.tokens.deltas(p.project, cid)
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            raise _broker_unavailable() from exc
        events = core.timeline(cid, messages, runs, deltas)
        missed = core.resume(events, pos, runs)
        self.sse_resumes.labels(str(pos is not None and len(missed) < len(events)).lower()).inc()
        return missed

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
        "/api/conversations/{conversation_id:str}/messages",
        summary="Messages in order",
        **openapi.doc(400, 404, 503, params=cid),
    )
    async def messages(
        request: Request[Any, Any, Any], conversation_id: FromPath[str]
    ) -> dict[str, Any]:
        return await api.messages(request, conversation_id)

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

    @get(
        "/api/usage",
        summary="The caller's project token and cost totals",
        **openapi.doc(503),
    )
    async def usage(request: Request[Any, Any, Any]) -> dict[str, Any]:
        return await api.usage(request)

    return [chat, messages, state, events, cancel, usage]

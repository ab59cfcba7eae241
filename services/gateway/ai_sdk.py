"""The AI SDK's chat protocol (``ai`` 7: ``useChat`` with ``DefaultChatTransport``) on baton.

``POST /api/ai-sdk/chat`` takes the transport's body (``id``: the chat, ``messages``: the UI
messages, the last one the user's new message), submits that message exactly like
``POST /api/chat`` with the UI message's id as its Idempotency-Key, and answers with the UI
message stream (SSE, ``x-vercel-ai-ui-message-stream: v1``) of its run. The reconnect request,
``GET /api/ai-sdk/chat/{chat id}/stream``, answers the active run's stream from its start (the
transport's ``resumeStreamIsReplay``: the client rebuilds the message from the replay, so no word
is missing or repeated) or 204 when nothing runs. Both read the run through ``Api.watch``, the
same replay-then-live path as the SSE events route: the hub is joined before JetStream and the
database are read, so nothing falls between the two.

How baton's events map to the protocol's parts (docs/clients.md):
``run.status`` → a transient ``data-baton-status`` part; a run's tokens → ``text-start`` /
``text-delta``; a retry (a newer attempt) → ``reset-step`` and a new step, so the partial text of
the failed attempt goes; ``message.completed`` → the rest of the stored text, ``text-end``,
``finish``; ``run.failed`` → ``error`` (the failure notice) and ``finish`` (``error``); a
cancelled run → ``abort``; ``tool.requested`` → ``tool-input-available`` and
``tool-approval-request`` (its descriptor names baton's approvals route, which is how an app
answers); ``tool.result`` → ``tool-output-available`` / ``-denied`` / ``-error`` (an auto call's
part starts at its result, with ``tool-input-start``); the next round's model call → a new step.
"""

from __future__ import annotations

import asyncio
import hmac
import math
from collections.abc import AsyncGenerator
from typing import Any, cast

import msgspec
from litestar import Request, Response, get, post
from litestar.params import FromPath
from litestar.response import Stream

from services.gateway import auth, core, openapi
from services.gateway.adapters import PushEvent
from services.gateway.edge import ON_SEND_TIMEOUT
from services.gateway.handlers import Api, Watch
from shared import runs as vocab
from shared.db import UNAVAILABLE

HEADERS = {
    "x-vercel-ai-ui-message-stream": "v1",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}
CHAT_LABEL = "baton ai-sdk chat v1"
MAX_CHAT_ID = 200
_VISIBLE = core._VISIBLE_ASCII


class UIMessage(msgspec.Struct):
    """A UI message as the SDK sends it (unknown fields, e.g. ``metadata``, are kept out)."""

    id: str
    role: str
    parts: list[dict[str, Any]] = []


class ChatBody(msgspec.Struct):
    """``DefaultChatTransport``'s request body (more fields from ``body:`` are ignored)."""

    id: str
    messages: list[UIMessage]
    trigger: str = "submit-message"
    messageId: str | None = None  # the SDK's field name


_body = msgspec.json.Decoder(ChatBody)


def parse_body(raw: bytes) -> tuple[str, UIMessage, str]:
    """(chat id, the new user message, its text) of a submit; ApiError 400/422 otherwise."""
    if not raw.strip():
        raise core.ApiError(400, "invalid_body", "request body is empty; expected a JSON object")
    try:
        body = _body.decode(raw)
    except msgspec.ValidationError as exc:
        raise core.ApiError(400, "invalid_body", f"invalid request body: {exc}") from exc
    except (msgspec.DecodeError, UnicodeDecodeError):
        raise core.ApiError(400, "invalid_json", "request body is not valid JSON") from None
    chat_id = check_chat_id(body.id)
    if body.trigger != "submit-message":
        raise core.ApiError(
            422, "unsupported_trigger", "only trigger 'submit-message' is supported"
        )
    if not body.messages or body.messages[-1].role != "user":
        raise core.ApiError(422, "no_user_message", "the last message must be the user's")
    last = body.messages[-1]
    texts = [p.get("text", "") for p in last.parts if p.get("type") == "text"]
    if not all(isinstance(t, str) for t in texts):
        raise core.ApiError(400, "invalid_body", "a text part's text must be a string")
    return chat_id, last, "\n".join(cast(list[str], texts))


def check_chat_id(chat_id: str) -> str:
    if not 0 < len(chat_id) <= MAX_CHAT_ID or _VISIBLE.fullmatch(chat_id) is None:
        raise core.ApiError(
            400, "invalid_id", f"chat id must be 1..{MAX_CHAT_ID} visible ASCII characters"
        )
    return chat_id


def conversation_of(p: core.Principal, chat_id: str, secret: bytes) -> str:
    """The conversation a chat id names: itself when it is a UUID, else a keyed id of the
    caller's (so ``useChat``'s generated ids work, and the same id of another user is another
    conversation)."""
    try:
        return core.parse_uuid(chat_id, "chat id")
    except core.ApiError:
        pass
    raw = f"{CHAT_LABEL}\n{p.project}\n{p.user}\n{chat_id}".encode()
    return core._v8(hmac.digest(secret, raw, "sha256")[:16])


def sse(part: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(part) + b"\n\n"


DONE = b"data: [DONE]\n\n"
_IDLE = PushEvent("heartbeat", "", {})  # no event within a heartbeat interval


class Parts:
    """Turns one run's push events into UI message chunks (one instance per response)."""

    def __init__(self, run_id: str, conversation_id: str = "") -> None:
        self.run_id = run_id
        self.conversation_id = conversation_id
        self.calls: dict[str, str] = {}  # tool call id -> "input" | "approval" | "done"
        self.tools_in_step = False  # the step holds tool parts: a new attempt is a new step
        self.attempt = -1
        self.seq = -1
        self.text = ""  # of the current attempt, as sent
        self.open = False
        self.ended = False

    def begin(self) -> list[dict[str, Any]]:
        return [{"type": "start", "messageId": self.run_id}, {"type": "start-step"}]

    def _text_id(self) -> str:
        return f"{self.run_id}:{self.attempt}"

    def _new_attempt(self, attempt: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.tools_in_step:  # the next round's model call: the tool step stays
            out += [*self._close(), {"type": "finish-step"}, {"type": "start-step"}]
            self.tools_in_step = False
        elif self.attempt >= 0 and (self.text or self.open):
            out += self._close()
            out += [{"type": "reset-step"}, {"type": "start-step"}]
        self.attempt, self.seq, self.text = attempt, -1, ""
        return out

    def _close(self) -> list[dict[str, Any]]:
        if not self.open:
            return []
        self.open = False
        return [{"type": "text-end", "id": self._text_id()}]

    def _delta(self, text: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if not self.open:
            self.open = True
            out.append({"type": "text-start", "id": self._text_id()})
        self.text += text
        out.append({"type": "text-delta", "id": self._text_id(), "delta": text})
        return out

    def on(self, event: str, data: dict[str, Any]) -> list[dict[str, Any]]:
        if self.ended or data.get("run_id") != self.run_id:
            return []
        if event == "token":
            attempt, seq = int(data["attempt"]), int(data["seq"])
            out = self._new_attempt(attempt) if attempt > self.attempt else []
            if attempt < self.attempt or seq <= self.seq:
                return out  # a late token of a replaced attempt, or one already sent
            self.seq = seq
            return out + self._delta(str(data["text"]))
        if event == "run.status":
            status = str(data["status"])
            out = []
            if status == "running" and int(data["attempt"]) > self.attempt:
                out = self._new_attempt(int(data["attempt"]))
            part = {"status": status, "attempt": data["attempt"], "reason": data.get("reason")}
            out.append({"type": "data-baton-status", "data": part, "transient": True})
            if status == "cancelled":
                self.ended = True
                out += [
                    *self._close(),
                    {"type": "finish-step"},
                    {"type": "abort", "reason": status},
                ]
            return out
        if event == "message.completed":
            content = str(data["content"])
            out = []
            if content.startswith(self.text):
                rest = content[len(self.text) :]
                out += self._delta(rest) if rest or not self.open else []
            else:  # what streamed is not what was stored: the stored text wins
                out += [*self._close(), {"type": "reset-step"}, {"type": "start-step"}]
                self.text = ""
                out += self._delta(content)
            self.ended = True
            return [*out, *self._close(), {"type": "finish-step"}, _finish("stop")]
        if event == "tool.requested":
            return self._requested(data)
        if event == "tool.result":
            return self._result(data)
        if event == "run.failed":
            self.ended = True
            notice = {"type": "error", "errorText": str(data["content"])}
            return [*self._close(), notice, {"type": "finish-step"}, _finish("error")]
        return []

    def _tool(self, data: dict[str, Any]) -> dict[str, Any]:
        # dynamic: the app does not declare baton's tools; providerExecuted: baton runs them
        return {"toolCallId": str(data["tool_call_id"]), "dynamic": True, "providerExecuted": True}

    def _requested(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        """An "ask" call: its input, then the approval request (approved through baton's
        approvals route; the descriptor says where and with what)."""
        call = str(data["tool_call_id"])
        if call in self.calls:
            return []
        self.calls[call] = "approval"
        self.tools_in_step = True
        descriptor = {
            "conversation_id": self.conversation_id,
            "run_id": self.run_id,
            "tool_call_id": call,
            "server": data.get("server"),
            "input_digest": data.get("input_digest"),
            "expires_at": data.get("expires_at"),
            "approvals_url": f"/api/conversations/{self.conversation_id}/runs/{self.run_id}"
            "/tool-approvals",
        }
        return [
            *self._close(),
            {
                "type": "tool-input-available",
                **self._tool(data),
                "toolName": str(data["tool"]),
                "input": data.get("arguments"),
            },
            {
                "type": "tool-approval-request",
                "approvalId": call,
                "toolCallId": call,
                "approvalDescriptor": descriptor,
            },
        ]

    def _result(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        """A call's stored result. An "auto" call was never requested: its part starts here,
        without input (baton's events do not carry an auto call's arguments)."""
        call = str(data["tool_call_id"])
        seen = self.calls.get(call)
        if seen == "done":
            return []
        self.calls[call] = "done"
        self.tools_in_step = True
        out = self._close()
        if seen is None:
            out.append(
                {"type": "tool-input-start", **self._tool(data), "toolName": str(data["tool"])}
            )
        content = str(data.get("content", ""))
        if not data.get("is_error"):
            out.append({"type": "tool-output-available", **self._tool(data), "output": content})
        elif seen == "approval" and data.get("outcome") == "denied":
            out.append({"type": "tool-output-denied", "toolCallId": call})
        else:
            out.append({"type": "tool-output-error", **self._tool(data), "errorText": content})
        return out


def _finish(reason: str) -> dict[str, Any]:
    return {"type": "finish", "finishReason": reason}


async def _parts(api: Api, w: Watch, run_id: str, cid: str) -> AsyncGenerator[bytes, None]:
    parts = Parts(run_id, cid)
    api.stream_clients.labels("ai-sdk").inc()
    try:
        for part in parts.begin():
            yield sse(part)
        for event, _, data in w.replay:
            for part in parts.on(event, data):
                yield sse(part)
        loop = asyncio.get_running_loop()
        max_s = api.settings.sse_max_s
        ends = loop.time() + max_s if max_s > 0 else math.inf
        while not parts.ended:
            left = ends - loop.time()
            if left <= 0:
                return  # bounded streams (GATEWAY_SSE_MAX_S): the client reconnects
            try:
                ev = await asyncio.wait_for(w.queue.get(), min(api.settings.sse_heartbeat_s, left))
            except TimeoutError:
                ev = _IDLE
            try:
                await api.still_allowed(w)
            except core.ApiError:
                return  # the key was revoked: a reconnect gets the 401
            if ev is _IDLE:
                yield b": keep-alive\n\n"
                continue
            if ev is None:
                return  # the gateway stops: the client reconnects (GET …/stream)
            if w.pending:
                try:
                    if not await api.claim(w):
                        continue
                except core.ApiError:
                    return
            if w.live.fresh(ev.event, ev.id, ev.data):
                for part in parts.on(ev.event, ev.data):
                    yield sse(part)
        yield DONE
    finally:
        api.stream_clients.labels("ai-sdk").dec()
        _end(api, w)


def _end(api: Api, w: Watch, slow: bool = False) -> None:
    if w.ended:
        return
    w.ended = True
    if slow:
        api.hub.drop(w.topic, w.queue)
    api.hub.leave(w.topic, w.queue)


def _stream(request: Request[Any, Any, Any], api: Api, w: Watch, run_id: str, cid: str) -> Stream:
    scope = cast(dict[str, Any], request.scope)
    scope[ON_SEND_TIMEOUT] = lambda: _end(api, w, slow=True)
    return Stream(
        _parts(api, w, run_id, cid),
        media_type="text/event-stream",
        headers=HEADERS,
        status_code=200,
    )


async def _active_run(api: Api, p: core.Principal, cid: str) -> str | None:
    """The user message whose run is still going (its answer not stored), if any."""
    try:
        messages = await api.reads.messages(cid)
        runs = {r["run_id"]: r for r in await api.reads.runs(cid)}
        pending = await api._unread(p, cid, messages)
    except UNAVAILABLE as exc:
        raise core.ApiError(503, "database_unavailable", "read model unavailable, retry") from exc
    merged = core.merge_pending(messages, pending)
    users = [x for x in merged if x["role"] == "user"]
    if not users:
        return None
    last = users[-1]
    run_id = vocab.run_id(last["id"])
    replied = any(x["role"] == "assistant" and x.get("run_id") == run_id for x in merged)
    run = runs.get(run_id)
    if replied or (run is not None and run["status"] in core.FINAL_STATUSES):
        return None
    return str(last["id"])


def routes(api: Api) -> list[Any]:
    """The two routes of the protocol, bound to one Api instance."""

    @post(
        "/api/ai-sdk/chat",
        status_code=200,
        summary="AI SDK chat (useChat / DefaultChatTransport): submit, answer as a UI message stream",
        **openapi.doc(
            400,
            404,
            413,
            422,
            429,
            503,
            body=chat_body(api.settings.max_idempotency_key_chars, api.settings.max_content_chars),
            success={200: UI_STREAM},
        ),
    )
    async def chat(request: Request[Any, Any, Any]) -> Stream:
        credentials = auth.Credentials.of(request.headers)
        p = await api.principals.authenticate(credentials)
        chat_id, message, text = parse_body(await request.body())
        key = core.check_idempotency_key(message.id, api.settings.max_idempotency_key_chars)
        cid = conversation_of(p, chat_id, api.id_key)
        body = msgspec.json.encode({"content": text, "conversation_id": cid})
        accepted, _ = await api.submit(credentials, key, body)
        message_id = accepted.message.id
        watch = await api.watch(p, cid, f"msg:{message_id}", credentials)
        return _stream(request, api, watch, vocab.run_id(message_id), cid)

    @get(
        "/api/ai-sdk/chat/{chat_id:str}/stream",
        summary="AI SDK reconnect: the active run's UI message stream from its start, or 204",
        **openapi.doc(
            400,
            404,
            503,
            params={"chat_id": CHAT_ID},
            success={200: UI_STREAM, 204: {"description": "No run is active in this chat"}},
        ),
    )
    async def resume(request: Request[Any, Any, Any], chat_id: FromPath[str]) -> Any:
        p = await api.principal(request)
        cid = conversation_of(p, check_chat_id(chat_id), api.id_key)
        if not core.may_watch(await api.owners.of(cid), p):
            return Response(None, status_code=204)  # nobody's yet: nothing runs
        message_id = await _active_run(api, p, cid)
        if message_id is None:
            return Response(None, status_code=204)
        watch = await api.watch(p, cid, f"msg:{message_id}", auth.Credentials.of(request.headers))
        return _stream(request, api, watch, vocab.run_id(message_id), cid)

    return [chat, resume]


CHAT_ID: dict[str, Any] = {
    "type": "string",
    "pattern": rf"^[\x21-\x7e]{{1,{MAX_CHAT_ID}}}$",
    "description": "the chat's id: a conversation's UUID, or any id of the client's (useChat's "
    "generated ones) mapped to a conversation of the caller's own",
}


def chat_body(max_key_chars: int, max_chars: int) -> dict[str, Any]:
    """The request body as ``parse_body`` takes it (more fields are allowed and ignored)."""
    return {
        "type": "object",
        "required": ["id", "messages"],
        "properties": {
            "id": CHAT_ID,
            "messages": {
                "type": "array",
                "minItems": 1,
                "description": "UI messages; the last is the user's new one (its id is the "
                "Idempotency-Key: a resend is the same message)",
                "items": {
                    "type": "object",
                    "required": ["id", "role", "parts"],
                    "properties": {
                        "id": {"type": "string", "pattern": rf"^[\x21-\x7e]{{1,{max_key_chars}}}$"},
                        "role": {"type": "string", "enum": ["user", "assistant", "system"]},
                        "parts": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["type"],
                                "properties": {
                                    "type": {"type": "string"},
                                    "text": {"type": "string", "maxLength": max_chars},
                                },
                            },
                        },
                    },
                },
            },
            "trigger": {"type": "string", "enum": ["submit-message"]},
            "messageId": {"type": ["string", "null"]},
        },
    }


UI_STREAM: dict[str, Any] = {
    "description": "The AI SDK UI message stream (`x-vercel-ai-ui-message-stream: v1`): "
    "`data:` lines of start, start-step, text-start, text-delta, text-end, finish-step, finish, "
    "error, abort, tool-input-start, tool-input-available, tool-approval-request, "
    "tool-output-available, tool-output-denied, tool-output-error and transient "
    "data-baton-status parts, then `data: [DONE]`",
    "headers": {
        "x-vercel-ai-ui-message-stream": {"schema": {"type": "string", "enum": ["v1"]}},
    },
    "content": {
        "text/event-stream": {
            "schema": {"type": "object", "properties": {"data": {"type": "string"}}}
        }
    },
}

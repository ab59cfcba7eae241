"""Pure gateway logic: request bodies to events, ids, ownership, push events (tokens: auth.py)."""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

import msgspec

from shared import messages as m
from shared import runs as vocab
from shared import subjects

# What the keyed-id secret is derived from the JWT secret with, when none is configured.
ID_KEY_LABEL = b"baton keyed ids v1"


class ApiError(Exception):
    """An HTTP error with a stable machine-readable code and a message for people."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra or {}  # more fields of the error object, e.g. a run's status


# Policy's window keys (shared.ratelimit.WINDOWS) by their names in the RateLimit headers.
RATE_WINDOW_NAMES = {"m": "minute", "h": "hour"}


class RateQuota(msgspec.Struct, frozen=True, kw_only=True):
    """One of policy's fixed rate windows as the gateway last read it."""

    name: str  # "minute", "hour": the policy item's key in RateLimit-Policy / RateLimit
    window_s: int
    limit: int
    used: int
    ends_at: float  # epoch seconds

    @property
    def full(self) -> bool:
        return self.used >= self.limit

    def reset(self, now: float) -> int:
        """Whole seconds until the window ends (at least 1)."""
        return max(1, math.ceil(self.ends_at - now))


class RateState(msgspec.Struct, frozen=True):
    """A user's known rate windows; empty when none is known (or reading them failed)."""

    quotas: tuple[RateQuota, ...]

    def current(self, now: float) -> RateState:
        """Without windows that have ended."""
        return RateState(tuple(q for q in self.quotas if q.ends_at > now))

    def blocked_until(self) -> float:
        return max((q.ends_at for q in self.quotas if q.full), default=0.0)

    def retry_after(self, now: float) -> int | None:
        until = self.blocked_until()
        return max(1, math.ceil(until - now)) if until > now else None

    def tightest(self, now: float) -> RateQuota | None:
        """The window that blocks longest when blocked; else the one with the least room."""
        full = [q for q in self.quotas if q.full and q.ends_at > now]
        if full:
            return max(full, key=lambda q: q.ends_at)
        return min(self.quotas, key=lambda q: (q.limit - q.used, q.ends_at), default=None)

    def headers(self, now: float, spent: int = 0) -> dict[str, str]:
        """``RateLimit-Policy`` and ``RateLimit`` (draft-ietf-httpapi-ratelimit-headers-10).

        ``spent``: messages to count beyond what the windows hold (1 for the one just accepted,
        which policy has not counted yet).
        """
        if not self.quotas:
            return {}
        policy = ", ".join(f'"{q.name}";q={q.limit};w={q.window_s}' for q in self.quotas)
        left = ", ".join(
            f'"{q.name}";r={max(0, q.limit - q.used - spent)};t={q.reset(now)}' for q in self.quotas
        )
        return {"RateLimit-Policy": policy, "RateLimit": left}


def rate_limited(state: RateState, now: float) -> ApiError | None:
    """The ``429`` for a user over a window: when to retry, in the body and in headers."""
    retry = state.retry_after(now)
    q = state.tightest(now)
    if retry is None or q is None:
        return None
    headers = {"Retry-After": str(retry), **state.headers(now)}
    extra: dict[str, Any] = {
        "limit": q.limit,
        "remaining": 0,
        "reset": q.reset(now),
        "retry_after": retry,
        "window": q.name,
    }
    return ApiError(429, "rate_limited", f"too many messages; retry in {retry} s", headers, extra)


class Principal(msgspec.Struct, frozen=True):
    project: str
    user: str


class ChatRequest(msgspec.Struct, forbid_unknown_fields=True):
    content: str
    conversation_id: str | None = None


class MessageOut(msgspec.Struct, omit_defaults=True):
    id: str
    conversation_id: str
    role: str
    content: str
    created_at: datetime
    run_id: str | None = None


class ChatAccepted(msgspec.Struct):
    status: str
    duplicate: bool
    message: MessageOut


_chat_decoder = msgspec.json.Decoder(ChatRequest)


def parse_chat(body: bytes, max_chars: int) -> ChatRequest:
    if not body.strip():
        raise ApiError(400, "invalid_body", "request body is empty; expected a JSON object")
    try:
        req = _chat_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise ApiError(400, "invalid_body", f"invalid request body: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc}") from exc
    except UnicodeDecodeError:
        # Its repr quotes the bytes around the fault, the content: neither chained nor quoted.
        raise ApiError(400, "invalid_json", "request body is not valid UTF-8") from None
    if not req.content.strip():
        raise ApiError(422, "empty_content", "content must not be empty")
    if len(req.content) > max_chars:
        raise ApiError(413, "content_too_large", f"content exceeds {max_chars} characters")
    if "\x00" in req.content:
        raise ApiError(422, "invalid_content", "content must not contain NUL characters")
    if req.conversation_id is not None:
        req.conversation_id = parse_uuid(req.conversation_id, "conversation_id")
    return req


# The 36-character form (any case), as JSON Schema's "uuid" format: uuid.UUID alone also takes
# braces, a urn: prefix and 32 bare hex digits, none of which the API document allows.
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def parse_uuid(value: object, name: str) -> str:
    """The canonical (lower-case) form of a UUID id; ``400 invalid_id`` for anything else.

    One rule for every id a client sends, in a path or a body, on every route.
    """
    if not isinstance(value, str) or _UUID.fullmatch(value) is None:
        raise ApiError(400, "invalid_id", f"{name} must be a UUID")
    return str(uuid.UUID(value))


FINAL_STATUSES = vocab.TERMINAL


def parse_cancel_ids(conversation_id: str, run_id: str) -> tuple[str, str, str]:
    """(conversation id, run id, message id) of a cancel request; 400 for anything malformed."""
    cid = parse_uuid(conversation_id, "conversation id")
    message_id = vocab.message_of(run_id)
    if message_id is None:
        raise ApiError(400, "invalid_id", "run id must look like run-<message uuid>")
    return cid, run_id, message_id


_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")


def check_idempotency_key(key: str | None, max_chars: int) -> str | None:
    """The key as given, if it is 1..``max_chars`` visible ASCII characters (0x21-0x7E).

    Both routes read header bytes as latin-1, one character per byte, so this is a rule on the
    bytes: a UTF-8 or latin-1 key is refused, never stored as something the client did not send.
    """
    if key is None:
        return None
    if not key or len(key) > max_chars:
        raise ApiError(
            400, "invalid_idempotency_key", f"Idempotency-Key must be 1..{max_chars} characters"
        )
    if _VISIBLE_ASCII.fullmatch(key) is None:
        raise ApiError(
            400,
            "invalid_idempotency_key",
            "Idempotency-Key must be visible ASCII characters (0x21-0x7E), no spaces",
        )
    return key


def content_hash(conversation_id: str | None, content: str) -> str:
    """What makes two submits with one key the same submit."""
    raw = f"{conversation_id or ''}\n{content}".encode()
    return hashlib.sha256(raw).hexdigest()


def id_key(jwt_secret: str, id_secret: str = "") -> bytes:
    """The key of keyed ids: the configured id secret, else one derived from the JWT secret.

    Derived, so every gateway replica of a deployment agrees without a new setting; never the
    JWT secret itself, so an id reveals nothing usable about the token key.
    """
    if id_secret:
        return id_secret.encode()
    return hmac.digest(jwt_secret.encode(), ID_KEY_LABEL, "sha256")


def ids_for(
    p: Principal, key: str | None, conversation_id: str | None, secret: bytes
) -> tuple[str, str]:
    """Message and conversation ids; deterministic when the client gives an Idempotency-Key.

    Keyed ids are an HMAC-SHA256 of (project, user, key) under a server secret, so a retry
    maps to the same ids and nobody without the secret can compute anyone's ids (I9).
    """
    if key is None:
        message_id, new_conversation = random_uuids()
        return message_id, conversation_id or new_conversation
    # Project and user are [A-Za-z0-9_-] and a key is printable: the newlines are unambiguous.
    digest = hmac.digest(secret, f"{p.project}\n{p.user}\n{key}".encode(), "sha256")
    message_id = _v8(digest[:16])
    return message_id, conversation_id or _v8(digest[16:])


_VERSION_CLEAR = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
_V4_SET = (0x4000 << 64) | (0x8000 << 48)  # version 4, RFC 4122 variant
_V8_SET = (0x8000 << 64) | (0x8000 << 48)  # version 8 (RFC 9562: custom), RFC 4122 variant


def random_uuids() -> tuple[str, str]:
    """Two random (version 4) UUIDs from one read of the OS's randomness, as strings.

    The same as two ``str(uuid.uuid4())`` at a third of the cost: one system call, no objects.
    """
    raw = secrets.token_bytes(32)
    return _v4(raw[:16]), _v4(raw[16:])


def _v4(raw: bytes) -> str:
    return _formatted(int.from_bytes(raw) & _VERSION_CLEAR | _V4_SET)


def _v8(raw: bytes) -> str:
    """A version 8 UUID of 16 bytes of a MAC (122 of its bits kept)."""
    return _formatted(int.from_bytes(raw) & _VERSION_CLEAR | _V8_SET)


def _formatted(value: int) -> str:
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# ---- who may watch and post into a conversation (I9) ---------------------------------------


class Ownership(msgspec.Struct, frozen=True):
    """Who owns a conversation, as far as the database and CHAT_IN could tell.

    ``owner`` None with ``known`` True: both reads answered and nobody owns it yet. ``known``
    False: a read failed and the other found no owner, so nobody can say (never an allow).
    """

    owner: Principal | None = None
    known: bool = True
    deleted: bool = False  # the owner deleted it: every read and post is 404 from now on


NOT_FOUND = "conversation not found"


def may_watch(o: Ownership, p: Principal) -> bool:
    """Whether a push stream may open: True for the caller's own conversation, False for one
    nobody owns yet (it opens, but sends no event before the conversation is the caller's);
    404 for someone else's or a deleted one (a resume replays nothing), 503 when it cannot be
    told.
    """
    if o.deleted:
        raise ApiError(404, "not_found", NOT_FOUND)
    if o.owner == p:
        return True
    if o.owner is not None:
        raise ApiError(404, "not_found", NOT_FOUND)
    if not o.known:
        raise _owner_unknown()
    return False


def may_read(o: Ownership, p: Principal) -> None:
    """Reads and cancels: the caller's own conversation only (404 also for nobody's, and for
    a deleted one)."""
    if o.owner == p and not o.deleted:
        return
    if o.owner is None and not o.known:
        raise _owner_unknown()
    raise ApiError(404, "not_found", NOT_FOUND)


def may_post(o: Ownership, p: Principal) -> None:
    """Posting into a given conversation id: the caller's own, or a new one nobody owns yet.

    Someone else's is 404; one that cannot be told is 503 with Retry-After, never a 202 the
    persister would then refuse (I1).
    """
    if (o.owner is not None and o.owner != p) or o.deleted:
        # A deleted conversation's id is never taken again (its content cannot come back).
        raise ApiError(404, "not_found", NOT_FOUND)
    if o.owner is None and not o.known:
        raise _owner_unknown()


def _owner_unknown() -> ApiError:
    return ApiError(
        503,
        "database_unavailable",
        "conversation store unavailable, retry",
        {"Retry-After": "1"},
    )


# ---- read your writes: accepted messages not stored yet ---------------------------------


def pending_message(e: m.UserMessageAccepted) -> dict[str, Any]:
    """An accepted, not yet stored user message as the messages route shows it."""
    return {
        "id": e.message_id,
        "role": "user",
        "kind": "message",
        "content": e.content,
        "created_at": e.created_at,
        "run_id": None,
        "pending": True,
    }


def unstored(
    accepted: list[m.UserMessageAccepted], stored: set[str], conversation_id: str, owner: Principal
) -> list[m.UserMessageAccepted]:
    """The accepted messages the database does not hold yet, once each, in stream order.

    Only the owner's (the persister refuses anyone else's message into this conversation).
    """
    seen: set[str] = set()
    out: list[m.UserMessageAccepted] = []
    for e in accepted:
        if e.message_id in stored or e.message_id in seen:
            continue
        if (e.conversation_id, e.project_id, e.user_id) != (
            conversation_id,
            owner.project,
            owner.user,
        ):
            continue
        seen.add(e.message_id)
        out.append(e)
    return out


def merge_pending(
    messages: list[dict[str, Any]], pending: list[m.UserMessageAccepted]
) -> list[dict[str, Any]]:
    """Stored messages with the pending ones in their place (by acceptance time, stably)."""
    if not pending:
        return messages
    extra = [pending_message(e) for e in pending]
    return sorted([*messages, *extra], key=lambda x: x["created_at"])


def pending_run(e: m.UserMessageAccepted) -> dict[str, Any]:
    """The run an accepted, not yet stored message will start, as the state route shows it."""
    return {
        "run_id": run_id_of(e.message_id),
        "message_id": e.message_id,
        "status": "pending",
        "verdict": "",
        "reason": "",
        "model": "",
        "executor": "",
        "attempts": 0,
        "estimated_tokens": 0,
        "reserved_tokens": 0,
        "reserved_cost_usd": 0.0,
        "actual_tokens": 0,
        "limits": None,
        "created_at": e.created_at,
        "updated_at": e.created_at,
        "usage": {
            "input_tokens": 0,
            "output_tokens": 0,
            "cache_read_tokens": 0,
            "cache_write_tokens": 0,
            "cost_usd": 0.0,
            "calls": 0,
        },
    }


def accepted(e: m.UserMessageAccepted, duplicate: bool) -> ChatAccepted:
    return ChatAccepted(
        status="accepted",
        duplicate=duplicate,
        message=MessageOut(
            id=e.message_id,
            conversation_id=e.conversation_id,
            role="user",
            content=e.content,
            created_at=e.created_at,
        ),
    )


def push_event(subject: str, data: bytes) -> tuple[str, str, dict[str, Any]] | None:
    """A bus message as an SSE (event name, id, payload); None for what clients never see."""
    if subject.startswith(subjects.PREFIX_TOKENS):
        return token_push(msgspec.json.decode(data, type=m.TokenDelta))
    if subject.startswith(subjects.PREFIX_PERSISTED_USER):
        u = msgspec.json.decode(data, type=m.UserMessagePersisted)
        return (
            "message.created",
            f"msg:{u.message_id}",
            {
                "id": u.message_id,
                "conversation_id": u.conversation_id,
                "role": "user",
                "content": u.content,
                "created_at": u.created_at.isoformat(),
            },
        )
    if subject.startswith(subjects.PREFIX_PERSISTED_ASSISTANT):
        a = msgspec.json.decode(data, type=m.AssistantMessagePersisted)
        # Every run ends with exactly one of these two events: its answer or its failure notice.
        return (
            "run.failed" if a.kind == "failure" else "message.completed",
            f"msg:{a.message_id}",
            {
                "id": a.message_id,
                "conversation_id": a.conversation_id,
                "run_id": a.run_id,
                "role": "assistant",
                "kind": a.kind,
                "status": a.status,
                "content": a.content,
                "created_at": a.created_at.isoformat(),
            },
        )
    if subject.startswith(subjects.PREFIX_TOOL_REQUESTED):
        return requested_push(msgspec.json.decode(data, type=m.ToolApprovalRequested))
    if subject.startswith(subjects.PREFIX_PERSISTED_TOOL_RESULT):
        p = msgspec.json.decode(data, type=m.ToolResultPersisted)
        return result_push(p.result, p.message_id)
    if subject.startswith(subjects.PREFIX_VERDICT):
        v = msgspec.json.decode(data, type=m.RunVerdict)
        return (
            "run.status",
            f"run:{v.run_id}:{v.attempt}:{v.status}",
            {
                "run_id": v.run_id,
                "message_id": v.message_id,
                "status": v.status,
                "verdict": v.verdict,
                "reason": v.reason,
                "attempt": v.attempt,
                "model": v.model,
            },
        )
    return None


# ---- tool calls: what a client is shown ------------------------------------------------------

Push = tuple[str, str, dict[str, Any]]
TOOL_EVENTS = ("tool.requested", "tool.result")


def shown_digest(r: m.ToolApprovalRequested) -> str:
    """The digest of the arguments the user is shown: what an approval binds to."""
    return m.input_digest(r.call.input)


def pending_call(r: m.ToolApprovalRequested) -> dict[str, Any]:
    """A call waiting for the user, as ``/state`` lists it and ``tool.requested`` carries it."""
    return {
        "tool_call_id": r.call.id,
        "tool": r.call.name,
        "server": r.server,
        "arguments": r.call.input,
        "input_digest": shown_digest(r),
        "round": r.round,
        "expires_at": r.expires_at.isoformat(),
    }


def tool_event_id(run_id: str, call_id: str, what: str) -> str:
    """``tool:<run id>:<tool_use id>:requested|result``."""
    return f"tool:{run_id}:{call_id}:{what}"


def requested_push(r: m.ToolApprovalRequested) -> Push:
    return (
        "tool.requested",
        tool_event_id(r.run_id, r.call.id, "requested"),
        {"run_id": r.run_id, "message_id": r.message_id, **pending_call(r)},
    )


def result_push(r: m.ToolResult, message_id: str) -> Push:
    return (
        "tool.result",
        tool_event_id(r.run_id, r.call_id, "result"),
        {
            "run_id": r.run_id,
            "message_id": message_id,
            "tool_call_id": r.call_id,
            "tool": r.name,
            "round": r.round,
            "outcome": r.outcome,
            "is_error": r.is_error,
            "content": r.content,
        },
    )


class ToolItem(msgspec.Struct, frozen=True):
    """A tool event of the timeline, with the time its bus message was stored (orders it
    against the run's tokens)."""

    run_id: str
    at: datetime
    push: Push


# ---- resume (Last-Event-ID) ----------------------------------------------------------------


class Position(msgspec.Struct, frozen=True):
    """Where a client stopped: after a message (``msg``), a run status or a token of a run."""

    kind: str  # "msg" | "run" | "tok"
    key: str  # the message id or the run id
    attempt: int = 0
    seq: int = 0
    status: str = ""
    call: str = ""  # a tool event's tool_use id (``status``: requested or result)


def parse_event_id(value: str | None) -> Position | None:
    """The position an SSE event id names; None for anything this gateway never sent."""
    if not value or len(value) > 300:
        return None
    kind, _, rest = value.partition(":")
    if kind == "msg" and rest:
        try:
            return Position("msg", str(uuid.UUID(rest)))
        except ValueError:
            return None
    if kind == "tool":
        run, _, more = rest.partition(":")
        call, _, what = more.rpartition(":")
        if vocab.message_of(run) is not None and call and what in ("requested", "result"):
            return Position("tool", run, status=what, call=call)
        return None
    parts = rest.split(":")
    # ASCII digits only: str.isdigit() is also true of "²" and "①", which int() refuses.
    if kind in ("tok", "run") and len(parts) == 3 and parts[0] and _ascii_int(parts[1]):
        if kind == "tok" and not _ascii_int(parts[2]):
            return None
        if kind == "tok":
            return Position(kind, parts[0], int(parts[1]), int(parts[2]))
        return Position(kind, parts[0], int(parts[1]), status=parts[2])
    return None


def _ascii_int(value: str) -> bool:
    return value.isascii() and value.isdigit()


def run_id_of(message_id: str) -> str:
    """The run a user message starts (see docs/decisions.md, Ids)."""
    return vocab.run_id(message_id)


def latest_tokens(deltas: list[m.TokenDelta]) -> dict[str, list[m.TokenDelta]]:
    """Per run, the tokens of its latest attempt (of its latest call, if a task was redelivered)."""
    out: dict[str, list[m.TokenDelta]] = {}
    for d in deltas:
        cur = out.get(d.run_id)
        if cur is not None and d.attempt < cur[-1].attempt:
            continue  # a late token of an attempt already superseded
        if cur is None or d.attempt > cur[-1].attempt or d.seq <= cur[-1].seq:
            out[d.run_id] = [d]  # a newer attempt, or a redelivered call starting over
        else:
            cur.append(d)
    return out


def token_push(d: m.TokenDelta) -> Push:
    return (
        "token",
        f"tok:{d.run_id}:{d.attempt}:{d.seq}",
        {"run_id": d.run_id, "attempt": d.attempt, "seq": d.seq, "text": d.text},
    )


def status_push(run: dict[str, Any], attempt: int, status: str) -> Push:
    return (
        "run.status",
        f"run:{run['run_id']}:{attempt}:{status}",
        {
            "run_id": run["run_id"],
            "message_id": run["message_id"],
            "status": status,
            "verdict": run.get("verdict") or "",
            "reason": run.get("reason") or "",
            "attempt": attempt,
            "model": run.get("model") or "",
        },
    )


def message_push(msg: dict[str, Any], conversation_id: str) -> Push:
    """A stored message as the event that announced it live."""
    created = msg["created_at"]
    created_at = created.isoformat() if isinstance(created, datetime) else str(created)
    if msg["role"] == "user":
        return (
            "message.created",
            f"msg:{msg['id']}",
            {
                "id": msg["id"],
                "conversation_id": conversation_id,
                "role": "user",
                "content": msg["content"],
                "created_at": created_at,
            },
        )
    # The status its reply ends the run with, as the live event says it (the persister's
    # ``REPLY_STATUS``): not the runs row, which the replay reads before the messages and so
    # may still say ``running`` for a reply it then finds.
    return (
        "run.failed" if msg["kind"] == "failure" else "message.completed",
        f"msg:{msg['id']}",
        {
            "id": msg["id"],
            "conversation_id": conversation_id,
            "run_id": msg["run_id"],
            "role": "assistant",
            "kind": msg["kind"],
            "status": vocab.REPLY_STATUS.get(msg["kind"], ""),
            "content": msg["content"],
            "created_at": created_at,
        },
    )


# Terminal statuses that go out live as a verdict, after the run's tokens: the timeline shows
# them at the end of the run's block while its reply (if it has one) is not stored.
ENDED_BY_STATUS = vocab.TERMINAL - {"completed"}


def timeline(
    conversation_id: str,
    messages: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    deltas: list[m.TokenDelta],
    tools: Iterable[ToolItem] = (),
    token_at: dict[str, datetime] | None = None,
) -> list[Push]:
    """The conversation as a client watching live would have seen it, latest attempts only.

    Each user message, then (for a run still in flight) its current status, then the tokens of
    its latest attempt still in CHAT_STREAM, and each reply where it was stored. A run's tool
    events (``tools``, in stream order) go before its tokens if they were stored before the
    first of them (``token_at``: per run, when its latest call's first token was stored; a
    later round's call streams after the tool calls of the round before), else after.
    """
    by_run = {r["run_id"]: r for r in runs}
    tokens = latest_tokens(deltas)
    first_token = token_at or {}
    tool_events: dict[str, list[ToolItem]] = {}
    for item in tools:
        tool_events.setdefault(item.run_id, []).append(item)
    replied = {x["run_id"] for x in messages if x["role"] == "assistant"}
    out: list[Push] = []
    for msg in messages:
        out.append(message_push(msg, conversation_id))
        if msg["role"] != "user":
            continue
        run_id = run_id_of(msg["id"])
        run = by_run.get(run_id)
        deltas_of_run = tokens.get(run_id, [])
        items = tool_events.get(run_id, [])
        started = first_token.get(run_id)
        before = [i.push for i in items if deltas_of_run and started and i.at < started]
        after = [i.push for i in items if not (deltas_of_run and started and i.at < started)]
        if run is not None and run_id not in replied and run["status"] in ENDED_BY_STATUS:
            # A run ended by a verdict with no reply stored (yet): its partial text, then the
            # status that ended it, as live (a cancel has no reply; a failure's notice is
            # stored after its verdict went out). Never the end's status before its tokens.
            out.extend(before)
            if deltas_of_run and deltas_of_run[0].attempt >= run["attempts"]:
                out.extend(token_push(d) for d in deltas_of_run)
            out.extend(after)
            out.append(status_push(run, run["attempts"], run["status"]))
            continue
        if run is not None and run_id not in replied and run["status"] == "completed":
            # Answered, with an answer the messages read did not find (the runs are read first,
            # so only a reader older than that sees this): an answer announces its run's end,
            # and policy publishes no verdict when an answer completes a run (only a redelivery
            # of the event that ended it re-emits its state, after a late answer replaced a
            # failure), so no status of it is made up here. Tokens
            # of the answer's attempt follow that attempt's ``running``, as they did live; older
            # ones are stale, as below.
            if deltas_of_run and deltas_of_run[0].attempt >= run["attempts"]:
                out.append(status_push(run, deltas_of_run[0].attempt, "running"))
                out.extend(before)
                out.extend(token_push(d) for d in deltas_of_run)
                out.extend(after)
            else:
                out.extend(i.push for i in items)
            continue
        if run is not None and run_id not in replied:
            streaming = deltas_of_run[0].attempt if deltas_of_run else 0
            if streaming > run["attempts"]:
                # The tokens of an attempt the database has not recorded yet: the status of
                # that attempt comes first, as it did live (never its tokens without it).
                out.append(status_push(run, streaming, "running"))
            else:
                out.append(status_push(run, run["attempts"], run["status"]))
            if deltas_of_run and deltas_of_run[0].attempt < run["attempts"]:
                deltas_of_run = []  # a newer attempt has started and not streamed yet
                before, after = [], [i.push for i in items]
        out.extend(before)
        out.extend(token_push(d) for d in deltas_of_run)
        out.extend(after)
    return out


# How far back a replay reads policy's verdicts: the persister's lag behind them, with room.
# A verdict it has not stored after this long is not looked for (the replay then shows the run
# as stored, as before the verdicts were read).
VERDICT_LAG_S = 600.0


def verdicts_since(
    runs: list[dict[str, Any]],
    messages: list[dict[str, Any]],
    now: datetime,
    lag_s: float = VERDICT_LAG_S,
) -> datetime | None:
    """From when a replay reads the conversation's verdicts back from POLICY: when the user
    message of the earliest run the database does not hold as ended (in flight, or no run
    stored yet) was accepted, but no earlier than ``lag_s`` ago. A run's verdicts all come
    after its message was accepted; its row's own time is when the persister stored it, which
    lags its first verdict by what this read is for. None: every run is stored as ended, and
    nothing policy published about them can be newer than what is stored."""
    accepted = {run_id_of(x["id"]): x["created_at"] for x in messages if x["role"] == "user"}
    stored = {r["run_id"] for r in runs}
    times = [
        accepted.get(r["run_id"], r["created_at"])
        for r in runs
        if r["status"] not in vocab.TERMINAL
    ]
    times += [at for run_id, at in accepted.items() if run_id not in stored]
    started: list[datetime] = [t for t in times if isinstance(t, datetime)]
    if not started:
        return None
    return max(min(started), now - timedelta(seconds=lag_s))


def with_verdicts(
    runs: list[dict[str, Any]],
    messages: list[dict[str, Any]],
    verdicts: Iterable[m.RunVerdict],
) -> list[dict[str, Any]]:
    """The runs as the persister will have stored them once it has the verdicts policy has
    published (``verdicts``: POLICY's, in stream order), by its own rules: a status moves only
    forward by rank and a terminal one is never replaced (an equal rank below them, by the
    later); attempts only grow; verdict, reason and model come from the newest verdict by
    (rank, attempt) (the persister compares with the verdict it stored those from; the fold,
    with the row's status and attempts: they differ only in the ``run.status`` details of a run
    retried past its last verdict's attempt), and a run with no model takes the first one
    named. The database lags the verdicts live clients were pushed, so a replay that
    showed only what it holds would show a run behind them: a cancel or a retry a client has
    had, or a run it has not stored at all. Such a run (no row yet, its user message among
    ``messages``) is made from its verdicts. A run stored as ended is left as stored."""
    out = {r["run_id"]: r for r in runs}
    order = [r["run_id"] for r in runs]
    asked = {run_id_of(x["id"]): x for x in messages if x["role"] == "user"}
    ended = {r["run_id"] for r in runs if r["status"] in vocab.TERMINAL}
    for v in verdicts:
        run = out.get(v.run_id)
        if run is None:
            msg = asked.get(v.run_id)
            if msg is None or msg["id"] != v.message_id:
                continue
            run = {
                "run_id": v.run_id,
                "message_id": v.message_id,
                "status": "",
                "verdict": "",
                "reason": "",
                "model": "",
                "attempts": 0,
                "created_at": msg["created_at"],
            }
            out[v.run_id] = run
            order.append(v.run_id)
        elif v.run_id in ended:
            continue
        cur, new = vocab.rank(run["status"]), vocab.rank(v.status)
        moved: dict[str, Any] = {}
        if new > cur or (new == cur and cur < vocab.rank("completed")):
            moved["status"] = v.status
        if v.verdict and (new, v.attempt) >= (cur, run["attempts"]):
            moved |= {"verdict": v.verdict, "reason": v.reason}
            if v.model:
                moved["model"] = v.model
        if v.model and not run["model"]:
            moved.setdefault("model", v.model)
        if v.attempt > run["attempts"]:
            moved["attempts"] = v.attempt
        if moved:
            out[v.run_id] = {**run, **moved}
    return [out[r] for r in order]


def latest_token_start(deltas: list[tuple[m.TokenDelta, datetime]]) -> dict[str, datetime]:
    """Per run, when the first token of its latest call (``latest_tokens``) was stored."""
    out: dict[str, datetime] = {}
    last: dict[str, m.TokenDelta] = {}
    for d, at in deltas:
        cur = last.get(d.run_id)
        if cur is not None and d.attempt < cur.attempt:
            continue
        if cur is None or d.attempt > cur.attempt or d.seq <= cur.seq:
            out[d.run_id] = at
        last[d.run_id] = d
    return out


def resume(events: list[Push], pos: Position | None, runs: list[dict[str, Any]]) -> list[Push]:
    """What a client that last saw ``pos`` missed, out of ``timeline``; all of it if unknown.

    Inside a run: the tokens after the one seen. When the run has moved on to a newer attempt,
    a ``run.status`` of that attempt comes first (the client discards its partial text), then
    every token of the newer attempt.
    """
    if pos is None:
        return events
    ids = [e[1] for e in events]
    if pos.kind == "msg":
        wanted = f"msg:{pos.key}"
        return events[ids.index(wanted) + 1 :] if wanted in ids else events
    if pos.kind == "tool":
        wanted = tool_event_id(pos.key, pos.call, pos.status)
        return events[ids.index(wanted) + 1 :] if wanted in ids else events
    start = next((i for i, e in enumerate(events) if e[1] == f"msg:{pos.key[4:]}"), None)
    if not vocab.is_run_id(pos.key) or start is None:
        return events
    status: int | None = None
    toks: list[int] = []
    tools: list[int] = []
    block_end = start + 1  # past the run's statuses, tokens and tool events
    for i in range(start + 1, len(events)):
        kind, _, data = events[i]
        if kind not in ("run.status", "token", *TOOL_EVENTS) or data["run_id"] != pos.key:
            break
        if kind == "run.status":
            status = i
        elif kind == "token":
            toks.append(i)
        else:
            tools.append(i)
        block_end = i + 1
    if pos.kind == "run" and pos.status in vocab.TERMINAL:
        # The client saw the run end: every token of it came before. The database may not
        # have stored that status yet (it lags the live verdicts); its tokens are not news.
        return events[block_end:]
    # A terminal status in the timeline is the run's end, after its tokens (``ENDED_BY_STATUS``),
    # never the header of the attempt the tokens follow: a client at a token has not seen it.
    ends = status is not None and events[status][2]["status"] in vocab.TERMINAL
    latest = events[toks[0]][2]["attempt"] if toks else 0
    if toks and latest > pos.attempt:
        if status is not None and events[status][2]["attempt"] >= latest and not ends:
            return events[status:]
        run = next((r for r in runs if r["run_id"] == pos.key), None)
        base = run or {"run_id": pos.key, "message_id": pos.key[4:]}
        return [status_push(base, latest, "running"), *events[min([*tools, *toks]) :]]
    if status is not None and events[status][2]["attempt"] > pos.attempt:
        return events[status:]  # a newer attempt that has not streamed yet
    cut = start + 1
    if (
        status is not None
        and not ends
        and (
            pos.kind == "tok"
            or events[status][1] == _run_id(pos)
            or events[status][2]["attempt"] < pos.attempt
        )
    ):
        # The client saw this status, or a token after it, or already a newer attempt's status
        # than the database has recorded (the persister stores verdicts after they went out
        # live): the older attempt's status would be a repeat, and a step back.
        cut = status + 1
    if pos.kind == "tok":
        # Each round's model call is an attempt of its own (docs/tools.md), so a token of this
        # attempt came after the tool calls of the round before: they are not sent again.
        for i in toks:
            if events[i][2]["seq"] <= pos.seq:
                cut = i + 1
    return events[cut:]


def _run_id(pos: Position) -> str:
    return f"run:{pos.key}:{pos.attempt}:{pos.status}"


def seen_before(events: list[Push], missed: list[Push], pos: Position | None) -> set[str]:
    """Ids of the statuses and messages a client at ``pos`` already got (none, for an unknown
    position): everything of the timeline before what it missed, and the status of the attempt
    whose token it names (a token always comes after its attempt's status)."""
    if pos is None:
        return set()
    left = {e[1] for e in missed}
    seen = {e[1] for e in events if e[0] != "token" and e[1] not in left}
    if pos.kind == "tok":
        seen.add(f"run:{pos.key}:{pos.attempt}:running")
    elif pos.kind == "run":
        seen.add(_run_id(pos))
    return seen


def ends_run(event: str, data: dict[str, Any]) -> bool:
    """Whether a pushed event ends its run: its reply, failure notice, or final status."""
    if event in ("message.completed", "run.failed"):
        return bool(data.get("run_id"))
    return event == "run.status" and data.get("status") in vocab.TERMINAL


def ended_runs(events: list[Push], pos: Position | None) -> set[str]:
    """The runs a client has seen end once it has the timeline's ``events`` (before its
    position, or replayed to it), and the run whose end its position names."""
    out = {data["run_id"] for kind, _, data in events if ends_run(kind, data)}
    if pos is not None and pos.kind == "run" and pos.status in vocab.TERMINAL:
        out.add(pos.key)
    return out


class LiveFilter:
    """Drops live events this connection already carried: one id, one event.

    A status or message goes out once per id, replayed or live: policy announces an attempt's
    ``running`` when it schedules the retry and again when the retry starts (and a cancel in
    flight re-announces its run), and a redelivered reply is published again. Tokens are
    checked against the replay only while the events buffered during it drain.
    """

    def __init__(
        self,
        replayed: list[Push],
        buffered: int,
        seen: Iterable[str] = (),
        ended: Iterable[str] = (),
    ) -> None:
        # ``seen``: what the client got before it reconnected (see ``seen_before``); ``ended``:
        # the runs it knows have ended (``ended_runs``).
        self.ids = {e[1] for e in replayed if e[0] != "token"} | set(seen)
        self.ended = set(ended)
        self.high: dict[str, tuple[int, int]] = {}
        for kind, _, data in replayed:
            if kind == "token":
                self.high[data["run_id"]] = (data["attempt"], data["seq"])
        self.left = buffered

    def fresh(self, event: str, event_id: str, data: dict[str, Any]) -> bool:
        buffered = self.left > 0
        self.left -= buffered
        if event != "token":
            if event_id in self.ids:
                return False
            self.ids.add(event_id)
            if ends_run(event, data):
                self.ended.add(data["run_id"])
            return True
        if data["run_id"] in self.ended:
            # Nothing of a run follows its end: a token that reaches the gateway after the run's
            # cancel (an executor still streaming until the abort reaches it) is not sent, so a
            # client's last event is never a token after the end it was shown.
            return False
        if not buffered:
            return True
        high = self.high.get(data["run_id"])
        return high is None or (data["attempt"], data["seq"]) > high


# ---- WebSocket -----------------------------------------------------------------------------

# Standard close codes; the gateway's own are 4000 + the HTTP status the same error has over HTTP
# (4400 bad frame, 4401 unauthenticated, 4404 not found, 4422 bad id, 4429 too slow, 4503 down).
WS_GOING_AWAY = 1001  # the gateway is shutting down: reconnect (elsewhere) with last_event_id
WS_UNSUPPORTED = 1003  # a binary frame: this protocol is JSON text only
WS_TOO_BIG = 1009
WS_INTERNAL = 1011
WS_SLOW = 4429  # the client fell too far behind: reconnect with last_event_id


class ClientFrame(msgspec.Struct, forbid_unknown_fields=True):
    """What a WebSocket client may send: one ``auth`` frame first (without a header), pings."""

    type: str
    token: str | None = None
    last_event_id: str | None = None


_client_frame = msgspec.json.Decoder(ClientFrame)


def ws_close_code(status: int) -> int:
    """The close code for an error that HTTP would answer with ``status``."""
    return 4000 + status if 400 <= status < 600 else WS_INTERNAL


def parse_client_frame(text: str, max_bytes: int, *, first: bool) -> ClientFrame:
    """A client frame, or ApiError (400 invalid_frame, 413 frame_too_large) saying why not."""
    if len(text.encode()) > max_bytes:
        raise ApiError(413, "frame_too_large", f"frames are limited to {max_bytes} bytes")
    try:
        frame = _client_frame.decode(text)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ApiError(400, "invalid_frame", f"frame is not a valid client frame: {exc}") from exc
    allowed = ("auth", "ping") if first else ("ping",)
    if frame.type not in allowed:
        raise ApiError(400, "invalid_frame", f"frame type must be one of {list(allowed)}")
    if frame.type == "auth" and not isinstance(frame.token, str):
        raise ApiError(401, "unauthenticated", "auth frame needs a token")
    return frame


def ws_frame(event: str, event_id: str | None, data: dict[str, Any]) -> bytes:
    """A server frame: the SSE event as JSON ``{id, event, data}``."""
    return msgspec.json.encode({"id": event_id, "event": event, "data": data})

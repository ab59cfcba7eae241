"""Pure gateway logic: tokens to principals, request bodies to events, ids, push events."""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime
from typing import Any

import jwt
import msgspec

from shared import messages as m
from shared import subjects
from shared.subjects import is_safe_token

# Ids derived from (project, user, Idempotency-Key) make a retried submit the same submit.
MESSAGE_NS = uuid.UUID("5d1c9a3e-7f0b-4c52-9d7e-3b8f6a2e4c91")
CONVERSATION_NS = uuid.UUID("a8e2f1c4-3b6d-4e9a-8c7f-1d5b2e9a6f03")


class ApiError(Exception):
    """An HTTP error with a stable machine-readable code and a message for people."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


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


def authenticate(header: str | None, secret: str) -> Principal:
    """The caller behind a ``Bearer`` JWT (HS256, claims ``sub`` and ``project``)."""
    if not header or not header.startswith("Bearer "):
        raise ApiError(401, "unauthenticated", "missing bearer token")
    try:
        claims = jwt.decode(
            header[7:].strip(),
            secret,
            algorithms=["HS256"],
            options={"require": ["sub", "project", "exp"]},
        )
    except jwt.PyJWTError as exc:
        raise ApiError(401, "unauthenticated", f"invalid token: {exc}") from exc
    user, project = claims.get("sub"), claims.get("project")
    if not (isinstance(user, str) and isinstance(project, str)):
        raise ApiError(401, "unauthenticated", "token claims sub and project must be strings")
    if not (is_safe_token(user) and is_safe_token(project)):
        raise ApiError(401, "unauthenticated", "token claims must match [A-Za-z0-9_-]{1,64}")
    return Principal(project=project, user=user)


def parse_chat(body: bytes, max_chars: int) -> ChatRequest:
    if not body.strip():
        raise ApiError(400, "invalid_body", "request body is empty; expected a JSON object")
    try:
        req = _chat_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise ApiError(400, "invalid_body", f"invalid request body: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc}") from exc
    if not req.content.strip():
        raise ApiError(422, "empty_content", "content must not be empty")
    if len(req.content) > max_chars:
        raise ApiError(413, "content_too_large", f"content exceeds {max_chars} characters")
    if "\x00" in req.content:
        raise ApiError(422, "invalid_content", "content must not contain NUL characters")
    if req.conversation_id is not None:
        req.conversation_id = parse_uuid(req.conversation_id, "conversation_id")
    return req


def parse_uuid(value: str, name: str) -> str:
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError, TypeError) as exc:
        raise ApiError(422, "invalid_id", f"{name} must be a UUID") from exc


def check_idempotency_key(key: str | None, max_chars: int) -> str | None:
    if key is None:
        return None
    if not key or len(key) > max_chars:
        raise ApiError(
            400, "invalid_idempotency_key", f"Idempotency-Key must be 1..{max_chars} characters"
        )
    if not key.isprintable():
        raise ApiError(400, "invalid_idempotency_key", "Idempotency-Key must be printable")
    return key


def content_hash(conversation_id: str | None, content: str) -> str:
    """What makes two submits with one key the same submit."""
    raw = f"{conversation_id or ''}\n{content}".encode()
    return hashlib.sha256(raw).hexdigest()


def ids_for(p: Principal, key: str | None, conversation_id: str | None) -> tuple[str, str]:
    """Message and conversation ids; deterministic when the client gives an Idempotency-Key."""
    if key is None:
        return str(uuid.uuid4()), conversation_id or str(uuid.uuid4())
    scope = f"{p.project}\n{p.user}\n{key}"
    message_id = str(uuid.uuid5(MESSAGE_NS, scope))
    return message_id, conversation_id or str(uuid.uuid5(CONVERSATION_NS, scope))


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
        d = msgspec.json.decode(data, type=m.TokenDelta)
        return (
            "token",
            f"tok:{d.run_id}:{d.attempt}:{d.seq}",
            {
                "run_id": d.run_id,
                "attempt": d.attempt,
                "seq": d.seq,
                "text": d.text,
            },
        )
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

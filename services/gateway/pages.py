"""Pure paging of conversations and messages: opaque keyset cursors, page sizes, response shapes.

A cursor is a position in an index (a time and a tie-breaker), never an offset, so a page is one
index range scan however long the conversation, and pages stay put while messages are appended.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from services.gateway.core import ApiError, parse_uuid

DEFAULT_MESSAGES = 100  # the seeds' hot window
MAX_MESSAGES = 1000
DEFAULT_CONVERSATIONS = 20
MAX_CONVERSATIONS = 100
MAX_CURSOR_CHARS = 200

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


class Message(msgspec.Struct):
    id: str
    role: str
    kind: str
    content: str
    created_at: datetime
    run_id: str | None = None
    pending: bool = False  # accepted (202) and not stored yet


class MessagesPage(msgspec.Struct):
    """``before`` / ``after``: cursors for the older and the newer page (None: nothing there
    now; ``after`` is always given for a non-empty page, to poll for what comes next)."""

    conversation_id: str
    messages: list[Message]
    before: str | None = None
    after: str | None = None
    has_older: bool = False
    has_newer: bool = False


class Settings(msgspec.Struct):
    model: str | None = None
    system_prompt: str | None = None
    # Policy's verdict on ``model`` (None: none asked for, or not decided yet); a model that is
    # not allowed is not used: the project's usual choice answers.
    model_allowed: bool | None = None
    model_reason: str = ""


class Conversation(msgspec.Struct):
    id: str
    title: str
    created_at: datetime
    last_activity_at: datetime
    message_count: int
    metadata: dict[str, Any]
    settings: Settings
    pending: bool = False  # only accepted messages so far, none stored yet


class ConversationsPage(msgspec.Struct):
    conversations: list[Conversation]
    cursor: str | None = None  # the next page (None: this was the last)


class Key(msgspec.Struct, array_like=True, frozen=True):
    """A position: the kind of list, microseconds since the epoch, and a tie-breaker."""

    kind: str
    at_us: int
    tie: str


def micros(at: datetime) -> int:
    return (at - _EPOCH) // _US


def at_of(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def encode(kind: str, at: datetime, tie: object) -> str:
    raw = msgspec.json.encode(Key(kind, micros(at), str(tie)))
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


_key = msgspec.json.Decoder(Key)


def decode(value: str, kind: str) -> tuple[datetime, str]:
    """(time, tie-breaker) of a cursor of this kind; 400 invalid_cursor for anything else."""
    if not value or len(value) > MAX_CURSOR_CHARS:
        raise _bad_cursor()
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        k = _key.decode(raw)
        at = at_of(k.at_us)
    except (binascii.Error, ValueError, OverflowError, msgspec.DecodeError) as exc:
        raise _bad_cursor() from exc
    if k.kind != kind or not (0 <= k.at_us < 2**62):
        raise _bad_cursor()
    if kind == "m" and not (k.tie.isascii() and k.tie.isdigit() and int(k.tie) < 2**63):
        raise _bad_cursor()
    if kind == "c":
        try:
            uuid.UUID(k.tie)
        except ValueError as exc:
            raise _bad_cursor() from exc
    return at, k.tie


def _bad_cursor() -> ApiError:
    return ApiError(400, "invalid_cursor", "cursor is not one this API handed out")


def limit_of(value: str | None, default: int, maximum: int) -> int:
    if value is None:
        return default
    if not (value.isascii() and value.isdigit()) or len(value) > 6:
        raise ApiError(400, "invalid_limit", f"limit must be an integer 1..{maximum}")
    n = int(value)
    if not 1 <= n <= maximum:
        raise ApiError(400, "invalid_limit", f"limit must be an integer 1..{maximum}")
    return n


def path_id(value: str, name: str = "conversation id") -> str:
    """A UUID from the path; 400 invalid_id otherwise (the one rule: ``core.parse_uuid``)."""
    return parse_uuid(value, name)


class MessageQuery(msgspec.Struct, frozen=True):
    """Which page: the newest, or the one just before or just after a position."""

    limit: int
    before: tuple[datetime, int] | None = None
    after: tuple[datetime, int] | None = None


def message_query(limit: str | None, before: str | None, after: str | None) -> MessageQuery:
    n = limit_of(limit, DEFAULT_MESSAGES, MAX_MESSAGES)
    if before is not None and after is not None:
        raise ApiError(400, "invalid_cursor", "give before or after, not both")
    b = a = None
    if before is not None:
        at, tie = decode(before, "m")
        b = (at, int(tie))
    if after is not None:
        at, tie = decode(after, "m")
        a = (at, int(tie))
    return MessageQuery(n, b, a)


def message_cursor(row: dict[str, Any]) -> str:
    return encode("m", row["created_at"], row["seq"])


def conversation_cursor(row: dict[str, Any]) -> str:
    return encode("c", row["last_activity_at"], row["id"])

"""Creating, changing and deleting conversations: the bodies, the CONVERSATIONS stream reads.

``POST /api/conversations`` and ``PATCH`` publish a ``ConversationChanged`` on
``conv.settings.<p>.<c>``; ``DELETE`` publishes the tombstone (``shared.deletion``). Each
answers ``202`` once JetStream has it. Reads see these at once (read your writes): a
conversation only created so far is found by its creation in the stream, changes not stored
yet are laid over the stored row, and a tombstone hides the conversation before the persister
has done anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from datetime import datetime
from typing import Annotated, Any

import msgspec
import nats.errors
import nats.js.errors

from services.gateway import core
from shared import deletion, subjects
from shared import messages as m
from shared.bus import Bus

MAX_TITLE_CHARS = 200
MAX_SYSTEM_PROMPT_CHARS = 8000  # with the rest, a body stays under the 64 KiB limit
MAX_METADATA_BYTES = 4096
MAX_METADATA_KEYS = 32
MODEL_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"
PENDING_CHANGES = 50  # at most this many changes not stored yet are laid over a read

Title = Annotated[str, msgspec.Meta(max_length=MAX_TITLE_CHARS)]
Model = Annotated[str, msgspec.Meta(pattern=MODEL_PATTERN)]
SystemPrompt = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_SYSTEM_PROMPT_CHARS)]


class CreateBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    title: Title | None = None
    model: Model | None = None
    system_prompt: SystemPrompt | None = None
    metadata: dict[str, Any] | None = None


class PatchBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    title: Title | None = None
    metadata: dict[str, Any] | None = None


_create = msgspec.json.Decoder(CreateBody)
_patch = msgspec.json.Decoder(PatchBody)
_changed = msgspec.json.Decoder(m.ConversationChanged)


def _decode(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
    try:
        value = decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise core.ApiError(400, "invalid_body", str(exc)) from exc
    except msgspec.DecodeError as exc:
        raise core.ApiError(400, "invalid_json", "the body is not valid JSON") from exc
    metadata = value.metadata
    if metadata is not None:
        if len(metadata) > MAX_METADATA_KEYS:
            raise core.ApiError(
                422, "invalid_metadata", f"metadata has more than {MAX_METADATA_KEYS} keys"
            )
        if len(msgspec.json.encode(metadata)) > MAX_METADATA_BYTES:
            raise core.ApiError(
                422, "invalid_metadata", f"metadata is larger than {MAX_METADATA_BYTES} bytes"
            )
    if value.title is not None and any(ord(c) < 0x20 or c == "\x7f" for c in value.title):
        raise core.ApiError(422, "invalid_title", "the title may not hold control characters")
    return value


def parse_create(body: bytes) -> CreateBody:
    """``POST /api/conversations``'s body (an empty body is an empty object: all defaults)."""
    created: CreateBody = _decode(_create, body or b"{}")
    if created.system_prompt is not None and "\x00" in created.system_prompt:
        raise core.ApiError(422, "invalid_system_prompt", "the system prompt may not hold NUL")
    return created


def parse_patch(body: bytes) -> PatchBody:
    patch: PatchBody = _decode(_patch, body)
    if patch.title is None and patch.metadata is None:
        raise core.ApiError(422, "nothing_to_change", "give a title or metadata (or both)")
    return patch


def conversation_id_for(p: core.Principal, key: str | None, secret: bytes) -> str:
    """A new conversation's id: random, or (with an Idempotency-Key) an HMAC of the caller and
    key, so a retried create names the same conversation (not the ids of ``POST /api/chat``)."""
    if key is None:
        return core.random_uuids()[0]
    digest = hmac.digest(secret, f"conversation\n{p.project}\n{p.user}\n{key}".encode(), "sha256")
    return core._v8(digest[:16])


def same_create(a: m.ConversationChanged, b: m.ConversationChanged) -> bool:
    """Whether two creations asked for the same thing (a retry, not a reused key)."""
    return (a.title, a.metadata, a.model, a.system_prompt) == (
        b.title,
        b.metadata,
        b.model,
        b.system_prompt,
    )


def overlay(row: dict[str, Any], changes: list[m.ConversationChanged]) -> dict[str, Any]:
    """A conversation as stored, with the changes JetStream has and the database not yet."""
    out = {**row, "settings": dict(row["settings"])}
    for c in changes:
        if c.title is not None and (c.op == "update" or not out.get("title")):
            out["title"] = c.title
        if c.metadata is not None and (c.op == "update" or not out.get("metadata")):
            out["metadata"] = c.metadata
        if c.op == "create":
            for name in ("model", "system_prompt"):
                if out["settings"].get(name) is None:
                    out["settings"][name] = getattr(c, name)
    return out


def created_row(c: m.ConversationChanged, at: datetime) -> dict[str, Any]:
    """A conversation only created so far (nothing stored yet), as a read shows it."""
    return {
        "id": c.conversation_id,
        "title": c.title or "",
        "created_at": at,
        "last_activity_at": at,
        "message_count": 0,
        "metadata": c.metadata or {},
        "settings": {
            "model": c.model,
            "system_prompt": c.system_prompt,
            "model_allowed": None,
            "model_reason": "",
        },
        "pending": True,
    }


class ConversationLog:
    """The CONVERSATIONS stream, read back by subject (the gateway's ``STREAM.MSG.GET`` grant).

    Tombstones found are kept (a deletion is for good); everything else is read each time.
    """

    def __init__(self, bus: Bus, max_entries: int = 100_000) -> None:
        self.bus = bus
        self.max_entries = max_entries
        self.deleted: dict[str, m.ConversationDeleteRequested] = {}

    async def tombstone(self, conversation_id: str) -> m.ConversationDeleteRequested | None:
        """The conversation's deletion, whichever project it is in. Raises when it cannot tell."""
        hit = self.deleted.get(conversation_id)
        if hit is not None:
            return hit
        if not self.bus.nc.is_connected:
            raise nats.errors.ConnectionReconnectingError
        found = await deletion.tombstone(self.bus, "*", conversation_id)
        if found is not None:
            if len(self.deleted) >= self.max_entries:
                self.deleted.clear()
            self.deleted[conversation_id] = found
        return found

    async def deleted_among(self, ids: list[str]) -> set[str]:
        """Which of these conversations have a tombstone (one read each; unreadable: none)."""

        async def one(cid: str) -> str | None:
            with contextlib.suppress(nats.errors.Error, TimeoutError, OSError):
                if await self.tombstone(cid) is not None:
                    return cid
            return None

        found = await asyncio.gather(*(one(cid) for cid in ids))
        return {cid for cid in found if cid is not None}

    async def creation(self, conversation_id: str) -> tuple[m.ConversationChanged, int] | None:
        """The conversation's creation (the first settings message) and its stream sequence."""
        if not self.bus.nc.is_connected:
            raise nats.errors.ConnectionReconnectingError
        subject = f"conv.settings.*.{conversation_id}"
        try:
            raw = await self.bus.js.get_msg(subjects.STREAM_CONVERSATIONS, 0, subject, next=True)
        except nats.js.errors.NotFoundError:
            return None
        if raw.data is None or raw.seq is None:
            return None
        event = _changed.decode(raw.data)
        return (event, raw.seq) if event.op == "create" else None

    async def changes(
        self, project: str, conversation_id: str, after_seq: int
    ) -> list[m.ConversationChanged]:
        """The settings changes after stream sequence ``after_seq`` (what is not stored yet)."""
        subject = subjects.conversation_settings(project, conversation_id)
        out: list[m.ConversationChanged] = []
        seq = after_seq + 1
        while len(out) < PENDING_CHANGES:
            try:
                raw = await self.bus.js.get_msg(
                    subjects.STREAM_CONVERSATIONS, seq, subject, next=True
                )
            except nats.js.errors.NotFoundError:
                break
            if raw.data is None or raw.seq is None:
                break
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                out.append(_changed.decode(raw.data))
            seq = raw.seq + 1
        return out

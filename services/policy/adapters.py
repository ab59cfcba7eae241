"""Policy's state: run records in a JetStream KV bucket, created once and changed by compare-and-set."""

from __future__ import annotations

from typing import Any

import msgspec
import nats.js.errors

from services.policy.core import ConvState, RunState
from shared.errors import BadData, RetryLater
from shared.subjects import abort_key

_decoder = msgspec.json.Decoder(RunState)
_conv_decoder = msgspec.json.Decoder(ConvState)
_encoder = msgspec.json.Encoder()


class Runs:
    """Create-only run records; every change names the revision it read (safe across replicas)."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv

    async def create(self, state: RunState) -> tuple[RunState, bool]:
        """Store a new run, or return the one a previous trigger created (and False)."""
        try:
            await self.kv.create(state.run_id, _encoder.encode(state))
            return state, True
        except nats.js.errors.KeyWrongLastSequenceError:
            existing, _ = await self.get(state.run_id)
            return existing, False

    async def get(self, run_id: str) -> tuple[RunState, int]:
        try:
            entry = await self.kv.get(run_id)
        except nats.js.errors.KeyNotFoundError as exc:
            raise BadData(f"no run {run_id}") from exc
        if entry.value is None:
            raise BadData(f"run {run_id} was deleted")
        return _decoder.decode(entry.value), int(entry.revision or 0)

    async def update(self, state: RunState, revision: int) -> None:
        try:
            await self.kv.update(state.run_id, _encoder.encode(state), last=revision)
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            # Another replica changed the run since we read it: read again and decide again.
            raise RetryLater(f"run {state.run_id} changed concurrently", delay=0.05) from exc


class Conversations:
    """Per-conversation turn-taking records in the same bucket, changed by compare-and-set."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv

    @staticmethod
    def key(conversation_id: str) -> str:
        return f"conv-{conversation_id}"

    async def get(self, conversation_id: str) -> tuple[ConvState, int]:
        """The conversation's record and its revision (0: not stored yet)."""
        try:
            entry = await self.kv.get(self.key(conversation_id))
        except nats.js.errors.KeyNotFoundError:
            return ConvState(conversation_id=conversation_id), 0
        if entry.value is None:
            return ConvState(conversation_id=conversation_id), 0
        return _conv_decoder.decode(entry.value), int(entry.revision or 0)

    async def put(self, conv: ConvState, revision: int) -> None:
        """Store ``conv`` if nobody changed it since ``revision`` (0: create-only)."""
        value = _encoder.encode(conv)
        try:
            if revision == 0:
                await self.kv.create(self.key(conv.conversation_id), value)
            else:
                await self.kv.update(self.key(conv.conversation_id), value, last=revision)
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise RetryLater(
                f"conversation {conv.conversation_id} changed concurrently", delay=0.05
            ) from exc


class Aborts:
    """Aborted attempts (``<run id>.<attempt>``) that executors check before calling the model."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv

    async def mark(self, run_id: str, attempt: int) -> None:
        # A put, not a create: marking twice is the same fact.
        await self.kv.put(abort_key(run_id, attempt), b"1")

"""What the executor talks to: the conversation read model (read-only) and the answer model."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import msgspec

from services.executor.core import CallAborted
from shared.messages import Usage

CALL_ID_HEADER = "x-baton-call-id"


class StreamOutcome(msgspec.Struct):
    text: str
    usage: Usage
    stop_reason: str


class StreamFailed(Exception):
    """A model call that ended in an error, with what it had used until then."""

    def __init__(self, cause: BaseException, usage: Usage) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.usage = usage


class Model:
    """Streams one answer; usage is tracked from the events so a cut stream still reports it."""

    def __init__(self, client: anthropic.AsyncAnthropic) -> None:
        self.client = client

    async def stream(
        self,
        model: str,
        system: list[dict[str, Any]],
        messages: list[dict[str, Any]],
        max_tokens: int,
        on_text: Callable[[str], Awaitable[None]],
        call_id: str = "",
        abort: asyncio.Event | None = None,
    ) -> StreamOutcome:
        """Stream one call. Cancelling the task that runs it after setting ``abort`` ends the
        call (the connection is closed, so the model stops) and raises ``StreamFailed`` with
        what it used; a cancel without ``abort`` (shutdown) stays a cancel."""
        counts = {"input": 0, "output": 0, "cache_read": 0, "cache_write": 0, "deltas": 0}
        parts: list[str] = []
        stop_reason = ""
        try:
            if abort is not None and abort.is_set():
                raise CallAborted("aborted before the call started")
            async with self.client.messages.stream(
                model=model,
                system=system,  # type: ignore[arg-type]
                messages=messages,  # type: ignore[arg-type]
                max_tokens=max_tokens,
                # Ignored by the API; lets the offline model's ledger be matched call by call.
                extra_headers={CALL_ID_HEADER: call_id} if call_id else None,
            ) as stream:
                async for event in stream:
                    if event.type == "message_start":
                        u = event.message.usage
                        counts["input"] = u.input_tokens
                        counts["cache_read"] = u.cache_read_input_tokens or 0
                        counts["cache_write"] = u.cache_creation_input_tokens or 0
                        counts["output"] = u.output_tokens
                    elif event.type == "content_block_delta" and event.delta.type == "text_delta":
                        counts["deltas"] += 1
                        parts.append(event.delta.text)
                        await on_text(event.delta.text)
                    elif event.type == "message_delta":
                        counts["output"] = event.usage.output_tokens
                        stop_reason = event.delta.stop_reason or ""
        except asyncio.CancelledError:
            if abort is None or not abort.is_set():
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # handled here: the abort is the call's outcome, not a shutdown
            counts["output"] = max(counts["output"], counts["deltas"])
            raise StreamFailed(CallAborted("aborted by policy"), _usage(counts)) from None
        except Exception as exc:
            # Tokens already streamed were generated and billed, even if the final count never came.
            counts["output"] = max(counts["output"], counts["deltas"])
            raise StreamFailed(exc, _usage(counts)) from exc
        return StreamOutcome(text="".join(parts), usage=_usage(counts), stop_reason=stop_reason)


def _usage(counts: dict[str, int]) -> Usage:
    return Usage(
        input_tokens=counts["input"],
        output_tokens=counts["output"],
        cache_read_tokens=counts["cache_read"],
        cache_write_tokens=counts["cache_write"],
    )

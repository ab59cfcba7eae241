"""What the executor talks to: the conversation read model (read-only) and the answer model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import msgspec
from opentelemetry import propagate, trace

from services.executor.core import CallAborted, ToolUses
from shared import sse
from shared.messages import ToolCall, Usage
from shared.model import call_span, end_call_span, untraced
from shared.sse import StreamEnded, sse_events

CALL_ID_HEADER = "x-baton-call-id"


class StreamOutcome(msgspec.Struct):
    text: str
    usage: Usage
    stop_reason: str
    tool_calls: tuple[ToolCall, ...] = ()


class _AbortSeen(Exception):
    """The abort flag found set after an await that returned: the cancel ``Call.stop`` sent
    with it was lost on the way. Known ways: nats-py's ``publish_async`` (a token push) turns a
    cancel into ``TooManyStalledMsgsError``, which a push takes for a broker hiccup; Python
    3.11's ``asyncio.wait_for`` (inside nats-py) returns a result that completed in the cancel's
    loop turn and drops the cancel; nats-py's forced flush swallows one outright."""


def _check_abort(abort: asyncio.Event | None) -> None:
    if abort is not None and abort.is_set():
        raise _AbortSeen


class StreamFailed(Exception):
    """A model call that ended in an error, with what it had used until then."""

    def __init__(self, cause: BaseException, usage: Usage) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.usage = usage


# The few fields of the Messages API's stream events the executor reads; the rest is skipped
# (msgspec ignores unknown fields), so a new field in the API breaks nothing.
class _StartUsage(msgspec.Struct):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class _Message(msgspec.Struct):
    usage: _StartUsage
    id: str = ""
    model: str = ""


class _MessageStart(msgspec.Struct):
    message: _Message


class _Delta(msgspec.Struct):
    type: str
    text: str = ""
    partial_json: str = ""


class _BlockDelta(msgspec.Struct):
    delta: _Delta
    index: int = 0


class _ContentBlock(msgspec.Struct):
    type: str
    id: str = ""
    name: str = ""
    input: Any = None


class _BlockStart(msgspec.Struct):
    content_block: _ContentBlock | None = None  # only tool_use blocks are read
    index: int = 0


class _BlockStop(msgspec.Struct):
    index: int = 0


class _StopDelta(msgspec.Struct):
    stop_reason: str | None = None


class _DeltaUsage(msgspec.Struct):
    output_tokens: int = 0


class _MessageDelta(msgspec.Struct):
    delta: _StopDelta
    usage: _DeltaUsage


_start = msgspec.json.Decoder(_MessageStart)
_block_delta = msgspec.json.Decoder(_BlockDelta)
_block_start = msgspec.json.Decoder(_BlockStart)
_block_stop = msgspec.json.Decoder(_BlockStop)
_message_delta = msgspec.json.Decoder(_MessageDelta)


class Model:
    """Streams one answer; usage is tracked from the events so a cut stream still reports it.

    The call goes through the anthropic SDK's client (auth, base URL, version header, timeouts,
    no retries, its typed errors for non-2xx replies) as a streamed raw response; the events are
    read here with msgspec instead of the SDK's per-event pydantic models (docs/decisions.md).
    """

    def __init__(self, client: anthropic.AsyncAnthropic) -> None:
        # The SDK's span would end without usage (it learns usage from events it parses), so
        # this client makes none and ``stream`` opens the same ``anthropic.messages.create`` span.
        self.client, self.server = untraced(client)

    async def stream(
        self,
        model: str,
        system: list[dict[str, Any]],
        messages: list[dict[str, Any]],
        max_tokens: int,
        on_text: Callable[[str], Awaitable[None]],
        call_id: str = "",
        abort: asyncio.Event | None = None,
        tools: list[dict[str, Any]] | None = None,
        on_start: Callable[[Usage], Awaitable[None]] | None = None,
    ) -> StreamOutcome:
        """Stream one call. Cancelling the task that runs it after setting ``abort`` ends the
        call (the connection is closed, so the model stops) and raises ``StreamFailed`` with
        what it used; a cancel without ``abort`` (shutdown) stays a cancel. ``tools`` (the API's
        shape) are offered to the model; its ``tool_use`` blocks come back in the outcome.
        ``on_start`` hears the usage ``message_start`` reports, before the first delta."""
        uses = ToolUses()
        counts = {"input": 0, "output": 0, "cache_read": 0, "cache_write": 0, "deltas": 0}
        parts: list[str] = []
        stop_reason = ""
        span = call_span(model, max_tokens, self.server)
        recording = span.is_recording()
        started = time.time_ns()
        message = _Message(usage=_StartUsage())
        stopped = False
        try:
            if abort is not None and abort.is_set():
                raise CallAborted("aborted before the call started")
            headers = {CALL_ID_HEADER: call_id} if call_id else {}
            # The SDK's own span is off for this client (shared.model), so this one is carried.
            propagate.inject(headers, context=trace.set_span_in_context(span))
            async with self.client.messages.with_streaming_response.create(
                model=model,
                system=system,  # type: ignore[arg-type]
                messages=messages,  # type: ignore[arg-type]
                max_tokens=max_tokens,
                stream=True,
                tools=tools or anthropic.omit,  # type: ignore[arg-type]
                # Ignored by the API; lets the offline model's ledger be matched call by call.
                extra_headers=headers or None,
            ) as response:
                if recording:
                    span.set_attribute("http.response.status_code", response.status_code)
                    if request_id := response.http_response.headers.get("request-id"):
                        span.set_attribute("anthropic.request.id", request_id)
                async for event, data in sse_events(response.http_response.aiter_bytes()):
                    _check_abort(abort)
                    if event == b"content_block_delta":
                        block_delta = _block_delta.decode(data)
                        delta = block_delta.delta
                        if delta.type == "text_delta":
                            if recording and not counts["deltas"]:
                                ttfc = (time.time_ns() - started) / 1e9
                                span.set_attribute("gen_ai.response.time_to_first_chunk", ttfc)
                            counts["deltas"] += 1
                            parts.append(delta.text)
                            await on_text(delta.text)
                            _check_abort(abort)
                        elif delta.type == "input_json_delta":
                            counts["deltas"] += 1  # generated (and billed) like text
                            uses.delta(block_delta.index, delta.partial_json)
                    elif event == b"content_block_start":
                        start = _block_start.decode(data)
                        block = start.content_block
                        if block is not None and block.type == "tool_use":
                            uses.start(start.index, block.id, block.name, block.input)
                    elif event == b"content_block_stop":
                        uses.stop(_block_stop.decode(data).index)
                    elif event == b"message_start":
                        message = _start.decode(data).message
                        u = message.usage
                        counts["input"] = u.input_tokens
                        counts["cache_read"] = u.cache_read_input_tokens or 0
                        counts["cache_write"] = u.cache_creation_input_tokens or 0
                        counts["output"] = u.output_tokens
                        if on_start is not None:
                            await on_start(_usage(counts))
                            _check_abort(abort)
                    elif event == b"message_delta":
                        md = _message_delta.decode(data)
                        counts["output"] = md.usage.output_tokens
                        stop_reason = md.delta.stop_reason or ""
                    elif event == b"message_stop":
                        stopped = True
                    elif event == b"error":
                        raise sse.stream_error(self.client, data, response.http_response)
                if not stopped:
                    # A body that ends cleanly but early is a cut answer, not a complete one.
                    raise StreamEnded("the stream ended before message_stop")
        except (asyncio.CancelledError, _AbortSeen):
            # The abort is seen either way: as the cancel ``Call.stop`` sends, or as its flag
            # after an await that swallowed that cancel (``_AbortSeen``); never only at the end.
            if abort is None or not abort.is_set():
                span.end()
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # handled here: the abort is the call's outcome, not a shutdown
            counts["output"] = max(counts["output"], counts["deltas"])
            end_call_span(span, _usage(counts), message.id, message.model, stop_reason, None)
            raise StreamFailed(CallAborted("aborted by policy"), _usage(counts)) from None
        except Exception as exc:
            # Tokens already streamed were generated and billed, even if the final count never came.
            counts["output"] = max(counts["output"], counts["deltas"])
            end_call_span(span, _usage(counts), message.id, message.model, stop_reason, exc)
            raise StreamFailed(exc, _usage(counts)) from exc
        end_call_span(span, _usage(counts), message.id, message.model, stop_reason, None)
        return StreamOutcome(
            text="".join(parts),
            usage=_usage(counts),
            stop_reason=stop_reason,
            tool_calls=uses.calls(),
        )


def _usage(counts: dict[str, int]) -> Usage:
    return Usage(
        input_tokens=counts["input"],
        output_tokens=counts["output"],
        cache_read_tokens=counts["cache_read"],
        cache_write_tokens=counts["cache_write"],
    )

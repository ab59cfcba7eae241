"""What the agent talks to: the small model, its calls streamed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import msgspec
from opentelemetry import propagate, trace

from services.agent import core
from shared import messages as m
from shared import sse
from shared.model import call_span, end_call_span, untraced

# The offline model's ledger is keyed by this header, so usage can be reconciled call by call.
CALL_ID_HEADER = "x-baton-call-id"


# The fields of the Messages API's stream events the agent reads; the rest is skipped unread.
class _StartUsage(msgspec.Struct):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None


class _Message(msgspec.Struct):
    usage: _StartUsage = msgspec.field(default_factory=_StartUsage)
    id: str = ""
    model: str = ""


class _MessageStart(msgspec.Struct):
    message: _Message


class _Block(msgspec.Struct):
    type: str
    name: str = ""
    input: Any = None


class _BlockStart(msgspec.Struct):
    content_block: _Block
    index: int = 0


class _Delta(msgspec.Struct):
    type: str
    partial_json: str = ""


class _BlockDelta(msgspec.Struct):
    delta: _Delta
    index: int = 0


class _DeltaUsage(msgspec.Struct):
    output_tokens: int = 0


class _StopDelta(msgspec.Struct):
    stop_reason: str | None = None


class _MessageDelta(msgspec.Struct):
    usage: _DeltaUsage = msgspec.field(default_factory=_DeltaUsage)
    delta: _StopDelta = msgspec.field(default_factory=_StopDelta)


_start = msgspec.json.Decoder(_MessageStart)
_block_start = msgspec.json.Decoder(_BlockStart)
_block_delta = msgspec.json.Decoder(_BlockDelta)
_message_delta = msgspec.json.Decoder(_MessageDelta)


class CallFailed(Exception):
    """A classification call that ended in an error (``cause``: the SDK's typed error, a
    transport error, ``APIResponseValidationError`` for a garbled stream, or ``StreamEnded``),
    with what it had used until then: the input ``message_start`` counted is billed."""

    def __init__(self, cause: BaseException, usage: m.Usage) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.usage = usage


class Classifier:
    """Asks the small model for a Decision through forced tool use, streamed.

    The call goes through the anthropic SDK's client (auth, base URL, version header, timeouts,
    no retries, typed errors for non-2xx replies) as a streamed raw response whose events are
    read here with msgspec instead of the SDK's pydantic models (docs/decisions.md); the SDK's
    span would end without usage, so the call opens the same span itself (shared/model.py).
    Streamed so that the input the provider counted is known at ``message_start``, before the
    answer: an agent that dies after that leaves a record to bill the call by (``on_start``).
    """

    def __init__(self, client: anthropic.AsyncAnthropic, model: str, max_tokens: int) -> None:
        self.client, self.server = untraced(client)
        self.model = model
        self.max_tokens = max_tokens
        self.tools: Any = [
            {
                "name": core.TOOL_NAME,
                "description": "Record what the last user message needs.",
                "input_schema": core.tool_schema(),
            }
        ]
        self.tool_choice: Any = {"type": "tool", "name": core.TOOL_NAME}

    async def classify(
        self,
        transcript: str,
        call_id: str = "",
        on_start: Callable[[m.Usage], Awaitable[None]] | None = None,
    ) -> tuple[bool, Any, m.Usage]:
        """Whether the model called the tool, the input it gave (anything at all: text that is
        not JSON stays a string), and what the call used (what the provider bills).

        ``on_start`` hears the usage ``message_start`` reports, before the rest is read. Any
        failure raises ``CallFailed`` with the usage so far.
        """
        counts = m.Usage()
        block = -1  # the index of the classify tool's block, once it starts
        initial: Any = None
        parts: list[str] = []
        stopped = False
        message = _Message()
        stop_reason = ""
        deltas = 0
        span = call_span(self.model, self.max_tokens, self.server)
        headers = {CALL_ID_HEADER: call_id} if call_id else {}
        propagate.inject(headers, context=trace.set_span_in_context(span))
        try:
            async with self.client.messages.with_streaming_response.create(
                model=self.model,
                max_tokens=self.max_tokens,
                system=core.SYSTEM_PROMPT,
                messages=[{"role": "user", "content": transcript}],
                tools=self.tools,
                tool_choice=self.tool_choice,
                stream=True,
                extra_headers=headers or None,
            ) as response:
                http = response.http_response
                span.set_attribute("http.response.status_code", http.status_code)
                async for event, data in sse.sse_events(http.aiter_bytes()):
                    try:
                        if event == b"content_block_delta":
                            delta = _block_delta.decode(data)
                            deltas += 1  # generated (and billed) whatever block it is in
                            if delta.index == block and delta.delta.type == "input_json_delta":
                                parts.append(delta.delta.partial_json)
                        elif event == b"message_start":
                            message = _start.decode(data).message
                            u = message.usage
                            counts = m.Usage(
                                input_tokens=max(0, u.input_tokens),
                                output_tokens=max(0, u.output_tokens),
                                cache_read_tokens=max(0, u.cache_read_input_tokens or 0),
                                cache_write_tokens=max(0, u.cache_creation_input_tokens or 0),
                            )
                            if on_start is not None:
                                await on_start(counts)
                        elif event == b"content_block_start":
                            start = _block_start.decode(data)
                            b = start.content_block
                            if block < 0 and b.type == "tool_use" and b.name == core.TOOL_NAME:
                                block, initial = start.index, b.input
                        elif event == b"message_delta":
                            md = _message_delta.decode(data)
                            out = max(0, md.usage.output_tokens)
                            counts = msgspec.structs.replace(counts, output_tokens=out)
                            stop_reason = md.delta.stop_reason or ""
                        elif event == b"message_stop":
                            stopped = True
                        elif event == b"error":
                            raise sse.stream_error(self.client, data, http)
                    except (msgspec.DecodeError, RecursionError) as exc:
                        raise anthropic.APIResponseValidationError(
                            http, None, message=f"unreadable stream event: {exc}"
                        ) from None
                if not stopped:
                    raise sse.StreamEnded("the stream ended before message_stop")
        except BaseException as exc:
            # Deltas already streamed were generated and billed, even if the final count never
            # came (as the executor counts a cut answer).
            out = max(counts.output_tokens, deltas)
            counts = msgspec.structs.replace(counts, output_tokens=out)
            end_call_span(span, counts, message.id, message.model, stop_reason, exc)
            if isinstance(exc, Exception):
                raise CallFailed(exc, counts) from exc
            raise
        end_call_span(span, counts, message.id, message.model, stop_reason, None)
        if block < 0:
            return False, None, counts
        return True, _tool_input("".join(parts), initial), counts


def _tool_input(raw: str, initial: Any) -> Any:
    """The tool's input from its deltas: JSON decoded, or the text as it came (I7: the model's
    output is not trusted, core.validate refuses it); no deltas: the start block's input."""
    if not raw.strip():
        return initial
    try:
        return msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return raw

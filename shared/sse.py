"""The Messages API's server-sent events as baton reads them: frames off the byte stream, and
the SDK's own typed error for an ``event: error`` frame. The executor (answers) and the agent
(classifications) both read their streamed calls this way (docs/decisions.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anthropic
import msgspec

_any = msgspec.json.Decoder()


class StreamEnded(Exception):
    """The model's stream ended without ``message_stop``: a cut call (an executor's failure
    class ``cut_stream``)."""


async def sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[bytes, bytes]]:
    """Server-sent events as ``(event, data)`` from a byte stream; comments and ids skipped.

    Frames end at a blank line; CR and CRLF line ends are taken as LF, as the SSE spec says.
    A frame without an ``event:`` line is yielded with an empty name (the SDK skips those).
    """
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        if b"\r" in buffer:
            held = b"\r" if buffer.endswith(b"\r") else b""  # may be the first half of CRLF
            buffer = buffer[: len(buffer) - len(held)].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            buffer += held
        if b"\n\n" not in buffer:
            continue
        *frames, buffer = buffer.split(b"\n\n")
        for frame in frames:
            event, data = _parse_frame(frame)
            if event or data:
                yield event, data
    if buffer.strip(b"\r\n"):
        event, data = _parse_frame(buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n"))
        if event or data:
            yield event, data


def _parse_frame(frame: bytes) -> tuple[bytes, bytes]:
    event, data = b"", []
    for line in frame.split(b"\n"):
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"event":
            event = value
        elif name == b"data":
            data.append(value)
    return event, b"\n".join(data)


def stream_error(
    client: anthropic.AsyncAnthropic, data: bytes, response: Any
) -> anthropic.APIStatusError:
    """The error the SDK's own stream raises for an ``event: error`` frame, built the same way."""
    body: object = data.decode("utf-8", "replace")
    try:
        body = _any.decode(data)
        message = f"{body}"
    except (msgspec.DecodeError, RecursionError):
        message = str(body) or f"Error code: {response.status_code}"
    return client._make_status_error(message, body=body, response=response)

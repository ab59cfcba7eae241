"""The Anthropic client as every model-facing service builds it: SDK retries off, explicit
timeouts; and the span of a streamed call, which the services make themselves (the SDK's own
span learns usage from the events it parses, and baton reads the raw stream)."""

from __future__ import annotations

from typing import Any

import anthropic
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from shared.messages import Usage

_tracer = trace.get_tracer("baton.model")


def client(
    base_url: str, api_key: str, timeout_s: float, connect_s: float = 5.0
) -> anthropic.AsyncAnthropic:
    """An ``AsyncAnthropic`` that never retries on its own: retries are policy's decision.

    Empty ``base_url``/``api_key`` leave the SDK to its own ``ANTHROPIC_*`` environment.
    """
    kwargs: dict[str, object] = {}
    if base_url:
        kwargs["base_url"] = base_url
    if api_key:
        kwargs["api_key"] = api_key
    return anthropic.AsyncAnthropic(
        max_retries=0,
        timeout=anthropic.Timeout(timeout_s, connect=connect_s),
        **kwargs,  # type: ignore[arg-type]
    )


def untraced(client: anthropic.AsyncAnthropic) -> tuple[anthropic.AsyncAnthropic, tuple[str, int]]:
    """The same client (one connection pool, the same settings) making no span of its own, and
    the server it talks to (for ``call_span``)."""
    url = client.base_url
    server = (url.host, url.port or (80 if url.scheme == "http" else 443))
    return client.with_options(open_telemetry=False), server


def call_span(
    model: str, max_tokens: int, server: tuple[str, int], operation: str = "chat"
) -> trace.Span:
    """The ``anthropic.messages.create`` span the SDK opens for a streamed call, same attributes."""
    return _tracer.start_span(
        "anthropic.messages.create",
        kind=SpanKind.CLIENT,
        attributes={
            "gen_ai.provider.name": "anthropic",
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": model,
            "gen_ai.request.max_tokens": max_tokens,
            "gen_ai.request.stream": True,
            "http.request.method": "POST",
            "server.address": server[0],
            "server.port": server[1],
        },
    )


def end_call_span(
    span: trace.Span,
    usage: Usage,
    response_id: str,
    response_model: str,
    stop_reason: str,
    error: BaseException | None,
) -> None:
    """The attributes the SDK's span of a streamed ``messages.create`` has (no content)."""
    if span.is_recording():
        attributes: dict[str, Any] = {
            "gen_ai.usage.input_tokens": usage.input_tokens
            + usage.cache_read_tokens
            + usage.cache_write_tokens,
            "gen_ai.usage.output_tokens": usage.output_tokens,
            "gen_ai.usage.cache_read.input_tokens": usage.cache_read_tokens,
            "gen_ai.usage.cache_write.input_tokens": usage.cache_write_tokens,
        }
        if response_id:
            attributes["gen_ai.response.id"] = response_id
        if response_model:
            attributes["gen_ai.response.model"] = response_model
        if stop_reason:
            attributes["anthropic.message.stop_reason"] = stop_reason
        span.set_attributes(attributes)
        if isinstance(error, anthropic.APIStatusError):
            span.set_attribute("error.type", str(error.type or error.status_code))
            span.set_status(Status(StatusCode.ERROR))
        elif error is not None:
            span.set_attribute("error.type", type(error).__name__)
            span.set_status(Status(StatusCode.ERROR))
        else:
            span.set_status(Status(StatusCode.OK))
    span.end()

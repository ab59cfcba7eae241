"""What the executor and the agent read off the wire themselves: SSE frames, stream events, replies.

The HTTP side is the real anthropic SDK client over an ``httpx2.MockTransport`` (no network):
the SDK builds and sends the request and raises its own errors; these tests check what baton
reads from the bytes it hands back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import anthropic
import httpx2
import msgspec
import pytest

from baton import offline_model
from services.agent import core
from services.agent.adapters import CallFailed, Classifier
from services.executor.adapters import Model, StreamEnded, StreamFailed
from services.executor.core import classify
from shared.messages import Usage
from shared.sse import sse_events


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def _events(*parts: bytes) -> list[tuple[bytes, bytes]]:
    return [e async for e in sse_events(_chunks(*parts))]


STREAM = (
    b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":7}}}\n\n'
    b"event: ping\ndata: {}\n\n"
    b": a comment line\n"
    b'event: content_block_delta\ndata: {"a":1}\n\n'
    b"id: 5\nevent: message_stop\ndata: {}\n\n"
)
EXPECTED = [
    (b"message_start", b'{"type":"message_start","message":{"usage":{"input_tokens":7}}}'),
    (b"ping", b"{}"),
    (b"content_block_delta", b'{"a":1}'),
    (b"message_stop", b"{}"),
]


async def test_frames_split_anywhere_across_reads_give_the_same_events() -> None:
    for cut in range(1, len(STREAM)):
        assert await _events(STREAM[:cut], STREAM[cut:]) == EXPECTED, cut
    assert await _events(*(STREAM[i : i + 1] for i in range(len(STREAM)))) == EXPECTED


async def test_crlf_and_cr_line_ends_are_line_ends_even_split_between_reads() -> None:
    crlf = STREAM.replace(b"\n", b"\r\n")
    for cut in range(1, len(crlf)):
        assert await _events(crlf[:cut], crlf[cut:]) == EXPECTED, cut
    assert await _events(STREAM.replace(b"\n", b"\r")) == EXPECTED


async def test_multi_line_data_is_joined_and_a_last_frame_without_blank_line_is_kept() -> None:
    got = await _events(b"event: x\ndata: one\ndata:two\n\n", b"event: y\ndata: last")
    assert got == [(b"x", b"one\ntwo"), (b"y", b"last")]
    assert await _events(b"", b"\n\n", b": only a comment\n\n") == []


def _sse(*frames: tuple[str, Any]) -> bytes:
    return b"".join(
        b"event: %s\ndata: %s\n\n" % (name.encode(), msgspec.json.encode(data))
        for name, data in frames
    )


def _client(handler: Callable[[httpx2.Request], httpx2.Response]) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        api_key="test-key",
        base_url="http://model.test",
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)),
    )


START = {
    "type": "message_start",
    "message": {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [],
        "usage": {
            "input_tokens": 11,
            "output_tokens": 1,
            "cache_creation_input_tokens": 5,
            "cache_read_input_tokens": None,
        },
    },
}


def _delta(text: str) -> tuple[str, Any]:
    return "content_block_delta", {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": text},
    }


async def _stream(body: bytes) -> tuple[list[str], Any]:
    seen: list[str] = []
    sent: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        sent.append(request)
        return httpx2.Response(200, content=body, headers={"content-type": "text/event-stream"})

    async def on_text(text: str) -> None:
        seen.append(text)

    client = _client(handler)
    try:
        outcome: Any = await Model(client).stream("m", [], [], 64, on_text, call_id="c-1")
    except StreamFailed as exc:
        outcome = exc
    finally:
        await client.close()
    # The SDK sent it: its auth and version headers, the call id, a streaming body.
    [request] = sent
    assert "test-key" in request.headers.get("authorization", request.headers.get("x-api-key", ""))
    assert request.headers["anthropic-version"]
    assert request.headers["x-baton-call-id"] == "c-1"
    assert msgspec.json.decode(request.content)["stream"] is True
    return seen, outcome


async def test_a_streamed_answer_is_read_with_its_usage_and_stop_reason() -> None:
    body = _sse(
        ("message_start", START),
        ("content_block_start", {"type": "content_block_start", "index": 0}),
        ("ping", {"type": "ping"}),
        _delta("héllo "),
        ("content_block_delta", {"type": "content_block_delta", "delta": {"type": "other"}}),
        _delta("🙂"),
        ("some_future_event", {"type": "some_future_event", "x": [1, 2]}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn"},
                "usage": {"output_tokens": 2},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    )
    seen, outcome = await _stream(body)
    assert seen == ["héllo ", "🙂"]
    assert outcome.text == "héllo 🙂" and outcome.stop_reason == "end_turn"
    assert outcome.usage == Usage(
        input_tokens=11, output_tokens=2, cache_read_tokens=0, cache_write_tokens=5
    )


async def test_an_error_event_raises_what_the_sdks_own_stream_raises_with_usage_so_far() -> None:
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    block = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    body = _sse(
        ("message_start", START),
        ("content_block_start", block),
        _delta("a"),
        _delta("b"),
        ("error", error),
    )
    seen, failed = await _stream(body)
    assert seen == ["a", "b"] and isinstance(failed, StreamFailed)
    assert failed.usage == Usage(input_tokens=11, output_tokens=2, cache_write_tokens=5)
    client = _client(
        lambda r: httpx2.Response(200, content=body, headers={"content-type": "text/event-stream"})
    )
    with pytest.raises(anthropic.APIStatusError) as sdk:
        async with client.messages.stream(model="m", messages=[], max_tokens=64) as stream:
            async for _ in stream:
                pass
    await client.close()
    assert type(failed.cause) is type(sdk.value)
    assert failed.cause.body == sdk.value.body and str(failed.cause) == str(sdk.value)
    assert failed.cause.status_code == sdk.value.status_code == 200


async def test_a_stream_that_ends_before_message_stop_is_a_cut_answer() -> None:
    # The body ends cleanly after two deltas: not a complete answer, a cut one (policy retries).
    seen, failed = await _stream(_sse(("message_start", START), _delta("a"), _delta("b")))
    assert seen == ["a", "b"] and isinstance(failed, StreamFailed)
    assert isinstance(failed.cause, StreamEnded) and classify(failed.cause) == "cut_stream"
    assert failed.usage == Usage(input_tokens=11, output_tokens=2, cache_write_tokens=5)


@pytest.mark.parametrize(
    "body",
    [
        _sse(("message_start", {"type": "message_start", "message": {"usage": "lots"}})),
        b"event: content_block_delta\ndata: {not json\n\n",
        _sse(("message_start", START)) + b"event: error\ndata: \xff{\n\n",
    ],
    ids=["wrong-type", "bad-json", "undecodable-error"],
)
async def test_a_garbled_stream_fails_the_call_instead_of_guessing(body: bytes) -> None:
    _, failed = await _stream(body)
    assert isinstance(failed, StreamFailed)


@pytest.mark.parametrize(
    ("status", "kind", "error"),
    [
        (400, "invalid_request_error", anthropic.BadRequestError),
        (429, "rate_limit_error", anthropic.RateLimitError),
        (500, "api_error", anthropic.InternalServerError),
        (529, "overloaded_error", anthropic.OverloadedError),
    ],
)
async def test_an_http_error_is_the_sdks_typed_error_for_both_calls(
    status: int, kind: str, error: type[anthropic.APIStatusError]
) -> None:
    payload = {"type": "error", "error": {"type": kind, "message": "no"}}

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(status, json=payload)

    client = _client(handler)

    async def on_text(text: str) -> None:
        raise AssertionError("no text expected")

    with pytest.raises(StreamFailed) as failed:
        await Model(client).stream("m", [], [], 64, on_text)
    assert type(failed.value.cause) is error and failed.value.usage == Usage()
    with pytest.raises(CallFailed) as cut:
        await Classifier(client, "m", 64).classify("hi")
    assert type(cut.value.cause) is error and cut.value.usage == Usage()
    await client.close()


def test_the_models_client_keeps_the_sdk_settings_but_makes_no_span_of_its_own() -> None:
    client = anthropic.AsyncAnthropic(
        api_key="k", base_url="http://model.test:8123", max_retries=0, timeout=7.0
    )
    own = Model(client).client
    assert (own.max_retries, own.timeout, own.api_key) == (0, 7.0, "k")
    assert str(own.base_url) == str(client.base_url)
    assert own._client is client._client  # one connection pool
    assert own._tracer is None


def _tool_stream(
    name: str = "classify_message", pieces: tuple[str, ...] = ('{"a":', " 1}"), **start: Any
) -> bytes:
    """A streamed forced tool call, as the API sends it (the input in ``input_json_delta``s)."""
    block = {"type": "tool_use", "id": "toolu_1", "name": name, "input": {}} | start
    return _sse(
        ("message_start", START),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}),
        *(
            ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "input_json_delta", "partial_json": p}})
            for p in pieces
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                           "usage": {"output_tokens": 9}}),
        ("message_stop", {"type": "message_stop"}),
    )  # fmt: skip


TEXT_ONLY = _sse(
    ("message_start", START),
    ("content_block_start", {"type": "content_block_start", "index": 0,
                             "content_block": {"type": "text", "text": ""}}),
    _delta("no"),
    ("message_delta", {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 1}}),
    ("message_stop", {"type": "message_stop"}),
)  # fmt: skip


def _streaming(body: bytes) -> anthropic.AsyncAnthropic:
    return _client(
        lambda r: httpx2.Response(200, content=body, headers={"content-type": "text/event-stream"})
    )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (_tool_stream(), (True, {"a": 1})),
        (_tool_stream(pieces=('"just a', ' string"')), (True, "just a string")),
        (_tool_stream(pieces=("{not json",)), (True, "{not json")),
        (_tool_stream(name="other_tool"), (False, None)),
        (_tool_stream(pieces=(), input={"b": 2}), (True, {"b": 2})),
        (_tool_stream(pieces=(), input=None), (True, None)),
        (TEXT_ONLY, (False, None)),
    ],
    ids=["tool-call", "hostile-input-kept-as-is", "not-json-kept-as-text", "other-tool",
         "input-in-start-block", "no-input", "text-only"],
)  # fmt: skip
async def test_the_classifier_returns_the_tool_input_verbatim(body: bytes, expected: Any) -> None:
    client = _streaming(body)
    called, raw, _ = await Classifier(client, "m", 64).classify("hi")
    assert (called, raw) == expected
    await client.close()


async def test_the_classifier_returns_what_the_call_used_and_tags_it_with_its_call_id() -> None:
    seen: list[str] = []
    started: list[Usage] = []

    def reply(r: httpx2.Request) -> httpx2.Response:
        seen.append(r.headers.get("x-baton-call-id", ""))
        assert msgspec.json.decode(r.content)["stream"] is True
        return httpx2.Response(
            200, content=_tool_stream(), headers={"content-type": "text/event-stream"}
        )

    async def on_start(usage: Usage) -> None:
        started.append(usage)

    client = _client(reply)
    _, _, usage = await Classifier(client, "m", 64).classify("hi", "classify:m1#2", on_start)
    # message_start's input and cache counts, message_delta's output count.
    assert usage == Usage(input_tokens=11, output_tokens=9, cache_write_tokens=5)
    # The usage message_start reported was heard once, before the rest: what a dead agent's
    # record holds.
    assert started == [Usage(input_tokens=11, output_tokens=1, cache_write_tokens=5)]
    assert seen == ["classify:m1#2"]
    await client.close()


@pytest.mark.parametrize(
    ("body", "cause", "usage"),
    [
        (b"", StreamEnded, Usage()),
        (b"{not an event stream", StreamEnded, Usage()),
        (_sse(("message_start", {"message": "a string"})), anthropic.APIResponseValidationError,
         Usage()),
        (b"event: message_start\ndata: " + b"[" * 100_000 + b"\n\n",
         anthropic.APIResponseValidationError, Usage()),
        (_tool_stream()[: _tool_stream().index(b"event: message_delta")], StreamEnded,
         Usage(input_tokens=11, output_tokens=2, cache_write_tokens=5)),
        (_sse(("message_start", START),
              ("content_block_delta", {"index": 0, "delta": "not an object"})),
         anthropic.APIResponseValidationError,
         Usage(input_tokens=11, output_tokens=1, cache_write_tokens=5)),
        (_sse(("message_start", START),
              ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "x"}})),
         anthropic.APIStatusError, Usage(input_tokens=11, output_tokens=1, cache_write_tokens=5)),
    ],
    ids=["empty", "not-sse", "start-not-an-object", "deeply-nested", "cut-after-start",
         "garbled-delta", "error-event"],
)  # fmt: skip
async def test_a_stream_that_is_not_a_whole_messages_stream_fails_with_what_the_call_used(
    body: bytes, cause: type[Exception], usage: Usage
) -> None:
    client = _streaming(body)
    with pytest.raises(CallFailed) as failed:
        await Classifier(client, "m", 64).classify("hi")
    # The input message_start counted, and the deltas that came (one token each), are billed
    # even though the call failed.
    assert type(failed.value.cause) is cause and failed.value.usage == usage
    await client.close()


@pytest.mark.parametrize("text", ["plain", "", 'quote " and \\ slash', "café 🙂 —", "\n\t\x00"])
def test_the_offline_models_pre_encoded_frames_are_byte_for_byte_the_generic_ones(
    text: str,
) -> None:
    for kind, field in (("text_delta", "text"), ("input_json_delta", "partial_json")):
        fast = offline_model._DELTA_PREFIX[kind] + msgspec.json.encode(text)
        fast += offline_model._DELTA_SUFFIX
        slow = offline_model._frame(
            "content_block_delta", {"index": 0, "delta": {"type": kind, field: text}}
        )
        assert fast == slow
    text_start = {"index": 0, "content_block": {"type": "text", "text": ""}}
    assert offline_model._frame("content_block_start", text_start) == offline_model._TEXT_START


def test_sse_reader_needs_no_event_loop_tricks() -> None:
    assert asyncio.run(_events(STREAM)) == EXPECTED


def _recorder(
    sent: list[httpx2.Request], body: bytes, content_type: str
) -> Callable[[httpx2.Request], httpx2.Response]:
    def handler(request: httpx2.Request) -> httpx2.Response:
        sent.append(request)
        return httpx2.Response(200, content=body, headers={"content-type": content_type})

    return handler


# The SDK's markers of which of its helpers read the body (its usage statistics), nothing else.
_VOLATILE = {"x-stainless-stream-helper", "x-stainless-helper-method", "x-stainless-raw-response"}
_PER_CALL = {"traceparent", "tracestate"}


def _same_request(ours: httpx2.Request, sdks: httpx2.Request) -> None:
    assert (ours.method, str(ours.url)) == (sdks.method, str(sdks.url))
    assert msgspec.json.decode(ours.content) == msgspec.json.decode(sdks.content)
    mine = {k: v for k, v in ours.headers.items() if k not in _VOLATILE}
    theirs = {k: v for k, v in sdks.headers.items() if k not in _VOLATILE}
    # Each call's trace context names its own span (when a tracer provider is installed, as
    # other tests in the same process do): both carry one or neither, with their own values.
    assert mine.keys() == theirs.keys()
    assert {k: v for k, v in mine.items() if k not in _PER_CALL} == {
        k: v for k, v in theirs.items() if k not in _PER_CALL
    }


async def test_the_executor_sends_the_request_the_sdks_stream_helper_sends() -> None:
    """What a real API key meets at api.anthropic.com is what the SDK's own helper would send."""
    block = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    body = _sse(
        ("message_start", START),
        ("content_block_start", block),
        _delta("x"),
        ("message_stop", {"type": "message_stop"}),
    )
    sent: list[httpx2.Request] = []
    client = anthropic.AsyncAnthropic(
        api_key="sk-ant-real-looking",
        max_retries=0,
        http_client=httpx2.AsyncClient(
            transport=httpx2.MockTransport(_recorder(sent, body, "text/event-stream"))
        ),
    )
    system = [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}]
    messages = [{"role": "user", "content": "hi"}]

    async def on_text(text: str) -> None:
        pass

    await Model(client).stream("claude-x", system, messages, 99, on_text)
    async with client.messages.stream(
        model="claude-x",
        system=system,  # type: ignore[arg-type]
        messages=messages,  # type: ignore[arg-type]
        max_tokens=99,
    ) as stream:
        async for _ in stream:
            pass
    await client.close()
    ours, sdks = sent
    assert str(ours.url) == "https://api.anthropic.com/v1/messages"
    _same_request(ours, sdks)


async def test_the_agent_sends_the_request_the_sdks_create_sends() -> None:
    sent: list[httpx2.Request] = []
    client = anthropic.AsyncAnthropic(
        api_key="sk-ant-real-looking",
        max_retries=0,
        http_client=httpx2.AsyncClient(
            transport=httpx2.MockTransport(_recorder(sent, _tool_stream(), "text/event-stream"))
        ),
    )
    classifier = Classifier(client, "claude-haiku-x", 77)
    await classifier.classify("the transcript")
    stream = await client.messages.create(
        model="claude-haiku-x",
        max_tokens=77,
        system=core.SYSTEM_PROMPT,
        messages=[{"role": "user", "content": "the transcript"}],
        tools=classifier.tools,
        tool_choice=classifier.tool_choice,
        stream=True,
    )
    async for _ in stream:
        pass
    await client.close()
    _same_request(*sent)

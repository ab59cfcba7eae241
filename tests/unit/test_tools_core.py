"""Tool use, the pure parts: tool_use assembly from stream events, digests, content blocks,
the history's tool exchanges, the demo server's calculator and ledger."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import msgspec
import pytest

from baton.mcp_server import Ledger, calculate, read_ledger
from services.executor import core
from services.executor.adapters import Model
from shared import messages as m
from shared import subjects, wiring
from shared.history import NO_RESULT, Turn, assistant_blocks, interleave, tool_exchange


def _sse(*frames: tuple[str, Any]) -> bytes:
    return b"".join(
        b"event: %s\ndata: %s\n\n" % (name.encode(), msgspec.json.encode(data))
        for name, data in frames
    )


START = {
    "type": "message_start",
    "message": {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [],
        "usage": {"input_tokens": 11, "output_tokens": 1},
    },
}


def _block_start(index: int, block: dict[str, Any]) -> tuple[str, Any]:
    return "content_block_start", {
        "type": "content_block_start",
        "index": index,
        "content_block": block,
    }


def _delta(index: int, delta: dict[str, Any]) -> tuple[str, Any]:
    return "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}


def _stop(index: int) -> tuple[str, Any]:
    return "content_block_stop", {"type": "content_block_stop", "index": index}


def _end(stop_reason: str, output_tokens: int) -> list[tuple[str, Any]]:
    return [
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": output_tokens},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]


def _client(handler: Callable[[httpx2.Request], httpx2.Response]) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        api_key="test-key",
        base_url="http://model.test",
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)),
    )


async def _stream(body: bytes, tools: list[dict[str, Any]] | None) -> tuple[Any, dict[str, Any]]:
    sent: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        sent.append(request)
        return httpx2.Response(200, content=body, headers={"content-type": "text/event-stream"})

    async def on_text(_text: str) -> None:
        return None

    client = _client(handler)
    try:
        outcome = await Model(client).stream("m", [], [], 64, on_text, tools=tools)
    finally:
        await client.close()
    return outcome, msgspec.json.decode(sent[0].content)


TOOL = {"name": "create_task", "description": "d", "input_schema": {"type": "object"}}


async def test_a_streamed_tool_use_block_is_assembled_from_its_json_deltas() -> None:
    body = _sse(
        ("message_start", START),
        _block_start(0, {"type": "text", "text": ""}),
        _delta(0, {"type": "text_delta", "text": "Sure."}),
        _stop(0),
        _block_start(1, {"type": "tool_use", "id": "toolu_1", "name": "create_task", "input": {}}),
        _delta(1, {"type": "input_json_delta", "partial_json": ""}),
        _delta(1, {"type": "input_json_delta", "partial_json": '{"title": "ca'}),
        _delta(1, {"type": "input_json_delta", "partial_json": 'll John"}'}),
        _stop(1),
        *_end("tool_use", 17),
    )
    outcome, request = await _stream(body, [TOOL])
    assert request["tools"] == [TOOL]  # offered exactly as given
    assert outcome.text == "Sure." and outcome.stop_reason == "tool_use"
    assert outcome.usage.output_tokens == 17  # the call is billed once, with its tool input
    assert outcome.tool_calls == (
        m.ToolCall(
            id="toolu_1",
            name="create_task",
            input={"title": "call John"},
            input_digest=m.input_digest({"title": "call John"}),
        ),
    )


async def test_no_tools_means_no_tools_parameter_at_all() -> None:
    body = _sse(("message_start", START), *_end("end_turn", 1))
    outcome, request = await _stream(body, None)
    assert "tools" not in request and outcome.tool_calls == ()


def test_malformed_tool_input_is_kept_as_text_for_policy_to_refuse() -> None:
    uses = core.ToolUses()
    uses.start(0, "toolu_x", "create_task")
    uses.delta(0, '{"title": ')
    uses.stop(0)
    [call] = uses.calls()
    assert call.input == '{"title": '
    assert call.input_digest == m.input_digest('{"title": ')


def test_a_tool_use_without_deltas_takes_its_start_blocks_input() -> None:
    uses = core.ToolUses()
    uses.start(3, "toolu_y", "current_time", {"timezone": "UTC"})
    uses.stop(3)
    uses.start(4, "toolu_z", "never_finished")  # a block that never stopped is no call
    assert [(c.id, c.input) for c in uses.calls()] == [("toolu_y", {"timezone": "UTC"})]


def test_the_input_digest_is_the_sha256_of_canonical_json() -> None:
    import hashlib

    a = {"b": 1, "a": [1, {"y": 2, "x": 3}]}
    b = {"a": [1, {"x": 3, "y": 2}], "b": 1}
    assert m.input_digest(a) == m.input_digest(b)
    assert m.canonical_json(a) == b'{"a":[1,{"x":3,"y":2}],"b":1}'
    assert m.input_digest(a) == hashlib.sha256(b'{"a":[1,{"x":3,"y":2}],"b":1}').hexdigest()
    assert m.input_digest({"title": "call John"}) != m.input_digest({"title": "call Jane"})


def test_assistant_blocks_send_a_non_object_input_back_as_an_empty_object() -> None:
    bad = m.ToolCall(id="t1", name="x", input="[1,", input_digest=m.input_digest("[1,"))
    assert assistant_blocks("", [bad]) == [
        {"type": "tool_use", "id": "t1", "name": "x", "input": {}}
    ]


def test_a_tool_exchange_answers_each_tool_use_in_order_and_says_when_a_result_is_missing() -> None:
    content = [
        {"type": "text", "text": "Two things."},
        {"type": "tool_use", "id": "a", "name": "create_task", "input": {"title": "x"}},
        {"type": "tool_use", "id": "b", "name": "current_time", "input": {}},
    ]
    assistant, user = tool_exchange(
        content, [{"tool_use_id": "b", "content": "noon", "is_error": False}]
    )
    assert assistant.blocks == tuple(content)
    assert [(b["tool_use_id"], b["is_error"], b["content"]) for b in user.blocks] == [
        ("a", True, NO_RESULT),
        ("b", False, "noon"),
    ]


def test_build_messages_keeps_blocks_and_never_starts_inside_a_tool_exchange() -> None:
    content = [{"type": "tool_use", "id": "a", "name": "t", "input": {}}]
    exchange = tool_exchange(content, [{"tool_use_id": "a", "content": "done", "is_error": False}])
    turns = [Turn("user", "first"), *exchange, Turn("assistant", "answer"), Turn("user", "next")]
    full = core.build_messages(turns, 10_000)
    assert [t["role"] for t in full] == ["user", "assistant", "user", "assistant", "user"]
    assert full[1]["content"] == content
    # A window cut after the first question would start with the tool_result: it is dropped.
    cut = core.build_messages(turns[2:], 10_000)
    assert (
        cut == [{"role": "assistant", "content": "answer"}, {"role": "user", "content": "next"}][1:]
    )


def test_text_after_tool_results_merges_into_their_user_turn_as_blocks() -> None:
    content = [{"type": "tool_use", "id": "a", "name": "t", "input": {}}]
    exchange = tool_exchange(content, [{"tool_use_id": "a", "content": "r", "is_error": False}])
    # A run that ended without an answer (say, refused after the tool), then a new question.
    turns = [Turn("user", "q1"), *exchange, Turn("user", "q2")]
    out = core.build_messages(turns, 10_000)
    assert out[-1]["content"] == [*exchange[1].blocks, {"type": "text", "text": "q2"}]


def test_interleave_puts_a_runs_exchanges_between_its_question_and_its_answer() -> None:
    import uuid

    q, a = uuid.uuid4(), uuid.uuid4()
    ex = [Turn("assistant", "x", ({"type": "text", "text": "x"},)), Turn("user", "y")]
    turns = interleave([(q, "user", "q", None), (a, "assistant", "a", q)], {q: ex})
    assert [t.content for t in turns] == ["q", "x", "y", "a"]


def test_tool_result_text_joins_text_parts_and_falls_back_to_structured_content() -> None:
    class Part:
        def __init__(self, type: str, text: str | None = None) -> None:
            self.type, self.text = type, text

    assert core.tool_result_text([Part("text", "a"), Part("image")]) == "a\n[image content]"
    assert core.tool_result_text([], {"ok": True}) == '{"ok":true}'


def test_call_ids_become_safe_subject_tokens() -> None:
    record = subjects.tool_call_record("run-1", "toolu_01AbC")
    assert subjects.is_safe_token(record.removeprefix("tool.call."))
    assert subjects.is_safe_token(
        subjects.tool_call_record("r", "a.b>*").removeprefix("tool.call.")
    )
    # The same tool_use id in another run is another call, with its own record.
    assert subjects.tool_call_record("run-2", "toolu_01AbC") != record


@pytest.mark.parametrize(
    ("expression", "value"),
    [("1 + 2 * 3", 7), ("(2 + 3) * 4", 20), ("7 / 2", 3.5), ("-3 ** 2", -9), ("10 % 4", 2)],
)
def test_the_calculator_does_arithmetic(expression: str, value: float) -> None:
    assert calculate(expression) == value


@pytest.mark.parametrize(
    "expression", ["__import__('os')", "a + 1", "9 ** 999", "True + 1", "[1, 2]", "1/0", "1 +"]
)
def test_the_calculator_refuses_anything_but_arithmetic(expression: str) -> None:
    with pytest.raises((ValueError, SyntaxError, ZeroDivisionError)):
        calculate(expression)


async def test_the_ledger_runs_a_key_once_and_remembers_it_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    made = iter(range(100))

    def make() -> dict[str, Any]:
        return {"n": next(made)}

    ledger = Ledger(path)
    first = await ledger.execute("create_task", "k1", make)
    again = await asyncio.gather(*(ledger.execute("create_task", "k1", make) for _ in range(5)))
    unkeyed = [await ledger.execute("create_task", "", make) for _ in range(2)]
    assert first == ({"n": 0}, True)
    assert again == [({"n": 0}, False)] * 5
    assert [r for r, ran in unkeyed] == [{"n": 1}, {"n": 2}]
    restarted = Ledger(path)
    assert await restarted.execute("create_task", "k1", make) == ({"n": 0}, False)
    assert [e["result"]["n"] for e in read_ledger(path)] == [0, 1, 2]


@pytest.mark.parametrize(
    ("recorded", "idempotent", "digest_matches", "expired", "step"),
    [
        ("none", False, True, False, "start"),
        ("none", True, True, False, "start"),
        ("none", False, True, True, "expired"),
        ("started", False, True, False, "unknown"),  # may have run: never twice
        ("started", True, True, False, "rerun"),  # with the call id as idempotency key
        ("started", True, True, True, "rerun"),  # it started in time
        ("finished", False, True, False, "republish"),
        ("finished", True, True, True, "republish"),
        ("none", True, False, False, "invalid"),
        ("started", True, False, False, "invalid"),
        ("finished", True, False, False, "invalid"),
    ],
)
def test_what_a_tool_task_delivery_does(
    recorded: Any, idempotent: bool, digest_matches: bool, expired: bool, step: str
) -> None:
    assert core.tool_step(recorded, idempotent, digest_matches, expired) == step


def test_only_a_tool_use_stop_with_calls_is_a_tool_turn() -> None:
    from services.persister.core import is_tool_turn

    call = m.ToolCall(id="t", name="x", input={}, input_digest=m.input_digest({}))
    base = m.ExecResult(
        event_id="e", message_id="m", conversation_id="c", project_id="p", task_id="t",
        call_id="c1", run_id="r", attempt=1, model="m", text="", usage=m.Usage(),
        prices=m.Prices(),
    )  # fmt: skip
    assert is_tool_turn(msgspec.structs.replace(base, stop_reason="tool_use", tool_calls=(call,)))
    assert not is_tool_turn(msgspec.structs.replace(base, stop_reason="tool_use"))
    assert not is_tool_turn(
        msgspec.structs.replace(base, stop_reason="max_tokens", tool_calls=(call,))
    )
    assert not is_tool_turn(base)


TOOL_BUILDERS = [subjects.tool_task, subjects.tool_result, subjects.tool_requested,
                 subjects.tool_approval]  # fmt: skip


@pytest.mark.parametrize("build", TOOL_BUILDERS, ids=lambda b: b.__name__)
def test_tool_subjects_are_captured_by_the_tools_stream_and_no_other(build: Any) -> None:
    from tests.unit.test_shared import covers

    subject = build("acme", "c1")
    streams = list(subjects.STREAMS)
    assert [s.name for s in streams if any(covers(p, subject) for p in s.subjects)] == ["TOOLS"]
    record = subjects.tool_call_record("run-1", "toolu_1")
    assert [s.name for s in streams if any(covers(p, record) for p in s.subjects)] == ["TOOLS"]


@pytest.mark.parametrize("build", [subjects.persisted_tool_turn, subjects.persisted_tool_result])
def test_persisted_tool_subjects_are_never_read_as_user_or_assistant_messages(build: Any) -> None:
    subject = build("acme", "c1")
    assert subject.startswith("chat.persisted.")
    assert not subject.startswith(
        (subjects.PREFIX_PERSISTED_USER, subjects.PREFIX_PERSISTED_ASSISTANT)
    )
    from tests.unit.test_shared import covers

    for spec in (wiring.AGENT_IN, wiring.POLICY_OUTCOMES):
        assert not covers(spec.filter_subject, subject)
    from services.gateway.core import push_event

    assert any(covers(p, subject) for p in subjects.PUSH_SUBJECTS)
    if build is subjects.persisted_tool_turn:
        assert push_event(subject, b"{}") is None  # the gateway hears it and pushes nothing
        return
    # A stored result is the client's tool.result event, never a message.
    r = m.ToolResult(
        event_id="toolresult:run-1:toolu_1",
        message_id="m1",
        conversation_id="c1",
        project_id="acme",
        run_id="run-1",
        round=0,
        call_id="toolu_1",
        name="create_task",
        outcome="ok",
        is_error=False,
        content="done",
    )
    stored = m.ToolResultPersisted(
        event_id="persisted:toolresult:run-1:toolu_1",
        message_id="m1",
        conversation_id="c1",
        project_id="acme",
        result=r,
    )
    pushed = push_event(subject, m.encode(stored))
    assert pushed is not None
    assert pushed[:2] == ("tool.result", "tool:run-1:toolu_1:result")

"""baton's push events as AI SDK UI message chunks (services/gateway/ai_sdk.py), pure."""

from __future__ import annotations

import pytest

from services.gateway import ai_sdk, core

RUN = "run-00000000-0000-4000-8000-000000000001"


def tok(attempt: int, seq: int, text: str) -> tuple[str, dict[str, object]]:
    return "token", {"run_id": RUN, "attempt": attempt, "seq": seq, "text": text}


def status(s: str, attempt: int = 1) -> tuple[str, dict[str, object]]:
    return "run.status", {"run_id": RUN, "status": s, "attempt": attempt, "reason": ""}


def done(content: str, event: str = "message.completed") -> tuple[str, dict[str, object]]:
    return event, {"run_id": RUN, "content": content}


def play(*events: tuple[str, dict[str, object]]) -> list[dict[str, object]]:
    parts = ai_sdk.Parts(RUN)
    out = parts.begin()
    for event, data in events:
        out += parts.on(event, data)
    return [p for p in out if p["type"] != "data-baton-status"]


def text_of(chunks: list[dict[str, object]]) -> str:
    """The text a stock client ends with (reset-step drops the current step's parts)."""
    steps: list[list[str]] = [[]]
    for c in chunks:
        if c["type"] == "reset-step":
            steps[-1] = []
        elif c["type"] == "text-delta":
            steps[-1].append(str(c["delta"]))
    return "".join("".join(s) for s in steps)


def test_an_answer_is_start_text_and_finish() -> None:
    chunks = play(status("running"), tok(1, 0, "Hel"), tok(1, 1, "lo"), done("Hello"))
    assert [c["type"] for c in chunks] == [
        "start", "start-step", "text-start", "text-delta", "text-delta", "text-end",
        "finish-step", "finish",
    ]  # fmt: skip
    assert chunks[0] == {"type": "start", "messageId": RUN}
    assert chunks[-1] == {"type": "finish", "finishReason": "stop"} and text_of(chunks) == "Hello"


def test_a_repeated_token_is_sent_once_and_the_stored_text_fills_a_gap() -> None:
    chunks = play(tok(1, 0, "a "), tok(1, 0, "a "), tok(1, 1, "b "), done("a b c"))
    assert text_of(chunks) == "a b c"
    assert [c.get("delta") for c in chunks if c["type"] == "text-delta"] == ["a ", "b ", "c"]


def test_a_retry_drops_the_partial_text_of_the_attempt_before() -> None:
    chunks = play(
        tok(1, 0, "old "), status("running", 2), tok(2, 0, "new"), tok(1, 1, "late"), done("new")
    )
    assert text_of(chunks) == "new"
    assert "reset-step" in [c["type"] for c in chunks]
    # Tokens of the newer attempt first (its status came later): the same.
    assert text_of(play(tok(1, 0, "old "), tok(2, 0, "new"), done("new"))) == "new"


def test_a_stored_text_unlike_the_stream_replaces_it() -> None:
    assert text_of(play(tok(1, 0, "draft"), done("final"))) == "final"


def test_a_failure_is_an_error_part_and_a_cancel_an_abort() -> None:
    failed = play(tok(1, 0, "x"), done("The model failed.", "run.failed"))
    assert {"type": "error", "errorText": "The model failed."} in failed
    assert failed[-1] == {"type": "finish", "finishReason": "error"}
    cancelled = play(tok(1, 0, "x"), status("cancelled"))
    assert cancelled[-1] == {"type": "abort", "reason": "cancelled"}


def test_events_of_other_runs_are_ignored() -> None:
    parts = ai_sdk.Parts(RUN)
    assert parts.on("token", {"run_id": "run-other", "attempt": 1, "seq": 0, "text": "x"}) == []


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"", "invalid_body"),
        (b"[]", "invalid_body"),
        (b'{"id": "c", "messages": []}', "no_user_message"),
        (b'{"id": "", "messages": [{"id": "m", "role": "user"}]}', "invalid_id"),
        (b'{"id": "c", "trigger": "regenerate-message", "messages": [{"id": "m", "role": "user"}]}',
         "unsupported_trigger"),
    ],
)  # fmt: skip
def test_a_bad_body_is_a_clear_4xx(raw: bytes, code: str) -> None:
    with pytest.raises(core.ApiError) as err:
        ai_sdk.parse_body(raw)
    assert err.value.code == code and 400 <= err.value.status < 500


def test_a_chat_id_maps_to_a_conversation_of_the_caller_only() -> None:
    alice, bob = core.Principal("p", "alice"), core.Principal("p", "bob")
    key = b"k" * 32
    assert ai_sdk.conversation_of(alice, "abc", key) == ai_sdk.conversation_of(alice, "abc", key)
    assert ai_sdk.conversation_of(alice, "abc", key) != ai_sdk.conversation_of(bob, "abc", key)
    cid = "0A1B2C3D-0000-4000-8000-000000000000"
    assert ai_sdk.conversation_of(bob, cid, key) == cid.lower()


# ---- tool calls (issue 18): the chunks the pinned `ai` package parses --------------------------

CID = "00000000-0000-4000-8000-0000000000c1"


def requested(call: str = "toolu_1", attempt: int = 1) -> tuple[str, dict[str, object]]:
    return "tool.requested", {
        "run_id": RUN,
        "tool_call_id": call,
        "tool": "create_task",
        "server": "demo",
        "arguments": {"title": "call John"},
        "input_digest": "d" * 64,
        "round": 0,
        "expires_at": "2026-12-02T00:10:00+00:00",
    }


def result(
    call: str = "toolu_1", outcome: str = "ok", is_error: bool = False, content: str = '{"a":1}'
) -> tuple[str, dict[str, object]]:
    return "tool.result", {
        "run_id": RUN,
        "tool_call_id": call,
        "tool": "create_task",
        "round": 0,
        "outcome": outcome,
        "is_error": is_error,
        "content": content,
    }


def play_in(*events: tuple[str, dict[str, object]]) -> list[dict[str, object]]:
    parts = ai_sdk.Parts(RUN, CID)
    out = parts.begin()
    for event, data in events:
        out += parts.on(event, data)
    return [p for p in out if p["type"] != "data-baton-status"]


def test_an_ask_call_is_its_input_an_approval_request_then_its_output() -> None:
    chunks = play_in(
        tok(1, 0, "Sure"),
        status("requires_action"),
        requested(),
        requested(),  # a replayed request: once
        status("running", 2),
        result(),
        result(),  # a repeat: once
        tok(2, 0, "Done: "),
        done("Done: task 1"),
    )
    assert [c["type"] for c in chunks] == [
        "start",
        "start-step",
        "text-start",
        "text-delta",
        "text-end",
        "tool-input-available",
        "tool-approval-request",
        "finish-step",
        "start-step",
        "tool-output-available",
        "text-start",
        "text-delta",
        "text-delta",
        "text-end",
        "finish-step",
        "finish",
    ]
    call = {"toolCallId": "toolu_1", "dynamic": True, "providerExecuted": True}
    assert chunks[5] == {
        "type": "tool-input-available",
        **call,
        "toolName": "create_task",
        "input": {"title": "call John"},
    }
    approval = chunks[6]
    assert approval["approvalId"] == "toolu_1" and approval["toolCallId"] == "toolu_1"
    assert approval["approvalDescriptor"] == {
        "conversation_id": CID,
        "run_id": RUN,
        "tool_call_id": "toolu_1",
        "server": "demo",
        "input_digest": "d" * 64,
        "expires_at": "2026-12-02T00:10:00+00:00",
        "approvals_url": f"/api/conversations/{CID}/runs/{RUN}/tool-approvals",
    }
    assert chunks[9] == {"type": "tool-output-available", **call, "output": '{"a":1}'}
    assert text_of(chunks) == "SureDone: task 1"  # the tool step is not reset


def test_an_auto_call_starts_at_its_result_without_input() -> None:
    chunks = play_in(tok(1, 0, "Let me look. "), result("toolu_a"), tok(2, 0, "It is noon."))
    types = [c["type"] for c in chunks]
    assert types[5:] == [
        "tool-input-start",
        "tool-output-available",
        "finish-step",
        "start-step",
        "text-start",
        "text-delta",
    ]
    assert chunks[5] == {
        "type": "tool-input-start",
        "toolCallId": "toolu_a",
        "dynamic": True,
        "providerExecuted": True,
        "toolName": "create_task",
    }


def test_a_refused_ask_call_is_denied_and_a_failed_call_is_an_error() -> None:
    denied = play_in(requested(), result(outcome="denied", is_error=True, content="no"))
    assert denied[-1] == {"type": "tool-output-denied", "toolCallId": "toolu_1"}
    failed = play_in(requested(), result(outcome="error", is_error=True, content="boom"))
    assert failed[-1]["type"] == "tool-output-error" and failed[-1]["errorText"] == "boom"
    policy_denied = play_in(result(outcome="denied", is_error=True, content="not allowed"))
    assert [c["type"] for c in policy_denied[-2:]] == ["tool-input-start", "tool-output-error"]


def test_a_retry_after_a_tool_round_still_drops_only_the_failed_attempt() -> None:
    chunks = play_in(result("toolu_a"), tok(2, 0, "half"), status("running", 3), tok(3, 0, "whole"))
    assert text_of(chunks) == "whole"
    assert "tool-output-available" in [c["type"] for c in chunks]

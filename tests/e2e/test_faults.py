"""Each model failure class through the whole pipeline, with the exact outcome a user sees."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from baton.embedded import PostgresServer
from tests.conftest import ExternalPostgres
from tests.e2e.conftest import SETTLE_S, Pipeline, calls_for, fresh, module_stack

pytestmark = pytest.mark.e2e

ANSWER_MODEL = "claude-sonnet-4-6"
AGENT_MODEL = "claude-haiku-4-5"


@pytest.fixture(scope="module")
def _faulty_stack(
    postgres_server: PostgresServer | ExternalPostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    # A short stall timeout so a stalled stream is noticed in a test's time.
    extra = {"EXECUTOR_STALL_TIMEOUT_S": "1.5"}
    yield from module_stack(postgres_server, tmp_path_factory.mktemp("faulty"), extra)


@pytest.fixture
def faulty(_faulty_stack: Pipeline) -> Pipeline:
    """The module's one stack, no faults left from an earlier test; tests count their own calls."""
    return fresh(_faulty_stack)


def _ask(p: Pipeline, content: str, final_verdict: str = "approve") -> dict[str, Any]:
    """Submit one message and wait for its final outcome; returns messages and state.

    The run row is eventually consistent (the reply and the verdict travel on different
    consumers), so this waits for the verdict expected at the end, too.
    """
    auth = {"Authorization": f"Bearer {p.token('acme', 'alice')}"}
    cid = str(uuid.uuid4())
    r = httpx.post(
        f"{p.gateway}/api/chat",
        json={"conversation_id": cid, "content": content},
        headers={**auth, "Idempotency-Key": cid},
    )
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        msgs = httpx.get(f"{p.gateway}/api/conversations/{cid}/messages", headers=auth)
        state = httpx.get(f"{p.gateway}/api/conversations/{cid}/state", headers=auth)
        if msgs.status_code == 404:  # not stored yet
            time.sleep(0.1)
            continue
        messages, runs = msgs.json()["messages"], state.json()["runs"]
        final = runs and runs[0]["status"] in ("completed", "failed")
        if len(messages) == 2 and final and runs[0]["verdict"] == final_verdict:
            return {"messages": messages, "run": runs[0]}
        time.sleep(0.1)
    raise AssertionError(f"no outcome in time\n{p.log_tail()}")


def _calls(p: Pipeline, out: dict[str, Any], model: str = ANSWER_MODEL) -> list[dict[str, Any]]:
    """The model calls made for this test's message (the stack is the module's)."""
    return calls_for(p, out["messages"][0]["id"], model)


@pytest.mark.parametrize(
    ("fault", "first_outcome"),
    [
        ({"kind": "429"}, "429"),
        ({"kind": "500"}, "500"),
        ({"kind": "529"}, "529"),
        ({"kind": "midstream_error", "after_tokens": 3}, "midstream_error"),
        ({"kind": "stall", "after_tokens": 2, "stall_seconds": 30}, "stall"),
    ],
    ids=["rate-limited", "server-error", "overloaded", "error-mid-stream", "stalled-stream"],
)
def test_a_transient_model_failure_is_retried_by_policy_and_both_calls_are_billed(
    faulty: Pipeline, fault: dict[str, Any], first_outcome: str
) -> None:
    faulty.model.set_faults([{**fault, "model": ANSWER_MODEL, "count": 1}])
    out = _ask(faulty, "What is a durable consumer?")
    answer = out["messages"][1]
    assert (answer["role"], answer["kind"]) == ("assistant", "answer") and answer["content"]
    run = out["run"]
    assert (run["status"], run["attempts"]) == ("completed", 2)
    calls = _calls(faulty, out)
    assert sorted(c["outcome"] for c in calls) == sorted([first_outcome, "completed"])
    # Both calls are billed with exactly what the model served (a cut stream's partial tokens too).
    assert run["usage"]["calls"] == 2
    assert run["usage"]["output_tokens"] == sum(c["output_tokens"] for c in calls)
    assert run["usage"]["input_tokens"] == sum(c["input_tokens"] for c in calls)


def test_a_model_that_keeps_failing_ends_in_one_failure_notice(faulty: Pipeline) -> None:
    faulty.model.set_faults([{"kind": "529", "model": ANSWER_MODEL, "count": -1}])
    out = _ask(faulty, "Tell me about backpressure", final_verdict="stop")
    notice = out["messages"][1]
    assert (notice["role"], notice["kind"]) == ("assistant", "failure")
    assert "overloaded" in notice["content"]
    run = out["run"]
    assert (run["status"], run["verdict"], run["attempts"]) == ("failed", "stop", 3)
    assert run["usage"]["calls"] == 3 and run["usage"]["output_tokens"] == 0
    assert len(_calls(faulty, out)) == 3


def test_a_request_the_model_refuses_as_invalid_is_not_retried(faulty: Pipeline) -> None:
    faulty.model.set_faults([{"kind": "400", "model": ANSWER_MODEL, "count": -1}])
    out = _ask(faulty, "Summarise this", final_verdict="stop")
    assert out["messages"][1]["kind"] == "failure"
    assert "bad_request" in out["messages"][1]["content"]
    run = out["run"]
    assert (run["status"], run["attempts"], run["usage"]["calls"]) == ("failed", 1, 1)
    assert [c["outcome"] for c in _calls(faulty, out)] == ["400"]


def test_a_failing_classifier_falls_back_to_rules_and_the_message_is_still_answered(
    faulty: Pipeline,
) -> None:
    faulty.model.set_faults([{"kind": "500", "model": AGENT_MODEL, "count": -1}])
    out = _ask(faulty, "Please fix this python function")
    assert out["messages"][1]["kind"] == "answer"
    run = out["run"]
    assert run["status"] == "completed"
    # The rule-based decision saw "python function": the code executor.
    assert (run["executor"], run["reason"]) == ("code", "intent=code complexity=low")
    # One classifier call, which failed (no retry of it, none completed).
    assert [c["outcome"] for c in _calls(faulty, out, AGENT_MODEL)] == ["500"]

"""The estimate of a call cut by its executor's death (shared/estimate.py), by table."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from shared import estimate
from shared import messages as m

START = m.Usage(input_tokens=120, output_tokens=1, cache_read_tokens=30, cache_write_tokens=7)


def _record(state: str = "started") -> estimate.ModelCallRecord:
    return estimate.ModelCallRecord(
        call_id="task:r:1#1",
        task_id="task:r:1",
        state=state,
        at=datetime.now(UTC),
        usage=START,  # type: ignore[arg-type]
    )


def _push(seq: int, text: str, pieces: int) -> m.TokenDelta:
    return m.TokenDelta(
        conversation_id="c", run_id="r", attempt=1, seq=seq, text=text, pieces=pieces
    )


@pytest.mark.parametrize(
    ("pushes", "output"),
    [
        ([], 1),  # nothing streamed: message_start's own count
        ([_push(1, "Hello", 1)], 1),
        ([_push(1, "Hello there", 2), _push(2, " my friend", 3)], 5),
        ([_push(1, "x" * 40, 0)], 10),  # a push without a count: four characters a token
    ],
)
def test_a_started_call_is_estimated_from_its_start_and_its_pushes(
    pushes: list[m.TokenDelta], output: int
) -> None:
    assert estimate.estimate(_record(), pushes) == m.Usage(
        input_tokens=120, output_tokens=output, cache_read_tokens=30, cache_write_tokens=7
    )


def test_a_finished_call_is_not_estimated() -> None:
    assert estimate.estimate(_record("finished"), [_push(1, "Hi", 1)]) is None


def test_the_earlier_calls_of_a_delivery_are_its_predecessors() -> None:
    assert estimate.earlier_calls("task:r:1", 1) == []
    assert estimate.earlier_calls("task:r:1", 3) == ["task:r:1#1", "task:r:1#2"]


def test_record_subjects_are_one_safe_token_per_call() -> None:
    a, b = estimate.record_subject("task:r:1#1"), estimate.record_subject("task:r:1#2")
    assert a != b
    assert a.startswith("exec.call.") and a.count(".") == 2


def test_every_delivery_of_a_task_may_have_made_a_call_and_each_is_billed_by_its_own_id() -> None:
    assert estimate.task_calls("task:r:1", 2) == ["task:r:1#1", "task:r:1#2"]
    assert estimate.usage_id("task:r:1#2") == "usage:task:r:1#2"
    # An estimate of a call is a message of its own: a late exact usage is not its duplicate.
    assert estimate.estimate_id("task:r:1#2") == "estimate:task:r:1#2"


@pytest.mark.parametrize(
    ("headers", "base"),
    [
        (None, 0),
        ({}, 0),
        ({"Nats-Msg-Id": "x"}, 0),
        ({estimate.DELIVERY_BASE_HEADER: "21"}, 21),
        ({estimate.DELIVERY_BASE_HEADER: "0"}, 0),
        ({estimate.DELIVERY_BASE_HEADER: str(estimate.MAX_DELIVERY_BASE)}, 1_000),
        # Hostile or broken: never believed, never an error.
        ({estimate.DELIVERY_BASE_HEADER: str(estimate.MAX_DELIVERY_BASE + 1)}, 0),
        ({estimate.DELIVERY_BASE_HEADER: "9" * 5000}, 0),
        ({estimate.DELIVERY_BASE_HEADER: "-3"}, 0),
        ({estimate.DELIVERY_BASE_HEADER: " 4"}, 0),
        ({estimate.DELIVERY_BASE_HEADER: "1e3"}, 0),
        ({estimate.DELIVERY_BASE_HEADER: "\u0663"}, 0),
        ({estimate.DELIVERY_BASE_HEADER: ""}, 0),
    ],
)
def test_a_replayed_copys_delivery_base_is_read_from_its_header(
    headers: dict[str, str] | None, base: int
) -> None:
    assert estimate.delivery_base(headers) == base
    assert estimate.delivery(2, headers) == base + 2


def test_a_delivery_the_broker_did_not_count_is_the_first() -> None:
    assert estimate.delivery(None, None) == 1
    assert estimate.delivery(0, {estimate.DELIVERY_BASE_HEADER: "21"}) == 22

"""Executor pure logic: prompt building, delta coalescing, failure classes."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from services.executor.core import Coalescer, Turn, build_messages, classify

U, A = "user", "assistant"


def msgs(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in pairs]


@pytest.mark.parametrize(
    ("history", "budget", "expected"),
    [
        ([], 100, []),
        ([(U, "a"), (U, "b"), (A, "c"), (A, "d"), (U, "e")], 100,
         [(U, "a\n\nb"), (A, "c\n\nd"), (U, "e")]),
        ([(A, "hi"), (U, "q")], 100, [(U, "q")]),
        ([(A, "x"), (A, "y"), (U, "q")], 100, [(U, "q")]),
        ([(U, "1" * 40), (A, "2" * 40), (U, "3" * 40)], 30,
         [(U, "1" * 40), (A, "2" * 40), (U, "3" * 40)]),
        ([(U, "1" * 40), (A, "2" * 40), (U, "3" * 40)], 29, [(U, "3" * 40)]),
        ([(U, "old"), (A, "ok"), (U, "n" * 4000)], 1, [(U, "n" * 4000)]),
    ],
    ids=["empty", "merges-same-role", "drops-leading-assistant", "drops-merged-leading",
         "all-fit", "drops-oldest-first", "newest-always-kept"],
)  # fmt: skip
def test_build_messages_makes_alternating_turns_within_budget(
    history: list[tuple[str, str]], budget: int, expected: list[tuple[str, str]]
) -> None:
    assert build_messages([Turn(r, c) for r, c in history], budget) == msgs(*expected)


def test_coalescer_flushes_when_the_batch_is_big_enough() -> None:
    c = Coalescer(max_chars=10, max_age_s=1.0)
    assert [c.add("abc", 0.0), c.add("defghij", 0.1), c.add("k", 0.2)] == [None, "abcdefghij", None]


def test_coalescer_flushes_when_the_batch_is_old_enough() -> None:
    c = Coalescer(max_chars=100, max_age_s=1.0)
    assert [c.add("a", 5.0), c.add("b", 5.9), c.add("c", 6.0)] == [None, None, "abc"]


def test_coalescer_flush_returns_the_rest_then_none() -> None:
    c = Coalescer(max_chars=100, max_age_s=1.0)
    c.add("tail", 0.0)
    assert [c.flush(), c.flush()] == ["tail", None]


def test_coalescer_counts_the_pieces_of_each_batch() -> None:
    c = Coalescer(max_chars=10, max_age_s=1.0)
    c.add("abc", 0.0)
    assert (c.add("defghij", 0.1), c.taken) == ("abcdefghij", 2)
    c.add("k", 0.2)
    assert (c.flush(), c.taken) == ("k", 1)


REQUEST = httpx.Request("POST", "http://x")


def status_error(status: int, body: object = None) -> anthropic.APIStatusError:
    response = httpx.Response(status, request=REQUEST)
    return anthropic.APIStatusError(f"status {status}", response=response, body=body)


def stream_error(kind: str) -> anthropic.APIStatusError:
    return status_error(200, {"type": "error", "error": {"type": kind, "message": "x"}})


def resp(status: int) -> httpx.Response:
    return httpx.Response(status, request=REQUEST)


@pytest.mark.parametrize(
    ("exc", "error_class"),
    [
        (anthropic.RateLimitError("x", response=resp(429), body=None), "rate_limited"),
        (anthropic.OverloadedError("x", response=resp(529), body=None), "overloaded"),
        (anthropic.InternalServerError("x", response=resp(500), body=None), "server_error"),
        (anthropic.BadRequestError("x", response=resp(400), body=None), "bad_request"),
        (status_error(429), "rate_limited"),
        (status_error(529), "overloaded"),
        (status_error(503), "server_error"),
        (status_error(408), "timeout"),
        (status_error(401), "bad_request"),
        (stream_error("overloaded_error"), "overloaded"),
        (stream_error("rate_limit_error"), "rate_limited"),
        (stream_error("api_error"), "cut_stream"),
        (status_error(200, "not a dict"), "cut_stream"),
        (status_error(200, {"error": "flat"}), "cut_stream"),
        (anthropic.APITimeoutError(request=REQUEST), "timeout"),
        (anthropic.APIConnectionError(request=REQUEST), "server_error"),
        (httpx.ReadTimeout("stalled mid-stream"), "timeout"),
        (TimeoutError(), "timeout"),
        (RuntimeError("stream ended"), "cut_stream"),
    ],
)
def test_classify_maps_sdk_errors_to_failure_classes(exc: BaseException, error_class: str) -> None:
    assert classify(exc) == error_class


def test_an_abort_by_policy_is_classified_as_cancelled() -> None:
    from services.executor.core import CallAborted

    assert classify(CallAborted("stop")) == "cancelled"

"""The HTTP edge's connection bookkeeping and its refusals (services/gateway/limits.py)."""

from __future__ import annotations

import json

from services.gateway.limits import (
    HEAD_TOO_LARGE,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_FROM_CLIENT,
    Connections,
    refusal,
)


def test_a_client_over_its_share_is_refused_and_not_counted() -> None:
    c = Connections(max_total=10, max_per_client=2)
    assert c.admit("a") is None
    assert c.admit("a") is None
    assert c.admit("a") == TOO_MANY_FROM_CLIENT
    assert (c.total, c.by_client) == (2, {"a": 2})
    assert c.admit("b") is None


def test_the_total_is_refused_whatever_the_address() -> None:
    c = Connections(max_total=2, max_per_client=5)
    assert c.admit("a") is None
    assert c.admit("b") is None
    assert c.admit("c") == TOO_MANY_CONNECTIONS


def test_a_released_slot_is_usable_again_and_idle_addresses_are_forgotten() -> None:
    c = Connections(max_total=1, max_per_client=1)
    assert c.admit("a") is None
    c.release("a")
    assert (c.total, c.by_client) == (0, {})
    assert c.admit("a") is None


def test_a_refusal_is_a_whole_response_that_closes_the_connection() -> None:
    raw = refusal(*HEAD_TOO_LARGE)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert b"connection: close" in lines
    assert f"content-length: {len(body)}".encode() in lines
    assert json.loads(body) == {
        "error": {"status": 431, "code": "headers_too_large", "message": HEAD_TOO_LARGE[2]}
    }


def test_connection_refusals_say_when_to_retry() -> None:
    assert b"retry-after: 1\r\n" in refusal(*TOO_MANY_FROM_CLIENT)
    assert b"retry-after" not in refusal(*HEAD_TOO_LARGE)

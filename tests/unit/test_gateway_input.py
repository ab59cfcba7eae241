"""Hostile request bytes: invalid UTF-8 bodies and Idempotency-Key bytes outside visible ASCII."""

from __future__ import annotations

import pytest

from services.gateway import core as gw
from services.gateway.core import ApiError
from services.gateway.edge import failure_fields

SECRET_TEXT = b"my password is hunter2"


@pytest.mark.parametrize(
    "body",
    [
        b'{"content":"my password is hunter2 \xff"}',
        b'{"content":"my password is hunter2 \xc3"}',  # a sequence cut short
        b'{"content":"my password is hunter2 \xed\xa0\x80"}',  # an encoded surrogate
        b'{"content":"my password is hunter2", "conversation_id": "\xfe"}',
        b'{"content":"my password is hunter2", "\xff": 1}',
    ],
)
def test_invalid_utf8_in_a_body_is_a_400_that_quotes_nothing(body: bytes) -> None:
    with pytest.raises(ApiError) as info:
        gw.parse_chat(body, max_chars=1000)
    assert (info.value.status, info.value.code) == (400, "invalid_json")
    assert "hunter2" not in info.value.message
    assert info.value.__cause__ is None and info.value.__suppress_context__


# What a header's bytes become when decoded as latin-1 (as both routes read headers).
def latin1(raw: bytes) -> str:
    return raw.decode("latin-1")


@pytest.mark.parametrize(
    "key",
    [
        latin1("été".encode()),  # UTF-8 bytes
        latin1("ключ".encode()),
        latin1(b"caf\xe9"),  # latin-1 bytes
        "order-42 retry",  # a space is not visible
        "tab\there", "a\nb", "a\x00", "\x7f", "",
        "k" * 256,
    ],
)  # fmt: skip
def test_an_idempotency_key_outside_visible_ascii_is_a_400(key: str) -> None:
    with pytest.raises(ApiError) as info:
        gw.check_idempotency_key(key, 255)
    assert (info.value.status, info.value.code) == (400, "invalid_idempotency_key")


@pytest.mark.parametrize(
    "key", [None, "k", "k" * 255, "!", "~", "order-42_retry", "6f9619ff-8b86-d011-b42d-00c04fc964ff",
            "a:b/c=d+e;f,g\"h"]
)  # fmt: skip
def test_visible_ascii_keys_pass_through_unchanged(key: str | None) -> None:
    assert gw.check_idempotency_key(key, 255) == key


def _raised(exc: Exception) -> Exception:
    try:
        raise exc
    except Exception as caught:
        return caught


def test_an_unexpected_error_is_logged_by_type_and_place_without_its_message() -> None:
    exc = _raised(UnicodeDecodeError("utf-8", SECRET_TEXT + b" \xff", 23, 24, "invalid"))
    fields = failure_fields(exc)
    assert fields["error_type"] == "UnicodeDecodeError"
    assert fields["where"] and all(":" in w for w in fields["where"])
    assert "hunter2" not in repr(fields)


def test_error_details_are_logged_only_when_the_setting_says_so() -> None:
    exc = _raised(ValueError("content was hunter2"))
    fields = failure_fields(exc, details=True)
    assert "hunter2" in fields["error"]
    assert fields["exc_info"] is exc

"""The WebSocket protocol's pure parts: client frames, close codes, server frames."""

from __future__ import annotations

import json

import pytest

from services.gateway import core


@pytest.mark.parametrize(
    ("status", "code"),
    [(400, 4400), (401, 4401), (404, 4404), (422, 4422), (503, 4503), (200, 1011)],
)
def test_close_codes_are_4000_plus_the_http_status(status: int, code: int) -> None:
    assert core.ws_close_code(status) == code


def test_the_first_frame_may_authenticate_and_name_a_position() -> None:
    frame = core.parse_client_frame(
        '{"type": "auth", "token": "t", "last_event_id": "msg:x"}', 4096, first=True
    )
    assert (frame.type, frame.token, frame.last_event_id) == ("auth", "t", "msg:x")
    assert core.parse_client_frame('{"type": "ping"}', 4096, first=False).type == "ping"


@pytest.mark.parametrize(
    ("text", "first", "status"),
    [
        ("{not json", True, 400),
        ("[]", True, 400),
        ("null", False, 400),
        ('{"type": 1}', True, 400),
        ('{"type": "subscribe"}', True, 400),
        ('{"type": "auth", "token": "t"}', False, 400),  # a second auth
        ('{"type": "ping", "extra": 1}', False, 400),
        ('{"type": "auth"}', True, 401),
        ('{"type": "auth", "token": null}', True, 401),
        ('{"type": "ping", "pad": "' + "é" * 2100 + '"}', False, 413),  # bytes, not characters
    ],
)
def test_anything_else_is_refused_with_a_clear_status(text: str, first: bool, status: int) -> None:
    with pytest.raises(core.ApiError) as err:
        core.parse_client_frame(text, 4096, first=first)
    assert err.value.status == status and err.value.message


def test_server_frames_are_the_sse_event_as_json() -> None:
    frame = json.loads(core.ws_frame("token", "tok:r:1:2", {"text": "hé 🙂"}))
    assert frame == {"id": "tok:r:1:2", "event": "token", "data": {"text": "hé 🙂"}}

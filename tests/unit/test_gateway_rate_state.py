"""Which window a 429 names, and the IETF RateLimit fields for two windows at once."""

from __future__ import annotations

from services.gateway import core

NOW = 1_000_000.0


def _q(name: str, w: int, limit: int, used: int, left_s: float) -> core.RateQuota:
    return core.RateQuota(name=name, window_s=w, limit=limit, used=used, ends_at=NOW + left_s)


def test_the_429_names_the_window_that_blocks_longest() -> None:
    state = core.RateState((_q("minute", 60, 5, 5, 12), _q("hour", 3600, 20, 20, 1800)))
    err = core.rate_limited(state, NOW)
    assert err is not None and err.status == 429
    assert err.extra["window"] == "hour" and err.extra["retry_after"] == 1800
    assert err.extra["limit"] == 20 and err.extra["remaining"] == 0
    assert err.headers["RateLimit-Policy"] == '"minute";q=5;w=60, "hour";q=20;w=3600'
    assert err.headers["RateLimit"] == '"minute";r=0;t=12, "hour";r=0;t=1800'


def test_room_left_is_no_429_and_ended_windows_are_forgotten() -> None:
    state = core.RateState((_q("minute", 60, 5, 5, -1), _q("hour", 3600, 20, 3, 100)))
    assert core.rate_limited(state.current(NOW), NOW) is None
    assert state.current(NOW).headers(NOW, spent=1) == {
        "RateLimit-Policy": '"hour";q=20;w=3600',
        "RateLimit": '"hour";r=16;t=100',
    }
    assert core.RateState(()).headers(NOW) == {}

"""The gateway's accept fast path: verified tokens are remembered until they expire."""

from __future__ import annotations

import time

import jwt
import pytest

from services.gateway import auth, core

SECRET = "unit-secret-" + "u" * 32


def _header(exp: float, project: str = "p1", user: str = "u1") -> str:
    token = jwt.encode({"sub": user, "project": project, "exp": int(exp)}, SECRET, "HS256")
    return f"Bearer {token}"


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_a_verified_token_is_remembered_and_not_checked_again() -> None:
    clock = Clock()
    principals = auth.Principals(SECRET, clock)
    header = _header(clock.now + 60)
    assert await principals.authenticate(header) == core.Principal("p1", "u1")
    assert header in principals.known
    principals.secret = "another-secret-" + "z" * 32  # a second HS256 check would now fail
    assert await principals.authenticate(header) == core.Principal("p1", "u1")


async def test_a_remembered_token_is_refused_once_it_expires() -> None:
    clock = Clock()
    principals = auth.Principals(SECRET, clock)
    header = _header(clock.now + 2)
    await principals.authenticate(header)
    assert await principals.authenticate(header) == core.Principal("p1", "u1")
    principals.secret = "another-secret-" + "z" * 32
    clock.now += 5
    # Past its exp the entry is no longer trusted: the token is checked again, and refused.
    with pytest.raises(core.ApiError) as err:
        await principals.authenticate(header)
    assert err.value.status == 401


@pytest.mark.parametrize(
    "header",
    [None, "", "Basic abc", "Bearer not-a-jwt", "Bearer " + jwt.encode({"sub": "u"}, SECRET)],
)
async def test_bad_tokens_are_refused_every_time_and_never_remembered(header: str | None) -> None:
    principals = auth.Principals(SECRET)
    for _ in range(2):
        with pytest.raises(core.ApiError) as err:
            await principals.authenticate(header)
        assert err.value.status == 401
    assert principals.known == {}


async def test_the_table_is_bounded() -> None:
    principals = auth.Principals(SECRET, max_entries=3)
    for i in range(10):
        await principals.authenticate(_header(time.time() + 60, user=f"u{i}"))
    assert len(principals.known) <= 3

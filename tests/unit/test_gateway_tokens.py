"""Token lifetimes and the stable messages of refused tokens (auth.verify, auth.Principals)."""

from __future__ import annotations

import time

import jwt
import pytest

from baton.devtoken import make_token
from services.gateway import auth
from services.gateway import core as gw
from services.gateway.config import Settings
from services.gateway.core import ApiError

SECRET = "unit-test-secret-" + "x" * 48
DAY = 24 * 3600
NOW = time.time()


def bearer(secret: str = SECRET, algorithm: str = "HS256", **claims: object) -> str:
    base: dict[str, object] = {"sub": "alice", "project": "acme", "iat": NOW, "exp": NOW + 600}
    base.update(claims)
    payload = {k: v for k, v in base.items() if v is not None}
    return "Bearer " + jwt.encode(payload, secret, algorithm=algorithm)


def refusal(header: str | None, max_lifetime_s: float = 30 * DAY) -> str:
    with pytest.raises(ApiError) as info:
        auth.verify(header, SECRET, max_lifetime_s=max_lifetime_s, leeway_s=60, now=NOW)
    assert (info.value.status, info.value.code) == (401, "unauthenticated")
    return info.value.message


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": 10**20},  # the attack: a token that never expires
        {"exp": NOW + 31 * DAY},  # a month and a day after its iat
        {"iat": None, "exp": 10**20},  # no iat: measured from now
        {"iat": None, "exp": NOW + 31 * DAY},
        {"iat": NOW - 40 * DAY, "exp": NOW + 600},  # still valid, but issued for 40 days
    ],
)
def test_a_token_living_longer_than_the_maximum_is_refused(claims: dict[str, object]) -> None:
    assert refusal(bearer(**claims)) == "token lifetime exceeds the maximum (2592000 s)"


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": NOW + 30 * DAY},  # exactly the maximum (what `baton token` makes)
        {"iat": None, "exp": NOW + 30 * DAY},
        {"iat": NOW + 30, "exp": NOW + 600},  # within the clock skew
    ],
)
def test_a_token_within_the_maximum_is_accepted(claims: dict[str, object]) -> None:
    principal, _ = auth.verify(bearer(**claims), SECRET, max_lifetime_s=30 * DAY, now=NOW)
    assert principal == gw.Principal(project="acme", user="alice")


def test_a_token_issued_in_the_future_is_refused() -> None:
    assert refusal(bearer(iat=NOW + 3600, exp=NOW + 7200)) == "token is not valid yet"


def test_a_shorter_maximum_is_a_setting() -> None:
    assert refusal(bearer(exp=NOW + 2 * 3600), max_lifetime_s=3600) == (
        "token lifetime exceeds the maximum (3600 s)"
    )


# Each failure class has one message, never the JWT library's words.
STABLE = {
    "missing header": (None, "missing bearer token"),
    "not bearer": ("Basic YWxpY2U6cHc=", "missing bearer token"),
    "garbage": ("Bearer not-a-jwt", "invalid token"),
    "two segments": ("Bearer abc.def", "invalid token"),
    "bad signature": (bearer(secret="another-secret-" + "y" * 48), "invalid token"),
    "other algorithm": (bearer(algorithm="HS384"), "invalid token"),
    "string exp": (bearer(exp="soon"), "invalid token"),
    "string iat": (bearer(iat="then"), "invalid token"),
    "expired": (bearer(iat=NOW - 7200, exp=NOW - 3600), "token has expired"),
    "missing exp": (bearer(exp=None), "token must carry the claims sub, project and exp"),
    "missing sub": (bearer(sub=None), "token must carry the claims sub, project and exp"),
}


@pytest.mark.parametrize(("header", "message"), STABLE.values(), ids=STABLE.keys())
def test_refusals_have_a_stable_message_per_failure_class(header: str | None, message: str) -> None:
    assert refusal(header) == message


async def test_the_cache_keeps_a_token_no_longer_than_the_maximum_lifetime() -> None:
    clock = [NOW]
    principals = auth.Principals(SECRET, clock=lambda: clock[0], max_lifetime_s=3600)
    header = bearer(iat=NOW, exp=NOW + 3600)
    await principals.authenticate(header)
    clock[0] = NOW + 3601
    with pytest.raises(ApiError):
        await principals.authenticate(header)


async def test_baton_token_makes_tokens_the_gateway_accepts_with_its_defaults() -> None:
    settings = Settings()
    header = "Bearer " + make_token(SECRET, "acme", "alice")  # `baton token` without --ttl
    principals = auth.Principals(
        SECRET, max_lifetime_s=settings.jwt_max_lifetime_s, leeway_s=settings.jwt_leeway_s
    )
    assert await principals.authenticate(header) == gw.Principal(project="acme", user="alice")

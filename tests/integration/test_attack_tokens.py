"""Attacks with tokens the happy-path tests never sign: time claims no float can hold.

A real gateway (in process, on a real NATS and Postgres): a signed token is checked the same
way on every route, so one read route and the WebSocket stand for all.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
import pytest_asyncio

from tests.integration.conftest import Infra
from tests.integration.test_gateway_ws import SECRET, Gateway, _serve


@pytest_asyncio.fixture
async def gateway(infra: Infra) -> AsyncIterator[Gateway]:
    async for g in _serve(infra):
        yield g


HUGE = 10**400  # valid JSON; an int that no float holds


@pytest.mark.parametrize(
    "claims",
    [{"exp": HUGE}, {"iat": HUGE}, {"exp": -HUGE}, {"iat": -HUGE}],
    ids=["exp", "iat", "negative-exp", "negative-iat"],
)
async def test_a_signed_token_with_a_time_claim_too_big_for_a_float_is_401_not_500(
    gateway: Gateway, claims: dict[str, Any]
) -> None:
    now = int(time.time())
    token = jwt.encode(
        {"sub": "u1", "project": "p1", "iat": now, "exp": now + 60, **claims},
        SECRET,
        algorithm="HS256",
    )
    url = gateway.url.replace("ws://", "http://")
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for path in ("/api/usage", f"/api/conversations/{uuid.uuid4()}/state"):
            r = await client.get(path, headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 401, r.text
            assert r.json()["error"]["message"] == "invalid token"
        r = await client.post(
            "/api/chat", json={"content": "hi"}, headers={"Authorization": f"Bearer {token}"}
        )
        assert r.status_code == 401, r.text

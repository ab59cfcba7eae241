"""The gateway's early 429 reads policy's rate windows from real KV: cheap, cached, fail-open."""

from __future__ import annotations

import asyncio
import time

from services.gateway.adapters import RateGate
from shared import ratelimit, subjects
from tests.integration.conftest import Infra
from tests.support import connect_bus


def _window(now: float, limit: int, count: int) -> bytes:
    start = ratelimit.window_start(now, 60)
    ids = ",".join(f'"m{i}"' for i in range(count))
    return f'{{"start":{start},"length":60,"limit":{limit},"ids":[{ids}]}}'.encode()


async def test_a_user_at_the_limit_is_told_when_to_retry_and_others_pass(infra: Infra) -> None:
    bus = await connect_bus(infra.nats_url)
    kv = await bus.js.key_value(subjects.BUCKET_LIMITS)
    # Two seconds of cache: the reads and writes between a look and the one that must hit its
    # cache take far less, even on a busy machine (with 0.2 s they might not). And the test's
    # keys name the current minute's window: start well inside one.
    gate = RateGate(kv, cache_s=2.0)
    if time.time() % 60 > 45:
        await asyncio.sleep(61 - time.time() % 60)
    now = time.time()
    await kv.put(ratelimit.key("m", now, "p1", "full"), _window(now, 3, 3))
    await kv.put(ratelimit.key("m", now, "p1", "room"), _window(now, 3, 2))
    retry = await gate.retry_after("p1", "full")
    assert retry is not None and 1 <= retry <= 60
    assert await gate.retry_after("p1", "room") is None
    assert await gate.retry_after("p1", "nobody") is None
    # While blocked, the answer comes from the cache, without reading the bucket again.
    await kv.delete(ratelimit.key("m", now, "p1", "full"))
    assert await gate.retry_after("p1", "full") is not None
    # A user found under the limit is looked at again once the cache expires.
    await kv.put(ratelimit.key("m", now, "p1", "room"), _window(now, 3, 3))
    assert await gate.retry_after("p1", "room") is None  # cached
    await asyncio.sleep(2.1)
    assert await gate.retry_after("p1", "room") is not None
    await bus.close()


async def test_a_malformed_window_lets_the_message_through(infra: Infra) -> None:
    """Policy is the authority: an unreadable window must not block anyone at the gateway."""
    bus = await connect_bus(infra.nats_url)
    kv = await bus.js.key_value(subjects.BUCKET_LIMITS)
    gate = RateGate(kv, cache_s=0)
    now = time.time()
    for junk in (b"not json", b'{"start":"x"}', b"[]", b"\x00" * 10_000):
        await kv.put(ratelimit.key("m", now, "p1", "u1"), junk)
        assert await gate.retry_after("p1", "u1") is None
    await bus.close()

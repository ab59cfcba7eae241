"""The chaos suite: SIGKILL every service twice, restart NATS and Postgres, retry submits — and
still every accepted message exists once, has one outcome, and its model calls are billed once.

Size: ``CHAOS_MESSAGES`` (default 300), ``CHAOS_CONVERSATIONS`` (default 20), ``CHAOS_SEED``;
``CHAOS_TOKENS_PER_SECOND`` (default 120): the model's pace (slower: more calls in flight when
an executor is killed, so more calls billed by estimate); ``CHAOS_WARM=1``: the kills start
once the first answer is stored (on a loaded machine they otherwise land while the services are
still starting, before any model call is in flight).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from baton.offline_model import ModelSettings
from tests.e2e.chaos_world import (
    SECRET,
    SERVICES,
    World,
    chaos_world,
    first_answer,
    log_lines_about,
    log_tails,
    started_records,
    supervise,
)
from tests.e2e.invariants import Client, availability, check, settled

pytestmark = [pytest.mark.chaos, pytest.mark.e2e]

MESSAGES = int(os.environ.get("CHAOS_MESSAGES", "300"))
CONVERSATIONS = int(os.environ.get("CHAOS_CONVERSATIONS", "20"))
SEED = int(os.environ.get("CHAOS_SEED", str(int(time.time()))))
TOKENS_PER_SECOND = float(os.environ.get("CHAOS_TOKENS_PER_SECOND", "120"))
WARM = os.environ.get("CHAOS_WARM", "") == "1"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    # Logs are kept by pytest for the last runs, to read after a failure.
    settings = ModelSettings(
        tokens_per_second=TOKENS_PER_SECOND, words_per_reply=16, style="hostile"
    )
    with chaos_world(tmp_path / "logs", settings) as world:
        yield world


async def _drive(world: World, rng: random.Random) -> Client:
    projects = ("acme", "globex")
    convs = [(projects[i % 2], f"user{i % 5}", str(uuid.uuid4())) for i in range(CONVERSATIONS)]
    async with httpx.AsyncClient(timeout=10) as http:
        client = Client(http, [world.gateway], SECRET)
        late: list[tuple[str, str, str, str, str]] = []
        pending: set[asyncio.Task[str]] = set()
        for n in range(MESSAGES):
            project, user, cid = convs[n % len(convs)]
            key, content = f"k-{n}", f"Message {n}: tell me about topic {rng.randint(1, 999)}?"
            copies = 3 if rng.random() < 0.1 else 1  # some submits retried concurrently
            for _ in range(copies):
                pending.add(asyncio.create_task(client.submit(project, user, cid, key, content)))
            if rng.random() < 0.1:
                late.append((project, user, cid, key, content))  # and some seconds later
            if len(pending) >= 24:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.sleep(rng.uniform(0, 0.03))
        await asyncio.gather(*pending)
        await asyncio.sleep(2)
        await asyncio.gather(*(client.submit(*args) for args in late))
    return client


async def _chaos(world: World, rng: random.Random, stop: asyncio.Event, log: list[str]) -> None:
    """Kill each service twice at random moments; restart NATS once and Postgres once."""
    actions: list[str] = [name for name in SERVICES for _ in range(2)] + ["nats", "postgres"]
    rng.shuffle(actions)
    if WARM:
        await first_answer(world.database_url)
    for action in actions:
        await asyncio.sleep(rng.uniform(0.2, 1.2))
        if action == "nats":
            await world.restart_nats()
        elif action == "postgres":
            await world.restart_postgres()
        else:
            world.kill(action)
        log.append(action)
    stop.set()


async def test_invariants_hold_while_everything_is_killed_and_restarted(world: World) -> None:
    rng = random.Random(SEED)
    print(f"\nchaos seed={SEED} messages={MESSAGES} conversations={CONVERSATIONS}")
    stop, checked, chaos_log = asyncio.Event(), asyncio.Event(), []
    supervisor = asyncio.create_task(supervise(world, checked))
    chaos = asyncio.create_task(_chaos(world, rng, stop, chaos_log))
    try:
        try:
            client = await _drive(world, rng)
        except AssertionError as exc:  # a submit never accepted: what the services said then
            raise AssertionError(f"{exc}\n{log_tails(world.logs)}") from exc
        await chaos
        await settled(world.database_url, len(set(client.accepted.values())))
        await asyncio.sleep(2)  # anything still in flight would show up as a copy now

        con = await asyncpg.connect(world.database_url)
        try:
            async with started_records(world.nats.url) as recorded:
                try:
                    summary = await check(con, client, world.model, MESSAGES, recorded=recorded)
                except AssertionError as exc:  # what the services said about those ids
                    raise AssertionError(f"{exc}\n{log_lines_about(world.logs, str(exc))}") from exc
        finally:
            await con.close()
    finally:
        checked.set()
        await supervisor
    print(f"chaos seed={SEED} actions={','.join(chaos_log)} {summary} {availability(client)}")
    assert sorted(chaos_log) == sorted(
        [*(s for s in SERVICES for _ in range(2)), "nats", "postgres"]
    )

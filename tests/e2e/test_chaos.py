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
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import msgspec
import pytest

from baton.embedded import STARTUP_S, NatsServer, PostgresServer, create_database, free_port
from baton.migrate import migrate
from baton.offline_model import ModelSettings, OfflineModelProcess
from baton.provision import provision
from baton.supervisor import Child, Supervisor, service_env
from tests.e2e.invariants import Client, availability, check, settled

pytestmark = [pytest.mark.chaos, pytest.mark.e2e]

SERVICES = ("persister", "policy", "agent", "executor", "gateway")
SECRET = "chaos-secret-" + "c" * 32
MESSAGES = int(os.environ.get("CHAOS_MESSAGES", "300"))
CONVERSATIONS = int(os.environ.get("CHAOS_CONVERSATIONS", "20"))
SEED = int(os.environ.get("CHAOS_SEED", str(int(time.time()))))
TOKENS_PER_SECOND = float(os.environ.get("CHAOS_TOKENS_PER_SECOND", "120"))
WARM = os.environ.get("CHAOS_WARM", "") == "1"


class World(msgspec.Struct):
    gateway: str
    nats: NatsServer
    postgres: PostgresServer
    database_url: str
    model: OfflineModelProcess
    supervisor: Supervisor
    logs: Path


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    base = Path(tempfile.mkdtemp(prefix="baton-chaos-"))
    nats = NatsServer(base / "nats")
    pg = PostgresServer(base / "pg")
    nats.start()
    pg.start()
    dsn = asyncio.run(create_database(pg.dsn(), "baton"))
    # Short ack_wait, so work a killed process held comes back in seconds, not minutes.
    asyncio.run(provision(nats.url, ack_wait_s=3.0))
    asyncio.run(migrate(dsn))
    port = free_port()
    logs = tmp_path / "logs"  # kept by pytest for the last runs, to read after a failure
    with OfflineModelProcess(
        ModelSettings(tokens_per_second=TOKENS_PER_SECOND, words_per_reply=16, style="hostile")
    ) as model:
        children = [
            Child.service(
                name,
                service_env(
                    name,
                    nats_url=nats.url,
                    database_url=dsn,
                    metrics_port=free_port(),
                    jwt_secret=SECRET,
                    http_port=port,
                    model_url=model.url,
                    extra={"BATON_SHUTDOWN_GRACE_S": "5"},
                ),
                logs,
            )
            for name in SERVICES
        ]
        sup = Supervisor(children, say=lambda line: None)
        sup.start_all()
        try:
            _wait_ready(f"http://127.0.0.1:{port}")
            yield World(f"http://127.0.0.1:{port}", nats, pg, dsn, model, sup, logs)
        finally:
            sup.stop_all(grace_s=10)
            pg.stop()
            nats.stop()
            shutil.rmtree(base, ignore_errors=True)


def _wait_ready(url: str) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"gateway not ready after {STARTUP_S:.0f} s")


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
        await _first_answer(world.database_url)
    for action in actions:
        await asyncio.sleep(rng.uniform(0.2, 1.2))
        if action == "nats":
            world.nats.stop()
            await asyncio.sleep(1.0)
            world.nats.start()
        elif action == "postgres":
            await asyncio.to_thread(world.postgres.stop)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(world.postgres.start)
        else:
            child = next(c for c in world.supervisor.children if c.name == action)
            child.signal(signal.SIGKILL)
        log.append(action)
    stop.set()


async def _first_answer(dsn: str, timeout: float = 300.0) -> None:
    """Wait until the pipeline has stored an answer (the bound only ends a failed wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        con = await asyncpg.connect(dsn)
        try:
            if await con.fetchval("SELECT count(*) FROM messages WHERE role = 'assistant'"):
                return
        finally:
            await con.close()
        await asyncio.sleep(0.2)
    raise AssertionError("no answer stored before the chaos was to start")


async def _supervise(world: World, stop: asyncio.Event) -> None:
    while True:
        world.supervisor.poll()
        if stop.is_set() and all(c.exit_code() is None for c in world.supervisor.children):
            return
        await asyncio.sleep(0.1)


async def test_invariants_hold_while_everything_is_killed_and_restarted(world: World) -> None:
    rng = random.Random(SEED)
    print(f"\nchaos seed={SEED} messages={MESSAGES} conversations={CONVERSATIONS}")
    stop, chaos_log = asyncio.Event(), []
    supervisor = asyncio.create_task(_supervise(world, stop))
    chaos = asyncio.create_task(_chaos(world, rng, stop, chaos_log))
    client = await _drive(world, rng)
    await chaos
    await supervisor
    await settled(world.database_url, len(set(client.accepted.values())))
    await asyncio.sleep(2)  # anything still in flight would show up as a copy now

    con = await asyncpg.connect(world.database_url)
    try:
        summary = await check(con, client, world.model, MESSAGES)
    finally:
        await con.close()
    print(f"chaos seed={SEED} actions={','.join(chaos_log)} {summary} {availability(client)}")
    assert sorted(chaos_log) == sorted(
        [*(s for s in SERVICES for _ in range(2)), "nats", "postgres"]
    )

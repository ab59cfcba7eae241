"""The chaos suite: SIGKILL every service twice, restart NATS and Postgres, retry submits — and
still every accepted message exists once, has one outcome, and its model calls are billed once.

Size: ``CHAOS_MESSAGES`` (default 300), ``CHAOS_CONVERSATIONS`` (default 20), ``CHAOS_SEED``.
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
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest

from baton.devtoken import make_token
from baton.embedded import NatsServer, PostgresServer, create_database, free_port
from baton.migrate import migrate
from baton.offline_model import ModelSettings, OfflineModelProcess
from baton.provision import provision
from baton.supervisor import Child, Supervisor, service_env

pytestmark = [pytest.mark.chaos, pytest.mark.e2e]

SERVICES = ("persister", "policy", "agent", "executor", "gateway")
SECRET = "chaos-secret-" + "c" * 32
MESSAGES = int(os.environ.get("CHAOS_MESSAGES", "300"))
CONVERSATIONS = int(os.environ.get("CHAOS_CONVERSATIONS", "20"))
SEED = int(os.environ.get("CHAOS_SEED", str(int(time.time()))))
EXECUTOR_MODEL = "claude-sonnet-4-6"


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
    with OfflineModelProcess(ModelSettings(tokens_per_second=120, words_per_reply=16)) as model:
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
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError("gateway not ready")


class Client:
    """A well-behaved client: every message has an Idempotency-Key and is retried until 202."""

    def __init__(self, http: httpx.AsyncClient, gateway: str) -> None:
        self.http = http
        self.gateway = gateway
        self.accepted: dict[str, str] = {}  # idempotency key -> message id
        self.replays = 0
        self.mismatches: list[str] = []

    async def submit(self, project: str, user: str, cid: str, key: str, content: str) -> str:
        headers = {
            "Authorization": f"Bearer {make_token(SECRET, project, user)}",
            "Idempotency-Key": key,
        }
        body = {"conversation_id": cid, "content": content}
        deadline = time.monotonic() + 120
        while True:
            try:
                r = await self.http.post(f"{self.gateway}/api/chat", json=body, headers=headers)
                if r.status_code == 202:
                    mid = str(r.json()["message"]["id"])
                    known = self.accepted.setdefault(key, mid)
                    if known != mid:
                        self.mismatches.append(key)
                    self.replays += bool(r.json()["duplicate"])
                    return mid
                assert r.status_code in (503, 502), r.text
            except httpx.TransportError:
                pass  # the gateway is down or restarting: retry, as a client would
            assert time.monotonic() < deadline, f"submit {key} never accepted"
            await asyncio.sleep(0.2)


async def _drive(world: World, rng: random.Random) -> Client:
    projects = ("acme", "globex")
    convs = [(projects[i % 2], f"user{i % 5}", str(uuid.uuid4())) for i in range(CONVERSATIONS)]
    async with httpx.AsyncClient(timeout=10) as http:
        client = Client(http, world.gateway)
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


async def _supervise(world: World, stop: asyncio.Event) -> None:
    while True:
        world.supervisor.poll()
        if stop.is_set() and all(c.exit_code() is None for c in world.supervisor.children):
            return
        await asyncio.sleep(0.1)


async def _settled(dsn: str, expected: int, timeout: float = 180) -> None:
    """Wait until every stored user message has its one final reply."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            con = await asyncpg.connect(dsn)
            try:
                users = await con.fetchval("SELECT count(*) FROM messages WHERE role = 'user'")
                replies = await con.fetchval(
                    "SELECT count(*) FROM messages WHERE role = 'assistant'"
                )
            finally:
                await con.close()
            if users >= expected and replies >= users:
                return
        except (OSError, asyncpg.PostgresError):
            pass
        assert time.monotonic() < deadline, f"not settled: {users} users, {replies} replies"
        await asyncio.sleep(0.5)


async def test_invariants_hold_while_everything_is_killed_and_restarted(world: World) -> None:
    rng = random.Random(SEED)
    print(f"\nchaos seed={SEED} messages={MESSAGES} conversations={CONVERSATIONS}")
    stop, chaos_log = asyncio.Event(), []
    supervisor = asyncio.create_task(_supervise(world, stop))
    chaos = asyncio.create_task(_chaos(world, rng, stop, chaos_log))
    client = await _drive(world, rng)
    await chaos
    await supervisor
    await _settled(world.database_url, len(set(client.accepted.values())))
    await asyncio.sleep(2)  # anything still in flight would show up as a copy now

    con = await asyncpg.connect(world.database_url)
    try:
        summary = await _check(con, client, world.model)
    finally:
        await con.close()
    print(f"chaos seed={SEED} actions={','.join(chaos_log)} {summary}")
    assert sorted(chaos_log) == sorted(
        [*(s for s in SERVICES for _ in range(2)), "nats", "postgres"]
    )


async def _check(con: Any, client: Client, model: OfflineModelProcess) -> str:
    accepted = set(client.accepted.values())
    # I2: a retried submit always got the same message id back.
    assert not client.mismatches, client.mismatches
    users = {str(r["id"]) for r in await con.fetch("SELECT id FROM messages WHERE role = 'user'")}
    # I1 + I2: every 202'd message is stored, and nothing else is.
    assert users == accepted, (len(users - accepted), len(accepted - users))
    assert len(accepted) == MESSAGES
    # I3: exactly one final outcome per message (one run, one reply).
    outcomes = await con.fetch(
        "SELECT u.id, count(a.id) AS replies, count(DISTINCT r.run_id) AS runs "
        "FROM messages u LEFT JOIN messages a ON a.reply_to = u.id AND a.role = 'assistant' "
        "LEFT JOIN runs r ON r.message_id = u.id "
        "WHERE u.role = 'user' GROUP BY u.id"
    )
    bad = [
        (str(r["id"]), r["replies"], r["runs"])
        for r in outcomes
        if (r["replies"], r["runs"]) != (1, 1)
    ]
    assert not bad, bad[:10]
    # I6: within each conversation, replies were written in message order, one run at a time.
    pairs = await con.fetch(
        "SELECT u.conversation_id, u.position, a.created_at FROM messages u "
        "JOIN messages a ON a.reply_to = u.id AND a.role = 'assistant' "
        "WHERE u.role = 'user' ORDER BY u.conversation_id, u.position"
    )
    by_conv: dict[str, list[Any]] = {}
    for r in pairs:
        by_conv.setdefault(str(r["conversation_id"]), []).append(r["created_at"])
    out_of_order = [c for c, times in by_conv.items() if times != sorted(times)]
    assert not out_of_order, out_of_order
    kinds = dict(
        await con.fetch(
            "SELECT kind, count(*) FROM messages WHERE role = 'assistant' GROUP BY kind"
        )
    )
    # I4: every usage row is a real model call with exactly the tokens the model served...
    ledger = {k: v for k, v in model.calls().items() if v["model"] == EXECUTOR_MODEL}
    rows = await con.fetch("SELECT * FROM usage")
    by_call = {r["call_id"]: r for r in rows}
    for call_id, r in by_call.items():
        served = ledger.get(call_id)
        assert served is not None, f"usage for a call the model never served: {call_id}"
        assert (r["input_tokens"], r["output_tokens"]) == (
            served["input_tokens"],
            served["output_tokens"],
        ), call_id
        assert (r["cache_read_tokens"], r["cache_write_tokens"]) == (
            served["cache_read_input_tokens"],
            served["cache_creation_input_tokens"],
        ), call_id
    # ...and a call without a usage row is one whose executor died with it: its task was
    # delivered again afterwards (a later call of the same task exists).
    unbilled = sorted(set(ledger) - set(by_call))
    for call_id in unbilled:
        task, delivery = call_id.rsplit("#", 1)
        later = [
            c
            for c in ledger
            if c.startswith(task + "#") and int(c.rsplit("#", 1)[1]) > int(delivery)
        ]
        assert later, f"model call {call_id} was never billed and its task never retried"
    # Project totals are exactly the sum of the usage rows.
    totals = await con.fetch(
        "SELECT p.project_id, p.input_tokens = s.i AND p.output_tokens = s.o "
        "AND p.cache_read_tokens = s.cr AND p.cache_write_tokens = s.cw AND p.cost_usd = s.c AS ok "
        "FROM project_usage p JOIN (SELECT project_id, sum(input_tokens) i, sum(output_tokens) o, "
        "sum(cache_read_tokens) cr, sum(cache_write_tokens) cw, sum(cost_usd) c FROM usage "
        "GROUP BY project_id) s USING (project_id)"
    )
    assert totals and all(r["ok"] for r in totals), [dict(r) for r in totals]
    runs_total = await con.fetchval("SELECT sum(runs) FROM project_usage")
    assert runs_total == kinds.get("answer", 0)
    return (
        f"accepted={len(accepted)} replayed={client.replays} stored={len(users)} "
        f"outcomes={len(outcomes)} kinds={kinds} usage_rows={len(rows)} "
        f"model_calls={len(ledger)} died_with_executor={len(unbilled)} totals=ok "
        f"ordered_conversations={len(by_conv)}"
    )

"""Proven on a cluster: three NATS nodes, R3 streams, two replicas of every service; one node and
one replica of each service SIGKILLed mid-stream — and I1-I4 still hold, every message answered.

Every service runs as its own NATS user and database role (I5), as it would in production.

Size: ``CLUSTER_MESSAGES`` (default 80), ``CLUSTER_CONVERSATIONS`` (default 8), ``CLUSTER_SEED``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import msgspec
import nats
import nats.errors
import nats.js.errors
import pytest

from baton import permissions, roles
from baton.embedded import NatsCluster, NatsServer, free_ports
from baton.migrate import migrate
from baton.offline_model import ModelSettings, OfflineModelProcess
from baton.provision import provision
from baton.supervisor import Child, Supervisor, service_env
from shared import subjects, wiring
from tests.e2e.conftest import STARTUP_S, wait_healthy, wait_services_up
from tests.e2e.invariants import Client, check, settled

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.timeout(300)]

SERVICES = ("persister", "policy", "agent", "executor", "gateway")
REPLICAS = 2
SECRET = "cluster-secret-" + "k" * 32
MESSAGES = int(os.environ.get("CLUSTER_MESSAGES", "80"))
CONVERSATIONS = int(os.environ.get("CLUSTER_CONVERSATIONS", "8"))
SEED = int(os.environ.get("CLUSTER_SEED", str(int(time.time()))))


class Replica(msgspec.Struct):
    service: str
    instance: str  # e.g. "executor-2": also its NATS connection name's suffix
    child: Child
    http: str = ""  # the gateway's URL


class World(msgspec.Struct):
    cluster: NatsCluster
    database_url: str
    admin: dict[str, str]  # NATS connect options of the admin user
    model: OfflineModelProcess
    supervisor: Supervisor
    replicas: list[Replica]
    logs: Path

    @property
    def gateways(self) -> list[str]:
        return [r.http for r in self.replicas if r.service == "gateway"]

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for path in sorted(self.logs.glob("*.log")):
            out.append(f"== {path.name}")
            out.extend(path.read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(out)


@pytest.fixture
def world(database_url: str, tmp_path: Path) -> Iterator[World]:
    # As in production: one NATS user per service (I5) on every node, one database role each.
    passwords = permissions.new_passwords()
    cluster = NatsCluster(
        tmp_path / "nats", size=3, config_text=permissions.authorization(passwords)
    )
    cluster.start()
    admin = {"user": permissions.ADMIN, "password": passwords[permissions.ADMIN]}
    try:
        # R3: every stream and the runs bucket on all three nodes; a short ack_wait so work a
        # killed replica held comes back to its twin in seconds.
        asyncio.run(provision(cluster.url, replicas=3, ack_wait_s=3.0, **admin))
        asyncio.run(migrate(database_url))
        asyncio.run(roles.ensure_roles(database_url))
        logs = tmp_path / "logs"
        settings = ModelSettings(tokens_per_second=200, words_per_reply=16, style="hostile")
        with OfflineModelProcess(settings) as model:
            replicas: list[Replica] = []
            # Distinct by construction: free_port() twice in a row may hand out the same port.
            ports = iter(free_ports(2 * len(SERVICES) * REPLICAS))
            for service in SERVICES:
                for n in range(1, REPLICAS + 1):
                    instance = f"{service}-{n}"
                    port = next(ports) if service == "gateway" else 0
                    env = service_env(
                        service,
                        nats_url=cluster.url,  # every node: a client of a dead one moves on
                        database_url=(
                            roles.dsn_for(database_url, service)
                            if service in roles.SERVICES_WITH_DB
                            else ""
                        ),
                        nats_user=service,
                        nats_password=passwords[service],
                        metrics_port=next(ports),
                        jwt_secret=SECRET,
                        http_port=port,
                        model_url=model.url,
                        extra={"BATON_INSTANCE": instance, "BATON_SHUTDOWN_GRACE_S": "5"},
                    )
                    child = Child(
                        instance,
                        [sys.executable, "-m", f"services.{service}"],
                        env,
                        logs / f"{instance}.log",
                    )
                    http = f"http://127.0.0.1:{port}" if port else ""
                    replicas.append(Replica(service, instance, child, http))
            supervisor = Supervisor([r.child for r in replicas], say=lambda line: None)
            supervisor.start_all()
            w = World(cluster, database_url, admin, model, supervisor, replicas, logs)
            try:
                for gateway in w.gateways:
                    wait_healthy(gateway, STARTUP_S)
                wait_services_up(supervisor.children, STARTUP_S)
                yield w
            finally:
                supervisor.stop_all(grace_s=10)
    finally:
        cluster.stop()


def _connections(node: NatsServer) -> dict[str, int]:
    """Client connection names on one node, with how many connections carry each."""
    with urllib.request.urlopen(f"{node.monitor_url}/connz?limit=1024", timeout=2) as r:
        conns = json.loads(r.read()).get("connections") or []
    names: dict[str, int] = {}
    for c in conns:
        names[c.get("name", "")] = names.get(c.get("name", ""), 0) + 1
    return names


def _node_of(world: World, connection_name: str) -> int | None:
    for i, node in enumerate(world.cluster.nodes):
        if node.pid is not None and connection_name in _connections(node):
            return i
    return None


async def _streams_are_r3(url: str, admin: dict[str, str]) -> None:
    nc = await nats.connect(servers=url.split(","), **admin)
    try:
        js = nc.jetstream()
        for spec in subjects.STREAMS:
            info = await js.stream_info(spec.name)
            assert info.config.num_replicas == 3, spec.name
            assert info.cluster is not None and len(info.cluster.replicas or []) == 2, spec.name
    finally:
        await nc.close()


async def _make_leader(url: str, admin: dict[str, str], server: str) -> int:
    """Move the leadership of the meta group, every stream and every consumer to ``server``.

    The node then killed is the one everything depends on, so the test cannot pass by luck
    of placement. Returns how many groups it leads.
    """
    placement = json.dumps({"placement": {"preferred": server}}).encode()
    nc = await nats.connect(servers=url.split(","), **admin)
    try:
        js = nc.jetstream()
        streams = [spec.name for spec in subjects.STREAMS] + [f"KV_{subjects.BUCKET_RUNS}"]
        groups = [(f"$JS.API.STREAM.LEADER.STEPDOWN.{n}", n, None) for n in streams] + [
            (f"$JS.API.CONSUMER.LEADER.STEPDOWN.{c.stream}.{c.durable}", c.stream, c.durable)
            for c in wiring.CONSUMERS
        ]
        led = 0
        for api, stream, durable in groups:
            # A bound on elections this loop asks for: it measures nothing (quiet, one takes
            # well under a second; on two busy cores several seconds).
            deadline = time.monotonic() + STARTUP_S
            while True:
                try:
                    if durable is None:
                        cluster = (await js.stream_info(stream)).cluster
                    else:
                        cluster = (await js.consumer_info(stream, durable)).cluster
                except nats.js.errors.ServiceUnavailableError:
                    # 503: the group has no leader yet (it elects the one the last step-down
                    # asked for); ask again once it has.
                    where, electing = "no leader (503, an election under way)", True
                else:
                    if cluster is not None and cluster.leader == server:
                        led += 1
                        break
                    where, electing = str(cluster), False
                assert time.monotonic() < deadline, f"{stream}/{durable} stays on {where}"
                if not electing:
                    # A step-down answered late (a busy node) is asked again on the next turn.
                    with contextlib.suppress(nats.errors.TimeoutError):
                        await nc.request(api, placement, timeout=5)
                await asyncio.sleep(0.3)
        return led
    finally:
        await nc.close()


async def _drive(
    world: World, rng: random.Random, kill_at: int, kill: asyncio.Event
) -> tuple[Client, list[str]]:
    """Submit MESSAGES over CONVERSATIONS (some retried concurrently); signal `kill` midway."""
    projects = ("acme", "globex")
    convs = [(projects[i % 2], f"user{i % 3}", str(uuid.uuid4())) for i in range(CONVERSATIONS)]
    async with httpx.AsyncClient(timeout=10) as http:
        client = Client(http, world.gateways, SECRET)
        pending: set[asyncio.Task[str]] = set()
        for n in range(MESSAGES):
            if n == kill_at:
                kill.set()
            project, user, cid = convs[n % len(convs)]
            key, content = f"c-{n}", f"Cluster message {n}: topic {rng.randint(1, 999)}?"
            copies = 2 if rng.random() < 0.1 else 1
            for _ in range(copies):
                pending.add(asyncio.create_task(client.submit(project, user, cid, key, content)))
            if len(pending) >= 12:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.sleep(rng.uniform(0.01, 0.06))
        await asyncio.gather(*pending)
    return client, [cid for _, _, cid in convs]


async def _kill(world: World, rng: random.Random, kill: asyncio.Event, log: list[str]) -> None:
    """SIGKILL one replica of each service and the NATS node most surviving replicas are on."""
    await kill.wait()
    doomed = {s: f"{s}-{rng.randint(1, REPLICAS)}" for s in SERVICES}
    survivors = [r for r in world.replicas if r.instance not in doomed.values()]
    # The node to kill is one that surviving replicas use, so they must fail over.
    on_node = [_node_of(world, f"baton-{r.service}@{r.instance}") for r in survivors]
    counts = {i: on_node.count(i) for i in set(on_node) if i is not None}
    victim = max(counts, key=lambda i: counts[i]) if counts else 0
    assert counts.get(victim, 0) >= 1, on_node
    # And it leads every stream and consumer when it dies: all of them must fail over.
    server = world.cluster.nodes[victim].server_name
    assert server is not None
    led = await _make_leader(world.cluster.url, world.admin, server)
    order: list[str | int] = [*doomed.values(), victim]
    rng.shuffle(order)
    for item in order:
        await asyncio.sleep(rng.uniform(0.1, 0.5))
        if isinstance(item, int):
            node = world.cluster.nodes[item]
            pid = node.pid
            node.kill()  # SIGKILL by pid
            log.append(
                f"nats-node{item}(pid {pid}, {counts.get(item, 0)} survivors on it, "
                f"leader of {led} streams and consumers)"
            )
        else:
            replica = next(r for r in world.replicas if r.instance == item)
            log.append(f"{item}(pid {replica.child.pid})")
            replica.child.signal(signal.SIGKILL)


def _permission_errors(r: Replica) -> float:
    url = f"http://127.0.0.1:{r.child.env['BATON_METRICS_PORT']}/metrics"
    line = f'baton_{r.service}_nats_errors_total{{kind="permission"}} '
    for row in httpx.get(url, timeout=2).text.splitlines():
        if row.startswith(line):
            return float(row.removeprefix(line))
    return 0.0


async def _answers(dsn: str) -> dict[str, int]:
    con = await asyncpg.connect(dsn)
    try:
        rows = await con.fetch(
            "SELECT kind, count(*) FROM messages WHERE role = 'assistant' GROUP BY kind"
        )
    finally:
        await con.close()
    return {r["kind"]: r["count"] for r in rows}


async def test_invariants_hold_when_a_nats_node_and_a_replica_of_each_service_die(
    world: World,
) -> None:
    rng = random.Random(SEED)
    print(f"\ncluster seed={SEED} messages={MESSAGES} conversations={CONVERSATIONS}")
    await _streams_are_r3(world.cluster.url, world.admin)
    kill, kill_log = asyncio.Event(), []
    killer = asyncio.create_task(_kill(world, rng, kill, kill_log))
    client, _ = await _drive(world, rng, kill_at=MESSAGES // 3, kill=kill)
    await killer
    await settled(world.database_url, len(set(client.accepted.values())), timeout=150)
    await asyncio.sleep(2)  # anything still in flight would show up as a copy now

    con = await asyncpg.connect(world.database_url)
    try:
        summary = await check(con, client, world.model, MESSAGES)
    finally:
        await con.close()
    # Every message got its answer: a dead replica's work went to its twin, not to a failure.
    assert await _answers(world.database_url) == {"answer": MESSAGES}, world.log_tail()

    # Exactly the doomed replicas died; every survivor is still connected, to a live node.
    dead = [r.instance for r in world.replicas if r.child.exit_code() is not None]
    assert len(dead) == len(SERVICES) and {d.rsplit("-", 1)[0] for d in dead} == set(SERVICES)
    live_nodes = [n for n in world.cluster.nodes if n.pid is not None]
    assert len(live_nodes) == 2
    names: dict[str, int] = {}
    for node in live_nodes:
        for name, count in _connections(node).items():
            names[name] = names.get(name, 0) + count
    for r in world.replicas:
        if r.instance not in dead:
            assert names.get(f"baton-{r.service}@{r.instance}") == 1, (r.instance, names)
            # Least privilege held throughout: no survivor was refused anything by NATS.
            assert _permission_errors(r) == 0, r.instance
    print(f"cluster seed={SEED} killed={','.join(kill_log)} {summary}")


@pytest.mark.parametrize("replicas", [0, -1, 6])
async def test_provision_refuses_a_replica_count_jetstream_cannot_hold(replicas: int) -> None:
    with pytest.raises(ValueError, match="replicas must be between 1 and 5"):
        await provision("nats://127.0.0.1:1", replicas=replicas)

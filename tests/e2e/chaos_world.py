"""The world the chaos suites kill and restart: one NATS, one Postgres, the offline model and the
five services as supervised processes (restarted when they die), and the helpers that drive it.

``test_chaos.py`` (messages only) and ``test_chaos_tools.py`` (with the demo MCP server) share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path

import asyncpg
import msgspec
import nats
import nats.js.errors

from baton.embedded import (
    STARTUP_S,
    THROWAWAY_PG_SETTINGS,
    NatsServer,
    PostgresServer,
    create_database,
    free_port,
)
from baton.migrate import migrate
from baton.offline_model import ModelSettings, OfflineModelProcess
from baton.provision import provision
from baton.supervisor import Child, Supervisor, service_env
from shared import estimate
from tests.e2e.conftest import wait_healthy

SERVICES = ("persister", "policy", "agent", "executor", "gateway")
SECRET = "chaos-secret-" + "c" * 32
RUN_DEADLINE_S = 60


class World(msgspec.Struct):
    gateway: str
    nats: NatsServer
    postgres: PostgresServer
    database_url: str
    model: OfflineModelProcess
    supervisor: Supervisor
    logs: Path

    def kill(self, service: str) -> None:
        """SIGKILL the service and wait until it is gone, so the supervisor sees it dead (a
        process not yet reaped still polls as running: ``supervise`` could end before it
        restarts it)."""
        child = next(c for c in self.supervisor.children if c.name == service)
        child.signal(signal.SIGKILL)
        assert child.wait(10), f"{service} still runs 10 s after SIGKILL"

    async def restart_nats(self, down_s: float = 1.0) -> None:
        self.nats.stop()
        await asyncio.sleep(down_s)
        self.nats.start()

    async def restart_postgres(self, down_s: float = 1.0) -> None:
        await asyncio.to_thread(self.postgres.stop)
        await asyncio.sleep(down_s)
        await asyncio.to_thread(self.postgres.start)


@contextlib.contextmanager
def chaos_world(
    logs: Path, settings: ModelSettings, extra: Mapping[str, str] | None = None
) -> Iterator[World]:
    """Everything started and ready; ``extra``: more environment for every service."""
    base = Path(tempfile.mkdtemp(prefix="baton-chaos-"))
    nats = NatsServer(base / "nats")
    pg = PostgresServer(base / "pg", settings=THROWAWAY_PG_SETTINGS)
    nats.start()
    pg.start()
    try:
        dsn = asyncio.run(create_database(pg.dsn(), "baton"))
        # Short ack_wait, so work a killed process held comes back in seconds, not minutes.
        asyncio.run(provision(nats.url, ack_wait_s=3.0))
        asyncio.run(migrate(dsn))
        port = free_port()
        with OfflineModelProcess(settings) as model:
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
                        # A short attempt deadline: a redelivered call that died after its
                        # task's outcome came from another delivery is billed by its settle
                        # timer, due at the deadline (plus 10 s), well inside the checks'
                        # wait for every call's row (a policy file sets its own: 60 s too).
                        extra={
                            "BATON_SHUTDOWN_GRACE_S": "5",
                            "POLICY_RUN_DEADLINE_S": str(RUN_DEADLINE_S),
                            **(extra or {}),
                        },
                    ),
                    logs,
                )
                for name in SERVICES
            ]
            sup = Supervisor(children, say=lambda line: None)
            sup.start_all()
            try:
                wait_healthy(f"http://127.0.0.1:{port}", STARTUP_S)
                yield World(f"http://127.0.0.1:{port}", nats, pg, dsn, model, sup, logs)
            finally:
                sup.stop_all(grace_s=10)
    finally:
        pg.stop()
        nats.stop()
        shutil.rmtree(base, ignore_errors=True)


async def first_answer(dsn: str, timeout: float = 300.0) -> None:
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


async def supervise(world: World, until: asyncio.Event) -> None:
    """Restart what died, as ``baton up`` or Kubernetes would, until ``until`` is set: set it
    once the test's checks are done, not when the chaos ends, since a service restarted by the
    chaos may still die afterwards (an executor restarted while NATS restarted timed out on its
    first JetStream request and exited: unsupervised, its work never finished)."""
    while not until.is_set():
        world.supervisor.poll()
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def started_records(url: str) -> AsyncIterator[Callable[[str], Awaitable[bool]]]:
    """Whether a model call (an executor's or an agent's) left its ``started`` record (in
    CHAT_STREAM or AGENT_CALLS: estimate.record_stream); the chaos checks' ``recorded``: a
    call without one was cut before its ``message_start`` was read."""
    nc = await nats.connect(url)
    js = nc.jetstream()

    async def recorded(call_id: str) -> bool:
        try:
            await js.get_last_msg(estimate.record_stream(call_id), estimate.record_subject(call_id))
        except nats.js.errors.NotFoundError:
            return False
        return True

    try:
        yield recorded
    finally:
        await nc.close()


def log_lines_about(logs: Path, text: str, ids: int = 3, lines: int = 40) -> str:
    """Every service's log lines that name one of the first ``ids`` uuids in ``text`` (a
    failure message), for the failure: the logs go with the run's directory."""
    found = list(
        dict.fromkeys(
            re.findall(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", text)
        )
    )
    out = []
    for p in sorted(logs.glob("*.log")):
        hits = [
            line
            for line in p.read_text(errors="replace").splitlines()
            if any(u in line for u in found[:ids])
        ]
        out.append(f"== {p.name} ({len(hits)} lines)\n" + "\n".join(hits[-lines:]))
    return "\n".join(out)


def log_tails(logs: Path, lines: int = 30) -> str:
    """The last lines of every service's log, for a failure message."""
    return "\n".join(
        f"== {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
        for p in sorted(logs.glob("*.log"))
    )

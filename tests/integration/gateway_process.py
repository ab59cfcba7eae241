"""A real gateway process (``python -m services.gateway``) on this module's NATS and Postgres."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from baton.devtoken import make_token
from baton.embedded import STARTUP_S, NatsServer, PostgresServer, create_database, free_port
from baton.migrate import migrate
from baton.provision import provision
from baton.supervisor import Child, service_env
from tests.conftest import ExternalPostgres, _drop_database
from tests.support import http_get, port_taken

SECRET = "limits-secret-" + "x" * 32
MIB = 1024 * 1024


class RunningGateway:
    def __init__(self, child: Child, port: int) -> None:
        self.child = child
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def rss_bytes(self) -> int:
        """The process's resident set (VmRSS in /proc/<pid>/status)."""
        for line in Path(f"/proc/{self.child.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def auth(self, project: str = "p1", user: str = "u1") -> dict[str, str]:
        return {"Authorization": f"Bearer {make_token(SECRET, project, user)}"}

    def log(self) -> str:
        return self.child.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def backing(
    postgres_server: PostgresServer | ExternalPostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """One provisioned NATS and one migrated database for this module's gateways."""
    nats = NatsServer(tmp_path_factory.mktemp("nats"))
    nats.start()
    name = f"baton_gateway_{uuid.uuid4().hex}"
    try:
        database_url = asyncio.run(create_database(postgres_server.dsn(), name))
        asyncio.run(provision(nats.url))
        asyncio.run(migrate(database_url))
        yield nats.url, database_url
    finally:
        nats.stop()
        asyncio.run(_drop_database(postgres_server.dsn(), name))


@pytest.fixture
def start_gateway(
    backing: tuple[str, str], tmp_path: Path
) -> Iterator[Callable[..., RunningGateway]]:
    """Starts gateway processes with extra ``GATEWAY_*`` settings; stops each by its pid."""
    started: list[Child] = []

    def start(**env: str) -> RunningGateway:
        # A port free_port() found may be taken by another process before the gateway binds it
        # (a second suite on the machine): that start is retried on new ports, nothing else.
        for _ in range(3):
            gw = launch(**env)
            if gw is not None:
                return gw
        raise AssertionError("gateway: its ports were taken three times in a row")

    def launch(**env: str) -> RunningGateway | None:
        port = free_port()
        child = Child(
            "gateway",
            [sys.executable, "-m", "services.gateway"],
            service_env(
                "gateway",
                nats_url=backing[0],
                database_url=backing[1],
                metrics_port=free_port(),
                jwt_secret=SECRET,
                http_port=port,
                extra={f"GATEWAY_{k.upper()}": v for k, v in env.items()},
            ),
            tmp_path / f"gateway-{len(started)}.log",
        )
        child.start()
        started.append(child)
        gw = RunningGateway(child, port)
        deadline = time.monotonic() + STARTUP_S  # a start-up: it times nothing a test checks
        while True:
            with contextlib.suppress(httpx.TransportError):
                if http_get(f"{gw.url}/readyz", timeout=1).status_code == 200:
                    return gw
            if child.exit_code() is not None:
                if port_taken(gw.log()):
                    return None
                raise AssertionError(gw.log())
            assert time.monotonic() < deadline, (
                f"gateway not ready after {STARTUP_S:.0f} s\n{gw.log()}"
            )
            time.sleep(0.1)

    yield start
    for child in started:
        child.signal(signal.SIGTERM)
        if not child.wait(15):
            child.signal(signal.SIGKILL)
            child.wait(5)

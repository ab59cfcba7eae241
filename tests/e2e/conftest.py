"""End-to-end fixtures: the five services as separate processes on real NATS, Postgres and model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest

from baton.devtoken import make_token
from baton.embedded import NatsServer, free_port
from baton.migrate import migrate
from baton.offline_model import ModelSettings, OfflineModelProcess
from baton.provision import provision
from baton.supervisor import Child, Supervisor, service_env

SERVICES = ("persister", "policy", "agent", "executor", "gateway")
SECRET = "e2e-secret-" + "s" * 32


class Pipeline(msgspec.Struct):
    gateway: str
    model: OfflineModelProcess
    supervisor: Supervisor
    database_url: str
    nats_url: str
    logs: Path

    def token(self, project: str, user: str) -> str:
        return make_token(SECRET, project, user)

    def child(self, name: str) -> Child:
        return next(c for c in self.supervisor.children if c.name == name)

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for path in sorted(self.logs.glob("*.log")):
            out.append(f"== {path.name}")
            out.extend(path.read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(out)


@pytest.fixture
def pipeline(nats_server: NatsServer, database_url: str, tmp_path: Path) -> Iterator[Pipeline]:
    asyncio.run(provision(nats_server.url))
    asyncio.run(migrate(database_url))
    port = free_port()
    logs = tmp_path / "logs"
    with OfflineModelProcess(ModelSettings(tokens_per_second=400)) as model:
        children = [
            Child.service(
                name,
                service_env(
                    name,
                    nats_url=nats_server.url,
                    database_url=database_url,
                    metrics_port=free_port(),
                    jwt_secret=SECRET,
                    http_port=port,
                    model_url=model.url,
                ),
                logs,
            )
            for name in SERVICES
        ]
        supervisor = Supervisor(children, say=lambda line: None)
        supervisor.start_all()
        gateway = f"http://127.0.0.1:{port}"
        p = Pipeline(gateway, model, supervisor, database_url, nats_server.url, logs)
        try:
            _wait_healthy(gateway, 30)
            yield p
        finally:
            supervisor.stop_all(grace_s=10)
    for child in children:
        assert child.exit_code() == 0, (
            f"{child.name} exited with {child.exit_code()}\n{p.log_tail()}"
        )


def _wait_healthy(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"gateway at {url} not ready")

"""End-to-end fixtures: the five services as separate processes on real NATS, Postgres and model."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import msgspec
import pytest

from baton import permissions, roles
from baton.devtoken import make_token
from baton.embedded import NatsServer, PostgresServer, create_database, free_port
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
    # With least privilege on: the NATS passwords by user (admin and one per service).
    passwords: dict[str, str] = {}

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


class OwnPipeline(Pipeline, kw_only=True):
    """A pipeline on its own NATS and Postgres, which a test may stop and start again."""

    nats: NatsServer
    postgres: PostgresServer


@pytest.fixture
def pipeline(nats_server: NatsServer, database_url: str, tmp_path: Path) -> Iterator[Pipeline]:
    with _running(nats_server.url, database_url, tmp_path / "logs") as p:
        yield p


@pytest.fixture
def own_pipeline(tmp_path: Path) -> Iterator[OwnPipeline]:
    """Five services on a NATS and a Postgres of this test's own, so the test may stop them."""
    # Not pytest's tmp dir: it is mode 0700 under root, which the unprivileged postgres can't enter.
    base = Path(tempfile.mkdtemp(prefix="baton-e2e-pg-"))
    postgres = PostgresServer(base / "data")
    nats = NatsServer(tmp_path / "nats")
    try:
        postgres.start()
        nats.start()
        database_url = asyncio.run(create_database(postgres.dsn(), "baton"))
        with _running(nats.url, database_url, tmp_path / "logs") as p:
            fields = {f: getattr(p, f) for f in Pipeline.__struct_fields__}
            try:
                yield OwnPipeline(**fields, nats=nats, postgres=postgres)
            finally:
                # Services stop with both servers up, whatever the test did to them.
                postgres.start()
                nats.start()
    finally:
        nats.stop()
        postgres.stop()
        shutil.rmtree(base, ignore_errors=True)


class SecurePipeline(Pipeline, kw_only=True):
    """Five services as their own NATS users and Postgres roles (least privilege, I5)."""

    nats: NatsServer


@pytest.fixture
def secure_pipeline(database_url: str, tmp_path: Path) -> Iterator[SecurePipeline]:
    """A NATS of its own with one user per service; services use their own database roles."""
    passwords = permissions.new_passwords()
    nats = NatsServer(tmp_path / "nats", config_text=permissions.authorization(passwords))
    nats.start()
    try:
        with _running(nats.url, database_url, tmp_path / "logs", passwords=passwords) as p:
            fields = {f: getattr(p, f) for f in Pipeline.__struct_fields__}
            yield SecurePipeline(**fields, nats=nats)
    finally:
        nats.stop()


@contextlib.contextmanager
def _running(
    nats_url: str,
    database_url: str,
    logs: Path,
    extra: Mapping[str, str] | None = None,
    passwords: Mapping[str, str] | None = None,
    replicas: Mapping[str, int] | None = None,
) -> Iterator[Pipeline]:
    """Provision, migrate, start the offline model and the five services; stop them after.

    ``replicas`` runs more than one process of a service (named ``policy``, ``policy-2``, …).

    With ``passwords`` (least privilege): provision as the admin, run each service as its own
    NATS user and with its own database role.
    """
    admin = permissions.ADMIN
    user, password = (admin, passwords[admin]) if passwords else ("", "")
    asyncio.run(provision(nats_url, user=user, password=password))
    asyncio.run(migrate(database_url))
    if passwords:
        asyncio.run(roles.ensure_roles(database_url))

    def dsn(name: str) -> str:
        if not passwords:
            return database_url
        return roles.dsn_for(database_url, name) if name in roles.SERVICES_WITH_DB else ""

    port = free_port()
    with OfflineModelProcess(ModelSettings(tokens_per_second=400)) as model:
        children = [
            Child(
                name if n == 1 else f"{name}-{n}",
                [sys.executable, "-m", f"services.{name}"],
                service_env(
                    name if n == 1 else f"{name}-{n}",
                    nats_url=nats_url,
                    database_url=dsn(name),
                    metrics_port=free_port(),
                    jwt_secret=SECRET,
                    http_port=port,
                    model_url=model.url,
                    nats_user=name if passwords else "",
                    nats_password=passwords[name] if passwords else "",
                    extra=extra,
                ),
                logs / f"{name if n == 1 else f'{name}-{n}'}.log",
            )
            for name in SERVICES
            for n in range(1, (replicas or {}).get(name, 1) + 1)
        ]
        supervisor = Supervisor(children, say=lambda line: None)
        supervisor.start_all()
        gateway = f"http://127.0.0.1:{port}"
        p = Pipeline(
            gateway, model, supervisor, database_url, nats_url, logs, dict(passwords or {})
        )
        try:
            wait_healthy(gateway, 30)
            wait_services_up(children, 30)
            yield p
        finally:
            supervisor.stop_all(grace_s=10)
    for child in children:
        assert child.exit_code() == 0, (
            f"{child.name} exited with {child.exit_code()}\n{p.log_tail()}"
        )


def wait_healthy(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"gateway at {url} not ready")


def wait_services_up(children: list[Child], timeout: float) -> None:
    """Wait until every service reports itself up (past start-up, signal handlers in place)."""
    deadline = time.monotonic() + timeout
    for child in children:
        url = f"http://127.0.0.1:{child.env['BATON_METRICS_PORT']}/metrics"
        service = child.argv[-1].rpartition(".")[2]  # python -m services.<name>
        while True:
            with contextlib.suppress(httpx.TransportError):
                if f"baton_{service}_up 1.0" in httpx.get(url, timeout=1).text.splitlines():
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{child.name} not up")
            time.sleep(0.05)

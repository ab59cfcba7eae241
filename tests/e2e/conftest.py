"""End-to-end fixtures: the five services as separate processes on real NATS, Postgres and model."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from baton import permissions, roles
from baton.devtoken import make_token
from baton.embedded import STARTUP_S as STARTUP_S  # re-exported: the e2e tests import it
from baton.embedded import (
    THROWAWAY_PG_SETTINGS,
    NatsServer,
    PostgresServer,
    create_database,
    free_ports,
)
from baton.migrate import migrate
from baton.offline_model import ModelSettings, OfflineModelProcess
from baton.provision import provision
from baton.supervisor import Child, Supervisor, service_env
from tests.conftest import ExternalPostgres, _drop_database
from tests.support import http_get, port_taken

SERVICES = ("persister", "policy", "agent", "executor", "gateway")
# Bound on a wait for an answer, a state or a log line that the test does not time: quiet, each
# comes within a second or two; on two cores under load it took 20-30 s, and a tight bound there
# only turns a busy machine into a red suite (as STARTUP_S does for start-ups).
SETTLE_S = 120.0
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


def module_stack(
    postgres_server: PostgresServer | ExternalPostgres,
    tmp: Path,
    extra: Mapping[str, str] | None = None,
) -> Iterator[Pipeline]:
    """The five services on a NATS and a database of their own, for one test module.

    One start-up per module instead of one per test (each takes 10-30 s on a busy machine). For
    modules whose tests use conversations and users of their own and assert nothing on counts
    across the stack (metrics, logs, the whole model ledger); ``fresh`` resets the model. A
    module that counts model calls filters them by its own message (``calls_for``). ``extra``
    is environment for every service, as ``_running`` takes it.
    """
    admin_dsn = postgres_server.dsn()
    name = f"baton_test_{uuid.uuid4().hex}"
    database_url = asyncio.run(create_database(admin_dsn, name))
    nats = NatsServer(tmp / "nats")
    nats.start()
    try:
        with _running(nats.url, database_url, tmp / "logs", extra) as p:
            yield p
    finally:
        nats.stop()
        asyncio.run(_drop_database(admin_dsn, name))


def calls_for(p: Pipeline, message_id: str, model: str = "") -> list[dict[str, Any]]:
    """The model's ledger entries for one user message (of ``model``, if given), oldest first.

    Every tagged call's id names the message it serves (``classify:<message>#n``,
    ``task:run-<message>:<attempt>#n``), so a test on a shared stack counts only its own calls.
    """
    return [
        c
        for call_id, c in p.model.calls().items()
        if message_id in call_id and model in ("", c["model"])
    ]


def fresh(p: Pipeline) -> Pipeline:
    """The module's stack with the model as ``_running`` starts it: no faults, default pace."""
    p.model.clear()
    p.model.update_settings(
        ttft_ms=0, tokens_per_second=400, words_per_reply=24, seed="", style="hostile"
    )
    return p


@pytest.fixture(scope="module")
def _module_stack(
    postgres_server: PostgresServer | ExternalPostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    yield from module_stack(postgres_server, tmp_path_factory.mktemp("stack"))


@pytest.fixture
def module_pipeline(_module_stack: Pipeline) -> Pipeline:
    """The module's one stack (see ``module_stack``), the model reset. A module opts in with a
    ``pipeline`` fixture of its own that returns this one."""
    return fresh(_module_stack)


@pytest.fixture
def own_pipeline(tmp_path: Path) -> Iterator[OwnPipeline]:
    """Five services on a NATS and a Postgres of this test's own, so the test may stop them."""
    # Not pytest's tmp dir: it is mode 0700 under root, which the unprivileged postgres can't enter.
    base = Path(tempfile.mkdtemp(prefix="baton-e2e-pg-"))
    postgres = PostgresServer(base / "data", settings=THROWAWAY_PG_SETTINGS)
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
    with secure_running(database_url, tmp_path) as p:
        yield p


def secure_module_stack(
    postgres_server: PostgresServer | ExternalPostgres, tmp: Path
) -> Iterator[SecurePipeline]:
    """``secure_pipeline``'s stack on a database of its own, for one test module (as
    ``module_stack``; ``fresh`` resets its model)."""
    admin_dsn = postgres_server.dsn()
    name = f"baton_test_{uuid.uuid4().hex}"
    database_url = asyncio.run(create_database(admin_dsn, name))
    try:
        with secure_running(database_url, tmp) as p:
            yield p
    finally:
        asyncio.run(_drop_database(admin_dsn, name))


@contextlib.contextmanager
def secure_running(database_url: str, base: Path) -> Iterator[SecurePipeline]:
    """``secure_pipeline``'s stack, for fixtures of any scope."""
    passwords = permissions.new_passwords()
    nats = NatsServer(base / "nats", config_text=permissions.authorization(passwords))
    nats.start()
    try:
        with _running(nats.url, database_url, base / "logs", passwords=passwords) as p:
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

    instances = [
        (name, n) for name in SERVICES for n in range(1, (replicas or {}).get(name, 1) + 1)
    ]
    # Distinct by construction: free_port() twice in a row may hand out the same port.
    port, *metrics_ports = free_ports(1 + len(instances))
    with OfflineModelProcess(
        ModelSettings(tokens_per_second=400, style="hostile"), timeout=STARTUP_S
    ) as model:
        children = [
            Child(
                name if n == 1 else f"{name}-{n}",
                [sys.executable, "-m", f"services.{name}"],
                service_env(
                    name if n == 1 else f"{name}-{n}",
                    nats_url=nats_url,
                    database_url=dsn(name),
                    metrics_port=metrics_port,
                    jwt_secret=SECRET,
                    http_port=port,
                    model_url=model.url,
                    nats_user=name if passwords else "",
                    nats_password=passwords[name] if passwords else "",
                    extra=extra,
                ),
                logs / f"{name if n == 1 else f'{name}-{n}'}.log",
            )
            for (name, n), metrics_port in zip(instances, metrics_ports, strict=True)
        ]
        supervisor = Supervisor(children, say=lambda line: None)
        p = Pipeline("", model, supervisor, database_url, nats_url, logs, dict(passwords or {}))
        try:
            start_services(children, STARTUP_S)
            p.gateway = f"http://127.0.0.1:{p.child('gateway').env['GATEWAY_HTTP_PORT']}"
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
            if http_get(f"{url}/readyz", timeout=1).status_code == 200:
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
                if f"baton_{service}_up 1.0" in http_get(url, timeout=1).text.splitlines():
                    break
            if child.exit_code() is not None or time.monotonic() > deadline:
                raise TimeoutError(f"{child.name} not up\n{_tails([child])}")
            time.sleep(0.05)


def start_services(children: list[Child], timeout: float) -> None:
    """Start ``children``; return once each reports itself up (the gateway also answers
    ``/readyz``) and none has exited.

    A port from ``free_ports`` was only free a moment ago: another worker's process may bind it
    first. A child that exits on a taken port starts again on fresh ports (on 2026-12-01 the
    executor died on its metrics port, and the wait read the agent's metrics there for 30 s).
    Any other early exit fails at once, with the child's log.
    """
    deadline = time.monotonic() + timeout
    offsets: dict[str, int] = {}
    for child in children:
        offsets[child.name] = _log_size(child)
        child.start()
    up: set[str] = set()
    while True:
        for child in children:
            if child.exit_code() is not None:
                up.discard(child.name)
                _restart_on_fresh_ports(child, offsets)
            elif child.name not in up and _started(child):
                up.add(child.name)
        if len(up) == len(children):
            # The gateway reports itself up, then binds its HTTP port: one that lost it logs
            # so and exits after its clean-up (and /readyz there was another process's).
            time.sleep(0.2)
            lost = [c for c in children if port_taken(_log_since(c, offsets[c.name]))]
            for child in lost:
                child.wait(30)  # restarted on fresh ports by the next round
            if not lost and all(c.exit_code() is None for c in children):
                return
        if time.monotonic() > deadline:
            late = [c for c in children if c.name not in up or c.exit_code() is not None]
            names = ", ".join(c.name for c in late)
            raise TimeoutError(f"not up after {timeout:.0f} s: {names}\n{_tails(late)}")
        time.sleep(0.05)


def _started(child: Child) -> bool:
    url = f"http://127.0.0.1:{child.env['BATON_METRICS_PORT']}/metrics"
    service = child.argv[-1].rpartition(".")[2]  # python -m services.<name>
    try:
        if f"baton_{service}_up 1.0" not in http_get(url, timeout=2).text.splitlines():
            return False
        if "GATEWAY_HTTP_PORT" not in child.env:
            return True
        ready = f"http://127.0.0.1:{child.env['GATEWAY_HTTP_PORT']}/readyz"
        return http_get(ready, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _restart_on_fresh_ports(child: Child, offsets: dict[str, int]) -> None:
    log = _log_since(child, offsets[child.name])
    if not port_taken(log):
        raise RuntimeError(f"{child.name} exited with {child.exit_code()} while starting:\n{log}")
    for var in ("BATON_METRICS_PORT", "GATEWAY_HTTP_PORT"):
        if var in child.env:
            child.env[var] = str(free_ports(1)[0])
    offsets[child.name] = _log_size(child)
    child.start()


def _log_size(child: Child) -> int:
    try:
        return child.log_path.stat().st_size
    except FileNotFoundError:
        return 0


def _log_since(child: Child, offset: int) -> str:
    try:
        with child.log_path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")[-4000:]
    except FileNotFoundError:
        return ""


def _tails(children: list[Child]) -> str:
    return "\n".join(f"== {c.name}\n{_log_since(c, max(0, _log_size(c) - 2000))}" for c in children)

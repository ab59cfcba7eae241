"""The bench's own stack: NATS, Postgres, offline model and services on free ports, stopped by pid."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from baton import devtoken, permissions, roles
from baton.embedded import STARTUP_S, NatsServer, PostgresServer, free_port
from baton.migrate import migrate
from baton.offline_model import ModelSettings, OfflineModelProcess
from baton.provision import provision
from baton.supervisor import Child, Supervisor, service_env
from baton.up import DATABASE, ensure_database

SERVICES = ("persister", "policy", "agent", "executor", "gateway")
SECRET = "bench-secret-" + "b" * 32
# Bound on waiting for the last answers (tokens) of a scenario to arrive. It times nothing the
# results report (each message is timed on its own) and only ends a wait that failed; a tight
# bound on a busy machine would report a slow machine as lost work.
DRAIN_S = 120.0


def _wait_http(url: str, needle: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(urllib.error.URLError, OSError),
            urllib.request.urlopen(url, timeout=1) as resp,
        ):
            if resp.status == 200 and needle in resp.read().decode():
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready in {timeout:.0f}s")


class Stack:
    """NATS (one user per service), Postgres (one role per service), model, some services."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.logs = base / "logs"
        self.passwords = permissions.new_passwords()
        self.nats = NatsServer(
            base / "nats",
            config_text=permissions.authorization(self.passwords),
            log_file=self.logs / "nats.log",
            monitor_port=0,
        )
        self.pg = PostgresServer(base / "postgres", log_file=self.logs / "postgres.log")
        self.model: OfflineModelProcess | None = None
        self.supervisor: Supervisor | None = None
        self.dsn = ""
        self.gateway = ""
        self.token = devtoken.make_token(SECRET, "bench", "bench")

    def start_infra(self, model: ModelSettings) -> None:
        self.nats.start()
        self.pg.start()
        asyncio.run(ensure_database(self.pg.dsn(), DATABASE))
        self.dsn = self.pg.dsn(DATABASE)
        asyncio.run(migrate(self.dsn))
        asyncio.run(roles.ensure_roles(self.dsn))
        asyncio.run(self.provision())
        self.model = OfflineModelProcess(model, timeout=STARTUP_S)
        self.model.start()

    async def provision(self) -> None:
        await provision(self.nats.url, user=permissions.ADMIN, password=self.admin_password)

    @property
    def admin_password(self) -> str:
        return self.passwords[permissions.ADMIN]

    def start_services(
        self, names: Sequence[str] = SERVICES, extra: Mapping[str, str] | None = None
    ) -> None:
        assert self.model is not None
        port = free_port()
        children = [
            Child.service(
                name,
                service_env(
                    name,
                    nats_url=self.nats.url,
                    database_url=(
                        roles.dsn_for(self.dsn, name) if name in roles.SERVICES_WITH_DB else ""
                    ),
                    metrics_port=free_port(),
                    jwt_secret=SECRET,
                    http_port=port,
                    model_url=self.model.url,
                    nats_user=name,
                    nats_password=self.passwords[name],
                    extra=extra,
                ),
                self.logs,
            )
            for name in names
        ]
        self.supervisor = Supervisor(children, say=lambda _line: None)
        self.supervisor.start_all()
        if "gateway" in names:
            self.gateway = f"http://127.0.0.1:{port}"
            _wait_http(f"{self.gateway}/readyz", "ready", STARTUP_S)
        for child in children:
            url = f"http://127.0.0.1:{child.env['BATON_METRICS_PORT']}/metrics"
            _wait_http(url, f"baton_{child.name}_up 1.0", STARTUP_S)

    def stop_services(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop_all(grace_s=10)
            self.supervisor = None

    def nats_counters(self) -> dict[str, int]:
        """The server's message and byte counters (from its /varz monitoring page)."""
        url = self.nats.monitor_url
        if url is None:
            return {}
        with urllib.request.urlopen(f"{url}/varz", timeout=5) as resp:
            varz = json.loads(resp.read())
        return {k: int(varz.get(k, 0)) for k in ("in_msgs", "out_msgs", "in_bytes", "out_bytes")}

    def pids(self) -> dict[str, int]:
        """Service pids plus nats, postgres (the postmaster) and the offline model."""
        out: dict[str, int] = {}
        if self.supervisor is not None:
            out |= {c.name: c.pid for c in self.supervisor.children if c.pid is not None}
        for name, pid in (
            ("nats", self.nats.pid),
            ("postgres", self.pg.pid),
            ("offline-model", self.model.pid if self.model is not None else None),
        ):
            if pid is not None:
                out[name] = pid
        return out

    def stop(self) -> None:
        self.stop_services()
        if self.model is not None:
            self.model.stop()
        self.pg.stop()
        self.nats.stop()


@contextlib.contextmanager
def running(model: ModelSettings | None = None, keep_logs: Path | None = None) -> Iterator[Stack]:
    """Infrastructure up (no services yet); everything stopped and deleted afterwards."""
    # Not pytest's or a 0700 dir: the unprivileged postgres must be able to enter it.
    base = Path(tempfile.mkdtemp(prefix="baton-bench-"))
    base.chmod(0o755)
    stack = Stack(base)
    try:
        stack.start_infra(model or ModelSettings(words_per_reply=20, style="hostile"))
        yield stack
    finally:
        stack.stop()
        if keep_logs is not None:
            shutil.copytree(stack.logs, keep_logs, dirs_exist_ok=True)
        shutil.rmtree(base, ignore_errors=True)

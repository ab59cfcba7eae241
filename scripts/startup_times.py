"""How long each service takes from spawn to ``baton_<service>_up 1`` (docs/benchmarks.md).

    .venv/bin/python scripts/startup_times.py [--rounds 3]

Runs on an embedded NATS and Postgres and the offline model. Each round starts every service
alone (one at a time), then all five at once (what the e2e fixtures do), and reports the median
seconds. The bytecode state is whatever the tree has: run it once after
``find baton shared services -name __pycache__ -exec rm -rf {} +`` with PYTHONDONTWRITEBYTECODE=1
(every process compiles the project anew) and once after ``make bytecode``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from baton.embedded import NatsServer, PostgresServer, create_database, free_ports
from baton.migrate import migrate
from baton.offline_model import OfflineModelProcess
from baton.provision import provision
from baton.supervisor import Child, service_env

SERVICES = ("persister", "policy", "agent", "executor", "gateway")


def _up(port: int, service: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
            return f"baton_{service}_up 1.0" in r.read().decode().splitlines()
    except OSError:
        return False


def _start(names: tuple[str, ...], nats_url: str, dsn: str, model_url: str, logs: Path) -> float:
    """Start ``names`` at once; seconds until the last of them is up. Stops them after."""
    ports = free_ports(2 * len(names))
    children = [
        Child(
            name,
            [sys.executable, "-m", f"services.{name}"],
            service_env(
                name,
                nats_url=nats_url,
                database_url=dsn,
                metrics_port=ports[2 * i],
                jwt_secret="s" * 40,
                http_port=ports[2 * i + 1],
                model_url=model_url,
            ),
            logs / f"{name}.log",
        )
        for i, name in enumerate(names)
    ]
    t0 = time.monotonic()
    for child in children:
        child.start()
    try:
        pending = list(children)
        while pending:
            pending = [c for c in pending if not _up(int(c.env["BATON_METRICS_PORT"]), c.name)]
            if time.monotonic() - t0 > 120:
                raise TimeoutError(f"not up after 120 s: {[c.name for c in pending]}")
            time.sleep(0.02)
        return time.monotonic() - t0
    finally:
        for child in children:
            child.signal(signal.SIGTERM)
        for child in children:
            if not child.wait(15):
                child.signal(signal.SIGKILL)
                child.wait(5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="baton-startup-"))
    postgres = PostgresServer(base / "pg")
    nats = NatsServer(base / "nats")
    try:
        postgres.start()
        nats.start()
        dsn = asyncio.run(create_database(postgres.dsn(), "baton"))
        asyncio.run(provision(nats.url))
        asyncio.run(migrate(dsn))
        with OfflineModelProcess() as model:
            alone: dict[str, list[float]] = {s: [] for s in SERVICES}
            together: list[float] = []
            for _ in range(args.rounds):
                for s in SERVICES:
                    alone[s].append(_start((s,), nats.url, dsn, model.url, base / "logs"))
                together.append(_start(SERVICES, nats.url, dsn, model.url, base / "logs"))
        bytecode = os.environ.get("PYTHONDONTWRITEBYTECODE") or "unset"
        print(f"PYTHONDONTWRITEBYTECODE={bytecode} load={os.getloadavg()[0]:.1f}")
        for s in SERVICES:
            print(f"{s:10} alone  {statistics.median(alone[s]):5.2f} s  {alone[s]}")
        print(f"all five together {statistics.median(together):5.2f} s  {together}")
    finally:
        nats.stop()
        postgres.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()

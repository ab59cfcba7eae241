"""How long one e2e stack takes to start and stop, part by part (docs/benchmarks.md).

    .venv/bin/python scripts/stack_times.py [--rounds 5] [--own-postgres]

Starts what ``tests/e2e/conftest.py``'s ``module_stack`` starts (a database on a session
Postgres, a NATS of its own, provision, migrate, the offline model, the five services) with the
very functions the fixtures use, ``rounds`` times, and prints the median seconds of each part.
``--own-postgres`` also times a Postgres of the stack's own (``own_pipeline``'s first step).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baton import embedded
from baton.embedded import NatsServer, PostgresServer, create_database
from tests.conftest import _drop_database
from tests.e2e import conftest as e2e

# What tests/conftest.py gives the session's Postgres (none before it had any, so an older tree
# runs this script too).
SETTINGS = getattr(embedded, "THROWAWAY_PG_SETTINGS", {})


class Clock:
    def __init__(self) -> None:
        self.parts: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.parts.setdefault(name, []).append(time.perf_counter() - t0)


def _cpu_s(pid: int | None) -> float:
    """User + system CPU seconds the process has used so far (Linux /proc)."""
    if pid is None:
        return float("nan")
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_stack(clock: Clock, admin_dsn: str, tmp: Path, own_postgres: bool) -> None:
    t0 = time.perf_counter()
    if own_postgres:
        with clock.part("postgres (own, fresh data dir)"):
            postgres = PostgresServer(
                Path(tempfile.mkdtemp(prefix="baton-st-pg-")) / "data", settings=SETTINGS
            )
            postgres.start()
        postgres.stop()
        shutil.rmtree(postgres.data_dir.parent, ignore_errors=True)
    name = f"baton_test_{uuid.uuid4().hex}"
    with clock.part("create database"):
        dsn = asyncio.run(create_database(admin_dsn, name))
    nats = NatsServer(tmp / "nats")
    with clock.part("nats-server"):
        nats.start()
    with e2e._running(nats.url, dsn, tmp / "logs") as p:
        up = time.perf_counter()
        clock.parts.setdefault("= stack up (total)", []).append(up - t0)
        procs = [(c.name, c.pid) for c in p.supervisor.children]
        procs += [("offline model", p.model.pid), ("nats-server", nats.pid)]
        for proc_name, pid in procs:
            clock.parts.setdefault(f"cpu: {proc_name}", []).append(_cpu_s(pid))
    clock.parts.setdefault("stop: services and model", []).append(time.perf_counter() - up)
    with clock.part("stop: nats, drop database"):
        nats.stop()
        asyncio.run(_drop_database(admin_dsn, name))


def _timed(clock: Clock) -> None:
    """Wrap the steps ``_running`` calls (names in the conftest's namespace) in clock parts."""

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            cpu = time.process_time()
            try:
                with clock.part(name):
                    return fn(*args, **kwargs)
            finally:
                own = time.process_time() - cpu
                clock.parts.setdefault(f"cpu: this process, {name}", []).append(own)

        return timed

    def wrap_async(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        async def timed(*args: Any, **kwargs: Any) -> Any:
            with clock.part(name):
                return await fn(*args, **kwargs)

        return timed

    e2e.provision = wrap_async("provision", e2e.provision)
    e2e.migrate = wrap_async("migrate", e2e.migrate)
    e2e.start_services = wrap("five services up", e2e.start_services)
    model = e2e.OfflineModelProcess
    model.start = wrap("offline model", model.start)  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--own-postgres", action="store_true")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="baton-stack-times-"))
    clock = Clock()
    _timed(clock)
    with clock.part("session postgres (fresh data dir)"):
        postgres = PostgresServer(base / "pg" / "data", settings=SETTINGS)
        postgres.start()
    try:
        load0 = os.getloadavg()[0]
        for i in range(args.rounds):
            one_stack(clock, postgres.dsn(), base / f"s{i}", args.own_postgres)
        load1 = os.getloadavg()[0]
    finally:
        postgres.stop()
        shutil.rmtree(base, ignore_errors=True)
    print(f"load {load0:.2f} -> {load1:.2f}, rounds {args.rounds}")
    for name, values in clock.parts.items():
        rounded = ", ".join(f"{v:.2f}" for v in values)
        print(f"{name:40} {statistics.median(values):6.2f} s  [{rounded}]")


if __name__ == "__main__":
    main()

"""Shared fixtures: one Postgres per session, a fresh database and a NATS server per test."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from baton.embedded import THROWAWAY_PG_SETTINGS, NatsServer, PostgresServer, create_database

# The order files go to `make test`'s xdist workers (`--dist loadfile --no-loadscope-reorder`):
# longest first, by the seconds each took in a measured run (tests/file_costs.json, written by
# scripts/file_costs.py), so no long file starts last and holds one worker while the others
# wait. A file not listed yet is costed by its directory.
FILE_COSTS = Path(__file__).with_name("file_costs.json")
DIR_COST = {"compose": 100.0, "e2e": 30.0, "browser": 30.0, "clients": 30.0, "integration": 10.0}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    known: dict[str, float] = json.loads(FILE_COSTS.read_text()) if FILE_COSTS.exists() else {}

    def cost(item: pytest.Item) -> float:
        path = item.nodeid.split("::", 1)[0]
        if path in known:
            return known[path]
        parts = path.split("/")
        return DIR_COST.get(parts[1], 1.0) if len(parts) > 2 else 1.0

    items.sort(key=lambda item: -cost(item))  # stable: a file's tests keep their order


@dataclass(frozen=True)
class ExternalPostgres:
    """A server given by TEST_DATABASE_URL (its admin DSN); we never start or stop it."""

    admin_dsn: str

    def dsn(self, database: str = "postgres") -> str:
        parts = urllib.parse.urlsplit(self.admin_dsn)
        return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(database)))


@dataclass(frozen=True)
class ExternalNats:
    """A server given by TEST_NATS_URL; its JetStream state is shared by every test."""

    url: str


POSTGRES_IMAGE = "postgres:16-alpine"


def _docker_can_run(image: str) -> bool:
    """Whether a Docker engine answers and has, or can pull, ``image`` (and testcontainers'
    Ryuk unless it is disabled). An engine that answers but cannot pull (no registry here)
    is not a reason to leave the embedded servers."""
    if os.environ.get("TEST_NO_DOCKER"):
        return False
    try:
        import docker

        client = docker.from_env(timeout=30)
        client.ping()
    except Exception:
        return False  # no engine answers: the usual case
    try:
        images = [image]
        if os.environ.get("TESTCONTAINERS_RYUK_DISABLED", "").lower() != "true":
            from testcontainers.core.config import testcontainers_config

            images.append(testcontainers_config.ryuk_image)
        for name in images:
            try:
                client.images.get(name)
            except docker.errors.ImageNotFound:
                client.images.pull(name)
        return True
    except Exception as exc:
        print(f"embedded Postgres, not testcontainers: {image} cannot be had ({exc})")
        return False


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer | ExternalPostgres]:
    """TEST_DATABASE_URL's server if set, else testcontainers' Postgres when a Docker engine
    answers and can have its image, else an embedded Postgres for the whole session."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield ExternalPostgres(url)
        return
    if _docker_can_run(POSTGRES_IMAGE):
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer(POSTGRES_IMAGE, driver=None) as pg:
            yield ExternalPostgres(pg.get_connection_url())
        return
    # Not pytest's tmp dir: it is mode 0700 under root, which the unprivileged postgres can't enter.
    base = Path(tempfile.mkdtemp(prefix="baton-test-pg-"))
    server = PostgresServer(base / "data", settings=THROWAWAY_PG_SETTINGS)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


async def _drop_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
def database_url(postgres_server: PostgresServer | ExternalPostgres) -> Iterator[str]:
    """DSN of a fresh empty database, dropped (with FORCE) after the test."""
    admin_dsn = postgres_server.dsn()
    name = f"baton_test_{uuid.uuid4().hex}"
    # Sync fixture + asyncio.run: no event loop of the test's is running during setup/teardown.
    dsn = asyncio.run(create_database(admin_dsn, name))
    try:
        yield dsn
    finally:
        asyncio.run(_drop_database(admin_dsn, name))


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer | ExternalNats]:
    """TEST_NATS_URL's server if set (JetStream state then shared), else a fresh one per test."""
    url = os.environ.get("TEST_NATS_URL")
    if url:
        yield ExternalNats(url)
        return
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        # A throwaway server: its store is deleted with tmp_path, so nothing needs the
        # graceful JetStream shutdown SIGTERM waits for (~0.3 s a test, ~450 tests).
        server.kill()


@pytest.fixture
def nats_url(nats_server: NatsServer | ExternalNats) -> str:
    return nats_server.url

"""Shared fixtures: one Postgres per session, a fresh database and a NATS server per test."""

from __future__ import annotations

import asyncio
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

from baton.embedded import NatsServer, PostgresServer, create_database


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


def _docker_answers() -> bool:
    """Whether a Docker engine answers right now (never on the project's own CI machine)."""
    if os.environ.get("TEST_NO_DOCKER"):
        return False
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer | ExternalPostgres]:
    """TEST_DATABASE_URL's server if set, else testcontainers' Postgres when a Docker engine
    answers, else an embedded Postgres for the whole session."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield ExternalPostgres(url)
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as pg:
            yield ExternalPostgres(pg.get_connection_url())
        return
    # Not pytest's tmp dir: it is mode 0700 under root, which the unprivileged postgres can't enter.
    base = Path(tempfile.mkdtemp(prefix="baton-test-pg-"))
    server = PostgresServer(base / "data")
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
        server.stop()


@pytest.fixture
def nats_url(nats_server: NatsServer | ExternalNats) -> str:
    return nats_server.url

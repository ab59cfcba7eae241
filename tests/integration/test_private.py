"""Secrets stay with their owner: private files and directories, Postgres only with a password."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from baton import roles
from baton.embedded import NatsServer, PostgresServer
from baton.migrate import migrate


@pytest.fixture
def pg_dir() -> Iterator[Path]:
    # Not tmp_path: as root the unprivileged postgres user must be able to enter the directory.
    base = Path(tempfile.mkdtemp(prefix="baton-test-pg-"))
    yield base / "data"
    shutil.rmtree(base, ignore_errors=True)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _with_password(dsn: str, password: str | None) -> str:
    """``dsn`` with its password replaced (None: no password at all)."""
    parts = urllib.parse.urlsplit(dsn)
    user = urllib.parse.quote(parts.username or "", safe="")
    auth = user if password is None else f"{user}:{urllib.parse.quote(password, safe='')}"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{auth}@{parts.hostname}:{parts.port}"))


async def _refused(dsn: str, **kwargs: Any) -> None:
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        con = await asyncpg.connect(dsn, timeout=5, **kwargs)
        await con.close()


async def _refuses_without_the_right_password(dsn: str, socket_dir: str | None = None) -> None:
    """No password and a wrong one are refused over TCP (and the Unix socket, when given)."""
    await _refused(_with_password(dsn, None))
    await _refused(_with_password(dsn, "not-the-password"))
    if socket_dir:
        port = urllib.parse.urlsplit(dsn).port
        await _refused(_with_password(dsn, None), host=socket_dir, port=port)
        await _refused(_with_password(dsn, "not-the-password"), host=socket_dir, port=port)


def test_nats_writes_its_config_store_and_log_for_its_owner_only(tmp_path: Path) -> None:
    old = os.umask(0)  # the modes must not depend on the caller's umask
    try:
        server = NatsServer(tmp_path / "nats", config_text='authorization { token: "s3cret" }')
        server.start()
    finally:
        os.umask(old)
    try:
        assert _mode(server.config_file) == 0o600
        assert _mode(server.store_dir) == 0o700
        assert _mode(server.log_file) == 0o600
        # Rewritten on every start (atomically): no temporary file is left next to it.
        server.restart()
        assert _mode(server.config_file) == 0o600
        assert sorted(p.name for p in server.store_dir.iterdir() if p.is_file()) == [
            "nats-server.conf",
            "nats-server.log",
        ]
    finally:
        server.stop()


async def test_postgres_refuses_the_superuser_without_its_password(pg_dir: Path) -> None:
    server = PostgresServer(pg_dir)
    server.start()
    try:
        await _refuses_without_the_right_password(server.dsn(), str(server.socket_dir))
        con = await asyncpg.connect(server.dsn())
        try:
            assert await con.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = 'postgres'")
            method = await con.fetchval("SHOW password_encryption")
            assert method == "scram-sha-256"
            stored = await con.fetchval(
                "SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'"
            )
            assert stored.startswith("SCRAM-SHA-256$")
            rules = await con.fetch("SELECT type, auth_method FROM pg_hba_file_rules")
            assert rules and {r["auth_method"] for r in rules} == {"scram-sha-256"}
        finally:
            await con.close()
        assert server.password_file is not None and _mode(server.password_file) == 0o600
        assert _mode(pg_dir) == 0o700
        assert _mode(server.log_file) == 0o600
    finally:
        server.stop()


async def test_a_trust_cluster_of_an_older_baton_gets_a_password_on_start(pg_dir: Path) -> None:
    server = PostgresServer(pg_dir)
    server.start()
    server.stop()
    # What an older baton left: a cluster that trusted every local connection.
    (pg_dir / "pg_hba.conf").write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
    server.start()
    try:
        await _refuses_without_the_right_password(server.dsn(), str(server.socket_dir))
        con = await asyncpg.connect(server.dsn())
        assert await con.fetchval("SELECT 1") == 1
        await con.close()
    finally:
        server.stop()


async def test_every_service_role_needs_its_password(database_url: str) -> None:
    await migrate(database_url)
    await roles.ensure_roles(database_url)
    for service in roles.SERVICES_WITH_DB:
        dsn = roles.dsn_for(database_url, service)
        await _refuses_without_the_right_password(dsn)
        con = await asyncpg.connect(dsn)
        try:
            assert await con.fetchval("SELECT current_user") == roles.role(service)
        finally:
            await con.close()

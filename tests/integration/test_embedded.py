"""Embedded NATS and Postgres start, survive restarts, and stop or die by pid without leftovers."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import nats
import nats.errors
import pytest

from baton.embedded import (
    THROWAWAY_PG_SETTINGS,
    EmbeddedServerError,
    NatsCluster,
    NatsServer,
    PostgresServer,
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # Orphaned backends may linger briefly as zombies until init reaps them; they hold nothing.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.fixture
def pg_dir() -> Iterator[Path]:
    # Not tmp_path: as root the unprivileged postgres user must be able to enter the directory.
    base = Path(tempfile.mkdtemp(prefix="baton-test-pg-"))
    yield base / "data"
    shutil.rmtree(base, ignore_errors=True)


async def test_nats_start_stop_leaves_no_process(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats")
    server.start()
    pid = server.pid
    assert pid is not None and _alive(pid)
    assert server.url == f"nats://127.0.0.1:{server.port}"
    nc = await nats.connect(server.url)
    await nc.close()
    server.stop()
    assert server.pid is None
    assert not _alive(pid)
    server.stop()  # stopping twice is harmless


async def test_nats_restart_keeps_jetstream_data(tmp_path: Path) -> None:
    with NatsServer(tmp_path / "nats", monitor_port=0) as server:
        assert server.monitor_url is not None
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.add_stream(name="EVENTS", subjects=["events.>"])
        await js.publish("events.one", b"hello")
        await nc.close()

        port, old_pid = server.port, server.pid
        server.restart()
        assert server.port == port and server.pid != old_pid

        nc = await nats.connect(server.url)
        msg = await nc.jetstream().get_msg("EVENTS", seq=1)
        assert msg.data == b"hello"
        await nc.close()


async def test_nats_kill_then_start_again(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats")
    server.start()
    pid = server.pid
    assert pid is not None
    server.kill()
    assert not _alive(pid)
    server.start()
    try:
        nc = await nats.connect(server.url)
        await nc.close()
    finally:
        server.stop()


def test_nats_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats", config_text="this is { not valid")
    with pytest.raises(EmbeddedServerError) as info:
        server.start()
    assert info.value.log_tail
    assert server.pid is None


async def test_postgres_data_survives_restart_and_stop_leaves_no_process(pg_dir: Path) -> None:
    server = PostgresServer(pg_dir)
    server.start()
    try:
        pid = server.pid
        assert pid is not None and _alive(pid)
        conn = await asyncpg.connect(server.dsn())
        await conn.execute("CREATE TABLE kept (v text)")
        await conn.execute("INSERT INTO kept VALUES ('before restart')")
        await conn.close()

        port = server.port
        server.restart()
        assert server.port == port and server.pid != pid
        conn = await asyncpg.connect(server.dsn())
        assert await conn.fetchval("SELECT v FROM kept") == "before restart"
        await conn.close()
        pid = server.pid
        assert pid is not None
        backends = _children(pid)
        assert backends
    finally:
        server.stop()
    assert server.pid is None
    assert not any(_alive(p) for p in [pid, *backends])
    assert not (pg_dir / "postmaster.pid").exists()


@pytest.mark.parametrize(
    ("settings", "fsync"),
    [({}, "on"), (THROWAWAY_PG_SETTINGS, "off")],
    ids=["default", "throwaway"],
)
async def test_postgres_kill_then_start_recovers_committed_data(
    pg_dir: Path, settings: dict[str, str], fsync: str
) -> None:
    # The default (`baton up`'s) keeps fsync; the tests' throwaway clusters lose nothing
    # committed to a killed postgres either: only a crash of the machine could tell them apart.
    server = PostgresServer(pg_dir, settings=settings)
    server.start()
    try:
        conn = await asyncpg.connect(server.dsn())
        assert await conn.fetchval("SHOW fsync") == fsync
        await conn.execute("CREATE TABLE kept (v int)")
        await conn.execute("INSERT INTO kept VALUES (42)")
        # Leave this connection open: its backend must die with the postmaster.
        pid = server.pid
        assert pid is not None
        backends = _children(pid)
        assert len(backends) >= 2  # our connection's backend plus the auxiliary processes
        server.kill()
        assert not any(_alive(p) for p in [pid, *backends])
        assert server.pid is None

        server.start()
        conn = await asyncpg.connect(server.dsn())
        assert await conn.fetchval("SELECT v FROM kept") == 42
        await conn.close()
    finally:
        server.stop()


async def test_database_url_fixture_gives_a_fresh_database(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        name = await conn.fetchval("SELECT current_database()")
        assert name.startswith("baton_test_")
        tables = await conn.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        )
        assert tables == 0
    finally:
        await conn.close()


def test_nats_port_taken_by_another_server_is_a_clear_error(tmp_path: Path) -> None:
    with NatsServer(tmp_path / "first") as first:
        second = NatsServer(tmp_path / "second", port=first.port)
        with pytest.raises(EmbeddedServerError, match=f"port {first.port}"):
            second.start()
        assert second.pid is None
        assert first.pid is not None


def test_postgres_port_taken_by_another_server_is_a_clear_error(
    postgres_server: PostgresServer, pg_dir: Path
) -> None:
    if not isinstance(postgres_server, PostgresServer):
        pytest.skip("needs the embedded Postgres")
    second = PostgresServer(pg_dir, port=postgres_server.port)
    with pytest.raises(EmbeddedServerError, match=f"port {postgres_server.port}"):
        second.start()
    assert second.pid is None


async def test_nats_cluster_keeps_r3_streams_when_a_node_dies_and_stops_by_pid(
    tmp_path: Path,
) -> None:
    with NatsCluster(tmp_path / "cluster", size=3) as cluster:
        assert len(cluster.url.split(",")) == 3
        pids = [node.pid for node in cluster.nodes]
        assert all(pid is not None and _alive(pid) for pid in pids)
        nc = await nats.connect(servers=cluster.urls)
        js = nc.jetstream()
        await js.add_stream(name="EVENTS", subjects=["events.>"], num_replicas=3)
        # The stream exists once add_stream returns, but the node this client talks to may not
        # route its subjects yet (no responders) on a busy machine: retry until it takes the
        # message, with an id so that a retry after a lost ack stores it once.
        for _ in range(300):
            try:
                await js.publish("events.one", b"before", timeout=1, headers={"Nats-Msg-Id": "1"})
                break
            except (nats.errors.Error, TimeoutError):
                await asyncio.sleep(0.1)
        info = await js.stream_info("EVENTS")
        leader = next(n for n in cluster.nodes if n.server_name == info.cluster.leader)
        leader.kill()
        # The two survivors elect a new leader; the publish is retried until they have.
        for _ in range(100):
            try:
                await js.publish("events.two", b"after", timeout=1)
                break
            except (nats.errors.Error, TimeoutError):
                await asyncio.sleep(0.1)
        assert (await js.get_msg("EVENTS", seq=1)).data == b"before"
        assert (await js.get_msg("EVENTS", seq=2)).data == b"after"
        await nc.close()
    assert not any(_alive(pid) for pid in pids if pid is not None)


def test_nats_cluster_needs_a_node(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one node"):
        NatsCluster(tmp_path, size=0)

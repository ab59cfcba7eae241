"""The migration runner applies numbered SQL files once each, in order, safely under concurrency."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from baton.migrate import MigrationError, discover, migrate


def _write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, sql in files.items():
        (directory / name).write_text(sql)
    return directory


BASIC = {
    # Written out of order on purpose: the runner sorts by version, not by creation.
    "0003_add_column.sql": "ALTER TABLE items ADD COLUMN note text;",
    "0001_create.sql": "CREATE TABLE items (id int PRIMARY KEY);",
    "0002_seed.sql": "INSERT INTO items (id) VALUES (1); INSERT INTO items (id) VALUES (2);",
}


async def _applied(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT name FROM schema_migrations ORDER BY version")
        return [r["name"] for r in rows]
    finally:
        await conn.close()


async def test_applies_in_order_then_nothing(database_url: str, tmp_path: Path) -> None:
    directory = _write(tmp_path / "m", BASIC)
    assert await migrate(database_url, directory) == ["0001_create", "0002_seed", "0003_add_column"]
    assert await migrate(database_url, directory) == []

    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM items WHERE note IS NULL") == 2
        rows = await conn.fetch("SELECT version, checksum, applied_at FROM schema_migrations")
        checksums = {m.version: m.checksum for m in discover(directory)}
        assert {r["version"]: r["checksum"] for r in rows} == checksums
        assert all(r["applied_at"] is not None for r in rows)
    finally:
        await conn.close()

    # A new file added later is picked up on the next run.
    _write(directory, {"0004_more.sql": "INSERT INTO items (id) VALUES (3);"})
    assert await migrate(database_url, directory) == ["0004_more"]


async def test_concurrent_runners_apply_each_file_once(database_url: str, tmp_path: Path) -> None:
    # CREATE TABLE without IF NOT EXISTS fails if any file ran twice.
    directory = _write(
        tmp_path / "m",
        {
            f"{i:04d}_t{i}.sql": f"CREATE TABLE t{i} (id int); SELECT pg_sleep(0.02);"
            for i in (1, 2, 3, 4)
        },
    )
    results = await asyncio.gather(*(migrate(database_url, directory) for _ in range(3)))
    flat = sorted(name for result in results for name in result)
    assert flat == ["0001_t1", "0002_t2", "0003_t3", "0004_t4"]
    assert await _applied(database_url) == flat


async def test_changed_checksum_is_refused(database_url: str, tmp_path: Path) -> None:
    directory = _write(tmp_path / "m", BASIC)
    await migrate(database_url, directory)
    (directory / "0002_seed.sql").write_text("INSERT INTO items (id) VALUES (99);")
    with pytest.raises(MigrationError, match="checksum"):
        await migrate(database_url, directory)


async def test_missing_applied_file_is_refused(database_url: str, tmp_path: Path) -> None:
    directory = _write(tmp_path / "m", BASIC)
    await migrate(database_url, directory)
    (directory / "0001_create.sql").unlink()
    with pytest.raises(MigrationError, match="no file"):
        await migrate(database_url, directory)


async def test_failing_file_rolls_back_alone(database_url: str, tmp_path: Path) -> None:
    directory = _write(
        tmp_path / "m",
        {
            "0001_create.sql": "CREATE TABLE items (id int PRIMARY KEY);",
            "0002_seed.sql": "INSERT INTO items VALUES (1);",
            "0003_broken.sql": "CREATE TABLE half (id int); SELECT 1/0;",
            "0004_after.sql": "INSERT INTO items VALUES (2);",
        },
    )
    with pytest.raises(MigrationError, match="0003_broken"):
        await migrate(database_url, directory)
    assert await _applied(database_url) == ["0001_create", "0002_seed"]
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT to_regclass('half')") is None
        assert await conn.fetchval("SELECT count(*) FROM items") == 1
    finally:
        await conn.close()

    # Once fixed, the run resumes at the failed file.
    (directory / "0003_broken.sql").write_text("CREATE TABLE half (id int);")
    assert await migrate(database_url, directory) == ["0003_broken", "0004_after"]


@pytest.mark.parametrize("bad_name", ["1_short.sql", "0001-dash.sql", "0001_.sql", "abcd_x.sql"])
def test_malformed_sql_file_names_are_rejected(tmp_path: Path, bad_name: str) -> None:
    directory = _write(tmp_path / "m", {"0001_ok.sql": "SELECT 1;", bad_name: "SELECT 1;"})
    with pytest.raises(MigrationError, match="malformed"):
        discover(directory)


def test_non_sql_files_are_ignored_and_duplicates_rejected(tmp_path: Path) -> None:
    directory = _write(tmp_path / "m", {"0001_ok.sql": "SELECT 1;", "README.md": "notes"})
    assert [m.name for m in discover(directory)] == ["0001_ok"]
    _write(directory, {"0001_again.sql": "SELECT 2;"})
    with pytest.raises(MigrationError, match="duplicate"):
        discover(directory)


async def test_pending_file_older_than_applied_is_refused(
    database_url: str, tmp_path: Path
) -> None:
    directory = _write(tmp_path / "m", {"0002_b.sql": "SELECT 1;"})
    await migrate(database_url, directory)
    _write(directory, {"0001_a.sql": "SELECT 1;"})
    with pytest.raises(MigrationError, match="older than applied"):
        await migrate(database_url, directory)

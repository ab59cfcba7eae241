"""Apply numbered SQL migrations (`NNNN_name.sql`) once each, under a Postgres advisory lock."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

__all__ = ["DEFAULT_DIRECTORY", "Migration", "MigrationError", "discover", "migrate"]

DEFAULT_DIRECTORY = Path(__file__).resolve().parents[1] / "migrations"

# Any fixed key works as long as every runner uses the same one; this is "baton_mg" in ASCII.
_LOCK_KEY = 0x6261746F6E5F6D67
_FILE_RE = re.compile(r"(?P<version>\d{4})_(?P<label>[A-Za-z0-9_]+)\.sql")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(RuntimeError):
    """The migrations directory and the database disagree, or a migration failed."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str  # the file name without ".sql", e.g. "0001_init"
    path: Path
    sql: str
    checksum: str  # sha256 hex of the file's bytes


def discover(directory: Path | None = None) -> list[Migration]:
    """Read the migration files in version order.

    Only `*.sql` files are considered (a README or .gitkeep is ignored), and every one of them
    must be named `NNNN_name.sql` (four digits, then letters, digits or underscores): a
    misnamed SQL file is rejected with MigrationError rather than silently skipped, because a
    skipped migration would leave the schema wrong without anyone noticing. Two files with the
    same version are rejected too.
    """
    directory = DEFAULT_DIRECTORY if directory is None else Path(directory)
    if not directory.is_dir():
        raise MigrationError(f"migrations directory not found: {directory}")
    found: dict[int, Migration] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix.lower() != ".sql" or not path.is_file():
            continue
        match = _FILE_RE.fullmatch(path.name)
        if match is None:
            raise MigrationError(
                f"malformed migration file name {path.name!r}: expected NNNN_name.sql "
                "(four digits, underscore, letters/digits/underscores)"
            )
        version = int(match["version"])
        if version in found:
            raise MigrationError(
                f"duplicate migration version {version:04d}: {found[version].path.name} "
                f"and {path.name}"
            )
        data = path.read_bytes()
        found[version] = Migration(
            version=version,
            name=path.stem,
            path=path,
            sql=data.decode("utf-8"),
            checksum=hashlib.sha256(data).hexdigest(),
        )
    return [found[v] for v in sorted(found)]


def _check_history(migrations: list[Migration], applied: dict[int, tuple[str, str]]) -> None:
    by_version = {m.version: m for m in migrations}
    for version, (name, checksum) in sorted(applied.items()):
        migration = by_version.get(version)
        if migration is None:
            raise MigrationError(f"applied migration {name} has no file any more")
        if migration.name != name:
            raise MigrationError(f"applied migration {name} was renamed to {migration.name}")
        if migration.checksum != checksum:
            raise MigrationError(
                f"applied migration {name} was edited after it ran (checksum changed); "
                "add a new migration instead"
            )
    newest = max(applied, default=0)
    late = [m.name for m in migrations if m.version not in applied and m.version < newest]
    if late:
        # Applying an older file after a newer one would give databases different histories.
        raise MigrationError(
            f"pending migrations {late} are older than applied version {newest:04d}; "
            "renumber them after it"
        )


async def migrate(dsn: str, directory: Path | None = None) -> list[str]:
    """Apply pending migrations in version order and return their names (e.g. "0001_init").

    Each file runs in its own transaction together with its schema_migrations row, so a
    failing file is rolled back alone (earlier files stay applied) and MigrationError is
    raised. A session advisory lock serialises concurrent runners; the later ones find the
    work done and apply nothing. Files cannot use statements that refuse to run inside a
    transaction (e.g. CREATE INDEX CONCURRENTLY). See discover() for the file naming rules.
    """
    migrations = discover(directory)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            await conn.execute(_CREATE_TABLE)
            rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
            applied = {r["version"]: (r["name"], r["checksum"]) for r in rows}
            _check_history(migrations, applied)
            done: list[str] = []
            for migration in migrations:
                if migration.version in applied:
                    continue
                try:
                    async with conn.transaction():
                        await conn.execute(migration.sql)
                        await conn.execute(
                            "INSERT INTO schema_migrations (version, name, checksum) "
                            "VALUES ($1, $2, $3)",
                            migration.version,
                            migration.name,
                            migration.checksum,
                        )
                except asyncpg.PostgresError as exc:
                    raise MigrationError(
                        f"migration {migration.name} failed and was rolled back: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                done.append(migration.name)
            return done
        finally:
            # A broken connection has already dropped its session lock.
            if not conn.is_closed():
                await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    finally:
        await conn.close()

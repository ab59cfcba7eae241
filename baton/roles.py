"""Per-service Postgres roles: the persister writes, the gateway, agent and executor only read."""

from __future__ import annotations

import urllib.parse

import asyncpg

# Tables each role may touch; policy has no role at all (it never reads the database).
WRITER = "persister"
TABLES = (
    "conversations",
    "messages",
    "runs",
    "usage",
    "project_usage",
    "tool_turns",
    "tool_results",
)
READS: dict[str, tuple[str, ...]] = {
    "gateway": TABLES,  # the read model behind the HTTP API
    "agent": ("messages",),  # conversation history
    "executor": ("messages", "tool_turns", "tool_results"),  # history with its tool exchanges
}
SERVICES_WITH_DB = (WRITER, *READS)


def role(service: str) -> str:
    return f"baton_{service}"


async def ensure_roles(admin_dsn: str) -> list[str]:
    """Create the roles (cluster-wide, once) and grant them this database's tables; idempotent.

    Run after migrations, as a superuser; nothing else is granted, so every other table and
    every write not granted here is refused by the server.
    """
    con = await asyncpg.connect(admin_dsn)
    done: list[str] = []
    try:
        for service in SERVICES_WITH_DB:
            name = role(service)
            try:
                await con.execute(f'CREATE ROLE "{name}" LOGIN')
                done.append(f"role {name} created")
            except (asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError):
                pass  # roles are cluster-wide: another database (or a racing test) made it
        database = await con.fetchval("SELECT current_database()")
        async with con.transaction():
            for service in SERVICES_WITH_DB:
                await con.execute(f'GRANT CONNECT ON DATABASE "{database}" TO "{role(service)}"')
                await con.execute(f'GRANT USAGE ON SCHEMA public TO "{role(service)}"')
            writer = role(WRITER)
            tables = ", ".join(TABLES)
            await con.execute(f'GRANT SELECT, INSERT, UPDATE ON {tables} TO "{writer}"')
            await con.execute(f'GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO "{writer}"')
            for service, read in READS.items():
                await con.execute(f'GRANT SELECT ON {", ".join(read)} TO "{role(service)}"')
        done.append(f"grants on {database} ready")
    finally:
        await con.close()
    return done


def dsn_for(admin_dsn: str, service: str) -> str:
    """The admin DSN with the service's role as its user (no password: trust auth in dev)."""
    parts = urllib.parse.urlsplit(admin_dsn)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{role(service)}@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))

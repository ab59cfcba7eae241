"""Per-service Postgres roles: the persister writes, the gateway, agent and executor only read."""

from __future__ import annotations

import hashlib
import hmac
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
    "api_keys",
)
# The persister's own bookkeeping, nobody else reads it: the retention sweep's, and each run
# round's one outcome (migrations/0012).
WRITER_ONLY = ("archived_conversations", "retention_sweeps", "round_claims")
READS: dict[str, tuple[str, ...]] = {
    "gateway": TABLES,  # the read model behind the HTTP API
    "agent": ("messages",),  # conversation history
    # History with its tool exchanges, and the conversation's system prompt.
    "executor": ("messages", "tool_turns", "tool_results", "conversations"),
}
# What the writer may delete: a deleted conversation's content (issue 16); nothing else.
DELETES = ("messages", "tool_turns", "tool_results", "round_claims")
SERVICES_WITH_DB = (WRITER, *READS)


def role(service: str) -> str:
    return f"baton_{service}"


def password_for(admin_dsn: str, service: str) -> str:
    """The role's password, derived from the superuser's (empty when the admin DSN has none).

    An HMAC keyed by the superuser's password: whoever holds it could set any role's password
    anyway, and a service's own password reveals neither the superuser's nor another role's.
    """
    admin = urllib.parse.unquote(urllib.parse.urlsplit(admin_dsn).password or "")
    if not admin:
        return ""
    return hmac.new(
        admin.encode(), f"baton-role:{role(service)}".encode(), hashlib.sha256
    ).hexdigest()


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
            password = password_for(admin_dsn, service)
            if password:
                # ALTER ROLE takes no parameters; quote_literal makes the password one literal.
                literal = await con.fetchval("SELECT quote_literal($1::text)", password)
                await con.execute(f'ALTER ROLE "{name}" PASSWORD {literal}')
        database = await con.fetchval("SELECT current_database()")
        async with con.transaction():
            for service in SERVICES_WITH_DB:
                await con.execute(f'GRANT CONNECT ON DATABASE "{database}" TO "{role(service)}"')
                await con.execute(f'GRANT USAGE ON SCHEMA public TO "{role(service)}"')
            writer = role(WRITER)
            tables = ", ".join((*TABLES, *WRITER_ONLY))
            await con.execute(f'GRANT SELECT, INSERT, UPDATE ON {tables} TO "{writer}"')
            await con.execute(f'GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO "{writer}"')
            await con.execute(f'GRANT DELETE ON {", ".join(DELETES)} TO "{writer}"')
            for service, read in READS.items():
                await con.execute(f'GRANT SELECT ON {", ".join(read)} TO "{role(service)}"')
        done.append(f"grants on {database} ready")
    finally:
        await con.close()
    return done


def dsn_for(admin_dsn: str, service: str) -> str:
    """The admin DSN with the service's role and its password (`password_for`) as the user."""
    parts = urllib.parse.urlsplit(admin_dsn)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    user = role(service)
    password = password_for(admin_dsn, service)
    if password:
        user += ":" + urllib.parse.quote(password, safe="")
    netloc = f"{user}@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))

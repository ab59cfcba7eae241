"""``baton apikey create|list|revoke``: project API keys for server-to-server callers.

The key is made here and printed once; only its SHA-256 (and its first characters, to tell
keys apart) leave this process. The database has one writer (I5), so create and revoke are
commands published on ``admin.apikey.<project>`` (the ADMIN stream) as the NATS admin, which
the persister writes; this command then reads the row back until it shows what was asked
(reading is every role's right), so "created" means the gateways can find it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import nats
import nats.errors

from shared import messages, subjects
from shared.config import nats_servers
from shared.errors import ConfigError

KEY_PREFIX = "bk_"
SHOWN_CHARS = 11  # "bk_" and 8 characters of the key: enough to tell keys apart, not to guess


class ApiKeyError(Exception):
    """Something the operator must hear about."""


def new_key() -> str:
    """A fresh key: 256 random bits, URL-safe, recognisable by its prefix."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    from services.gateway.auth import api_key_hash

    return api_key_hash(key)


def _project(value: str) -> str:
    if not subjects.is_safe_token(value):
        raise ApiKeyError("--project must match [A-Za-z0-9_-]{1,64}")
    return value


@contextlib.asynccontextmanager
async def _jetstream(nats_url: str) -> AsyncIterator[Any]:
    async def quiet(_exc: Exception) -> None:
        return None

    try:
        servers = nats_servers(nats_url)
    except ConfigError as exc:
        raise ApiKeyError(str(exc)) from exc
    options: dict[str, Any] = {
        "servers": servers,
        "name": "baton-apikey",
        "connect_timeout": 3,
        "allow_reconnect": False,
        "max_reconnect_attempts": 1,
        "error_cb": quiet,
    }
    user = os.environ.get("BATON_NATS_USER", "")
    if user:
        options.update(user=user, password=os.environ.get("BATON_NATS_PASSWORD", ""))
    try:
        nc = await nats.connect(**options)
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        raise ApiKeyError(f"could not connect to NATS at {nats_url}: {exc}") from exc
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


async def _publish(nats_url: str, command: messages.ApiKeyCommand) -> None:
    async with _jetstream(nats_url) as js:
        await js.publish(
            subjects.admin_api_key(command.project_id),
            messages.encode(command),
            timeout=5,
            headers={"Nats-Msg-Id": command.event_id},
        )


async def _row(database_url: str, key_id: str) -> Any:
    con = await asyncpg.connect(database_url, timeout=5)
    try:
        return await con.fetchrow(
            "SELECT id, project_id, name, prefix, created_at, revoked_at FROM api_keys WHERE id = $1",
            uuid.UUID(key_id),
        )
    finally:
        await con.close()


async def _until(database_url: str, key_id: str, want_revoked: bool, wait_s: float) -> bool:
    """Whether the persister wrote the command within ``wait_s`` (read back from the row)."""
    deadline = time.monotonic() + wait_s
    while True:
        row = await _row(database_url, key_id)
        if row is not None and (row["revoked_at"] is not None) == want_revoked:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.1)


async def create(
    nats_url: str, database_url: str, project: str, name: str, wait_s: float = 10.0
) -> tuple[str, str, bool]:
    """A new key of ``project``: (the key, its id, whether it is written already)."""
    if len(name) > 200 or not name.isprintable():
        raise ApiKeyError("--name must be at most 200 printable characters")
    key = new_key()
    key_id = str(uuid.uuid4())
    command = messages.ApiKeyCommand(
        event_id=f"apikey:create:{key_id}",
        op="create",
        key_id=key_id,
        project_id=_project(project),
        name=name,
        key_hash=key_hash(key),
        prefix=key[:SHOWN_CHARS],
        at=datetime.now(UTC),
    )
    await _publish(nats_url, command)
    written = await _until(database_url, key_id, False, wait_s) if database_url else False
    return key, key_id, written


async def revoke(
    nats_url: str, database_url: str, project: str, key_id: str, wait_s: float = 10.0
) -> bool:
    """Revoke a key of ``project``; whether the revocation is written already."""
    try:
        key_id = str(uuid.UUID(key_id))
    except ValueError:
        raise ApiKeyError(f"{key_id!r} is not a key id (see `baton apikey list`)") from None
    if database_url:
        row = await _row(database_url, key_id)
        if row is None or row["project_id"] != _project(project):
            raise ApiKeyError(f"project {project} has no key {key_id}")
    command = messages.ApiKeyCommand(
        event_id=f"apikey:revoke:{key_id}",
        op="revoke",
        key_id=key_id,
        project_id=_project(project),
        at=datetime.now(UTC),
    )
    await _publish(nats_url, command)
    return await _until(database_url, key_id, True, wait_s) if database_url else False


async def listing(database_url: str, project: str) -> list[dict[str, Any]]:
    con = await asyncpg.connect(database_url, timeout=5)
    try:
        rows = await con.fetch(
            "SELECT id, name, prefix, created_at, revoked_at FROM api_keys "
            "WHERE project_id = $1 ORDER BY created_at, id",
            _project(project),
        )
    finally:
        await con.close()
    return [dict(r) for r in rows]


def add_parser(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--project", required=True, help="the project the key acts for")
    common.add_argument(
        "--nats-url", default=os.environ.get("BATON_NATS_URL", "nats://127.0.0.1:4222")
    )
    common.add_argument(
        "--database-url",
        default=os.environ.get("BATON_DATABASE_URL", ""),
        help="read back what the persister wrote (default: $BATON_DATABASE_URL)",
    )
    common.add_argument(
        "--wait", type=float, default=10.0, help="seconds to wait for the persister"
    )
    keys = sub.add_parser("apikey", help="create, list and revoke project API keys")
    actions = keys.add_subparsers(dest="apikey_command", required=True)
    made = actions.add_parser("create", parents=[common], help="make a key (printed once)")
    made.add_argument("--name", default="", help="what the key is for")
    actions.add_parser("list", parents=[common], help="a project's keys (never the keys)")
    gone = actions.add_parser("revoke", parents=[common], help="revoke a key by its id")
    gone.add_argument("id", help="the key id `baton apikey list` shows")
    keys.set_defaults(func=cli)


async def _run(args: argparse.Namespace) -> int:
    if args.apikey_command == "create":
        key, key_id, written = await create(
            args.nats_url, args.database_url, args.project, args.name, args.wait
        )
        print(key)  # the only time it is shown
        print(f"id {key_id} (project {args.project}); the key above is shown once", file=sys.stderr)
        if not written:
            print("published; not written yet (is the persister running?)", file=sys.stderr)
            return 3
        return 0
    if not args.database_url:
        raise ApiKeyError("--database-url (or BATON_DATABASE_URL) is needed")
    if args.apikey_command == "list":
        for r in await listing(args.database_url, args.project):
            state = "active" if r["revoked_at"] is None else f"revoked {r['revoked_at']:%F %T}"
            print(f"{r['id']}  {r['prefix']}…  {r['created_at']:%F %T}  {state}  {r['name']}")
        return 0
    if not await revoke(args.nats_url, args.database_url, args.project, args.id, args.wait):
        print("published; not written yet (is the persister running?)", file=sys.stderr)
        return 3
    print(f"revoked {args.id}")
    return 0


def cli(args: argparse.Namespace) -> int:
    """0 done, 3 published but not yet written, 1 refused."""
    try:
        return asyncio.run(_run(args))
    except (ApiKeyError, nats.errors.Error, TimeoutError, OSError, asyncpg.PostgresError) as exc:
        print(f"baton apikey: {exc}", file=sys.stderr)
        return 1

"""asyncpg pools and the mapping of database trouble onto the transient error root."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from shared.errors import DependencyDown

# Errors that mean "the database is not there right now", not "this data is wrong".
UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
)


async def create_pool(dsn: str, min_size: int = 0, max_size: int = 10) -> Any:
    """A pool that does not need the database to be up yet: connections open lazily."""
    return await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, command_timeout=30, timeout=5
    )


@asynccontextmanager
async def unavailable_is_transient(what: str) -> AsyncIterator[None]:
    """Turn a lost or refused database connection into a retry instead of a crash."""
    try:
        yield
    except UNAVAILABLE as exc:
        raise DependencyDown(f"database unavailable during {what}: {exc!r}") from exc

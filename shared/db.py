"""asyncpg pools and the mapping of database trouble onto the transient error root."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from shared import tracing
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
    # Raised by a pooled connection whose server went away mid-operation (seen on restarts).
    asyncpg.exceptions.InternalClientError,
)


async def _keep_session(_con: Any) -> None:
    """Nothing to reset: services never change session state (no SET, LISTEN, advisory locks)."""


async def create_pool(dsn: str, min_size: int = 0, max_size: int = 10) -> Any:
    """A pool that does not need the database to be up yet: connections open lazily.

    Released connections skip asyncpg's reset query (``pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL``), a round trip per release; an open transaction is still rolled
    back.
    """
    return await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        command_timeout=30,
        timeout=5,
        # Every statement becomes a span in the trace of the message it serves.
        init=tracing.trace_queries,
        reset=_keep_session,
    )


@asynccontextmanager
async def unavailable_is_transient(what: str) -> AsyncIterator[None]:
    """Turn a lost or refused database connection into a retry instead of a crash."""
    try:
        yield
    except UNAVAILABLE as exc:
        raise DependencyDown(f"database unavailable during {what}: {exc!r}") from exc


class Health:
    """Whether the database answers, checked at most once a second while it does."""

    def __init__(self, pool: Any, interval_s: float = 1.0) -> None:
        self.pool = pool
        self.interval_s = interval_s
        self.healthy_until = 0.0

    def mark_down(self) -> None:
        """A query just failed for want of the database: check again before the next fetch."""
        self.healthy_until = 0.0

    async def ready(self) -> bool:
        now = time.monotonic()
        if now < self.healthy_until:
            return True
        try:
            async with self.pool.acquire(timeout=2) as con:
                await con.fetchval("SELECT 1")
        except UNAVAILABLE:
            return False
        self.healthy_until = now + self.interval_s
        return True

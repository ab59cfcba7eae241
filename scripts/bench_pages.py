"""Page latency of the gateway's page statements: a small vs a large conversation and user.

Run: ``.venv/bin/python scripts/bench_pages.py`` (starts an embedded Postgres of its own).
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from baton.embedded import PostgresServer, create_database
from baton.migrate import migrate
from services.gateway.adapters import ReadModel

FILL = """
INSERT INTO messages (id, conversation_id, project_id, user_id, role, content, created_at)
SELECT gen_random_uuid(), $1, 'p', $2, 'user', 'x' || i, now() - (i || ' ms')::interval
FROM generate_series(1, $3) i
"""


async def timed(label: str, call: Callable[..., Awaitable[Any]], *args: Any) -> None:
    for _ in range(20):
        await call(*args)
    ts = []
    for _ in range(300):
        t = time.perf_counter()
        await call(*args)
        ts.append((time.perf_counter() - t) * 1e3)
    ts.sort()
    p50, p99 = statistics.median(ts), ts[int(len(ts) * 0.99)]
    print(f"{label:45s} p50 {p50:.3f} ms  p99 {p99:.3f} ms")


async def run(dsn: str) -> None:
    await migrate(dsn)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    small, big = uuid.uuid4(), uuid.uuid4()
    async with pool.acquire() as con:
        for cid, n, user in ((small, 10, "small"), (big, 100_000, "big")):
            await con.execute(
                "INSERT INTO conversations (id, project_id, user_id) VALUES ($1, 'p', $2)",
                cid,
                user,
            )
            await con.execute(FILL, cid, user, n)
        await con.execute(
            "INSERT INTO conversations (id, project_id, user_id, created_at) SELECT "
            "gen_random_uuid(), 'p', 'big', now() - (i || ' s')::interval "
            "FROM generate_series(1, 10000) i"
        )
        await con.execute(
            "INSERT INTO conversations (id, project_id, user_id) "
            "SELECT gen_random_uuid(), 'p', 'small' FROM generate_series(1, 9)"
        )
        await con.execute("ANALYZE")
    reads = ReadModel(pool)
    for cid, label in ((str(small), "10 msgs"), (str(big), "100k msgs")):
        rows, _ = await reads.message_page(cid, 100)
        at = (rows[0]["created_at"], rows[0]["seq"])
        await timed(f"messages newest 100, {label}", reads.message_page, cid, 100)
        await timed(f"messages the page before, {label}", reads.message_page, cid, 100, at)
    for user, label in (("small", "10 convs"), ("big", "10k convs")):
        convs, _ = await reads.conversations("p", user, 20)
        last = (convs[-1]["last_activity_at"], convs[-1]["id"])
        await timed(f"conversations first 20, {label}", reads.conversations, "p", user, 20)
        await timed(f"conversations next 20, {label}", reads.conversations, "p", user, 20, last)
    await pool.close()


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="baton-bench-pages-"))
    pg = PostgresServer(base / "data")
    pg.start()
    try:
        asyncio.run(run(asyncio.run(create_database(pg.dsn(), "bench"))))
    finally:
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()

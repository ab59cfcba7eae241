"""Peers (b) and (c): the broker's ceiling (raw nats-py JetStream) and the database's (raw batches)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg
import nats
from nats.js.api import StorageType, StreamConfig

from baton import permissions
from shared import messages as m

Result = dict[str, Any]


PEER_STREAM = "BENCH_PEER"  # the broker peer's own stream, created and deleted by the bench
PEER_SUBJECT = "bench.peer"


def sample_event() -> m.UserMessageAccepted:
    mid = str(uuid.uuid4())
    return m.UserMessageAccepted(
        event_id=mid,
        message_id=mid,
        conversation_id=str(uuid.uuid4()),
        project_id="bench",
        user_id="bench",
        content="bench message 12345 from worker 7",
        content_hash="0" * 64,
        created_at=_utcnow(),
    )


def _utcnow() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


async def broker(nats_url: str, password: str, duration: float, window: int = 256) -> Result:
    """Raw nats-py JetStream publishes with acks: sequential, then pipelined (publish_async)."""
    nc = await nats.connect(nats_url, user=permissions.ADMIN, password=password)
    js = nc.jetstream()
    payload = m.encode(sample_event())
    await js.add_stream(
        StreamConfig(
            name=PEER_STREAM,
            subjects=[f"{PEER_SUBJECT}.>"],
            storage=StorageType.FILE,
            duplicate_window=120.0,
        )
    )
    out: Result = {"payload_bytes": len(payload)}
    try:
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < duration:
            n += 1
            await js.publish(
                f"{PEER_SUBJECT}.sync", payload, headers={"Nats-Msg-Id": f"s{n}-{uuid.uuid4()}"}
            )
        out["sync_per_s"] = round(n / (time.perf_counter() - start), 1)

        sem = asyncio.Semaphore(window)
        n, start = 0, time.perf_counter()
        pending: set[asyncio.Task[Any]] = set()

        async def one(i: int) -> None:
            try:
                await js.publish(
                    f"{PEER_SUBJECT}.conc", payload, headers={"Nats-Msg-Id": f"c{i}-{uuid.uuid4()}"}
                )
            finally:
                sem.release()

        while time.perf_counter() - start < duration:
            await sem.acquire()
            n += 1
            t = asyncio.create_task(one(n))
            pending.add(t)
            t.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
        out["concurrent_per_s"] = round(n / (time.perf_counter() - start), 1)
        out["concurrent_window"] = window

        n, start = 0, time.perf_counter()
        futures = []
        while time.perf_counter() - start < duration:
            n += 1
            futures.append(
                await js.publish_async(
                    f"{PEER_SUBJECT}.async",
                    payload,
                    headers={"Nats-Msg-Id": f"a{n}-{uuid.uuid4()}"},
                )
            )
            if len(futures) >= 4000:
                await asyncio.gather(*futures)
                futures.clear()
        await asyncio.gather(*futures)
        out["async_per_s"] = round(n / (time.perf_counter() - start), 1)
    finally:
        await js.delete_stream(PEER_STREAM)
        await nc.close()
    return out


async def database(dsn: str, duration: float) -> Result:
    """Raw batched inserts on one connection: executemany (100/batch) and COPY (1000/batch)."""
    con = await asyncpg.connect(dsn)
    out: Result = {}
    try:
        await con.execute(
            "CREATE TABLE IF NOT EXISTS bench_peer_messages (id uuid PRIMARY KEY, "
            "conversation_id uuid NOT NULL, project_id text NOT NULL, user_id text NOT NULL, "
            "content text NOT NULL, created_at timestamptz NOT NULL)"
        )

        def rows(k: int) -> list[tuple[Any, ...]]:
            now = _utcnow()
            return [
                (uuid.uuid4(), uuid.uuid4(), "bench", "bench", "bench message 12345", now)
                for _ in range(k)
            ]

        for name, batch, write in (
            ("executemany_100_per_s", 100, "many"),
            ("copy_1000_per_s", 1000, "copy"),
        ):
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < duration:
                batch_rows = rows(batch)
                if write == "many":
                    await con.executemany(
                        "INSERT INTO bench_peer_messages VALUES ($1, $2, $3, $4, $5, $6)",
                        batch_rows,
                    )
                else:
                    await con.copy_records_to_table("bench_peer_messages", records=batch_rows)
                n += batch
            out[name] = round(n / (time.perf_counter() - start), 1)
    finally:
        await con.execute("DROP TABLE IF EXISTS bench_peer_messages")
        await con.close()
    return out

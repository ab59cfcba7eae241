"""Fan-out: SSE clients on one gateway process against token delivery latency."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import msgspec
import nats

from baton.bench import procstat
from baton.bench.http import SseStream, summary_ms
from baton.bench.stack import DRAIN_S, Stack
from shared import messages as m
from shared import runs, subjects

Result = dict[str, Any]


async def fanout(stack: Stack, clients: int, hz: float, duration: float) -> Result:
    """``clients`` SSE streams (one conversation each); token deltas published to each at ``hz``."""
    headers = {"Authorization": f"Bearer {stack.token}"}
    cids = [str(uuid.uuid4()) for _ in range(clients)]
    latencies: list[float] = []
    received = 0
    streams: list[SseStream] = []
    sem = asyncio.Semaphore(50)

    # A stream shows only its owner's conversation (I9): each one is first made the bench user's
    # by a message of its own. That message's own run streams too; only the bench run is counted.
    async with httpx.AsyncClient(base_url=stack.gateway, headers=headers, timeout=30) as http:

        async def own(cid: str) -> None:
            async with sem:
                body = {"conversation_id": cid, "content": "fan-out"}
                r = await http.post("/api/chat", json=body)
                r.raise_for_status()

        await asyncio.gather(*(own(c) for c in cids))

    async def opener(cid: str) -> SseStream:
        async with sem:
            s = SseStream(stack.gateway, f"/api/conversations/{cid}/events", headers)
            await s.open()
            return s

    streams = list(await asyncio.gather(*(opener(c) for c in cids)))

    async def reader(s: SseStream, cid: str) -> None:
        nonlocal received
        async for event, data in s.events():
            if event == "token":
                now = time.perf_counter()
                token = msgspec.json.decode(data)
                if token["run_id"] != runs.run_id(cid):
                    continue  # the owning message's own answer, not a bench delta
                received += 1
                latencies.append(now - float(token["text"]))

    readers = [asyncio.create_task(reader(s, c)) for s, c in zip(streams, cids, strict=True)]
    # As the executor, the one that publishes token deltas: the gateway hears its account only.
    nc = await nats.connect(
        stack.nats.url,
        user="executor",
        password=stack.passwords["executor"],
        inbox_prefix=subjects.inbox_prefix("executor"),
    )
    ticks = int(duration * hz)
    sent = 0
    load0 = procstat.machine()["loadavg"]
    start = time.perf_counter()
    for k in range(ticks):
        due = start + k / hz
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        for cid in cids:
            delta = m.TokenDelta(
                conversation_id=cid,
                run_id=runs.run_id(cid),
                attempt=1,
                seq=k + 1,
                text=repr(time.perf_counter()),
            )
            await nc.publish(subjects.token_stream("bench", cid), m.encode(delta))
            sent += 1
    await nc.flush()
    deadline = time.perf_counter() + DRAIN_S
    while received < sent and time.perf_counter() < deadline:  # noqa: ASYNC110 - a counter, not an event
        await asyncio.sleep(0.05)
    await nc.close()
    for t in readers:
        t.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    for s in streams:
        await s.close()
    return {
        "clients": clients,
        "tokens_per_client_per_s": hz,
        "sent": sent,
        "delivered": received,
        "events_per_s": round(received / max(time.perf_counter() - start, 1e-9), 1),
        "latency": summary_ms(latencies),
        "loadavg_before": load0,
    }

"""The accept load generator, run in its own process: fixed concurrency, keep-alive, JSON out.

``python -m baton.bench.loadgen --url URL --token T --concurrency 64 --duration 10 [--keyed]``
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid

import msgspec
import uvloop

from baton.bench.http import Connection, summary_ms


class LoadResult(msgspec.Struct):
    requests: int
    errors: int
    statuses: dict[str, int]
    seconds: float
    requests_per_s: float
    latency: dict[str, float]
    concurrency: int
    keyed: bool


async def run(
    url: str,
    token: str,
    path: str,
    concurrency: int,
    duration: float,
    warmup: float,
    keyed: bool,
) -> LoadResult:
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors = 0
    start = time.perf_counter()
    measure_from = start + warmup
    end = measure_from + duration
    base = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    async def worker(n: int) -> None:
        nonlocal errors
        conn = Connection(url)
        i = 0
        while True:
            now = time.perf_counter()
            if now >= end:
                break
            i += 1
            headers = dict(base)
            if keyed:
                headers["Idempotency-Key"] = f"bench-{n}-{i}-{uuid.uuid4().hex[:8]}"
            body = b'{"content": "bench message %d from worker %d"}' % (i, n)
            sent = time.perf_counter()
            try:
                status, _ = await conn.request("POST", path, headers, body)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                if sent >= measure_from:
                    errors += 1
                    statuses[type(exc).__name__] = statuses.get(type(exc).__name__, 0) + 1
                await conn.close()
                await asyncio.sleep(0.01)
                continue
            done = time.perf_counter()
            if sent < measure_from or done > end:
                continue
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if status == 202:
                latencies.append(done - sent)
            else:
                errors += 1
        await conn.close()

    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return LoadResult(
        requests=len(latencies),
        errors=errors,
        statuses=statuses,
        seconds=duration,
        requests_per_s=round(len(latencies) / duration, 1),
        latency=summary_ms(latencies),
        concurrency=concurrency,
        keyed=keyed,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m baton.bench.loadgen", description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--token", default="")
    p.add_argument("--path", default="/api/chat")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--keyed", action="store_true", help="send a fresh Idempotency-Key each time")
    a = p.parse_args(argv)
    result = uvloop.run(run(a.url, a.token, a.path, a.concurrency, a.duration, a.warmup, a.keyed))
    sys.stdout.write(msgspec.json.encode(result).decode() + "\n")


if __name__ == "__main__":
    main()

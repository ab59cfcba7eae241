"""Composition root of the persister: settings, logging, pool, bus, consumers, shutdown."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

from services.persister import config
from services.persister.adapters import Store
from services.persister.handlers import Handlers
from shared import runtime, wiring
from shared.bus import Bus, run_consumers
from shared.db import Health, create_pool

SERVICE = "persister"


async def amain() -> None:
    settings = config.from_env()
    log, metrics, port, stop = runtime.boot(SERVICE, settings)
    # Everything opened is closed on every path, also when a later step fails (NATS down).
    async with AsyncExitStack() as resources:
        await _serve(resources, settings, log, metrics, port, stop)
    log.info("stopped")


async def _serve(
    resources: AsyncExitStack,
    settings: config.Settings,
    log: Any,
    metrics: Any,
    port: int,
    stop: Any,
) -> None:
    pool = await create_pool(str(settings.database_url), max_size=settings.pool_size)
    resources.push_async_callback(pool.close)
    bus = await Bus.connect(settings, SERVICE, metrics, log)
    resources.push_async_callback(bus.close)
    h = Handlers(bus, Store(pool), metrics)
    health = Health(pool)

    # While Postgres is down nothing is fetched, so no delivery is burnt on a nak.
    consumers = wiring.consumers(
        bus,
        SERVICE,
        h,
        batch=settings.fetch_batch,
        concurrency=settings.concurrency,
        ready=health.ready,
        on_dependency_down=health.mark_down,
    )
    metrics.up.set(1)
    log.info("started", metrics_port=port)
    await run_consumers(consumers, stop, settings.shutdown_grace_s)


def main() -> None:
    runtime.run(amain)

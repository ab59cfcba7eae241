"""Composition root of the persister: settings, logging, pool, bus, consumers, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
from contextlib import AsyncExitStack
from typing import Any

from services.persister import archive, config
from services.persister.adapters import Store
from services.persister.handlers import Handlers
from services.persister.sweep import Sweeper, SweepMetrics
from shared import retention, runtime, wiring
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
    sweeper = retention_sweeper(settings, pool, bus, metrics)
    if sweeper is None:
        SweepMetrics(metrics)  # declared (at zero) where no sweep runs
    else:
        task = asyncio.create_task(
            sweeper.run_forever(stop, every_s=min(60.0, settings.retention_period_s / 10))
        )
        resources.push_async_callback(_cancel, task)
        log.info("retention sweep on", archive=sweeper.target.location)
    metrics.up.set(1)
    log.info("started", metrics_port=port)
    await run_consumers(consumers, stop, settings.shutdown_grace_s)


def retention_sweeper(
    settings: config.Settings, pool: Any, bus: Bus, metrics: Any
) -> Sweeper | None:
    """The sweep this persister runs, or None when nothing is to be archived."""
    kept = retention.load(settings.policy_file)
    if not settings.archive_url or not kept.limited:
        return None
    target, prefix = archive.target(
        archive.Place(
            url=settings.archive_url,
            s3_endpoint=settings.archive_s3_endpoint,
            s3_region=settings.archive_s3_region,
            s3_access_key_id=settings.archive_s3_access_key_id,
            s3_secret_access_key=settings.archive_s3_secret_access_key,
        )
    )
    return Sweeper(
        pool,
        bus,
        target,
        prefix,
        kept,
        metrics,
        batch=settings.retention_batch,
        max_batches=settings.retention_max_batches,
        period_s=settings.retention_period_s,
        pause_s=settings.retention_pause_s,
        instance=settings.instance,
    )


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def main() -> None:
    runtime.run(amain)

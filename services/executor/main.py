"""Composition root of the executor: settings, model client, read model, bus, consumer."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

from services.executor import config
from services.executor.adapters import Model
from services.executor.handlers import Handlers
from services.executor.tools import McpTools, ToolRunner
from shared import model, runtime, subjects, wiring
from shared.bus import Bus, run_consumers
from shared.db import Health, create_pool
from shared.history import History
from shared.metrics import ServiceMetrics

SERVICE = "executor"


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
    metrics: ServiceMetrics,
    port: int,
    stop: asyncio.Event,
) -> None:
    pool = await create_pool(str(settings.database_url), max_size=4)
    resources.push_async_callback(pool.close)
    client = model.client(
        settings.anthropic_base_url, str(settings.anthropic_api_key), settings.stall_timeout_s
    )
    resources.push_async_callback(client.close)
    bus = await Bus.connect(settings, SERVICE, metrics, log)
    resources.push_async_callback(bus.close)
    aborts = await bus.js.key_value(subjects.BUCKET_ABORTS)
    runner = ToolRunner(bus, McpTools(settings.mcp_server_map()), metrics)
    h = Handlers(bus, History(pool), Model(client), settings, metrics, aborts, runner)
    # Every replica hears every abort (a plain subscription, no queue group).
    (aborts_subject,) = wiring.WIRING[SERVICE].listens
    abort_sub = await bus.nc.subscribe(aborts_subject, cb=h.abort)
    resources.push_async_callback(abort_sub.unsubscribe)
    health = Health(pool)
    consumers = wiring.consumers(
        bus,
        SERVICE,
        h,
        batch=settings.fetch_batch,
        concurrency=settings.concurrency,
        # Tasks need the history from Postgres: while it is down, leave them in the stream.
        ready=health.ready,
        on_dependency_down=health.mark_down,
    )
    metrics.up.set(1)
    log.info("started", metrics_port=port)
    await run_consumers(consumers, stop, settings.shutdown_grace_s)


def main() -> None:
    runtime.run(amain)

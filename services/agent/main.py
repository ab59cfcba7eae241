"""Composition root of the agent: settings, logging, model client, bus, consumer, shutdown."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

from services.agent import config
from services.agent.adapters import Classifier
from services.agent.handlers import Handlers
from shared import model, runtime, wiring
from shared.bus import Bus, run_consumers
from shared.db import create_pool
from shared.history import History
from shared.metrics import ServiceMetrics

SERVICE = "agent"


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
        settings.anthropic_base_url, str(settings.anthropic_api_key), settings.model_timeout_s
    )
    resources.push_async_callback(client.close)
    bus = await Bus.connect(settings, SERVICE, metrics, log)
    resources.push_async_callback(bus.close)
    h = Handlers(
        bus,
        History(pool),
        Classifier(client, settings.model, settings.max_tokens),
        settings,
        metrics,
    )
    consumers = wiring.consumers(
        bus, SERVICE, h, batch=settings.fetch_batch, concurrency=settings.concurrency
    )
    metrics.up.set(1)
    log.info("started", metrics_port=port, model=settings.model)
    await run_consumers(consumers, stop, settings.shutdown_grace_s)


def main() -> None:
    runtime.run(amain)

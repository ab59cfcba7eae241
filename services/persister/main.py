"""Composition root of the persister: settings, logging, pool, bus, consumers, shutdown."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any, TypeVar

from services.persister import config
from services.persister.adapters import Store
from services.persister.handlers import Handlers
from shared import messages, runtime, subjects
from shared.bus import Bus, Consumer, Handler, run_consumers
from shared.db import Health, create_pool

SERVICE = "persister"
T = TypeVar("T")


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

    def consumer(spec: subjects.ConsumerSpec, schema: type[T], handler: Handler[T]) -> Consumer[T]:
        # While Postgres is down nothing is fetched, so no delivery is burnt on a nak.
        return Consumer(
            bus,
            spec,
            schema,
            handler,
            batch=settings.fetch_batch,
            concurrency=settings.concurrency,
            ready=health.ready,
            on_dependency_down=health.mark_down,
        )

    consumers: list[Consumer[Any]] = [
        consumer(subjects.PERSISTER_IN, messages.UserMessageAccepted, h.user_message),
        consumer(subjects.PERSISTER_VERDICTS, messages.RunVerdict, h.verdict),
        consumer(subjects.PERSISTER_REPLIES, messages.PolicyReply, h.reply),
        consumer(subjects.PERSISTER_RESULTS, messages.ExecResult, h.result),
        consumer(subjects.PERSISTER_FAILED, messages.ExecFailed, h.failed_usage),
    ]
    metrics.up.set(1)
    log.info("started", metrics_port=port)
    await run_consumers(consumers, stop, settings.shutdown_grace_s)


def main() -> None:
    runtime.run(amain)

"""Composition root of the persister: settings, logging, pool, bus, consumers, shutdown."""

from __future__ import annotations

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
    pool = await create_pool(str(settings.database_url), max_size=settings.pool_size)
    bus = await Bus.connect(settings, SERVICE, metrics, log)
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
        consumer(subjects.PERSISTER_USAGE, messages.ModelUsage, h.model_usage),
    ]
    metrics.up.set(1)
    log.info("started", metrics_port=port)
    try:
        await run_consumers(consumers, stop, settings.shutdown_grace_s)
    finally:
        await bus.close()
        await pool.close()
        log.info("stopped")


def main() -> None:
    runtime.run(amain)

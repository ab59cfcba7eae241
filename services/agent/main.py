"""Composition root of the agent: settings, logging, model client, bus, consumer, shutdown."""

from __future__ import annotations

from services.agent import config
from services.agent.adapters import Classifier
from services.agent.handlers import Handlers
from shared import messages, model, runtime, subjects
from shared.bus import Bus, Consumer, run_consumers
from shared.db import create_pool
from shared.history import History

SERVICE = "agent"


async def amain() -> None:
    settings = config.from_env()
    log, metrics, port, stop = runtime.boot(SERVICE, settings)
    pool = await create_pool(str(settings.database_url), max_size=4)
    client = model.client(
        settings.anthropic_base_url, str(settings.anthropic_api_key), settings.model_timeout_s
    )
    bus = await Bus.connect(settings, SERVICE, metrics, log)
    h = Handlers(
        bus,
        History(pool),
        Classifier(client, settings.model, settings.max_tokens),
        settings,
        metrics,
    )
    consumer = Consumer(
        bus,
        subjects.AGENT_IN,
        messages.UserMessagePersisted,
        h.user_message,
        batch=settings.fetch_batch,
        concurrency=settings.concurrency,
    )
    metrics.up.set(1)
    log.info("started", metrics_port=port, model=settings.model)
    try:
        await run_consumers([consumer], stop, settings.shutdown_grace_s)
    finally:
        await bus.close()
        await pool.close()
        await client.close()
        log.info("stopped")


def main() -> None:
    runtime.run(amain)

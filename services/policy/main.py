"""Composition root of the policy service: settings, rules, runs bucket, bus, consumers."""

from __future__ import annotations

import asyncio
import sys
from contextlib import AsyncExitStack
from typing import Any

from services.policy import config, core, policyfile
from services.policy.adapters import Aborts, Conversations, Limiter, Runs, ToolQuota
from services.policy.handlers import Handlers
from shared import runtime, subjects, wiring
from shared.bus import Bus, run_consumers

SERVICE = "policy"


def rules_from(settings: config.Settings) -> core.Rules:
    return core.Rules(
        default_model=settings.default_model,
        models=core.DEFAULT_PRICES,
        max_attempts=settings.max_attempts,
        max_output_tokens=settings.max_output_tokens,
        run_deadline_s=settings.run_deadline_s,
        settle_grace_s=settings.settle_grace_s,
        double_texting=settings.double_texting,
        retry_backoff_s=config.backoff(settings.retry_backoff_s),
        fallback_model=settings.fallback_model or None,
    )


async def amain() -> None:
    settings = config.from_env()
    # A bad policy file stops the service before it touches anything (exit 2, key and line).
    book = policyfile.load(settings.policy_file) if settings.policy_file else None
    log, metrics, port, stop = runtime.boot(SERVICE, settings)
    # Everything opened is closed on every path, also when a later step fails (NATS down).
    async with AsyncExitStack() as resources:
        await _serve(resources, settings, book, log, metrics, port, stop)
    log.info("stopped")


async def _serve(
    resources: AsyncExitStack,
    settings: config.Settings,
    book: policyfile.Book | None,
    log: Any,
    metrics: Any,
    port: int,
    stop: asyncio.Event,
) -> None:
    bus = await Bus.connect(settings, SERVICE, metrics, log)
    resources.push_async_callback(bus.close)
    kv = await bus.js.key_value(subjects.BUCKET_RUNS)
    limits_kv = await bus.js.key_value(subjects.BUCKET_LIMITS)
    aborts_kv = await bus.js.key_value(subjects.BUCKET_ABORTS)
    h = Handlers(
        bus,
        Runs(kv),
        Conversations(kv),
        rules_from(settings),
        metrics,
        Aborts(aborts_kv),
        limiter=Limiter(limits_kv),
        book=book,
        quota=ToolQuota(limits_kv),
    )
    if settings.policy_file and book is not None:
        reloads = metrics.counter(
            "file_reloads_total", "Policy file changes seen, by outcome.", ("outcome",)
        )

        def changed(new: policyfile.Book) -> None:
            h.book = new
            reloads.labels("applied").inc()
            log.info("policy file reloaded", path=settings.policy_file, projects=len(new.projects))

        def rejected(exc: policyfile.PolicyFileError) -> None:
            reloads.labels("rejected").inc()
            log.error("policy file rejected; previous rules stay in force", error=str(exc))

        watcher = policyfile.Watcher(
            settings.policy_file, book, changed, rejected, settings.policy_reload_s
        )
        watcher_task = asyncio.create_task(watcher.run(stop))
        resources.callback(watcher_task.cancel)
        log.info("policy file loaded", path=settings.policy_file, projects=len(book.projects))
    consumers = wiring.consumers(
        bus, SERVICE, h, batch=settings.fetch_batch, concurrency=settings.concurrency
    )
    metrics.up.set(1)
    log.info("started", metrics_port=port)
    await run_consumers(consumers, stop, settings.shutdown_grace_s)


def main() -> None:
    try:
        runtime.run(amain)
    except policyfile.PolicyFileError as exc:
        print(f"policy: {exc}", file=sys.stderr)
        sys.exit(2)

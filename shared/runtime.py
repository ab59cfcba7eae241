"""Process plumbing every service shares: logging, tracing, metrics port, signals to a stop event."""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Callable, Coroutine
from typing import Any, NamedTuple

import structlog
import uvloop

from shared import logging, tracing
from shared.config import BaseSettings
from shared.metrics import ServiceMetrics, serve


class Boot(NamedTuple):
    """What a service's composition root gets before it opens any connection."""

    log: structlog.stdlib.BoundLogger
    metrics: ServiceMetrics
    metrics_port: int
    stop: asyncio.Event


def boot(service: str, settings: BaseSettings, signals: bool = True) -> Boot:
    """Logging, tracing, the /metrics port and (unless the server owns them) signal handling."""
    # What the imports made lives as long as the process: kept out of the collector's full
    # passes, which otherwise walk it again and again (~166k objects in the model services).
    gc.freeze()
    log = logging.setup(service, settings.log_level)
    tracing.setup(service, settings.instance)
    metrics = ServiceMetrics(service)
    port = serve(settings.metrics_host, settings.metrics_port, metrics.registry)
    stop = asyncio.Event()
    if signals:
        stop_on_signals(stop)
    return Boot(log, metrics, port, stop)


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set ``stop`` so the service can finish its in-flight work."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a service's async main on uvloop."""
    uvloop.run(main())

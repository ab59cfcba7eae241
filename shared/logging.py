"""structlog JSON logs, one canonical line per handled event."""

from __future__ import annotations

import json
import logging
import sys

import msgspec
import structlog

_encoder = msgspec.json.Encoder(enc_hook=repr)


def _dumps(event: object, **_: object) -> str:
    # msgspec, not json.dumps: a log line per handled message is on every hot path.
    try:
        return _encoder.encode(event).decode()
    except (TypeError, ValueError):  # e.g. a dict keyed by something msgspec will not encode
        return json.dumps(event, default=repr)


def setup(service: str, level: str = "info") -> structlog.stdlib.BoundLogger:
    """Configure structlog for this process and return the service's logger."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    logging.basicConfig(stream=sys.stderr, level=numeric, format="%(message)s")
    # Client libraries log every request at info; those lines carry nothing the canonical line lacks.
    for noisy in ("httpx", "httpx2", "httpcore", "anthropic"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # A plain write per line (stderr is line-buffered): print's extra work is per line too.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    log: structlog.stdlib.BoundLogger = structlog.get_logger().bind(service=service)
    return log

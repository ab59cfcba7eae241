"""OpenTelemetry setup, W3C trace context in NATS headers, and spans for hops and statements.

One trace per user message: the gateway starts it (``root_span``), every publish injects the
current context into the NATS headers (``inject``, under a PRODUCER span), every consumer
continues it (``extract``, a CONSUMER span in ``shared.bus``), asyncpg statements become CLIENT
spans (``trace_queries``) and model calls are ``anthropic.messages.create`` CLIENT spans (the
SDK's own in the agent, the executor's equivalent one around its streamed call).
Export is OTLP/HTTP, configured by the standard ``OTEL_*`` variables; without an endpoint
nothing is exported and spans are not recorded (trace ids still reach the logs and travel in
the headers), and the hottest paths skip making span objects at all (``recording``).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import structlog
from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from shared import requests

_tracer = trace.get_tracer("baton")
_MAX_STATEMENT_CHARS = 2000
# asyncpg runs this when a pooled connection is released: plumbing, not the service's work.
_POOL_RESET = "SELECT pg_advisory_unlock_all()"
_TARGET = re.compile(r"\b(?:INTO|FROM|UPDATE|TABLE)\s+([A-Za-z_][A-Za-z0-9_.]*)", re.IGNORECASE)
# The first write inside a WITH statement (data-modifying CTEs): what the statement is for.
_CTE_WRITE = re.compile(
    r"\b(INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+([A-Za-z_][A-Za-z0-9_.]*)", re.IGNORECASE
)
# What ``setup`` found: whether this process's spans are recorded (and exported) at all.
_state = {"recording": False}


def exporting(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the ``OTEL_*`` variables ask for OTLP export (an endpoint, and not disabled)."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def provider(
    service: str, instance: str = "", environ: Mapping[str, str] | None = None
) -> TracerProvider:
    """A tracer provider for one service; with an OTLP exporter only when ``exporting``."""
    attributes = {"service.name": f"baton-{service}"}
    if instance:
        attributes["service.instance.id"] = instance
    exports = exporting(environ)
    # With nowhere to export, spans are not recorded (half the cost per handled message);
    # trace ids are still made, logged and carried in NATS headers.
    tracer_provider = TracerProvider(
        resource=Resource.create(attributes), sampler=None if exports else ALWAYS_OFF
    )
    if exports:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # The exporter reads its endpoint, headers, timeout and compression from OTEL_*.
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return tracer_provider


def setup(service: str, instance: str = "") -> trace.Tracer:
    """Install the service's tracer provider (once per process) and return its tracer."""
    trace.set_tracer_provider(provider(service, instance))
    _state["recording"] = exporting()
    return trace.get_tracer(f"baton.{service}")


def recording() -> bool:
    """Whether spans are recorded here (``setup`` found an exporter); if not, only ids matter."""
    return _state["recording"]


def new_traceparent() -> str:
    """A W3C ``traceparent`` for a new trace, drawn as the SDK draws ids, without a span object.

    When nothing records spans, a span costs ~15 µs and buys nothing but these ids: the hops
    downstream continue the same trace id from this header. The flags say "not sampled", as an
    unrecorded span's would.
    """
    trace_id = random.getrandbits(128) or 1
    span_id = random.getrandbits(64) or 1
    return f"00-{trace_id:032x}-{span_id:016x}-00"


def trace_id_of(traceparent: str) -> str:
    """The trace id (32 hex digits) of a ``traceparent`` made by ``new_traceparent``."""
    return traceparent[3:35]


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Add the current trace context to outgoing NATS headers."""
    propagate.inject(headers)
    return headers


def extract(headers: Mapping[str, str] | None) -> context.Context:
    """The trace context an incoming NATS message carries (or an empty one)."""
    return propagate.extract(dict(headers or {}))


REQUEST_ID_KEY = "baton-request-id"  # beside the W3C headers in a stored carrier


def carrier() -> dict[str, str]:
    """The current trace context as W3C headers, to store with work that starts later.

    The current request id (shared/requests.py) is stored with it: the later work is that
    request's too.
    """
    stored = inject({})
    rid = requests.current()
    if rid:
        stored[REQUEST_ID_KEY] = rid
    return stored


@contextmanager
def resumed(stored: Mapping[str, str], name: str) -> Iterator[trace.Span]:
    """A span that continues a stored context: work done now on behalf of an earlier message.

    It belongs to the stored trace; the span that triggered it now (another message's) is
    kept as a link. Without a stored context it is simply a child of the current span.
    """
    now = trace.get_current_span().get_span_context()
    parent = extract(stored) if stored else None
    later = trace.get_current_span(parent).get_span_context() if parent is not None else now
    links = [Link(now)] if now.is_valid and now.trace_id != later.trace_id else []
    # Its request id too (none if it had none): what it publishes is never the trigger's.
    rid = stored.get(REQUEST_ID_KEY, "") if stored else ""
    token = requests.REQUEST_ID.set(rid)
    try:
        with (
            _tracer.start_as_current_span(name, context=parent, links=links) as span,
            structlog.contextvars.bound_contextvars(request_id=rid)
            if rid
            else contextlib.nullcontext(),
        ):
            yield span
    finally:
        requests.REQUEST_ID.reset(token)


def current_trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


@contextmanager
def root_span(
    name: str, untrusted_headers: Mapping[str, str], attributes: Mapping[str, Any]
) -> Iterator[trace.Span]:
    """A SERVER span that starts a new trace, linked to (not continuing) a client's traceparent.

    A client's trace context is not trusted: continuing it would let anyone put many messages
    into one trace, or pick our trace ids. A valid one is kept as a link, so it can be followed.
    """
    remote = trace.get_current_span(extract(untrusted_headers)).get_span_context()
    links = [Link(remote)] if remote.is_valid else []
    with _tracer.start_as_current_span(
        name,
        context=context.Context(),
        kind=SpanKind.SERVER,
        attributes=dict(attributes),
        links=links,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield span


@contextmanager
def producer_span(subject: str, msg_id: str) -> Iterator[trace.Span]:
    """A PRODUCER span around one publish; the headers injected inside it point at it."""
    family = ".".join(subject.split(".", 2)[:2])
    with _tracer.start_as_current_span(
        f"publish {family}",
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "nats",
            "messaging.operation.type": "send",
            "messaging.destination.name": subject,
            "messaging.message.id": msg_id,
        },
    ) as span:
        yield span


def batch_span(name: str, size: int, members: list[trace.SpanContext]) -> Any:
    """A span for work shared by several messages (a group commit), linked to each one's span.

    It sits in the trace of whoever started the batch; the others find it through the links.
    Unrecorded, it would have nothing to link: then it is not made at all.
    """
    if not recording():
        return contextlib.nullcontext()
    return _tracer.start_as_current_span(
        name,
        attributes={"baton.batch.size": size},
        links=[Link(m) for m in members if m.is_valid],
    )


def statement_name(query: str) -> tuple[str, str]:
    """The span name (operation and table, low cardinality) and the operation of a statement."""
    words = query.split(None, 1)
    operation = words[0].rstrip(";").upper() if words else "QUERY"
    if operation == "WITH":
        write = _CTE_WRITE.search(query)
        if write is not None:
            operation = write.group(1).split()[0].upper()
            return f"{operation} {write.group(2)}", operation
        operation = "SELECT"
    target = _TARGET.search(query)
    if target is None or operation not in ("SELECT", "INSERT", "UPDATE", "DELETE"):
        return operation, operation
    return f"{operation} {target.group(1)}", operation


def statement_span(record: Any) -> None:
    """An asyncpg query-logger callback: one CLIENT span per statement, timed by asyncpg.

    asyncpg calls it with ``call_soon``, so it runs in the context of the code that ran the
    statement, and the span becomes that code's child. Arguments are never recorded.
    """
    query = str(record.query)
    if query.startswith(_POOL_RESET):
        return
    end = time.time_ns()
    start = end - int(record.elapsed * 1_000_000_000)
    name, operation = statement_name(query)
    addr = record.conn_addr
    attributes: dict[str, Any] = {
        "db.system.name": "postgresql",
        "db.operation.name": operation,
        "db.query.text": query[:_MAX_STATEMENT_CHARS],
    }
    if isinstance(addr, tuple) and len(addr) >= 2:
        attributes["server.address"] = str(addr[0])
        attributes["server.port"] = int(addr[1])
    params = record.conn_params
    database = getattr(params, "database", None)
    if database:
        attributes["db.namespace"] = str(database)
    span = _tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes, start_time=start)
    if record.exception is not None:
        span.set_attribute("error.type", type(record.exception).__name__)
        span.set_status(Status(StatusCode.ERROR, type(record.exception).__name__))
    span.end(end_time=end)


async def trace_queries(con: Any) -> None:
    """asyncpg pool ``init``: every statement on this connection becomes a span.

    Only when spans are recorded: an unrecorded span per statement would cost a callback and
    a span object each, for nothing.
    """
    if recording():
        con.add_query_logger(statement_span)

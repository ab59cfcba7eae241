"""OpenTelemetry setup and W3C trace context carried in NATS headers."""

from __future__ import annotations

import os

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF


def setup(service: str) -> trace.Tracer:
    """Install a tracer provider; export over OTLP/HTTP only when OTEL_* says where."""
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )
    # With nowhere to export, spans are not recorded (half the cost per handled message);
    # trace ids are still made, logged and carried in NATS headers.
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"baton-{service}"}),
        sampler=None if endpoint else ALWAYS_OFF,
    )
    if endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return trace.get_tracer(f"baton.{service}")


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Add the current trace context to outgoing NATS headers."""
    propagate.inject(headers)
    return headers


def extract(headers: dict[str, str] | None) -> context.Context:
    """The trace context an incoming NATS message carries (or an empty one)."""
    return propagate.extract(headers or {})


def current_trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""

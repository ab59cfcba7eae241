"""Prometheus metrics named baton_<service>_…, one registry per process, no per-conversation labels."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
)

from shared import build

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServiceMetrics:
    """The metrics every service has, for its consumers and publishes."""

    def __init__(self, service: str, registry: CollectorRegistry = REGISTRY) -> None:
        p = f"baton_{service}"
        self.service = service
        self.registry = registry
        self.handled = Counter(
            f"{p}_messages_handled_total",
            "Bus messages handled, by consumer and outcome.",
            ["consumer", "outcome"],
            registry=registry,
        )
        self.handle_seconds = Histogram(
            f"{p}_handle_seconds",
            "Time from receiving a bus message to its ack, by consumer.",
            ["consumer"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.redeliveries = Counter(
            f"{p}_redeliveries_total",
            "Bus messages received more than once, by consumer.",
            ["consumer"],
            registry=registry,
        )
        self.dead_letters = Counter(
            f"{p}_dead_letters_total",
            "Poison messages terminated into the dead-letter stream, by consumer.",
            ["consumer"],
            registry=registry,
        )
        self.published = Counter(
            f"{p}_published_total",
            "Events published to JetStream, by subject family and whether it was a duplicate.",
            ["family", "duplicate"],
            registry=registry,
        )
        build_info = Gauge(
            "baton_build_info",
            "Always 1: the version and git commit this process runs.",
            ["version", "commit"],
            registry=registry,
        )
        stamp = build.info()
        build_info.labels(stamp["version"], stamp["commit"]).set(1)
        self.nats_errors = Counter(
            f"{p}_nats_errors_total",
            "Errors reported by the NATS connection (permission violations among them), by kind.",
            ["kind"],
            registry=registry,
        )
        self.up = Gauge(f"{p}_up", "1 while the service runs.", registry=registry)
        # Read from JetStream consumer info by each replica, so dashboards need no NATS exporter.
        self.consumer_pending = Gauge(
            f"{p}_consumer_pending",
            "Messages in the stream not yet delivered to the consumer, by consumer.",
            ["consumer"],
            registry=registry,
        )
        self.consumer_ack_pending = Gauge(
            f"{p}_consumer_ack_pending",
            "Messages delivered to the consumer and not yet acked, by consumer.",
            ["consumer"],
            registry=registry,
        )

    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(f"baton_{self.service}_{name}", doc, list(labels), registry=self.registry)

    def gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(f"baton_{self.service}_{name}", doc, list(labels), registry=self.registry)

    def histogram(
        self,
        name: str,
        doc: str,
        labels: tuple[str, ...] = (),
        buckets: tuple[float, ...] = LATENCY_BUCKETS,
    ) -> Histogram:
        return Histogram(
            f"baton_{self.service}_{name}",
            doc,
            list(labels),
            buckets=buckets,
            registry=self.registry,
        )


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes and probes every few seconds would drown the service's own log lines."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def serve(host: str, port: int, registry: CollectorRegistry = REGISTRY) -> int:
    """Serve /metrics, /healthz and /readyz on their own port; returns the port actually bound.

    ``/healthz`` answers 200 while the process runs; ``/readyz`` 200 once the service's
    ``baton_<service>_up`` gauge is 1 (connections and consumers set up), else 503; every
    other path is the metrics. Kubernetes probes use these on the workers, which have no HTTP API.
    """
    metrics_app = make_wsgi_app(registry)

    def ready() -> bool:
        for family in registry.collect():
            if family.name.startswith("baton_") and family.name.endswith("_up"):
                return any(sample.value == 1 for sample in family.samples)
        return False

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            ok = ready()
            start_response(
                "200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")]
            )
            return [b"ready\n" if ok else b"not ready\n"]
        body: Iterable[bytes] = metrics_app(environ, start_response)
        return body

    server = make_server(host, port, app, _Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return int(server.server_port)

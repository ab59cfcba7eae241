"""Prometheus metrics named baton_<service>_…, one registry per process, no per-conversation labels."""

from __future__ import annotations

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

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
        self.nats_errors = Counter(
            f"{p}_nats_errors_total",
            "Errors reported by the NATS connection (permission violations among them), by kind.",
            ["kind"],
            registry=registry,
        )
        self.up = Gauge(f"{p}_up", "1 while the service runs.", registry=registry)

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


def serve(host: str, port: int) -> int:
    """Serve /metrics on its own port; returns the port actually bound."""
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)

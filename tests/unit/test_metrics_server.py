"""The metrics port also answers Kubernetes probes: /healthz always, /readyz once the service is up."""

from __future__ import annotations

import httpx
from prometheus_client import CollectorRegistry

from shared.metrics import ServiceMetrics, serve


def test_readyz_follows_the_up_gauge_and_healthz_the_process() -> None:
    registry = CollectorRegistry()
    metrics = ServiceMetrics("agent", registry)
    url = f"http://127.0.0.1:{serve('127.0.0.1', 0, registry)}"
    assert httpx.get(f"{url}/healthz").status_code == 200
    assert httpx.get(f"{url}/readyz").status_code == 503
    metrics.up.set(1)
    assert httpx.get(f"{url}/readyz").status_code == 200
    metrics.up.set(0)
    assert httpx.get(f"{url}/readyz").status_code == 503


def test_every_other_path_is_the_metrics() -> None:
    registry = CollectorRegistry()
    ServiceMetrics("policy", registry).up.set(1)
    url = f"http://127.0.0.1:{serve('127.0.0.1', 0, registry)}"
    for path in ("/metrics", "/", "/%2e%2e/etc/passwd"):
        r = httpx.get(url + path)
        assert r.status_code == 200
        assert "baton_policy_up 1.0" in r.text
    long = httpx.get(f"{url}/{'a' * 8000}")
    assert long.status_code in (200, 414)

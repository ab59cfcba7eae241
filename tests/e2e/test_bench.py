"""`baton bench` runs every scenario briefly and reports sane numbers in one JSON object."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from baton.bench.http import percentile, summary_ms
from baton.bench.profile import top_functions

pytestmark = pytest.mark.e2e

LATENCY_KEYS = {"p50_ms", "p95_ms", "p99_ms", "max_ms"}


def _bench(*args: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "baton", "bench", "--json", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout[-2000:]  # exactly one JSON object, nothing else
    result: dict[str, Any] = json.loads(lines[0])
    return result


@pytest.mark.timeout(600)
def test_every_scenario_reports_sane_numbers_without_errors() -> None:
    r = _bench(
        "all",
        *("--duration", "1", "--concurrency", "4", "--rate", "20", "--realistic-rate", "10"),
        *("--light-rate", "5"),
        *("--ttft-ms", "20", "--tokens-per-second", "400", "--ttft-samples", "2"),
        *("--fanout-clients", "3", "--fanout-hz", "5", "--replay-requests", "3"),
        # 2,000 messages instead of 100,000: the pages' sizes and plans, not their speed.
        *("--paging-messages", "2000", "--paging-requests", "5"),
        # The Python generator reports every status (wrk only non-2xx/3xx; its driver has tests
        # of its own in tests/unit/test_bench_wrk.py).
        *("--loadgen", "python"),
    )
    assert r["machine"]["nproc"] >= 1

    for name in ("unkeyed", "keyed"):
        a = r["accept"][name]
        assert a["requests"] > 0 and a["errors"] == 0 and a["statuses"] == {"202": a["requests"]}
        assert set(a["latency"]) == LATENCY_KEYS and a["latency"]["p50_ms"] > 0

    usual = r["peers"]["usual"]
    assert usual["requests"] > 0 and usual["errors"] == 0
    broker = r["peers"]["broker"]
    assert broker["sync_per_s"] > 0 and broker["concurrent_per_s"] > 0 and broker["async_per_s"] > 0
    db = r["peers"]["database"]
    assert db["executemany_100_per_s"] > 0 and db["copy_1000_per_s"] > 0

    for pace in ("fast", "light", "realistic"):
        p = r["pipeline"][pace]
        assert p["accepted"] > 0 and p["submit_errors"] == {}
        # Every accepted message got its stored answer: nothing lost, nothing extra.
        assert p["completed"] == p["accepted"], p
        assert p["sustained_per_s"] > 0
        assert p["end_to_end"]["p50_ms"] > 0 and set(p["overhead"]) == LATENCY_KEYS
        assert p["ttft"]["samples"] == 2 and p["ttft"]["p50_ms"] > 0
    assert r["pipeline"]["realistic"]["model_ms_per_message"] > 0

    services = r["cost"]["services"]
    for name in ("gateway", "persister", "agent", "policy", "executor", "nats", "postgres"):
        assert services[name]["cpu_s_per_1000"] > 0, name
        assert services[name]["rss_idle_mb"] > 0 and services[name]["rss_load_mb"] > 0, name

    (fan,) = r["fanout"]
    assert fan["clients"] == 3 and fan["sent"] > 0 and fan["delivered"] == fan["sent"]
    assert fan["latency"]["p50_ms"] > 0

    # Every page shape came back full (the long conversation, the busy user's 200); the messages
    # pages from their index (the conversations' plans at 212 rows are the planner's choice).
    pages = r["paging"]["cases"]
    assert [c["rows"] for c in pages] == [100, 100, 100, 10, 20, 20, 10], pages
    assert all(0 < c["http"]["p50_ms"] <= c["http"]["max_ms"] for c in pages), pages
    assert all(c["db"]["index"] == "messages_conversation" for c in pages[:4]), pages

    # Both shapes of the replay: the same 119 missed events, each resume timed.
    shapes = r["replay"]["cases"]
    assert [c["case"].split(":")[0] for c in shapes] == ["settled", "in flight"]
    assert all(c["events"] == 119 and 0 < c["p50_ms"] <= c["max_ms"] for c in shapes), shapes

    assert r["ratios"]["accept_vs_usual"] > 0 and r["ratios"]["accept_vs_broker_concurrent"] > 0


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99
    assert percentile([], 50) == 0.0
    assert summary_ms([0.001, 0.002]) == {
        "p50_ms": 1.0,
        "p95_ms": 2.0,
        "p99_ms": 2.0,
        "max_ms": 2.0,
    }


def test_profiles_are_summarised_by_self_and_inclusive_time() -> None:
    collapsed = "main (a.py:1);handle (b.py:2);encode (c.py:3) 3\nmain (a.py:1);idle (d.py:4) 1\n"
    assert top_functions(collapsed) == [("encode (c.py)", 75.0), ("idle (d.py)", 25.0)]
    inclusive = dict(top_functions(collapsed, inclusive=True))
    assert inclusive["main (a.py)"] == 100.0 and inclusive["handle (b.py)"] == 75.0

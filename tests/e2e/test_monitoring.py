"""The dashboard and alert rules name only metrics the running services expose; logs are canonical."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from shared import tracing, wiring
from tests.e2e.conftest import SETTLE_S, Pipeline

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "k8s" / "monitoring"

NAME = re.compile(r"\bbaton_[a-z0-9_]+")
# A selector: a metric name followed by {label matchers}.
SELECTOR = re.compile(r"\b(baton_[a-z0-9_]+)\{([^}]*)\}")
GROUPED = re.compile(r"by \(([^)]*)\) \((?:(?:rate|increase)\()?(baton_[a-z0-9_]+)")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
}


def dashboard_exprs() -> list[str]:
    dash = json.loads((MONITORING / "dashboard.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def rule_exprs() -> list[str]:
    rules = yaml.safe_load((MONITORING / "rules.yaml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


class Scrape:
    """Names and label sets of everything the five services expose."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.labels: dict[str, set[str]] = {}
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = {}

    def add(self, text: str) -> None:
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ", 3)
                self.names.add(name)
                self.names.update(name + s for s in SUFFIXES.get(kind, ()))
                continue
            if not line or line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            name, _, rest = head.partition("{")
            labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', rest))
            self.names.add(name)
            self.labels.setdefault(name, set()).update(labels)
            self.samples.setdefault(name, []).append((labels, float(value)))

    def value(self, name: str, **labels: str) -> float:
        return sum(v for lab, v in self.samples.get(name, []) if labels.items() <= lab.items())


def scrape(p: Pipeline) -> Scrape:
    out = Scrape()
    for child in p.supervisor.children:
        port = child.env["BATON_METRICS_PORT"]
        out.add(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
    return out


def _one_answer(p: Pipeline, content: str) -> dict[str, Any]:
    auth = {"Authorization": f"Bearer {p.token('acme', 'alice')}"}
    r = httpx.post(f"{p.gateway}/api/chat", json={"content": content}, headers=auth, timeout=10)
    assert r.status_code == 202, r.text
    message = r.json()["message"]
    url = f"{p.gateway}/api/conversations/{message['conversation_id']}/messages"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = httpx.get(url, headers=auth, timeout=10)
        # 404 until the persister has stored the new conversation.
        msgs = r.json()["messages"] if r.status_code == 200 else []
        if any(m["role"] == "assistant" for m in msgs):
            return {"message": message, "messages": msgs}
        time.sleep(0.1)
    raise AssertionError(f"no answer in time\n{p.log_tail()}")


def _until(p: Pipeline, check: Any, timeout: float = 60) -> Scrape:
    deadline = time.monotonic() + timeout
    while True:
        s = scrape(p)
        if check(s):
            return s
        if time.monotonic() > deadline:
            backlog = {
                (name, tuple(sorted(labels.items()))): v
                for name in s.samples
                if name.endswith(("_consumer_pending", "_consumer_ack_pending"))
                for labels, v in s.samples[name]
                if v
            }
            raise AssertionError(f"metrics never showed the expected samples; backlog: {backlog}")
        time.sleep(0.25)


@pytest.fixture
def pipeline(module_pipeline: Pipeline) -> Pipeline:
    """One stack for the module: each test counts its own message (metrics as deltas, log
    lines by its message and trace)."""
    return module_pipeline


def test_every_metric_the_dashboard_and_rules_name_is_exposed(pipeline: Pipeline) -> None:
    _one_answer(pipeline, "What is a JetStream consumer?")
    consumers = {(s.split("-")[0], s) for s in (c.durable for c in wiring.CONSUMERS)}

    def complete(s: Scrape) -> bool:
        # Backlog gauges of every consumer (refreshed every few seconds) and the answer.
        return (
            all(
                any(
                    lab.get("consumer") == durable
                    for lab, _ in s.samples.get(f"baton_{svc}_consumer_pending", [])
                )
                for svc, durable in consumers
            )
            and s.value("baton_persister_answer_latency_seconds_count", kind="answer") >= 1
        )

    s = _until(pipeline, complete)
    missing: dict[str, list[str]] = {}
    for source, exprs in (("dashboard", dashboard_exprs()), ("rules", rule_exprs())):
        for expr in exprs:
            for name in NAME.findall(expr):
                if name not in s.names:
                    missing.setdefault(name, []).append(source)
    assert not missing, f"named but exposed by no service: {missing}"

    wrong_labels: list[str] = []
    for expr in dashboard_exprs() + rule_exprs():
        for name, matchers in SELECTOR.findall(expr):
            known = s.labels.get(name)
            if known is None:  # no samples yet (or a limits metric): label names unknown
                continue
            wrong_labels += [
                f"{name}: {lab}" for lab in MATCHER.findall(matchers) if lab not in known
            ]
    # Aggregations: `by (a, b) (rate(metric[...]))` groups by labels the metric must have.
    for expr in dashboard_exprs() + rule_exprs():
        for grouping, name in GROUPED.findall(expr):
            known = s.labels.get(name)
            if known is None:
                continue
            wrong_labels += [
                f"{name}: by {lab}"
                for lab in (x.strip() for x in grouping.split(","))
                if lab and lab not in known and lab != "le"
            ]
    assert not wrong_labels, f"selectors on labels the metric lacks: {wrong_labels}"


def test_one_message_shows_up_in_the_new_metrics(pipeline: Pipeline) -> None:
    # The stack is the module's: this message's share is the change from before it.
    before = scrape(pipeline)
    _one_answer(pipeline, "Explain idempotency keys please")

    def grew(s: Scrape, name: str, **labels: str) -> float:
        return s.value(name, **labels) - before.value(name, **labels)

    latency = "baton_persister_answer_latency_seconds_count"
    s = _until(pipeline, lambda s: grew(s, latency, kind="answer") >= 1)
    # Only answers were timed: the one answer is the only new sample, of kind "answer".
    assert grew(s, latency) == grew(s, latency, kind="answer") == 1
    assert grew(s, "baton_persister_answer_latency_seconds_sum", kind="answer") > 0
    assert grew(s, "baton_persister_cost_usd_total") > 0
    for write in ("user_messages", "verdict", "result"):
        assert grew(s, "baton_persister_commit_seconds_count", write=write) >= 1, write
    # Everything was handled: nothing is left in any backlog once the gauges catch up. The
    # deadline timers are not a backlog: each attempt's timer is handed back (nak with a delay)
    # until its deadline, and the server may count it as ack pending all that time (the KEDA
    # trigger on policy-deadlines has a high threshold for the same reason, k8s/base/policy.yaml).
    idle = _until(
        pipeline,
        lambda s: all(
            v == 0
            for name in s.samples
            if name.endswith(("_consumer_pending", "_consumer_ack_pending"))
            for labels, v in s.samples[name]
            if not (name.endswith("_ack_pending") and labels.get("consumer") == "policy-deadlines")
        ),
    )
    assert idle.value("baton_agent_consumer_pending", consumer="agent") == 0


def _handled_lines(logs: Path) -> list[dict[str, Any]]:
    lines = []
    for path in logs.glob("*.log"):
        for raw in path.read_text(errors="replace").splitlines():
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if isinstance(line, dict) and line.get("event") == "handled":
                lines.append(line)
    return lines


def test_each_hop_logs_one_canonical_line_without_content(pipeline: Pipeline) -> None:
    secret = f"my-secret-question-{uuid.uuid4().hex}"
    done = _one_answer(pipeline, secret)
    message_id = done["message"]["id"]
    answer = next(m["content"] for m in done["messages"] if m["role"] == "assistant")
    # The answer's trip back (persister → policy) is logged shortly after it is readable.
    deadline = time.monotonic() + SETTLE_S
    while True:
        lines = _handled_lines(pipeline.logs)
        accepted = [x for x in lines if x.get("message_id") == message_id]
        # The trace the message travels in, as the first consumer hop saw it.
        anchors = {x["trace_id"] for x in accepted if x.get("consumer") == "persister-in"}
        mine = [x for x in lines if x.get("trace_id") in anchors - {""}]
        hops = {(x["service"], x.get("consumer")) for x in mine}
        if ("policy", "policy-outcomes") in hops or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(anchors) == 1 and "" not in anchors, accepted
    expected = {
        ("persister", "persister-in"),
        ("agent", "agent"),
        ("policy", "policy-decisions"),
        ("executor", "executor"),
        ("persister", "persister-results"),
        ("policy", "policy-outcomes"),
    }
    assert expected <= hops, f"missing hops: {expected - hops}"
    [gateway] = [x for x in accepted if x["service"] == "gateway"]
    assert (gateway["method"], gateway["route"], gateway["status"]) == ("POST", "/api/chat", 202)
    assert gateway["outcome"] == "ok" and gateway["duration_ms"] > 0
    # With a request span at the gateway (shared.tracing.root_span), the message's one trace
    # starts there and its line names it; without one the first consumer starts the trace.
    assert gateway["trace_id"] == (anchors.pop() if hasattr(tracing, "root_span") else "")
    for line in mine:
        for field in ("service", "outcome", "duration_ms", "trace_id", "timestamp", "level"):
            assert line.get(field) not in (None, ""), (field, line)
        assert line["level"] == "info"
    # Every hop that names the user message is in that one trace.
    assert {x["trace_id"] for x in accepted if x["service"] != "gateway"} <= {
        x["trace_id"] for x in mine
    }
    # One line per handled event: each hop appears once (nothing here was redelivered).
    keys = [(x["service"], x.get("consumer")) for x in mine]
    assert len(keys) == len(set(keys)), keys
    everything = "\n".join(p.read_text(errors="replace") for p in pipeline.logs.glob("*.log"))
    assert secret not in everything
    assert answer not in everything
    assert "Bearer" not in everything

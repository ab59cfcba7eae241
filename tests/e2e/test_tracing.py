"""One OpenTelemetry trace per user message, across the five services as separate processes.

Every service exports over OTLP/HTTP (set only by the standard ``OTEL_*`` variables) to a tiny
collector in this test, which decodes the protobuf requests; the test then rebuilds the tree
of one message's trace from the spans the processes really sent.
"""

from __future__ import annotations

import gzip
import http.server
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from baton.embedded import NatsServer, PostgresServer
from tests.conftest import ExternalPostgres
from tests.e2e.conftest import Pipeline, _running, fresh, module_stack

pytestmark = pytest.mark.e2e

CONTENT = "Tracing probe: what is the capital of France?"


class Span(msgspec.Struct, frozen=True):
    trace_id: str
    span_id: str
    parent: str
    name: str
    kind: int  # the protobuf enum: 2 server, 3 client, 4 producer, 5 consumer
    service: str
    attributes: dict[str, Any]
    links: tuple[str, ...]  # trace ids of linked spans


KIND_SERVER, KIND_CLIENT, KIND_PRODUCER, KIND_CONSUMER = 2, 3, 4, 5


def _value(v: Any) -> Any:
    field = v.WhichOneof("value")
    return (
        getattr(v, field)
        if field in ("string_value", "int_value", "bool_value", "double_value")
        else None
    )


class Collector:
    """An OTLP/HTTP trace receiver on 127.0.0.1 that keeps every span it is sent."""

    def __init__(self, port: int = 0) -> None:
        self.spans: list[Span] = []
        self.requests = 0
        self.lock = threading.Lock()
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                collector.add(self.path, request)
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add(self, path: str, request: Any) -> None:
        assert path == "/v1/traces", path
        found = []
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    found.append(
                        Span(
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent=s.parent_span_id.hex(),
                            name=s.name,
                            kind=s.kind,
                            service=str(resource.get("service.name", "")),
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            links=tuple(link.trace_id.hex() for link in s.links),
                        )
                    )
        with self.lock:
            self.requests += 1
            self.spans.extend(found)

    def trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def root_of(self, message_id: str) -> Span | None:
        with self.lock:
            return next(
                (
                    s
                    for s in self.spans
                    if s.attributes.get("baton.message_id") == message_id and s.kind == KIND_SERVER
                ),
                None,
            )


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    """One receiver for the module's one stack: tests read only their own messages' traces."""
    c = Collector()
    c.thread.start()
    try:
        yield c
    finally:
        c.server.shutdown()
        c.server.server_close()


@pytest.fixture(scope="module")
def _traced_stack(
    postgres_server: PostgresServer | ExternalPostgres,
    tmp_path_factory: pytest.TempPathFactory,
    collector: Collector,
) -> Iterator[Pipeline]:
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within a tenth of a second, not five
    }
    yield from module_stack(postgres_server, tmp_path_factory.mktemp("traced"), otel)


@pytest.fixture
def traced(_traced_stack: Pipeline) -> Pipeline:
    """The module's one stack, the model reset (a test may slow it down)."""
    return fresh(_traced_stack)


def _submit(p: Pipeline, headers: dict[str, str] | None = None) -> tuple[str, str]:
    h = {"Authorization": f"Bearer {p.token('acme', 'ada')}", **(headers or {})}
    r = httpx.post(f"{p.gateway}/api/chat", json={"content": CONTENT}, headers=h, timeout=10)
    assert r.status_code == 202, r.text
    return r.json()["message"]["id"], r.json()["message"]["conversation_id"]


def _wait_answer(p: Pipeline, cid: str) -> None:
    h = {"Authorization": f"Bearer {p.token('acme', 'ada')}"}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = httpx.get(f"{p.gateway}/api/conversations/{cid}/messages", headers=h, timeout=5)
        if r.status_code == 200 and any(m["role"] == "assistant" for m in r.json()["messages"]):
            return
        time.sleep(0.2)
    raise AssertionError(f"no answer in conversation {cid}\n{p.log_tail()}")


def _consumer(spans: list[Span], durable: str) -> Span:
    found = [
        s
        for s in spans
        if s.kind == KIND_CONSUMER and s.attributes.get("messaging.consumer.group.name") == durable
    ]
    # A loaded machine may deliver a message again (a nak, an ack_wait passed): the same hop,
    # same trace, with a higher delivery count. So: exactly one first delivery, which is the
    # hop the chain checks (a redelivery has the same parent).
    first = [s for s in found if s.attributes.get("messaging.message.delivery_count") == 1]
    assert len(first) == 1, (durable, [s.name for s in spans])
    return first[0]


def _deliveries(spans: list[Span], durable: str) -> list[Span]:
    return [
        s
        for s in spans
        if s.kind == KIND_CONSUMER and s.attributes.get("messaging.consumer.group.name") == durable
    ]


def _ancestors(span: Span, by_id: dict[str, Span]) -> list[Span]:
    out = []
    while span.parent:
        parent = by_id.get(span.parent)
        assert parent is not None, f"{span.name}'s parent {span.parent} is not in the trace"
        out.append(parent)
        span = parent
    return out


def _within(hop: Span, spans: list[Span], by_id: dict[str, Span]) -> list[Span]:
    """Spans whose nearest hop (a CONSUMER or SERVER ancestor) is ``hop``: its own work."""
    out = []
    for s in spans:
        nearest = next(
            (a for a in _ancestors(s, by_id) if a.kind in (KIND_CONSUMER, KIND_SERVER)), None
        )
        if nearest == hop:
            out.append(s)
    return out


def _wait_trace(
    collector: Collector, message_id: str, done: Any, timeout: float = 30
) -> list[Span]:
    deadline = time.monotonic() + timeout
    while True:
        root = collector.root_of(message_id)
        if root is not None:
            spans = collector.trace(root.trace_id)
            if done(spans):
                return spans
        assert time.monotonic() < deadline, (
            f"trace of {message_id} incomplete: {[s.name for s in collector.spans][-40:]}"
        )
        time.sleep(0.2)


def _complete(spans: list[Span]) -> bool:
    durables = {s.attributes.get("messaging.consumer.group.name") for s in spans}
    models = [s for s in spans if s.name == "anthropic.messages.create"]
    return {"persister-in", "agent", "policy-decisions", "executor", "persister-results"} <= (
        durables
    ) and len(models) >= 2


def test_one_message_is_one_trace_through_all_five_services(
    traced: Pipeline, collector: Collector
) -> None:
    message_id, cid = _submit(traced)
    _wait_answer(traced, cid)
    spans = _wait_trace(collector, message_id, _complete)
    by_id = {s.span_id: s for s in spans}

    # One trace, one root: the gateway's request span.
    roots = [s for s in spans if not s.parent]
    assert len(roots) == 1, [s.name for s in roots]
    root = roots[0]
    assert (root.service, root.name, root.kind) == ("baton-gateway", "POST /api/chat", KIND_SERVER)
    assert root.attributes["http.response.status_code"] == 202

    # A span per hop, each a descendant of the one before it: the path of the message.
    hops = [
        ("baton-persister", "persister-in"),
        ("baton-agent", "agent"),
        ("baton-policy", "policy-decisions"),
        ("baton-executor", "executor"),
        ("baton-persister", "persister-results"),
    ]
    chain = [root]
    for service, durable in hops:
        span = _consumer(spans, durable)
        assert span.service == service, (durable, span.service)
        ancestors = _ancestors(span, by_id)
        assert chain[-1] in ancestors, f"{durable} is not under {chain[-1].name}"
        # The direct parent is the publish of the hop before (context travels in NATS headers).
        parent = by_id[span.parent]
        assert parent.kind == KIND_PRODUCER and parent.service == chain[-1].service, parent
        assert span.attributes["baton.message_id"] == message_id
        assert span.attributes["baton.outcome"] not in ("error", "dead_lettered", "retry")
        chain.append(span)

    # Database statements: the persister's inserts under both of its hops, as CLIENT spans.
    for hop in (chain[1], chain[5]):
        db = [
            s
            for s in _within(hop, spans, by_id)
            if s.attributes.get("db.system.name") == "postgresql"
        ]
        assert db and all(s.kind == KIND_CLIENT for s in db), hop.name
        assert any(s.attributes["db.operation.name"] == "INSERT" for s in db), [s.name for s in db]
        assert all("$" in s.attributes["db.query.text"] or "INSERT" not in s.name for s in db)

    # The model calls: spans as the SDK makes them (shared/model.py), under the agent's and the
    # executor's hops.
    for hop, durable in ((chain[2], "agent"), (chain[4], "executor")):
        calls = [s for s in _within(hop, spans, by_id) if s.name == "anthropic.messages.create"]
        assert len(calls) == 1, durable
        call = calls[0]
        assert call.kind == KIND_CLIENT
        assert call.attributes["gen_ai.provider.name"] == "anthropic"
        assert call.attributes["gen_ai.request.model"]
        assert call.attributes["gen_ai.usage.output_tokens"] > 0
        if durable == "executor":
            assert call.attributes["gen_ai.request.stream"] is True

    # No span carries the message's content (metadata only).
    for s in spans:
        assert all(CONTENT not in str(v) for v in s.attributes.values()), s.name


def test_a_clients_trace_context_is_linked_never_continued(
    traced: Pipeline, collector: Collector
) -> None:
    foreign = uuid.uuid4().hex
    header = {"traceparent": f"00-{foreign}-{uuid.uuid4().hex[:16]}-01"}
    linked_id, _ = _submit(traced, header)
    plain_id, _ = _submit(traced, {"traceparent": "00-garbage-zz-01"})
    zero_id, _ = _submit(traced, {"traceparent": f"00-{'0' * 32}-{'0' * 16}-01" + "x" * 4000})
    other_id, _ = _submit(traced)
    roots = {}
    for mid in (linked_id, plain_id, zero_id, other_id):
        _wait_trace(collector, mid, lambda spans: True)
        roots[mid] = collector.root_of(mid)
    linked = roots[linked_id]
    assert linked is not None and linked.trace_id != foreign and linked.links == (foreign,)
    # Malformed, invalid or oversized context is ignored: the message is accepted, unlinked.
    for mid in (plain_id, zero_id):
        assert roots[mid] is not None and roots[mid].links == ()
    # Four messages, four traces.
    assert len({r.trace_id for r in roots.values() if r is not None}) == 4


def test_a_queued_message_keeps_its_own_trace_when_its_run_starts_later(
    traced: Pipeline, collector: Collector
) -> None:
    # The first answer streams for a while, so the second message waits behind it (I6).
    traced.model.update_settings(tokens_per_second=20, words_per_reply=80)
    first, cid = _submit(traced)
    h = {"Authorization": f"Bearer {traced.token('acme', 'ada')}"}
    # Send the second message once the first answer is streaming (about 4 s left), so its
    # decision finds the conversation busy however slow the machine is.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        runs = httpx.get(f"{traced.gateway}/api/conversations/{cid}/state", headers=h).json()
        if any(r.get("status") == "running" for r in runs.get("runs", [])):
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the first run never ran\n{traced.log_tail()}")
    r = httpx.post(
        f"{traced.gateway}/api/chat",
        json={"content": "And a second question?", "conversation_id": cid},
        headers=h,
        timeout=10,
    )
    assert r.status_code == 202, r.text
    second = r.json()["message"]["id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        got = httpx.get(f"{traced.gateway}/api/conversations/{cid}/messages", headers=h).json()
        if sum(m["role"] == "assistant" for m in got["messages"]) == 2:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"two answers expected\n{traced.log_tail()}")
    traces = {}
    for mid in (first, second):
        spans = _wait_trace(collector, mid, _complete)
        by_id = {s.span_id: s for s in spans}
        executor = _consumer(spans, "executor")  # exactly one executor hop per trace
        assert executor.attributes["baton.message_id"] == mid
        ancestors = _ancestors(executor, by_id)
        assert any(d in ancestors for d in _deliveries(spans, "policy-decisions"))
        traces[mid] = spans[0].trace_id
    assert traces[first] != traces[second]
    # The second run was started by the end of the first: that cause is a link, not a parent.
    started = [s for s in collector.trace(traces[second]) if s.name == "policy start run"]
    assert any(traces[first] in s.links for s in started), started


def test_without_an_otlp_endpoint_nothing_is_exported(
    nats_server: NatsServer, database_url: str, tmp_path: Path
) -> None:
    if any(k.startswith("OTEL_EXPORTER_OTLP") for k in os.environ):
        pytest.skip("this run exports traces on purpose (OTEL_EXPORTER_OTLP_* is set)")
    # Listen where an exporter with no endpoint would send by default (localhost:4318).
    try:
        collector = Collector(port=4318)
    except OSError:
        pytest.skip("port 4318 is in use here")
    collector.thread.start()
    try:
        fast = {"OTEL_BSP_SCHEDULE_DELAY": "100"}
        with _running(nats_server.url, database_url, tmp_path / "logs", extra=fast) as p:
            _, cid = _submit(p)
            _wait_answer(p, cid)
            time.sleep(1.0)  # several export intervals of a batch processor set to 100 ms
    finally:
        collector.server.shutdown()
        collector.server.server_close()
    assert collector.requests == 0

"""Shared modules: config loading, event schemas and subject naming."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from shared import messages as m
from shared import subjects, wiring
from shared.config import BaseSettings, Secret, load, nats_servers
from shared.errors import ConfigError


@pytest.mark.parametrize(
    ("env", "field", "value"),
    [
        ({"BATON_METRICS_PORT": "9100"}, "metrics_port", 9100),
        ({"GATEWAY_METRICS_PORT": "9200", "BATON_METRICS_PORT": "9100"}, "metrics_port", 9200),
        ({"BATON_SHUTDOWN_GRACE_S": "2.5"}, "shutdown_grace_s", 2.5),
        ({"GATEWAY_NATS_URL": "nats://n:4222"}, "nats_url", "nats://n:4222"),
        ({"POLICY_FETCH_BATCH": "7"}, "fetch_batch", 32),
        ({}, "concurrency", 16),
    ],
)
def test_load_reads_the_service_prefix_over_baton(env: dict, field: str, value: object) -> None:
    assert getattr(load(BaseSettings, "gateway", env), field) == value


def test_load_hides_secret_values_in_repr() -> None:
    s = load(BaseSettings, "GATEWAY", {"BATON_NATS_PASSWORD": "hunter2"})
    assert isinstance(s.nats_password, Secret) and s.nats_password == "hunter2"
    assert "hunter2" not in repr(s) and "Secret('***')" in repr(s)


@pytest.mark.parametrize(
    "env", [{"BATON_METRICS_PORT": "ninety"}, {"BATON_SHUTDOWN_GRACE_S": "soon"}]
)
def test_load_raises_config_error_on_a_bad_value(env: dict) -> None:
    with pytest.raises(ConfigError, match="BaseSettings"):
        load(BaseSettings, "GATEWAY", env)


PRICES = m.Prices(input=3.0, output=15.0, cache_read=0.3, cache_write=3.75)


@pytest.mark.parametrize(
    ("usage", "cost"),
    [
        (m.Usage(), 0.0),
        (m.Usage(input_tokens=1_000_000), 3.0),
        (m.Usage(output_tokens=2_000), 0.03),
        (m.Usage(input_tokens=1000, output_tokens=500, cache_read_tokens=10_000,
                 cache_write_tokens=2000), 0.003 + 0.0075 + 0.003 + 0.0075),
    ],
)  # fmt: skip
def test_usage_cost_is_tokens_times_price_per_million(usage: m.Usage, cost: float) -> None:
    assert usage.cost_usd(PRICES) == pytest.approx(cost)


DECISION = {"intent": "code", "complexity": "high", "action": "answer", "executor": "code"}


@pytest.mark.parametrize("estimate", [0, -1, 8193, 10**9])
def test_decision_rejects_out_of_range_estimated_tokens(estimate: int) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({**DECISION, "estimated_tokens": estimate}, m.Decision)


NOW = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
IDS = {"event_id": "e", "message_id": "m", "conversation_id": "c", "project_id": "p"}
RUN = {**IDS, "run_id": "r"}
EXEC = {**RUN, "task_id": "t", "call_id": "k", "attempt": 1, "model": "x", "prices": PRICES}
EVENTS = [
    m.UserMessageAccepted(**IDS, user_id="u", content="hi", content_hash="h", created_at=NOW),
    m.UserMessagePersisted(**IDS, user_id="u", content="hi", content_hash="h", created_at=NOW),
    m.AgentDecision(**IDS, user_id="u", decision=m.Decision(**DECISION, estimated_tokens=9)),
    m.RunVerdict(**RUN, user_id="u", verdict="approve", status="running", reason="ok"),
    m.ExecTask(**{k: v for k, v in EXEC.items() if k != "call_id"}, executor="chat",
               max_tokens=256, deadline=NOW),
    m.ExecResult(**EXEC, text="a", usage=m.Usage(input_tokens=3)),
    m.ExecFailed(**EXEC, error_class="timeout", error="slow", usage=m.Usage()),
    m.PolicyReply(**RUN, user_id="u", kind="refusal", text="no", status="refused"),
    m.AssistantMessagePersisted(**RUN, reply_to="m", kind="answer", content="a",
                                created_at=NOW, status="completed"),
    m.TokenDelta(conversation_id="c", run_id="r", attempt=1, seq=0, text="t"),
    m.DeadLetter(stream="S", consumer="c", subject="s", stream_seq=1, deliveries=2,
                 reason="bad", headers={"a": "b"}, payload=b"\x00\xff", failed_at=NOW),
]  # fmt: skip


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_events_round_trip_through_encode_and_decode(event: msgspec.Struct) -> None:
    assert msgspec.json.decode(m.encode(event), type=type(event)) == event


@pytest.mark.parametrize(
    ("value", "safe"),
    [("acme", True), ("A-b_9", True), ("x" * 64, True), ("", False), ("x" * 65, False),
     ("a.b", False), ("*", False), (">", False), ("a b", False), ("a\tb", False),
     ("é", False), ("a\nb", False)],
)  # fmt: skip
def test_is_safe_token(value: str, safe: bool) -> None:
    assert subjects.is_safe_token(value) is safe


@pytest.mark.parametrize("value", ["acme\n", "x" * 64 + "\n"])
def test_is_safe_token_rejects_a_trailing_newline(value: str) -> None:
    assert not subjects.is_safe_token(value)


def covers(pattern: str, subject: str) -> bool:
    """Whether NATS subject ``pattern`` matches every subject that ``subject`` can match."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or s[i] == ">" or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


STREAMS = {s.name: s for s in subjects.STREAMS}


@pytest.mark.parametrize("spec", wiring.CONSUMERS, ids=lambda c: c.durable)
def test_every_consumer_filter_is_covered_by_its_stream(spec: subjects.ConsumerSpec) -> None:
    assert spec.stream in STREAMS
    assert any(covers(p, spec.filter_subject) for p in STREAMS[spec.stream].subjects)


BUILDERS = [subjects.chat_in, subjects.persisted_user, subjects.persisted_assistant,
            subjects.agent_decision, subjects.policy_verdict, subjects.policy_reply,
            subjects.exec_task, subjects.exec_result, subjects.exec_failed,
            subjects.token_stream, subjects.dead_letter]  # fmt: skip


@pytest.mark.parametrize("build", BUILDERS, ids=lambda b: b.__name__)
def test_every_subject_is_captured_by_exactly_one_stream(build: object) -> None:
    subject = build("acme", "c1")  # type: ignore[operator]
    assert sum(any(covers(p, subject) for p in s.subjects) for s in subjects.STREAMS) == 1


@pytest.mark.parametrize(
    ("url", "servers"),
    [
        ("nats://127.0.0.1:4222", ["nats://127.0.0.1:4222"]),
        (
            "nats://a:4222, nats://b:4222 ,tls://c:4222",
            ["nats://a:4222", "nats://b:4222", "tls://c:4222"],
        ),
    ],
)
def test_nats_url_takes_one_server_or_a_comma_separated_cluster(url: str, servers: list) -> None:
    assert nats_servers(url) == servers


@pytest.mark.parametrize(
    "url",
    [
        "",
        "nats://a:4222,",
        ",nats://a:4222",
        "nats://a,,nats://b",
        "a:4222",
        "http://a:4222",
        "nats://",
    ],
)
def test_nats_url_with_an_empty_or_foreign_entry_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="BATON_NATS_URL"):
        nats_servers(url)

"""Policy pure logic: verdicts bound the agent's advice; failures retry or end the run."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from services.policy import core
from shared import messages as m

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
SMALL, BIG = m.Prices(input=1.0, output=5.0), m.Prices(input=3.0, output=15.0)
RULES = core.Rules(default_model="small", models={"small": SMALL, "big": BIG})
IDS = {"message_id": "m1", "conversation_id": "c1", "project_id": "acme"}


def advice(rules: core.Rules = RULES, **decision: Any) -> core.RunState:
    fields = {"intent": "question", "complexity": "low", "action": "answer", "executor": "chat"}
    fields.setdefault("estimated_tokens", 300)
    d = m.Decision(**{**fields, **decision})
    e = m.AgentDecision(event_id="d1", **IDS, user_id="alice", decision=d)
    return core.decide(e, rules, NOW)


def failed(state: core.RunState, error_class: str, attempt: int | None = None) -> m.ExecFailed:
    return m.ExecFailed(
        event_id="f", **IDS, task_id="t", call_id="c", run_id=state.run_id,
        attempt=state.attempt if attempt is None else attempt, model=state.model,
        error_class=error_class, error="boom", usage=m.Usage(), prices=m.Prices(),
    )  # fmt: skip


def test_decide_approves_an_answer_with_the_default_model() -> None:
    s = advice()
    assert (s.status, s.verdict, s.model, s.prices, s.executor, s.attempt, s.reply_kind) == (
        "running", "approve", "small", SMALL, "chat", 1, None,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("hint", "model"),
    [("big", "big"), ("opus", "small"), ("ignore policy, use big", "small"), ("", "small"),
     (None, "small")],
)  # fmt: skip
def test_decide_honours_a_model_hint_only_if_listed(hint: str | None, model: str) -> None:
    s = advice(model_hint=hint)
    assert (s.model, s.prices) == (model, RULES.models[model])


def test_decide_overrides_an_executor_the_rules_do_not_allow() -> None:
    rules = msgspec.structs.replace(RULES, allowed_executors=frozenset({"chat"}))
    s = advice(rules, executor="code")
    assert (s.verdict, s.executor, s.status) == ("override", "chat", "running")
    assert "executor code not allowed" in s.reason


CLARIFY = [{"action": "clarify"}, {"ambiguous": True}, {"action": "clarify", "ambiguous": True}]


@pytest.mark.parametrize("decision", CLARIFY)
def test_decide_asks_a_clarifying_question_when_told_or_ambiguous(decision: dict) -> None:
    s = advice(**decision)
    assert (s.status, s.verdict, s.reply_kind, s.reply_text) == (
        "clarified", "clarify", "clarify", core.CLARIFY_TEXT,
    )  # fmt: skip
    assert s.attempt == 0 and s.deadline is None


@pytest.mark.parametrize("decision", [{"action": "refuse"}, {**CLARIFY[2], "action": "refuse"}])
def test_decide_refuses_with_a_stop_and_a_refusal_reply(decision: dict) -> None:
    s = advice(**decision)
    assert (s.status, s.verdict, s.reply_kind, s.reply_text) == (
        "refused", "stop", "refusal", core.REFUSAL_TEXT,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("estimate", "cap", "max_tokens"),
    [(1, 4096, 256), (128, 4096, 256), (300, 4096, 600), (8192, 4096, 4096),
     (10**12, 4096, 4096), (10**12, 1000, 1000)],
)  # fmt: skip
def test_decide_bounds_max_tokens_between_256_and_the_output_cap(
    estimate: int, cap: int, max_tokens: int
) -> None:
    rules = msgspec.structs.replace(RULES, max_output_tokens=cap)
    assert advice(rules, estimated_tokens=estimate).max_tokens == max_tokens


def test_decide_derives_the_run_id_from_the_message_id() -> None:
    assert advice().run_id == core.run_id_for("m1") == "run-m1"


def test_decide_sets_the_deadline_run_deadline_s_from_now() -> None:
    rules = msgspec.structs.replace(RULES, run_deadline_s=42.5)
    assert advice(rules).deadline == NOW + timedelta(seconds=42.5)


@pytest.mark.parametrize("error_class", sorted(core.RETRYABLE))
def test_on_failure_retries_retryable_classes_with_the_next_attempt(error_class: str) -> None:
    s = advice()
    later = NOW + timedelta(seconds=10)
    new = core.on_failure(s, failed(s, error_class), RULES, later)
    assert new is not None
    assert (new.status, new.attempt, new.deadline) == ("running", 2, later + timedelta(seconds=300))


@pytest.mark.parametrize("error_class", sorted(core.RETRYABLE))
def test_on_failure_gives_up_once_max_attempts_is_reached(error_class: str) -> None:
    s = msgspec.structs.replace(advice(), attempt=RULES.max_attempts)
    new = core.on_failure(s, failed(s, error_class), RULES, NOW)
    assert new is not None and (new.status, new.reply_kind) == ("failed", "failure")


@pytest.mark.parametrize("error_class", ["bad_request", "cancelled"])
def test_on_failure_fails_non_retryable_classes_with_a_failure_reply(error_class: str) -> None:
    s = advice()
    new = core.on_failure(s, failed(s, error_class), RULES, NOW)
    assert new is not None
    assert (new.status, new.verdict, new.attempt) == ("failed", "stop", 1)
    assert new.reply_text == core.FAILURE_TEXT.format(error_class=error_class)


@pytest.mark.parametrize("attempt", [0, 2, 3])
def test_on_failure_ignores_a_report_for_another_attempt(attempt: int) -> None:
    s = advice()
    assert core.on_failure(s, failed(s, "timeout", attempt), RULES, NOW) is None


@pytest.mark.parametrize("status", sorted(core.TERMINAL))
def test_on_failure_ignores_a_report_for_a_finished_run(status: str) -> None:
    s = msgspec.structs.replace(advice(), status=status)
    assert core.on_failure(s, failed(s, "timeout"), RULES, NOW) is None


def persisted(status: str) -> m.AssistantMessagePersisted:
    return m.AssistantMessagePersisted(
        event_id="p", **IDS, run_id="run-m1", reply_to="m1", kind="answer", content="hi",
        created_at=NOW, status=status,
    )  # fmt: skip


@pytest.mark.parametrize("status", ["completed", "failed", "refused"])
def test_on_reply_persisted_closes_a_running_run_with_the_stored_status(status: str) -> None:
    new = core.on_reply_persisted(advice(), persisted(status))
    assert new is not None and new.status == status


@pytest.mark.parametrize("status", sorted(core.TERMINAL))
def test_on_reply_persisted_changes_nothing_when_already_in_that_status(status: str) -> None:
    s = msgspec.structs.replace(advice(), status=status)
    assert core.on_reply_persisted(s, persisted(status)) is None


def test_task_for_ids_are_deterministic_per_run_and_attempt() -> None:
    s = advice()
    t1, t2 = core.task_for(s, NOW), core.task_for(s, NOW + timedelta(seconds=5))
    retry = core.task_for(msgspec.structs.replace(s, attempt=2), NOW)
    assert (t1.event_id, t1.task_id, t2.task_id, retry.task_id) == (
        "task:run-m1:1", "task:run-m1:1", "task:run-m1:1", "task:run-m1:2",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("decision", "event_id"),
    [({}, "verdict:run-m1:1:running"), ({"action": "refuse"}, "verdict:run-m1:0:refused")],
)
def test_verdict_event_id_names_run_attempt_and_status(decision: dict, event_id: str) -> None:
    assert core.verdict_event(advice(**decision)).event_id == event_id


@pytest.mark.parametrize(
    ("decision", "reply"),
    [({}, None), ({"action": "refuse"}, ("reply:run-m1", "refusal")),
     ({"ambiguous": True}, ("reply:run-m1", "clarify"))],
)  # fmt: skip
def test_reply_event_has_one_id_per_run_and_only_when_there_is_a_reply(
    decision: dict, reply: tuple | None
) -> None:
    r = core.reply_event(advice(**decision))
    assert (r and (r.event_id, r.kind)) == reply


def test_a_disallowed_intent_is_a_recorded_refusal_that_never_runs() -> None:
    rules = msgspec.structs.replace(RULES, disallowed_intents=frozenset({"creative"}))
    s = advice(rules, intent="creative")
    assert (s.status, s.verdict, s.reply_kind, s.model, s.deadline) == (
        "refused", "stop", "refusal", "", None,
    )  # fmt: skip
    assert "creative" in s.reason and "does not allow" in s.reply_text
    assert advice(rules, intent="question").status == "running"


def test_the_clarify_rule_decides_what_an_ambiguous_request_gets() -> None:
    assert advice(ambiguous=True).verdict == "clarify"
    lenient = msgspec.structs.replace(RULES, clarify_ambiguous=False)
    assert advice(lenient, ambiguous=True).verdict == "approve"
    assert advice(lenient, action="clarify").verdict == "clarify"  # explicit advice still asks


def test_a_disallowed_executor_without_an_allowed_default_is_refused() -> None:
    rules = msgspec.structs.replace(
        RULES, allowed_executors=frozenset({"chat"}), default_executor="code"
    )
    s = advice(rules, executor="code")
    assert (s.status, s.verdict) == ("refused", "stop") and "executor code" in s.reason
    assert core.has_limits(RULES) is False
    assert core.has_limits(msgspec.structs.replace(RULES, limits=m.Limits(max_concurrent_runs=1)))

"""Policy pure logic: verdicts bound the agent's advice; failures retry or end the run."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from services.policy import core, phase
from shared import messages as m

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
SMALL, BIG = m.Prices(input=1.0, output=5.0), m.Prices(input=3.0, output=15.0)
RULES = core.Rules(default_model="small", models={"small": SMALL, "big": BIG})
IDS = {"message_id": "m1", "conversation_id": "c1", "project_id": "acme"}


def deadline_of(s: core.RunState) -> datetime | None:
    """The deadline of a running attempt (None in any other phase)."""
    return s.phase.deadline if isinstance(s.phase, phase.Running) else None


def retry_at(s: core.RunState) -> datetime | None:
    """When a waiting retry is due (None: no backoff)."""
    return s.phase.retry_at if isinstance(s.phase, phase.Backoff) else None


def ended(status: str) -> phase.Done:
    return phase.Done(status)  # type: ignore[arg-type]


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
    assert s.attempt == 0 and deadline_of(s) is None


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
    assert deadline_of(advice(rules)) == NOW + timedelta(seconds=42.5)


@pytest.mark.parametrize("error_class", sorted(core.RETRYABLE))
def test_on_failure_retries_retryable_classes_with_the_next_attempt(error_class: str) -> None:
    s = advice()
    later = NOW + timedelta(seconds=10)
    new = core.on_failure(s, failed(s, error_class), RULES, later)
    assert new is not None
    # The next attempt waits for its backoff; it gets a deadline when it starts.
    assert (new.status, new.attempt, deadline_of(new)) == ("running", 2, None)
    assert retry_at(new) == later + timedelta(seconds=RULES.retry_backoff_s[0])
    assert new.cause == "f" and new.model == "small"


@pytest.mark.parametrize(("attempt", "wait"), [(1, 1.0), (2, 4.0), (3, 4.0), (7, 4.0)])
def test_backoff_is_per_attempt_and_the_last_value_repeats(attempt: int, wait: float) -> None:
    rules = msgspec.structs.replace(RULES, max_attempts=10)
    s = msgspec.structs.replace(advice(), attempt=attempt)
    new = core.on_failure(s, failed(s, "timeout"), rules, NOW)
    assert new is not None and retry_at(new) == NOW + timedelta(seconds=wait)


@pytest.mark.parametrize(
    ("error_class", "model"),
    [("overloaded", "big"), ("rate_limited", "big"), ("timeout", "small"),
     ("server_error", "small"), ("cut_stream", "small")],
)  # fmt: skip
def test_a_fallback_model_is_used_only_after_overload_or_rate_limits(
    error_class: str, model: str
) -> None:
    rules = msgspec.structs.replace(RULES, fallback_model="big")
    s = advice(rules)
    new = core.on_failure(s, failed(s, error_class), rules, NOW)
    assert new is not None and (new.model, new.prices) == (model, rules.models[model])
    if model == "big":
        assert new.reason == "retry on big in 1s after " + error_class + " on attempt 1"


def test_a_retry_starts_only_once_its_backoff_is_over() -> None:
    s = advice()
    waiting = core.on_failure(s, failed(s, "overloaded"), RULES, NOW)
    at = retry_at(waiting) if waiting is not None else None
    assert waiting is not None and at is not None
    assert core.retry_due(waiting, 1, RULES, at - timedelta(seconds=0.1)) is None
    assert core.retry_due(waiting, 2, RULES, at) is None  # another attempt's
    due = core.retry_due(waiting, 1, RULES, at)
    assert due is not None and retry_at(due) is None
    assert deadline_of(due) == at + timedelta(seconds=RULES.run_deadline_s)
    assert core.retry_due(due, 1, RULES, at) is None  # started already


def test_a_failure_while_a_retry_waits_is_stale() -> None:
    s = advice()
    waiting = core.on_failure(s, failed(s, "overloaded"), RULES, NOW)
    assert waiting is not None
    assert core.on_failure(waiting, failed(waiting, "timeout"), RULES, NOW) is None


def test_a_cancelled_attempt_ends_the_run_as_cancelled_without_a_retry_or_reply() -> None:
    s = advice()
    new = core.on_failure(s, failed(s, "cancelled"), RULES, NOW)
    assert new is not None
    assert (new.status, new.verdict, new.reply_kind, new.attempt) == ("cancelled", "stop", None, 1)


@pytest.mark.parametrize("error_class", sorted(core.RETRYABLE))
def test_any_failure_after_a_cancel_request_ends_the_run_as_cancelled(error_class: str) -> None:
    s = msgspec.structs.replace(advice(), phase=phase.Cancelling())
    new = core.on_failure(s, failed(s, error_class), RULES, NOW)
    assert new is not None and (new.status, new.attempt) == ("cancelled", 1)


def test_cancel_asks_a_call_in_flight_to_stop_and_ends_anything_else_at_once() -> None:
    s = advice()
    asked = core.cancel(s, in_flight=True, active=True, cause="x", why="by user")
    assert asked is not None and (asked.status, asked.phase == phase.Cancelling()) == (
        "running",
        True,
    )
    assert core.cancel(asked, in_flight=True, active=True, cause="x", why="again") is None
    queued = core.cancel(s, in_flight=False, active=False, cause="x", why="by user")
    assert queued is not None and (queued.status, core.skipped(queued)) == ("cancelled", True)
    waiting = core.cancel(s, in_flight=False, active=True, cause="x", why="by user")
    assert waiting is not None and (waiting.status, core.skipped(waiting)) == ("cancelled", False)


@pytest.mark.parametrize("status", sorted(core.TERMINAL))
def test_cancel_changes_nothing_of_a_finished_run(status: str) -> None:
    s = msgspec.structs.replace(advice(), phase=ended(status))
    assert core.cancel(s, in_flight=True, active=True, cause="x", why="y") is None
    assert core.cancel(s, in_flight=False, active=False, cause="x", why="y") is None


def test_a_cancel_before_the_decision_leaves_a_record_the_decision_finds() -> None:
    e = m.CancelRequested(
        event_id="cancel:run-m1", **IDS, run_id="run-m1", user_id="alice", requested_at=NOW
    )
    t = core.tombstone(e)
    assert (t.run_id, t.status, t.verdict, core.skipped(t), t.position) == (
        "run-m1", "cancelled", "stop", True, 0,
    )  # fmt: skip


def test_reject_refuses_with_a_reply_and_gives_up_the_turn() -> None:
    r = core.reject(advice())
    assert (r.status, r.verdict, r.reply_kind, r.reply_text, core.skipped(r)) == (
        "refused", "stop", "refusal", core.REJECT_TEXT, True,
    )  # fmt: skip
    reply = core.reply_event(r)
    assert reply is not None and reply.status == "refused"


def test_interrupt_targets_the_active_run_and_earlier_queued_ones_only() -> None:
    conv = core.ConvState(conversation_id="c1", active="r1", next_position=2,
                          pending={2: "r2", 4: "r4", 5: "r5"})  # fmt: skip
    assert core.ahead_of(conv, 4) == ["r1", "r2"]
    assert core.superseded(conv, 4) and not core.superseded(conv, 5)
    assert core.ahead_of(core.ConvState(conversation_id="c1"), 1) == []


def deadline(state: core.RunState, attempt: int | None = None) -> m.RunDeadline:
    return core.deadline_event(
        msgspec.structs.replace(state, attempt=state.attempt if attempt is None else attempt),
        NOW,
    )


def test_a_missed_deadline_is_a_timeout_retried_like_a_failure() -> None:
    s = advice()
    new = core.on_deadline(s, deadline(s), RULES, NOW)
    assert new is not None and (new.status, new.attempt) == ("running", 2)
    assert new.cause == "deadline:run-m1:1" and "after timeout" in new.reason
    last = msgspec.structs.replace(s, attempt=RULES.max_attempts)
    failed_run = core.on_deadline(last, deadline(last), RULES, NOW)
    assert failed_run is not None and (failed_run.status, failed_run.reply_kind) == (
        "failed", "failure",
    )  # fmt: skip


def test_a_deadline_of_an_attempt_that_is_over_is_stale() -> None:
    s = advice()
    assert core.on_deadline(s, deadline(s, attempt=2), RULES, NOW) is None
    done = msgspec.structs.replace(s, phase=phase.Done("completed"))
    assert core.on_deadline(done, deadline(done), RULES, NOW) is None


def test_a_deadline_ends_a_cancel_no_executor_confirmed() -> None:
    s = msgspec.structs.replace(advice(), phase=phase.Cancelling())
    new = core.on_deadline(s, deadline(s), RULES, NOW)
    assert new is not None and new.status == "cancelled"


def test_only_the_event_that_caused_a_state_may_re_emit_it() -> None:
    s = advice()
    new = core.on_failure(s, failed(s, "timeout"), RULES, NOW)
    assert new is not None and core.caused_by(new, failed(s, "timeout"))
    other = msgspec.structs.replace(failed(s, "timeout"), event_id="failed:other")
    assert not core.caused_by(new, other)


@pytest.mark.parametrize("error_class", sorted(core.RETRYABLE))
def test_on_failure_gives_up_once_max_attempts_is_reached(error_class: str) -> None:
    s = msgspec.structs.replace(advice(), attempt=RULES.max_attempts)
    new = core.on_failure(s, failed(s, error_class), RULES, NOW)
    assert new is not None and (new.status, new.reply_kind) == ("failed", "failure")


@pytest.mark.parametrize("error_class", ["bad_request"])
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
    s = msgspec.structs.replace(advice(), phase=ended(status))
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
    s = msgspec.structs.replace(advice(), phase=ended(status))
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
    assert (s.status, s.verdict, s.reply_kind, s.model, deadline_of(s)) == (
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


def test_spent_adds_each_failed_attempts_usage_and_ignores_hostile_numbers() -> None:
    state = core.RunState(
        run_id="run-1",
        message_id="1",
        conversation_id="c",
        project_id="p",
        user_id="u",
        phase=phase.Running(),
        verdict="approve",
        reason="",
    )
    prices = m.Prices(input=3.0, output=15.0)

    def failed(attempt: int, usage: m.Usage, p: m.Prices = prices) -> m.ExecFailed:
        return m.ExecFailed(
            event_id=f"failed:{attempt}",
            message_id="1",
            conversation_id="c",
            project_id="p",
            task_id=f"task:run-1:{attempt}",
            call_id=f"task:run-1:{attempt}#1",
            run_id="run-1",
            attempt=attempt,
            model="claude-sonnet-4-6",
            error_class="overloaded",
            error="x",
            usage=usage,
            prices=p,
        )

    state = core.spent(state, failed(1, m.Usage(input_tokens=100, output_tokens=10)))
    state = core.spent(state, failed(2, m.Usage(input_tokens=50, cache_read_tokens=5)))
    assert state.usage == m.Usage(input_tokens=150, output_tokens=10, cache_read_tokens=5)
    assert state.cost_usd == pytest.approx((150 * 3.0 + 10 * 15.0) / 1_000_000)
    before = state
    state = core.spent(state, failed(3, m.Usage(input_tokens=-(10**9), output_tokens=-1)))
    state = core.spent(state, failed(4, m.Usage(), m.Prices(input=float("nan"))))
    assert (state.usage, state.cost_usd) == (before.usage, before.cost_usd)

"""Admission by the limits as steps of the machine (``machine.admit_limits``), as tables: each
(input, run) pair — what the run becomes, what is counted next, which metric moves."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from services.policy import budget, core, machine
from shared import messages as m

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
PRICES = {"big": m.Prices(input=3.0, output=15.0), "small": m.Prices(input=1.0, output=5.0)}
RATES = m.Limits(user_messages_per_minute=2, user_messages_per_hour=10)
CAPS = m.Limits(project_daily_tokens=10_000, max_concurrent_runs=3)
HOLD = core.Reservation(keys=("budget.p", "active.acme"), tokens=500, cost_usd=0.01)


def rules(limits: m.Limits, **more: object) -> core.Rules:
    return core.Rules(default_model="big", models=PRICES, limits=limits, **more)  # type: ignore[arg-type]


def decided(action: m.Action = "answer") -> core.RunState:
    d = m.Decision(
        intent="question", complexity="low", action=action, executor="chat", estimated_tokens=300
    )
    e = m.AgentDecision(
        event_id="d1", message_id="m1", conversation_id="c1", project_id="acme", user_id="u",
        decision=d, position=1,
    )  # fmt: skip
    return core.decide(e, rules(m.Limits()), NOW)


RUNNING, REFUSING = decided(), decided("refuse")
COUNTED = {"m": 1, "h": 4}
WITH_COUNTS = m.LimitsSnapshot(limits=RATES, user_messages_minute=1, user_messages_hour=4)


def plan(fits: bool = True, scope: budget.Scope = "", **more: object) -> budget.Plan:
    snapshot = m.LimitsSnapshot(limits=CAPS, day="2025-01-02", project_tokens_used=1200)
    return budget.Plan(
        fits=fits,
        scope=scope,
        model=str(more.pop("model", "big")),
        snapshot=snapshot,
        **more,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("run", "limits", "next_", "snapshot"),
    [
        # No rate windows: the budgets come next for an approval, nothing for the others.
        (RUNNING, CAPS, machine.ReserveBudget(), m.LimitsSnapshot(limits=CAPS)),
        (REFUSING, CAPS, None, m.LimitsSnapshot(limits=CAPS)),
        (RUNNING, m.Limits(), machine.ReserveBudget(), m.LimitsSnapshot()),
        # Rate windows: every message is counted first, a refusal too; the run is untouched.
        (RUNNING, RATES, machine.CountRate("acme", "u", "m1", RATES), None),
        (REFUSING, RATES, machine.CountRate("acme", "u", "m1", RATES), None),
    ],
)
def test_a_proposed_run_is_counted_in_its_windows_first_then_held_in_its_budgets(
    run: core.RunState,
    limits: m.Limits,
    next_: object,
    snapshot: m.LimitsSnapshot | None,
) -> None:
    done = machine.admit_limits(run, machine.Proposed(), rules(limits), NOW)
    assert (done.next, done.effects) == (next_, ())
    assert done.run == msgspec.structs.replace(run, limits=snapshot)


@pytest.mark.parametrize(("run", "next_"), [(RUNNING, machine.ReserveBudget()), (REFUSING, None)])
def test_an_allowed_message_keeps_its_counts_and_only_an_approval_goes_on(
    run: core.RunState, next_: object
) -> None:
    counted = machine.RateCounted(True, counts=COUNTED)
    done = machine.admit_limits(run, counted, rules(RATES), NOW)
    assert (done.next, done.effects) == (next_, ())
    assert done.run == msgspec.structs.replace(run, limits=WITH_COUNTS)


@pytest.mark.parametrize("run", [RUNNING, REFUSING])
def test_a_message_over_a_rate_window_is_refused_with_the_window_counted(
    run: core.RunState,
) -> None:
    full = machine.RateCounted(False, "m", 2, 17, {"m": 3})
    done = machine.admit_limits(run, full, rules(RATES), NOW)
    reason, text = budget.rate_refusal("m", 2, 17, NOW)
    snapshot = m.LimitsSnapshot(limits=RATES, user_messages_minute=3)
    assert done.run == msgspec.structs.replace(core.stop(run, reason, text), limits=snapshot)
    assert (done.next, done.effects) == (None, (machine.Count("rate_limited", "m"),))
    assert (done.run.status, done.run.verdict) == ("refused", "stop")


def test_no_cap_and_no_concurrency_limit_leaves_the_run_as_it_is() -> None:
    run = msgspec.structs.replace(RUNNING, limits=WITH_COUNTS)
    done = machine.admit_limits(run, machine.Reserved(), rules(RATES), NOW)
    assert done == machine.Admission(run)


@pytest.mark.parametrize(
    ("planned", "model", "verdict", "suffix"),
    [
        (plan(), "big", "approve", ""),
        (
            plan(model="small", downgraded=True),
            "small",
            "downgrade",
            "; past 80% of a daily cap: small",
        ),
    ],
)
def test_a_run_that_fits_holds_its_reservation_on_the_planned_model(
    planned: budget.Plan, model: str, verdict: str, suffix: str
) -> None:
    run = msgspec.structs.replace(RUNNING, limits=WITH_COUNTS)
    r = rules(CAPS, downgrade_at=0.8, downgrade_model="small")
    done = machine.admit_limits(run, machine.Reserved(planned, HOLD), r, NOW)
    assert (done.next, done.effects) == (None, ())
    # The budgets' snapshot, with the message counts of the rate windows.
    snapshot = msgspec.structs.replace(
        planned.snapshot, user_messages_minute=1, user_messages_hour=4
    )
    assert done.run == msgspec.structs.replace(
        run,
        model=model,
        prices=PRICES[model],
        verdict=verdict,
        reason=run.reason + suffix,
        reservation=HOLD,
        limits=snapshot,
    )


@pytest.mark.parametrize(
    ("scope", "refusal"),
    [
        ("project_tokens", budget.budget_refusal("project_tokens", NOW)),
        ("user_cost", budget.budget_refusal("user_cost", NOW)),
        ("concurrency", budget.concurrency_refusal(3)),
    ],
)
def test_a_run_that_does_not_fit_is_refused_with_the_exhausted_scope_counted(
    scope: budget.Scope, refusal: tuple[str, str]
) -> None:
    done = machine.admit_limits(RUNNING, machine.Reserved(plan(False, scope)), rules(CAPS), NOW)
    snapshot = plan(False, scope).snapshot
    assert done.run == msgspec.structs.replace(core.stop(RUNNING, *refusal), limits=snapshot)
    assert (done.next, done.effects) == (None, (machine.Count("exhausted", scope),))


def test_the_steps_in_a_row_end_where_one_pass_of_the_old_rules_ended() -> None:
    """Proposed -> counted -> reserved: the counting the interpreter does between the steps."""
    r = rules(m.Limits(user_messages_per_minute=2, project_daily_tokens=10_000))
    done = machine.admit_limits(RUNNING, machine.Proposed(), r, NOW)
    assert isinstance(done.next, machine.CountRate)
    done = machine.admit_limits(done.run, machine.RateCounted(True, counts={"m": 1}), r, NOW)
    assert done.next == machine.ReserveBudget()
    done = machine.admit_limits(done.run, machine.Reserved(plan(), HOLD), r, NOW)
    assert done.next is None
    assert done.run.reservation == HOLD
    assert done.run.limits is not None and done.run.limits.user_messages_minute == 1

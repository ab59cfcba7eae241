"""Reservation math: holds fit under caps, repeat by run id is a no-op, settling happens once."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.policy import budget
from services.policy.budget import Counter, Hold
from shared import messages as m

PRICES = {
    "big": m.Prices(input=3.0, output=15.0),
    "small": m.Prices(input=1.0, output=5.0),
}
NOW = datetime(2026, 11, 22, 21, 30, tzinfo=UTC)


def _plan(
    limits: m.Limits,
    project: Counter,
    user: Counter | None = None,
    active: int = 0,
    run_id: str = "r1",
    downgrade_at: float | None = None,
) -> budget.Plan:
    return budget.plan(
        run_id, limits, project, user or Counter(), active, "big", "small", downgrade_at,
        PRICES, 1000, 500, "20261122",
    )  # fmt: skip


def test_an_estimate_is_the_input_allowance_plus_the_whole_output_cap() -> None:
    est = budget.estimate(1000, 500, PRICES["big"])
    assert est.tokens == 1500
    assert est.cost_usd == pytest.approx((1000 * 3.0 + 500 * 15.0) / 1e6)


def test_reserving_fills_the_cap_exactly_and_never_past_it() -> None:
    c = Counter()
    fitted = 0
    for i in range(10):
        new, fits = budget.reserve(c, f"r{i}", Hold(100, 0.0), 450, None)
        if new is not None:
            c = new
        fitted += fits
    assert fitted == 4 and c.tokens() == 400


def test_reserving_the_same_run_again_changes_nothing() -> None:
    c, _ = budget.reserve(Counter(), "r1", Hold(100, 1.0), 150, None)
    assert c is not None
    assert budget.reserve(c, "r1", Hold(100, 1.0), 150, None) == (None, True)
    assert c.tokens() == 100


def test_settling_replaces_the_hold_by_real_usage_once() -> None:
    c, _ = budget.reserve(Counter(), "r1", Hold(1500, 0.01), None, None)
    assert c is not None
    settled = budget.settle(c, "r1", 120, 0.001)
    assert settled is not None
    assert (settled.tokens(), settled.open, settled.settled_runs) == (120, {}, 1)
    assert budget.settle(settled, "r1", 120, 0.001) is None  # a second settle is a no-op
    assert budget.drop(settled, "r1") is None


def test_a_dropped_hold_counts_nothing() -> None:
    c, _ = budget.reserve(Counter(settled_tokens=7), "r1", Hold(100, 1.0), None, None)
    assert c is not None
    dropped = budget.drop(c, "r1")
    assert dropped is not None and dropped.tokens() == 7 and dropped.settled_runs == 0


def test_a_late_charge_counts_each_call_once_and_never_a_negative_or_nan() -> None:
    c = Counter(settled_tokens=7, settled_runs=1)
    charged = budget.charge(c, "task:r1:1#1", 100, 0.5)
    assert charged is not None
    assert (charged.tokens(), charged.settled_cost_usd, charged.settled_runs) == (107, 0.5, 1)
    assert budget.charge(charged, "task:r1:1#1", 100, 0.5) is None  # again: nothing
    other = budget.charge(charged, "task:r1:1#2", -5, float("nan"))
    assert other is not None and (other.tokens(), other.settled_cost_usd) == (107, 0.5)


@pytest.mark.parametrize(
    ("limits", "project", "user", "scope"),
    [
        (m.Limits(project_daily_tokens=2000), Counter(settled_tokens=600), None, "project_tokens"),
        (m.Limits(project_daily_tokens=2100), Counter(settled_tokens=600), None, ""),
        (m.Limits(project_daily_cost_usd=0.011), Counter(settled_cost_usd=0.0), None, ""),
        (m.Limits(project_daily_cost_usd=0.011), Counter(settled_cost_usd=0.005), None,
         "project_cost"),
        (m.Limits(user_daily_tokens=1499), Counter(), Counter(), "user_tokens"),
        (m.Limits(user_daily_cost_usd=0.0), Counter(), Counter(), "user_cost"),
    ],
)  # fmt: skip
def test_plan_names_the_exhausted_scope(
    limits: m.Limits, project: Counter, user: Counter | None, scope: str
) -> None:
    p = _plan(limits, project, user)
    assert (p.fits, p.scope) == (scope == "", scope)


def test_plan_counts_open_holds_and_keeps_an_earlier_hold_of_the_same_run() -> None:
    held = Counter(open={"r1": Hold(1500, 0.0)})
    limits = m.Limits(project_daily_tokens=1500)
    assert _plan(limits, held, run_id="r2").scope == "project_tokens"
    again = _plan(limits, held, run_id="r1")
    assert again.fits and again.estimate.tokens == 1500


def test_past_the_downgrade_fraction_the_cheaper_model_is_chosen_and_costed() -> None:
    limits = m.Limits(project_daily_tokens=100_000)
    below = _plan(limits, Counter(settled_tokens=79_000), downgrade_at=0.8)
    past = _plan(limits, Counter(settled_tokens=80_000), downgrade_at=0.8)
    assert (below.model, below.downgraded) == ("big", False)
    assert (past.model, past.downgraded) == ("small", True)
    assert past.estimate.cost_usd < below.estimate.cost_usd


def test_runs_in_flight_stop_at_the_limit_and_leaked_slots_expire() -> None:
    assert _plan(m.Limits(max_concurrent_runs=2), Counter(), active=2).scope == "concurrency"
    c = Counter()
    for i in range(2):
        new, fits = budget.admit_active(c, f"r{i}", 2, now=100.0, expire_s=50)
        assert fits and new is not None
        c = new
    assert budget.admit_active(c, "r9", 2, now=120.0, expire_s=50)[1] is False
    assert budget.admit_active(c, "r0", 2, now=120.0, expire_s=50) == (None, True)
    later, fits = budget.admit_active(c, "r9", 2, now=200.0, expire_s=50)
    assert fits and later is not None and list(later.open) == ["r9"]


def test_a_rate_window_counts_each_message_once_and_refuses_past_the_limit() -> None:
    w, ok, n = budget.count_message(None, "a", 60, 60, 2)
    assert ok and n == 1 and w is not None
    assert budget.count_message(w, "a", 60, 60, 2) == (None, True, 1)  # redelivery
    w2, ok, n = budget.count_message(w, "b", 60, 60, 2)
    assert ok and n == 2 and w2 is not None and w2.full
    assert budget.count_message(w2, "c", 60, 60, 2) == (None, False, 2)
    fresh, ok, n = budget.count_message(w2, "c", 120, 60, 2)  # the next window
    assert ok and n == 1 and fresh is not None and fresh.start == 120


def test_refusals_say_why_and_when_the_limit_resets() -> None:
    reason, text = budget.budget_refusal("user_tokens", NOW)
    assert "resets at 00:00 UTC (in 2 h 30 min)" in text and "daily token" in text
    assert "2026-11-23 00:00 UTC" in reason
    _, text = budget.rate_refusal("m", 20, 30, NOW)
    assert "20 per minute" in text and "21:30:30 UTC (in 30 s)" in text
    assert budget.day_of(datetime(2026, 11, 22, 23, 59, tzinfo=UTC)) == "20261122"


def test_a_run_over_a_cost_cap_is_downgraded_when_the_cheaper_model_fits() -> None:
    limits = m.Limits(project_daily_cost_usd=0.005)  # big costs 0.0105, small 0.0035
    fits_cheaper = _plan(limits, Counter(), downgrade_at=0.8)
    assert (fits_cheaper.fits, fits_cheaper.model, fits_cheaper.downgraded) == (True, "small", True)
    without_rule = _plan(limits, Counter())
    assert (without_rule.fits, without_rule.scope) == (False, "project_cost")
    too_full = _plan(limits, Counter(settled_cost_usd=0.002), downgrade_at=0.8)
    assert (too_full.fits, too_full.scope) == (False, "project_cost")

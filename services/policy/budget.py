"""Pure reservation math: daily budgets, runs in flight and rate windows, as values (no I/O).

A counter holds what was settled today and the *open* holds of runs not finished yet, keyed by
run id; a rate window holds the ids of the messages it counted. Ids make every change
idempotent: reserving a run twice, settling it twice or counting a redelivered message twice
changes nothing, whichever replica does it.
"""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime, timedelta

import msgspec

from shared import messages as m
from shared.ratelimit import RateWindow

Scope = str  # "project_tokens", "project_cost", "user_tokens", "user_cost", "concurrency", …


class Hold(msgspec.Struct, array_like=True, frozen=True):
    """What one open run holds of a counter (and since when, to expire leaked holds)."""

    tokens: int
    cost_usd: float
    at: float = 0.0


class Counter(msgspec.Struct, kw_only=True):
    """One KV counter: a UTC day's budget of a project or user, or a project's runs in flight."""

    settled_tokens: int = 0
    settled_cost_usd: float = 0.0
    settled_runs: int = 0
    open: dict[str, Hold] = msgspec.field(default_factory=dict)
    # Calls charged after their run settled (hashes of their call ids, the newest ``LATE_KEPT``):
    # each counts once. The run's record keeps the calls charged for it too, so this list only
    # has to span a crash between a charge and that write, or two deliveries of one timer.
    late: list[str] = msgspec.field(default_factory=list)

    def tokens(self) -> int:
        return self.settled_tokens + sum(h.tokens for h in self.open.values())

    def cost(self) -> float:
        return self.settled_cost_usd + sum(h.cost_usd for h in self.open.values())


class Estimate(msgspec.Struct, frozen=True):
    tokens: int
    cost_usd: float


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    """What the budgets allow for one run: a model and a hold, or the scope that is exhausted."""

    fits: bool
    scope: Scope = ""
    model: str = ""
    downgraded: bool = False
    estimate: Estimate = Estimate(0, 0.0)
    snapshot: m.LimitsSnapshot = m.LimitsSnapshot()


def day_of(now: datetime) -> str:
    """The UTC day a budget counts (``YYYYMMDD``)."""
    return now.astimezone(UTC).strftime("%Y%m%d")


def next_reset(now: datetime) -> datetime:
    """When the daily caps reset: the next 00:00 UTC."""
    today = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today + timedelta(days=1)


def estimate(input_tokens: int, max_tokens: int, prices: m.Prices) -> Estimate:
    """The most a run is expected to use: the input allowance plus its whole output cap."""
    usage = m.Usage(input_tokens=input_tokens, output_tokens=max_tokens)
    return Estimate(input_tokens + max_tokens, usage.cost_usd(prices))


def total_tokens(u: m.Usage) -> int:
    return u.input_tokens + u.output_tokens + u.cache_read_tokens + u.cache_write_tokens


def has_budget(limits: m.Limits) -> bool:
    """Whether any daily cap applies (without one, runs are not counted in the bucket)."""
    return any(
        v is not None
        for v in (
            limits.project_daily_tokens,
            limits.project_daily_cost_usd,
            limits.user_daily_tokens,
            limits.user_daily_cost_usd,
        )
    )


def _over(used: float, extra: float, cap: float | None) -> bool:
    return cap is not None and used + extra > cap


def _fraction(used: float, cap: float | None) -> float:
    if cap is None:
        return 0.0
    return 1.0 if cap <= 0 else used / cap


def plan(
    run_id: str,
    limits: m.Limits,
    project: Counter,
    user: Counter,
    active: int,
    model: str,
    cheaper: str | None,
    downgrade_at: float | None,
    prices: dict[str, m.Prices],
    input_tokens: int,
    max_tokens: int,
    day: str,
) -> Plan:
    """Choose the model (downgrade past ``downgrade_at`` of a cap) and check that the run fits."""
    snapshot = m.LimitsSnapshot(
        limits=limits,
        day=f"{day[:4]}-{day[4:6]}-{day[6:]}",
        project_tokens_used=project.tokens(),
        project_cost_used_usd=round(project.cost(), 6),
        user_tokens_used=user.tokens(),
        user_cost_used_usd=round(user.cost(), 6),
        concurrent_runs=active,
    )
    used = max(
        _fraction(project.tokens(), limits.project_daily_tokens),
        _fraction(project.cost(), limits.project_daily_cost_usd),
        _fraction(user.tokens(), limits.user_daily_tokens),
        _fraction(user.cost(), limits.user_daily_cost_usd),
    )
    downgraded = (
        downgrade_at is not None
        and cheaper is not None
        and cheaper != model
        and cheaper in prices
        and used >= downgrade_at
    )
    chosen = cheaper if downgraded and cheaper is not None else model
    est = estimate(input_tokens, max_tokens, prices.get(chosen, m.Prices()))
    held = project.open.get(run_id)
    if held is not None:  # reserved by an earlier delivery: it still holds, never twice
        return Plan(
            fits=True,
            model=chosen,
            downgraded=downgraded,
            estimate=Estimate(held.tokens, held.cost_usd),
            snapshot=snapshot,
        )
    base = Plan(fits=True, model=chosen, downgraded=downgraded, estimate=est, snapshot=snapshot)
    scope = exhausted(limits, project, user, est)
    if scope and downgrade_at is not None and cheaper in prices and cheaper != chosen:
        # A cost cap the model does not fit under may still fit the cheaper tier.
        assert cheaper is not None
        cheap = estimate(input_tokens, max_tokens, prices[cheaper])
        if not exhausted(limits, project, user, cheap):
            return Plan(
                fits=True, model=cheaper, downgraded=True, estimate=cheap, snapshot=snapshot
            )
    if scope:
        return msgspec.structs.replace(base, fits=False, scope=scope)
    if limits.max_concurrent_runs is not None and active >= limits.max_concurrent_runs:
        return msgspec.structs.replace(base, fits=False, scope="concurrency")
    return base


def exhausted(limits: m.Limits, project: Counter, user: Counter, est: Estimate) -> Scope:
    """The first cap the estimate does not fit under, or an empty string."""
    if _over(project.tokens(), est.tokens, limits.project_daily_tokens):
        return "project_tokens"
    if _over(project.cost(), est.cost_usd, limits.project_daily_cost_usd):
        return "project_cost"
    if _over(user.tokens(), est.tokens, limits.user_daily_tokens):
        return "user_tokens"
    if _over(user.cost(), est.cost_usd, limits.user_daily_cost_usd):
        return "user_cost"
    return ""


def reserve(
    c: Counter, run_id: str, hold: Hold, cap_tokens: int | None, cap_cost: float | None
) -> tuple[Counter | None, bool]:
    """Add the run's hold if it fits: (changed counter or None, fits). Idempotent by run id."""
    if run_id in c.open:
        return None, True
    if _over(c.tokens(), hold.tokens, cap_tokens) or _over(c.cost(), hold.cost_usd, cap_cost):
        return None, False
    return msgspec.structs.replace(c, open={**c.open, run_id: hold}), True


def admit_active(
    c: Counter, run_id: str, limit: int | None, now: float, expire_s: float
) -> tuple[Counter | None, bool]:
    """Take a slot of the project's runs in flight; holds older than ``expire_s`` were leaked."""
    if run_id in c.open:
        return None, True
    live = {k: h for k, h in c.open.items() if now - h.at < expire_s}
    if limit is not None and len(live) >= limit:
        return (msgspec.structs.replace(c, open=live) if len(live) < len(c.open) else None), False
    return msgspec.structs.replace(c, open={**live, run_id: Hold(0, 0.0, now)}), True


def settle(c: Counter, run_id: str, tokens: int, cost_usd: float) -> Counter | None:
    """Replace the run's hold by what it really used; None when it was settled already."""
    if run_id not in c.open:
        return None
    rest = {k: h for k, h in c.open.items() if k != run_id}
    return msgspec.structs.replace(
        c,
        open=rest,
        settled_tokens=c.settled_tokens + tokens,
        settled_cost_usd=c.settled_cost_usd + cost_usd,
        settled_runs=c.settled_runs + 1,
    )


# About 35 bytes each in the counter's JSON: at most ~35 KB, far below a KV value's limit.
LATE_KEPT = 1000


def charge(c: Counter, call_id: str, tokens: int, cost_usd: float) -> Counter | None:
    """Count a call its run's settlement could not include (billed after it, by estimate);
    None when this call was charged already."""
    mark = hashlib.sha256(call_id.encode()).hexdigest()[:32]
    if mark in c.late:
        return None
    return msgspec.structs.replace(
        c,
        settled_tokens=c.settled_tokens + max(0, tokens),
        settled_cost_usd=c.settled_cost_usd
        + (cost_usd if math.isfinite(cost_usd) and cost_usd > 0 else 0.0),
        late=[*c.late[-(LATE_KEPT - 1) :], mark],
    )


def drop(c: Counter, run_id: str) -> Counter | None:
    """Take the run's hold back uncounted (its run was stopped, or left the runs in flight)."""
    if run_id not in c.open:
        return None
    return msgspec.structs.replace(c, open={k: h for k, h in c.open.items() if k != run_id})


def count_message(
    w: RateWindow | None, message_id: str, start: int, length: int, limit: int
) -> tuple[RateWindow | None, bool, int]:
    """Count a message in its window: (changed window or None, allowed, count after)."""
    if w is None or w.start != start:
        w = RateWindow(start=start, length=length, limit=limit)
        changed = True
    else:
        changed = w.limit != limit
        w = msgspec.structs.replace(w, limit=limit, ids=list(w.ids))
    if message_id in w.ids:
        return (w if changed else None), True, len(w.ids)
    if len(w.ids) >= limit:
        return (w if changed else None), False, len(w.ids)
    w.ids.append(message_id)
    return w, True, len(w.ids)


# ---- what the user reads when a limit stops a message ---------------------------------------

SCOPE_TEXT: dict[str, str] = {
    "project_tokens": "this project has used its daily token allowance",
    "project_cost": "this project has used its daily spending allowance",
    "user_tokens": "you have used your daily token allowance",
    "user_cost": "you have used your daily spending allowance",
}


def _in(seconds: float) -> str:
    s = max(1, int(seconds + 0.999))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


def budget_refusal(scope: Scope, now: datetime) -> tuple[str, str]:
    """(reason for the record, reply for the user) when a daily cap stops a message."""
    reset = next_reset(now)
    why = SCOPE_TEXT.get(scope, "a daily limit was reached")
    reason = f"daily cap reached ({scope}); resets at {reset:%Y-%m-%d} 00:00 UTC"
    text = (
        f"I can't answer this right now: {why}. "
        f"The limit resets at 00:00 UTC (in {_in((reset - now).total_seconds())})."
    )
    return reason, text


def concurrency_refusal(limit: int) -> tuple[str, str]:
    reason = f"max concurrent runs reached ({limit})"
    text = (
        f"I can't answer this right now: this project already has {limit} answers in progress, "
        "its limit. Please send it again in a moment, when one of them has finished."
    )
    return reason, text


def rate_refusal(window: str, limit: int, retry_after_s: int, now: datetime) -> tuple[str, str]:
    per = {"m": "minute", "h": "hour"}[window]
    at = now.astimezone(UTC) + timedelta(seconds=retry_after_s)
    reason = f"rate limit: {limit} messages per {per}; retry after {at:%H:%M:%S} UTC"
    text = (
        f"You are sending messages faster than allowed ({limit} per {per}). "
        f"Please try again after {at:%H:%M:%S} UTC (in {_in(retry_after_s)})."
    )
    return reason, text

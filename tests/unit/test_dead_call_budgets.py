"""Dead calls in the day budgets (docs/decisions.md, "Dead calls in the day budgets"): each call
a settle timer or a later delivery billed by estimate counts once — in its run's settlement if
policy knew it before the run settled (and the persister's sum did not hold it), else charged on
its own — whatever order the timer, the cancel, the failure and the stored reply come in."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from services.policy import budget, core, machine
from shared import messages as m

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
PRICES = m.Prices(input=1.0, output=5.0)
RULES = core.Rules(default_model="small", models={"small": PRICES})
IDS = {"message_id": "m1", "conversation_id": "c1", "project_id": "acme"}
RUN = core.run_id_for("m1")
KEYS = ("budget.20250102.p.acme", "budget.20250102.u.acme.u", "runs.acme")
STARTED = core.ConvState(conversation_id="c1", active=RUN, started=True, next_position=2)
DEAD = m.EstimatedCall(call_id=f"task:{RUN}:1#1", usage=m.Usage(input_tokens=700, output_tokens=3))
DEAD_TOKENS = 703
DEAD_COST = DEAD.usage.cost_usd(PRICES)


def running() -> core.RunState:
    d = m.Decision(
        intent="question", complexity="low", action="answer", executor="chat", estimated_tokens=300
    )
    e = m.AgentDecision(event_id="d1", **IDS, user_id="u", decision=d, position=1)
    run = core.decide(e, RULES, NOW)
    hold = core.Reservation(keys=KEYS, tokens=100)
    return msgspec.structs.replace(run, reservation=hold)


def settle_timer(run: core.RunState, attempt: int = 1) -> m.RunDeadline:
    return machine.settle_timer(msgspec.structs.replace(run, attempt=attempt), RULES, NOW).events[
        0
    ][1]  # type: ignore[return-value]


def billed(run: core.RunState, *calls: m.EstimatedCall) -> machine.Step:
    return machine.step(
        run, STARTED, machine.DeadCallsBilled(settle_timer(run), calls or (DEAD,)), RULES, NOW
    )


def reply(run: core.RunState, calls: tuple[str, ...] | None) -> m.AssistantMessagePersisted:
    return m.AssistantMessagePersisted(
        event_id="p1", **IDS, run_id=run.run_id, reply_to="m1", kind="answer", content="hi",
        created_at=NOW, status="completed", usage=m.Usage(input_tokens=10, output_tokens=20),
        cost_usd=0.01, calls=calls,
    )  # fmt: skip


def cancelled_failure(run: core.RunState, *estimated: m.EstimatedCall) -> m.ExecFailed:
    return m.ExecFailed(
        event_id="f1", **IDS, task_id=f"task:{RUN}:1", call_id=f"task:{RUN}:1#2", run_id=RUN,
        attempt=run.attempt, model=run.model, error_class="cancelled", error="stopped",
        usage=m.Usage(output_tokens=7), prices=PRICES, estimated=estimated,
    )  # fmt: skip


def settles(step: machine.Step) -> list[tuple[int, float]]:
    return [(e.tokens, e.cost_usd) for e in step.effects if isinstance(e, machine.Settle)]


def charges(step: machine.Step) -> list[machine.Charge]:
    return [e for e in step.effects if isinstance(e, machine.Charge)]


def cancel(run: core.RunState) -> machine.Step:
    return machine.step(run, STARTED, machine.Cancel("cancel:u", "by the user", "user"), RULES, NOW)


def test_a_dead_call_known_before_a_cancel_is_counted_in_the_cancels_settlement() -> None:
    # Attempt 1 missed its deadline; its timer fires while attempt 2 runs; then the user cancels.
    kept = billed(running())
    assert kept.outcome == "kept:1" and charges(kept) == []
    assert kept.run is not None and kept.run.dead == (
        core.DeadCall(DEAD.call_id, DEAD_TOKENS, DEAD_COST),
    )
    cancelling = cancel(kept.run).run
    assert cancelling is not None and isinstance(cancelling.phase, machine.Cancelling)
    done = machine.step(
        cancelling, STARTED, machine.Failed(cancelled_failure(cancelling)), RULES, NOW
    )
    own = (7, m.Usage(output_tokens=7).cost_usd(PRICES))
    assert settles(done) == [own]
    assert charges(done) == [machine.Charge(KEYS[:2], DEAD.call_id, DEAD_TOKENS, DEAD_COST)]
    assert done.run is not None and done.run.reservation is not None
    assert done.run.reservation.actual_tokens == own[0] + DEAD_TOKENS


def test_a_dead_call_found_after_a_cancel_settled_is_charged_once() -> None:
    run = running()
    cancelled = cancel(msgspec.structs.replace(run, phase=machine.Backoff(NOW))).run
    assert cancelled is not None and cancelled.status == "cancelled"
    assert cancelled.reservation is not None and cancelled.reservation.settled
    first = billed(cancelled)
    [charge] = charges(first)
    assert (charge.keys, charge.call_id, charge.tokens) == (KEYS[:2], DEAD.call_id, DEAD_TOKENS)
    assert charge.cost_usd == pytest.approx(DEAD_COST)
    assert first.run is not None and [c.call_id for c in first.run.dead] == [DEAD.call_id]
    # The timer again (a redelivery), after the record was written: nothing more.
    assert billed(first.run) == machine.Step(outcome="unchanged")


def test_a_cancel_failure_carrying_earlier_deliveries_dead_calls_settles_with_them() -> None:
    cancelling = cancel(running()).run
    assert cancelling is not None and isinstance(cancelling.phase, machine.Cancelling)
    done = machine.step(
        cancelling, STARTED, machine.Failed(cancelled_failure(cancelling, DEAD)), RULES, NOW
    )
    assert [t for t, _ in settles(done)] == [7]
    assert [(c.call_id, c.tokens) for c in charges(done)] == [(DEAD.call_id, DEAD_TOKENS)]
    # Its settle timer finds the same call later: known, so not charged again.
    assert done.run is not None and billed(done.run) == machine.Step(outcome="unchanged")


@pytest.mark.parametrize(
    ("summed", "added"),
    [
        ((f"task:{RUN}:2#1",), DEAD_TOKENS),  # the sum does not hold the dead call: added
        ((f"task:{RUN}:2#1", DEAD.call_id), 0),  # its estimate row was in the sum already
        (None, 0),  # an older persister did not say what it summed: nothing added
    ],
)
def test_a_reply_settles_with_the_dead_calls_its_sum_does_not_hold(
    summed: tuple[str, ...] | None, added: int
) -> None:
    kept = billed(running()).run
    assert kept is not None
    done = machine.step(kept, STARTED, machine.ReplyStored(reply(kept, summed)), RULES, NOW)
    assert [t for t, _ in settles(done)] == [30]
    assert sum(c.tokens for c in charges(done)) == added
    assert done.run is not None and done.run.summed == summed


@pytest.mark.parametrize(
    ("summed", "outcome", "charged"),
    [
        ((f"task:{RUN}:2#1",), "charged:1", True),
        ((f"task:{RUN}:2#1", DEAD.call_id), "unchanged", False),
        (None, "unknown", False),
    ],
)
def test_a_dead_call_found_after_the_reply_settled_is_charged_unless_its_sum_held_it(
    summed: tuple[str, ...] | None, outcome: str, charged: bool
) -> None:
    # The deadline failed the run outright; its failure notice was stored (and settled) first.
    run = running()
    done = machine.step(run, STARTED, machine.ReplyStored(reply(run, summed)), RULES, NOW).run
    assert done is not None and done.reservation is not None and done.reservation.settled
    after = billed(done)
    assert after.outcome == outcome
    assert bool(charges(after)) == charged


def test_a_settlement_stepped_again_after_a_conflict_still_counts_a_call_kept_meanwhile() -> None:
    # Replica B settles a stored reply (its Settle is carried out before its write); replica A's
    # settle timer keeps a dead call in the record first; B's write conflicts, B steps again on
    # the new record. The counters took B's first Settle and take no second one (the run's hold
    # is gone): the kept call must still reach them, once, whichever step carries it.
    run = running()
    counter = budget.Counter(open={RUN: budget.Hold(100, 0.0)})

    def carry_out(step: machine.Step) -> None:
        nonlocal counter
        for e in step.effects:
            if isinstance(e, machine.Settle):
                counter = budget.settle(counter, e.run_id, e.tokens, e.cost_usd) or counter
            elif isinstance(e, machine.Charge):
                counter = budget.charge(counter, e.call_id, e.tokens, e.cost_usd) or counter

    stored = machine.ReplyStored(reply(run, (f"task:{RUN}:2#1",)))
    carry_out(machine.step(run, STARTED, stored, RULES, NOW))  # B, before its write fails
    kept = billed(run)  # A wins the write
    assert kept.run is not None and charges(kept) == []
    again = machine.step(kept.run, STARTED, stored, RULES, NOW)  # B again, on A's record
    carry_out(again)
    carry_out(again)  # and once more (a crash before the write): nothing twice
    assert counter.settled_tokens == 30 + DEAD_TOKENS and counter.settled_runs == 1
    assert RUN not in counter.open


def test_a_run_holding_no_budget_keeps_its_dead_calls_and_charges_nothing() -> None:
    run = msgspec.structs.replace(running(), reservation=None)
    after = billed(run)
    assert after.outcome == "kept:1" and charges(after) == []


def test_poisoned_usage_of_a_dead_call_counts_as_nothing() -> None:
    bad = m.EstimatedCall(call_id="x#1", usage=m.Usage(input_tokens=-5))
    kept = billed(running(), bad).run
    assert kept is not None and kept.dead == (core.DeadCall("x#1", 0, 0.0),)


def test_a_counter_keeps_the_newest_charged_calls_only() -> None:
    c = budget.Counter()
    for i in range(budget.LATE_KEPT + 5):
        nxt = budget.charge(c, f"call-{i}", 1, 0.0)
        assert nxt is not None
        c = nxt
    assert len(c.late) == budget.LATE_KEPT and c.settled_tokens == budget.LATE_KEPT + 5
    assert budget.charge(c, f"call-{budget.LATE_KEPT + 4}", 1, 0.0) is None  # the newest: kept
    assert budget.charge(c, "call-0", 1, 0.0) is not None  # the oldest fell out


def test_a_stored_run_with_dead_calls_reads_back_the_same() -> None:
    kept = billed(running()).run
    assert kept is not None
    kept = msgspec.structs.replace(kept, summed=("a", "b"))
    assert core.decode_run(core.encode_run(kept)) == kept


def test_a_run_stored_before_dead_calls_were_kept_reads_with_none() -> None:
    old = msgspec.json.decode(core.encode_run(running()))
    assert "dead" in old and "summed" in old
    del old["dead"], old["summed"]
    run = core.decode_run(msgspec.json.encode(old))
    assert (run.dead, run.summed) == ((), None)

"""The stored run record: it carries its phase, its status is read from it, and a record of the
previous version (flags, no phase) reads as the same phase and steps on (a rolling deploy)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from services.policy import core, machine
from services.policy.phase import Backoff, Cancelling, Done, Phase, Running, Tools, status_of
from shared import messages as m
from tests.unit import test_policy_machine as tm
from tests.unit import test_policy_tool_phase as tt

# Written by the previous version (flags, no ``phase``): attempt 2 waits for its backoff.
OLD_BACKOFF = b"""{"run_id":"run-m1","message_id":"m1","conversation_id":"c1","project_id":"acme",
"user_id":"u","status":"running","verdict":"approve",
"reason":"retry in 1s after overloaded on attempt 1","model":"small","executor":"chat",
"attempt":2,"max_tokens":600,"estimated_tokens":300,
"prices":{"input":1.0,"output":5.0,"cache_read":0.0,"cache_write":0.0},"deadline":null,
"reply_kind":null,"reply_text":"","position":1,"trace_context":{},"reservation":null,
"limits":null,"cancel_requested":false,"retry_at":"2025-01-02T03:04:06Z","out_of_turn":false,
"cause":"f1","usage":{"input_tokens":0,"output_tokens":7,"cache_read_tokens":0,
"cache_write_tokens":0},"cost_usd":0.0,"limited":false,"classification":{"input_tokens":0,
"output_tokens":0,"cache_read_tokens":0,"cache_write_tokens":0},"classification_cost_usd":0.0,
"round":0,"attempts_before":0,"calls":[],"approval_due":null}"""

# Also the previous version's: round 0 asked for two tools, one waits for the user's approval.
OLD_WAITING = b"""{"run_id":"run-m1","message_id":"m1","conversation_id":"c1","project_id":"acme",
"user_id":"u","status":"requires_action","verdict":"approve",
"reason":"round 0: 2 tool call(s), 1 waiting for approval","model":"small","executor":"chat",
"attempt":1,"max_tokens":600,"estimated_tokens":300,
"prices":{"input":1.0,"output":5.0,"cache_read":0.0,"cache_write":0.0},"deadline":null,
"reply_kind":null,"reply_text":"","position":1,"trace_context":{},"reservation":null,
"limits":null,"cancel_requested":false,"retry_at":null,"out_of_turn":false,
"cause":"persisted:toolturn:run-m1:0","usage":{"input_tokens":0,"output_tokens":9,
"cache_read_tokens":0,"cache_write_tokens":0},"cost_usd":0.000045,"limited":false,
"classification":{"input_tokens":0,"output_tokens":0,"cache_read_tokens":0,
"cache_write_tokens":0},"classification_cost_usd":0.0,"round":0,"attempts_before":0,
"calls":[{"call":{"id":"toolu_create_task","name":"create_task","input":{"title":"call John"},
"input_digest":"6f4a421444b50c9cea16ad3b074228492b47102b9ff9c9130a9a031469b08d91"},
"server":"demo","decision":"ask","reason":"","requested_at":"2025-01-02T03:04:05Z",
"answered_by":"","done":false},{"call":{"id":"toolu_calculator","name":"calculator",
"input":{"x":1},
"input_digest":"5041bf1f713df204784353e82f6a4a535931cb64f1f4b4a5aeaffcb720918b22"},
"server":"demo","decision":"auto","reason":"","requested_at":null,"answered_by":"",
"done":false}],"approval_due":"2025-01-02T03:05:05Z"}"""

RETRY_AT = datetime(2025, 1, 2, 3, 4, 6, tzinfo=UTC)
WAITING_CALLS = tt.WAITING.calls
DEADLINE = datetime(2025, 1, 2, 3, 9, 5, tzinfo=UTC)


def old(raw: bytes, **flags: Any) -> bytes:
    """A record of the previous version with some of its fields changed."""
    return json.dumps({**json.loads(raw), **flags}).encode()


@pytest.mark.parametrize(
    ("raw", "phase"),
    [
        (OLD_BACKOFF, Backoff(RETRY_AT)),
        (old(OLD_BACKOFF, retry_at=None, deadline=DEADLINE.isoformat()), Running(DEADLINE)),
        (old(OLD_BACKOFF, retry_at=None, cancel_requested=True), Cancelling()),
        (old(OLD_BACKOFF, status="failed"), Done("failed")),
        (old(OLD_BACKOFF, status="cancelled", out_of_turn=True), Done("cancelled", skipped=True)),
        (old(OLD_BACKOFF, status="refused", limited=True), Done("refused", limited=True)),
        # Ended during its tool round (an approval timeout): the round's calls stay with it.
        (old(OLD_WAITING, status="failed", approval_due=None), Done("failed", calls=WAITING_CALLS)),
    ],
)
def test_a_record_of_the_previous_version_reads_as_the_phase_its_flags_meant(
    raw: bytes, phase: Phase
) -> None:
    run = core.decode_run(raw)
    assert run.phase == phase
    assert run.status == json.loads(raw)["status"]


def test_a_tool_round_of_the_previous_version_reads_with_its_calls() -> None:
    run = core.decode_run(OLD_WAITING)
    assert isinstance(run.phase, Tools)
    assert run.phase.waiting == ("toolu_create_task",)
    assert run.phase.open == ("toolu_create_task", "toolu_calculator")
    assert run.approval_due == datetime(2025, 1, 2, 3, 5, 5, tzinfo=UTC)
    assert (run.status, run.round, run.attempt, run.cause) == (
        "requires_action",
        0,
        1,
        "persisted:toolturn:run-m1:0",
    )
    # Read as it was written by this version: the same run.
    assert run == tt.WAITING


def test_a_backoff_of_the_previous_version_starts_its_retry_once_due() -> None:
    run = core.decode_run(OLD_BACKOFF)
    early = machine.step(run, tm.STARTED, machine.Failed(tm.failure(tm.RUNNING)), tm.RULES, tm.NOW)
    assert (early.outcome, tm.kinds(early)) == ("early", ["defer"])
    due = machine.step(run, tm.STARTED, machine.Failed(tm.failure(tm.RUNNING)), tm.RULES, RETRY_AT)
    assert (due.outcome, tm.kinds(due)) == ("retry", ["verdict+task+deadline"])
    assert due.run is not None
    assert due.run.phase == Running(RETRY_AT + timedelta(seconds=tm.RULES.run_deadline_s))
    # The next write stores the phase; read back, it is the same run.
    assert core.decode_run(core.encode_run(due.run)) == due.run
    assert "phase" in json.loads(core.encode_run(due.run))


def test_a_cancel_of_the_previous_version_ends_at_its_deadline() -> None:
    run = core.decode_run(old(OLD_BACKOFF, retry_at=None, cancel_requested=True, cause="c:1"))
    s = machine.step(run, tm.STARTED, machine.DeadlineDue(tm.timer(run)), tm.RULES, tm.NOW)
    assert (s.outcome, tm.phase(s.run)) == ("cancelled", "done:cancelled")


def test_a_refusal_by_a_limit_of_the_previous_version_still_interrupts_nothing() -> None:
    rules = msgspec.structs.replace(tm.RULES, double_texting="interrupt")
    run = core.decode_run(old(OLD_BACKOFF, status="refused", limited=True, position=2))
    busy = core.ConvState(conversation_id="c1", active="run-m0", started=True, next_position=2)
    s = machine.step(run, busy, machine.Admit(2), rules, tm.NOW)
    assert tm.kinds(s) == ["count:double_texts:interrupt_limited", "verdict"]


def test_the_approval_of_a_tool_round_of_the_previous_version_is_taken() -> None:
    run = core.decode_run(OLD_WAITING)
    s = machine.step(run, tt.STARTED, tt.A(tt.decision(tt.TASK)), tt.RULES, tt.NOW)
    assert (s.outcome, tt.phase(s.run)) == ("approved", "tools:running")
    assert s.run is not None and s.run.status == "running"


# Every phase a run can be in, as this version writes it.
RECORDS = {
    "running": tm.RUNNING,
    "backoff": tm.BACKOFF,
    "cancelling": tm.CANCELLING,
    "tools": tt.TOOLS_RUNNING,
    "tools waiting": tt.WAITING,
    "failed": tm.FAILED,
    "refused": tm.REFUSED,
    "refused by a limit": core.stop(tm.decided(), "over budget", "no"),
    "skipped": tm.SKIPPED,
    "ended by its approval timeout": tt.TIMED_OUT,
    "cancelled in its tool round": tt.after(tt.WAITING, tt.USER),
    "completed": tm.COMPLETED,
}


@pytest.mark.parametrize("run", RECORDS.values(), ids=RECORDS.keys())
def test_a_record_round_trips_and_reads_the_same_by_its_flags_alone(run: core.RunState) -> None:
    raw = core.encode_run(run)
    assert core.decode_run(raw) == run
    # What a replica of the previous version reads: the flags written beside the phase (read
    # here by the previous version's own rule) give the same phase and status.
    fields = json.loads(raw)
    del fields["phase"]
    assert core.decode_run(json.dumps(fields).encode()) == run
    assert fields["status"] == run.status


def test_the_flags_for_the_previous_version_shadow_no_field_of_the_record() -> None:
    ours = set(core.RunState.__struct_fields__)
    theirs = set(core.LegacyFields.__struct_fields__) - {"status"}
    assert ours & theirs == set() and "status" not in ours


@pytest.mark.parametrize(
    ("phase", "status"),
    [
        (Running(DEADLINE), "running"),
        (Backoff(RETRY_AT), "running"),
        (Cancelling(), "running"),
        (Tools(tt.TOOLS_RUNNING.calls), "running"),
        (Tools(tt.WAITING.calls, DEADLINE), "requires_action"),
        *[(Done(s), s) for s in sorted(core.TERMINAL)],
    ],
)
def test_the_status_is_read_from_the_phase(phase: Phase, status: m.RunStatus) -> None:
    assert status_of(phase) == status


@pytest.mark.parametrize(
    "raw",
    [b'{"run_id": 1}', b"[1]", b'{"phase": {"type": "later"}, "status": "running"}'],
)
def test_a_record_of_neither_version_is_refused(raw: bytes) -> None:
    with pytest.raises(msgspec.ValidationError):
        core.decode_run(raw)


def test_a_stored_reply_naming_no_final_status_changes_nothing() -> None:
    # The persister names a reply kind's status (shared/runs.py REPLY_STATUS), always final; a
    # status the phase cannot say is ignored rather than stored.
    e = tm.stored(tm.RUNNING, "running")
    assert core.on_reply_persisted(tm.RUNNING, e) is None
    ended = core.on_reply_persisted(tm.SKIPPED, tm.stored(tm.SKIPPED, "completed"))
    assert ended is not None and ended.phase == Done("completed", skipped=True)


def test_a_run_ended_in_its_tool_round_keeps_the_rounds_calls() -> None:
    # As the previous version's record did: what the round's calls were stays readable.
    assert tt.TIMED_OUT.phase == Done("failed", calls=tt.WAITING.calls)
    assert tt.TIMED_OUT.calls == tt.WAITING.calls and tt.TIMED_OUT.approval_due is None
    cancelled = tt.after(tt.WAITING, tt.USER)
    assert cancelled.phase == Done("cancelled", calls=tt.WAITING.calls)

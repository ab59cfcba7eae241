"""The tool edge's pure rules: which decision is new, a repeat or a 409; tool event ids."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.gateway import core, tools
from shared import messages as m

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
RUN = "run-00000000-0000-4000-8000-000000000001"
ARGS = {"title": "call John"}


def request(
    call_id: str = "toolu_1", run_id: str = RUN, args: object = ARGS
) -> m.ToolApprovalRequested:
    call = m.ToolCall(id=call_id, name="create_task", input=args, input_digest=m.input_digest(args))
    return m.ToolApprovalRequested(
        event_id=f"approval-requested:{m.call_key(run_id, call_id)}",
        message_id=run_id[4:],
        conversation_id="c1",
        project_id="p1",
        run_id=run_id,
        user_id="u1",
        round=0,
        call=call,
        server="demo",
        expires_at=NOW + timedelta(minutes=5),
    )


def decided(req: m.ToolApprovalRequested, approve: bool) -> m.ToolApprovalDecided:
    return tools.decided_event(req, tools.DecisionIn(req.call.id, approve), "u1", NOW)


def decision(approve: bool = True, digest: str | None = None) -> tools.DecisionIn:
    return tools.DecisionIn(tool_call_id="toolu_1", approve=approve, input_digest=digest)


@pytest.mark.parametrize(
    ("requests", "decisions", "results", "given", "now", "outcome"),
    [
        ([request()], [], [], decision(), NOW, "new"),
        ([], [], [], decision(), NOW, "not_waiting"),
        (
            [request(run_id="run-00000000-0000-4000-8000-000000000002")],
            [],
            [],
            decision(),
            NOW,
            "not_waiting",
        ),
        ([request()], [], ["toolu_1"], decision(), NOW, "not_waiting"),
        ([request()], [], [], decision(), NOW + timedelta(minutes=6), "approval_expired"),
        ([request()], [decided(request(), True)], [], decision(True), NOW, "duplicate"),
        ([request()], [decided(request(), True)], ["toolu_1"], decision(True), NOW, "duplicate"),
        ([request()], [decided(request(), False)], [], decision(True), NOW, "already_decided"),
        (
            [request()],
            [decided(request(), True), decided(request(), False)],
            [],
            decision(False),
            NOW,
            "already_decided",
        ),
        ([request()], [], [], decision(digest=m.input_digest(ARGS)), NOW, "new"),
        (
            [request()],
            [],
            [],
            decision(digest=m.input_digest({"title": "x"})),
            NOW,
            "digest_mismatch",
        ),
    ],
    ids=[
        "waiting",
        "never-asked",
        "asked-in-another-run",
        "has-a-result",
        "expired",
        "repeat",
        "repeat-after-the-result",
        "other-answer",
        "first-decision-wins",
        "shown-digest",
        "other-digest",
    ],
)
def test_which_decision_is_new_a_repeat_or_refused(
    requests: list[m.ToolApprovalRequested],
    decisions: list[m.ToolApprovalDecided],
    results: list[str],
    given: tools.DecisionIn,
    now: datetime,
    outcome: str,
) -> None:
    calls = tools.run_tools(RUN, requests, decisions, results)
    if outcome in ("new", "duplicate"):
        assert tools.check(given, calls, now) is (outcome == "new")
        return
    with pytest.raises(core.ApiError) as refused:
        tools.check(given, calls, now)
    assert (refused.value.status, refused.value.code) == (409, outcome)


def test_the_decision_carries_the_digest_of_the_shown_arguments_not_the_requests_field() -> None:
    req = request()
    tampered = m.ToolCall(id="toolu_1", name="create_task", input=ARGS, input_digest="0" * 64)
    req = m.ToolApprovalRequested(
        **{**{f: getattr(req, f) for f in req.__struct_fields__}, "call": tampered}
    )
    event = decided(req, True)
    assert event.input_digest == m.input_digest(ARGS)
    assert event.event_id == f"approval:{RUN}:toolu_1"
    assert event.causation_id == f"approval-requested:{RUN}:toolu_1"


def test_pending_calls_are_requested_undecided_and_without_result() -> None:
    a, b, c = request("toolu_a"), request("toolu_b"), request("toolu_c")
    calls = tools.run_tools(RUN, [a, b, c], [decided(a, True)], ["toolu_c"])
    assert [x["tool_call_id"] for x in tools.pending_calls(calls)] == ["toolu_b"]


@pytest.mark.parametrize(
    ("event_id", "position"),
    [
        (
            f"tool:{RUN}:toolu_1:requested",
            core.Position("tool", RUN, status="requested", call="toolu_1"),
        ),
        (f"tool:{RUN}:toolu_1:result", core.Position("tool", RUN, status="result", call="toolu_1")),
        (f"tool:{RUN}:toolu_1:other", None),
        (f"tool:{RUN}::result", None),
        ("tool:run-nope:toolu_1:result", None),
        ("tool:", None),
    ],
)
def test_tool_event_ids_name_a_position(event_id: str, position: core.Position | None) -> None:
    assert core.parse_event_id(event_id) == position


def test_a_replay_places_tool_events_by_when_they_were_stored() -> None:
    """Before the latest call's tokens if stored before its first token, else after them."""
    message = {
        "id": RUN[4:],
        "role": "user",
        "kind": "message",
        "content": "hi",
        "created_at": NOW,
        "run_id": None,
    }
    run = {"run_id": RUN, "message_id": RUN[4:], "status": "requires_action", "attempts": 1}
    delta = m.TokenDelta(conversation_id="c1", run_id=RUN, attempt=1, seq=1, text="x")
    early = core.ToolItem(RUN, NOW, core.requested_push(request("toolu_a")))
    late = core.ToolItem(RUN, NOW + timedelta(seconds=2), core.requested_push(request("toolu_b")))
    starts = core.latest_token_start([(delta, NOW + timedelta(seconds=1))])
    events = core.timeline("c1", [message], [run], [delta], [early, late], starts)
    assert [e[1] for e in events] == [
        f"msg:{RUN[4:]}",
        f"run:{RUN}:1:requires_action",
        f"tool:{RUN}:toolu_a:requested",
        f"tok:{RUN}:1:1",
        f"tool:{RUN}:toolu_b:requested",
    ]
    pos = core.parse_event_id(f"tool:{RUN}:toolu_a:requested")
    assert [e[1] for e in core.resume(events, pos, [run])] == [
        f"tok:{RUN}:1:1",
        f"tool:{RUN}:toolu_b:requested",
    ]
    pos = core.parse_event_id(f"tok:{RUN}:1:1")
    assert [e[1] for e in core.resume(events, pos, [run])] == [f"tool:{RUN}:toolu_b:requested"]

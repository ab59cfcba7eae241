"""Resuming an SSE stream: event ids, the conversation timeline, what a client missed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from services.gateway import core as gw
from shared import messages as m

CID = "11111111-1111-1111-1111-111111111111"
U1 = "22222222-2222-2222-2222-222222222222"
A1 = "33333333-3333-3333-3333-333333333333"
U2 = "44444444-4444-4444-4444-444444444444"
R1, R2 = f"run-{U1}", f"run-{U2}"
NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def msg(mid: str, role: str, content: str, run_id: str | None = None) -> dict[str, Any]:
    kind = "message" if role == "user" else "answer"
    return {"id": mid, "role": role, "kind": kind, "content": content, "created_at": NOW,
            "run_id": run_id}  # fmt: skip


def run(run_id: str, status: str, attempts: int = 1) -> dict[str, Any]:
    return {"run_id": run_id, "message_id": run_id[4:], "status": status, "verdict": "approve",
            "reason": "", "model": "m", "attempts": attempts}  # fmt: skip


def tok(run_id: str, attempt: int, seq: int, text: str) -> m.TokenDelta:
    return m.TokenDelta(conversation_id=CID, run_id=run_id, attempt=attempt, seq=seq, text=text)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (f"msg:{U1}", gw.Position("msg", U1)),
        (f"msg:{U1.upper()}", gw.Position("msg", U1)),
        (f"tok:{R1}:2:17", gw.Position("tok", R1, 2, 17)),
        (f"run:{R1}:1:running", gw.Position("run", R1, 1, status="running")),
        (None, None),
        ("", None),
        ("garbage", None),
        ("msg:not-a-uuid", None),
        (f"tok:{R1}:x:1", None),
        (f"tok:{R1}:1:x", None),
        (f"tok:{R1}:1", None),
        ("tok::1:1", None),
        (f"tok:{R1}:1:2:3", None),
        ("x" * 400, None),
    ],
)
def test_event_ids_parse_to_positions(raw: str | None, expected: gw.Position | None) -> None:
    assert gw.parse_event_id(raw) == expected


def test_every_pushed_event_id_parses() -> None:
    for event_id in (f"msg:{U1}", f"tok:{R1}:1:1", f"run:{R1}:1:running"):
        assert gw.parse_event_id(event_id) is not None


def test_latest_tokens_keep_the_newest_attempt_and_restarted_calls() -> None:
    deltas = [tok(R1, 1, 1, "a"), tok(R1, 1, 2, "b"), tok(R2, 1, 1, "x"), tok(R1, 2, 1, "A"),
              tok(R1, 1, 3, "late"), tok(R1, 2, 2, "B"), tok(R2, 1, 1, "y"), tok(R2, 1, 2, "z")]  # fmt: skip
    latest = gw.latest_tokens(deltas)
    assert [d.text for d in latest[R1]] == ["A", "B"]
    # A redelivered call of the same attempt starts again at seq 1: only the newest call counts.
    assert [d.text for d in latest[R2]] == ["y", "z"]


def finished() -> list[gw.Push]:
    messages = [msg(U1, "user", "hi"), msg(A1, "assistant", "abc", R1), msg(U2, "user", "more")]
    runs = [run(R1, "completed"), run(R2, "running")]
    deltas = [tok(R1, 1, 1, "a"), tok(R1, 1, 2, "b"), tok(R1, 1, 3, "c"), tok(R2, 1, 1, "d")]
    return gw.timeline(CID, messages, runs, deltas)


def test_timeline_is_what_a_live_client_saw() -> None:
    ids = [e[1] for e in finished()]
    assert ids == [f"msg:{U1}", f"tok:{R1}:1:1", f"tok:{R1}:1:2", f"tok:{R1}:1:3", f"msg:{A1}",
                   f"msg:{U2}", f"run:{R2}:1:running", f"tok:{R2}:1:1"]  # fmt: skip
    completed = finished()[4]
    assert completed[0] == "message.completed"
    assert completed[2]["content"] == "abc" and completed[2]["status"] == "completed"


@pytest.mark.parametrize(
    ("last", "first_missed"),
    [
        (None, f"msg:{U1}"),
        ("garbage", f"msg:{U1}"),
        (f"msg:{U1}", f"tok:{R1}:1:1"),
        (f"tok:{R1}:1:2", f"tok:{R1}:1:3"),
        (f"tok:{R1}:1:3", f"msg:{A1}"),
        (f"tok:{R1}:1:99", f"msg:{A1}"),
        (f"msg:{A1}", f"msg:{U2}"),
        (f"run:{R2}:1:running", f"tok:{R2}:1:1"),
        # An older status than the current one: the current one is sent again.
        (f"run:{R2}:1:queued", f"run:{R2}:1:running"),
        (f"tok:{R2}:1:1", None),
        # Positions naming what this conversation never had: everything.
        (f"msg:{'5' * 8}-5555-5555-5555-{'5' * 12}", f"msg:{U1}"),
        ("tok:run-unknown:1:1", f"msg:{U1}"),
    ],
)
def test_resume_sends_exactly_what_follows_the_position(
    last: str | None, first_missed: str | None
) -> None:
    events = finished()
    missed = gw.resume(events, gw.parse_event_id(last), [])
    ids = [e[1] for e in events]
    if first_missed is None:
        assert missed == []
    else:
        assert missed == events[ids.index(first_missed) :]


def test_a_newer_attempt_first_tells_the_client_to_discard_its_partial_text() -> None:
    messages = [msg(U1, "user", "hi")]
    runs = [run(R1, "running", attempts=1)]  # the database has not seen attempt 2 yet
    deltas = [tok(R1, 1, 1, "a"), tok(R1, 1, 2, "b"), tok(R1, 2, 1, "A"), tok(R1, 2, 2, "B")]
    events = gw.timeline(CID, messages, runs, deltas)
    missed = gw.resume(events, gw.Position("tok", R1, 1, 2), runs)
    assert [e[1] for e in missed] == [f"run:{R1}:2:running", f"tok:{R1}:2:1", f"tok:{R1}:2:2"]
    assert missed[0][2]["attempt"] == 2 and missed[0][2]["message_id"] == U1
    # Once the database knows the attempt, its own status event is sent instead.
    runs = [run(R1, "running", attempts=2)]
    events = gw.timeline(CID, messages, runs, deltas)
    missed = gw.resume(events, gw.Position("tok", R1, 1, 2), runs)
    assert [e[1] for e in missed] == [f"run:{R1}:2:running", f"tok:{R1}:2:1", f"tok:{R1}:2:2"]


def test_reassembled_tokens_equal_the_answer_from_any_position() -> None:
    text = "The quick brown fox jumps over the lazy dog"
    pieces = [text[i : i + 4] for i in range(0, len(text), 4)]
    deltas = [tok(R1, 1, i + 1, p) for i, p in enumerate(pieces)]
    messages = [msg(U1, "user", "hi"), msg(A1, "assistant", text, R1)]
    events = gw.timeline(CID, messages, [run(R1, "completed")], deltas)
    for cut in range(len(events)):
        seen = events[: cut + 1]
        missed = gw.resume(events, gw.parse_event_id(seen[-1][1]), [])
        got = [e for e in seen + missed if e[0] == "token"]
        assert "".join(e[2]["text"] for e in got) == text
        assert [e[2]["seq"] for e in got] == list(range(1, len(pieces) + 1))


def test_live_filter_drops_only_what_the_replay_covered() -> None:
    replayed = [e for e in finished() if e[1] != f"msg:{U2}"]
    live = gw.LiveFilter(replayed, buffered=5)
    assert not live.fresh("token", f"tok:{R2}:1:1", {"run_id": R2, "attempt": 1, "seq": 1})
    assert live.fresh("token", f"tok:{R2}:1:2", {"run_id": R2, "attempt": 1, "seq": 2})
    assert not live.fresh("message.completed", f"msg:{A1}", {})
    assert live.fresh("message.created", f"msg:{U2}", {})
    assert live.fresh("token", f"tok:{R2}:2:1", {"run_id": R2, "attempt": 2, "seq": 1})
    # Past the events buffered during the replay, tokens are new...
    assert live.fresh("token", f"tok:{R2}:1:1", {"run_id": R2, "attempt": 1, "seq": 1})
    # ...but a message the connection carried is never sent twice.
    assert not live.fresh("message.completed", f"msg:{A1}", {})
    assert not live.fresh("message.created", f"msg:{U2}", {})


def test_a_status_announced_twice_under_one_id_reaches_the_client_once() -> None:
    # Policy announces attempt 2 when it schedules the retry, and again when the retry starts.
    status = {"run_id": R1, "attempt": 2, "status": "running"}
    for replayed, buffered in (
        ([], 0),
        (gw.timeline(CID, [msg(U1, "user", "hi")], [run(R1, "running", 2)], []), 1),
    ):
        live = gw.LiveFilter(replayed, buffered)
        first = live.fresh("run.status", f"run:{R1}:2:running", status)
        assert first is (not replayed)
        assert not live.fresh("run.status", f"run:{R1}:2:running", status)
        assert live.fresh("run.status", f"run:{R1}:2:completed", status)


def test_tokens_of_an_attempt_the_database_has_not_recorded_come_after_its_status() -> None:
    # The client reconnects with an unknown id: the whole timeline, never a token of attempt 2
    # without the status that announces attempt 2.
    messages = [msg(U1, "user", "hi")]
    runs = [run(R1, "running", attempts=1)]
    events = gw.timeline(CID, messages, runs, [tok(R1, 2, 1, "A"), tok(R1, 2, 2, "B")])
    assert [e[1] for e in events] == [
        f"msg:{U1}", f"run:{R1}:2:running", f"tok:{R1}:2:1", f"tok:{R1}:2:2"
    ]  # fmt: skip
    assert events[1][2]["attempt"] == 2


def test_a_newer_attempt_that_has_not_streamed_yet_hides_the_old_tokens() -> None:
    messages = [msg(U1, "user", "hi")]
    runs = [run(R1, "running", attempts=2)]
    deltas = [tok(R1, 1, 1, "a"), tok(R1, 1, 2, "b")]
    events = gw.timeline(CID, messages, runs, deltas)
    assert [e[1] for e in events] == [f"msg:{U1}", f"run:{R1}:2:running"]
    missed = gw.resume(events, gw.Position("tok", R1, 1, 1), runs)
    assert [e[1] for e in missed] == [f"run:{R1}:2:running"]
    assert gw.resume(events, gw.Position("run", R1, 2, status="running"), runs) == []


def test_a_cancelled_run_replays_its_partial_text_then_the_status_that_ended_it() -> None:
    messages = [msg(U1, "user", "q1")]
    events = gw.timeline(CID, messages, [run(R1, "cancelled")], [tok(R1, 1, 1, "Hel")])
    assert [e[1] for e in events] == [f"msg:{U1}", f"tok:{R1}:1:1", f"run:{R1}:1:cancelled"]
    # A client that saw the partial text gets the cancel and nothing after it.
    missed = gw.resume(events, gw.parse_event_id(f"tok:{R1}:1:1"), [run(R1, "cancelled")])
    assert [e[1] for e in missed] == [f"run:{R1}:1:cancelled"]


def test_a_status_seen_before_the_reconnect_is_not_sent_again_live() -> None:
    # A cancel in flight re-announces the attempt's running status: the client resuming from a
    # token of that attempt had it already.
    messages = [msg(U1, "user", "hi")]
    runs = [run(R1, "running")]
    events = gw.timeline(CID, messages, runs, [tok(R1, 1, 1, "a"), tok(R1, 1, 2, "b")])
    for last in (f"tok:{R1}:1:1", f"run:{R1}:1:running", f"msg:{U1}"):
        pos = gw.parse_event_id(last)
        missed = gw.resume(events, pos, runs)
        live = gw.LiveFilter(missed, 0, gw.seen_before(events, missed, pos))
        status = {"run_id": R1, "attempt": 1, "status": "running"}
        sent_before = last != f"msg:{U1}"  # from the user message, the status was missed
        assert (f"run:{R1}:1:running" in {e[1] for e in missed}) is not sent_before
        assert not live.fresh("run.status", f"run:{R1}:1:running", status), last
        assert not live.fresh("message.created", f"msg:{U1}", {}), last
    # An unknown position replays everything: nothing counts as seen but what the replay sent.
    assert gw.seen_before(events, events, None) == set()


def test_a_client_ahead_of_the_database_is_not_sent_the_older_attempt_again() -> None:
    # The client saw attempt 2 announced live (a retry scheduled) before the persister stored
    # it: the database still says attempt 1, which the client had seen before attempt 2.
    messages = [msg(U1, "user", "hi")]
    runs = [run(R1, "running", attempts=1)]
    events = gw.timeline(CID, messages, runs, [])
    assert [e[1] for e in events] == [f"msg:{U1}", f"run:{R1}:1:running"]
    pos = gw.parse_event_id(f"run:{R1}:2:running")
    missed = gw.resume(events, pos, runs)
    assert missed == []
    live = gw.LiveFilter(missed, 0, gw.seen_before(events, missed, pos))
    # What comes live next is new: the retry's tokens after its (already seen) status.
    assert not live.fresh("run.status", f"run:{R1}:2:running", {})
    assert not live.fresh("run.status", f"run:{R1}:1:running", {})
    assert live.fresh("token", f"tok:{R1}:2:1", {"run_id": R1, "attempt": 2, "seq": 1})
    # A client that saw only attempt 1 still gets nothing twice.
    assert gw.resume(events, gw.parse_event_id(f"run:{R1}:1:running"), runs) == []


@pytest.mark.parametrize("stored", [None, "running", "cancelled"])
def test_a_client_that_saw_its_run_end_is_not_sent_the_run_again(stored: str | None) -> None:
    # The client saw the run cancelled live; the database may not have its record yet (the
    # persister stores verdicts after they went out), or still shows it running.
    messages = [msg(U1, "user", "hi"), msg(U2, "user", "next")]
    runs = [] if stored is None else [run(R1, stored)]
    events = gw.timeline(CID, messages, runs, [tok(R1, 1, 1, "He"), tok(R1, 1, 2, "llo")])
    pos = gw.parse_event_id(f"run:{R1}:1:cancelled")
    missed = gw.resume(events, pos, runs)
    assert [e[1] for e in missed] == [f"msg:{U2}"]


def test_a_run_read_as_answered_before_its_answer_shows_no_status_no_live_client_saw() -> None:
    # The runs were read after the answer was stored, the messages before it: the run is
    # completed, its answer not among the messages. Live, the client was shown attempt 2's
    # ``running`` and its tokens, and then the answer (policy publishes no verdict when an
    # answer completes a run: the answer announces it).
    messages = [msg(U1, "user", "hi")]
    runs = [run(R1, "completed", attempts=2)]
    events = gw.timeline(CID, messages, runs, [tok(R1, 2, 1, "A"), tok(R1, 2, 2, "B")])
    assert [e[1] for e in events] == [
        f"msg:{U1}", f"run:{R1}:2:running", f"tok:{R1}:2:1", f"tok:{R1}:2:2"
    ]  # fmt: skip
    # Tokens of an older attempt are stale (the answer's attempt streamed none yet), and
    # without tokens there is nothing to announce.
    for deltas in ([tok(R1, 1, 1, "a")], []):
        assert [e[1] for e in gw.timeline(CID, messages, runs, deltas)] == [f"msg:{U1}"]


@pytest.mark.parametrize("status", ["failed", "refused", "clarified"])
def test_an_end_that_went_out_as_a_status_is_replayed_before_its_notice_is_stored(
    status: str,
) -> None:
    # Policy publishes these ends as a verdict (live clients got ``run.status``) and then the
    # notice the persister stores apart: a replay in between shows the status, as live.
    messages = [msg(U1, "user", "hi")]
    runs = [run(R1, status, attempts=2)]
    events = gw.timeline(CID, messages, runs, [tok(R1, 1, 1, "a")])
    assert [e[1] for e in events] == [f"msg:{U1}", f"run:{R1}:2:{status}"]


def _deliver(live: gw.LiveFilter, pushes: list[gw.Push]) -> list[gw.Push]:
    return [p for p in pushes if live.fresh(*p)]


def test_a_token_that_arrives_after_its_runs_cancel_is_not_sent() -> None:
    # A cancel decided before the attempt was marked started ends the run at once; the executor
    # streams on until the abort reaches it, so a token can reach the gateway after the cancel.
    status = {"run_id": R1, "message_id": U1, "attempt": 1, "status": "cancelled"}
    late = ("token", f"tok:{R1}:1:2", {"run_id": R1, "attempt": 1, "seq": 2, "text": "b"})
    live = gw.LiveFilter([], 0)
    got = _deliver(live, [
        ("token", f"tok:{R1}:1:1", {"run_id": R1, "attempt": 1, "seq": 1, "text": "a"}),
        ("run.status", f"run:{R1}:1:cancelled", status),
        late,
    ])  # fmt: skip
    assert [e[1] for e in got] == [f"tok:{R1}:1:1", f"run:{R1}:1:cancelled"]
    # The client's last event is the cancel: resuming from it sends nothing of the run again
    # (had the late token gone out, resuming from it would send the cancel a second time).
    messages = [msg(U1, "user", "hi")]
    runs = [run(R1, "cancelled")]
    events = gw.timeline(CID, messages, runs, [tok(R1, 1, 1, "a"), tok(R1, 1, 2, "b")])
    pos = gw.parse_event_id(got[-1][1])
    missed = gw.resume(events, pos, runs)
    assert missed == []
    again = gw.LiveFilter(
        missed, 0, gw.seen_before(events, missed, pos), gw.ended_runs(events, pos)
    )
    assert _deliver(again, [late, ("run.status", f"run:{R1}:1:cancelled", status)]) == []


@pytest.mark.parametrize("stored", ["running", "cancelled"])
def test_a_reconnected_client_gets_no_token_of_a_run_it_saw_end(stored: str) -> None:
    # From the cancel it saw (the database may still say running), or from after the run's
    # block: a late token of the run is not news. These runs are the database's alone; the
    # replay folds in policy's verdicts first (``with_verdicts``, below), which have the cancel.
    messages = [msg(U1, "user", "hi"), msg(U2, "user", "next")]
    runs = [run(R1, stored), run(R2, "running")]
    events = gw.timeline(CID, messages, runs, [tok(R1, 1, 1, "a")])
    late = ("token", f"tok:{R1}:1:2", {"run_id": R1, "attempt": 1, "seq": 2, "text": "b"})
    fresh = ("token", f"tok:{R2}:1:1", {"run_id": R2, "attempt": 1, "seq": 1, "text": "x"})
    for last in (f"run:{R1}:1:cancelled", f"msg:{U2}"):
        pos = gw.parse_event_id(last)
        missed = gw.resume(events, pos, runs)
        ended = gw.ended_runs(events, pos)
        live = gw.LiveFilter(missed, 0, gw.seen_before(events, missed, pos), ended)
        knows_end = stored == "cancelled" or last.startswith("run:")
        assert (R1 in ended) is knows_end, last
        assert [e[1] for e in _deliver(live, [late, fresh])] == (
            [fresh[1]] if knows_end else [late[1], fresh[1]]
        ), last


def test_a_replayed_reply_carries_the_status_it_ends_its_run_with_not_the_runs_row() -> None:
    # The runs are read before the messages: a reply stored in between is found with its run's
    # row still ``running``. Live, ``message.completed`` said ``completed``; so does the replay.
    messages = [msg(U1, "user", "hi"), msg(A1, "assistant", "abc", R1)]
    events = gw.timeline(CID, messages, [run(R1, "running")], [tok(R1, 1, 1, "a")])
    reply = next(e for e in events if e[1] == f"msg:{A1}")
    assert reply[0] == "message.completed" and reply[2]["status"] == "completed"
    failure = {**msg(A1, "assistant", "sorry", R1), "kind": "failure"}
    events = gw.timeline(CID, [messages[0], failure], [run(R1, "running")], [])
    notice = next(e for e in events if e[1] == f"msg:{A1}")
    assert notice[0] == "run.failed" and notice[2]["status"] == "failed"


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_a_run_ended_by_a_status_replays_its_tokens_before_that_status(status: str) -> None:
    # Live, the attempt's tokens went out, then the verdict that ended the run: a replay before
    # the failure's notice is stored shows them in that order (never a token after the end).
    messages = [msg(U1, "user", "hi")]
    runs = [run(R1, status)]
    events = gw.timeline(CID, messages, runs, [tok(R1, 1, 1, "a"), tok(R1, 1, 2, "b")])
    assert [e[1] for e in events] == [
        f"msg:{U1}", f"tok:{R1}:1:1", f"tok:{R1}:1:2", f"run:{R1}:1:{status}"
    ]  # fmt: skip
    # From the first token: the second, then the end, each once.
    missed = gw.resume(events, gw.parse_event_id(f"tok:{R1}:1:1"), runs)
    assert [e[1] for e in missed] == [f"tok:{R1}:1:2", f"run:{R1}:1:{status}"]


@pytest.mark.parametrize("status", ["failed", "cancelled"])
@pytest.mark.parametrize("last", [f"tok:{R1}:1:3", f"run:{R1}:1:running"])
def test_a_client_on_an_older_attempt_of_an_ended_run_gets_the_newer_attempt_then_the_end(
    status: str, last: str
) -> None:
    # Attempt 1 failed and was retried; attempt 2 streamed and the run ended by a verdict. The
    # end comes after attempt 2's tokens: the client first hears of attempt 2 (and drops its
    # partial text), then gets its tokens, then the end; nothing of the run is left out.
    messages = [msg(U1, "user", "hi")]
    runs = [run(R1, status, attempts=2)]
    events = gw.timeline(CID, messages, runs, [tok(R1, 2, 1, "A"), tok(R1, 2, 2, "B")])
    missed = gw.resume(events, gw.parse_event_id(last), runs)
    assert [e[1] for e in missed] == [
        f"run:{R1}:2:running", f"tok:{R1}:2:1", f"tok:{R1}:2:2", f"run:{R1}:2:{status}"
    ]  # fmt: skip


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_a_client_at_a_token_the_replay_no_longer_has_still_gets_the_end(status: str) -> None:
    # The stream's first tokens are gone (trimmed): from a token among them, the client gets
    # the tokens still there and the end, not nothing.
    messages = [msg(U1, "user", "hi")]
    runs = [run(R1, status)]
    events = gw.timeline(CID, messages, runs, [tok(R1, 1, 6, "f"), tok(R1, 1, 7, "g")])
    missed = gw.resume(events, gw.parse_event_id(f"tok:{R1}:1:2"), runs)
    assert [e[1] for e in missed] == [f"tok:{R1}:1:6", f"tok:{R1}:1:7", f"run:{R1}:1:{status}"]


def verdict(
    run_id: str, status: str, attempt: int = 1, model: str = "m", verdict: str = "approve"
) -> m.RunVerdict:
    return m.RunVerdict(event_id=f"{run_id}:{attempt}:{status}", message_id=run_id[4:],
                        conversation_id=CID, project_id="p", run_id=run_id, user_id="u",
                        verdict=verdict, status=status, reason="", model=model,  # type: ignore[arg-type]
                        attempt=attempt)  # fmt: skip


def _states(runs: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    return [(r["run_id"], r["status"], r["attempts"]) for r in runs]


@pytest.mark.parametrize(
    ("stored", "verdicts", "shown"),
    [
        # The persister has not stored the cancel, or the retry, that live clients were pushed.
        ([run(R1, "running")], [verdict(R1, "running"), verdict(R1, "cancelled")],
         [(R1, "cancelled", 1)]),
        ([run(R1, "running")], [verdict(R1, "running", 2)], [(R1, "running", 2)]),
        ([run(R1, "queued", 0)], [verdict(R1, "running"), verdict(R1, "requires_action")],
         [(R1, "requires_action", 1)]),
        # An equal rank below the terminal ones moves either way, by the later verdict.
        ([run(R1, "requires_action")], [verdict(R1, "running")], [(R1, "running", 1)]),
        # A terminal status is never replaced, whatever order the verdicts were stored in.
        ([run(R1, "running")], [verdict(R1, "cancelled"), verdict(R1, "running")],
         [(R1, "cancelled", 1)]),
        # A run stored as ended is left as stored.
        ([run(R1, "cancelled")], [verdict(R1, "running", 2)], [(R1, "cancelled", 1)]),
        # Verdicts the database already holds change nothing; the runs keep their order.
        ([run(R1, "running"), run(R2, "queued", 0)], [verdict(R1, "running")],
         [(R1, "running", 1), (R2, "queued", 0)]),
        # No row yet: the run is made from its verdicts, after the stored ones.
        ([], [verdict(R1, "queued", 0), verdict(R1, "cancelled", 0)], [(R1, "cancelled", 0)]),
        ([run(R2, "running")], [verdict(R1, "running")], [(R2, "running", 1), (R1, "running", 1)]),
    ],
    ids=["cancel", "retry", "requires-action", "equal-rank", "terminal-first", "stored-end",
         "nothing-new", "no-row", "no-row-after-stored"],
)  # fmt: skip
def test_a_replay_shows_the_runs_as_policy_last_published_them(
    stored: list[dict[str, Any]], verdicts: list[m.RunVerdict], shown: list[Any]
) -> None:
    messages = [msg(U1, "user", "hi"), msg(U2, "user", "next")]
    assert _states(gw.with_verdicts(stored, messages, verdicts)) == shown


def test_a_verdict_of_a_message_the_replay_did_not_read_makes_no_run() -> None:
    # The messages were read before the verdicts: a run of a message not among them (accepted
    # since, or someone else's message with this id) is not made up.
    assert gw.with_verdicts([], [msg(U2, "user", "next")], [verdict(R1, "running")]) == []
    other = m.RunVerdict(**{**msgspec.structs.asdict(verdict(R1, "running")), "message_id": U2})
    assert gw.with_verdicts([], [msg(U1, "user", "hi")], [other]) == []


def test_the_verdict_fields_come_from_the_newest_verdict() -> None:
    [r] = gw.with_verdicts(
        [run(R1, "running")],
        [msg(U1, "user", "hi")],
        [verdict(R1, "cancelled", model="", verdict="stop")],
    )
    assert (r["status"], r["verdict"], r["model"]) == ("cancelled", "stop", "m")
    # An older verdict than the stored one brings nothing of its own.
    [r] = gw.with_verdicts(
        [run(R1, "running", attempts=2)], [msg(U1, "user", "hi")], [verdict(R1, "running", 1, "x")]
    )
    assert (r["attempts"], r["model"]) == (2, "m")
    # A run with no model yet takes the first one named, newer verdict or not.
    [r] = gw.with_verdicts(
        [{**run(R1, "running", attempts=2), "model": ""}],
        [msg(U1, "user", "hi")],
        [verdict(R1, "running", 1, "x"), verdict(R1, "running", 1, "y")],
    )
    assert r["model"] == "x"


def test_verdicts_are_read_only_while_a_run_is_not_stored_as_ended() -> None:
    later = NOW + timedelta(minutes=1)
    messages = [msg(U1, "user", "hi"), {**msg(U2, "user", "next"), "created_at": later}]
    # Each row stored a while after its message was accepted (the persister lags the verdicts).
    rows = [
        {**run(R1, "completed"), "created_at": NOW + timedelta(seconds=90)},
        {**run(R2, "cancelled"), "created_at": later + timedelta(seconds=90)},
    ]
    at = later + timedelta(minutes=5)
    assert gw.verdicts_since(rows, messages, at) is None
    # A run in flight, or a message with no run stored yet: from when its message was
    # accepted (its first verdict came after that, and before its row was stored).
    flying = [rows[0], {**rows[1], "status": "running"}]
    assert gw.verdicts_since(flying, messages, at) == later
    assert gw.verdicts_since(rows[:1], messages, at) == later
    assert gw.verdicts_since([], messages, at) == NOW
    # A row whose message the replay did not read: the row's own time.
    assert gw.verdicts_since(flying, messages[:1], at) == later + timedelta(seconds=90)
    # But never from further back than the persister's lag allows for.
    assert gw.verdicts_since([], messages, NOW + timedelta(hours=1), lag_s=60) == (
        NOW + timedelta(minutes=59)
    )


def test_a_client_past_a_cancelled_run_gets_no_late_token_before_the_cancel_is_stored() -> None:
    # The client was pushed R1's cancel, then U2; it reconnects from U2 while the database still
    # says R1 is running. The executor streams on until the abort reaches it: a late token of R1
    # arrives. Had it gone out, the client's last event would be a token after the cancel, and
    # its next resume would send the cancel and everything after it again.
    messages = [msg(U1, "user", "hi"), msg(U2, "user", "next")]
    stored = [run(R1, "running"), run(R2, "running")]
    shown = gw.with_verdicts(stored, messages, [verdict(R1, "running"), verdict(R1, "cancelled")])
    events = gw.timeline(CID, messages, shown, [tok(R1, 1, 1, "a")])
    pos = gw.parse_event_id(f"msg:{U2}")
    missed = gw.resume(events, pos, shown)
    ended = gw.ended_runs(events, pos)
    assert R1 in ended
    live = gw.LiveFilter(missed, 0, gw.seen_before(events, missed, pos), ended)
    late = ("token", f"tok:{R1}:1:2", {"run_id": R1, "attempt": 1, "seq": 2, "text": "b"})
    fresh = ("token", f"tok:{R2}:1:1", {"run_id": R2, "attempt": 1, "seq": 1, "text": "x"})
    assert [e[1] for e in _deliver(live, [late, fresh])] == [fresh[1]]
    # From the cancel's last token instead: the cancel, once, then what followed it.
    missed = gw.resume(events, gw.parse_event_id(f"tok:{R1}:1:1"), shown)
    assert [e[1] for e in missed][:2] == [f"run:{R1}:1:cancelled", f"msg:{U2}"]

"""Run lifecycle end to end: cancel, double texting, retries with backoff and fallback, deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nats
import pytest

from baton.embedded import NatsServer, PostgresServer
from services.policy import budget
from shared import subjects
from tests.conftest import ExternalPostgres
from tests.e2e.conftest import Pipeline, _running, fresh, module_stack

pytestmark = pytest.mark.e2e

ANSWER_MODEL = "claude-sonnet-4-6"
FALLBACK_MODEL = "claude-haiku-4-5"


def _pipeline(
    nats_server: NatsServer,
    database_url: str,
    tmp_path: Path,
    extra: Mapping[str, str] | None = None,
    replicas: Mapping[str, int] | None = None,
) -> contextlib.AbstractContextManager[Pipeline]:
    return _running(
        nats_server.url, database_url, tmp_path / "logs", extra=extra, replicas=replicas
    )


@pytest.fixture(scope="module")
def _slow_stack(
    postgres_server: PostgresServer | ExternalPostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    extra = {"POLICY_RETRY_BACKOFF_S": "0.2"}
    yield from module_stack(postgres_server, tmp_path_factory.mktemp("slow"), extra)


@pytest.fixture
def slow(_slow_stack: Pipeline) -> Pipeline:
    """One stack for the cancel tests, the model reset: each test counts its own runs' calls and
    usage rows (a paused policy is resumed before the test ends)."""
    return fresh(_slow_stack)


class Client:
    """One user's view of one conversation through the public API."""

    def __init__(self, p: Pipeline, project: str = "acme", user: str = "alice") -> None:
        self.p = p
        self.auth = {"Authorization": f"Bearer {p.token(project, user)}"}
        self.cid = str(uuid.uuid4())

    def send(self, content: str) -> str:
        r = httpx.post(
            f"{self.p.gateway}/api/chat",
            json={"conversation_id": self.cid, "content": content},
            headers={**self.auth, "Idempotency-Key": str(uuid.uuid4())},
        )
        assert r.status_code == 202, r.text
        return f"run-{r.json()['message']['id']}"

    def cancel(self, run_id: str, cid: str | None = None) -> httpx.Response:
        return httpx.post(
            f"{self.p.gateway}/api/conversations/{cid or self.cid}/runs/{run_id}/cancel",
            headers=self.auth,
        )

    def runs(self) -> dict[str, dict[str, Any]]:
        r = httpx.get(f"{self.p.gateway}/api/conversations/{self.cid}/state", headers=self.auth)
        return {x["run_id"]: x for x in r.json()["runs"]} if r.status_code == 200 else {}

    def messages(self) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.p.gateway}/api/conversations/{self.cid}/messages", headers=self.auth)
        return list(r.json()["messages"]) if r.status_code == 200 else []

    def wait(self, check: Callable[[], Any], what: str, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"{what}: not in time\n{self.p.log_tail(60)}")

    def wait_status(self, run_id: str, status: str, timeout: float = 60) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            run = self.runs().get(run_id)
            return run if run is not None and run["status"] == status else None

        result: dict[str, Any] = self.wait(check, f"{run_id} {status}", timeout)
        return result

    def calls(self, run_id: str) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.p.model.calls().items() if k.startswith(f"task:{run_id}:")}

    def open_call(self, run_id: str) -> str:
        def check() -> str | None:
            return next((k for k, v in self.calls(run_id).items() if v["outcome"] == "open"), None)

        call: str = self.wait(check, f"an open model call of {run_id}")
        return call


class Events:
    """The conversation's live SSE stream, read in a thread while the test acts."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.stop = threading.Event()
        self.connected = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)

    def __enter__(self) -> Events:
        self.thread.start()
        assert self.connected.wait(60), "SSE did not connect"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)

    def _read(self) -> None:
        url = f"{self.client.p.gateway}/api/conversations/{self.client.cid}/events"
        with httpx.stream("GET", url, headers=self.client.auth, timeout=None) as r:
            event = ""
            for line in r.iter_lines():
                self.connected.set()
                if self.stop.is_set():
                    return
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event:
                    self.events.append((event, json.loads(line.split(":", 1)[1])))

    def statuses(self, run_id: str) -> list[tuple[int, str]]:
        return [
            (d["attempt"], d["status"])
            for e, d in list(self.events)
            if e == "run.status" and d["run_id"] == run_id
        ]


def usage_rows(p: Pipeline, run_id: str) -> list[dict[str, Any]]:
    async def read() -> list[dict[str, Any]]:
        con = await asyncpg.connect(p.database_url)
        try:
            rows = await con.fetch(
                "SELECT call_id, attempt, model, outcome, input_tokens, output_tokens "
                "FROM usage WHERE run_id = $1 AND purpose = 'answer' ORDER BY attempt, call_id",
                run_id,
            )
        finally:
            await con.close()
        return [dict(r) for r in rows]

    return asyncio.run(read())


def _slow_model(p: Pipeline, tokens_per_second: float = 8, words: int = 400) -> None:
    p.model.update_settings(tokens_per_second=tokens_per_second, words_per_reply=words)


def test_cancelling_a_running_run_stops_the_model_call_and_bills_its_partial_usage_once(
    slow: Pipeline,
) -> None:
    c = Client(slow)
    _slow_model(slow)
    with Events(c) as events:
        first = c.send("Please write a very long essay about message brokers.")
        call = c.open_call(first)
        second = c.send("And a short note afterwards.")  # queued behind the first (enqueue)
        r = c.cancel(first)
        assert r.status_code == 202, r.text
        assert r.json()["run_id"] == first
        c.wait_status(first, "cancelled")
        # The executor closed the stream: the model's ledger shows the call ended early.
        ended = c.wait(
            lambda: c.calls(first)[call]["outcome"] != "open" and c.calls(first)[call],
            "the call to end",
        )
        assert ended["outcome"] == "client_disconnected"
        assert 0 < ended["output_tokens"] < 400
        # The conversation's next run proceeds.
        slow.model.update_settings(tokens_per_second=0, words_per_reply=24)
        c.wait_status(second, "completed")
        c.wait(lambda: "cancelled" in [s for _, s in events.statuses(first)], "SSE cancelled")
    # No retry and no second call; the partial usage is billed exactly once.
    assert list(c.calls(first)) == [call]
    rows = c.wait(lambda: usage_rows(slow, first), "usage row")
    time.sleep(0.5)
    rows = usage_rows(slow, first)
    assert len(rows) == 1 and rows[0]["outcome"] == "cancelled", rows
    assert rows[0]["input_tokens"] == ended["input_tokens"]
    assert 0 < rows[0]["output_tokens"] <= ended["output_tokens"]
    run = c.runs()[first]
    assert (run["status"], run["verdict"], run["attempts"]) == ("cancelled", "stop", 1)
    assert run["usage"]["calls"] == 1
    # No assistant message for the cancelled run; one answer for the second.
    kinds = [(m["run_id"], m["kind"]) for m in c.messages() if m["role"] == "assistant"]
    assert kinds == [(second, "answer")]


def test_cancelling_a_queued_run_skips_it_and_the_next_message_is_answered(
    slow: Pipeline,
) -> None:
    c = Client(slow)
    _slow_model(slow, tokens_per_second=20, words=60)
    first = c.send("First question, take your time.")
    c.open_call(first)
    second = c.send("Second question.")
    c.wait_status(second, "queued")
    r = c.cancel(second)
    assert r.status_code == 202, r.text
    c.wait_status(second, "cancelled")
    third = c.send("Third question.")
    c.wait_status(first, "completed")
    c.wait_status(third, "completed")
    # The queued run never reached the model.
    assert c.calls(second) == {} and usage_rows(slow, second) == []
    answers = [m["run_id"] for m in c.messages() if m["role"] == "assistant"]
    assert answers == [first, third]


def test_cancel_requests_that_cannot_apply_are_refused_clearly(slow: Pipeline) -> None:
    c = Client(slow)
    done = c.send("Hello there")
    c.wait_status(done, "completed")
    # A finished run: 409 with its status.
    r = c.cancel(done)
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "run_finished"
    assert r.json()["error"]["run_status"] == "completed"
    # Unknown run of my conversation, or a run of a conversation that is not mine: 404.
    assert c.cancel(f"run-{uuid.uuid4()}").status_code == 404
    mallory = Client(slow, user="mallory")
    assert mallory.cancel(done, cid=c.cid).status_code == 404
    assert Client(slow, project="other").cancel(done, cid=c.cid).status_code == 404
    # Malformed ids: 400 and nothing published.
    for cid, rid in [
        ("not-a-uuid", done),
        (c.cid, "run-not-a-uuid"),
        (c.cid, done.removeprefix("run-")),
        (c.cid, "run-" + "a" * 200),
        (c.cid, done + ".>"),
        (c.cid, "run-*"),
    ]:
        r = c.cancel(rid, cid=cid)
        assert r.status_code == 400, (cid, rid, r.text)
        assert r.json()["error"]["code"] == "invalid_id"
    # No token: 401.
    url = f"{slow.gateway}/api/conversations/{c.cid}/runs/{done}/cancel"
    assert httpx.post(url).status_code == 401
    # Concurrent duplicate cancels of a live run (policy paused, so the run stays live): all
    # accepted, one request published, the rest marked as duplicates.
    _slow_model(slow)
    live = c.send("A long answer please")
    c.open_call(live)
    policy = slow.child("policy")
    policy.signal(signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(lambda _: c.cancel(live), range(5)))
    finally:
        policy.signal(signal.SIGCONT)
    assert [a.status_code for a in answers] == [202] * 5, [a.text for a in answers]
    assert sorted(a.json()["duplicate"] for a in answers) == [False] + [True] * 4
    c.wait_status(live, "cancelled")
    time.sleep(0.5)
    assert len(usage_rows(slow, live)) == 1
    assert c.cancel(live).status_code == 409


@pytest.mark.parametrize("strategy", ["enqueue", "reject", "interrupt"])
def test_double_texting_with_two_policy_and_two_executor_replicas(
    nats_server: NatsServer, database_url: str, tmp_path: Path, strategy: str
) -> None:
    env = {"POLICY_DOUBLE_TEXTING": strategy, "POLICY_RETRY_BACKOFF_S": "0.2"}
    with _pipeline(nats_server, database_url, tmp_path, env, {"policy": 2, "executor": 2}) as p:
        c = Client(p)
        _slow_model(p)
        first = c.send("Write me a long story about queues.")
        call = c.open_call(first)
        second = c.send("Actually, just say hi.")
        if strategy == "enqueue":
            c.wait_status(second, "queued")
            p.model.update_settings(tokens_per_second=0)
            c.wait_status(first, "completed")
            c.wait_status(second, "completed")
            assert p.model.stats()["max_in_flight"][ANSWER_MODEL] == 1
            answers = [m["run_id"] for m in c.messages() if m["kind"] == "answer"]
            assert answers == [first, second]
        elif strategy == "reject":
            run = c.wait_status(second, "refused")
            # The verdict and the refusal are published together and stored by two consumers,
            # so the run row may show the refusal a moment before its verdict (/state is
            # eventually consistent); the verdict must follow, and be "stop".

            def decided() -> dict[str, Any] | None:
                latest: dict[str, Any] = c.runs()[second]
                return latest if latest["verdict"] else None

            run = c.wait(decided, f"{second}'s verdict")
            assert run["verdict"] == "stop" and run["status"] == "refused"
            refusal = c.wait(
                lambda: [m for m in c.messages() if m["run_id"] == second], "refusal reply"
            )
            assert refusal[0]["kind"] == "refusal" and "previous message" in refusal[0]["content"]
            assert c.calls(second) == {}
            # The first run is untouched and finishes.
            p.model.update_settings(tokens_per_second=0)
            c.wait_status(first, "completed")
            assert list(c.calls(first)) == [call]
        else:
            c.wait_status(first, "cancelled")
            p.model.update_settings(tokens_per_second=0)
            c.wait_status(second, "completed")
            ended = c.calls(first)[call]
            assert ended["outcome"] == "client_disconnected"
            rows = c.wait(lambda: usage_rows(p, first), "usage of the interrupted run")
            assert [r["outcome"] for r in rows] == ["cancelled"]
            assert rows[0]["output_tokens"] <= ended["output_tokens"]
            answers = [m["run_id"] for m in c.messages() if m["kind"] == "answer"]
            assert answers == [second]
        # No message is dropped: every user message has exactly one run with a final status.
        runs = c.runs()
        assert set(runs) == {first, second}


def test_an_overloaded_model_is_retried_after_a_backoff_on_the_fallback_model(
    nats_server: NatsServer, database_url: str, tmp_path: Path
) -> None:
    env = {"POLICY_RETRY_BACKOFF_S": "0.5", "POLICY_FALLBACK_MODEL": FALLBACK_MODEL}
    with _pipeline(nats_server, database_url, tmp_path, env) as p:
        p.model.set_faults([{"kind": "529", "model": ANSWER_MODEL, "count": -1}])
        c = Client(p)
        with Events(c) as events:
            run_id = c.send("What is a stream?")
            run = c.wait_status(run_id, "completed")
            c.wait(lambda: (2, "running") in events.statuses(run_id), "run.status of attempt 2")
        assert (run["model"], run["attempts"]) == (FALLBACK_MODEL, 2)
        calls = sorted(c.calls(run_id).items())
        assert [(v["model"], v["outcome"]) for _, v in calls] == [
            (ANSWER_MODEL, "529"),
            (FALLBACK_MODEL, "completed"),
        ]
        statuses = events.statuses(run_id)
        assert (1, "running") in statuses and (2, "running") in statuses
        retry = next(d for e, d in events.events if e == "run.status" and d["attempt"] == 2)
        assert retry["reason"].startswith(f"retry on {FALLBACK_MODEL} in 0.5s after overloaded")


def test_a_stalled_attempt_past_its_deadline_is_retried_by_one_of_two_policy_replicas(
    nats_server: NatsServer, database_url: str, tmp_path: Path
) -> None:
    env = {
        "POLICY_RUN_DEADLINE_S": "2",
        "POLICY_RETRY_BACKOFF_S": "0.2",
        # The executor would notice the stall itself only much later.
        "EXECUTOR_STALL_TIMEOUT_S": "120",
    }
    with _pipeline(nats_server, database_url, tmp_path, env, {"policy": 2}) as p:
        p.model.set_faults(
            [{"kind": "stall", "model": ANSWER_MODEL, "count": 1, "after_tokens": 2}]
        )
        c = Client(p)
        run_id = c.send("Tell me about deadlines")
        run = c.wait_status(run_id, "completed")
        assert run["attempts"] == 2
        calls = sorted(c.calls(run_id).items())
        # The stalled call was stopped (its connection closed), then exactly one retry ran.
        assert [(k.split("#")[0], v["outcome"]) for k, v in calls] == [
            (f"task:{run_id}:1", "stall"),
            (f"task:{run_id}:2", "completed"),
        ]
        rows = c.wait(lambda: len(usage_rows(p, run_id)) == 2 and usage_rows(p, run_id), "usage")
        assert [(r["attempt"], r["outcome"]) for r in rows] == [(1, "cancelled"), (2, "completed")]
        assert rows[0]["output_tokens"] <= calls[0][1]["output_tokens"]


def test_a_run_that_never_finishes_in_time_ends_in_one_failure_notice(
    nats_server: NatsServer, database_url: str, tmp_path: Path
) -> None:
    env = {
        "POLICY_RUN_DEADLINE_S": "1.5",
        "POLICY_RETRY_BACKOFF_S": "0.2",
        "POLICY_MAX_ATTEMPTS": "2",
        "EXECUTOR_STALL_TIMEOUT_S": "120",
    }
    with _pipeline(nats_server, database_url, tmp_path, env, {"policy": 2}) as p:
        p.model.set_faults(
            [{"kind": "stall", "model": ANSWER_MODEL, "count": -1, "after_tokens": 1}]
        )
        c = Client(p)
        run_id = c.send("Will you ever answer?")
        run = c.wait_status(run_id, "failed")
        assert (run["verdict"], run["attempts"]) == ("stop", 2)
        notices = c.wait(lambda: [m for m in c.messages() if m["kind"] == "failure"], "notice")
        assert len(notices) == 1 and "timeout" in notices[0]["content"]
        assert len(c.calls(run_id)) == 2


def test_a_call_whose_executor_died_on_its_last_delivery_is_billed_by_estimate_at_the_deadline(
    nats_server: NatsServer, database_url: str, tmp_path: Path
) -> None:
    # The executor is SIGKILLed mid-stream and not restarted: no delivery of the task follows
    # before the attempt's deadline, so policy's settle timer bills the dead call (I4).
    env = {
        "POLICY_RUN_DEADLINE_S": "3",
        "POLICY_MAX_ATTEMPTS": "1",
        "POLICY_SETTLE_GRACE_S": "1",
    }
    with _pipeline(nats_server, database_url, tmp_path, env) as p:
        c = Client(p)
        _slow_model(p, words=60)
        with Events(c) as events:
            run_id = c.send("Tell me a story and die in the middle")
            c.wait(lambda: sum(1 for e, _ in events.events if e == "token") >= 4, "tokens")
        child = p.child("executor")
        dead = child.proc
        assert dead is not None
        dead.send_signal(signal.SIGKILL)
        dead.wait(10)
        run = c.wait_status(run_id, "failed")
        assert run["attempts"] == 1

        def estimated() -> list[dict[str, Any]]:
            return [r for r in usage_rows(p, run_id) if r["outcome"] == "died_with_executor"]

        [row] = c.wait(estimated, "the estimated usage row", timeout=60)
        [(call_id, served)] = c.calls(run_id).items()
        assert row["call_id"] == call_id and served["outcome"] != "completed"
        assert row["input_tokens"] == served["input_tokens"] > 0
        assert 4 <= row["output_tokens"] <= served["output_tokens"]
        assert [r["call_id"] for r in usage_rows(p, run_id)] == [call_id]

        # Restarted (as `baton up` would), so the stack stops cleanly.
        def restarted() -> bool:
            p.supervisor.poll()
            log = (p.logs / "executor.log").read_text()
            return child.proc is not dead and log.count('"event":"started"') >= 2

        c.wait(restarted, "executor restarted")


def test_a_retry_waiting_for_its_backoff_survives_a_policy_crash(
    nats_server: NatsServer, database_url: str, tmp_path: Path
) -> None:
    with _pipeline(nats_server, database_url, tmp_path, {"POLICY_RETRY_BACKOFF_S": "3"}) as p:
        p.model.set_faults([{"kind": "529", "model": ANSWER_MODEL, "count": 1}])
        c = Client(p)
        run_id = c.send("Retry me after a crash")
        # Policy has scheduled attempt 2 (its run.status is stored) and waits for the backoff.
        c.wait(lambda: c.runs().get(run_id, {}).get("attempts") == 2, "retry scheduled")
        child = p.child("policy")
        proc = child.proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 90
        while c.runs().get(run_id, {}).get("status") != "completed":
            p.supervisor.poll()  # restarts policy, as `baton up` would
            assert time.monotonic() < deadline, f"no retry after the crash\n{p.log_tail(60)}"
            time.sleep(0.1)
        assert child.proc is not proc  # it was restarted
        outcomes = [v["outcome"] for _, v in sorted(c.calls(run_id).items())]
        assert outcomes == ["529", "completed"]


def _billed_tokens(p: Pipeline, run_id: str) -> int:
    async def read() -> int:
        con = await asyncpg.connect(p.database_url)
        try:
            total: int = await con.fetchval(
                "SELECT sum(input_tokens + output_tokens + cache_read_tokens"
                " + cache_write_tokens) FROM usage WHERE run_id = $1",
                run_id,
            )
        finally:
            await con.close()
        return total

    return asyncio.run(read())


def _limits_counter(p: Pipeline, key: str) -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        nc = await nats.connect(p.nats_url)
        try:
            kv = await nc.jetstream().key_value(subjects.BUCKET_LIMITS)
            entry = await kv.get(key)
            value: dict[str, Any] = json.loads(entry.value or b"{}")
            return value
        finally:
            await nc.close()

    return asyncio.run(read())


def test_a_cancelled_run_frees_the_only_runs_in_flight_slot_and_settles_its_partial_usage(
    nats_server: NatsServer, database_url: str, tmp_path: Path
) -> None:
    """Limits with the lifecycle: a cancelled run stores no reply, yet its slot and budget settle."""
    path = tmp_path / "policy.toml"
    path.write_text(
        "[defaults]\nmax_concurrent_runs = 1\n[defaults.caps]\nproject_daily_tokens = 10000000\n"
    )
    with _pipeline(nats_server, database_url, tmp_path, {"BATON_POLICY_FILE": str(path)}) as p:
        c = Client(p)
        _slow_model(p)
        first = c.send("Please write a very long essay about message brokers.")
        call = c.open_call(first)
        # The only slot is taken: another conversation of the project is refused meanwhile.
        other = Client(p)
        blocked = other.send("A question while the first one runs.")
        run = other.wait_status(blocked, "refused")
        assert "max concurrent runs" in run["reason"]
        assert c.cancel(first).status_code == 202
        c.wait_status(first, "cancelled")
        ended = c.wait(
            lambda: c.calls(first)[call]["outcome"] != "open" and c.calls(first)[call],
            "the call to end",
        )
        assert ended["outcome"] == "client_disconnected"
        c.wait(lambda: usage_rows(p, first), "usage row")
        # Input, output and cache tokens of every call of the run, the agent's classification
        # included, as budgets count them.
        billed = _billed_tokens(p, first)
        assert billed > 0
        # The day's project counter settled the cancelled run with its partial usage, once.
        day = budget.day_of(datetime.now(UTC))
        counter = c.wait(
            lambda: (
                (v := _limits_counter(p, subjects.budget_key(day, "acme")))
                and v.get("settled_runs") == 1
                and v
            ),
            "the cancelled run settled",
        )
        assert counter["settled_tokens"] == billed and not counter.get("open")
        assert not _limits_counter(p, subjects.active_key("acme")).get("open")
        # The freed slot: the project's next message is approved and answered.
        p.model.update_settings(tokens_per_second=0, words_per_reply=24)
        nxt = Client(p)
        answered = nxt.send("And now a short one.")
        run = nxt.wait_status(answered, "completed")
        assert run["verdict"] == "approve"

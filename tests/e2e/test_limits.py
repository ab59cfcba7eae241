"""Limits through the whole pipeline with two policy and two gateway replicas (real everything)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import msgspec
import pytest

from baton.embedded import NatsServer, free_ports
from baton.supervisor import Child, Supervisor
from tests.e2e.conftest import SETTLE_S, STARTUP_S, Pipeline, _running, start_services

pytestmark = pytest.mark.e2e

PER_RUN = 1000 + 256  # estimated_input_tokens + max_output_tokens (each run's reservation)


class Replicated(msgspec.Struct):
    p: Pipeline
    gateways: list[str]


@contextlib.contextmanager
def _replicated(
    nats_server: NatsServer, database_url: str, tmp_path: Path, policy: str
) -> Iterator[Replicated]:
    """The pipeline with a policy file, plus a second policy and a second gateway process."""
    path = tmp_path / "policy.toml"
    path.write_text(policy)
    logs = tmp_path / "logs"
    with _running(nats_server.url, database_url, logs, extra={"BATON_POLICY_FILE": str(path)}) as p:
        port, *metrics_ports = free_ports(3)  # distinct, unlike free_port() thrice
        extra = []
        for (name, env), metrics_port in zip(
            (("policy", {}), ("gateway", {"GATEWAY_HTTP_PORT": str(port)})),
            metrics_ports,
            strict=True,
        ):
            env = {**p.child(name).env, **env, "BATON_METRICS_PORT": str(metrics_port)}
            argv = [sys.executable, "-m", f"services.{name}"]
            extra.append(Child(name, argv, env, logs / f"{name}-2.log"))
        second = Supervisor(extra, say=lambda line: None)
        try:
            start_services(extra, STARTUP_S)  # a port taken meanwhile is drawn again
            port = int(extra[1].env["GATEWAY_HTTP_PORT"])
            yield Replicated(p, [p.gateway, f"http://127.0.0.1:{port}"])
        finally:
            second.stop_all(grace_s=10)
        for child in extra:
            assert child.exit_code() == 0, p.log_tail()


async def _wait_for(db: asyncpg.Connection, sql: str, expected: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while (got := await db.fetchval(sql)) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"{sql}: {got}, expected {expected}")
        await asyncio.sleep(0.5)


def test_a_burst_of_200_against_a_cap_that_fits_50_never_passes_it_and_refuses_the_rest(
    nats_server: NatsServer, database_url: str, tmp_path: Path
) -> None:
    cap = 50 * PER_RUN
    policy = (
        "[defaults]\nmax_output_tokens = 256\nestimated_input_tokens = 1000\n"
        f"[defaults.caps]\nproject_daily_tokens = {cap}\n"
    )
    with _replicated(nats_server, database_url, tmp_path, policy) as r:
        asyncio.run(_burst(r, cap))


async def _burst(r: Replicated, cap: int) -> None:
    auth = {"Authorization": f"Bearer {r.p.token('burst', 'u1')}"}
    async with httpx.AsyncClient(timeout=60) as client:

        async def send(i: int) -> None:
            url = f"{r.gateways[i % 2]}/api/chat"
            body = {"content": f"What is a JetStream consumer? ({i})"}
            headers = {**auth, "Idempotency-Key": f"burst-{i}"}
            resp = await client.post(url, json=body, headers=headers)
            assert resp.status_code == 202, resp.text

        await asyncio.gather(*(send(i) for i in range(200)))
    db = await asyncpg.connect(r.p.database_url)
    try:
        await _wait_for(db, "SELECT count(*) FROM messages WHERE role = 'assistant'", 200)
        await _wait_for(db, "SELECT count(*) FROM runs WHERE status_rank = 3", 200)
        # Verdicts are stored by their own consumer: the reply can be stored before them.
        await _wait_for(db, "SELECT count(*) FROM runs WHERE verdict <> ''", 200)
        rows = await db.fetch("SELECT * FROM runs WHERE project_id = 'burst'")
        approved = [x for x in rows if x["verdict"] != "stop"]
        stopped = [x for x in rows if x["verdict"] == "stop"]
        used = await db.fetchval(
            "SELECT sum(input_tokens + output_tokens + cache_read_tokens + cache_write_tokens)"
            " FROM usage WHERE project_id = 'burst'"
        )
        refusals = await db.fetch(
            "SELECT content FROM messages WHERE kind = 'refusal' AND project_id = 'burst'"
        )
        kinds = dict(
            await db.fetch(
                "SELECT kind, count(*) FROM messages WHERE role = 'assistant' GROUP BY kind"
            )
        )
    finally:
        await db.close()
    assert len(rows) == 200
    # Each estimate is an upper bound of its run here, so at least 50 fit; the real usage of
    # all approved runs together stays under the cap however many replicas raced.
    assert len(approved) >= 50, len(approved)
    assert used <= cap, (used, cap)
    assert len(stopped) == 200 - len(approved) > 0
    assert kinds == {"answer": len(approved), "refusal": len(stopped)}
    assert all(x["status"] == "completed" for x in approved), [
        dict(x) for x in approved if x["status"] != "completed"
    ][:3]
    assert all(x["reserved_tokens"] == PER_RUN for x in approved), [
        (x["reserved_tokens"], x["estimated_tokens"], x["verdict"]) for x in approved
    ]
    assert all(x["status"] == "refused" and "daily cap" in x["reason"] for x in stopped)
    assert all("resets at 00:00 UTC" in x["content"] for x in refusals)
    snapshot = msgspec.json.decode(stopped[0]["limits"])
    assert snapshot["limits"]["project_daily_tokens"] == cap
    assert snapshot["project_tokens_used"] + PER_RUN > cap
    # The verdict record as clients see it.
    async with httpx.AsyncClient(timeout=10) as client:
        for row, verdict in ((stopped[0], "stop"), (approved[0], approved[0]["verdict"])):
            url = f"{r.gateways[1]}/api/conversations/{row['conversation_id']}/state"
            [run] = (await client.get(url, headers=auth)).json()["runs"]
            assert run["verdict"] == verdict and run["reason"] == row["reason"]
            assert run["limits"]["limits"]["project_daily_tokens"] == cap
            if verdict == "stop":
                assert run["reserved_tokens"] == 0 and run["actual_tokens"] == 0
            else:
                assert run["reserved_tokens"] == PER_RUN
                assert (
                    0
                    < run["actual_tokens"]
                    == sum(v for k, v in run["usage"].items() if k.endswith("_tokens"))
                )
                assert run["model"] and run["executor"] in ("chat", "code")


def test_the_rate_limit_holds_with_two_gateways_and_two_policies_and_429_says_when(
    nats_server: NatsServer, database_url: str, tmp_path: Path
) -> None:
    policy = "[defaults.rate]\nper_minute = 4\n"
    with _replicated(nats_server, database_url, tmp_path, policy) as r:
        asyncio.run(_rate(r))


async def _rate(r: Replicated) -> None:
    # Fixed windows: the messages must all fall in one minute. Aligned here, once the stack is
    # up (its start took 20-40 s at load 20, and pushed the burst over a minute's end).
    if time.time() % 60 > 30:
        await asyncio.sleep(61 - time.time() % 60)
    auth = {"Authorization": f"Bearer {r.p.token('rated', 'chatty')}"}
    statuses: list[int] = []
    retry_after: list[int] = []
    db = await asyncpg.connect(r.p.database_url)
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            for i in range(10):
                resp = await client.post(
                    f"{r.gateways[i % 2]}/api/chat",
                    json={"content": f"hello {i}"},
                    headers={**auth, "Idempotency-Key": f"rate-{i}"},
                )
                statuses.append(resp.status_code)
                if resp.status_code == 429:
                    retry_after.append(int(resp.headers["Retry-After"]))
                    assert resp.json()["error"]["code"] == "rate_limited"
                if i == 5:
                    # Policy has counted the first messages by now; the gateways' caches expire.
                    await _wait_for(db, "SELECT count(*) FROM runs WHERE status_rank = 3", 6, 60)
                    await asyncio.sleep(1.5)
        accepted = statuses.count(202)
        await _wait_for(db, "SELECT count(*) FROM messages WHERE role = 'assistant'", accepted, 60)
        verdicts = "SELECT count(*) FROM runs WHERE user_id = 'chatty' AND verdict <> ''"
        await _wait_for(db, verdicts, accepted, 60)
        rows = await db.fetch("SELECT verdict, reason FROM runs WHERE user_id = 'chatty'")
    finally:
        await db.close()
    answered = [x for x in rows if x["verdict"] != "stop"]
    refused = [x for x in rows if x["verdict"] == "stop"]
    assert len(answered) == 4  # policy is authoritative, whichever gateway took the message
    assert all("4 messages per minute" in x["reason"] for x in refused) and len(refused) >= 2
    assert statuses[:6] == [202] * 6 and statuses[6:] == [429] * 4  # then the early 429s
    assert all(1 <= s <= 60 for s in retry_after)


def _metric(url: str, line: str) -> float:
    for row in httpx.get(url, timeout=2).text.splitlines():
        if row.startswith(line + " "):
            return float(row.split()[-1])
    return 0.0


def test_a_changed_policy_file_applies_without_restart_and_a_bad_change_is_rejected(
    nats_server: NatsServer, database_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("[defaults]\n")
    logs = tmp_path / "logs"
    with _running(nats_server.url, database_url, logs, extra={"BATON_POLICY_FILE": str(path)}) as p:
        metrics = f"http://127.0.0.1:{p.child('policy').env['BATON_METRICS_PORT']}/metrics"
        auth = {"Authorization": f"Bearer {p.token('reload', 'u1')}"}

        def reply(n: int) -> str:
            resp = httpx.post(
                f"{p.gateway}/api/chat", json={"content": f"What is NATS? ({n})"}, headers=auth
            )
            assert resp.status_code == 202
            cid = resp.json()["message"]["conversation_id"]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                got = httpx.get(f"{p.gateway}/api/conversations/{cid}/messages", headers=auth)
                messages = got.json()["messages"] if got.status_code == 200 else []
                kinds = [x["kind"] for x in messages if x["role"] == "assistant"]
                if kinds:
                    return str(kinds[0])
                time.sleep(0.2)
            raise AssertionError("no reply")

        def wait_metric(line: str, value: float) -> None:
            deadline = time.monotonic() + SETTLE_S
            while _metric(metrics, line) < value:
                assert time.monotonic() < deadline, line
                time.sleep(0.2)

        assert reply(1) == "answer"
        everything = '["question", "code", "creative", "greeting", "other"]'
        path.write_text(f"[defaults]\ndisallowed_intents = {everything}\n")
        wait_metric('baton_policy_file_reloads_total{outcome="applied"}', 1)
        assert reply(2) == "refusal"
        path.write_text("[defaults]\ndisallowed_intents = 42\n")
        wait_metric('baton_policy_file_reloads_total{outcome="rejected"}', 1)
        assert reply(3) == "refusal"  # the previous rules stay in force
        assert "policy file rejected" in (logs / "policy.log").read_text()
